"""Probation: the swapped-in version watched live, and the way back to the previous one.

Every second (the controller's tick) the candidate's error rate and p95 latency,
from the model hub, are held against the release's policy; the p95 against the
previous version's on the same frames, or else the trial's figure for the model
that was active. Past either limit the previous version, still loaded (else
loaded again from its verified directory), is swapped back live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from agent.ota import release, trial
from agent.ota.ledger import Ledger
from agent.ota.release import Release
from agent.ota.state import ModelState, RollBack
from agent.ota.store import VersionStore
from agent.telemetry import Counters

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.detector import Detector
    from agent.vision.hub import ModelHub

log = logging.getLogger(__name__)

MIN_FRAMES = 20  # probation judges a version on at least this many frames


class Probation:
    """The candidates on probation, and the previous versions kept loaded beside them."""

    def __init__(self, hub: ModelHub | None, ledger: Ledger, store: VersionStore,
                 counters: Counters) -> None:
        self.hub = hub
        self.ledger = ledger
        self.store = store
        self.counters = counters
        self.old: dict[str, list[Detector | None]] = {}  # the previous version, still loaded
        self.baseline_ms: dict[str, float | None] = {}  # the trial's p95 of the active model

    def degraded(self, s: ModelState, r: Release | None) -> str | None:
        """Why the candidate in probation must go, or None while it holds up."""
        if self.hub is None or s.active is None or s.update is None:
            return None
        policy = r.policy if r is not None else release.Policy()
        h = self.hub.health(s.name, s.active.version)
        if h.frames < MIN_FRAMES:
            return None
        if h.error_rate > policy.max_error_rate:
            return (f"error rate {h.error_rate:.2f} over {h.frames} frames is above the "
                    f"policy's {policy.max_error_rate:g}")
        base: float | None = None
        if s.previous is not None:
            prev = self.hub.health(s.name, s.previous.version)
            base = prev.p95_ms if prev.frames >= MIN_FRAMES else None
        if base is None:
            base = self.baseline_ms.get(s.name)
        if h.p95_ms is not None and base is not None and \
                trial.too_slow(h.p95_ms, base, policy.max_latency_ratio):
            floor = "" if base >= trial.MIN_BASELINE_MS else \
                f" (counted as {trial.MIN_BASELINE_MS:g} ms)"
            return (f"p95 latency {h.p95_ms:.1f} ms is above {policy.max_latency_ratio:g} x "
                    f"the previous version's {base:.1f} ms{floor}")
        return None

    async def roll_back(self, name: str, reason: str) -> bool:
        """Swap the previous version back, live; False when there is none (nothing done).
        The caller ends the update (`Controller._finished`) after True."""
        s = self.ledger.states[name]
        if s.previous is None:
            return False
        version = s.previous.version
        log.error("ota: model %s: version %s rolled back to %d: %s", name,
                  s.active.version if s.active else "?", version, reason)
        # Never waits on the candidate: the previous detectors are still loaded (else
        # loaded from the verified version on disk).
        old = self.old.pop(name, None)
        if self.hub is not None and (old is None or any(d is None for d in old)):
            ref = await asyncio.to_thread(self.store.ref, name, version)
            old = list(await asyncio.to_thread(self.hub.load, name, ref))
        await asyncio.to_thread(self.store.switch, name, version, None)
        if self.hub is not None and old is not None:
            for d in self.hub.swap(name, [d for d in old if d is not None]):
                if d is not None:
                    d.close()
        await self.ledger.apply(name, RollBack(reason, time.time()))
        self.counters.inc("rolled_back")
        await asyncio.to_thread(self.store.prune, name)
        return True

    def close_old(self, name: str) -> None:
        """The candidate was committed: the previous version's detectors go."""
        for d in self.old.pop(name, []):
            if d is not None:
                d.close()

    def close_all(self) -> None:
        for old in self.old.values():
            for d in old:
                if d is not None:
                    d.close()
