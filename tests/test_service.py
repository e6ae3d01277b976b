"""The generated systemd unit: accepted by systemd as is, values from config and profile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config, service
from agent.config import PROFILE_DIR
from agent.errors import ConfigError

PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def real_executable() -> str:
    """systemd-analyze checks that ExecStart= exists: point it at a real one."""
    script = Path(sys.prefix) / "bin" / "fogwhisk"
    return str(script if script.exists() else Path(sys.executable).resolve())


def make_config(tmp_path: Path, profile: str | None = "rpi4", **device: object) -> config.Config:
    dev: dict[str, object] = {"id": "cam-frontdoor", "data_dir": str(tmp_path / "data")}
    if profile is not None:
        dev["profile"] = profile
    dev.update(device)
    return config.from_dict({"device": dev}, "test.toml")


def unit_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def verify(unit_text: str, tmp_path: Path) -> str:
    assert SYSTEMD_ANALYZE, "systemd-analyze is missing: apt-get install systemd"
    path = tmp_path / service.UNIT_NAME
    path.write_text(unit_text)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else
                                                  f"\nexit {proc.returncode}")


@pytest.mark.parametrize("profile", PROFILES)
def test_systemd_analyze_verify_prints_nothing_for_every_profile(
    profile: str, tmp_path: Path
) -> None:
    """systemd-analyze exits 0 on unknown keys: any output at all is a failure."""
    (tmp_path / "data").mkdir()
    cfg = make_config(tmp_path, profile)
    text = service.render_unit(cfg, service.UnitOptions(exec_path=real_executable()))
    assert verify(text, tmp_path) == ""


def test_systemd_analyze_would_report_a_bad_key(tmp_path: Path) -> None:
    """The verify check above is meaningful: systemd-analyze does speak up here."""
    cfg = make_config(tmp_path)
    text = service.render_unit(cfg, service.UnitOptions(exec_path=real_executable()))
    assert "Unknown key" in verify(text.replace("Type=notify", "Type=notify\nBogus=1"), tmp_path)


def test_unit_takes_limits_from_the_profile_and_paths_from_the_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "rpi-zero2w")
    v = unit_values(service.render_unit(
        cfg, service.UnitOptions(exec_path="/opt/fogwhisk/.venv/bin/fogwhisk")))
    assert v["Type"] == "notify"
    assert v["NotifyAccess"] == "main"
    assert v["ExecStart"] == "/opt/fogwhisk/.venv/bin/fogwhisk run -c /etc/fogwhisk/agent.toml"
    assert v["MemoryMax"] == cfg.service.memory_max == "192M"
    assert v["WatchdogSec"] == f"{int(cfg.service.watchdog_s)}s"
    assert v["TimeoutStopSec"] == f"{int(cfg.service.grace_s) + service.STOP_SLACK_S}s"
    assert v["ReadWritePaths"] == str(tmp_path / "data")
    assert v["Restart"] == "on-failure"
    assert v["RestartPreventExitStatus"] == "2"
    assert v["User"] == "fogwhisk"
    for key, want in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                      ("PrivateTmp", "yes"), ("ProtectHome", "yes")]:
        assert v[key] == want


def test_the_agent_file_overrides_the_profile_memory_budget(tmp_path: Path) -> None:
    cfg = config.from_dict({"device": {"id": "d", "profile": "rpi4"},
                            "service": {"memory_max": "1G"}})
    v = unit_values(service.render_unit(cfg, service.UnitOptions(exec_path="/usr/bin/true")))
    assert v["MemoryMax"] == "1G"


@pytest.mark.parametrize("value", ["768MB", "lots", "1.5G", "0%", "150%", ""])
def test_a_memory_max_systemd_would_reject_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="memory_max"):
        service.memory_bytes(value)


@pytest.mark.parametrize(("value", "expected"),
                         [("768M", 768 * 2**20), ("2G", 2 * 2**30), ("4096", 4096),
                          ("50%", None), ("infinity", None)])
def test_memory_max_values_systemd_accepts(value: str, expected: int | None) -> None:
    assert service.memory_bytes(value) == expected


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        service.UnitOptions(exec_path="bin/fogwhisk")
    cfg = make_config(tmp_path, data_dir="relative/dir")
    with pytest.raises(ConfigError, match="data_dir"):
        service.render_unit(cfg, service.UnitOptions(exec_path="/usr/bin/true"))


def test_the_module_prints_the_unit_and_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    good = tmp_path / "agent.toml"
    good.write_text('[device]\nid = "cam-frontdoor"\nprofile = "x86"\n')
    proc = subprocess.run([sys.executable, "-m", "agent.service", "-c", str(good),
                           "--bin", "/usr/bin/true"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"ExecStart=/usr/bin/true run -c {good}" in proc.stdout
    assert "MemoryMax=2G" in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nid = "x"\nbogus = 1\n')
    proc = subprocess.run([sys.executable, "-m", "agent.service", "-c", str(bad),
                           "--bin", "/usr/bin/true"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
