"""ai-edge-litert's Interpreter on the CPU (XNNPACK), the default runtime."""

from __future__ import annotations

from pathlib import Path

from agent.errors import ModelError
from agent.vision.runtimes._interpreter import InterpreterModel, open_interpreter


def load(path: Path, num_threads: int) -> InterpreterModel:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModelError("runtime 'litert' needs ai-edge-litert: pip install ai-edge-litert==2.3.0"
                         ) from exc
    return open_interpreter(Interpreter, "litert", path, num_threads)
