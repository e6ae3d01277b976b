"""Shadow evaluation's pure core: agreement F1 by label and IoU, detection-rate ratio,
output sanity flags, latency ratio, the signed gates and `not enough frames`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ota.release import Policy
from agent.ota.shadow import (
    Frame,
    Seen,
    ShadowPolicy,
    every,
    iou,
    judge,
    matches,
    summarize,
)

A = Seen("disc", 0.9, (0.1, 0.1, 0.3, 0.3))
B = Seen("square", 0.8, (0.5, 0.5, 0.9, 0.9))
A_NEAR = Seen("disc", 0.7, (0.11, 0.1, 0.31, 0.3))  # IoU ~0.9 with A
A_FAR = Seen("disc", 0.7, (0.2, 0.2, 0.4, 0.4))  # IoU ~0.14 with A
A_AS_SQUARE = Seen("square", 0.9, A.box)


def frame(active: tuple[Seen, ...], cand: tuple[Seen, ...], a_ms: float = 10.0,
          c_ms: float = 10.0, error: str | None = None) -> Frame:
    return Frame(active, cand, a_ms, c_ms, error)


@pytest.mark.parametrize(("active", "cand", "matched"), [
    ((A,), (A,), 1),
    ((A,), (A_NEAR,), 1),
    ((A,), (A_FAR,), 0),  # same label, IoU under 0.5
    ((A,), (A_AS_SQUARE,), 0),  # same box, other label
    ((A,), (A_NEAR, A), 1),  # one to one: the second candidate box is a false positive
    ((A, B), (B, A), 2),
    ((), (A,), 0),
    ((A,), (), 0),
])
def test_detections_match_one_to_one_by_label_and_iou(
        active: tuple[Seen, ...], cand: tuple[Seen, ...], matched: int) -> None:
    """A candidate detection agrees with an active one of the same label whose box
    overlaps it with IoU >= 0.5; each detection is matched at most once."""
    assert matches(active, cand) == matched


@given(st.lists(st.tuples(st.sampled_from(["disc", "square"]),
                          st.floats(0, 0.5), st.floats(0, 0.5),
                          st.floats(0.05, 0.5), st.floats(0.05, 0.5)), max_size=6))
def test_a_candidate_identical_to_the_active_model_agrees_fully(
        boxes: list[tuple[str, float, float, float, float]]) -> None:
    """Same detections on every frame: F1 1, rate ratio 1, no flag, passes the gates."""
    seen = tuple(Seen(lbl, 0.9, (x, y, x + w, y + h)) for lbl, x, y, w, h in boxes)
    frames = [frame(seen, seen)] * 30
    s = summarize(frames)
    assert s.f1 == 1.0 and s.rate_ratio == 1.0 and s.latency_ratio == 1.0
    assert judge(s, ShadowPolicy()) is None


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
                min_size=1, max_size=40))
def test_f1_lies_in_0_1_and_is_symmetric_in_the_two_models(
        counts: list[tuple[int, int, int]]) -> None:
    """F1 is in [0, 1] and the same when active and candidate swap roles."""
    def boxes(n: int, off: float) -> tuple[Seen, ...]:
        return tuple(Seen("disc", 0.9, (off + i * 0.15, 0.0, off + i * 0.15 + 0.1, 0.1))
                     for i in range(n))
    frames = [frame(boxes(both, 0) + boxes(a, 0.001 + 0.5), boxes(both, 0) + boxes(c, 0.9))
              for both, a, c in counts]
    swapped = [frame(f.candidate, f.active) for f in frames]
    f1 = summarize(frames).f1
    assert 0.0 <= f1 <= 1.0
    assert math.isclose(f1, summarize(swapped).f1)


def test_a_candidate_that_sees_nothing_fails_on_agreement_with_the_figure() -> None:
    s = summarize([frame((A, B), ())] * 20)
    assert s.f1 == 0.0 and s.rate_ratio == 0.0
    reason = judge(s, ShadowPolicy())
    assert reason is not None
    assert reason.startswith("shadow: agreement F1 0.00 is below 0.5 (F1 0.00, rate ratio "
                             "0.00, latency ratio 1.00 over 20 frames)")


def test_both_models_seeing_nothing_agree() -> None:
    s = summarize([frame((), ())] * 20)
    assert (s.f1, s.rate_ratio, s.flags) == (1.0, 1.0, ())
    assert judge(s, ShadowPolicy()) is None


D2 = Seen("disc", 0.9, (0.5, 0.5, 0.9, 0.9))
D3 = Seen("disc", 0.9, (0.6, 0.0, 0.7, 0.1))


@pytest.mark.parametrize(("active", "cand", "ratio", "fails"), [
    ((A,), (A, A_FAR, D2, D3), 4.0, True),
    ((A, D2), (A,), 0.5, False),
    ((A, D2, A_FAR), (A,), 1 / 3, False),
    ((A, D2, A_FAR, D3), (A,), 0.25, True),
    ((), (A,), 20.0, True),  # the active model saw nothing: the candidate's count (>= 1)
    ((), (), 1.0, False),
])
def test_the_detection_rate_ratio_gate(active: tuple[Seen, ...], cand: tuple[Seen, ...],
                                       ratio: float, fails: bool) -> None:
    """Candidate detections per frame / active per frame, gated by rate_ratio [low, high];
    agreement is switched off here to look at the rate alone."""
    s = summarize([frame(active, cand)] * 20)
    assert math.isclose(s.rate_ratio, ratio)
    reason = judge(s, ShadowPolicy(min_agreement=0.0))
    if fails:
        assert reason is not None and reason.startswith("shadow: detection-rate ratio "), reason
    else:
        assert reason is None


def test_non_finite_outputs_and_raising_inferences_are_flagged() -> None:
    nan = Seen("disc", float("nan"), A.box)
    inf = Seen("disc", 0.9, (0.1, 0.1, float("inf"), 0.3))
    for frames in ([frame((A,), (nan,))] + [frame((A,), (A,))] * 19,
                   [frame((A,), (inf,))] + [frame((A,), (A,))] * 19,
                   [frame((A,), (), error="ValueError: score nan")] + [frame((A,), (A,))] * 19):
        s = summarize(frames)
        assert s.flags == ("non-finite",)
        reason = judge(s, ShadowPolicy())
        assert reason is not None and reason.startswith("shadow: output sanity: non-finite")


def test_constant_outputs_over_varied_frames_are_flagged() -> None:
    """The candidate says the same on every frame while the active model's output varies."""
    varied = [frame((A,), (A, B)), frame((A_FAR,), (A, B)), frame((A, B), (A, B))] * 7
    assert summarize(varied).flags == ("constant",)
    steady = [frame((B,), (B,))] * 20  # the scene does not change: no flag
    assert summarize(steady).flags == ()


def test_all_detections_of_one_class_when_the_active_model_sees_several_is_flagged() -> None:
    s = summarize([frame((A,), (A,)), frame((B,), (A_AS_SQUARE,)), frame((A, B), (A_NEAR, B))])
    assert "one-class" not in s.flags
    s = summarize([frame((A,), (A,)), frame((B,), (A_NEAR,)), frame((A, B), (A,))])
    assert "one-class" in s.flags


@pytest.mark.parametrize(("a_ms", "c_ms", "ratio", "fails"), [
    (10.0, 15.0, 1.5, False),
    (10.0, 30.0, 3.0, True),
    (1.0, 9.0, 1.8, False),  # the active p95 counts as at least 5 ms
    (1.0, 11.0, 2.2, True),
])
def test_the_latency_p95_ratio_gate(a_ms: float, c_ms: float, ratio: float,
                                    fails: bool) -> None:
    s = summarize([frame((A,), (A,), a_ms, c_ms)] * 20)
    assert s.latency_ratio is not None and math.isclose(s.latency_ratio, ratio)
    reason = judge(s, ShadowPolicy())
    assert (reason is not None and "latency p95 ratio" in reason) == fails, reason


def test_fewer_frames_than_the_minimum_is_not_enough_frames() -> None:
    s = summarize([frame((A,), (A,))] * 19)
    assert judge(s, ShadowPolicy()) == ("not enough frames: 19 evaluated in shadow, at "
                                        "least 20 needed")
    assert judge(s, ShadowPolicy(frames=10)) is None  # the minimum never exceeds `frames`
    assert judge(summarize([]), ShadowPolicy()) is not None


def test_the_summary_document_carries_f1_for_the_rollout() -> None:
    doc = summarize([frame((A, B), (A,), 10.0, 12.0)] * 20).to_json()
    assert doc["frames"] == 20 and doc["f1"] == pytest.approx(0.667, abs=1e-3)
    assert doc["rate_ratio"] == 0.5 and doc["latency_ratio"] == 1.2
    assert doc["flags"] == ["one-class"]


def test_policy_shadow_keys_and_defaults() -> None:
    p = ShadowPolicy.from_json({})
    assert (p.frames, p.max_duration_s, p.max_share, p.min_agreement, p.rate_ratio,
            p.max_latency_ratio, p.mode, p.interval_s) == \
        (200, 1800.0, 0.5, 0.5, (0.33, 3.0), 2.0, "gate", 60.0)
    assert ShadowPolicy.from_json({"mode": "observe", "interval": 5}).interval_s == 5.0
    p = ShadowPolicy.from_json({"frames": 20, "max_duration": 60, "rate_ratio": [0.5, 2],
                                "min_agreement": 0.8, "max_share": 0.25})
    assert (p.frames, p.max_duration_s, p.rate_ratio, p.min_agreement, p.max_share) == \
        (20, 60.0, (0.5, 2.0), 0.8, 0.25)


@pytest.mark.parametrize(("raw", "key"), [
    ([], "must be an object"),
    ({"frames": 0}, "frames"),
    ({"frames": 2.5}, "frames"),
    ({"frames": True}, "frames"),
    ({"min_agreement": 1.5}, "min_agreement"),
    ({"max_share": 0}, "max_share"),
    ({"rate_ratio": [3, 1]}, "rate_ratio"),
    ({"rate_ratio": 2}, "rate_ratio"),
    ({"max_latency_ratio": float("nan")}, "max_latency_ratio"),
    ({"max_duration": "30m"}, "max_duration"),
    ({"mode": "promote"}, "mode"),
    ({"interval": 0.5}, "interval"),
    ({"frmaes": 20}, "'frmaes' is not known"),
])
def test_a_bad_policy_shadow_is_refused_naming_the_key(raw: object, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ShadowPolicy.from_json(raw)


@pytest.mark.parametrize(("a_ms", "c_ms", "share", "k"), [
    (10.0, 10.0, 0.5, 2),  # same cost: every second frame is half the active's time
    (10.0, 30.0, 0.5, 6),
    (10.0, 5.0, 0.5, 1),
    (10.0, 10.0, 1.0, 1),
    (0.0, 0.0, 0.5, 2),  # nothing measured yet: as if equal
])
def test_every_kth_frame_keeps_the_candidate_within_its_share(
        a_ms: float, c_ms: float, share: float, k: int) -> None:
    assert every(a_ms, c_ms, share) == k
    if a_ms > 0:
        assert c_ms / k <= share * a_ms + 1e-9


def test_iou_of_disjoint_and_identical_boxes() -> None:
    assert iou(A.box, A.box) == pytest.approx(1.0)
    assert iou(A.box, B.box) == 0.0


def test_a_release_whose_policy_shadow_is_bad_is_refused_when_read() -> None:
    """The signed policy's `shadow` table is checked with the rest of the release, so a
    device refuses it before downloading rather than failing after the trial."""
    with pytest.raises(ValueError, match=r"policy\.shadow\.min_agreement"):
        Policy.from_json({"shadow": {"min_agreement": 2}})
    p = Policy.from_json({"shadow": {"frames": 20}})
    assert p.shadow_policy is not None and p.shadow_policy.frames == 20
    assert Policy().shadow_policy is None


def test_the_device_runs_the_candidate_on_every_kth_frame_within_its_share() -> None:
    """The hub's shadow run, fed as the detect step feeds it: a candidate 3x slower than
    the active model, max_share 0.5, takes about every 6th frame; its time stays within
    half the active model's (plus the one frame in hand); it stops at the frame limit."""
    from agent.vision.hub import ShadowFrame, ShadowRun
    run = ShadowRun(2, lambda a, c: every(a, c, 0.5), limit=50)
    active = candidate = 0.0
    for _ in range(240):
        active += 10.0
        if run.due(10.0):
            candidate += 30.0
            run.add(ShadowFrame((), (), 10.0, 30.0))
    assert 36 <= len(run.snapshot()) <= 41
    assert candidate <= 0.5 * active + 30.0
    for _ in range(1000):
        if run.due(10.0):
            run.add(ShadowFrame((), (), 10.0, 30.0))
    assert len(run.snapshot()) == 50


# -- end to end: a real agent, real Mosquitto, live frames (shapes-ssd on drawn discs:
# what these prove does not depend on what the model sees; test_shadow_media.py judges
# candidates by what they see, on real media with a real model) -----------------------


def test_a_shadow_evaluation_without_frames_ends_at_its_deadline_as_not_enough_frames(
        tmp_path: Path, broker: Any, ota_keys: Any) -> None:
    """No frame arrives: the candidate's shadow evaluation ends at its `max_duration` as
    `not enough frames`, version 1 stays active. (Candidates judged on what they see,
    on real media and the real face model: test_shadow_media.py.)"""
    from candidates import catalog_dir  # type: ignore[import-not-found]
    from device import Watch, pack, push, start_device  # type: ignore[import-not-found]
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            quiet = pack(catalog_dir(), 2, tmp_path / "quiet", ota_keys.private,
                         policy=Policy(shadow={"frames": 20, "max_duration": 2}))[1]
            push(quiet, broker)
            short = watch.state(2, "rejected", agent, timeout=90)
    finally:
        agent.stop()
    assert short["update"]["reason"] == ("not enough frames: 0 evaluated in shadow, at least "
                                         "20 needed")
    assert short["update"]["shadow"]["frames"] == 0
    assert short["active"]["version"] == 1


def test_kill_9_in_shadow_resumes_the_evaluation_with_its_deadline_and_commits(
        tmp_path: Path, broker: Any, ota_keys: Any) -> None:
    """kill -9 while the candidate is in shadow: after the restart version 1 runs, the
    update resumes in shadow (the trial again, then the comparison) with the time it
    first entered shadow, so its max_duration is not restarted, and ends committed."""
    from candidates import catalog_dir  # type: ignore[import-not-found]
    from device import Frames, Watch, pack, push, restart, start_device  # type: ignore[import-not-found]
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    release_json = pack(catalog_dir(), 2, tmp_path / "out", ota_keys.private, policy=Policy(
        probation_s=1.0, shadow={"frames": 40, "max_duration": 300}))[1]
    try:
        with Watch(broker.url) as watch, Frames(broker.url):
            watch.wait_events(3)
            push(release_json, broker)
            entered = watch.state(2, "shadow", agent, timeout=90)
            agent.kill()
            agent = restart(agent)
            done = watch.state(2, "committed", agent, timeout=120)
            states = watch.states()
            resumed_log = agent.log()
    finally:
        agent.stop()
    # one log for both processes: the candidate went into shadow before and after the kill
    assert resumed_log.count("version 2 runs in shadow") == 2, resumed_log[-3000:]
    assert done["active"]["version"] == 2
    assert done["update"]["shadow"]["frames"] == 40 and done["update"]["shadow"]["f1"] == 1.0
    in_shadow = [d["update"]["ts"] for d in states
                 if d["update"] and d["update"]["state"] == "shadow"]
    assert len(in_shadow) >= 2 and set(in_shadow) == {entered["update"]["ts"]}


def test_observe_mode_keeps_the_candidate_in_shadow_publishing_summaries_never_promoting(
        tmp_path: Path, broker: Any, ota_keys: Any) -> None:
    """policy.shadow.mode = "observe": the candidate stays in shadow past `frames`, one
    comparison summary per interval goes on fog/<device>/models/<name>/shadow, version 1
    stays active and makes every event; an empty deploy (the release withdrawn) ends it."""
    import json

    from candidates import catalog_dir  # type: ignore[import-not-found]
    from device import (  # type: ignore[import-not-found]
        DEVICE,
        NAME,
        Frames,
        Watch,
        deploy_raw,
        pack,
        push,
        start_device,
    )
    from helpers import Collector  # type: ignore[import-not-found]
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    release_json = pack(catalog_dir(), 2, tmp_path / "out", ota_keys.private, policy=Policy(
        shadow={"mode": "observe", "interval": 1, "frames": 5}))[1]
    topic = f"fog/{DEVICE}/models/{NAME}/shadow"
    try:
        with Watch(broker.url) as watch, Frames(broker.url) as frames, \
                Collector(broker.url, [topic]) as summaries:
            watch.wait_events(3)
            push(release_json, broker)
            watch.state(2, "shadow", agent, timeout=90)
            summaries.wait_for(3, timeout=60)
            still = watch.latest()
            deploy_raw(broker, b"")
            ended = watch.state(2, "rejected", agent, timeout=60)
            sent = frames.stop()
            events = watch.wait_events(sent)
            got = [json.loads(m.payload) for m in summaries.snapshot(topic)]
    finally:
        agent.stop()
    assert still["update"]["state"] == "shadow" and still["active"]["version"] == 1
    assert still["update"]["shadow"]["f1"] == 1.0
    assert ended["update"]["reason"] == "cancelled by the operator"
    assert ended["active"]["version"] == 1
    assert all(s["version"] == 2 and s["active"] == 1 and s["mode"] == "observe"
               for s in got), got
    assert sum(s["frames"] for s in got) > 5  # past `frames`: observing never decides
    assert all(s["f1"] == 1.0 for s in got if s["frames"])
    assert {e["model"]["version"] for e in events} == {1} and len(events) == sent
