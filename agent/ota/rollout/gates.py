"""The gates and the decision: what the rollout does next about the wave in hand.

It stops itself when

  - the failed devices (rejected, rolled back, timed out) reach --max-failed of the devices
    pushed so far: the share of the finished ones is then at least as high, whatever the
    others still do (decided as soon as it is certain, at the latest when the wave ends);
  - the canaries' median shadow agreement (`update.shadow.f1` of their reports) is under
    --min-agreement (no canary reporting one: the gate is skipped, the summary says so).

Pure: `judge` reads the record and the fleet's counters, and decides.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.ota.rollout.fleet import DONE

if TYPE_CHECKING:
    from agent.ota.rollout.fleet import Fleet
    from agent.ota.rollout.record import Record


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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `judge` decided: wait, time out `devices`, abort (the reason), next wave, done."""

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
