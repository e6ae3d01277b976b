"""The agent: one TaskGroup owning every long-lived task, and an orderly shutdown.

    local broker --Inbound--> dispatch --> pipeline tasks --> outbox (group commit)
        ^                                                     |        |
        +---------------- PUBACK once committed --------------+        v
                                                 uplink sender --> next hop

SIGTERM or SIGINT stops intake, lets in-flight work finish within
`service.grace_s`, commits, acknowledges, publishes `offline` and returns.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import time
from typing import Any

from agent import __version__, memory, systemd
from agent.actions import registry
from agent.config import Config, PipelineConfig
from agent.delivery.outbox import Outbox
from agent.delivery.uplink import KEY_PROPERTY, Sender
from agent.errors import AgentError
from agent.messages import Message
from agent.mqtt import codec, topics
from agent.mqtt.connection import Connection, Inbound, Will
from agent.pipeline import Action, ActionContext, Pipeline
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

PIPELINE_RESTART_S = 1.0
READY_WAIT_LOCAL_S = 10.0
ROUTE_CACHE_SIZE = 10_000  # topics whose matching pipelines are remembered


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.telemetry = Telemetry()
        self.boot_id = secrets.token_hex(4)
        self.prefix = cfg.device.prefix
        self.device = cfg.device.id
        self.status_topic = topics.status(self.prefix, self.device)
        self.outbox = Outbox(cfg.data_dir, cfg.outbox, self.telemetry)
        self.pipelines: dict[str, Pipeline] = {}
        self.routes: list[tuple[str, Pipeline]] = []
        self._route_cache: dict[str, list[Pipeline]] = {}
        self.accepting = True
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.state = "online"
        self.started = time.monotonic()
        self.local = Connection(
            "local", cfg.local, cfg.client_id("local"), self.telemetry,
            subscriptions=self._subscriptions(), on_message=self._dispatch,
            receive_maximum=max(100, min(65535, sum(p.queue for p in cfg.pipelines) or 100)),
            clean_start=False)
        self.outbox.intake = self.local  # sparse input: read once per commit interval
        self.uplink = Connection(
            "uplink", cfg.uplink, cfg.client_id("uplink"), self.telemetry,
            will=Will(self.status_topic, self._status_doc("offline")),
            birth=lambda: Will(self.status_topic, self._status_doc(self.state)),
            on_connected=self._uplink_up, on_lost=self._uplink_lost, clean_start=False,
            max_packet_bytes=_uplink_max_packet(cfg))
        self.sender: Sender | None = None
        self.models: Any = None  # agent.vision.hub.ModelHub, when a pipeline detects
        if any(s.action == "detect" for p in cfg.pipelines for s in p.steps):
            from agent.vision.hub import ModelHub  # numpy and OpenCV: only for models
            from agent.vision.models import ModelStore

            self.models = ModelHub(ModelStore(cfg.data_dir, models_dir=cfg.models_dir),
                                   cfg.runtime, self.telemetry)
        self.ota: Any = None  # agent.ota.controller.Controller when [ota] keys are given
        if cfg.ota.enabled:
            from agent.ota.controller import Controller  # loads the trusted keys: ConfigError

            self.ota = Controller(cfg, self.uplink, self.outbox.submit, self.models,
                                  self.telemetry)

    # -- building --------------------------------------------------------------

    def _subscriptions(self) -> tuple[tuple[str, int], ...]:
        """Topic filters of all MQTT triggers, without filters another one covers.

        Overlapping subscriptions would make the broker deliver a message twice.
        """
        subs: dict[str, int] = {}
        for p in self.cfg.pipelines:
            if p.trigger.topic is not None:
                subs[p.trigger.topic] = max(subs.get(p.trigger.topic, 0), p.trigger.qos)
        kept = {
            f: q for f, q in subs.items()
            if not any(g != f and _covers(g, f) for g in subs)
        }
        for f, q in subs.items():  # a covered filter's QoS lifts its cover's
            for g, kq in list(kept.items()):
                if g != f and _covers(g, f):
                    kept[g] = max(kq, q)
        return tuple(sorted(kept.items()))

    def _build_pipeline(self, pcfg: PipelineConfig) -> Pipeline:
        seq = itertools.count(1)
        actions: list[Action] = []
        for i, step in enumerate(pcfg.steps):
            ctx = ActionContext(
                device=self.device, prefix=self.prefix, pipeline=pcfg.name, step=i,
                data_dir=self.cfg.data_dir, runtime=self.cfg.runtime, camera=self.cfg.camera,
                boot_id=self.boot_id, telemetry=self.telemetry, next_seq=seq.__next__,
                service=self.cfg.service, models_dir=self.cfg.models_dir, models=self.models)
            spec = registry.lookup(step.action, f"pipeline {pcfg.name} step {i}")
            actions.append(spec.build(step.params, ctx))
        p = Pipeline(pcfg, actions, self.telemetry, self.outbox.submit,
                     room=self.outbox.wait_room)
        p.room_now = self.outbox.has_room
        p.save_state = self.outbox.save_state
        return p

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop()`), then shut down within the grace period."""
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        await self.outbox.open()
        if self.ota is not None:  # before models load: a crash loop switches back here
            self.ota.prepare()
        states = await self.outbox.states()
        for pcfg in self.cfg.pipelines:
            p = self._build_pipeline(pcfg)
            p.restore(states)
            self.pipelines[p.name] = p
            if pcfg.trigger.topic is not None:
                self.routes.append((pcfg.trigger.topic, p))
        self.sender = Sender(self.outbox, self.uplink, self.cfg.outbox.inflight)
        try:
            exporter = None
            if self.cfg.telemetry.prometheus is not None:  # prometheus_client loads only then
                from agent import prometheus

                exporter = prometheus.start(self.cfg, self.telemetry, self.boot_id)
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.outbox.run(), name="outbox"),
                    tg.create_task(self.sender.run(), name="uplink-sender"),
                    tg.create_task(self.uplink.run(), name="uplink"),
                    tg.create_task(self.local.run(), name="local"),
                    tg.create_task(self._telemetry_loop(), name="telemetry"),
                    tg.create_task(systemd.watchdog_loop(), name="watchdog"),
                ]
                if exporter is not None:
                    tasks.append(tg.create_task(exporter.serve(), name="prometheus"))
                if self.ota is not None:
                    tasks.append(tg.create_task(self.ota.run(), name="ota"))
                for p in self.pipelines.values():
                    tasks.append(tg.create_task(self._supervise(p), name=f"pipeline:{p.name}"))
                    trig = p.cfg.trigger
                    if trig.camera is not None:
                        tasks.append(tg.create_task(self._camera(p), name=f"camera:{p.name}"))
                    elif trig.every_s is not None:
                        tasks.append(tg.create_task(self._timer(p, float(trig.every_s)),
                                                    name=f"timer:{p.name}"))
                # READY once the sensor bus is subscribed (bounded: a broker that is down at
                # boot must not fail the unit; the connection keeps retrying meanwhile).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.local.connected.wait(), READY_WAIT_LOCAL_S)
                memory.page_out_start_up()
                self.ready.set()
                systemd.ready(f"pipelines: {', '.join(self.pipelines) or 'none'}")
                log.info("fogwhisk %s ready in %.0f ms: device %s, pipelines %s", __version__,
                         (time.monotonic() - self.started) * 1000, self.device,
                         ", ".join(self.pipelines) or "none")
                await self.stopping.wait()
                systemd.stopping()
                await self._drain()
                for t in tasks:
                    t.cancel()
        finally:
            for p in self.pipelines.values():
                p.close()
            await self.outbox.close()
            log.info("fogwhisk stopped")

    def stop(self) -> None:
        self.stopping.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_signal(sig: signal.Signals) -> None:
            if self.stopping.is_set():
                log.warning("second %s: exiting now", sig.name)
                os._exit(1)
            log.info("%s: stopping intake, draining within %.0f s", sig.name,
                     self.cfg.service.grace_s)
            self.stopping.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)

    async def _drain(self) -> None:
        """Stop intake, finish in-flight work, commit, ack, say offline; bounded by grace_s."""
        self.accepting = False
        deadline = time.monotonic() + float(self.cfg.service.grace_s)
        while time.monotonic() < deadline and any(
                not p.queue.empty() or p.busy for p in self.pipelines.values()):
            await asyncio.sleep(0.02)
        with contextlib.suppress(AgentError):
            await self.outbox.flush()  # commits the last rows, then acknowledges their inputs
        while time.monotonic() < deadline and self.sender is not None \
                and self.sender.inflight and self.uplink.connected.is_set():
            await asyncio.sleep(0.02)
        with contextlib.suppress(AgentError):
            await self.outbox.flush()  # records the deliveries just acknowledged
        await self.local.close()
        await self.uplink.close(last=Will(self.status_topic, self._status_doc("offline")))

    async def _supervise(self, p: Pipeline) -> None:
        """A crashed pipeline is logged with its traceback and restarted; the agent stays up."""
        while True:
            try:
                await p.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pipeline %s crashed; restarting in %.0f s", p.name,
                              PIPELINE_RESTART_S)
                self.telemetry.pipeline(p.name).inc("restarts")
                p.busy = False
                await asyncio.sleep(PIPELINE_RESTART_S)

    def _dispatch(self, inbound: Inbound) -> None:
        """Route a local message to every pipeline whose trigger matches; ack once all are done."""
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to the next session
        targets = self._route_cache.get(inbound.topic)
        if targets is None:
            targets = [p for f, p in self.routes if topics.matches(f, inbound.topic)]
            if len(self._route_cache) >= ROUTE_CACHE_SIZE:
                self._route_cache.clear()  # a burst of new topics: start over, stay bounded
            self._route_cache[inbound.topic] = targets
        if not targets:
            inbound.ack()
            return
        msg = Message(inbound.topic, inbound.payload, time.time())
        if inbound.properties is not None:  # a relayed reading's key: forward key = "keep"
            for name, value in inbound.properties.get(codec.USER_PROPERTY, ()):
                if name == KEY_PROPERTY:
                    msg.meta[KEY_PROPERTY] = value
        if len(targets) == 1:
            targets[0].offer(msg, inbound.ack if inbound.qos else None)
            return
        remaining = [len(targets)]

        def done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                inbound.ack()
        for p in targets:
            p.offer(msg, done if inbound.qos else None)

    async def _camera(self, p: Pipeline) -> None:
        from agent.vision import camera  # OpenCV is only imported when a camera is configured

        async for msg in camera.frames(p.cfg.trigger, self.cfg.camera, self.telemetry, p.name):
            if not self.accepting:
                return
            # Latest frame wins: a frame waiting behind a newer one is stale.
            while not p.queue.empty():
                p.queue.get_nowait()
                self.telemetry.pipeline(p.name).inc("frames_dropped")
            p.offer(msg, None)

    async def _timer(self, p: Pipeline, every_s: float) -> None:
        while self.accepting:
            await asyncio.sleep(every_s)
            now = time.time()
            p.offer(Message(f"timer/{p.name}", b"", now, data={"ts": now}), None)

    # -- uplink state, status, telemetry -----------------------------------------

    def _uplink_up(self) -> None:
        if self.sender is not None:
            self.sender.connected()

    def _uplink_lost(self) -> None:
        if self.sender is not None:
            self.sender.connection_lost()

    def _status_doc(self, state: str) -> bytes:
        doc: dict[str, Any] = {
            "state": state, "device": self.device, "version": __version__,
            "boot": self.boot_id, "pipelines": [p.name for p in self.cfg.pipelines],
            "ts": round(time.time(), 3),
        }
        runtime = self.telemetry.components.get("runtime")
        if runtime is not None and runtime.values.get("degraded"):
            doc["reason"] = "model runtime on a fallback"
        uplink = getattr(self, "uplink", None)  # None while the will is made
        if uplink is not None:  # the endpoint in use (a cluster has several)
            doc["endpoint"], doc["protocol"] = uplink.where, uplink.protocol
        return json.dumps(doc, separators=(",", ":")).encode()

    def _current_state(self) -> str:
        runtime = self.telemetry.components.get("runtime")
        return "degraded" if runtime is not None and runtime.values.get("degraded") else "online"

    async def _telemetry_loop(self) -> None:
        topic = topics.telemetry(self.prefix, self.device)
        while True:
            await asyncio.sleep(float(self.cfg.telemetry.interval_s))
            state = self._current_state()
            if not self.uplink.connected.is_set():
                continue
            try:
                if state != self.state:
                    self.state = state
                    self.uplink.publish(self.status_topic, self._status_doc(state), 1, True)
                doc = self.telemetry.document(self.device)
                doc["boot"] = self.boot_id
                self.uplink.publish(topic, json.dumps(doc, separators=(",", ":"),
                                                      default=str).encode(), 0, True)
            except AgentError as exc:
                log.debug("telemetry not sent: %s", exc)


def _uplink_max_packet(cfg: Config) -> int | None:
    """Room for OTA artifact chunks on the uplink (else its default, sized for acks)."""
    if not cfg.ota.enabled:
        return None
    from agent.ota.fetch import UPLINK_MAX_PACKET_BYTES

    return UPLINK_MAX_PACKET_BYTES


def _covers(general: str, specific: str) -> bool:
    """True when every topic matching `specific` also matches `general`."""
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(s) or s[i] == "#":
            return False
        if level != "+" and (level != s[i] or s[i] == "+"):
            return False
    return len(g) == len(s)


async def run(cfg: Config) -> None:
    agent = Agent(cfg)
    try:
        await agent.run()
    except Exception as exc:
        # `fogwhisk run` reports any failure in one line. One after start-up is a bug
        # or a broken machine, not a config: its traceback goes to the journal too.
        if agent.ready.is_set() and _unexpected(exc):
            log.exception("fogwhisk failed while running")
        raise


def _unexpected(exc: BaseException) -> bool:
    """True unless every cause (a TaskGroup wraps them) is one the agent itself raised."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_unexpected(e) for e in exc.exceptions)
    return not isinstance(exc, AgentError)
