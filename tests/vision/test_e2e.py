"""End to end through real Mosquitto brokers and the real agent process (python -m agent run)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
from helpers import Collector, publish_one  # type: ignore[import-not-found]

from agent.vision.models import samples_dir

ROOT = Path(__file__).resolve().parents[2]


def jpeg(name: str) -> bytes:
    path = samples_dir() / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/fetch-samples")
    img = cv2.imread(str(path))
    return cv2.imencode(".jpg", img)[1].tobytes()


def start_agent(tmp_path: Path, local: Any, uplink: Any, steps: str,
                camera: str | None = None) -> subprocess.Popen[bytes]:
    trigger = f'{{ camera = "{camera}", fps = 10 }}' if camera else '"cameras/+/jpeg"'
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "cam1"
data_dir = "{tmp_path / 'data'}"
[local]
url = "{local.url}"
[uplink]
url = "{uplink.url}"
[runtime]
num_threads = 1
[[pipeline]]
name = "door"
trigger = {trigger}
steps = [{steps}]
""")
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


FACE_STEPS = ('{ action = "decode" }, { action = "detect", model = "face" }, '
              '{ action = "track", timeout_s = "1s" }, { action = "publish" }')


def test_a_face_published_as_jpeg_becomes_an_event_with_its_box_at_the_uplink(
        tmp_path: Path, local_broker: Any, uplink_broker: Any) -> None:
    agent = start_agent(tmp_path, local_broker, uplink_broker, FACE_STEPS)
    try:
        with Collector(uplink_broker.url, "fog/cam1/events/#") as events:
            time.sleep(2.0)  # the agent subscribes
            for name in ("coffee.png", "chelsea.png"):  # no face: no event
                for _ in range(3):
                    publish_one(local_broker.url, "cameras/door/jpeg", jpeg(name))
            for _ in range(4):
                publish_one(local_broker.url, "cameras/door/jpeg", jpeg("astronaut.png"))
                time.sleep(0.1)
            got = events.wait_for(1, timeout=30)
            time.sleep(2.5)  # the track ends after 1 s unseen
            msgs = [json.loads(m.payload) for m in events.snapshot()]
    finally:
        stop(agent)
    log = (tmp_path / "agent.log").read_text(errors="replace")
    assert got, log
    kinds = [m["type"] for m in msgs]
    assert kinds[0] == "new" and kinds.count("new") == 1, (kinds, log)
    new = msgs[0]
    assert new["v"] == 1 and new["device"] == "cam1" and new["pipeline"] == "door"
    assert new["model"] == {"name": "face", "version": 1}
    (det,) = new["detections"]
    assert det["label"] == "face"
    x0, y0, x1, y1 = det["box"]
    assert 0.30 < x0 < 0.40 and 0.12 < y0 < 0.20 and 0.48 < x1 < 0.58 and 0.30 < y1 < 0.38
    assert "infer" in new["latency_ms"]


def test_corrupt_frames_and_a_broken_model_do_not_stop_the_pipeline(
        tmp_path: Path, local_broker: Any, uplink_broker: Any) -> None:
    agent = start_agent(tmp_path, local_broker, uplink_broker, FACE_STEPS)
    try:
        with Collector(uplink_broker.url, "fog/cam1/events/#") as events:
            time.sleep(2.0)
            good = jpeg("astronaut.png")
            for payload in (good[: len(good) // 2], b"not an image", b"\xff\xd8garbage"):
                publish_one(local_broker.url, "cameras/door/jpeg", payload)
            for _ in range(4):
                publish_one(local_broker.url, "cameras/door/jpeg", good)
            assert events.wait_for(1, timeout=30)
    finally:
        stop(agent)
