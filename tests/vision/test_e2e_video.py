"""Real video through the real agent: vtest.avi's pedestrians become person events at the uplink.

Frames travel as JPEG over a real Mosquitto (the way a camera bridge publishes them), or
the agent reads the video file itself through a camera trigger.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
from helpers import Collector, publish_many  # type: ignore[import-not-found]
from vision_util import sample_path, video_frames  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[2]
STEPS = ('{ action = "decode" }, { action = "motion" }, '
         '{ action = "detect", model = "person", min_score = 0.3 }, '
         '{ action = "track", min_score = 0.3, timeout_s = "2s" }, { action = "publish" }')


def start_agent(tmp_path: Path, local: Any, uplink: Any, trigger: str, steps: str) -> Any:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "cam2"
data_dir = "{tmp_path / 'data'}"
[local]
url = "{local.url}"
[uplink]
url = "{uplink.url}"
[runtime]
num_threads = 1
[telemetry]
interval_s = "1s"
[[pipeline]]
name = "street"
trigger = {trigger}
steps = [{steps}]
""")
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def stop(proc: Any, tmp_path: Path) -> str:
    proc.terminate()
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return (tmp_path / "agent.log").read_text(errors="replace")


def counters(telemetry: Collector) -> dict[str, Any]:
    last = telemetry.snapshot()[-1]
    return dict(json.loads(last.payload)["pipelines"]["street"])


def wait_counter(telemetry: Collector, name: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if telemetry.snapshot() and counters(telemetry).get(name, 0) >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {at_least}: {counters(telemetry)}")


def settled(telemetry: Collector) -> int:
    """The input count once it stopped growing (every frame published was taken)."""
    last = -1
    while True:
        time.sleep(1.2)  # a telemetry interval and a bit
        now = int(counters(telemetry)["in"])
        if now == last:
            return now
        last = now


def test_pedestrians_in_vtest_published_as_jpeg_become_person_events_and_a_still_does_not(
        tmp_path: Path, local_broker: Any, uplink_broker: Any) -> None:
    frames = video_frames(limit=160)[::2]
    jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
    agent = start_agent(tmp_path, local_broker, uplink_broker, '"cameras/+/jpeg"', STEPS)
    try:
        with Collector(uplink_broker.url, "fog/cam2/events/#") as events, \
                Collector(uplink_broker.url, "fog/cam2/telemetry") as telemetry:
            # A camera pointed at a still scene: the same frame again and again.
            still = [jpegs[0]] * 15
            deadline = time.monotonic() + 30
            while not (telemetry.snapshot() and counters(telemetry).get("in", 0) >= 15):
                publish_many(local_broker.url, "cameras/still/jpeg", still, qos=1)
                assert time.monotonic() < deadline, "the agent never took the still frames"
                time.sleep(2.5)  # published before the agent subscribed: not delivered
            base = settled(telemetry)
            assert counters(telemetry).get("frames_motion", 0) == 0
            assert counters(telemetry).get("frames_inferred", 0) == 0
            assert events.snapshot() == []
            # People walking.
            publish_many(local_broker.url, "cameras/street/jpeg", jpegs, qos=1)
            got = events.wait_for(1, timeout=60)
            wait_counter(telemetry, "in", base + len(jpegs))
            seen = counters(telemetry)
            assert seen["frames_motion"] > len(jpegs) // 2
            assert seen["frames_inferred"] > 0
        first = json.loads(got[0].payload)
        assert first["v"] == 1 and first["pipeline"] == "street"
        assert first["type"] == "new" and first["label"] == "person"
        assert all(0.0 <= v <= 1.0 for v in first["detections"][0]["box"])
    finally:
        log = stop(agent, tmp_path)
    assert "Traceback" not in log, log


def test_a_camera_trigger_reads_the_video_file_itself_and_reports_people(
        tmp_path: Path, local_broker: Any, uplink_broker: Any) -> None:
    video = sample_path("vtest.avi")
    trigger = f'{{ camera = "{video}", fps = 20 }}'
    steps = STEPS.replace('{ action = "decode" }, ', "")
    agent = start_agent(tmp_path, local_broker, uplink_broker, trigger, steps)
    try:
        with Collector(uplink_broker.url, "fog/cam2/events/#") as events:
            got = events.wait_for(1, timeout=60)
        event = json.loads(got[0].payload)
        assert event["label"] == "person"
    finally:
        stop(agent, tmp_path)
