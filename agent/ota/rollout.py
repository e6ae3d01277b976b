"""`fogwhisk model rollout`: a release goes out in waves, and stops itself.

    canaries (--canary, default 2) -> waves growing by --wave-factor (4, 8, 16, ...)

Each wave is pushed as `fogwhisk model push` pushes (agent.ota.push) and watched on the
devices' retained state reports until every device in it is committed, rejected, rolled
back or timed out (--wave-timeout). The rollout stops itself when

  - the failed devices (rejected, rolled back, timed out) reach --max-failed of the devices
    pushed so far: the share of the finished ones is then at least as high, whatever the
    others still do (decided as soon as it is certain, at the latest when the wave ends);
  - the canaries' median shadow agreement (`update.shadow.f1` of their reports) is under
    --min-agreement (no canary reporting one: the gate is skipped, the summary says so).

Then no further device gets the release, and the pushed devices that have not finished
are told to drop it: an empty retained deploy, which also removes the retained release
from the broker (docs/ota.md, "Rollouts", says why this and not a signed cancel).

The rollout's own state is retained on the broker, so a closed laptop or a kill -9
loses nothing (--resume continues it without pushing a device twice) and a second
operator sees the same rollout (--watch):

    <prefix>/_rollouts/<name>-<version>        the plan, the waves pushed, the decisions
    <prefix>/_rollouts/<name>-<version>/owner  the process running it; its last will
                                               clears it when the connection dies

The reports arrive on paho's network thread into `Fleet`, which keeps per-state counts
incrementally: a report costs the same with 10 or 10,000 devices, and a decision reads
counters. Operator side only: paho is imported when a rollout runs, not with the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from agent.errors import ConfigError, ConnectError, OtaError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from agent.ota.push import _Release, _Session

FINAL = frozenset({"committed", "rejected", "rolled_back"})
FAILED = frozenset({"rejected", "rolled_back", "timed_out"})
DONE = FINAL | {"timed_out", "cancelled"}  # a device the wave no longer waits for
CANCELLED = "cancelled by the operator"  # the reason a device gives for an empty deploy
KIND = "fogwhisk-rollout"
SPEC = 1
TICK_S = 0.25  # decisions look at the clock (wave deadlines) at least this often
SHOW_S = 1.0  # the live table is redrawn at most this often
MAX_REPORT_BYTES = 64 * 1024  # a state report larger than this is not one of ours
SHOWN_FAILURES = 10
EXIT_OK, EXIT_ABORTED = 0, 1
_LEVEL_BAD = set("/+#\x00")


# -- the options and the plan ---------------------------------------------------------------


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


# -- what the devices report ----------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Agreement:
    """The canaries' shadow agreement (F1 against the active model) and its gate."""

    median: float | None
    reported: int
    canaries: int
    gate: float

    @property
    def passed(self) -> bool:
        return self.median is None or self.median >= self.gate

    def text(self) -> str:
        if self.median is None:
            return "no canary reported a shadow summary (update.shadow.f1): the agreement " \
                   "gate was skipped"
        return (f"median {self.median:.2f} over {self.reported} of {self.canaries} canaries "
                f"(--min-agreement {self.gate:g})")

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "reported": self.reported, "canaries": self.canaries,
                "gate": self.gate, "skipped": self.median is None}


def agreement(fleet: Fleet, canaries: Sequence[str], gate: float) -> Agreement:
    with fleet.cond:
        f1s = [fleet.f1[d] for d in canaries if d in fleet.f1]
    return Agreement(statistics.median(f1s) if f1s else None, len(f1s), len(canaries), gate)


# -- the rollout's record on the broker ------------------------------------------------------


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


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["wait", "time_out", "abort", "next", "done"]
    reason: str = ""
    devices: tuple[str, ...] = ()


def judge(rec: Record, fleet: Fleet, now: float) -> Verdict:
    """What to do now about the wave in `rec.wave`, pushed already."""
    w, opts = rec.wave, rec.options
    pushed, failed, open_ = fleet.tally()
    if opts.max_failed.reached(failed, pushed):
        finished = pushed - open_
        still = f"; {open_} still working cannot bring it under" if open_ else ""
        return Verdict("abort", f"{failed} of {pushed} devices pushed failed "
                       f"({failed / pushed:.0%} of them, {failed} of {finished} finished)"
                       f": --max-failed is {opts.max_failed}{still}")
    if open_:
        if now < rec.pushing[w] + opts.wave_timeout_s:
            return Verdict("wait")
        late = tuple(d for d in rec.waves[w] if fleet.outcome(d) not in DONE)
        return Verdict("time_out", devices=late)
    if w == 0:
        gate = agreement(fleet, rec.waves[0], opts.min_agreement)
        if not gate.passed:
            return Verdict("abort", f"the canaries' shadow agreement {gate.text()}")
    if w + 1 >= len(rec.waves):
        return Verdict("done")
    return Verdict("next")


# -- running it -----------------------------------------------------------------------------


class _Rollout:
    """One run of the command: the connection, the record, the fleet and the output."""

    def __init__(self, release_json: Path, broker: Any, *, prefix: str, urls: Sequence[str],
                 out: TextIO, err: TextIO, as_json: bool, tick_s: float) -> None:
        from agent.ota import push as pushing  # paho: only when a rollout runs

        self.push_mod = pushing
        self.release_json = release_json
        self.rel: _Release = pushing._read_release(release_json)
        self.release_sha = hashlib.sha256(self.rel.raw).hexdigest()
        self.broker = broker
        self.prefix = prefix
        self.urls = list(urls)
        self.out, self.err = out, err
        self.as_json = as_json
        self.tty = not as_json and out.isatty()
        self.tick_s = tick_s
        self.topic = f"{prefix}/_rollouts/{self.rel.name}-{self.rel.version}"
        self.owner_topic = f"{self.topic}/owner"
        self.state_filter = f"{prefix}/+/models/{self.rel.name}/state"
        self.deploy_filter = f"{prefix}/+/models/{self.rel.name}/deploy"
        self.session: _Session = pushing._Session(broker)
        self.client: mqtt.Client = self.session.client
        self.client.on_message = self._on_message
        self.fleet = Fleet(self.rel.version, ())
        self.record_raw: bytes | None = None
        self.owner_raw: bytes | None = None
        self.deploys: set[str] | None = None  # devices whose retained deploy is this release
        self.rec: Record | None = None
        self.shown_at = 0.0
        self.shown_lines = 0
        self.shown_key: tuple[Any, ...] = ()
        self.failures_said: set[str] = set()
        self.owned = False  # the owner topic names this process
        self.decided_at: float | None = None  # when the wave in hand was decided (monotonic)
        self.decide_ms: dict[int, float] = {}  # last device of the wave before -> push
        self.push_ms: dict[int, float] = {}  # the push: record, deploys, record
        self.judge_s: deque[float] = deque(maxlen=10_000)
        self.loaded_s = 0.0
        self.started = time.monotonic()

    # paho's network thread

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        levels = topic.split("/")
        if len(levels) == 5 and levels[2] == "models" and levels[0] == self.prefix:
            if levels[4] == "state":
                self.fleet.offer(levels[1], bytes(msg.payload))
                return
            if levels[4] == "deploy" and self.deploys is not None:
                if self._ours(bytes(msg.payload)):
                    with self.session.cond:
                        self.deploys.add(levels[1])
                return
        with self.session.cond:
            if topic == self.topic:
                self.record_raw = bytes(msg.payload)
            elif topic == self.owner_topic:
                self.owner_raw = bytes(msg.payload)
            self.session.cond.notify_all()
        with self.fleet.cond:  # wake the main loop: the record moved (--watch)
            self.fleet.changes += 1
            self.fleet.cond.notify_all()

    # the command's thread

    def subscribe(self, *filters: str) -> None:
        """Subscribe and return once their retained messages are in: a second SUBSCRIBE is
        the fence, Mosquitto answers it after the first one's retained messages. At QoS 0:
        retained QoS 1 messages wait behind the broker's in-flight window (20 by default)
        while the fence's SUBACK does not, so it came after the first 20 of 10,000. QoS 0
        loses nothing on a live connection, and a lost one ends the run (--resume)."""
        s = self.session
        _, mid = self.client.subscribe([(f, 0) for f in filters])
        _, fence = self.client.subscribe(f"{self.prefix}/_fence/{uuid.uuid4().hex}", qos=0)
        assert mid is not None and fence is not None
        s.wait(lambda: mid in s.subacks and fence in s.subacks, "a SUBACK")
        for f, code in zip(filters, s.subacks[mid], strict=False):
            if code >= 0x80:
                raise ConnectError(f"{self.broker.shown} refused the subscription to {f}: "
                                   f"0x{code:02X}")

    def publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Retained QoS 1, every reason code checked (push's publisher)."""
        window = max(1, min(self.push_mod.INFLIGHT,
                            self.session.server("ReceiveMaximum", 65535)))
        p = self.push_mod._Publisher(self.session, window)
        for topic, payload in items:
            p.publish(topic, payload)
        p.drain(items[0][0] if len(items) == 1 else f"{len(items)} messages")

    def save(self) -> None:
        rec = self.rec
        assert rec is not None
        rec.updated = round(time.time(), 3)
        rec.summary = self.summary(brief=True)
        self.publish([(self.topic, json.dumps(rec.to_json(), separators=(",", ":")).encode())])

    def check_lost(self) -> None:
        if self.session.lost is not None:
            raise ConnectError(f"lost {self.broker.shown}: {self.session.lost}; the rollout "
                               "stays on the broker: --resume continues it")

    # starting

    def start(self, devices: Sequence[str] | None, options: Options | None,
              mode: Literal["new", "resume", "watch"]) -> None:
        self.subscribe(self.topic, self.owner_topic)
        existing = Record.from_json(self.record_raw) if self.record_raw else None
        owner = _owner_text(self.owner_raw)
        what = f"{self.rel.name} version {self.rel.version}"
        if mode != "new" and existing is None:
            raise OtaError(f"no rollout of {what} on {self.broker.shown} ({self.topic})")
        if mode == "new" and existing is not None and not existing.over:
            raise OtaError(f"a rollout of {what} is on the broker ({existing.status}, wave "
                           f"{existing.wave + 1} of {len(existing.waves)}"
                           + (f", run by {owner}" if owner else "")
                           + "): --resume continues it, --watch follows it")
        if mode != "new" and existing is not None and existing.release != self.release_sha:
            raise OtaError(f"the rollout of {what} on the broker deploys another release "
                           f"document (sha256 {existing.release[:16]}...), not "
                           f"{self.release_json}")
        if mode == "resume" and owner and existing is not None and not existing.over:
            raise OtaError(f"the rollout of {what} is being run by {owner} (its connection "
                           f"is open): --watch follows it. If that process is gone and its "
                           f"broker never noticed, clear {self.owner_topic} (retained) first")
        if mode == "new" and existing is not None and existing.status == "aborted" \
                and existing.release == self.release_sha and existing.cancelled:
            raise OtaError(f"the rollout of this release document stopped and told "
                           f"{len(existing.cancelled)} devices to drop it; a device answers "
                           "one release document once, so they would stay silent: pack it "
                           "again (a new document, of this version or a higher one) to retry")
        if mode == "new":
            assert devices is not None and options is not None
            if existing is not None:
                self.say(f"replacing the finished rollout of {what} ({existing.status}"
                         + (f": {existing.reason}" if existing.reason else "") + ")")
            now = round(time.time(), 3)
            self.rec = Record(self.rel.name, self.rel.version, self.release_sha, options,
                              plan_waves(devices, options.canary, options.wave_factor),
                              started=now)
        else:
            assert existing is not None
            self.rec = existing
            if devices is not None and list(devices) != [d for w in existing.waves for d in w]:
                raise ConfigError("--resume/--watch: the devices given differ from the "
                                  "rollout's on the broker (leave them out)")
        rec = self.rec
        self.fleet = Fleet(rec.version, (d for w in rec.waves for d in w))
        if mode != "watch":
            me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": round(time.time(), 3)}).encode()
            self.publish([(self.owner_topic, me)])
            self.owned = True
        t0 = time.perf_counter()
        self.subscribe(self.state_filter)
        self.loaded_s = time.perf_counter() - t0
        self.sync()
        if mode == "new":
            rec.decide(f"planned: {len(rec.waves)} waves of "
                       f"{', '.join(str(len(w)) for w in rec.waves)} devices")
            self.save()

    def sync(self) -> None:
        """Bring the fleet to the record: the waves pushed, the devices timed out."""
        rec = self.rec
        assert rec is not None
        for w in sorted(rec.pushed):
            self.fleet.push(rec.waves[w], {d: rec.stale[d] for d in rec.waves[w]
                                           if d in rec.stale})
        for d, why in rec.timed_out.items():
            self.fleet.time_out(d, why)
        if rec.status in ("aborting", "aborted"):
            self.fleet.cancel(rec.cancelled)

    # driving

    def drive(self) -> None:
        rec = self.rec
        assert rec is not None
        seen = -1
        while True:
            self.check_lost()
            if rec.status == "aborting":
                self.cancel()
                continue
            if rec.over:
                return
            w = rec.wave
            if w not in rec.pushed:
                self.push_wave(w)
                continue
            t0 = time.perf_counter()
            v = judge(rec, self.fleet, time.time())
            self.judge_s.append(time.perf_counter() - t0)
            if v.action == "wait":
                self.show()
                seen = self.fleet.wait(seen, self.tick_s)
                continue
            if v.action == "time_out":
                why = f"no final state within {_duration(rec.options.wave_timeout_s)}"
                for d in v.devices:
                    last = self.fleet.outcome(d)
                    with self.fleet.cond:
                        before = self.fleet.reports.get(d) if d in rec.stale else None
                    if last == "waiting" and before is not None:
                        last += (f"; before this push it had reported {before.state}: "
                                 f"{before.reason}")
                    rec.timed_out[d] = f"{why} (last: {last})"
                    self.fleet.time_out(d, rec.timed_out[d])
                text = f"wave {w + 1}: {len(v.devices)} timed out: {_few(list(v.devices))}"
                rec.decide(text)
                self.say(text)
                self.save()
                self.decided_at = time.monotonic()
                continue
            if v.action == "abort":
                self.say(f"abort: {v.reason}")
                rec.status, rec.reason = "aborting", v.reason
                rec.cancelled = sorted(d for d in self.fleet.pushed
                                       if self.fleet.outcome(d) not in FINAL)
                rec.decide(f"abort: {v.reason}")
                self.save()
                continue
            pushed, failed, _ = self.fleet.tally()
            text = f"wave {w + 1} finished: {failed} of {pushed} pushed devices failed so far"
            if w == 0:
                gate = agreement(self.fleet, rec.waves[0], rec.options.min_agreement)
                text += f"; canary agreement: {gate.text()}"
            rec.decide(text)
            self.say(text)
            if v.action == "done":
                rec.status = "succeeded"
                rec.decide("succeeded")
                self.save()
                return
            self.decided_at = max(self.fleet.last_done, self.decided_at or 0.0)
            rec.wave = w + 1

    def push_wave(self, w: int) -> None:
        rec = self.rec
        assert rec is not None
        devices = rec.waves[w]
        t0 = time.monotonic()
        if w > 0 and self.decided_at is not None:
            self.decide_ms[w] = (t0 - self.decided_at) * 1000
        todo = devices
        if w in rec.pushing:  # resumed: the push began; only the devices without the release
            have = self.deployed(devices)
            todo = [d for d in devices if d not in have]
        else:
            rec.stale.update(self.fleet.stale_of(devices))
            rec.pushing[w] = round(time.time(), 3)
            rec.decide(f"wave {w + 1}: pushing to {len(devices)} devices")
            self.save()
        if todo:
            self.push_mod.push(self.release_json, self.broker.url, devices=todo,
                               urls=self.urls, ca=self.broker.ca, cert=self.broker.cert,
                               key=self.broker.key, username=self.broker.username,
                               password=self.broker.password, prefix=self.prefix,
                               timeout_s=self.broker.timeout_s, out=io.StringIO())
        rec.pushed[w] = round(time.time(), 3)
        self.fleet.push(devices, {d: rec.stale[d] for d in devices if d in rec.stale})
        rec.decide(f"wave {w + 1}: deployed to {len(todo)} devices"
                   + (f" ({len(devices) - len(todo)} had it already)" if todo != devices
                      else ""))
        self.save()
        self.push_ms[w] = (time.monotonic() - t0) * 1000
        label = "canaries" if w == 0 else f"{len(devices)} devices"
        self.say(f"wave {w + 1} of {len(rec.waves)} ({label}): deployed to {len(todo)}")

    def deployed(self, devices: Sequence[str]) -> set[str]:
        """The devices whose retained deploy is this release (pushed before a crash)."""
        with self.session.cond:
            self.deploys = set()
        self.subscribe(self.deploy_filter)
        self.client.unsubscribe(self.deploy_filter)
        with self.session.cond:
            got, self.deploys = self.deploys, None
        return got & set(devices)

    def _ours(self, payload: bytes) -> bool:
        """A deploy of this release (with or without push's unsigned `locations`)."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and doc.get("signed") == self.rel.doc["signed"]

    def cancel(self) -> None:
        """Empty retained deploys to the devices that have not finished: they drop the
        release, and no device connecting later finds it on the broker."""
        rec = self.rec
        assert rec is not None
        self.fleet.cancel(rec.cancelled)
        if rec.cancelled:
            self.publish([(f"{self.prefix}/{d}/models/{rec.name}/deploy", b"")
                          for d in rec.cancelled])
            n = len(rec.cancelled)
            self.say(f"told {n} device{'' if n == 1 else 's'} in flight to drop the release: "
                     f"{_few(rec.cancelled)}")
        rec.status = "aborted"
        self.save()

    # watching someone else's rollout

    def follow(self) -> None:
        rec = self.rec
        assert rec is not None
        seen, orphaned = -1, False
        while not rec.over:
            self.check_lost()
            self.show()
            seen = self.fleet.wait(seen, self.tick_s)
            with self.session.cond:
                raw, owner = self.record_raw, self.owner_raw
            if not owner and not orphaned:
                self.say("nobody runs this rollout now (no owner on the broker): --resume "
                         "continues it; watching until someone does")
            orphaned = not owner
            if raw:
                new = Record.from_json(raw)
                if new.updated != rec.updated:
                    for d in new.decisions[len(rec.decisions):]:
                        self.say(d["decision"])
                    self.rec = rec = new
                    self.sync()

    # output

    def say(self, text: str) -> None:
        if self.as_json:
            return
        self._clear()
        print(f"[{_clock(time.monotonic() - self.started)}] {text}", file=self.out, flush=True)

    def _clear(self) -> None:
        if self.tty and self.shown_lines:
            self.out.write(f"\x1b[{self.shown_lines}F\x1b[J")
            self.shown_lines = 0

    def show(self) -> None:
        """The live table: devices per state, the current wave, failures with reasons."""
        if self.as_json:
            return
        rec = self.rec
        assert rec is not None
        with self.fleet.cond:
            counts = +self.fleet.counts
            failures = dict(self.fleet.failures)
        pending = sum(len(w) for i, w in enumerate(rec.waves) if i not in rec.pushed)
        key = (rec.wave, tuple(sorted(counts.items())), len(failures))
        now = time.monotonic()
        if key == self.shown_key or now - self.shown_at < SHOW_S:
            return
        self.shown_at, self.shown_key = now, key
        head = (f"{rec.name} {rec.version}: wave {rec.wave + 1} of {len(rec.waves)} "
                f"({len(rec.waves[rec.wave])} devices)  " + _counts(counts, pending))
        if not self.tty:
            print(f"[{_clock(now - self.started)}] {head}", file=self.out, flush=True)
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

    def summary(self, brief: bool = False) -> dict[str, Any]:
        rec = self.rec
        assert rec is not None
        with self.fleet.cond:
            counts = +self.fleet.counts
            failures = [{"device": d, "state": s, "reason": why}
                        for d, (s, why) in self.fleet.failures.items()]
        pending = sum(len(w) for i, w in enumerate(rec.waves) if i not in rec.pushed)
        out: dict[str, Any] = {
            "rollout": f"{rec.name}-{rec.version}", "name": rec.name, "version": rec.version,
            "status": rec.status, "reason": rec.reason, "wave": rec.wave + 1,
            "waves": [len(w) for w in rec.waves], "devices": sum(map(len, rec.waves)),
            "pushed": len(self.fleet.pushed), "never_pushed": pending,
            "counts": dict(sorted(counts.items())), "failures": failures,
            "cancelled": rec.cancelled,
            "agreement": agreement(self.fleet, rec.waves[0], rec.options.min_agreement
                                   ).to_json()}
        if not brief:
            out["decisions"] = rec.decisions
            out["timings"] = self.timings()
        return out

    def timings(self) -> dict[str, Any]:
        js = sorted(self.judge_s) or [0.0]
        return {"states_loaded_s": round(self.loaded_s, 4),
                "waves": [{"wave": w + 1, "devices": len(self.rec.waves[w]) if self.rec else 0,
                           "decide_ms": round(self.decide_ms[w], 2) if w in self.decide_ms
                           else None,
                           "push_ms": round(ms, 2)} for w, ms in sorted(self.push_ms.items())],
                "judge_us": {"median": round(statistics.median(js) * 1e6, 1),
                             "max": round(js[-1] * 1e6, 1), "calls": len(self.judge_s)}}

    def report(self) -> int:
        rec = self.rec
        assert rec is not None
        s = self.summary()
        if self.as_json:
            print(json.dumps(s), file=self.out, flush=True)
        else:
            self._clear()
            print(_summary_text(s), file=self.out, flush=True)
        if rec.status == "succeeded":
            return EXIT_OK
        print(f"fogwhisk: rollout of {rec.name} {rec.version} {rec.status}: {rec.reason}",
              file=self.err, flush=True)
        return EXIT_ABORTED

    def close(self) -> None:
        """Give the rollout up (its record stays): clear the owner, disconnect."""
        if self.owned and self.session.lost is None:
            with contextlib.suppress(ConnectError, OtaError):
                self.publish([(self.owner_topic, b"")])
            self.owned = False


def rollout(release_json: Path, broker_url: str, *, devices: Sequence[str] | None = None,
            options: Options | None = None, resume: bool = False, watch: bool = False,
            as_json: bool = False, urls: Sequence[str] = (), ca: Path | None = None,
            cert: Path | None = None, key: Path | None = None, username: str | None = None,
            password: str | None = None, prefix: str = "fog", timeout_s: float = 30.0,
            out: TextIO | None = None, err: TextIO | None = None,
            tick_s: float = TICK_S) -> int:
    """Run (or --resume, or --watch) the rollout of `release_json`; 0 when every wave was
    pushed and no gate stopped it, 1 when it aborted (the reason on `err`); raises
    ConfigError, ConnectError, OtaError or ReleaseError when it cannot run."""
    from agent.ota.push import Broker

    out, err = out or sys.stdout, err or sys.stderr
    if devices is not None:
        check_devices(devices)
    mode: Literal["new", "resume", "watch"] = "watch" if watch else (
        "resume" if resume else "new")
    if mode == "new" and devices is None:
        raise ConfigError("--devices FILE or --device ID is needed to start a rollout")
    broker = Broker(broker_url, ca, cert, key, username, password, timeout_s)
    r = _Rollout(release_json, broker, prefix=prefix, urls=urls, out=out, err=err,
                 as_json=as_json, tick_s=tick_s)
    if mode != "watch":
        # A missing or altered artifact stops it before anything is sent.
        r.push_mod._check_artifact(r.push_mod._artifact_beside(release_json), r.rel)
        # The broker clears the owner when this connection dies without a DISCONNECT.
        r.client.will_set(r.owner_topic, None, qos=1, retain=True)
    with r.session:
        try:
            r.start(devices, options or Options(), mode)
            assert r.rec is not None
            if not r.rec.over:
                if mode == "watch":
                    r.follow()
                else:
                    r.drive()
        except KeyboardInterrupt:
            print("fogwhisk: interrupted; the rollout stays on the broker: --resume "
                  "continues it", file=err, flush=True)
            return EXIT_ABORTED
        finally:
            r.close()
        return r.report()


# -- the command line -----------------------------------------------------------------------


def add_parser(sub: Any, broker_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """`fogwhisk model rollout`, under the `model` command's subparsers."""
    p = sub.add_parser(
        "rollout", help="push a release in waves that stop themselves",
        description="Push RELEASE_JSON to the canaries, then to waves growing by "
        "--wave-factor, each watched on the devices' state reports until every device in it "
        "is committed, rejected, rolled back or timed out. Stops when the failed devices "
        "reach --max-failed or the canaries' median shadow agreement is under "
        "--min-agreement: no further device gets the release, those in flight are told to "
        "drop it (an empty retained deploy), exit 1 with the reason. The rollout's state is "
        "retained on the broker (fog/_rollouts/<name>-<version>): --resume continues it, "
        "--watch follows it from another machine.")
    p.add_argument("release_json", type=Path, metavar="RELEASE_JSON",
                   help="the release from pack; its .tar is found beside it")
    broker_arguments(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--devices", type=Path, metavar="FILE", help="device ids, one per "
                     "line (# comments); the first --canary of them are the canaries")
    who.add_argument("--device", action="append", dest="device_ids", metavar="ID",
                     help="a device; repeat for several (the first ones are the canaries)")
    p.add_argument("--canary", type=_whole, default=2, metavar="N",
                   help="devices in the first wave (default: 2)")
    p.add_argument("--wave-factor", type=float, default=2.0, metavar="F",
                   help="each wave is F times the one before (default: 2)")
    p.add_argument("--max-failed", type=_max_failed, default=MaxFailed(share=0.1),
                   metavar="SHARE", help="stop when this share of the devices pushed (10%%) "
                   "or this many devices (3) were rejected, rolled back or timed out "
                   "(default: 10%%)")
    p.add_argument("--min-agreement", type=float, default=0.6, metavar="F1",
                   help="stop when the canaries' median shadow agreement (update.shadow.f1) "
                   "is under this (default: 0.6; skipped when no canary reports one)")
    p.add_argument("--wave-timeout", type=_timeout, default=1800.0, metavar="DURATION",
                   help="a device not finished this long after its wave was pushed counts "
                   "as failed (default: 30m)")
    p.add_argument("--url", action="append", default=[], dest="urls", metavar="URL",
                   help="an https:// location of the artifact beside the MQTT chunks")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the rollout retained on the broker (after a crash or a "
                      "closed laptop); no device is pushed twice")
    mode.add_argument("--watch", action="store_true",
                      help="follow a rollout someone else runs, without pushing anything")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="no live table; the final summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    devices: list[str] | None = None
    if args.devices is not None:
        devices = read_devices(args.devices)
    elif args.device_ids:
        devices = list(args.device_ids)
    options = Options(args.canary, args.wave_factor, args.max_failed, args.min_agreement,
                      args.wave_timeout)
    return rollout(args.release_json, args.broker, devices=devices, options=options,
                   resume=args.resume, watch=args.watch, as_json=args.as_json,
                   urls=args.urls, ca=args.ca, cert=args.cert, key=args.tls_key,
                   username=args.username, password=args.password, prefix=args.prefix,
                   timeout_s=args.timeout)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _max_failed(text: str) -> MaxFailed:
    try:
        return MaxFailed.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-failed ")) from None


def _timeout(text: str) -> float:
    from agent.schema import parse_duration

    try:
        seconds = parse_duration(text, "--wave-timeout")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, got {text!r}"
                                         ) from None
    return seconds


# -- text -----------------------------------------------------------------------------------


def _counts(counts: Counter[str], pending: int) -> str:
    order = ["waiting", "downloading", "verifying", "trial", "shadow", "probation",
             "committed", "rejected", "rolled_back", "timed_out", "cancelled"]
    keys = [k for k in order if counts[k]] + sorted(k for k in counts if k not in order)
    parts = [f"{k} {counts[k]}" for k in keys]
    if pending:
        parts.append(f"not yet pushed {pending}")
    return ", ".join(parts) or "nothing pushed yet"


def _summary_text(s: dict[str, Any]) -> str:
    head = f"rollout {s['name']} {s['version']}: {s['status']}"
    if s["status"] != "succeeded":
        head += f" in wave {s['wave']} of {len(s['waves'])}"
    if s["reason"]:
        head += f": {s['reason']}"
    counts = Counter({k: v for k, v in s["counts"].items()})
    lines = [head,
             f"  waves: {', '.join(map(str, s['waves']))}; pushed to {s['pushed']} of "
             f"{s['devices']} devices",
             f"  {_counts(counts, s['never_pushed'])}"]
    if s["never_pushed"] and s["status"] != "succeeded":
        lines.append(f"  {s['never_pushed']} devices never got the release")
    if s["cancelled"]:
        lines.append(f"  told to drop it (empty retained deploy): {_few(s['cancelled'])}")
    a = s["agreement"]
    lines.append("  canary agreement: " + Agreement(a["median"], a["reported"],
                                                    a["canaries"], a["gate"]).text())
    if s["failures"]:
        lines.append("  failures:")
        lines += [f"    {f['device']} {f['state']}: {f['reason']}" for f in s["failures"]]
    return "\n".join(lines)


def _few(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _owner_text(raw: bytes | None) -> str | None:
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return f"pid {d['pid']} on {d['host']} (since {time.ctime(float(d['since']))})"
    except (ValueError, KeyError, TypeError):
        return raw[:80].decode(errors="replace")


def _clock(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def _duration(s: float) -> str:
    for unit, n in (("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:g}{unit}"
    return f"{s:g} s"
