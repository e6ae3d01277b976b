"""scripts/install-service lays out a working install (into a temporary root)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from brokers import ROOT

from agent import config

SCRIPT = ROOT / "scripts" / "install-service"


def run_install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "fogwhisk").exists(), "scripts/setup installs the console script"
    env = dict(os.environ, FOGWHISK_ETC=str(tmp_path / "etc"),
               FOGWHISK_UNIT_DIR=str(tmp_path / "units"), FOGWHISK_VENV=str(venv))
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          check=False)


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
    assert (tmp_path / "etc" / "firmware-profiles" / "rpi-zero2w.toml").exists()

    # Point the data dir into tmp and install again: the config is kept, the unit follows it.
    cfg_path.write_text(cfg_path.read_text().replace(
        'data_dir = "/var/lib/fogwhisk"', f'data_dir = "{tmp_path / "data"}"'))
    proc = run_install(tmp_path, "--user", user)
    assert proc.returncode == 0, proc.stderr
    assert "keeping existing" in proc.stderr
    assert tomllib.loads(cfg_path.read_text())["device"]["id"] == "cam-test"
    data = tmp_path / "data"
    assert data.is_dir() and data.stat().st_uid == uid

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
