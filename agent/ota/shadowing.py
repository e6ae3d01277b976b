"""Driving a candidate in shadow: beside the active model on live frames, in the hub.

After its trial, a release with `policy.shadow` has its candidate loaded into the
hub in shadow: it runs on every k-th live frame after the active model (at most
`max_share` of its inference time), its detections only compared. At `frames`
evaluated frames, or at `max_duration` on what there is, the comparison
(`agent.ota.shadow`) decides: the loaded candidate goes on to the swap, or the
update is rejected with the figures. `mode = "observe"` never promotes: one
summary per `interval` goes on <prefix>/<device>/models/<name>/shadow (and in the
state report) until a newer release or an empty deploy cancels it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from agent.errors import ModelError, ReleaseError
from agent.messages import Outgoing
from agent.ota import shadow
from agent.ota.ledger import STATE_PRIORITY, Ledger
from agent.ota.release import Release
from agent.ota.state import Advance, ShadowReport
from agent.ota.store import VersionStore

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.detector import Detector
    from agent.vision.hub import ModelHub, ShadowFrame

log = logging.getLogger(__name__)

SHADOW_POLL_S = 0.25  # the shadow comparison's frames are counted this often
OBSERVE_LIMIT = 100_000  # observe mode: frames kept per interval at most
SHADOW_REPORT_S = 5.0  # the summary so far goes in the state report at most this often

# The controller's rejection of an update: (name, release, reason, remember).
Fail = Callable[[str, Release, str, bool], Awaitable[None]]


class Shadowing:
    """Runs candidates in shadow in the agent's hub and judges them."""

    def __init__(self, hub: ModelHub, ledger: Ledger, store: VersionStore, fail: Fail) -> None:
        self.hub = hub
        self.ledger = ledger
        self.store = store
        self.fail = fail

    async def run(self, name: str, r: Release,
                  policy: shadow.ShadowPolicy) -> list[Detector] | None:
        """The candidate beside the active model on live frames until `policy.frames` were
        compared or `max_duration` passed; its detectors (loaded) when it passed, None when
        the update was rejected."""
        ledger = self.ledger
        if ledger.state(name) == "trial":
            await ledger.apply(name, Advance("shadow", time.time(), ledger.timeouts(r)))
        u = ledger.states[name].update
        started = u.since if u is not None else time.time()  # a restart keeps the deadline
        ref = await asyncio.to_thread(self.store.ref, name, r.version)
        try:
            candidates = await asyncio.to_thread(self.hub.load, name, ref)
        except ModelError as exc:
            raise ReleaseError(f"cannot load in the agent: {exc}") from exc
        from agent.vision.hub import ShadowRun  # numpy, OpenCV: only where a hub exists
        observe = policy.mode == "observe"
        self.hub.start_shadow(name, candidates, ShadowRun(
            r.version, lambda a, c: shadow.every(a, c, policy.max_share),
            OBSERVE_LIMIT if observe else policy.frames))
        passed = False
        try:
            if observe:
                await self._observe(name, r, policy)  # until cancelled
                return None
            reported, counted = time.monotonic(), 0
            while True:
                frames = self.hub.shadow_frames(name)
                now = time.time()
                if len(frames) >= policy.frames or now >= started + policy.max_duration_s:
                    break
                if len(frames) != counted and time.monotonic() - reported >= SHADOW_REPORT_S:
                    counted, reported = len(frames), time.monotonic()
                    await ledger.apply(name, ShadowReport(summary(frames).to_json(), now))
                await asyncio.sleep(SHADOW_POLL_S)
            result = summary(frames)
            await ledger.apply(name, ShadowReport(result.to_json(), time.time()))
            why = shadow.judge(result, policy)
            if why is not None:
                await self.fail(name, r, why, not why.startswith("not enough frames"))
                return None
            log.info("ota: model %s: version %d passed shadow: %s", name, r.version,
                     result.to_json())
            passed = True
        finally:
            taken = await asyncio.to_thread(self.hub.stop_shadow, name)
            if not passed:
                for d in taken:
                    d.close()
        return taken

    async def _observe(self, name: str, r: Release, policy: shadow.ShadowPolicy) -> None:
        """Champion/challenger: one summary per interval, published and reported; never
        promoted (a newer release or an empty deploy cancels this)."""
        ledger = self.ledger
        device = ledger.device
        topic = f"{ledger.prefix}/{device}/models/{name}/shadow"
        self.hub.take_shadow_frames(name)
        while True:
            start = time.time()
            await asyncio.sleep(policy.interval_s)
            result = summary(self.hub.take_shadow_frames(name)).to_json()
            now = time.time()
            s = ledger.states[name]
            doc = {"name": name, "version": r.version,
                   "active": s.active.version if s.active is not None else None,
                   "mode": "observe", "from": round(start, 3), "to": round(now, 3), **result}
            ledger.submit([Outgoing(topic, json.dumps(doc, separators=(",", ":")).encode(),
                                    f"{device}:ota:{name}:shadow:{now:.3f}", "ota",
                                    priority=STATE_PRIORITY, qos=1, retain=False,
                                    created=now)], None)
            await ledger.apply(name, ShadowReport(result, now))


def summary(frames: list[ShadowFrame]) -> shadow.Summary:
    """The comparison of the frames the hub ran both models on."""
    return shadow.summarize([
        shadow.Frame(tuple(shadow.Seen(d.label, d.score, d.box) for d in f.active),
                     tuple(shadow.Seen(d.label, d.score, d.box) for d in f.candidate),
                     f.active_ms, f.candidate_ms, f.error) for f in frames])
