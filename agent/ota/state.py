"""One model's update as a pure state machine: no I/O, no clock, tested table-driven.

    (idle) --Offer--> downloading --Advance--> verifying --Advance--> trial
    trial --Swapped--> probation --Commit / probation over--> committed
    trial --Advance--> shadow (policy.shadow set) --Swapped--> probation
    downloading | verifying | trial | shadow --Fail / deadline--> rejected
    probation --RollBack (degraded, crash loop)--> rolled_back

Every unfinished state has a deadline (`Tick` past it leaves the state: rejected,
or committed for a probation nobody faulted), so nothing stays "in progress"
forever. A fresh release replaces an unfinished older one (except during
probation, where the candidate already runs: it is deferred until probation
ends). Versions rejected for what they contain, or rolled back, are
remembered: a release must be higher than the active version and than every
one of those (rollback and replay attacks). A release refused before its
signature was trusted never blocks a version: anyone could send one.

In `shadow` the candidate runs beside the active model on live frames; its
comparison summary (`ShadowReport`) stays with the update (`update.shadow` in the
report, `f1` the figure a fleet rollout reads) through probation and the outcome.
Its deadline is the policy's `max_duration` plus a margin: the controller decides
at `max_duration` on what it has; the deadline only catches a controller that did not.
The one state without a deadline: shadow in `observe` mode, which by design lasts
until a newer release or an empty deploy replaces it.

`step(state, event) -> state` bumps `seq` on every change; `document()` is
the retained state report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.errors import OtaError

State = Literal["downloading", "verifying", "trial", "shadow", "probation", "committed",
                "rejected", "rolled_back"]
UNFINISHED: tuple[State, ...] = ("downloading", "verifying", "trial", "shadow", "probation")
STATES: tuple[State, ...] = (*UNFINISHED, "committed", "rejected", "rolled_back")
CRASH_LOOP_STARTS = 3  # agent starts during one probation that mean a crash loop
Verdict = Literal["accept", "duplicate", "defer", "refuse"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long each unfinished state may last (seconds)."""

    download_s: float = 3600.0
    verify_s: float = 600.0
    trial_s: float = 300.0
    probation_s: float = 600.0
    shadow_s: float | None = 1800.0 + 60.0  # max_duration and a margin; None: observe mode

    def of(self, state: State) -> float | None:
        return {"downloading": self.download_s, "verifying": self.verify_s,
                "trial": self.trial_s, "shadow": self.shadow_s,
                "probation": self.probation_s}.get(state)


@dataclass(frozen=True, slots=True)
class Installed:
    """A version on disk that ran (or runs) as the active model."""

    version: int
    sha256: str  # of the model file
    since: float


@dataclass(frozen=True, slots=True)
class Update:
    """The update in hand, or the outcome of the last one."""

    version: int | None  # None: a document too broken to name one
    state: State
    since: float  # wall-clock time the state was entered: deadlines survive a restart
    deadline: float | None = None
    progress: float | None = None  # 0..1 while downloading
    reason: str | None = None
    release: str = ""  # sha256 of the release document: its identity
    shadow: dict[str, Any] | None = None  # the shadow comparison's summary, once there is one

    @property
    def unfinished(self) -> bool:
        return self.state in UNFINISHED


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    active: Installed | None = None
    previous: Installed | None = None
    update: Update | None = None
    refused: frozenset[int] = frozenset()  # rejected for their contents, or rolled back
    starts: int = 0  # agent starts during the current probation (the crash-loop counter)
    seq: int = 0
    ts: float = 0.0

    @property
    def busy(self) -> bool:
        return self.update is not None and self.update.unfinished

    @property
    def floor(self) -> int:
        """A release must be higher than this."""
        return max([self.active.version if self.active else 0, *self.refused])


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """A release whose signature, expiry and name checked out."""

    version: int
    release: str
    now: float
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True, slots=True)
class Refuse:
    """A release refused before it was trusted (bad signature, expired, not JSON ...)."""

    version: int | None
    reason: str
    now: float
    release: str = ""  # sha256 of the document: a redelivered one is recognised


@dataclass(frozen=True, slots=True)
class Progress:
    fraction: float
    now: float


@dataclass(frozen=True, slots=True)
class Advance:
    """downloading -> verifying -> trial -> shadow."""

    to: Literal["verifying", "trial", "shadow"]
    now: float
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """The shadow comparison so far (or its final figures)."""

    summary: dict[str, Any]
    now: float


@dataclass(frozen=True, slots=True)
class Swapped:
    """The candidate is active now: probation starts."""

    installed: Installed
    now: float
    probation_s: float


@dataclass(frozen=True, slots=True)
class Fail:
    """The update cannot go on; `remember`: the release itself is bad, never take it again."""

    reason: str
    now: float
    remember: bool = True


@dataclass(frozen=True, slots=True)
class RollBack:
    """The candidate failed in probation: the previous version is active again."""

    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Commit:
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Boot:
    """The agent started: counts starts during probation; the third rolls back."""

    now: float


@dataclass(frozen=True, slots=True)
class Adopt:
    """What is on disk (active, previous) when nothing else knows: first start, no state."""

    active: Installed | None
    previous: Installed | None
    now: float


Event = (Offer | Refuse | Progress | Advance | ShadowReport | Swapped | Fail | RollBack
         | Commit | Tick | Boot | Adopt)


def verdict(s: ModelState, version: int, release: str) -> tuple[Verdict, str]:
    """What to do with a trusted release of `version`, and why when refused."""
    u = s.update
    if u is not None and u.release == release and (u.unfinished or u.state == "committed"):
        return "duplicate", "already in hand"
    if s.active is not None and version <= s.active.version:
        if u is not None and u.release == release:
            return "duplicate", "already handled"
        return "refuse", (f"version {version} is not higher than the active version "
                          f"{s.active.version}")
    worst = max(s.refused, default=0)
    if version <= worst:
        if u is not None and u.release == release:
            return "duplicate", "already handled"
        return "refuse", (f"version {version} is not higher than version {worst}, which "
                          "this device rejected or rolled back")
    if u is not None and u.unfinished:
        if u.state == "probation":
            return "defer", f"version {u.version} is in probation"
        if u.version is not None and version <= u.version:
            return "refuse", f"version {version} is not higher than version {u.version} " \
                             f"in {u.state}"
    return "accept", ""


def step(s: ModelState, e: Event) -> ModelState:
    """The state after `e`; OtaError for an event the state cannot take."""
    new = _step(s, e)
    if new == s:
        return s
    return replace(new, seq=s.seq + 1, ts=e.now)


def _step(s: ModelState, e: Event) -> ModelState:
    u = s.update
    if isinstance(e, Offer):
        what, _ = verdict(s, e.version, e.release)
        if what != "accept":
            return s  # the controller reports refusals with Refuse, holds deferred ones
        return replace(s, update=Update(e.version, "downloading", e.now,
                                        e.now + e.timeouts.download_s, 0.0, None, e.release))
    if isinstance(e, Refuse):
        if s.busy:
            return s  # an untrusted document never displaces the update in hand
        return replace(s, update=Update(e.version, "rejected", e.now, reason=e.reason,
                                        release=e.release))
    if isinstance(e, Tick):
        if u is None or u.deadline is None or not u.unfinished or e.now < u.deadline:
            return s
        if u.state == "probation":
            return _commit(s, e.now)
        return _finish(s, "rejected", f"timed out in {u.state} after "
                                      f"{u.deadline - u.since:.0f} s", e.now,
                       remember=u.state not in ("downloading", "shadow"))
    if isinstance(e, Boot):
        if u is not None and u.state == "probation":
            starts = s.starts + 1
            if starts >= CRASH_LOOP_STARTS:
                return _roll_back(replace(s, starts=starts), "crash loop: the agent started "
                                  f"{starts} times during probation", e.now)
            return replace(s, starts=starts)
        return replace(s, starts=0)
    if isinstance(e, Adopt):
        if s.active is not None:
            return s
        return replace(s, active=e.active, previous=e.previous)
    if u is None or not u.unfinished:
        raise OtaError(f"model {s.name}: {type(e).__name__} without an update in progress")
    if isinstance(e, Progress):
        _expect(s, u, "downloading", e)
        return replace(s, update=replace(u, progress=min(max(e.fraction, 0.0), 1.0)))
    if isinstance(e, Advance):
        before: dict[str, State] = {"verifying": "downloading", "trial": "verifying",
                                    "shadow": "trial"}
        _expect(s, u, before[e.to], e)
        timeout = e.timeouts.of(e.to)
        return replace(s, update=replace(u, state=e.to, since=e.now, progress=None,
                                         deadline=None if timeout is None else e.now + timeout))
    if isinstance(e, ShadowReport):
        _expect(s, u, "shadow", e)
        return replace(s, update=replace(u, shadow=dict(e.summary)))
    if isinstance(e, Swapped):
        if u.state != "shadow":
            _expect(s, u, "trial", e)
        if e.installed.version != u.version:
            raise OtaError(f"model {s.name}: swapped to {e.installed.version}, the update is "
                           f"{u.version}")
        return replace(s, active=e.installed, previous=s.active, starts=0,
                       update=replace(u, state="probation", since=e.now,
                                      deadline=e.now + e.probation_s))
    if isinstance(e, Fail):
        if u.state == "probation":
            raise OtaError(f"model {s.name}: a failure in probation is a RollBack")
        return _finish(s, "rejected", e.reason, e.now, e.remember)
    if isinstance(e, RollBack):
        _expect(s, u, "probation", e)
        return _roll_back(s, e.reason, e.now)
    _expect(s, u, "probation", e)  # Commit
    return _commit(s, e.now)


def _expect(s: ModelState, u: Update, state: State, e: Event) -> None:
    if u.state != state:
        raise OtaError(f"model {s.name}: {type(e).__name__} in {u.state}, expected {state}")


def _finish(s: ModelState, state: State, reason: str | None, now: float,
            remember: bool) -> ModelState:
    u = s.update
    assert u is not None
    refused = s.refused | {u.version} if remember and u.version is not None else s.refused
    return replace(s, refused=refused, update=Update(u.version, state, now, reason=reason,
                                                     release=u.release, shadow=u.shadow))


def _commit(s: ModelState, now: float) -> ModelState:
    return replace(_finish(s, "committed", None, now, remember=False), starts=0)


def _roll_back(s: ModelState, reason: str, now: float) -> ModelState:
    back = s.previous
    rolled = _finish(s, "rolled_back", reason, now, remember=True)
    if back is None:  # nothing to go back to: the candidate stays, refused for the future
        return replace(rolled, starts=0)
    return replace(rolled, active=replace(back, since=now), previous=None, starts=0)


# -- the report and its persisted form ---------------------------------------------


def document(s: ModelState) -> dict[str, Any]:
    """The retained state report on fog/<device>/models/<name>/state."""
    u = s.update
    return {
        "name": s.name,
        "active": None if s.active is None else {
            "version": s.active.version, "sha256": s.active.sha256,
            "since": round(s.active.since, 3)},
        "previous": None if s.previous is None else {"version": s.previous.version},
        "update": None if u is None else {
            "version": u.version, "state": u.state,
            "progress": None if u.progress is None else round(u.progress, 3),
            "reason": u.reason, "ts": round(u.since, 3),
            **({} if u.shadow is None else {"shadow": u.shadow})},
        "seq": s.seq,
        "ts": round(s.ts, 3),
    }


def to_json(s: ModelState) -> dict[str, Any]:
    def inst(i: Installed | None) -> dict[str, Any] | None:
        return None if i is None else {"version": i.version, "sha256": i.sha256,
                                       "since": i.since}
    u = s.update
    return {
        "name": s.name, "active": inst(s.active), "previous": inst(s.previous),
        "update": None if u is None else {
            "version": u.version, "state": u.state, "since": u.since, "deadline": u.deadline,
            "progress": u.progress, "reason": u.reason, "release": u.release,
            "shadow": u.shadow},
        "refused": sorted(s.refused), "starts": s.starts, "seq": s.seq, "ts": s.ts,
    }


def from_json(raw: dict[str, Any]) -> ModelState:
    """The persisted state; KeyError/TypeError/ValueError when it is not one."""
    def inst(d: dict[str, Any] | None) -> Installed | None:
        return None if d is None else Installed(int(d["version"]), str(d["sha256"]),
                                                float(d["since"]))
    u = raw["update"]
    update = None
    if u is not None:
        if u["state"] not in STATES:
            raise ValueError(f"unknown state {u['state']!r}")
        update = Update(None if u["version"] is None else int(u["version"]), u["state"],
                        float(u["since"]),
                        None if u["deadline"] is None else float(u["deadline"]),
                        None if u["progress"] is None else float(u["progress"]),
                        u["reason"], str(u["release"]), _shadow(u.get("shadow")))
    return ModelState(str(raw["name"]), inst(raw["active"]), inst(raw["previous"]), update,
                      frozenset(int(v) for v in raw["refused"]), int(raw["starts"]),
                      int(raw["seq"]), float(raw["ts"]))


def _shadow(raw: object) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("update.shadow is not an object")
    return raw
