"""One update of one model: download, verify, install, trial, [shadow], swap.

Each step persists its state (`agent.ota.ledger`) before acting on it, so a kill
-9 anywhere resumes: a download from its saved progress, verification and trial
from the verified artifact, a swap that reached the disk as probation. Every
failure is a state with a one-line reason; the active model keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config
from agent.errors import FetchError, ModelError, OtaError, ReleaseError
from agent.ota import fetch, trial
from agent.ota.install import Consumer, install
from agent.ota.ledger import Ledger
from agent.ota.probation import Probation
from agent.ota.release import Release
from agent.ota.shadowing import Shadowing
from agent.ota.state import Advance, Fail, Installed, Swapped
from agent.ota.store import VersionStore
from agent.telemetry import Counters
from agent.vision.models import Manifest, ModelStore

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.detector import Detector
    from agent.vision.hub import ModelHub

log = logging.getLogger(__name__)


class Updater:
    """Drives updates to their end; `finished(name, clean)` frees what one held."""

    def __init__(self, cfg: Config, ledger: Ledger, store: VersionStore, models: ModelStore,
                 hub: ModelHub | None, consumers: dict[str, list[Consumer]],
                 fetchers: list[fetch.Fetcher], probation: Probation, counters: Counters,
                 finished: Callable[[str, bool], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.store = store
        self.models = models
        self.hub = hub
        self.consumers = consumers
        self.fetchers = fetchers
        self.probation = probation
        self.counters = counters
        self.finished = finished
        self.shadowing = Shadowing(hub, ledger, store, self.fail) if hub is not None else None
        self.progress: dict[str, float] = {}  # a download's share done, for the next report

    async def run(self, name: str, r: Release) -> None:
        """Download, verify, install, trial and swap; every failure a state with a reason.

        Resumed after a restart from whichever state was persisted: the download picks up
        its saved progress (or finds the artifact complete), verification and
        installation are repeated from the artifact, the trial runs again.
        """
        ledger = self.ledger
        t = ledger.timeouts(r)
        try:
            tar = await fetch.fetch_any(r, self.store.incoming, self.fetchers,
                                        lambda have, size: self._progress(name, have, size))
            if ledger.state(name) == "downloading":
                await ledger.apply(name, Advance("verifying", time.time(), t))
            manifest = await asyncio.to_thread(self._verify, name, r, tar)
            if ledger.state(name) == "verifying":
                await ledger.apply(name, Advance("trial", time.time(), t))
            active = await asyncio.to_thread(self.models.resolve, name, False)
            result = await trial.run_trial(
                self.store.version_dir(name, r.version), fallback=self.cfg.runtime.fallback,
                num_threads=self.cfg.runtime.num_threads,
                timeout_s=float(self.cfg.ota.trial_timeout),
                max_latency_ratio=r.policy.max_latency_ratio,
                baseline=(active.directory, active.path),
                min_golden_recall=r.policy.min_golden_recall,
                min_golden_precision=r.policy.min_golden_precision)
            log.info("ota: model %s: version %d passed its trial (p50 %.1f ms, p95 %.1f ms, "
                     "active p95 %s ms)", name, r.version, result.p50_ms, result.p95_ms,
                     result.baseline_p95_ms)
            self.probation.baseline_ms[name] = result.baseline_p95_ms
            policy = r.policy.shadow_policy
            if policy is not None and self.shadowing is not None:
                passed = await self.shadowing.run(name, r, policy)
                if passed is None:
                    return
                await self._swap(name, r, manifest, passed)
            else:
                await self._swap(name, r, manifest)
        except asyncio.CancelledError:
            raise
        except FetchError as exc:  # the transfer, not the release: the version stays open
            await self.fail(name, r, f"download failed: {exc.reason}", remember=False)
        except ReleaseError as exc:
            await self.fail(name, r, exc.reason, remember=True)
        except (OtaError, ModelError, OSError) as exc:
            await self.fail(name, r, f"{type(exc).__name__}: {exc}", remember=False)
        except Exception as exc:  # a bug must not take the agent down: say it, go on
            log.exception("ota: model %s: update to version %d failed", name, r.version)
            await self.fail(name, r, f"internal error: {exc!r}", remember=False)

    def _progress(self, name: str, have: int, size: int) -> None:
        self.progress[name] = have / size if size else 1.0

    def _verify(self, name: str, r: Release, tar: Path) -> Manifest:
        """Extract, check against the release and the pipelines, install (blocking)."""
        return install(self.store, self.models, self.hub, self.consumers.get(name, []),
                       name, r, tar)

    async def _swap(self, name: str, r: Release, manifest: Manifest,
                    loaded: list[Detector] | None = None) -> None:
        ref = await asyncio.to_thread(self.store.ref, name, r.version)
        detectors: list[Detector] = loaded or []
        if self.hub is not None and loaded is None:
            try:
                detectors = await asyncio.to_thread(self.hub.load, name, ref)
            except ModelError as exc:
                raise ReleaseError(f"cannot load in the agent: {exc}") from exc
        now = time.time()
        s = self.ledger.states[name]
        prev = s.active.version if s.active is not None else None
        # Disk first: a restart after this line runs the new version (and reconciles).
        await asyncio.to_thread(self.store.switch, name, r.version, prev)
        if self.hub is not None:
            self.probation.old[name] = self.hub.swap(name, detectors)
        probation_s = self.ledger.probation_s(r)
        await self.ledger.apply(name, Swapped(Installed(r.version, manifest.sha256, now), now,
                                              probation_s))
        self.counters.inc("swapped")
        log.info("ota: model %s: version %d is live; probation %.0f s", name, r.version,
                 probation_s)

    async def fail(self, name: str, r: Release, reason: str, remember: bool) -> None:
        """Reject the update in hand with `reason`; `remember`: the version is refused
        from now on (its files go)."""
        if self.ledger.state(name) not in ("downloading", "verifying", "trial", "shadow"):
            return  # already over (a deadline passed); a failure in probation is a rollback
        self.counters.inc("rejected")
        log.warning("ota: model %s: version %d rejected: %s", name, r.version, reason)
        await self.ledger.apply(name, Fail(reason, time.time(), remember))
        if remember:
            await asyncio.to_thread(self.store.discard, name, r.version)
        # A transfer that failed keeps its partial file: the same release, delivered
        # again (at the next connect), resumes it.
        await self.finished(name, remember)
