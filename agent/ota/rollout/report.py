"""What the operator sees: progress lines, the live table (devices per state, the current
wave, failures with reasons), the final summary as text or one JSON object, the timings
`fogwhisk bench rollout` reads from it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.ota.rollout.fleet import Fleet
from agent.ota.rollout.gates import Agreement, agreement
from agent.ota.rollout.record import Record

SHOW_S = 1.0  # the live table is redrawn at most this often
SHOWN_FAILURES = 10
EXIT_OK, EXIT_ABORTED = 0, 1


@dataclass(slots=True)
class Timings:
    """How long the steps took, for the summary (`fogwhisk bench rollout`)."""

    decide_ms: dict[int, float] = field(default_factory=dict)  # last device before -> push
    push_ms: dict[int, float] = field(default_factory=dict)  # the push: record, deploys, record
    judge_s: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    loaded_s: float = 0.0

    def to_json(self, waves: Sequence[Sequence[str]]) -> dict[str, Any]:
        js = sorted(self.judge_s) or [0.0]
        return {"states_loaded_s": round(self.loaded_s, 4),
                "waves": [{"wave": w + 1, "devices": len(waves[w]),
                           "decide_ms": round(self.decide_ms[w], 2) if w in self.decide_ms
                           else None,
                           "push_ms": round(ms, 2)} for w, ms in sorted(self.push_ms.items())],
                "judge_us": {"median": round(statistics.median(js) * 1e6, 1),
                             "max": round(js[-1] * 1e6, 1), "calls": len(self.judge_s)}}


def summary(rec: Record, fleet: Fleet, timings: Timings | None = None) -> dict[str, Any]:
    """The rollout in one JSON object; without `timings`, the brief one the record keeps
    (no decisions, no timings)."""
    with fleet.cond:
        counts = +fleet.counts
        failures = [{"device": d, "state": s, "reason": why}
                    for d, (s, why) in fleet.failures.items()]
    pending = sum(len(w) for i, w in enumerate(rec.waves) if i not in rec.pushed)
    out: dict[str, Any] = {
        "rollout": f"{rec.name}-{rec.version}", "name": rec.name, "version": rec.version,
        "status": rec.status, "reason": rec.reason, "wave": rec.wave + 1,
        "waves": [len(w) for w in rec.waves], "devices": sum(map(len, rec.waves)),
        "pushed": len(fleet.pushed), "never_pushed": pending,
        "counts": dict(sorted(counts.items())), "failures": failures,
        "cancelled": rec.cancelled,
        "agreement": agreement(fleet, rec.waves[0], rec.options.min_agreement).to_json()}
    if timings is not None:
        out["decisions"] = rec.decisions
        out["timings"] = timings.to_json(rec.waves)
    return out


class Screen:
    """The command's output: lines on `out` (a live table when it is a terminal, nothing
    but the final JSON with --json), the reason of an abort on `err`."""

    def __init__(self, out: TextIO, err: TextIO, as_json: bool) -> None:
        self.out, self.err = out, err
        self.as_json = as_json
        self.tty = not as_json and out.isatty()
        self.shown_at = 0.0
        self.shown_lines = 0
        self.shown_key: tuple[Any, ...] = ()
        self.failures_said: set[str] = set()
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if self.as_json:
            return
        self._clear()
        print(f"[{clock(time.monotonic() - self.started)}] {text}", file=self.out, flush=True)

    def _clear(self) -> None:
        if self.tty and self.shown_lines:
            self.out.write(f"\x1b[{self.shown_lines}F\x1b[J")
            self.shown_lines = 0

    def show(self, rec: Record, fleet: Fleet) -> None:
        """The live table: devices per state, the current wave, failures with reasons."""
        if self.as_json:
            return
        with fleet.cond:
            counts = +fleet.counts
            failures = dict(fleet.failures)
        pending = sum(len(w) for i, w in enumerate(rec.waves) if i not in rec.pushed)
        key = (rec.wave, tuple(sorted(counts.items())), len(failures))
        now = time.monotonic()
        if key == self.shown_key or now - self.shown_at < SHOW_S:
            return
        self.shown_at, self.shown_key = now, key
        head = (f"{rec.name} {rec.version}: wave {rec.wave + 1} of {len(rec.waves)} "
                f"({len(rec.waves[rec.wave])} devices)  " + counts_text(counts, pending))
        if not self.tty:
            print(f"[{clock(now - self.started)}] {head}", file=self.out, flush=True)
            for d, (state, why) in failures.items():
                if d not in self.failures_said:
                    self.failures_said.add(d)
                    print(f"    {d} {state}: {why}", file=self.out, flush=True)
            return
        lines = [head] + [f"    {d} {state}: {why}" for d, (state, why)
                          in list(failures.items())[-SHOWN_FAILURES:]]
        self._clear()
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.shown_lines = len(lines)

    def report(self, rec: Record, s: dict[str, Any]) -> int:
        """The final summary `s`; the exit code (the reason on `err` when it aborted)."""
        if self.as_json:
            print(json.dumps(s), file=self.out, flush=True)
        else:
            self._clear()
            print(summary_text(s), file=self.out, flush=True)
        if rec.status == "succeeded":
            return EXIT_OK
        print(f"fogwhisk: rollout of {rec.name} {rec.version} {rec.status}: {rec.reason}",
              file=self.err, flush=True)
        return EXIT_ABORTED


# -- text -----------------------------------------------------------------------------------


def counts_text(counts: Counter[str], pending: int) -> str:
    order = ["waiting", "downloading", "verifying", "trial", "shadow", "probation",
             "committed", "rejected", "rolled_back", "timed_out", "cancelled"]
    keys = [k for k in order if counts[k]] + sorted(k for k in counts if k not in order)
    parts = [f"{k} {counts[k]}" for k in keys]
    if pending:
        parts.append(f"not yet pushed {pending}")
    return ", ".join(parts) or "nothing pushed yet"


def summary_text(s: dict[str, Any]) -> str:
    head = f"rollout {s['name']} {s['version']}: {s['status']}"
    if s["status"] != "succeeded":
        head += f" in wave {s['wave']} of {len(s['waves'])}"
    if s["reason"]:
        head += f": {s['reason']}"
    counts = Counter({k: v for k, v in s["counts"].items()})
    lines = [head,
             f"  waves: {', '.join(map(str, s['waves']))}; pushed to {s['pushed']} of "
             f"{s['devices']} devices",
             f"  {counts_text(counts, s['never_pushed'])}"]
    if s["never_pushed"] and s["status"] != "succeeded":
        lines.append(f"  {s['never_pushed']} devices never got the release")
    if s["cancelled"]:
        lines.append(f"  told to drop it (empty retained deploy): {few(s['cancelled'])}")
    a = s["agreement"]
    lines.append("  canary agreement: " + Agreement(a["median"], a["reported"],
                                                    a["canaries"], a["gate"]).text())
    if s["failures"]:
        lines.append("  failures:")
        lines += [f"    {f['device']} {f['state']}: {f['reason']}" for f in s["failures"]]
    return "\n".join(lines)


def few(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def clock(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def duration(s: float) -> str:
    for unit, n in (("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:g}{unit}"
    return f"{s:g} s"
