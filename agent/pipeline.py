"""Pipelines: a trigger feeds messages through an ordered sequence of actions.

OpenWhisk's trigger -> rule -> action -> sequence, kept warm: each action is
built once at start and called per message. A step returns the messages
that go on (none: the message is dropped, a gate; several: a fan-out).
`Outgoing` values are terminal: they leave the pipeline for the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from agent.config import CameraConfig, PipelineConfig, RuntimeConfig, ServiceConfig
from agent.errors import PayloadError
from agent.messages import Done, Message, Outgoing
from agent.telemetry import Telemetry

if TYPE_CHECKING:  # relays never load the vision stack
    from agent.vision.hub import ModelHub

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action may know about its surroundings, fixed at build time."""

    device: str
    prefix: str
    pipeline: str
    step: int
    data_dir: Path
    runtime: RuntimeConfig
    camera: CameraConfig
    boot_id: str
    telemetry: Telemetry
    next_seq: Callable[[], int]  # per-pipeline event sequence
    service: ServiceConfig = field(default_factory=ServiceConfig)  # memory_max sizes decode
    models_dir: Path | None = None  # fetched and OTA models (Config.models_dir); None: data_dir's
    models: ModelHub | None = None  # the agent's live models (hot swap); None: the step's own


@runtime_checkable
class Action(Protocol):
    """A warm pipeline step. `blocking` actions run in a worker thread."""

    blocking: ClassVar[bool]

    def process(self, msg: Message) -> Sequence[Message | Outgoing]: ...


class Timed(Protocol):
    """An action that also emits on a clock (time windows, track timeouts)."""

    interval_s: float

    def tick(self, now: float) -> Sequence[Message | Outgoing]: ...


class Closable(Protocol):
    def close(self) -> None: ...


class Stateful(Protocol):
    """An action whose state must survive a crash (an open window): saved with the acks."""

    def snapshot(self) -> bytes: ...

    def restore(self, state: bytes) -> None: ...


_Item = tuple[list[Message], list[Outgoing], Done | None, float]  # one input in the line


@dataclass(frozen=True, slots=True)
class _Stage:
    step: int
    name: str
    fn: Callable[[Message], Sequence[Message | Outgoing]]
    blocking: bool


class Pipeline:
    """Runs one configured sequence; never lets a bad message stop it."""

    def __init__(self, cfg: PipelineConfig, actions: list[Action], telemetry: Telemetry,
                 emit: Callable[[list[Outgoing], Done | None], None],
                 room: Callable[[], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.actions = actions
        self.telemetry = telemetry
        self.emit = emit  # hands outputs to the outbox; `done` runs once they are durable
        self.room = room  # waits while the outbox refuses new rows (reject_new)
        self.room_now: Callable[[], bool] | None = None  # the same, without waiting
        # Saves step state durably, no later than the acks of what is emitted next.
        self.save_state: Callable[[dict[str, bytes]], None] | None = None
        self.stateful: list[tuple[int, Any]] = [
            (i, a) for i, a in enumerate(actions) if hasattr(a, "snapshot")]
        self.counters = telemetry.pipeline(cfg.name)
        self.queue: asyncio.Queue[tuple[Message, Done | None]] = asyncio.Queue()
        self.blocking = any(a.blocking for a in actions)
        self.busy = False  # a batch is being processed (shutdown waits for it)
        self.inline = not self.blocking
        self._executors: list[ThreadPoolExecutor] = []
        self._inflight = 0  # messages inside the assembly line (staged pipelines)
        self._step_names = [f"{i}:{s.action}" for i, s in enumerate(cfg.steps)]
        # The assembly line's stations: a step, or the sub-stages a step offers (detect
        # splits image preparation from inference so the two overlap on two cores).
        self._stages: list[_Stage] = []
        for i, a in enumerate(actions):
            subs = getattr(a, "stages", None)
            if subs:
                self._stages += [_Stage(i, f"{self._step_names[i]}.{label}", fn, a.blocking)
                                 for label, fn in subs]
            else:
                self._stages.append(_Stage(i, self._step_names[i], a.process, a.blocking))

    def _emit(self, outs: list[Outgoing], done: Done | None) -> None:
        if self.stateful and self.save_state is not None:
            self.save_state({f"{self.name}:{i}": a.snapshot() for i, a in self.stateful})
        self.emit(outs, done)

    def restore(self, states: dict[str, bytes]) -> None:
        """Give stateful steps what they saved before the last stop or crash."""
        for i, a in self.stateful:
            saved = states.get(f"{self.name}:{i}")
            if saved is not None:
                try:
                    a.restore(saved)
                except Exception:  # a state from another version: start empty, say so
                    log.exception("pipeline %s step %s: saved state unusable; starting empty",
                                  self.name, self._step_names[i])

    def offer(self, msg: Message, done: Done | None) -> None:
        """Take a message from the dispatcher.

        A pipeline of cheap steps with nothing queued runs the message right here, on
        the loop (no queue, no task switch: this is the relay's hot path); otherwise it
        queues. The queue is bounded by the broker's receive maximum.
        """
        if self.inline and not self.busy and self.queue.empty() and \
                (self.room_now is None or self.room_now()):
            self._emit(self.process(msg), done)
            return
        self.queue.put_nowait((msg, done))

    async def run(self) -> None:
        timed = [(i, a) for i, a in enumerate(self.actions) if hasattr(a, "tick")]
        staged = self.blocking and len(self._stages) > 1
        if staged:
            self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-{k}")
                               for k in range(len(self._stages))]
        try:
            async with asyncio.TaskGroup() as tg:
                if timed:
                    tg.create_task(self._ticker(timed), name=f"pipeline:{self.name}:tick")
                if staged:
                    await self._staged(tg)
                else:
                    await self._consume()
        finally:
            for ex in self._executors:
                ex.shutdown(wait=False, cancel_futures=True)
            self._executors = []

    async def _consume(self) -> None:
        q = self.queue
        while True:
            item = await q.get()
            if self.room is not None:
                await self.room()
            batch = [item]
            while not q.empty() and len(batch) < 256:
                batch.append(q.get_nowait())
            self.busy = True
            try:
                if self.blocking:
                    # Inference and image decoding hold the CPU for milliseconds: off the loop.
                    results = await asyncio.to_thread(self._process_batch, batch)
                else:
                    results = self._process_batch(batch)
                for outs, done in results:
                    self._emit(outs, done)
            finally:
                self.busy = False

    async def _staged(self, tg: asyncio.TaskGroup) -> None:
        """An assembly line: each step on its own thread, bounded queues between steps.

        While step k+1 (inference) works on frame n, step k (decoding) already works on
        frame n+1, so a multi-core board overlaps them; and each action always runs on
        the same thread (interpreters and trackers are not shared between threads).
        """
        n = len(self._stages)
        stages: list[asyncio.Queue[_Item]] = [asyncio.Queue(maxsize=2) for _ in range(n)]
        for k in range(n):
            tg.create_task(self._stage(k, stages), name=f"pipeline:{self.name}:stage{k}")
        while True:
            msg, done = await self.queue.get()
            if self.room is not None:
                await self.room()
            self.counters.inc("in")
            self._inflight += 1
            self.busy = True
            await stages[0].put(([msg], [], done, time.perf_counter()))

    async def _stage(self, k: int, stages: list[asyncio.Queue[_Item]]) -> None:
        loop = asyncio.get_running_loop()
        stage = self._stages[k]
        last = k + 1 == len(stages)
        while True:
            current, outs, done, t0 = await stages[k].get()
            if stage.blocking:
                nxt, produced = await loop.run_in_executor(
                    self._executors[k], self._apply, stage.step, stage.name, stage.fn, current)
            else:
                nxt, produced = self._apply(stage.step, stage.name, stage.fn, current)
            outs = outs + produced if produced else outs
            if nxt and not last:
                await stages[k + 1].put((nxt, outs, done, t0))
                continue
            self.counters.observe("total", (time.perf_counter() - t0) * 1000.0)
            self.counters.inc("out", len(outs))
            self._inflight -= 1
            self.busy = self._inflight > 0
            self._emit(outs, done)

    def _process_batch(
        self, batch: list[tuple[Message, Done | None]]
    ) -> list[tuple[list[Outgoing], Done | None]]:
        return [(self.process(msg), done) for msg, done in batch]

    def process(self, msg: Message) -> list[Outgoing]:
        """Run every step; a step that raises drops this message only, counted and logged."""
        counters = self.counters
        counters.inc("in")
        t0 = time.perf_counter()
        outs = self._run_from(0, [msg])
        counters.observe("total", (time.perf_counter() - t0) * 1000.0)
        counters.inc("out", len(outs))
        return outs

    def _run_from(self, start: int, current: list[Message]) -> list[Outgoing]:
        """Steps `start`.. on `current`: what leaves for the outbox."""
        outs: list[Outgoing] = []
        names, actions = self._step_names, self.actions
        for i in range(start, len(actions)):
            current, produced = self._apply(i, names[i], actions[i].process, current)
            outs += produced
            if not current:
                break
        return outs

    def _apply(self, i: int, name: str, fn: Callable[[Message], Sequence[Message | Outgoing]],
               current: list[Message]) -> tuple[list[Message], list[Outgoing]]:
        counters = self.counters
        nxt: list[Message] = []
        outs: list[Outgoing] = []
        for m in current:
            ts = time.perf_counter()
            try:
                produced: Iterable[Message | Outgoing] = fn(m)
            except PayloadError as exc:
                counters.inc("malformed")
                self.telemetry.warn_burst(
                    f"malformed:{self.name}", "pipeline %s step %s: dropped malformed "
                    "message on %s: %s", self.name, name, m.topic, exc)
                continue
            except Exception as exc:
                counters.inc("errors")
                self.telemetry.warn_burst(
                    f"error:{self.name}:{i}", "pipeline %s step %s failed on %s: %r",
                    self.name, name, m.topic, exc, exc_info=True)
                continue
            counters.observe(name, (time.perf_counter() - ts) * 1000.0)
            for p in produced:
                if isinstance(p, Outgoing):
                    outs.append(p)
                else:
                    nxt.append(p)
        return nxt, outs

    async def _ticker(self, timed: list[tuple[int, Any]]) -> None:
        interval = min(float(a.interval_s) for _, a in timed)
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for i, a in timed:
                try:
                    if self._executors:  # the step's own thread: tick and process never race
                        k = max(k for k, st in enumerate(self._stages) if st.step == i)
                        produced = list(await asyncio.get_running_loop().run_in_executor(
                            self._executors[k], a.tick, now))
                    else:
                        produced = list(a.tick(now))
                except Exception:
                    log.exception("pipeline %s: tick of step %s failed", self.name,
                                  self._step_names[i])
                    continue
                outs = [p for p in produced if isinstance(p, Outgoing)]
                msgs = [p for p in produced if not isinstance(p, Outgoing)]
                if msgs:
                    outs += self._run_from(i + 1, msgs)
                if outs or self.stateful:
                    self._emit(outs, None)

    def close(self) -> None:
        for a in self.actions:
            close = getattr(a, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("pipeline %s: closing an action failed", self.name)
