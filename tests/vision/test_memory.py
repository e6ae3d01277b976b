"""The agent's memory on a Raspberry Pi Zero 2 W budget: one camera pipeline peaks at 120 MiB.

The rpi-zero2w profile gives the agent's unit 192M; the broker and the page cache need
the rest of what the board has. The agent runs as a real process with that profile, a
relay pipeline and the camera pipeline `decode -> motion -> detect person -> track ->
publish`; vtest.avi's pedestrians arrive as 768x576 JPEG over a real Mosquitto from a
camera bridge at 10 frames a second (five times the profile's fps_cap). The peak is the
kernel's VmHWM of the process: a memory property, not a timing. (A burst of frames as fast
as the broker takes them is measured by `fogwhisk bench vision`.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cv2
from agent_proc import AgentProcess  # type: ignore[import-not-found]
from helpers import (  # type: ignore[import-not-found]
    Collector,
    connect,
    make_client,
    publish_many,
)
from vision_util import video_frames  # type: ignore[import-not-found]

PEAK_BAR_KIB = 120 * 1024
FRAMES = 48
CAMERA_FPS = 10.0
DEVICE = "cam-mem"


def config(path: Path, local: Any, uplink: Any) -> Path:
    path.write_text(f"""
[device]
id = "{DEVICE}"
profile = "rpi-zero2w"
data_dir = "{path.parent / 'data'}"

[local]
url = "{local.url}"

[uplink]
url = "{uplink.url}"

[outbox]
min_free_bytes = "1MB"

[telemetry]
interval_s = "1s"

[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{{ action = "forward" }}]

[[pipeline]]
name = "street"
trigger = "cameras/+/jpeg"
steps = [
  {{ action = "decode" }},
  {{ action = "motion" }},
  {{ action = "detect", model = "person", min_score = 0.4 }},
  {{ action = "track", min_score = 0.4, timeout_s = "3s" }},
  {{ action = "publish" }},
]
""")
    return path


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def street(telemetry: Collector) -> dict[str, Any]:
    docs = telemetry.snapshot()
    return dict(json.loads(docs[-1].payload)["pipelines"].get("street", {})) if docs else {}


def finished(telemetry: Collector) -> int:
    """Frames that went all the way through the street pipeline (or were dropped in it)."""
    return int(street(telemetry).get("latency_ms", {}).get("total", {}).get("n", 0))


def wait_finished(telemetry: Collector, agent: AgentProcess, at_least: int,
                  timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while finished(telemetry) < at_least:
        assert agent.running, agent.log()
        assert time.monotonic() < deadline, f"{street(telemetry)}\n{agent.log()}"
        time.sleep(0.2)


def publish_paced(url: str, topic: str, payloads: list[bytes], fps: float) -> None:
    """A camera bridge: one frame every 1/fps seconds, each acknowledged (QoS 1)."""
    client = make_client(url)
    connect(client, url)
    try:
        start = time.monotonic()
        for i, data in enumerate(payloads):
            time.sleep(max(0.0, start + i / fps - time.monotonic()))
            info = client.publish(topic, data, qos=1)
            info.wait_for_publish(10)
            assert info.is_published(), f"frame {i} not acknowledged by {url}"
    finally:
        client.disconnect()
        client.loop_stop()


def test_one_camera_pipeline_on_768x576_jpeg_frames_peaks_within_120_mib(
        tmp_path: Path, local_broker: Any, uplink_broker: Any) -> None:
    """A camera at 10 fps through decode, motion, detect, track and publish: VmHWM <= 120 MiB.

    Before: every track, tentative ones included, held its best whole frame (1.3 MB) for
    its timeout, and freed frames stayed in the heaps of the threads that made them.
    """
    frames = video_frames(limit=2 * FRAMES)[::2]  # people walk: most frames have motion
    assert frames[0].shape == (576, 768, 3)
    jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
    agent = AgentProcess(config(tmp_path / "agent.toml", local_broker, uplink_broker))
    try:
        agent.wait_ready(timeout=60)
        with Collector(uplink_broker.url, f"fog/{DEVICE}/telemetry") as telemetry, \
                Collector(uplink_broker.url, f"fog/{DEVICE}/events/#") as events:
            # The agent subscribes after "ready": one frame until it has gone through.
            deadline = time.monotonic() + 30
            while finished(telemetry) < 1:
                assert time.monotonic() < deadline, agent.log()
                publish_many(local_broker.url, "cameras/lobby/jpeg", jpegs[:1])
                time.sleep(1.5)
            idle = status_kib(agent.pid)
            time.sleep(1.2)  # a telemetry interval: a late primer frame is counted by now
            base = finished(telemetry)
            publish_paced(local_broker.url, "cameras/lobby/jpeg", jpegs, CAMERA_FPS)
            wait_finished(telemetry, agent, base + FRAMES)
            busy = status_kib(agent.pid)
            seen = street(telemetry)
            people = [json.loads(m.payload) for m in events.snapshot()]
        print(f"\nagent RSS: ready {idle['VmRSS'] / 1024:.1f} MiB, after {FRAMES} frames "
              f"{busy['VmRSS'] / 1024:.1f} MiB, peak (VmHWM) {busy['VmHWM'] / 1024:.1f} MiB")
        assert seen.get("frames_inferred", 0) > FRAMES // 2, seen  # the model did run
        assert any(e.get("label") == "person" for e in people), people
        assert busy["VmHWM"] <= PEAK_BAR_KIB, (
            f"peak RSS {busy['VmHWM'] / 1024:.1f} MiB is above {PEAK_BAR_KIB // 1024} MiB")
    finally:
        assert agent.stop() == 0, agent.log()
