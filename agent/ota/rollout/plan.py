"""The rollout's plan: the operator's options, the devices and the waves they go out in.

    canaries (--canary, default 2) -> waves growing by --wave-factor (4, 8, 16, ...)

Pure: nothing here touches the broker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

_LEVEL_BAD = set("/+#\x00")


@dataclass(frozen=True, slots=True)
class MaxFailed:
    """--max-failed: a share of the devices pushed ("10%") or a number of devices ("3")."""

    share: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> MaxFailed:
        t = text.strip()
        try:
            if t.endswith("%"):
                share = float(t[:-1]) / 100
                if not 0 < share <= 1:
                    raise ValueError(t)
                return cls(share=share)
            count = int(t)
            if count < 1:
                raise ValueError(t)
            return cls(count=count)
        except ValueError:
            raise ConfigError(f"--max-failed {text!r}: expected a share of the devices like "
                              "10% (above 0, at most 100%) or a number of devices like 3"
                              ) from None

    def reached(self, failed: int, pushed: int) -> bool:
        if failed <= 0:
            return False
        if self.count is not None:
            return failed >= self.count
        assert self.share is not None
        return failed >= self.share * pushed * (1 - 1e-9)  # 3 of 30 reaches 10%

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share is not None else str(self.count)


@dataclass(frozen=True, slots=True)
class Options:
    """How the release goes out and when it stops (the command's options)."""

    canary: int = 2
    wave_factor: float = 2.0
    max_failed: MaxFailed = MaxFailed(share=0.10)
    min_agreement: float = 0.6
    wave_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.canary < 1:
            raise ConfigError(f"--canary {self.canary}: at least 1 device goes first")
        if not (math.isfinite(self.wave_factor) and self.wave_factor >= 1):
            raise ConfigError(f"--wave-factor {self.wave_factor:g}: must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"--min-agreement {self.min_agreement:g}: an F1 lies in 0..1")
        if not self.wave_timeout_s > 0:
            raise ConfigError(f"--wave-timeout {self.wave_timeout_s:g} s: must be longer "
                              "than 0")

    def to_json(self) -> dict[str, Any]:
        return {"canary": self.canary, "wave_factor": self.wave_factor,
                "max_failed": str(self.max_failed), "min_agreement": self.min_agreement,
                "wave_timeout_s": self.wave_timeout_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Options:
        return cls(int(d["canary"]), float(d["wave_factor"]), MaxFailed.parse(d["max_failed"]),
                   float(d["min_agreement"]), float(d["wave_timeout_s"]))


def plan_waves(devices: Sequence[str], canary: int, factor: float) -> list[list[str]]:
    """The canaries first, then waves growing by `factor` (2, 4, 8, ... for 2 and 2)."""
    waves: list[list[str]] = []
    size, i = float(canary), 0
    while i < len(devices):
        n = max(1, int(size + 1e-9))
        waves.append(list(devices[i:i + n]))
        i += n
        size *= factor
    return waves


def read_devices(path: Path) -> list[str]:
    """Device ids from FILE: one per line; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--devices {path}: cannot read: {exc.strerror}") from None
    ids: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        d = line.split("#", 1)[0].strip()
        if d:
            ids.append(_device_id(d, f"{path}:{n}"))
    return ids


def _device_id(d: str, where: str) -> str:
    if not d or _LEVEL_BAD & set(d):
        raise ConfigError(f"{where}: device id {d!r} is not one topic level "
                          "(no /, +, # or NUL)")
    return d


def check_devices(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for d in ids:
        _device_id(d, "--device")
        if d in seen:
            raise ConfigError(f"device {d} is listed twice")
        seen.add(d)
    if not ids:
        raise ConfigError("no devices to roll out to")
