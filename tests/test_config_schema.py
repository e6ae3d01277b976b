"""Config and schema units: sizes, durations, the profile overlay, key-naming errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import config
from agent.errors import ConfigError
from agent.schema import (
    Duration,
    Size,
    build,
    parse_duration,
    parse_seconds,
    parse_size,
    to_dict,
)

BASE = {"device": {"id": "d"}}


@pytest.mark.parametrize(("text", "expected"), [
    ("256MB", 256 * 10**6), ("1GiB", 2**30), ("512M", 512 * 2**20), ("10KB", 10_000),
    ("1.5GB", 1_500_000_000), ("7", 7), (" 3 B ", 3), (4096, 4096), ("2kib", 2048),
])
def test_sizes_accept_decimal_and_binary_units(text: object, expected: int) -> None:
    assert parse_size(text, "x") == expected


@pytest.mark.parametrize("bad", ["", "MB", "12XB", "-1MB", True, 1.5, None, "1 2MB"])
def test_a_bad_size_names_where_it_was(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"outbox\.max_bytes"):
        parse_size(bad, "outbox.max_bytes")


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30.0), ("1h", 3600.0), ("250ms", 0.25), ("2m", 120.0), ("1d", 86400.0),
    (5, 5.0), (0.5, 0.5), ("1.5s", 1.5),
])
def test_durations_accept_units_and_plain_seconds(text: object, expected: float) -> None:
    assert parse_duration(text, "x") == expected


@pytest.mark.parametrize("bad", ["30", "1w", "s", False, "-1s", None])
def test_a_bad_duration_names_where_it_was(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"service\.grace_s"):
        parse_duration(bad, "service.grace_s")


@given(st.integers(min_value=0, max_value=10**6),
       st.sampled_from(["", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "K", "M", "G"]))
def test_a_whole_size_round_trips_through_its_unit(n: int, unit: str) -> None:
    factor = parse_size(f"1{unit}", "x")
    assert parse_size(f"{n}{unit}", "x") == n * factor


@pytest.mark.parametrize(("text", "expected"), [
    ("9007199254740993", 2**53 + 1), ("4611686019GB", 4_611_686_019 * 10**9),
])
def test_a_whole_size_is_exact_beyond_float_precision(text: str, expected: int) -> None:
    """Integers are not rounded through a float (schema.parse_size multiplies floats)."""
    assert parse_size(text, "x") == expected


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    size: Size = Size(1)
    wait: Duration = Duration(1)
    tags: tuple[str, ...] = ()
    ratio: float = 0.5
    on: bool = False
    maybe: int | None = None


def test_build_converts_units_and_types() -> None:
    s = build(Sample, {"name": "a", "size": "2KB", "wait": "1m", "tags": ["x", "y"],
                       "ratio": 1, "maybe": 3}, "f.toml [s]")
    assert s == Sample("a", Size(2000), Duration(60.0), ("x", "y"), 1.0, False, 3)
    assert isinstance(s.ratio, float)


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "missing required key 'name'"),
    ({"name": "a", "colour": 1}, "unknown key 'colour'"),
    ({"name": 3}, r"f.toml \[s\].name: expected a string"),
    ({"name": "a", "on": 1}, r"\.on: expected true or false"),
    ({"name": "a", "maybe": True}, r"\.maybe"),
    ({"name": "a", "tags": "x"}, r"\.tags: expected a list"),
    ({"name": "a", "tags": ["x", 2]}, r"\.tags\[1\]"),
    ({"name": "a", "ratio": "half"}, r"\.ratio: expected a number"),
])
def test_build_errors_name_the_file_and_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        build(Sample, raw, "f.toml [s]")
    assert str(exc.value).startswith("f.toml [s]")


def test_to_dict_inverts_build() -> None:
    raw = {"name": "a", "size": 5, "wait": 2.0, "tags": ["t"], "ratio": 0.1, "on": True,
           "maybe": None}
    assert to_dict(build(Sample, raw, "x")) == raw


def test_the_profile_overlays_board_defaults_and_the_file_wins_key_by_key() -> None:
    cfg = config.from_dict({"device": {"id": "d", "profile": "rpi4"},
                            "runtime": {"num_threads": 1}}, "a.toml")
    prof = config.load_profile("rpi4")
    assert cfg.runtime.num_threads == 1
    assert cfg.runtime.fallback == tuple(prof["runtime"]["fallback"])
    assert cfg.outbox.max_bytes == parse_size(prof["outbox"]["max_bytes"], "x")


def test_overlay_merges_nested_tables() -> None:
    merged = config.overlay({"a": {"x": 1, "y": {"p": 1}}, "b": 2},
                            {"a": {"y": {"q": 2}}, "c": 3})
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 2, "c": 3}


def test_a_profile_may_not_set_broker_or_device_tables(tmp_path: Path) -> None:
    (tmp_path / "evil.toml").write_text('[uplink]\nurl = "mqtt://elsewhere"\n')
    with pytest.raises(ConfigError, match=r"evil.toml.*uplink"):
        config.from_dict({"device": {"id": "d", "profile": str(tmp_path / "evil.toml")}})


def test_a_profile_with_a_bad_value_names_the_profile_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[outbox]\nmax_bytes = "huge"\n')
    with pytest.raises(ConfigError, match=r"bad.toml.*outbox.max_bytes"):
        config.from_dict({"device": {"id": "d", "profile": str(tmp_path / "bad.toml")}})


def test_broker_urls_carry_credentials_and_tls() -> None:
    cfg = config.from_dict({**BASE, "uplink": {"url": "mqtts://u%40x:p%3Aw@h:8884"}})
    assert cfg.uplink.credentials == ("u@x", "p:w")
    assert cfg.uplink.tls and cfg.uplink.port == 8884


@pytest.mark.parametrize(("raw", "message"), [
    ({**BASE, "pipeline": [{"name": "p", "trigger": "a/#", "steps": []}]}, "steps"),
    ({**BASE, "pipeline": [{"name": "a/b", "trigger": "a", "steps": [{"action": "forward"}]}]},
     "name"),
    ({**BASE, "pipeline": [{"name": "p", "trigger": "a", "steps": [{"action": "forward"}]}] * 2},
     "used twice"),
    ({**BASE, "pipeline": [{"name": "p", "trigger": {"topic": "a", "every_s": 1},
                            "steps": [{"action": "forward"}]}]}, "exactly one"),
    ({**BASE, "pipeline": [{"name": "p", "trigger": "a",
                            "steps": [{"action": "forward", "qos": 2}]}]}, "qos"),
    ({**BASE, "pipeline": [{"name": "p", "trigger": "a",
                            "steps": [{"action": "nomodule.at.all:f"}]}]}, "nomodule"),
    ({"device": {"id": "a/b"}}, "device id"),
])
def test_pipeline_mistakes_are_config_errors_naming_the_place(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        config.from_dict(raw, "agent.toml")
    assert "agent.toml" in str(exc.value)


@pytest.mark.parametrize("action", ["forward", "publish"])
def test_an_unknown_placeholder_in_a_topic_template_is_a_config_error(action: str) -> None:
    raw = {"device": {"id": "d"},
           "pipeline": [{"name": "p", "trigger": "a/#",
                         "steps": [{"action": action, "topic": "{bogus}/x"}]}]}
    with pytest.raises(ConfigError, match=r"steps\[0\].*unknown placeholder 'bogus'"):
        config.from_dict(raw, "agent.toml")


def test_errors_name_the_file_then_the_table_and_key() -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_dict({**BASE, "outbox": {"max_bytes": "lots"}}, "agent.toml")
    assert str(exc.value).startswith("agent.toml: outbox.max_bytes: ")


def test_a_refusal_worded_key_colon_why_names_that_key() -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_dict({**BASE, "telemetry": {"interval_s": 0}}, "agent.toml")
    assert str(exc.value) == "agent.toml: telemetry.interval_s: must be positive"


@pytest.mark.parametrize(("text", "expected"), [("30s", 30), ("2m", 120), (45, 45), ("1h", 3600)])
def test_whole_seconds_take_duration_units(text: object, expected: int) -> None:
    assert parse_seconds(text, "x") == expected


@pytest.mark.parametrize("bad", ["1.5s", "250ms", 0.5, "soon", float("inf")])
def test_whole_seconds_refuse_fractions_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"uplink\.keepalive_s"):
        parse_seconds(bad, "uplink.keepalive_s")
