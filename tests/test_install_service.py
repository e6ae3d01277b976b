"""scripts/install-service lays out a working install (into a temporary root).

tests/test_packaging.py runs it for real from a wheel into a fresh venv; here it
uses the test venv as is (FOGWHISK_VENV), and its --dry-run changes nothing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from brokers import ROOT

from agent import config, installer, service

SCRIPT = ROOT / "scripts" / "install-service"


def run_install(tmp_path: Path, *args: str, venv: Path | None = Path(sys.prefix),
                ) -> subprocess.CompletedProcess[str]:
    """install-service into tmp_path; `venv=None`: it would make its own in tmp_path/prefix."""
    env = dict(os.environ, FOGWHISK_ETC=str(tmp_path / "etc"),
               FOGWHISK_UNIT_DIR=str(tmp_path / "units"),
               FOGWHISK_PREFIX=str(tmp_path / "prefix"))
    if venv is not None:
        assert (venv / "bin" / "fogwhisk").exists(), "scripts/setup installs the console script"
        env["FOGWHISK_VENV"] = str(venv)
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          check=False)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_install_writes_config_profiles_data_dir_and_a_unit_systemd_accepts(
    tmp_path: Path,
) -> None:
    assert os.geteuid() == 0, "install-service creates users and chowns: the suite runs as root"
    # An existing system user, so the test creates none; not `nobody`, which
    # systemd-analyze rightly reports as unsafe.
    user = "daemon"
    uid = pwd.getpwnam(user).pw_uid
    proc = run_install(tmp_path, "--device-id", "cam-test", "--profile", "rpi-zero2w",
                       "--user", user)
    assert proc.returncode == 0, proc.stderr
    cfg_path = tmp_path / "etc" / "agent.toml"
    raw = tomllib.loads(cfg_path.read_text())
    assert raw["device"]["id"] == "cam-test"
    assert raw["device"]["profile"] == "rpi-zero2w"
    assert oct(cfg_path.stat().st_mode & 0o777) == "0o640"
    # Profiles ship inside the package: none copied next to the config to go stale there.
    assert not (tmp_path / "etc" / "firmware-profiles").exists()

    # Point the data dir into tmp and install again: the config is kept, the unit follows it.
    cfg_path.write_text(cfg_path.read_text().replace(
        'data_dir = "/var/lib/fogwhisk"', f'data_dir = "{tmp_path / "data"}"'))
    proc = run_install(tmp_path, "--user", user)
    assert proc.returncode == 0, proc.stderr
    assert "keeping existing" in proc.stderr
    assert tomllib.loads(cfg_path.read_text())["device"]["id"] == "cam-test"
    data = tmp_path / "data"
    assert data.is_dir() and data.stat().st_uid == uid
    models = data / "models"  # where OTA and `fogwhisk model fetch` put model files
    assert models.is_dir() and models.stat().st_uid == uid

    unit = (tmp_path / "units" / "fogwhisk.service").read_text()
    cfg = config.load(cfg_path)
    assert f"MemoryMax={cfg.service.memory_max}" in unit
    assert f"ReadWritePaths={data}" in unit
    assert f"User={user}" in unit
    # The profile's devices reach the unit, and the installer says which.
    assert "DeviceAllow=char-video4linux rw" in unit and "DevicePolicy=closed" in unit
    assert "devices the service may open: char-video4linux" in proc.stderr
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    verify = subprocess.run([analyze, "verify", str(tmp_path / "units" / "fogwhisk.service")],
                            capture_output=True, text=True, check=False, cwd=tmp_path)
    assert (verify.stdout + verify.stderr).strip() == ""
    assert verify.returncode == 0


def test_an_unknown_profile_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    proc = run_install(tmp_path, "--profile", "no-such-board")
    assert proc.returncode == 2
    assert "no profile" in proc.stderr and "rpi4" in proc.stderr
    assert not (tmp_path / "etc").exists()


def test_dry_run_prints_every_file_and_command_and_changes_nothing(tmp_path: Path) -> None:
    user = "fw-dry-run"  # no such user: the dry run would create it, and does not
    proc = run_install(tmp_path, "--dry-run", "--device-id", "cam-dry", "--profile", "rpi4",
                       "--user", user, venv=None)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    prefix, etc, units = tmp_path / "prefix", tmp_path / "etc", tmp_path / "units"
    plan = proc.stdout.splitlines()
    assert all(line.startswith(("would run: ", "would write: ")) for line in plan), plan
    venv_python = f"{prefix}/venv/bin/python"
    expected = [
        f"would run: python3 -m venv {prefix}/venv",
        f"would run: {venv_python} -m pip wheel --quiet --no-deps {ROOT}",
        f"would run: {venv_python} -m pip install --quiet ",
        f"would run: useradd --system --user-group --no-create-home --home-dir /nonexistent "
        f"--shell /usr/sbin/nologin {user}",
        f"would write: {etc}/agent.toml (mode 0640",
        f"would run: chown root:{user} {etc}/agent.toml",
        f"would run: install -d -m 0750 -o {user} -g {user} /var/lib/fogwhisk",
        f"would run: install -d -m 0750 -o {user} -g {user} /var/lib/fogwhisk/models",
        f"would run: {prefix}/venv/bin/fogwhisk check-config -c {etc}/agent.toml",
        f"would write: {units}/fogwhisk.service (mode 0644",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in plan), (want, proc.stdout)
    # The example config relays only: the relay agent alone, no model to fetch.
    assert not any("[vision]" in line or "model fetch" in line for line in plan)
    assert subprocess.run(["id", user], capture_output=True, check=False).returncode != 0

    # An operator's config with a camera pipeline: the vision extra and its model, and the
    # file is kept as it is.
    etc.mkdir()
    cfg_path = etc / "agent.toml"
    cfg_path.write_text(f"""
[device]
id = "cam-dry"
data_dir = "{tmp_path / 'data'}"
[models]
dir = "models"
[[pipeline]]
name = "door"
trigger = "cams/door/jpeg"
steps = [{{ action = "decode" }}, {{ action = "detect", model = "person" }},
         {{ action = "publish" }}]
""")
    before = tree(tmp_path)
    proc = run_install(tmp_path, "--dry-run", "--user", user, venv=None)
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path) == before, "a dry run writes nothing"
    assert "keeping existing" in proc.stderr
    plan = proc.stdout.splitlines()
    assert any(line.startswith(f"would run: {venv_python} -m pip install --quiet ")
               and line.endswith(".whl\\[vision\\]") for line in plan), proc.stdout
    assert f"would run: {prefix}/venv/bin/fogwhisk model fetch person --dir {etc}/models" \
        in plan, proc.stdout
    assert not any(line.startswith(f"would write: {cfg_path}") for line in plan)


def test_the_installer_plan_reads_the_config_as_the_agent_does(tmp_path: Path) -> None:
    """Directories, extra and models, read from the raw file before any extra is installed."""
    path = tmp_path / "agent.toml"
    path.write_text("""
[device]
id = "cam-1"
data_dir = "var/data"
[models]
dir = "../common/models"
[[pipeline]]
name = "door"
trigger = { camera = "/dev/video0" }
steps = [{ action = "decode" }, { action = "detect", model = "person" },
         { action = "detect", model = "face" }, { action = "publish" }]
[[pipeline]]
name = "yard"
trigger = "cams/yard/jpeg"
steps = [{ action = "decode" }, { action = "detect", model = "person" }, { action = "publish" }]
""")
    cfg = config.load(path)
    plan = installer.plan(tomllib.loads(path.read_text()), tmp_path)
    assert Path(plan.data_dir) == cfg.data_dir
    assert Path(plan.models_dir).resolve() == cfg.models_dir.resolve() \
        == (tmp_path.parent / "common" / "models").resolve()
    assert plan.vision and plan.models == ("person", "face")
    relay = installer.plan({"device": {"id": "r"}, "pipeline": [
        {"name": "r", "trigger": "s/#", "steps": [{"action": "forward"}]}]}, tmp_path)
    assert (relay.data_dir, relay.models_dir, relay.vision, relay.models) == \
        ("/var/lib/fogwhisk", "/var/lib/fogwhisk/models", False, ())


def test_a_models_dir_outside_the_data_dir_is_writable_to_the_service(tmp_path: Path) -> None:
    """OTA installs model versions there; the sandbox makes everything else read-only."""
    opts = service.UnitOptions(exec_path="/opt/fogwhisk/venv/bin/fogwhisk")
    inside = config.from_dict({"device": {"id": "d", "data_dir": "/var/lib/fogwhisk"}})
    assert "ReadWritePaths=/var/lib/fogwhisk\n" in service.render_unit(inside, opts)
    outside = config.from_dict({"device": {"id": "d", "data_dir": "/var/lib/fogwhisk"},
                                "models": {"dir": "/srv/models"}})
    assert "ReadWritePaths=/var/lib/fogwhisk /srv/models\n" in service.render_unit(outside, opts)
