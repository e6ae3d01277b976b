"""Reading structured payloads (JSON objects or msgpack maps) for field-based actions."""

from __future__ import annotations

import json
from typing import Any

import msgpack

from agent.errors import PayloadError
from agent.pipeline import Message


def fields(msg: Message) -> dict[str, Any]:
    """The message as a dict: `msg.data` when a step made one, else the decoded payload."""
    if isinstance(msg.data, dict):
        return msg.data
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
    """A numeric field, or PayloadError naming it."""
    try:
        v = values[name]
    except KeyError:
        raise PayloadError(f"field {name!r} is missing") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PayloadError(f"field {name!r} is {type(v).__name__}, not a number")
    return float(v)
