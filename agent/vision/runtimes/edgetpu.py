"""The Coral Edge TPU: ai-edge-litert with the libedgetpu delegate.

A model compiled for the Edge TPU (`*_edgetpu.tflite`) runs its custom op on
the accelerator; without the device or library the delegate fails to load
and the fallback chain moves on to the CPU.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import ModelError
from agent.vision.runtimes._interpreter import InterpreterModel, open_interpreter

LIBRARY = "libedgetpu.so.1"


def load(path: Path, num_threads: int) -> InterpreterModel:
    try:
        from ai_edge_litert.interpreter import (
            Interpreter,
            load_delegate,
        )
    except ImportError as exc:
        raise ModelError("runtime 'edgetpu' needs ai-edge-litert: pip install ai-edge-litert"
                         ) from exc
    try:
        delegate = load_delegate(LIBRARY)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"runtime 'edgetpu': cannot load {LIBRARY} (install libedgetpu1-std "
                         f"and plug in the Edge TPU): {exc}") from exc
    return open_interpreter(Interpreter, "edgetpu", path, num_threads, [delegate])
