"""OTA end to end: `fogwhisk model push` to the real agent process through real Mosquitto,
while a 10 fps frame pipeline runs on the model being updated.

(Named test_ota_e2e, not test_e2e: tests/vision/test_e2e.py holds that module name.)
"""

from __future__ import annotations

from pathlib import Path

from candidates import catalog_dir
from device import NAME, Frames, Watch, pack, push, start_device
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy


def check_events(events: list[dict[str, object]], sent: int) -> list[int]:
    """One event per frame, in order; the model versions they name never go back."""
    assert len(events) == sent, (len(events), sent)
    assert [e["seq"] for e in events] == list(range(1, sent + 1))
    versions = [e["model"]["version"] for e in events]  # type: ignore[index]
    assert versions == sorted(versions), versions
    assert all(e["model"]["name"] == NAME for e in events)  # type: ignore[index]
    return versions


def test_a_pushed_release_is_committed_and_the_frames_switch_version_without_a_drop(
        tmp_path: Path, broker: object, ota_keys: Keys) -> None:
    """push -> downloading, verifying, trial, probation, committed; every frame published
    at 10 fps during the update gives one event, the first on version 1, the last on 2;
    the state reports rise in seq; `active`/`previous` say 2 and 1."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path)  # type: ignore[arg-type]
    try:
        with Watch(broker.url) as watch, Frames(broker.url) as frames:  # type: ignore[attr-defined]
            _, release_json = pack(catalog_dir(), 2, tmp_path / "out", ota_keys.private,
                                   policy=Policy(probation_s=2.0))
            watch.wait_events(5)
            push(release_json, broker)  # type: ignore[arg-type]
            done = watch.state(2, "committed", agent)
            watch.wait_events(len(watch.events()) + 10)  # frames on the new version
            sent = frames.stop()
            events = watch.wait_events(sent)
            states = watch.states()
    finally:
        agent.stop()
    versions = check_events(events, sent)
    assert versions[0] == 1 and versions[-1] == 2
    assert done["active"]["version"] == 2 and done["previous"] == {"version": 1}
    seqs = [d["seq"] for d in states]
    assert seqs == sorted(seqs)
    order = [d["update"]["state"] for d in states if d["update"] is not None]
    for st in ("downloading", "verifying", "trial", "probation", "committed"):
        assert st in order, order
    assert order.index("verifying") < order.index("trial") < order.index("probation") \
        < order.index("committed")
    assert "ERROR" not in agent.log(), agent.log()
