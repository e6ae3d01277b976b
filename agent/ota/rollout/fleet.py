"""What the devices say about the release: their state reports, read into a `Fleet`.

The reports arrive on paho's network thread into `Fleet`, which keeps per-state counts
incrementally: a report costs the same with 10 or 10,000 devices, and a decision reads
counters.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FINAL = frozenset({"committed", "rejected", "rolled_back"})
FAILED = frozenset({"rejected", "rolled_back", "timed_out"})
DONE = FINAL | {"timed_out", "cancelled"}  # a device the wave no longer waits for
CANCELLED = "cancelled by the operator"  # the reason a device gives for an empty deploy
MAX_REPORT_BYTES = 64 * 1024  # a state report larger than this is not one of ours


@dataclass(frozen=True, slots=True)
class Report:
    """What one device's state report says about the release's version."""

    seq: int
    state: str
    reason: str | None = None
    progress: float | None = None
    f1: float | None = None


def read_report(payload: bytes, version: int) -> Report | None:
    """The report in a retained state document, or None when it is about another
    version (or is no state document at all)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    seq, u = doc.get("seq"), doc.get("update")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(u, dict):
        return None
    if not _int(u.get("version")) or u["version"] != version:
        return None
    state = u.get("state")
    if not isinstance(state, str) or not state:
        return None
    reason = u.get("reason") if isinstance(u.get("reason"), str) else None
    shadow = u.get("shadow")
    f1 = shadow.get("f1") if isinstance(shadow, dict) else None
    return Report(seq, state[:40], None if reason is None else reason[:300],
                  _number(u.get("progress")), _number(f1))


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


class Fleet:
    """The devices of one rollout: what each last said about the release and the counts
    the decisions read, kept as reports arrive (paho's thread) under `cond`.

    A device's outcome: `pending` (not pushed), `waiting` (pushed, no report since),
    the state of its latest report, `timed_out`, or `cancelled` (told to drop the release
    when the rollout stopped: what it says afterwards is no longer the rollout's).
    A report with a seq not above the last one kept is stale; a report about another
    version is not about this rollout; one that predates the push of a device that had
    already refused this version (`stale`: its seq then) says nothing about this push.
    """

    def __init__(self, version: int, devices: Iterable[str]) -> None:
        self.version = version
        self.members = frozenset(devices)
        self.cond = threading.Condition()
        self.reports: dict[str, Report] = {}
        self.f1: dict[str, float] = {}
        self.pushed: set[str] = set()
        self.stale: dict[str, int] = {}
        self.timed_out: dict[str, str] = {}
        self.cancelled: set[str] = set()
        self.counts: Counter[str] = Counter()  # outcome -> pushed devices
        self.failures: dict[str, tuple[str, str]] = {}  # device -> (outcome, reason)
        self.open = 0  # pushed devices not done
        self.last_done = time.monotonic()  # when a report last finished a device
        self.changes = 0

    def offer(self, device: str, payload: bytes) -> None:
        """A state report arrived (any thread)."""
        if device not in self.members or len(payload) > MAX_REPORT_BYTES:
            return
        r = read_report(payload, self.version)
        if r is None:
            return
        with self.cond:
            old = self.reports.get(device)
            if old is not None and r.seq <= old.seq:
                return
            before = self._outcome(device)
            self.reports[device] = r
            if r.f1 is not None:
                self.f1[device] = r.f1
            self._moved(device, before)

    def outcome(self, device: str) -> str:
        with self.cond:
            return self._outcome(device)

    def _outcome(self, device: str) -> str:
        if device in self.timed_out:
            return "timed_out"
        if device in self.cancelled:
            return "cancelled"
        if device not in self.pushed:
            return "pending"
        r = self.reports.get(device)
        if r is None or r.seq <= self.stale.get(device, -1):
            return "waiting"
        return r.state

    def _moved(self, device: str, before: str) -> None:
        after = self._outcome(device)
        if device not in self.pushed or after == before:
            return
        self.counts[before] -= 1
        self.counts[after] += 1
        self.open += (before in DONE) - (after in DONE)
        if after in DONE and before not in DONE:
            self.last_done = time.monotonic()
        self._failure(device, after)
        self.changes += 1
        self.cond.notify_all()

    def _failure(self, device: str, outcome: str) -> None:
        if outcome in FAILED:
            r = self.reports.get(device)
            why = self.timed_out.get(device) if outcome == "timed_out" else (
                r.reason if r is not None else None)
            self.failures[device] = (outcome, why or "-")
        else:
            self.failures.pop(device, None)

    def stale_of(self, devices: Iterable[str]) -> dict[str, int]:
        """The devices that reported this version rejected or rolled back before a push:
        only a newer report counts for the push."""
        with self.cond:
            return {d: r.seq for d in devices if (r := self.reports.get(d)) is not None
                    and r.state in ("rejected", "rolled_back")}

    def push(self, devices: Iterable[str], stale: dict[str, int]) -> None:
        with self.cond:
            for d in devices:
                if d in self.pushed:
                    continue
                if d in stale:
                    self.stale[d] = stale[d]
                self.pushed.add(d)
                o = self._outcome(d)
                self.counts[o] += 1
                self.open += o not in DONE
                self._failure(d, o)
            self.changes += 1
            self.cond.notify_all()

    def time_out(self, device: str, why: str) -> None:
        with self.cond:
            if device in self.timed_out:
                return
            before = self._outcome(device)
            self.timed_out[device] = why
            if device in self.pushed:
                self._moved(device, before)

    def cancel(self, devices: Iterable[str]) -> None:
        with self.cond:
            for d in devices:
                before = self._outcome(d)
                self.cancelled.add(d)
                if d in self.pushed:
                    self._moved(d, before)

    def wait(self, seen: int, timeout_s: float) -> int:
        """Block until something changed since `seen` (or the timeout); the new count."""
        with self.cond:
            self.cond.wait_for(lambda: self.changes != seen, timeout_s)
            return self.changes

    def tally(self) -> tuple[int, int, int]:
        """(pushed, failed, open) right now."""
        with self.cond:
            return len(self.pushed), sum(self.counts[s] for s in FAILED), self.open
