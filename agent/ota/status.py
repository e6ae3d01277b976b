"""`fogwhisk model status`: the state every device reports, retained, on
<prefix>/<device>/models/<name>/state, as a table or JSON, once or as it changes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt

from agent.cli.status import ago
from agent.errors import ConfigError
from agent.ota.session import _LEVEL, Broker, _Session

EXIT_OK = 0


COLUMNS = ("device", "model", "active", "previous", "update", "state", "progress",
           "reason", "reported")


def status(broker_url: str, *, device: str | None = None, name: str | None = None,
           watch: bool = False, as_json: bool = False, ca: Path | None = None,
           cert: Path | None = None, key: Path | None = None, username: str | None = None,
           password: str | None = None, prefix: str = "fog", timeout_s: float = 30.0,
           out: TextIO | None = None) -> int:
    """Print every (device, model) state retained under <prefix>/+/models/+/state as a
    table (or a JSON array); with `watch`, then one line per report until interrupted."""
    out = out or sys.stdout
    for what, value in (("--device", device), ("--name", name)):
        if value is not None and not _LEVEL.fullmatch(value):
            raise ConfigError(f"{what} {value!r}: one topic level (no /, +, # or NUL)")
    topic_filter = f"{prefix}/{device or '+'}/models/{name or '+'}/state"
    broker = Broker(broker_url, ca, cert, key, username, password, timeout_s)
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    with _Session(broker) as s:
        for msg in s.retained(topic_filter):
            row = _state(msg, prefix)
            if row is not None:
                latest[(row["device"], row["model"])] = row
        rows = [latest[k] for k in sorted(latest)]
        widths = _widths(rows, time.time())
        if as_json:
            print(json.dumps([r["doc"] for r in rows], indent=None if watch else 2), file=out)
        else:
            print(_table(rows, time.time(), widths), file=out)
        out.flush()
        if not watch:
            return EXIT_OK
        seen = len(s.messages)
        try:
            while True:
                s.wait(lambda n=seen: len(s.messages) > n,  # type: ignore[misc]
                       "state reports", math.inf)
                with s.cond:
                    new, seen = s.messages[seen:], len(s.messages)
                for msg in new:
                    row = _state(msg, prefix)
                    if row is None or _older(row, latest.get((row["device"], row["model"]))):
                        continue
                    latest[(row["device"], row["model"])] = row
                    print(json.dumps(row["doc"]) if as_json
                          else _table([row], time.time(), widths, header=False), file=out)
                out.flush()
        except KeyboardInterrupt:
            return EXIT_OK


def _state(msg: mqtt.MQTTMessage, prefix: str) -> dict[str, Any] | None:
    levels = msg.topic.split("/")
    if len(levels) != 5 or levels[0] != prefix or levels[2] != "models":
        return None
    dev, model = levels[1], levels[3]
    if not msg.payload:  # a cleared retained state
        return None
    try:
        doc = json.loads(msg.payload)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        doc = {"unreadable": str(exc), "raw": msg.payload[:200].decode(errors="replace")}
    doc = {"device": dev, **doc} if "device" not in doc else doc
    return {"device": dev, "model": model, "doc": doc}


def _older(row: dict[str, Any], shown: dict[str, Any] | None) -> bool:
    """A report with a lower `seq` than the one shown is stale (a reordered retry)."""
    if shown is None:
        return False
    new, old = row["doc"].get("seq"), shown["doc"].get("seq")
    return isinstance(new, int) and isinstance(old, int) and new < old


def _cells(row: dict[str, Any], now: float) -> tuple[str, ...]:
    doc = row["doc"]
    if "unreadable" in doc:
        return (row["device"], row["model"], "?", "?", "?", "unreadable", "-",
                doc["unreadable"], "-")
    active = doc.get("active") or {}
    previous = doc.get("previous") or {}
    update = doc.get("update") or {}
    ts = update.get("ts", doc.get("ts"))
    return (row["device"], row["model"], _text(active.get("version")),
            _text(previous.get("version")), _text(update.get("version")),
            _text(update.get("state")), _progress(update.get("progress")),
            _text(update.get("reason")), ago(ts, now))


def _text(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _progress(v: Any) -> str:
    if isinstance(v, dict) and isinstance(v.get("total"), int | float) and v["total"]:
        v = v.get("done", 0) / v["total"]
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1:
        return f"{v * 100:.0f}%"
    return _text(v)


def _widths(rows: list[dict[str, Any]], now: float) -> list[int]:
    cells = [_cells(r, now) for r in rows]
    return [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]


def _table(rows: list[dict[str, Any]], now: float, widths: list[int],
           header: bool = True) -> str:
    if not rows and header:
        return "no model state retained (devices report on <prefix>/<device>/models/<name>/state)"
    cells = [_cells(r, now) for r in rows]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()
             ] if header else []
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)
