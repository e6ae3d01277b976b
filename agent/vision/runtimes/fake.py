"""A deterministic stand-in model for tests and --dry-run; no TFLite involved.

`load(path)` reads a JSON spec: the file itself when it ends in `.json`, else
a sidecar `<model>.fake.json`, else a trailer `FOGWHISK-FAKE{...}` at the end
of the model file (so a spec travels inside a signed OTA release), else a
generic 1-input, 1-output model:

    {"inputs": [{"name": "in", "shape": [1, 128, 128, 3], "dtype": "float32"}],
     "outputs": [{"name": "scores", "shape": [1, 10], "dtype": "float32"}],
     "raise": false, "delay_ms": 0}

Outputs are small pseudo-random values seeded by the input bytes: the same
input always gives the same output. Knobs that stand in for a misbehaving
model (they take effect after `after` invokes, 0 by default):

    "raise": true               every invoke fails (a model that raises must not stop a pipeline)
    "delay_ms": 50              each invoke takes that much longer (a slow model)
    "crash": "load" | "invoke"  the process dies of SIGSEGV (a crash inside the interpreter)
    "hang": "load" | "invoke"   never returns
    "load_ms": 3000             loading takes that long (a large model)
    "wrap": "litert"            the real model file runs on that runtime, knobs around it
"""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.vision.tensors import TensorInfo

TRAILER = b"FOGWHISK-FAKE"
TRAILER_MAX_BYTES = 4096

Fn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

GENERIC: dict[str, Any] = {
    "inputs": [{"name": "input", "shape": [1, 128, 128, 3], "dtype": "float32"}],
    "outputs": [{"name": "output", "shape": [1, 10], "dtype": "float32"}],
}


class FakeModel:
    runtime = "fake"

    def __init__(self, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                 fn: Fn | None = None, fail: bool = False, delay_ms: float = 0.0,
                 crash: bool = False, hang: bool = False, after: int = 0) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.fn = fn
        self.fail = fail
        self.delay_ms = delay_ms
        self.crash = crash
        self.hang = hang
        self.after = after
        self.calls = 0

    def invoke(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        if self.calls > self.after:
            if self.crash:
                _segfault()
            if self.hang:
                _hang()
            if self.fail:
                raise RuntimeError("fake model configured to fail")
            if self.delay_ms:
                time.sleep(self.delay_ms / 1000.0)  # stands in for a blocking invoke
        if self.fn is not None:
            return self.fn(inputs)
        seed = zlib.crc32(b"".join(np.ascontiguousarray(a).tobytes()[:65536] for a in inputs))
        rng = np.random.default_rng(seed)
        out = []
        for o in self.outputs:
            if np.issubdtype(o.dtype, np.integer):
                out.append(rng.integers(0, 8, size=o.shape).astype(o.dtype))
            else:
                out.append((rng.random(o.shape) * 0.1).astype(o.dtype))
        return out


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)  # what a crash in native interpreter code looks like
    time.sleep(10)  # the signal is delivered at once; never return meanwhile


def _hang() -> None:
    while True:
        time.sleep(3600)


def _infos(raw: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(name=str(t.get("name", f"t{i}")), index=i,
                   shape=tuple(int(x) for x in t["shape"]),
                   dtype=np.dtype(t.get("dtype", "float32")),
                   scale=float(t.get("scale", 0.0)), zero_point=int(t.get("zero_point", 0)))
        for i, t in enumerate(raw)
    )


def _spec(path: Path) -> dict[str, Any]:
    spec_path = path if path.suffix == ".json" else path.with_name(path.name + ".fake.json")
    try:
        if spec_path.is_file():
            return dict(json.loads(spec_path.read_text()))
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - TRAILER_MAX_BYTES))
                tail = f.read()
            at = tail.rfind(TRAILER)
            if at >= 0:
                return dict(json.loads(tail[at + len(TRAILER):]))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{spec_path}: bad fake model spec: {exc}") from exc
    return GENERIC


def load(path: Path, num_threads: int) -> FakeModel:
    spec = _spec(path)
    if spec.get("crash") == "load":
        _segfault()
    if spec.get("hang") == "load":
        _hang()
    time.sleep(float(spec.get("load_ms", 0)) / 1000.0)
    fn: Fn | None = None
    inputs, outputs = _infos(spec.get("inputs", GENERIC["inputs"])), \
        _infos(spec.get("outputs", GENERIC["outputs"]))
    if "wrap" in spec:
        from agent.vision import runtimes  # the real runtime, knobs around it

        inner = runtimes.load(str(spec["wrap"]), path, num_threads)
        inputs, outputs, fn = inner.inputs, inner.outputs, inner.invoke
    else:
        del num_threads  # accepted for the Protocol; the fake model is single-threaded
    return FakeModel(inputs, outputs, fn=fn, fail=bool(spec.get("raise", False)),
                     delay_ms=float(spec.get("delay_ms", 0)),
                     crash=spec.get("crash") == "invoke", hang=spec.get("hang") == "invoke",
                     after=int(spec.get("after", 0)))
