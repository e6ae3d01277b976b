"""Shadow evaluation on real frames with a real model: a device runs MediaPipe's face
detector (LiteRT) on a camera stand-in that publishes the project's sample media
(`scripts/fetch-samples`: the skimage photos with faces and without, and frames of
vtest.avi's pedestrians), never synthetic noise.

The candidates are the same detector changed as releases go wrong: a second build
that agrees, the same weights behind a decoder threshold no face reaches (it loads,
runs and sees nothing), a release whose goldens demand more recall than the model
has, and a build whose every inference takes 20 ms longer (at least 3x the active
model's time, as the shadow gate counts it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
from brokers import Broker
from candidates import faces_dir, real_dir
from device import Frames, Watch, pack, push, start_device
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy
from agent.vision.models import samples_dir

FACE = "face"
PIPELINE = f"""
[[pipeline]]
name = "door"
trigger = "cameras/+/jpeg"
steps = [{{ action = "decode" }}, {{ action = "detect", model = "{FACE}", pass_empty = true }},
         {{ action = "publish" }}]
"""
GATE = {"frames": 20, "max_duration": 120}


def media() -> list[bytes]:
    """Eleven JPEG frames of real photos and video, five with a face: astronaut.png and
    camera.png, each also mirrored, and astronaut.png cropped to its right part; no face
    in coffee.png, chelsea.png (a cat), rocket.jpg and three frames of vtest.avi
    (pedestrians far from the camera). An odd count, so that evaluating every k-th
    frame still reaches every image."""
    def still(name: str) -> Any:
        image = cv2.imread(str(samples_dir() / name), cv2.IMREAD_COLOR)
        assert image is not None, f"{name}: run scripts/fetch-samples"
        return image

    astronaut, camera = still("astronaut.png"), still("camera.png")
    images = [astronaut, camera, cv2.flip(astronaut, 1), cv2.flip(camera, 1),
              astronaut[:, 120:], still("coffee.png"), still("chelsea.png"),
              still("rocket.jpg")]
    video = cv2.VideoCapture(str(samples_dir() / "vtest.avi"))
    for _ in range(3):
        for _ in range(40):  # 40 frames apart: the people have moved
            ok, frame = video.read()
            assert ok, "vtest.avi: run scripts/fetch-samples"
        images.append(frame)
    video.release()
    return [bytes(cv2.imencode(".jpg", im)[1].tobytes()) for im in images]


def blind(text: str) -> str:
    """The face model's weights behind a decoder threshold no face reaches (about 0.9
    is the best score on these images); its golden face is cut, so it passes its trial
    and is judged in shadow."""
    text = re.sub(r"(?m)^min_score = .*$", "min_score = 0.999", text)
    return text[:text.index("[[golden.detections]]")]


def second_build(text: str) -> str:
    """Another build of the detector: a decoder tuned a little differently."""
    return re.sub(r"(?m)^nms_iou = .*$", "nms_iou = 0.35", text)


def test_shadow_on_real_media_passes_a_second_build_and_rejects_a_blind_one(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """On live frames of real photos: version 2, a second build of the face detector,
    agrees with the active one (F1 at least 0.9 over 20 frames), passes shadow and its
    golden gates, and is committed. Version 3, the same weights seeing nothing, is
    rejected in shadow with its agreement figure (F1 0.00) and never publishes. Version
    4 meets every golden but demands more golden recall than the model has (2 of 3
    labelled faces): rejected in its trial with the figure. Every frame gives exactly one
    event, made by version 1 or 2, and the faces in them are real."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, pipeline=PIPELINE)
    images = media()
    try:
        with Watch(broker.url) as watch, Frames(broker.url, images=images) as frames:
            watch.wait_events(5)
            good = faces_dir(tmp_path, "second-build")
            (good / "manifest.toml").write_text(second_build(
                (good / "manifest.toml").read_text()))
            push(pack(good, 2, tmp_path / "good", ota_keys.private, policy=Policy(
                probation_s=1.0, shadow=GATE, min_golden_recall=0.6,
                min_golden_precision=0.9))[1], broker)
            done = watch.state(2, "committed", agent, timeout=90, name=FACE)
            bad = real_dir(tmp_path, FACE, "blind", edit=blind)
            push(pack(bad, 3, tmp_path / "bad", ota_keys.private,
                      policy=Policy(probation_s=1.0, shadow=GATE))[1], broker)
            refused = watch.state(3, "rejected", agent, timeout=90, name=FACE)
            strict = faces_dir(tmp_path, "strict")
            push(pack(strict, 4, tmp_path / "strict", ota_keys.private, policy=Policy(
                shadow=GATE, min_golden_recall=0.9))[1], broker)
            too_strict = watch.state(4, "rejected", agent, timeout=90, name=FACE)
            sent = frames.stop()
            events = watch.wait_events(sent)
            states = watch.states(FACE)
    finally:
        agent.stop()
    order = [(d["update"]["version"], d["update"]["state"]) for d in states if d["update"]]
    assert order.index((2, "trial")) < order.index((2, "shadow")) \
        < order.index((2, "probation")) < order.index((2, "committed")), order
    summary = done["update"]["shadow"]
    assert summary["frames"] == 20 and summary["f1"] >= 0.9, summary
    assert summary["flags"] == [] and 0.8 <= summary["rate_ratio"] <= 1.25, summary
    assert summary["active_per_frame"] > 0.2, summary  # faces were seen, not empty frames
    assert done["active"]["version"] == 2
    reason = refused["update"]["reason"]
    assert reason.startswith("shadow: agreement F1 0.00 is below 0.5 (F1 0.00, rate ratio "
                             "0.00"), reason
    assert refused["update"]["shadow"]["frames"] == 20
    assert refused["update"]["shadow"]["active_per_frame"] > 0.2
    assert (3, "probation") not in order and refused["active"]["version"] == 2
    assert too_strict["update"]["reason"] == (
        "golden recall 0.67 is below 0.9 (recall 0.67: 2 of 3 expected detections found; "
        "precision 1.00: 2 of 2 detections expected; over 4 goldens)")
    assert (4, "shadow") not in order and too_strict["active"]["version"] == 2
    assert len(events) == sent
    assert [e["seq"] for e in events] == list(range(1, sent + 1))
    versions = [e["model"]["version"] for e in events]
    assert versions == sorted(versions) and set(versions) == {1, 2}, set(versions)
    faces = [e for e in events if e["detections"]]
    assert len(faces) >= sent * 5 // 11 - 2, (len(faces), sent)  # five of eleven images
    assert all(d["label"] == FACE and d["score"] >= 0.5 for e in faces for d in e["detections"])
    errors = [ln for ln in agent.log().splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert errors == [], errors


def test_shadow_on_real_media_rejects_a_3x_slower_build_on_latency(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """The face detector with 20 ms added to every inference (the fake runtime wrapping
    the real LiteRT model; the trial's own latency gate loosened by the policy): it
    agrees on every face, yet is rejected by the shadow latency gate with its p95
    ratio, at least 3; version 1 keeps every event."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, pipeline=PIPELINE)
    try:
        with Watch(broker.url) as watch, Frames(broker.url, images=media()) as frames:
            watch.wait_events(5)
            slow = real_dir(tmp_path, FACE, "slow", knobs={"wrap": "litert", "delay_ms": 20})
            push(pack(slow, 2, tmp_path / "slow", ota_keys.private, policy=Policy(
                max_latency_ratio=50.0,
                shadow={"frames": 11, "max_share": 1.0, "max_duration": 120}))[1], broker)
            slowed = watch.state(2, "rejected", agent, timeout=90, name=FACE)
            sent = frames.stop()
            events = watch.wait_events(sent)
    finally:
        agent.stop()
    reason = slowed["update"]["reason"]
    assert reason.startswith("shadow: latency p95 ratio "), reason
    summary = slowed["update"]["shadow"]
    assert summary["frames"] == 11 and summary["latency_ratio"] >= 3.0, summary
    assert summary["f1"] == 1.0 and summary["active_per_frame"] > 0.2, summary
    assert slowed["active"]["version"] == 1
    assert len(events) == sent and {e["model"]["version"] for e in events} == {1}
