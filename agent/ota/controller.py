"""The device's OTA controller: one long-lived task in the agent's TaskGroup.

    <prefix>/<device>/models/<name>/deploy  (retained, QoS 1, on the uplink)
      -> release verified (signatures, expiry, name, size, version) before any download
      -> downloading (MQTT chunks or HTTPS, resumable) -> verifying (safe extraction,
         contents, compatibility with the pipelines that run the model) -> installed
      -> trial (child process) -> [shadow: beside the active model on live frames]
      -> swapped between two frames -> probation -> committed
    <prefix>/<device>/models/<name>/state   (retained, QoS 1, through the outbox)

The transitions are `agent.ota.state`'s; this module does what they stand for and
persists each state before acting on it, so a kill -9 anywhere resumes: a download
from its saved progress, verification and trial from the verified artifact, a swap
that reached the disk as probation. `prepare()` runs before the pipelines load their
models: it counts the start (a crash loop in probation switches back to `previous`
there, before the candidate is loaded again) and reconciles the state with the disk.

With `policy.shadow` in the release, the candidate that passed its trial is
loaded into the hub in shadow: it runs on every k-th live frame after the active
model (at most `max_share` of its inference time), its detections only compared.
At `frames` evaluated frames, or at `max_duration` on what there is, the
comparison (`agent.ota.shadow`) decides: the already loaded candidate is swapped
in, or the update is rejected with the figures; the summary is `update.shadow`
in the state report. `mode = "observe"` never promotes: the candidate stays in
shadow, one summary per `interval` goes on <prefix>/<device>/models/<name>/shadow
(and in the state report), until a newer release or an empty deploy ends it.

Probation is watched every second: the candidate's error rate and p95 (from the
model hub) against the release's policy; past either, the previous version, still
loaded, is swapped back live. Every failure is a state with a one-line reason; the
active model keeps running throughout.

This module starts, takes the deploys and watches the deadlines; the rest is in
`ledger` (states persisted and reported), `update` (one update driven to its end),
`install` (extraction, compatibility), `shadowing` and `probation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config
from agent.errors import ModelError, OtaError, ReleaseError
from agent.messages import Done, Outgoing
from agent.mqtt.connection import Connection, Inbound
from agent.ota import fetch, release
from agent.ota.install import consumers
from agent.ota.ledger import Ledger
from agent.ota.probation import Probation
from agent.ota.release import Release
from agent.ota.state import (
    Adopt,
    Boot,
    Event,
    Fail,
    Installed,
    ModelState,
    Offer,
    Progress,
    Refuse,
    RollBack,
    Swapped,
    Tick,
    step,
    verdict,
)
from agent.ota.store import VersionStore, write_atomic
from agent.ota.update import Updater
from agent.telemetry import Telemetry
from agent.vision.models import ModelStore

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.hub import ModelHub

log = logging.getLogger(__name__)

TICK_S = 1.0  # deadlines, progress reports and probation are looked at this often
STALL_S = 60.0  # a download without a new byte for this long fails
MAX_INBOX = 64  # models with a deploy waiting; beyond, a deploy is refused unread
CANCELLED = "cancelled by the operator"  # an empty deploy: the release was withdrawn


class Controller:
    """Updates the models the pipelines run; see the module docstring."""

    def __init__(self, cfg: Config, uplink: Connection,
                 submit: Callable[[list[Outgoing], Done | None], None],
                 hub: ModelHub | None, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.keys = release.load_public_keys([Path(k) for k in cfg.ota.keys])  # ConfigError
        self.uplink = uplink
        self.submit = submit
        self.hub = hub
        self.counters = telemetry.component("ota")
        self.models = hub.store if hub is not None else ModelStore(
            cfg.data_dir, models_dir=cfg.models_dir)
        self.store = VersionStore(cfg.data_dir, cfg.models_dir)
        self.consumers = consumers(cfg)
        self.prefix = cfg.device.prefix
        self.device = cfg.device.id
        self.https = fetch.HttpsFetcher(_https_ca(cfg), STALL_S)
        self.fetchers: list[fetch.Fetcher] = [
            self.https, fetch.MqttChunkFetcher(uplink, self.prefix, STALL_S)]
        self.ledger = Ledger(cfg, self.store, self.keys, submit)
        self.states: dict[str, ModelState] = self.ledger.states  # the same dict
        self.probation = Probation(hub, self.ledger, self.store, self.counters)
        self.updater = Updater(cfg, self.ledger, self.store, self.models, hub, self.consumers,
                               self.fetchers, self.probation, self.counters, self._finished)
        self.releases: dict[str, Release] = {}  # the release of each unfinished update
        self.work: dict[str, asyncio.Task[None]] = {}
        self.deferred: dict[str, bytes] = {}  # a release waiting for probation to end
        self.inbox: dict[str, tuple[bytes, list[Callable[[], None]]]] = {}
        self._wake: asyncio.Event | None = None
        self._tg: asyncio.TaskGroup | None = None

    # -- start -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Before the pipelines load their models: recover the disk, count this start,
        roll back a crash loop, reconcile the persisted state with what is active."""
        self.store.recover()
        now = time.time()
        for name in self.consumers:
            s = self.store.load_state(name) or ModelState(name)
            s = self._reconcile(s, now)
            before = s
            s = step(step(s, Boot(now)), Tick(now))  # a deadline may have passed meanwhile
            if s.update is not None and s.update.state == "rolled_back" and \
                    before.update is not None and before.update.state == "probation":
                log.error("ota: model %s: %s; starting on version %s", name, s.update.reason,
                          s.active.version if s.active else "?")
                if s.active is not None:
                    self.store.switch(name, s.active.version, None)
                self.counters.inc("rolled_back")
            self.states[name] = s
            if s != before or s.seq == 0:
                self.store.save_state(s)
            self.ledger.publish(s)
            if s.busy:  # its policy (probation) or what to resume (the others)
                r = self.ledger.read_release(name)
                if r is not None:
                    self.releases[name] = r
            else:
                self.store.prune(name)
            raw = self.ledger.read_deferred(name)
            if raw is not None:
                self.deferred[name] = raw
        self._clean_incoming()

    def _reconcile(self, s: ModelState, now: float) -> ModelState:
        name = s.name
        if s.active is None:
            try:
                ref = self.models.resolve(name, check=False)
            except ModelError as exc:
                log.error("ota: model %s: %s", name, exc)
                return s
            prev = self.store.previous(name)
            prev_inst = None
            if prev is not None:
                with contextlib.suppress(OtaError):
                    m = self.store.ref(name, prev).manifest
                    prev_inst = Installed(prev, m.sha256, now)
            s = step(s, Adopt(Installed(ref.manifest.version, ref.manifest.sha256, now),
                              prev_inst, now))
        u = s.update
        disk = self.store.active(name)
        if u is not None and u.state == "trial" and u.version is not None and disk == u.version:
            # The switch reached the disk, the state did not: the swap happened.
            r = self.ledger.read_release(name)
            m = self.store.ref(name, u.version).manifest
            s = step(s, Swapped(Installed(u.version, m.sha256, now), now,
                                self.ledger.probation_s(r)))
        elif u is not None and u.state == "probation" and disk != u.version:
            s = step(s, RollBack("rolled back; the agent stopped before it was recorded", now))
        return s

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe to deploys, resume unfinished updates, then serve until cancelled."""
        self._wake = asyncio.Event()
        deploy = f"{self.prefix}/{self.device}/models/+/deploy"
        # Loading the system's CA store takes tens of ms: not on the loop, mid-download.
        await asyncio.to_thread(self.https._tls)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self.uplink.subscribe(((deploy, 1),), self._on_deploy)
                for name, s in self.states.items():
                    if s.busy and s.update is not None and s.update.state != "probation":
                        r = self.releases.get(name)
                        if r is None:
                            await self._apply(name, Fail("the release document was lost",
                                                         time.time(), remember=False))
                        else:
                            self._start(name, r)
                for name, raw in list(self.deferred.items()):
                    if not self.states[name].busy:
                        self._queue(name, raw, [])
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), TICK_S)
                    self._wake.clear()
                    while self.inbox:
                        name = next(iter(self.inbox))
                        payload, acks = self.inbox.pop(name)
                        await self._handle(name, payload)
                        for ack in acks:  # the outcome is persisted: the broker may forget it
                            ack()
                    await self._tick(time.time())
        finally:
            self._tg = None
            self.probation.close_all()

    def _on_deploy(self, msg: Inbound) -> None:
        name = msg.topic.split("/")[-2]
        if name not in self.inbox and len(self.inbox) >= MAX_INBOX:
            log.warning("ota: %d models have a deploy waiting; %s refused unread",
                        len(self.inbox), msg.topic)
            msg.ack()
            return
        self._queue(name, msg.payload, [msg.ack])

    def _queue(self, name: str, payload: bytes, acks: list[Callable[[], None]]) -> None:
        """The latest deploy of a model wins; the earlier ones are acknowledged with it."""
        _, earlier = self.inbox.get(name, (b"", []))
        self.inbox[name] = (payload, earlier + acks)
        if self._wake is not None:
            self._wake.set()

    async def _handle(self, name: str, payload: bytes) -> None:
        if not payload:  # the operator withdrew the release (a rollout that stopped)
            if name in self.states:
                await self._drop(name)
            return
        now = time.time()
        digest = hashlib.sha256(payload).hexdigest()
        if name not in self.consumers:
            self.counters.inc("refused")
            log.warning("ota: a release for model %r, which no pipeline of this device runs "
                        "(it runs: %s); ignored", name[:80],
                        ", ".join(sorted(self.consumers)) or "none")
            return
        s = self.states[name]
        if s.update is not None and s.update.release == digest:
            return  # redelivered (a retained deploy comes again at every connect)
        try:
            r = release.parse_and_verify(
                payload, topic_name=name, keys=self.keys, threshold=self.cfg.ota.threshold,
                max_bytes=self.cfg.ota.max_model_bytes, now=datetime.now(UTC))
        except ReleaseError as exc:
            await self._refuse(name, _claimed_version(payload), exc.reason, now, digest)
            return
        what, why = verdict(s, r.version, digest)
        if what == "duplicate":
            return
        if what == "refuse":
            await self._refuse(name, r.version, why, now, digest)
            return
        if what == "defer":
            self.deferred[name] = payload
            await asyncio.to_thread(write_atomic, self.ledger.path(name, "deferred"), payload)
            log.info("ota: model %s: version %d waits: %s", name, r.version, why)
            return
        await self._cancel(name)
        self.deferred.pop(name, None)
        self.ledger.path(name, "deferred").unlink(missing_ok=True)
        doc = json.dumps({"accepted": now, "doc": payload.decode()}).encode()
        await asyncio.to_thread(write_atomic, self.ledger.path(name, "release"), doc)
        await self._apply(name, Offer(r.version, digest, now, self.ledger.timeouts(r)))
        self._start(name, r)

    async def _drop(self, name: str) -> None:
        """An empty deploy: the newest release of the model is withdrawn. One waiting for
        probation to end is forgotten; an update in hand ends `rejected` (the version is
        not blocked: a later push resumes it), or in probation `rolled_back`."""
        waiting = self.deferred.pop(name, None)
        if waiting is not None:
            self.ledger.path(name, "deferred").unlink(missing_ok=True)
            log.warning("ota: model %s: version %s dropped (it waited for probation to end): "
                        "%s", name, _claimed_version(waiting), CANCELLED)
            return
        u = self.states[name].update
        if u is None or not u.unfinished:
            return
        version = u.version
        if u.state != "probation":
            await self._cancel(name)
            u = self.states[name].update  # it may have ended or swapped before it stopped
            if u is None or not u.unfinished:
                return
        s = self.states[name]
        if u.state == "probation":
            if await self.probation.roll_back(name, CANCELLED):
                await self._finished(name)
            return
        if s.active is not None and \
                await asyncio.to_thread(self.store.active, name) == version:
            # Stopped between the switch on disk and the hub: the old version still runs.
            await asyncio.to_thread(self.store.switch, name, s.active.version,
                                    s.previous.version if s.previous else None)
        log.warning("ota: model %s: version %s dropped: %s", name, version, CANCELLED)
        self.counters.inc("rejected")
        await self._apply(name, Fail(CANCELLED, time.time(), remember=False))
        await self._finished(name, clean=False)

    async def _refuse(self, name: str, version: int | None, reason: str, now: float,
                      digest: str) -> None:
        self.counters.inc("refused")
        log.warning("ota: model %s: release%s refused: %s", name,
                    f" {version}" if version is not None else "", reason)
        await self._apply(name, Refuse(version, reason, now, digest))

    def _start(self, name: str, r: Release) -> None:
        assert self._tg is not None
        self.releases[name] = r
        self.work[name] = self._tg.create_task(self.updater.run(name, r),
                                               name=f"ota:{name}:{r.version}")

    async def _cancel(self, name: str) -> None:
        task = self.work.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- probation and deadlines ---------------------------------------------------------

    async def _tick(self, now: float) -> None:
        for name in list(self.states):
            s = self.states[name]
            if not s.busy or s.update is None:
                continue
            progress = self.updater.progress
            if s.update.state == "downloading" and name in progress:
                s = await self._apply(name, Progress(progress.pop(name), now))
            if s.update is not None and s.update.state == "probation":
                why = self.probation.degraded(s, self.releases.get(s.name))
                if why is not None:
                    if await self.probation.roll_back(name, why):
                        await self._finished(name)
                    continue
            after = await self._apply(name, Tick(now))
            if after.update is not None and not after.update.unfinished:
                if after.update.state == "committed":
                    self.counters.inc("committed")
                    log.info("ota: model %s: version %s committed", name, after.update.version)
                    self.probation.close_old(name)
                    await asyncio.to_thread(self.store.prune, name)
                else:  # a deadline passed
                    log.warning("ota: model %s: %s", name, after.update.reason)
                    await self._cancel(name)
                await self._finished(name)

    async def _finished(self, name: str, clean: bool = True) -> None:
        """An update ended: free what it held; a release that waited goes next."""
        self.releases.pop(name, None)
        self.work.pop(name, None)
        self.updater.progress.pop(name, None)
        if clean:
            await asyncio.to_thread(self._clean_incoming)
        raw = self.deferred.pop(name, None)
        self.ledger.path(name, "deferred").unlink(missing_ok=True)
        if raw is not None:
            self._queue(name, raw, [])

    # -- state, reports, files (`agent.ota.ledger`) ----------------------------------------

    async def _apply(self, name: str, e: Event) -> ModelState:
        return await self.ledger.apply(name, e)

    def _clean_incoming(self) -> None:
        self.ledger.clean_incoming(self.releases)


def _https_ca(cfg: Config) -> Path | None:
    """What verifies HTTPS locations: [ota] ca, else the uplink's CA, else the system's."""
    ca = cfg.ota.ca or cfg.uplink.ca
    return Path(ca) if ca else None


def _claimed_version(payload: bytes) -> int | None:
    """The version an untrusted document claims, for the report only."""
    try:
        v = json.loads(payload)["signed"]["version"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 else None
