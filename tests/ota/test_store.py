"""Versions on disk: install, atomic switch, keep 2, and a kill -9 between any two steps
leaves a complete, verified model active (the old one before the switch, the new one after)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.errors import OtaError
from agent.ota import store as store_mod
from agent.ota.state import Installed, ModelState, Update
from agent.ota.store import VersionStore
from agent.vision.models import ModelStore

ROOT = Path(__file__).resolve().parents[2]
NAME = "shapes-ssd"


def release_dir(tmp: Path, version: int) -> Path:
    """models/shapes-ssd as an extracted release of `version`."""
    d = tmp / f"release-{version}"
    shutil.copytree(ModelStore().manifest_dir(NAME), d)
    manifest = d / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("version = 1", f"version = {version}", 1))
    return d


def running_version(data: Path) -> int:
    """What detect would load now: resolved and sha256-verified like the agent does."""
    return ModelStore(data).resolve(NAME).manifest.version


def test_install_switch_and_prune_keep_active_and_previous(tmp_path: Path) -> None:
    vs = VersionStore(tmp_path / "data")
    assert vs.adopt(NAME, ModelStore().resolve(NAME)) == 1
    assert vs.active(NAME) == 1 and vs.previous(NAME) is None
    for v in (2, 3, 4):
        vs.install(NAME, v, release_dir(tmp_path, v))
        assert running_version(tmp_path / "data") == v - 1  # installed is not active
        vs.switch(NAME, v, v - 1)
        assert running_version(tmp_path / "data") == v
        vs.prune(NAME)
    assert vs.versions(NAME) == [3, 4]
    assert (vs.active(NAME), vs.previous(NAME)) == (4, 3)


def test_an_installed_version_in_use_is_never_overwritten(tmp_path: Path) -> None:
    vs = VersionStore(tmp_path / "data")
    vs.adopt(NAME, ModelStore().resolve(NAME))
    with pytest.raises(OtaError, match="in use"):
        vs.install(NAME, 1, release_dir(tmp_path, 1))


def test_switching_to_a_version_that_is_not_installed_is_refused(tmp_path: Path) -> None:
    vs = VersionStore(tmp_path / "data")
    vs.adopt(NAME, ModelStore().resolve(NAME))
    with pytest.raises(OtaError, match="not installed"):
        vs.switch(NAME, 7, 1)
    assert vs.active(NAME) == 1


def test_the_update_state_persists_and_an_unreadable_one_is_none(tmp_path: Path) -> None:
    vs = VersionStore(tmp_path / "data")
    s = ModelState(NAME, Installed(1, "a" * 64, 1.0), None,
                   Update(2, "trial", 5.0, 65.0, release="r"), frozenset({9}), 1, 4, 5.0)
    vs.save_state(s)
    assert vs.load_state(NAME) == s
    (vs.ota_dir / f"{NAME}.json").write_text("{half")
    assert vs.load_state(NAME) is None


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from agent.ota import store
    from agent.ota.state import Installed, ModelState, Update
    from agent.vision.models import ModelStore

    data, releases, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    seen = []

    def hook(where):
        seen.append(where)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store.checkpoint = hook
    vs = store.VersionStore(data)
    vs.recover()
    name = "shapes-ssd"
    if vs.active(name) is None:
        vs.adopt(name, ModelStore().resolve(name))
    for v in (2, 3):
        if vs.active(name) is not None and vs.active(name) >= v:
            continue
        before = vs.active(name)
        vs.install(name, v, releases / f"release-{v}")
        vs.save_state(ModelState(name, update=Update(v, "trial", 1.0, 2.0, release=str(v))))
        vs.switch(name, v, before)
        vs.save_state(ModelState(name, update=Update(v, "probation", 1.0, 2.0, release=str(v))))
        vs.prune(name)
    vs.prune(name)  # as the controller does at every start
    print(len(seen))
""")


def run_steps(data: Path, releases: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(releases),
                           str(kill_at)], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def test_a_kill_at_any_step_leaves_a_complete_model_active_and_the_update_resumes(
        tmp_path: Path) -> None:
    """Killed (SIGKILL) at each of the store's steps in turn, across two updates: a restart
    always finds an active version whose file verifies against its manifest, never one
    that goes backwards, a readable state file, and running the steps again completes."""
    releases = tmp_path / "releases"
    releases.mkdir()
    for v in (2, 3):
        shutil.move(release_dir(tmp_path, v), releases / f"release-{v}")
    full = run_steps(tmp_path / "count", releases, 0)
    assert full.returncode == 0, full.stderr
    steps = int(full.stdout)
    assert steps >= 20
    for k in range(1, steps + 1):
        data = tmp_path / f"data-{k}"
        killed = run_steps(data, releases, k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        vs = VersionStore(data)
        for pointer in ("active", "previous"):  # present: names a complete version
            if (vs.model_dir(NAME) / pointer).exists():
                assert getattr(vs, pointer)(NAME) is not None, (k, pointer)
        if vs.active(NAME) is not None:  # before adopt finished, the repository model runs
            assert running_version(data) == vs.active(NAME), k
        state = vs.load_state(NAME)
        if (vs.ota_dir / f"{NAME}.json").exists():
            assert state is not None, k
        before = running_version(data)
        done = run_steps(data, releases, 0)
        assert done.returncode == 0, (k, done.stderr)
        assert running_version(data) == 3 and before <= 3
        assert vs.versions(NAME) == [2, 3] and vs.previous(NAME) == 2, k
        leftovers = [p for p in data.rglob("*") if p.name.startswith(store_mod.TMP)]
        assert not leftovers, (k, leftovers)
        assert json.loads((vs.ota_dir / f"{NAME}.json").read_text())["update"]["version"] == 3
