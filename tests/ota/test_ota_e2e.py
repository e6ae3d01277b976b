"""OTA end to end: `fogwhisk model push` to the real agent process through real Mosquitto,
while a 10 fps frame pipeline runs on the model being updated.

(Named test_ota_e2e, not test_e2e: tests/vision/test_e2e.py holds that module name.)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brokers import Broker, Certs
from candidates import catalog_dir, model_dir
from device import (
    NAME,
    Frames,
    Watch,
    deploy_raw,
    files_of,
    pack,
    publish_chunks,
    push,
    resign,
    restart,
    start_device,
    tar_of,
)
from nginx import Nginx  # type: ignore[import-not-found]
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy
from agent.vision.models import ModelStore


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
            # An old signed release, replayed: refused, the new version stays.
            push(pack(catalog_dir(), 1, tmp_path / "old", ota_keys.private)[1], broker)
            replay = watch.state(1, "rejected", agent)
            sent = frames.stop()
            events = watch.wait_events(sent)
            states = watch.states()
    finally:
        agent.stop()
    versions = check_events(events, sent)
    assert versions[0] == 1 and versions[-1] == 2
    assert done["active"]["version"] == 2 and done["previous"] == {"version": 1}
    assert replay["update"]["reason"] == "version 1 is not higher than the active version 2"
    assert replay["active"]["version"] == 2
    seqs = [d["seq"] for d in states]
    assert seqs == sorted(seqs)
    order = [d["update"]["state"] for d in states if d["update"] is not None]
    for st in ("downloading", "verifying", "trial", "probation", "committed"):
        assert st in order, order
    assert order.index("verifying") < order.index("trial") < order.index("probation") \
        < order.index("committed")
    assert "ERROR" not in agent.log(), agent.log()


def test_bad_releases_are_each_refused_with_their_reason_while_detections_keep_flowing(
        tmp_path: Path, broker: Broker, ota_keys: Keys, other_keys: Keys) -> None:
    """Every bad input of the contract, one after the other against one running agent:
    each ends `rejected` with its own reason in the state report, version 1 stays active
    and detects every frame published meanwhile (one event per frame, all on version 1),
    and the agent logs no error of its own."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, trial_timeout="10s")
    key = ota_keys.private
    out = tmp_path / "out"
    base_tar, base_json = pack(catalog_dir(), 10, out / "base", key)
    base = files_of(base_tar)
    manifest = base["manifest.toml"].decode()

    def packed(label: str, version: int, **kw: Any) -> Path:
        return pack(model_dir(tmp_path, label, **kw), version, out / label, key)[1]

    def forged(label: str, version: int, files: dict[str, bytes],
               links: dict[str, str] | None = None, manifest_version: int | None = None,
               **changes: Any) -> Path:
        """A hand-built tar (its manifest set to `manifest_version`, default `version`)."""
        text = files["manifest.toml"].decode()
        files = {**files, "manifest.toml": re.sub(
            r"(?m)^version = \d+$", f"version = {manifest_version or version}", text).encode()}
        (out / label).mkdir(parents=True)
        return resign(base_json, key, out / label / f"{NAME}-{version}.release.json",
                      tar=tar_of(files, links), version=version, **changes)

    garbage = b"\x00" * 4096
    not_tflite = {**base, "shapes-ssd.tflite": garbage, "manifest.toml": re.sub(
        r"(?m)^sha256 = .*$", f'sha256 = "{hashlib.sha256(garbage).hexdigest()}"',
        manifest).encode()}
    expired = pack(catalog_dir(), 10, out / "expired", key,
                   now=datetime(2020, 1, 1, tzinfo=UTC))[1]
    doc = json.loads(base_json.read_bytes())
    tampered = {**doc, "signed": {**doc["signed"], "version": 11}}
    renamed = pack(model_dir(tmp_path, "renamed", edit=lambda t: t.replace(
        f'name = "{NAME}"', 'name = "other-model"')), 10, out / "renamed", key)[1]
    motion_dir = tmp_path / "motion-cls"
    shutil.copytree(ModelStore().manifest_dir("motion-cls"), motion_dir)
    (motion_dir / "manifest.toml").write_text((motion_dir / "manifest.toml").read_text()
                                              .replace('name = "motion-cls"', f'name = "{NAME}"'))
    big = base_tar.read_bytes()
    other = tar_of(dict(reversed(list(base.items()))))  # the same files, other bytes

    # (how to send it, the version the report names, the reason it must give)
    cases: list[tuple[Callable[[], None], int | None, str]] = [
        (lambda: deploy_raw(broker, b"{not json"), None, r"^not JSON"),
        (lambda: deploy_raw(broker, json.dumps({**doc, "signatures": []}).encode()), 10,
         r"^unsigned: no signatures"),
        (lambda: push(pack(catalog_dir(), 10, out / "other", other_keys.private)[1], broker),
         10, r"^unknown key: signed by"),
        (lambda: deploy_raw(broker, json.dumps(tampered).encode()), 11,
         r"^bad signature from key"),
        (lambda: push(expired, broker), 10, r"^expired at 2020-01-3"),
        (lambda: push(packed("same", 1), broker), 1,
         r"version 1 is not higher than the active version 1"),
        (lambda: deploy_raw(broker, renamed.read_bytes()), 10,
         r"release names model 'other-model', the deploy topic 'shapes-ssd'"),
        (lambda: (publish_chunks(broker, other[:-1] + b"x", sha=hashlib.sha256(other).hexdigest()),
                  deploy_raw(broker, resign(base_json, key, out / f"{NAME}-o.release.json",
                                            tar=other).read_bytes())), 10,
         r"^download failed: sha256 mismatch"),
        (lambda: (publish_chunks(broker, big + b"y" * 70000, sha="e" * 64),
                  deploy_raw(broker, resign(base_json, key, out / f"{NAME}-12.release.json",
                                            version=12, artifact={"sha256": "e" * 64})
                             .read_bytes())), 12,
         r"^download failed: more bytes than the signed size"),
        (lambda: push(forged("dotdot", 13, {**base, "../evil": b"x"}), broker), 13,
         r"tar entry '../evil'"),
        (lambda: push(forged("abs", 14, {**base, "/etc/evil": b"x"}), broker), 14,
         r"tar entry '/etc/evil'"),
        (lambda: push(forged("link", 15, base, {"golden/link": "/etc/passwd"}), broker), 15,
         r"tar entry 'golden/link'"),
        (lambda: push(forged("version", 16, base, manifest_version=10), broker), 16,
         r"manifest has version 10, the release 16"),
        (lambda: push(forged("garbage", 17, not_tflite, model={
            "sha256": hashlib.sha256(garbage).hexdigest()}), broker), 17,
         r"shapes-ssd.tflite is no TFLite model"),
        (lambda: push(pack(motion_dir, 18, out / "motion", key)[1], broker), 18,
         r"incompatible input tensors: the release's model has \[1, 32, 32, 2\] uint8, "
         r"pipeline door runs on \[1, 96, 96, 3\] uint8"),
        (lambda: push(packed("golden", 19, edit=lambda t: t.replace(
            "box = [0.0208, 0.0104, 0.2083, 0.1979]", "box = [0.5, 0.05, 0.7, 0.25]")),
            broker), 19, r"^golden mismatch: golden 1"),
        (lambda: push(packed("crash", 20, knobs={"wrap": "litert", "crash": "invoke"}),
                      broker), 20, r"^trial crashed: .*SIGSEGV"),
        (lambda: push(packed("hang", 21, knobs={"hang": "load"}), broker), 21,
         r"^trial hang: no result within 10 s"),
        (lambda: push(packed("slow", 22, knobs={"wrap": "litert", "delay_ms": 25}), broker),
         22, r"^too slow: p95 .* above 2 x the active model's"),
    ]
    try:
        with Watch(broker.url) as watch, Frames(broker.url) as frames:
            watch.wait_events(3)
            seq = watch.latest()["seq"]
            for send, version, reason in cases:
                send()
                got = watch.state(version, "rejected", agent, after_seq=seq)
                assert re.search(reason, got["update"]["reason"]), (reason, got)
                assert got["active"]["version"] == 1
                seq = got["seq"]
            sent = frames.stop()
            events = watch.wait_events(sent)
    finally:
        agent.stop()
    assert set(check_events(events, sent)) == {1}
    errors = [ln for ln in agent.log().splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not errors, errors


def running_version(tmp_path: Path) -> int:
    """The version a start would load now: complete and sha256-verified, as detect does."""
    return ModelStore(tmp_path / "data").resolve(NAME).manifest.version


def test_probation_rolls_back_live_when_errors_then_latency_go_past_the_policy(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """Two candidates that pass their trial and then fail live, after 70 invokes: one
    raises, one takes 30 ms more per frame. Each is rolled back during probation, live,
    to version 1 (still loaded), with the reason; frames go 1 -> 2 -> 1 -> 3 -> 1."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, probation="60s")
    key = ota_keys.private
    try:
        with Watch(broker.url) as watch, Frames(broker.url, fps=20) as frames:
            watch.wait_events(30)  # the active version's own p95 on this machine
            failing = model_dir(tmp_path, "fails", knobs={"wrap": "litert", "after": 70,
                                                         "raise": True})
            push(pack(failing, 2, tmp_path / "o2", key)[1], broker)
            back = watch.state(2, "rolled_back", agent)
            assert re.search(r"^error rate 0\.\d+ over \d+ frames is above the policy's 0.05",
                             back["update"]["reason"]), back
            assert back["active"]["version"] == 1 and back["previous"] is None
            slow = model_dir(tmp_path, "slows", knobs={"wrap": "litert", "after": 70,
                                                       "delay_ms": 30})
            push(pack(slow, 3, tmp_path / "o3", key)[1], broker)
            back = watch.state(3, "rolled_back", agent)
            assert re.search(r"^p95 latency \d+\.\d ms is above 2 x the previous version's",
                             back["update"]["reason"]), back
            n = len(watch.events())
            watch.wait_events(n + 10)
            frames.stop()
            events = watch.events()
    finally:
        agent.stop()
    versions = [e["model"]["version"] for e in events]
    runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    assert runs == [1, 2, 1, 3, 1], runs
    assert running_version(tmp_path) == 1


def test_a_crash_loop_in_probation_starts_on_the_previous_version(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """A candidate that kills the agent (SIGSEGV) after 70 live frames: the agent is
    started again after each crash; the third start in probation runs version 1 and
    reports `rolled_back: crash loop`; a start after that counts nothing (committed or
    not, the counter is reset)."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, probation="10m")
    crashing = model_dir(tmp_path, "crash", knobs={"wrap": "litert", "after": 70,
                                                   "crash": "invoke"})
    try:
        with Watch(broker.url) as watch, Frames(broker.url, fps=30):
            push(pack(crashing, 2, tmp_path / "out", ota_keys.private)[1], broker)
            watch.state(2, "probation", agent)
            for start in (1, 2, 3):
                assert agent.wait_exit(60) == -signal.SIGSEGV, agent.log()[-3000:]
                assert running_version(tmp_path) == 2  # complete on disk, start after start
                agent = restart(agent)
                if start < 3:
                    assert watch.latest()["update"]["state"] == "probation"
            back = watch.state(2, "rolled_back", agent)
            assert back["update"]["reason"].startswith(
                "crash loop: the agent started 3 times during probation"), back
            assert back["active"]["version"] == 1
            # Events made after the rollback: a crash resends what it had delivered but
            # not yet deleted (duplicates under their ids), so skip ids seen before.
            seen = {e["id"] for e in watch.events()}
            deadline = time.monotonic() + 30
            while len(after := [e for e in watch.events() if e["id"] not in seen]) < 20:
                assert time.monotonic() < deadline, f"{len(after)} new events, wanted 20"
                time.sleep(0.05)
            assert {e["model"]["version"] for e in after} == {1}
    finally:
        agent.stop()
    agent = restart(agent)
    agent.stop()
    state = json.loads((tmp_path / "data" / "ota" / f"{NAME}.json").read_text())
    assert state["starts"] == 0 and state["update"]["state"] == "rolled_back"
    assert running_version(tmp_path) == 1


def test_kill_9_in_downloading_trial_and_probation_resumes_to_committed(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """kill -9 while the artifact is not there yet (downloading), while the trial loads
    a slow model, and during probation: after each restart the complete version 1 (then 2)
    runs, and the update carries on from its persisted state to committed."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    slow_load = model_dir(tmp_path, "slow-load", knobs={"wrap": "litert", "load_ms": 4000})
    _, release_json = pack(slow_load, 2, tmp_path / "out", ota_keys.private,
                           policy=Policy(probation_s=6.0))
    try:
        with Watch(broker.url) as watch, Frames(broker.url) as frames:
            deploy_raw(broker, release_json.read_bytes())  # the chunks are not there yet
            watch.state(2, "downloading", agent)
            agent.kill()
            assert running_version(tmp_path) == 1
            agent = restart(agent)
            push(release_json, broker)  # uploads the chunks (the deploy is the same)
            watch.state(2, "trial", agent)
            agent.kill()
            assert running_version(tmp_path) == 1
            agent = restart(agent)
            seq = watch.state(2, "probation", agent)["seq"]
            agent.kill()
            assert running_version(tmp_path) == 2
            agent = restart(agent)
            done = watch.state(2, "committed", agent, after_seq=seq)
            n = len(watch.events())
            watch.wait_events(n + 10)
            sent = frames.stop()
            events = watch.wait_events(sent)
    finally:
        agent.stop()
    assert done["active"]["version"] == 2 and done["previous"] == {"version": 1}
    versions = [e["model"]["version"] for e in events]
    assert versions[-1] == 2
    # kill -9 loses no accepted frame: each gives an event (one in flight at a kill may
    # give two: at least once)
    assert len(events) >= sent


def test_a_release_with_an_https_location_is_fetched_from_it(
        tmp_path: Path, broker: Broker, ota_keys: Keys, certs: Certs) -> None:
    """`push --url`: the device downloads the artifact from nginx (Range requests, the CA
    of [ota] ca) and commits it; the MQTT chunks stay the fallback."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path, ca=certs.ca)
    tar, release_json = pack(catalog_dir(), 2, tmp_path / "out", ota_keys.private,
                             policy=Policy(probation_s=1.0))
    try:
        with Nginx(tmp_path / "nginx", certs) as web, Watch(broker.url) as watch:
            web.put(tar.name, tar.read_bytes())
            push(release_json, broker, urls=(web.url(tar.name),))
            done = watch.state(2, "committed", agent)
            served = web.requests()
    finally:
        agent.stop()
    assert done["active"]["version"] == 2
    assert served and served[-1][0] in (200, 206)
    assert sum(r[2] for r in served) >= tar.stat().st_size
