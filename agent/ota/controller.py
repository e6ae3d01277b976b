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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import FetchError, ModelError, OtaError, ReleaseError
from agent.messages import Done, Outgoing
from agent.mqtt.connection import Connection, Inbound
from agent.ota import artifact, fetch, release, shadow, trial
from agent.ota.release import Release
from agent.ota.state import (
    Adopt,
    Advance,
    Boot,
    Event,
    Fail,
    Installed,
    ModelState,
    Offer,
    Progress,
    Refuse,
    RollBack,
    ShadowReport,
    Swapped,
    Tick,
    Timeouts,
    document,
    step,
    verdict,
)
from agent.ota.store import VersionStore, write_atomic
from agent.telemetry import Telemetry
from agent.vision.models import Manifest, ModelStore

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.detector import Detector
    from agent.vision.hub import ModelHub, ShadowFrame

log = logging.getLogger(__name__)

STATE_PRIORITY = 10  # the state report's outbox lane: ahead of events, dropped last
TICK_S = 1.0  # deadlines, progress reports and probation are looked at this often
MIN_FRAMES = 20  # probation judges a version on at least this many frames
DOWNLOAD_S = 3600.0
VERIFY_S = 600.0
TRIAL_STATE_S = 300.0  # the trial child has its own, shorter, `trial_timeout`
STALL_S = 60.0  # a download without a new byte for this long fails
MAX_INBOX = 64  # models with a deploy waiting; beyond, a deploy is refused unread
SHADOW_POLL_S = 0.25  # the shadow comparison's frames are counted this often
OBSERVE_LIMIT = 100_000  # observe mode: frames kept per interval at most
SHADOW_REPORT_S = 5.0  # the summary so far goes in the state report at most this often
CANCELLED = "cancelled by the operator"  # an empty deploy: the release was withdrawn


@dataclass(frozen=True, slots=True)
class Consumer:
    """A detect step that runs the model: what it needs of a new version."""

    pipeline: str
    labels: tuple[str, ...]


def consumers(cfg: Config) -> dict[str, list[Consumer]]:
    out: dict[str, list[Consumer]] = {}
    for p in cfg.pipelines:
        for s in p.steps:
            if s.action == "detect":
                out.setdefault(s.params.model, []).append(Consumer(p.name, s.params.labels))
    return out


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
        self.states: dict[str, ModelState] = {}
        self.releases: dict[str, Release] = {}  # the release of each unfinished update
        self.work: dict[str, asyncio.Task[None]] = {}
        self.old: dict[str, list[Detector | None]] = {}  # the previous version, still loaded
        self.baseline_ms: dict[str, float | None] = {}  # the trial's p95 of the active model
        self.progress: dict[str, float] = {}
        self.deferred: dict[str, bytes] = {}  # a release waiting for probation to end
        self.inbox: dict[str, tuple[bytes, list[Callable[[], None]]]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
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
            self._publish(s)
            if s.busy:  # its policy (probation) or what to resume (the others)
                r = self._read_release(name)
                if r is not None:
                    self.releases[name] = r
            else:
                self.store.prune(name)
            raw = self._read_deferred(name)
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
            r = self._read_release(name)
            m = self.store.ref(name, u.version).manifest
            s = step(s, Swapped(Installed(u.version, m.sha256, now), now,
                                self._probation_s(r)))
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
            for old in self.old.values():
                for d in old:
                    if d is not None:
                        d.close()

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
            await asyncio.to_thread(write_atomic, self._path(name, "deferred"), payload)
            log.info("ota: model %s: version %d waits: %s", name, r.version, why)
            return
        await self._cancel(name)
        self.deferred.pop(name, None)
        self._path(name, "deferred").unlink(missing_ok=True)
        doc = json.dumps({"accepted": now, "doc": payload.decode()}).encode()
        await asyncio.to_thread(write_atomic, self._path(name, "release"), doc)
        await self._apply(name, Offer(r.version, digest, now, self._timeouts(r)))
        self._start(name, r)

    async def _drop(self, name: str) -> None:
        """An empty deploy: the newest release of the model is withdrawn. One waiting for
        probation to end is forgotten; an update in hand ends `rejected` (the version is
        not blocked: a later push resumes it), or in probation `rolled_back`."""
        waiting = self.deferred.pop(name, None)
        if waiting is not None:
            self._path(name, "deferred").unlink(missing_ok=True)
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
            await self._roll_back(name, CANCELLED)
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
        self.work[name] = self._tg.create_task(self._update(name, r),
                                               name=f"ota:{name}:{r.version}")

    async def _cancel(self, name: str) -> None:
        task = self.work.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- one update --------------------------------------------------------------------

    async def _update(self, name: str, r: Release) -> None:
        """Download, verify, install, trial and swap; every failure a state with a reason.

        Resumed after a restart from whichever state was persisted: the download picks up
        its saved progress (or finds the artifact complete), verification and
        installation are repeated from the artifact, the trial runs again.
        """
        t = self._timeouts(r)
        try:
            tar = await fetch.fetch_any(r, self.store.incoming, self.fetchers,
                                        lambda have, size: self._progress(name, have, size))
            if self._state(name) == "downloading":
                await self._apply(name, Advance("verifying", time.time(), t))
            manifest = await asyncio.to_thread(self._verify, name, r, tar)
            if self._state(name) == "verifying":
                await self._apply(name, Advance("trial", time.time(), t))
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
            self.baseline_ms[name] = result.baseline_p95_ms
            policy = r.policy.shadow_policy
            if policy is not None and self.hub is not None:
                passed = await self._shadow(name, r, policy)
                if passed is None:
                    return
                await self._swap(name, r, manifest, passed)
            else:
                await self._swap(name, r, manifest)
        except asyncio.CancelledError:
            raise
        except FetchError as exc:  # the transfer, not the release: the version stays open
            await self._fail(name, r, f"download failed: {exc.reason}", remember=False)
        except ReleaseError as exc:
            await self._fail(name, r, exc.reason, remember=True)
        except (OtaError, ModelError, OSError) as exc:
            await self._fail(name, r, f"{type(exc).__name__}: {exc}", remember=False)
        except Exception as exc:  # a bug must not take the agent down: say it, go on
            log.exception("ota: model %s: update to version %d failed", name, r.version)
            await self._fail(name, r, f"internal error: {exc!r}", remember=False)

    def _progress(self, name: str, have: int, size: int) -> None:
        self.progress[name] = have / size if size else 1.0

    def _verify(self, name: str, r: Release, tar: Path) -> Manifest:
        """Extract, check against the release and the pipelines, install (blocking)."""
        dest = self.store.incoming / f"{name}-{r.version}.d"
        shutil.rmtree(dest, ignore_errors=True)
        artifact.extract(tar, dest, max_total_bytes=r.artifact_size)
        manifest = artifact.check_contents(dest, r)
        self._check_compatible(name, r, manifest)
        if self.store.active(name) is None:  # the first update: what runs becomes a version
            self.store.adopt(name, self.models.resolve(name))
        self.store.install(name, r.version, dest)
        shutil.rmtree(dest, ignore_errors=True)
        return manifest

    def _check_compatible(self, name: str, r: Release, manifest: Manifest) -> None:
        """The candidate must fit the pipelines built around the active model."""
        users = ", ".join(c.pipeline for c in self.consumers.get(name, []))
        current = self.models.resolve(name, check=False).manifest
        det = None
        if self.hub is not None:
            det = next((sl.detector for sl in self.hub.slots.get(name, [])
                        if sl.detector is not None), None)
        if det is not None:
            for kind, want, got in (("input", det.model.inputs, r.inputs),
                                    ("output", det.model.outputs, r.outputs)):
                want_t = [{"shape": list(ti.shape), "dtype": str(ti.dtype)} for ti in want]
                if [dict(g) for g in got] != want_t:
                    raise ReleaseError(f"incompatible {kind} tensors: the release's model has "
                                       f"{_tensors(got)}, pipeline {users} runs on "
                                       f"{_tensors(want_t)}")
        if (tuple(manifest.input.size), manifest.input.dtype) != \
                (tuple(current.input.size), current.input.dtype):
            raise ReleaseError(f"incompatible input: {_wxh(manifest.input.size)} "
                               f"{manifest.input.dtype}, pipeline {users} runs on "
                               f"{_wxh(current.input.size)} {current.input.dtype}")
        for i, label in enumerate(current.labels):
            new = manifest.labels[i] if i < len(manifest.labels) else None
            if new != label:
                raise ReleaseError(f"incompatible labels: class {i} is {label!r} in the active "
                                   f"model, {new!r} in the release (pipeline {users} reads "
                                   f"class ids by these labels)")

    async def _shadow(self, name: str, r: Release,
                      policy: shadow.ShadowPolicy) -> list[Detector] | None:
        """The candidate beside the active model on live frames until `policy.frames` were
        compared or `max_duration` passed; its detectors (loaded) when it passed, None when
        the update was rejected."""
        assert self.hub is not None
        if self._state(name) == "trial":
            await self._apply(name, Advance("shadow", time.time(), self._timeouts(r)))
        u = self.states[name].update
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
                    await self._apply(name, ShadowReport(_summary(frames).to_json(), now))
                await asyncio.sleep(SHADOW_POLL_S)
            summary = _summary(frames)
            await self._apply(name, ShadowReport(summary.to_json(), time.time()))
            why = shadow.judge(summary, policy)
            if why is not None:
                await self._fail(name, r, why, remember=not why.startswith("not enough frames"))
                return None
            log.info("ota: model %s: version %d passed shadow: %s", name, r.version,
                     summary.to_json())
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
        assert self.hub is not None
        topic = f"{self.prefix}/{self.device}/models/{name}/shadow"
        self.hub.take_shadow_frames(name)
        while True:
            start = time.time()
            await asyncio.sleep(policy.interval_s)
            summary = _summary(self.hub.take_shadow_frames(name)).to_json()
            now = time.time()
            s = self.states[name]
            doc = {"name": name, "version": r.version,
                   "active": s.active.version if s.active is not None else None,
                   "mode": "observe", "from": round(start, 3), "to": round(now, 3), **summary}
            self.submit([Outgoing(topic, json.dumps(doc, separators=(",", ":")).encode(),
                                  f"{self.device}:ota:{name}:shadow:{now:.3f}", "ota",
                                  priority=STATE_PRIORITY, qos=1, retain=False,
                                  created=now)], None)
            await self._apply(name, ShadowReport(summary, now))

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
        s = self.states[name]
        prev = s.active.version if s.active is not None else None
        # Disk first: a restart after this line runs the new version (and reconciles).
        await asyncio.to_thread(self.store.switch, name, r.version, prev)
        if self.hub is not None:
            self.old[name] = self.hub.swap(name, detectors)
        await self._apply(name, Swapped(Installed(r.version, manifest.sha256, now), now,
                                        self._probation_s(r)))
        self.counters.inc("swapped")
        log.info("ota: model %s: version %d is live; probation %.0f s", name, r.version,
                 self._probation_s(r))

    async def _fail(self, name: str, r: Release, reason: str, remember: bool) -> None:
        if self._state(name) not in ("downloading", "verifying", "trial", "shadow"):
            return  # already over (a deadline passed); a failure in probation is a rollback
        self.counters.inc("rejected")
        log.warning("ota: model %s: version %d rejected: %s", name, r.version, reason)
        await self._apply(name, Fail(reason, time.time(), remember))
        if remember:
            await asyncio.to_thread(self.store.discard, name, r.version)
        # A transfer that failed keeps its partial file: the same release, delivered
        # again (at the next connect), resumes it.
        await self._finished(name, clean=remember)

    # -- probation and deadlines ---------------------------------------------------------

    async def _tick(self, now: float) -> None:
        for name in list(self.states):
            s = self.states[name]
            if not s.busy or s.update is None:
                continue
            if s.update.state == "downloading" and name in self.progress:
                s = await self._apply(name, Progress(self.progress.pop(name), now))
            if s.update is not None and s.update.state == "probation":
                why = self._degraded(s)
                if why is not None:
                    await self._roll_back(name, why)
                    continue
            after = await self._apply(name, Tick(now))
            if after.update is not None and not after.update.unfinished:
                if after.update.state == "committed":
                    self.counters.inc("committed")
                    log.info("ota: model %s: version %s committed", name, after.update.version)
                    await self._close_old(name)
                    await asyncio.to_thread(self.store.prune, name)
                else:  # a deadline passed
                    log.warning("ota: model %s: %s", name, after.update.reason)
                    await self._cancel(name)
                await self._finished(name)

    def _degraded(self, s: ModelState) -> str | None:
        """Why the candidate in probation must go, or None while it holds up."""
        if self.hub is None or s.active is None or s.update is None:
            return None
        r = self.releases.get(s.name)
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

    async def _roll_back(self, name: str, reason: str) -> None:
        s = self.states[name]
        if s.previous is None:
            return
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
        await self._apply(name, RollBack(reason, time.time()))
        self.counters.inc("rolled_back")
        await asyncio.to_thread(self.store.prune, name)
        await self._finished(name)

    async def _close_old(self, name: str) -> None:
        for d in self.old.pop(name, []):
            if d is not None:
                d.close()

    async def _finished(self, name: str, clean: bool = True) -> None:
        """An update ended: free what it held; a release that waited goes next."""
        self.releases.pop(name, None)
        self.work.pop(name, None)
        self.progress.pop(name, None)
        if clean:
            await asyncio.to_thread(self._clean_incoming)
        raw = self.deferred.pop(name, None)
        self._path(name, "deferred").unlink(missing_ok=True)
        if raw is not None:
            self._queue(name, raw, [])

    # -- state, reports, files ---------------------------------------------------------

    async def _apply(self, name: str, e: Event) -> ModelState:
        """Step the machine, persist the new state, then report it."""
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:
            s = self.states.get(name) or ModelState(name)
            new = step(s, e)
            if new is s:
                return s
            self.states[name] = new
            await asyncio.to_thread(self.store.save_state, new)
            self._publish(new)
            return new

    def _publish(self, s: ModelState) -> None:
        topic = f"{self.prefix}/{self.device}/models/{s.name}/state"
        payload = json.dumps(document(s), separators=(",", ":")).encode()
        self.submit([Outgoing(topic, payload, f"{self.device}:ota:{s.name}:{s.seq}", "ota",
                              priority=STATE_PRIORITY, qos=1, retain=True,
                              created=time.time())], None)

    def _state(self, name: str) -> str | None:
        u = self.states[name].update
        return u.state if u is not None else None

    def _timeouts(self, r: Release | None) -> Timeouts:
        sp = r.policy.shadow_policy if r is not None else None
        return Timeouts(download_s=DOWNLOAD_S, verify_s=VERIFY_S,
                        trial_s=max(TRIAL_STATE_S, float(self.cfg.ota.trial_timeout) + 60.0),
                        probation_s=self._probation_s(r),
                        shadow_s=None if sp is not None and sp.mode == "observe" else
                        (sp or shadow.ShadowPolicy()).max_duration_s + 60.0)

    def _probation_s(self, r: Release | None) -> float:
        if r is not None and r.policy.probation_s is not None:
            return float(r.policy.probation_s)
        return float(self.cfg.ota.probation)

    def _path(self, name: str, what: str) -> Path:
        self.store.ota_dir.mkdir(parents=True, exist_ok=True)
        return self.store.ota_dir / f"{name}.{what}.json"

    def _read_release(self, name: str) -> Release | None:
        """The persisted release of the update in hand, verified again as of its acceptance
        (it may have expired since: that was checked when it arrived)."""
        try:
            saved = json.loads(self._path(name, "release").read_bytes())
            return release.parse_and_verify(
                saved["doc"].encode(), topic_name=name, keys=self.keys,
                threshold=self.cfg.ota.threshold, max_bytes=self.cfg.ota.max_model_bytes,
                now=datetime.fromtimestamp(float(saved["accepted"]), UTC))
        except (OSError, ValueError, KeyError, TypeError, ReleaseError) as exc:
            log.error("ota: model %s: the saved release is unusable: %s", name, exc)
            return None

    def _read_deferred(self, name: str) -> bytes | None:
        try:
            return self._path(name, "deferred").read_bytes()
        except OSError:
            return None

    def _clean_incoming(self) -> None:
        """Remove downloads and extractions no unfinished update needs."""
        if not self.store.incoming.is_dir():
            return
        keep = set()
        for n, r in self.releases.items():
            if self.states[n].busy:
                keep |= {r.artifact_sha256, f"{n}-{r.version}"}
        for item in self.store.incoming.iterdir():
            if item.name.split(".")[0] in keep:
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def _summary(frames: list[ShadowFrame]) -> shadow.Summary:
    return shadow.summarize([
        shadow.Frame(tuple(shadow.Seen(d.label, d.score, d.box) for d in f.active),
                     tuple(shadow.Seen(d.label, d.score, d.box) for d in f.candidate),
                     f.active_ms, f.candidate_ms, f.error) for f in frames])


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


def _tensors(ts: Any) -> str:
    return ", ".join(f"{list(t['shape'])} {t['dtype']}" for t in ts)


def _wxh(size: Any) -> str:
    return f"{size[0]}x{size[1]}"
