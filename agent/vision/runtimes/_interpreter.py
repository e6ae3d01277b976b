"""The TFLite Interpreter API shared by litert, tflite-runtime and the Edge TPU delegate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.vision.tensors import TensorInfo


def _info(d: dict[str, Any]) -> TensorInfo:
    scale, zero = d.get("quantization", (0.0, 0))
    return TensorInfo(
        name=str(d["name"]), index=int(d["index"]),
        shape=tuple(int(x) for x in d["shape"]), dtype=np.dtype(d["dtype"]),
        scale=float(scale), zero_point=int(zero),
    )


class InterpreterModel:
    """Wraps one `Interpreter`; not thread-safe (ChainedModel serialises invokes)."""

    def __init__(self, runtime: str, interpreter: Any) -> None:
        self.runtime = runtime
        self._interp = interpreter
        try:
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{runtime}: cannot allocate tensors: {exc}") from exc
        self.inputs = tuple(_info(d) for d in interpreter.get_input_details())
        self.outputs = tuple(_info(d) for d in interpreter.get_output_details())

    def invoke(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise ModelError(f"model takes {len(self.inputs)} inputs, got {len(inputs)}")
        for info, arr in zip(self.inputs, inputs, strict=True):
            self._interp.set_tensor(info.index, arr)
        self._interp.invoke()
        # get_tensor copies: the next invoke may reuse the interpreter's buffers.
        return [self._interp.get_tensor(o.index) for o in self.outputs]


def open_interpreter(cls: Any, runtime: str, path: Path, num_threads: int,
                     delegates: list[Any] | None = None) -> InterpreterModel:
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        interp = cls(model_path=str(path), num_threads=num_threads,
                     experimental_delegates=delegates)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{runtime}: cannot load {path}: {exc}") from exc
    return InterpreterModel(runtime, interp)
