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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.config import RuntimeConfig
from agent.errors import ModelError
from agent.vision.detector import Detector
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


class ModelHub:
    """Every live model of the agent, by name."""

    def __init__(self, store: ModelStore, runtime: RuntimeConfig, telemetry: Any) -> None:
        self.store = store
        self.runtime = runtime
        self.telemetry = telemetry
        self.slots: dict[str, list[Slot]] = {}
        self._records: dict[tuple[str, int], _Record] = {}
        self._lock = threading.Lock()

    def slot(self, name: str, pipeline: str) -> Slot:
        """A new slot on `name`, loaded with its active version (or failing until it loads)."""
        s = Slot(self, name, pipeline)
        self.slots.setdefault(name, []).append(s)
        return s

    def open(self, ref: ModelRef) -> Detector:
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
