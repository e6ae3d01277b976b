"""Reading structured payloads (JSON objects or msgpack maps) for field-based actions."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack

from agent.errors import PayloadError
from agent.messages import Message


def fields(msg: Message) -> dict[str, Any]:
    """The message as a dict: `msg.data` when a step made one, else the decoded payload."""
    if isinstance(msg.data, dict):
        return msg.data
    if msg.data is not None:
        from agent.vision.frames import Frame  # here: relays never load cv2; vision steps have

        if isinstance(msg.data, Frame):
            raise PayloadError("a frame is not a reading (JSON object or msgpack map)")
    raw = msg.payload
    head = raw[:1]
    try:
        if head in (b"{", b" ", b"\n", b"\t", b"\r"):
            value = json.loads(raw)
        else:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise PayloadError(f"not a JSON object or msgpack map: {exc}") from None
    if not isinstance(value, dict):
        raise PayloadError(f"expected a JSON object or msgpack map, got {type(value).__name__}")
    return value


def number(values: dict[str, Any], name: str) -> float:
    """A finite numeric field, or PayloadError naming it.

    JSON as Python reads it allows NaN, Infinity and 1e400 (which is inf), msgpack
    carries them too; none of them can be aggregated or sent on as strict JSON.
    """
    try:
        v = values[name]
    except KeyError:
        raise PayloadError(f"field {name!r} is missing") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PayloadError(f"field {name!r} is {type(v).__name__}, not a number")
    try:
        f = float(v)
    except OverflowError:  # an int of hundreds of digits
        raise PayloadError(f"field {name!r} is beyond the range of a double") from None
    if not math.isfinite(f):
        raise PayloadError(f"field {name!r} is {f!r}, not a finite number")
    return f


def nonfinite(value: Any, path: str = "") -> str | None:
    """Where a NaN or an infinity hides in a decoded document (`a.b[2]`), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "."
    if isinstance(value, dict):
        for k, v in value.items():
            where = nonfinite(v, f"{path}.{k}" if path else str(k))
            if where is not None:
                return where
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            where = nonfinite(v, f"{path}[{i}]")
            if where is not None:
                return where
    elif hasattr(value, "tolist"):  # numpy scalars and arrays from vision steps
        return nonfinite(value.tolist(), path)
    return None
