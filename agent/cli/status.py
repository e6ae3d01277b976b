"""`fogwhisk status --broker URL --device ID`: a device's retained status and telemetry.

The agent publishes both retained on its uplink (`{prefix}/{device}/status`,
`{prefix}/{device}/telemetry`), so one subscription to each shows the last
known state of a device, online or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import aiomqtt

from agent.mqtt import topics

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def fetch(broker_url: str, device: str, prefix: str,
          timeout_s: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The retained status and telemetry documents (None where nothing arrived in time)."""
    parts = urlsplit(broker_url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
        raise ValueError(f"broker URL {broker_url!r}: expected mqtt://host:port")
    return asyncio.run(_fetch(parts, topics.status(prefix, device),
                              topics.telemetry(prefix, device), timeout_s))


async def _fetch(parts: SplitResult, status_topic: str, telemetry_topic: str,
                 timeout_s: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """MQTT 5 first; a broker that refuses it (NATS 2.9 says so, RabbitMQ 3.10 closes,
    which paho reports only as a time-out) is asked again in MQTT 3.1.1, as the agent does."""
    try:
        return await _subscribe(parts, status_topic, telemetry_topic, timeout_s,
                                aiomqtt.ProtocolVersion.V5)
    except ConnectionError as exc:
        if isinstance(exc.__cause__, aiomqtt.MqttError) and "Errno" in str(exc.__cause__):
            raise  # refused or unreachable: no version would do better
        return await _subscribe(parts, status_topic, telemetry_topic, timeout_s,
                                aiomqtt.ProtocolVersion.V311)


async def _subscribe(parts: SplitResult, status_topic: str, telemetry_topic: str,
                     timeout_s: float, protocol: aiomqtt.ProtocolVersion
                     ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    # aiomqtt: a short-lived async subscriber is exactly its use case (the agent's own
    # long-lived connections use agent.mqtt instead, for reconnects and manual acks).
    tls = parts.scheme in ("mqtts", "ssl")
    got: dict[str, dict[str, Any]] = {}
    try:
        async with aiomqtt.Client(
            parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            protocol=protocol, keepalive=30,
            tls_context=ssl.create_default_context() if tls else None,
            timeout=timeout_s,
        ) as client:
            await client.subscribe([(status_topic, 1), (telemetry_topic, 0)])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for msg in client.messages:
                        got[str(msg.topic)] = _doc(msg.payload)
                        if status_topic in got and telemetry_topic in got:
                            break
    except aiomqtt.MqttError as exc:
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or (8883 if tls else 1883)}"
        raise ConnectionError(f"cannot reach {where}: {exc}") from exc
    return got.get(status_topic), got.get(telemetry_topic)


def _doc(payload: Any) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (ValueError, TypeError):
        return {"raw": bytes(payload).decode(errors="replace")}
    return doc if isinstance(doc, dict) else {"value": doc}


def _ms(v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    return "inf" if v == float("inf") else f"{v:g}"


def _bytes(v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v / 1e6:.1f} MB"


def ago(ts: Any, now: float) -> str:
    """How long before `now` a document's `ts` was, for people ("-" without one)."""
    if not isinstance(ts, int | float):
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 \
        else f"{s / 3600:.1f} h ago"


def render(device: str, status: dict[str, Any] | None,
           telemetry: dict[str, Any] | None, now: float | None = None) -> str:
    """The status and telemetry as a plain-text table."""
    now = time.time() if now is None else now
    lines = [f"device   {device}"]
    if status is not None:
        lines += [
            f"state    {status.get('state', '?')}"
            + (f" ({status['reason']})" if status.get("reason") else ""),
            f"version  {status.get('version', '?')}",
            f"boot     {status.get('boot', '?')} (status {ago(status.get('ts'), now)})",
            f"pipelines {', '.join(status.get('pipelines') or []) or 'none'}",
        ]
    else:
        lines.append("state    unknown (no retained status)")
    if telemetry is None:
        lines.append("telemetry: none retained")
        return "\n".join(lines)
    lines += [
        f"uptime   {telemetry.get('uptime_s', '?')} s, RSS {_bytes(telemetry.get('rss_bytes'))}"
        f" (telemetry {ago(telemetry.get('ts'), now)})",
        "",
    ]
    header = ("pipeline", "in", "out", "dropped", "malformed", "errors", "p50 ms", "p95 ms")
    rows: list[tuple[str, ...]] = [header]
    for name, c in sorted((telemetry.get("pipelines") or {}).items()):
        total = (c.get("latency_ms") or {}).get("total") or {}
        dropped = sum(v for k, v in c.items() if k.startswith(("dropped", "frames_dropped"))
                      and isinstance(v, int))
        rows.append((name, str(c.get("in", 0)), str(c.get("out", 0)), str(dropped),
                     str(c.get("malformed", 0)), str(c.get("errors", 0)),
                     _ms(total.get("p50")), _ms(total.get("p95"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    ob = telemetry.get("outbox") or {}
    dropped_ob = sum(v for k, v in ob.items() if k.startswith(("dropped", "rejected"))
                     and isinstance(v, int))
    lines += [
        "",
        f"outbox   backlog {ob.get('backlog', 0)} ({_bytes(ob.get('backlog_bytes', 0))}), "
        f"delivered {ob.get('delivered', 0)}, dropped {dropped_ob}, "
        f"dead-lettered {ob.get('dead_lettered', 0)}",
    ]
    for name in ("mqtt_local", "mqtt_uplink"):
        conn = telemetry.get(name)
        if isinstance(conn, dict):
            brief = ", ".join(f"{k} {v}" for k, v in sorted(conn.items())
                              if isinstance(v, int | float))
            # The endpoint in use (one of several, for a cluster) and the MQTT version
            # it answered in ("auto" falls back to 3.1.1 for a broker that refuses 5).
            at = f"{conn['endpoint']} (MQTT {conn.get('protocol', '?')}): " \
                if isinstance(conn.get("endpoint"), str) else ""
            lines.append(f"{name[5:]:<8} {at}{brief}")
    return "\n".join(lines)


def main(broker_url: str, device: str, prefix: str = "fog", timeout_s: float = 3.0) -> int:
    """Print the table; exit 1 when nothing retained arrives within `timeout_s`."""
    try:
        status, telemetry = fetch(broker_url, device, prefix, timeout_s)
    except ValueError as exc:
        print(f"fogwhisk status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionError as exc:
        print(f"fogwhisk status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if status is None and telemetry is None:
        print(f"fogwhisk status: nothing retained on {topics.status(prefix, device)} or "
              f"{topics.telemetry(prefix, device)} at {broker_url} within {timeout_s:g} s "
              "(wrong device id or prefix, or the device never connected there)",
              file=sys.stderr)
        return EXIT_FAILURE
    print(render(device, status, telemetry))
    return EXIT_OK
