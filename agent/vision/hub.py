"""The live models the pipelines run, swapped between two frames.

Each `detect` step holds a `Slot` for its model: its own `Detector` (an
interpreter is never shared between pipeline threads). A step reads
`slot.current()` once per frame and keeps that detector for the whole frame,
so a swap lands between two frames: no frame is dropped, none is half on one
model and half on the other, and each event names the version that made it.

An update loads the candidate for every slot first (`load`, blocking: off the
loop), then `swap` replaces them all at once and hands back the old
detectors, still loaded, so that a rollback never waits on loading anything
(least of all on the failed candidate). Slots also record per version how
many frames failed and how long inference took, for probation.

Shadow evaluation: `start_shadow` puts a loaded candidate beside each slot's
active detector. The detect step runs it on every k-th frame that reached it
(k from the controller's budget function, fed with both models' mean inference
times), after the active model, on the same frame; its detections are only
recorded (`ShadowFrame`), never published. `stop_shadow` takes the candidates
back out, waiting for a frame in flight on them, and hands them over (to be
swapped in, or closed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import memory
from agent.config import RuntimeConfig
from agent.errors import ModelError
from agent.vision.detector import Detection, Detector
from agent.vision.models import ModelRef, ModelStore

log = logging.getLogger(__name__)

WINDOW = 512  # latencies kept per version for probation's p95


@dataclass(frozen=True, slots=True)
class Health:
    """What the frames said about one version since it went live."""

    version: int
    frames: int
    errors: int
    p95_ms: float | None  # None before any frame succeeded

    @property
    def error_rate(self) -> float:
        return self.errors / self.frames if self.frames else 0.0


@dataclass(frozen=True, slots=True)
class ShadowFrame:
    """One frame both models ran on; `error`: the candidate raised on it."""

    active: tuple[Detection, ...]
    candidate: tuple[Detection, ...]
    active_ms: float
    candidate_ms: float
    error: str | None = None


class ShadowRun:
    """A candidate under evaluation: which frames it takes, what it said (thread-safe)."""

    def __init__(self, version: int, every: Callable[[float, float], int], limit: int) -> None:
        self.version = version
        self.every = every  # (active mean ms, candidate mean ms) -> evaluate every k-th frame
        self.limit = limit
        self.seen = 0
        self.active_ms = 0.0
        self.candidate_ms = 0.0
        self.frames: list[ShadowFrame] = []
        self._lock = threading.Lock()

    def due(self, active_ms: float) -> bool:
        """Count a frame the active model ran on; True: the candidate runs on it too."""
        with self._lock:
            self.seen += 1
            self.active_ms += active_ms
            if len(self.frames) >= self.limit:
                return False
            n = len(self.frames)
            k = self.every(self.active_ms / self.seen, self.candidate_ms / n if n else 0.0)
            return self.seen % max(1, k) == 0

    def add(self, frame: ShadowFrame) -> None:
        with self._lock:
            if len(self.frames) < self.limit:
                self.frames.append(frame)
                self.candidate_ms += frame.candidate_ms

    def snapshot(self) -> list[ShadowFrame]:
        with self._lock:
            return list(self.frames)

    def take(self) -> list[ShadowFrame]:
        """The frames so far, and start over (observe mode: one summary per interval)."""
        with self._lock:
            out, self.frames = self.frames, []
            self.seen = 0
            self.active_ms = self.candidate_ms = 0.0
            return out


class _Record:
    __slots__ = ("errors", "frames", "latencies")

    def __init__(self) -> None:
        self.frames = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=WINDOW)


class Slot:
    """One step's hold on a model: the detector it runs now, reloaded when unusable."""

    def __init__(self, hub: ModelHub, name: str, pipeline: str) -> None:
        self.hub = hub
        self.name = name
        self.pipeline = pipeline
        self.detector: Detector | None = None
        self.error: str | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()
        self.candidate: Detector | None = None  # in shadow beside `detector`
        self.shadow_lock = threading.Lock()  # held while the candidate runs on a frame
        self._load()

    def _load(self) -> None:
        try:
            self.detector = self.hub.open(self.hub.store.resolve(self.name))
            self.error = None
        except ModelError as exc:
            # The agent keeps running (status degraded): retry later, fail frames meanwhile.
            self.error = str(exc)
            self._next_try = time.monotonic() + float(self.hub.runtime.reprobe_s)
            self.hub.telemetry.component("runtime").values["degraded"] = 1
            log.error("pipeline %s: model %s unusable: %s", self.pipeline, self.name, exc)

    def current(self) -> Detector:
        """The detector for this frame; ModelError while the model cannot be loaded."""
        det = self.detector  # one read: a swap on the loop thread lands before or after it
        if det is not None:
            return det
        with self._lock:
            if self.detector is None and time.monotonic() >= self._next_try:
                self._load()
            if self.detector is None:
                raise ModelError(f"model {self.name!r} unusable: {self.error}")
            return self.detector

    def record(self, det: Detector, ok: bool, ms: float = 0.0) -> None:
        """A frame's outcome on `det` (called from the pipeline's thread)."""
        self.hub.record(self.name, det.manifest.version, ok, ms)

    def shadow_due(self, active_ms: float) -> Detector | None:
        """The candidate when this frame is one it must run on, else None."""
        cand = self.candidate
        run = self.hub.shadows.get(self.name)
        if cand is None or run is None or not run.due(active_ms):
            return None
        return cand


class ModelHub:
    """Every live model of the agent, by name."""

    def __init__(self, store: ModelStore, runtime: RuntimeConfig, telemetry: Any) -> None:
        self.store = store
        self.runtime = runtime
        self.telemetry = telemetry
        self.slots: dict[str, list[Slot]] = {}
        self._records: dict[tuple[str, int], _Record] = {}
        self._lock = threading.Lock()
        self.shadows: dict[str, ShadowRun] = {}
        self._first_open = True

    def slot(self, name: str, pipeline: str) -> Slot:
        """A new slot on `name`, loaded with its active version (or failing until it loads)."""
        s = Slot(self, name, pipeline)
        self.slots.setdefault(name, []).append(s)
        return s

    def open(self, ref: ModelRef) -> Detector:
        if self._first_open:  # start-up: the libraries are in, the model's arena is next
            self._first_open = False
            memory.page_out_start_up(quiet=True)  # so the two do not add up to the peak
        return Detector(ref, self.runtime, self.telemetry)

    def version(self, name: str) -> int | None:
        """The version the slots of `name` run (None when none is loaded)."""
        for s in self.slots.get(name, ()):
            if s.detector is not None:
                return s.detector.manifest.version
        return None

    def load(self, name: str, ref: ModelRef) -> list[Detector]:
        """One detector of `ref` per slot of `name` (blocking: run it off the loop)."""
        made: list[Detector] = []
        try:
            for _ in self.slots.get(name, ()):
                made.append(self.open(ref))
        except Exception:
            for d in made:
                d.close()
            raise
        return made

    def swap(self, name: str, detectors: list[Detector]) -> list[Detector | None]:
        """Put `detectors` live, one per slot, between two frames; return the old ones."""
        slots = self.slots.get(name, [])
        if len(detectors) != len(slots):
            raise ModelError(f"model {name}: {len(detectors)} detectors for {len(slots)} steps")
        old: list[Detector | None] = []
        for s, d in zip(slots, detectors, strict=True):
            old.append(s.detector)
            s.detector = d  # one store: the step reads it once per frame
            s.error = None
        if detectors:
            with self._lock:  # the new version's record starts empty
                self._records.pop((name, detectors[0].manifest.version), None)
            log.info("model %s: %d step(s) now run version %d", name, len(detectors),
                     detectors[0].manifest.version)
        return old

    def start_shadow(self, name: str, detectors: list[Detector], run: ShadowRun) -> None:
        """Run `detectors` (one per slot, from `load`) in shadow beside the active ones."""
        slots = self.slots.get(name, [])
        if len(detectors) != len(slots):
            raise ModelError(f"model {name}: {len(detectors)} detectors for {len(slots)} steps")
        self.shadows[name] = run
        for s, d in zip(slots, detectors, strict=True):
            s.candidate = d
        log.info("model %s: version %d runs in shadow beside %d step(s)", name, run.version,
                 len(slots))

    def stop_shadow(self, name: str) -> list[Detector]:
        """Take the candidates out of shadow (blocking: waits for a frame in flight on them)
        and return them, still loaded."""
        self.shadows.pop(name, None)
        out: list[Detector] = []
        for s in self.slots.get(name, []):
            with s.shadow_lock:
                if s.candidate is not None:
                    out.append(s.candidate)
                s.candidate = None
        return out

    def add_shadow(self, name: str, frame: ShadowFrame) -> None:
        run = self.shadows.get(name)
        if run is not None:
            run.add(frame)

    def shadow_frames(self, name: str) -> list[ShadowFrame]:
        run = self.shadows.get(name)
        return [] if run is None else run.snapshot()

    def take_shadow_frames(self, name: str) -> list[ShadowFrame]:
        run = self.shadows.get(name)
        return [] if run is None else run.take()

    def record(self, name: str, version: int, ok: bool, ms: float) -> None:
        with self._lock:
            r = self._records.get((name, version))
            if r is None:
                r = self._records[(name, version)] = _Record()
            r.frames += 1
            if ok:
                r.latencies.append(ms)
            else:
                r.errors += 1

    def health(self, name: str, version: int) -> Health:
        with self._lock:
            r = self._records.get((name, version))
            if r is None:
                return Health(version, 0, 0, None)
            lat = sorted(r.latencies)
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None
            return Health(version, r.frames, r.errors, p95)
