"""Every firmware profile loads through agent.config and fits its board.

Profiles are package data (`agent/firmware-profiles/`), found through
importlib.resources wherever pip put the package; tests/test_packaging.py
loads one from an installed wheel.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from agent import config, service
from agent.config import PROFILE_DIR, PROFILE_SECTIONS
from agent.errors import ConfigError
from agent.vision.runtimes import RUNTIMES

PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))

# The smallest RAM each board ships with, and its core count.
BOARDS = {
    "rpi-zero2w": (512 * 2**20, 4),
    "rpi4": (2 * 2**30, 4),
    "rpi5": (4 * 2**30, 4),
    "jetson-nano": (4 * 2**30, 4),
    "jetson-orin": (8 * 2**30, 6),
    "coral-usb": (2 * 2**30, 4),
    "x86": (8 * 2**30, 4),
}


def test_the_designed_boards_all_have_a_profile() -> None:
    assert set(PROFILES) == set(BOARDS)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_sets_every_board_section(name: str) -> None:
    raw = tomllib.loads((PROFILE_DIR / f"{name}.toml").read_text())
    assert isinstance(raw.pop("description"), str)
    assert set(raw) == set(PROFILE_SECTIONS), "a profile states every board default"
    cfg = config.from_dict({"device": {"id": "dev-1", "profile": name}}, f"{name}-test")
    # The effective config carries the profile's values, not the built-in defaults.
    assert cfg.runtime.num_threads == raw["runtime"]["num_threads"]
    assert cfg.runtime.fallback == tuple(raw["runtime"]["fallback"])
    assert cfg.camera.frame_width == raw["camera"]["frame_width"]
    assert cfg.camera.fps_cap == raw["camera"]["fps_cap"]
    assert cfg.outbox.max_messages == raw["outbox"]["max_messages"]
    assert cfg.service.memory_max == raw["service"]["memory_max"]
    # The devices the unit lets the service open (DeviceAllow=) are board data too.
    assert cfg.service.devices == tuple(raw["service"]["devices"])


@pytest.mark.parametrize("name", PROFILES)
def test_profile_values_fit_the_board(name: str) -> None:
    ram, cores = BOARDS[name]
    cfg = config.from_dict({"device": {"id": "dev-1", "profile": name}})
    memory = service.memory_bytes(cfg.service.memory_max)
    assert memory is not None and memory <= ram // 2, "leave half the RAM to the OS and broker"
    assert 1 <= cfg.runtime.num_threads <= cores
    assert cfg.runtime.fallback and set(cfg.runtime.fallback) <= set(RUNTIMES)
    assert cfg.runtime.fallback[-1] in ("litert", "tflite"), "the chain ends on the CPU"
    assert cfg.runtime.reprobe_s > 0
    assert 0 < cfg.camera.fps_cap <= 30
    assert cfg.camera.frame_width * cfg.camera.frame_height <= 1920 * 1080
    assert cfg.outbox.min_free_bytes > 0 and cfg.outbox.max_bytes > 0
    # The grace period must fit inside the watchdog, or a slow drain looks like a hang.
    assert 0 < cfg.service.grace_s < cfg.service.watchdog_s
    assert cfg.telemetry.interval_s >= 5


def test_boards_scale_in_the_expected_order() -> None:
    def mem(name: str) -> int:
        cfg = config.from_dict({"device": {"id": "d", "profile": name}})
        value = service.memory_bytes(cfg.service.memory_max)
        assert value is not None
        return value

    assert mem("rpi-zero2w") < mem("rpi4") < mem("rpi5") <= mem("jetson-orin")
    assert mem("jetson-nano") < mem("jetson-orin")


def test_coral_usb_prefers_the_edge_tpu_and_falls_back_to_the_cpu() -> None:
    cfg = config.from_dict({"device": {"id": "d", "profile": "coral-usb"}})
    assert cfg.runtime.fallback == ("edgetpu", "litert")


def test_keys_in_the_agent_file_override_the_profile() -> None:
    cfg = config.from_dict({"device": {"id": "d", "profile": "rpi-zero2w"},
                            "camera": {"fps_cap": 1.0}})
    assert cfg.camera.fps_cap == 1.0
    assert cfg.camera.frame_width == 640  # the rest of the section still comes from the profile


def test_profiles_are_the_package_data_importlib_resources_finds() -> None:
    assert resources.files("agent") / "firmware-profiles" == PROFILE_DIR
    assert PROFILE_DIR.parent == Path(config.__file__).parent.parent  # agent/ holds config/


def test_a_profile_beside_the_config_overrides_the_shipped_one(tmp_path: Path) -> None:
    """An operator's board file in <config dir>/firmware-profiles/ wins, key by key as written."""
    local = tmp_path / "firmware-profiles"
    local.mkdir()
    shipped = tomllib.loads((PROFILE_DIR / "rpi4.toml").read_text())
    text = (PROFILE_DIR / "rpi4.toml").read_text().replace(
        f'memory_max = "{shipped["service"]["memory_max"]}"', 'memory_max = "300M"')
    (local / "rpi4.toml").write_text(text)
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text('[device]\nid = "d"\nprofile = "rpi4"\n')
    assert config.load(cfg_path).service.memory_max == "300M"
    (local / "rpi4.toml").unlink()
    assert config.load(cfg_path).service.memory_max == shipped["service"]["memory_max"]


def test_an_unknown_profile_names_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"no profile 'rpi9' \(known: .*rpi-zero2w.*x86\)"):
        config.from_dict({"device": {"id": "d", "profile": "rpi9"}})
