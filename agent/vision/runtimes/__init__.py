"""Model runtimes behind one Protocol, registered by name, imported lazily.

    litert    ai-edge-litert's Interpreter (the default; numpy 2; XNNPACK runs int8)
    tflite    tflite-runtime (extra `tflite`, numpy<2 only: its own venv)
    edgetpu   ai-edge-litert with the Edge TPU delegate (libedgetpu.so.1)
    fake      deterministic outputs, for tests and --dry-run

`open_model()` walks an ordered fallback chain (`runtime.fallback`, e.g.
edgetpu then litert). While a model runs on anything but the first runtime
of its chain it is *degraded*: visible as `degraded()` and as the counter
`runtime.degraded` in telemetry, and the first runtime is re-probed every
`runtime.reprobe_s`. A missing runtime never crash-loops the agent.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import ModelError
from agent.vision.tensors import TensorInfo

log = logging.getLogger(__name__)

RUNTIMES: dict[str, str] = {
    "litert": "agent.vision.runtimes.litert",
    "tflite": "agent.vision.runtimes.tflite",
    "edgetpu": "agent.vision.runtimes.edgetpu",
    "fake": "agent.vision.runtimes.fake",
}


class Model(Protocol):
    """A loaded model: `invoke` takes inputs in input order, returns outputs by index."""

    @property
    def runtime(self) -> str: ...

    @property
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    def invoke(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class Loader(Protocol):
    def __call__(self, path: Path, num_threads: int) -> Model: ...


def loader(name: str) -> Loader:
    """The `load(path, num_threads)` of runtime `name`; ModelError names what to install."""
    module_path = RUNTIMES.get(name)
    if module_path is None:
        raise ModelError(f"unknown runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})")
    module = importlib.import_module(module_path)
    load: Loader = module.load
    return load


def load(name: str, path: Path, num_threads: int) -> Model:
    """Load `path` on runtime `name` with `num_threads` (always set: unset means 1)."""
    if num_threads < 1:
        raise ModelError(f"num_threads must be at least 1, got {num_threads}")
    return loader(name)(path, num_threads)


_degraded: set[str] = set()


def degraded() -> bool:
    """True while any model runs on a fallback runtime (the app reports status degraded)."""
    return bool(_degraded)


class ChainedModel:
    """A model on the first runtime of a chain that loads, re-probing better ones.

    Thread-safe: the pipeline's worker thread calls `invoke`; a re-probe or a
    fallback after a failed invoke swaps the inner model under a lock.
    """

    def __init__(self, path: Path, chain: Sequence[str], num_threads: int,
                 reprobe_s: float, telemetry: Any | None = None) -> None:
        if not chain:
            raise ModelError("runtime.fallback is empty: name at least one runtime")
        self.path = path
        self.chain = tuple(chain)
        self.num_threads = num_threads
        self.reprobe_s = reprobe_s
        self.telemetry = telemetry
        self._lock = threading.Lock()
        self._next_probe = 0.0
        self.errors: dict[str, str] = {}
        self._model, self._level = self._first_loadable(0)
        self._mark()

    @property
    def runtime(self) -> str:
        return self._model.runtime

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._model.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._model.outputs

    @property
    def degraded(self) -> bool:
        return self._level > 0

    def invoke(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._level > 0 and time.monotonic() >= self._next_probe:
                self._reprobe()
            try:
                return self._model.invoke(inputs)
            except Exception as exc:
                if self._level + 1 >= len(self.chain):
                    raise
                log.warning("runtime %s failed on %s (%r): falling back", self.runtime,
                            self.path.name, exc)
                self.errors[self.chain[self._level]] = repr(exc)
                self._model, self._level = self._first_loadable(self._level + 1)
                self._mark()
                return self._model.invoke(inputs)

    def _first_loadable(self, start: int) -> tuple[Model, int]:
        for level in range(start, len(self.chain)):
            name = self.chain[level]
            try:
                return load(name, self.path, self.num_threads), level
            except Exception as exc:  # a missing delegate or package: try the next one
                self.errors[name] = str(exc)
                log.warning("runtime %s cannot load %s: %s", name, self.path.name, exc)
        raise ModelError(f"{self.path}: no runtime of {list(self.chain)} could load it: "
                         + "; ".join(f"{k}: {v}" for k, v in self.errors.items()))

    def _reprobe(self) -> None:
        self._next_probe = time.monotonic() + self.reprobe_s
        for level in range(self._level):
            try:
                model = load(self.chain[level], self.path, self.num_threads)
            except Exception as exc:
                self.errors[self.chain[level]] = str(exc)
                continue
            log.info("runtime %s is back for %s", self.chain[level], self.path.name)
            self._model, self._level = model, level
            self._mark()
            return

    def _mark(self) -> None:
        key = str(self.path)
        if self._level > 0:
            _degraded.add(key)
            self._next_probe = time.monotonic() + self.reprobe_s
        else:
            _degraded.discard(key)
        if self.telemetry is not None:
            counters = self.telemetry.component("runtime")
            counters.values["degraded"] = int(bool(_degraded))
            if self._level > 0:
                counters.inc("fallbacks")

    def close(self) -> None:
        _degraded.discard(str(self.path))
        if self.telemetry is not None:
            self.telemetry.component("runtime").values["degraded"] = int(bool(_degraded))
