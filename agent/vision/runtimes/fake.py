"""A deterministic stand-in model for tests and --dry-run; no TFLite involved.

`load(path)` reads a JSON spec (the file itself when it ends in `.json`,
else a sidecar `<model>.fake.json`, else a generic 1-input, 1-output model):

    {"inputs": [{"name": "in", "shape": [1, 128, 128, 3], "dtype": "float32"}],
     "outputs": [{"name": "scores", "shape": [1, 10], "dtype": "float32"}],
     "raise": false, "delay_ms": 0}

Outputs are small pseudo-random values seeded by the input bytes: the same
input always gives the same output. `raise` makes every invoke fail (a model
that raises must not stop a pipeline).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.vision.tensors import TensorInfo

Fn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

GENERIC: dict[str, Any] = {
    "inputs": [{"name": "input", "shape": [1, 128, 128, 3], "dtype": "float32"}],
    "outputs": [{"name": "output", "shape": [1, 10], "dtype": "float32"}],
}


class FakeModel:
    runtime = "fake"

    def __init__(self, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                 fn: Fn | None = None, fail: bool = False, delay_ms: float = 0.0) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.fn = fn
        self.fail = fail
        self.delay_ms = delay_ms
        self.calls = 0

    def invoke(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
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


def _infos(raw: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(name=str(t.get("name", f"t{i}")), index=i,
                   shape=tuple(int(x) for x in t["shape"]),
                   dtype=np.dtype(t.get("dtype", "float32")),
                   scale=float(t.get("scale", 0.0)), zero_point=int(t.get("zero_point", 0)))
        for i, t in enumerate(raw)
    )


def load(path: Path, num_threads: int) -> FakeModel:
    del num_threads  # accepted for the Protocol; the fake model is single-threaded
    spec_path = path if path.suffix == ".json" else path.with_name(path.name + ".fake.json")
    spec = GENERIC
    if spec_path.is_file():
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{spec_path}: bad fake model spec: {exc}") from exc
    return FakeModel(_infos(spec["inputs"]), _infos(spec["outputs"]),
                     fail=bool(spec.get("raise", False)), delay_ms=float(spec.get("delay_ms", 0)))
