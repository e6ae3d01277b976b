"""OTA end to end: `fogwhisk model push` to the real agent process through real Mosquitto,
while a 10 fps frame pipeline runs on the model being updated.

(Named test_ota_e2e, not test_e2e: tests/vision/test_e2e.py holds that module name.)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brokers import Broker
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
    start_device,
    tar_of,
)
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
