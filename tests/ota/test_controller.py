"""The controller's rules that need no misbehaving model: a fresh release replaces an
unfinished one, a release during probation waits for it, a persisted update resumes
from verifying, a deadline that passed while the agent was down ends the update, and
a redelivered deploy is not taken twice. Through the real agent and Mosquitto."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from brokers import Broker
from candidates import catalog_dir
from device import NAME, Watch, deploy_raw, pack, push, start_device
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy
from agent.ota.state import Installed, ModelState, Update
from agent.ota.store import VersionStore
from agent.vision.models import ModelStore


def test_a_fresh_release_replaces_one_still_downloading(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """Version 2 waits for chunks nobody uploads; version 3 arrives and is committed;
    version 2 is neither installed nor remembered as refused."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            _, v2 = pack(catalog_dir(), 2, tmp_path / "o2", ota_keys.private)
            deploy_raw(broker, v2.read_bytes())
            watch.state(2, "downloading", agent)
            _, v3 = pack(catalog_dir(), 3, tmp_path / "o3", ota_keys.private,
                         policy=Policy(probation_s=1.0))
            push(v3, broker)
            done = watch.state(3, "committed", agent)
    finally:
        agent.stop()
    assert done["active"]["version"] == 3 and done["previous"] == {"version": 1}
    assert VersionStore(tmp_path / "data").versions(NAME) == [1, 3]
    saved = json.loads((tmp_path / "data" / "ota" / f"{NAME}.json").read_text())
    assert saved["refused"] == []
    assert not list((tmp_path / "data" / "ota" / "incoming").iterdir())


def test_a_release_during_probation_waits_and_goes_next(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            push(pack(catalog_dir(), 2, tmp_path / "o2", ota_keys.private,
                      policy=Policy(probation_s=3.0))[1], broker)
            watch.state(2, "probation", agent)
            push(pack(catalog_dir(), 3, tmp_path / "o3", ota_keys.private,
                      policy=Policy(probation_s=1.0))[1], broker)
            first = watch.state(2, "committed", agent)
            done = watch.state(3, "committed", agent)
    finally:
        agent.stop()
    assert first["seq"] < done["seq"]
    assert done["active"]["version"] == 3 and done["previous"] == {"version": 2}
    assert VersionStore(tmp_path / "data").versions(NAME) == [2, 3]  # keep 2


def persisted_update(tmp_path: Path, keys: Keys, state: str, since: float,
                     deadline: float) -> None:
    """What a kill -9 leaves in `state`: the state file, the release and the artifact."""
    tar, release_json = pack(catalog_dir(), 2, tmp_path / "o2", keys.private,
                             policy=Policy(probation_s=1.0))
    raw = release_json.read_bytes()
    data = tmp_path / "data"
    vs = VersionStore(data)
    vs.incoming.mkdir(parents=True)
    shutil.copy(tar, vs.incoming / f"{hashlib.sha256(tar.read_bytes()).hexdigest()}.tar")
    (vs.ota_dir / f"{NAME}.release.json").write_text(
        json.dumps({"accepted": since, "doc": raw.decode()}))
    m = ModelStore().resolve(NAME).manifest
    vs.save_state(ModelState(NAME, Installed(1, m.sha256, since - 60), None,
                             Update(2, state, since, deadline,  # type: ignore[arg-type]
                                    release=hashlib.sha256(raw).hexdigest()), seq=3, ts=since))


def test_an_update_persisted_in_verifying_carries_on_after_a_restart(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    now = time.time()
    persisted_update(tmp_path, ota_keys, "verifying", now - 5, now + 600)
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            done = watch.state(2, "committed", agent)
    finally:
        agent.stop()
    assert done["seq"] > 3 and done["active"]["version"] == 2


def test_a_deadline_that_passed_while_the_agent_was_down_ends_the_update(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    now = time.time()
    persisted_update(tmp_path, ota_keys, "trial", now - 400, now - 100)
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            got = watch.state(2, "rejected", agent)
    finally:
        agent.stop()
    assert got["update"]["reason"] == "timed out in trial after 300 s"
    assert got["active"]["version"] == 1


def test_a_redelivered_deploy_after_a_restart_is_not_taken_twice(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """The retained deploy comes again at every connect: a committed release is not
    downloaded, tried or reported again, and the report's seq only grows."""
    agent = start_device(tmp_path, broker, ota_keys.pub_path)
    try:
        with Watch(broker.url) as watch:
            push(pack(catalog_dir(), 2, tmp_path / "o2", ota_keys.private,
                      policy=Policy(probation_s=1.0))[1], broker)
            done = watch.state(2, "committed", agent)
            agent.stop()
            agent = start_device(tmp_path, broker, ota_keys.pub_path)
            time.sleep(2.0)  # the deploy is delivered again and looked at
            after = watch.states()
    finally:
        agent.stop()
    assert max(d["seq"] for d in after) == done["seq"]
    assert agent.log().count("passed its trial") == 1


def test_check_config_and_run_refuse_a_key_file_that_is_no_public_key(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """Both name ota.keys and the file, exit 2: a private key, a missing file."""
    import subprocess
    import sys

    from agent_proc import write_config
    from brokers import ROOT
    from device import PIPELINE, ota_table

    for label, key in (("private", ota_keys.key_path), ("missing", tmp_path / "none.pub")):
        cfg = write_config(tmp_path / f"{label}.toml", broker, broker, PIPELINE,
                           extra=ota_table(key))
        for command in ("check-config", "run"):
            done = subprocess.run([sys.executable, "-m", "agent", command, "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT,
                                  check=False)
            assert done.returncode == 2, (label, command, done.stderr)
            assert f"ota.keys: {key}" in done.stderr, (label, command, done.stderr)
