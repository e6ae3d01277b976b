"""tflite-runtime 2.14's Interpreter; it creates no Interpreter under numpy 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import ModelError
from agent.vision.runtimes._interpreter import InterpreterModel, open_interpreter

INSTALL = "pip install 'fogwhisk[tflite]' (tflite-runtime==2.14.0 with numpy<2, in its own venv)"


def load(path: Path, num_threads: int) -> InterpreterModel:
    if int(np.__version__.split(".")[0]) >= 2:
        raise ModelError(f"runtime 'tflite' needs numpy<2 (found {np.__version__}): {INSTALL}")
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError as exc:
        raise ModelError(f"runtime 'tflite' needs tflite-runtime: {INSTALL}") from exc
    return open_interpreter(Interpreter, "tflite", path, num_threads)
