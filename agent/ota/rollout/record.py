"""The rollout's record, retained on the broker: a closed laptop or a kill -9 loses
nothing (--resume continues it without pushing a device twice) and a second operator
sees the same rollout (--watch):

    <prefix>/_rollouts/<name>-<version>        the plan, the waves pushed, the decisions
    <prefix>/_rollouts/<name>-<version>/owner  the process running it; its last will
                                               clears it when the connection dies
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import ConfigError, OtaError
from agent.ota.rollout.plan import Options

KIND = "fogwhisk-rollout"
SPEC = 1


@dataclass(slots=True)
class Record:
    """The rollout as retained on <prefix>/_rollouts/<name>-<version>: its plan, what was
    pushed (a wave's push is recorded before and after it: `pushing` then `pushed`), the
    devices timed out and cancelled, and every decision."""

    name: str
    version: int
    release: str  # sha256 of the release document: --resume must bring the same one
    options: Options
    waves: list[list[str]]
    wave: int = 0  # the wave being pushed or watched
    pushing: dict[int, float] = field(default_factory=dict)  # its deadline counts from here
    pushed: dict[int, float] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)
    timed_out: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    status: Literal["running", "aborting", "aborted", "succeeded"] = "running"
    reason: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    updated: float = 0.0
    summary: dict[str, Any] | None = None  # counts and failures at the last decision

    @property
    def over(self) -> bool:
        return self.status in ("aborted", "succeeded")

    def decide(self, text: str) -> None:
        self.decisions.append({"ts": round(time.time(), 3), "wave": self.wave + 1,
                               "decision": text})

    def to_json(self) -> dict[str, Any]:
        return {"type": KIND, "spec": SPEC, "name": self.name, "version": self.version,
                "release_sha256": self.release, "options": self.options.to_json(),
                "waves": self.waves, "wave": self.wave,
                "pushing": {str(k): v for k, v in self.pushing.items()},
                "pushed": {str(k): v for k, v in self.pushed.items()},
                "stale": self.stale, "timed_out": self.timed_out, "cancelled": self.cancelled,
                "status": self.status, "reason": self.reason, "decisions": self.decisions,
                "started": self.started, "updated": self.updated, "summary": self.summary}

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        """The retained record; OtaError when it is not one this tool can continue."""
        try:
            d = json.loads(raw)
            if d.get("type") != KIND or d.get("spec") != SPEC:
                raise ValueError(f"not a {KIND} spec {SPEC} document")
            return cls(str(d["name"]), int(d["version"]), str(d["release_sha256"]),
                       Options.from_json(d["options"]),
                       [[str(x) for x in w] for w in d["waves"]], int(d["wave"]),
                       {int(k): float(v) for k, v in d["pushing"].items()},
                       {int(k): float(v) for k, v in d["pushed"].items()},
                       {str(k): int(v) for k, v in d["stale"].items()},
                       {str(k): str(v) for k, v in d["timed_out"].items()},
                       [str(x) for x in d["cancelled"]], d["status"], d["reason"],
                       list(d["decisions"]), float(d["started"]), float(d["updated"]),
                       d.get("summary"))
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise OtaError(f"the retained rollout record is unreadable: {exc}") from None


def owner_text(raw: bytes | None) -> str | None:
    """Who runs the rollout, from its owner topic (None: nobody)."""
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return f"pid {d['pid']} on {d['host']} (since {time.ctime(float(d['since']))})"
    except (ValueError, KeyError, TypeError):
        return raw[:80].decode(errors="replace")
