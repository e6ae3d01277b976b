"""User actions for the integration tests, named by import path (`useractions:double`).

The agent subprocess finds this module because the tests put tests/ on PYTHONPATH.
"""

from __future__ import annotations

import json
import time
from typing import Any


def double(msg: Any, factor: int = 2) -> Any:
    """Multiply the reading's `v` by `factor`; the next step publishes it."""
    value = json.loads(msg.payload)["v"]
    return msg.evolve(data={"type": "doubled", "value": value * factor})


def explode_on_odd(msg: Any) -> Any:
    """Raise (a bug in user code, not a bad payload) for odd readings; pass even ones."""
    value = json.loads(msg.payload)["v"]
    if value % 2:
        raise RuntimeError(f"user code failed on {value}")
    return msg.evolve(data={"value": value})


def slow(msg: Any) -> Any:
    """Hold the worker thread for a while: keeps a drain busy."""
    time.sleep(0.5)
    return msg.evolve(data={"slow": True})
