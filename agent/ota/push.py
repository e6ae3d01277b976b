"""`fogwhisk model push` and `fogwhisk model status`: the operator's MQTT side of OTA.

push uploads a packed artifact once, as retained QoS 1 chunks the devices fetch over
the connection they already have (agent.ota.fetch.MqttChunkFetcher), then publishes the
release retained on each device's deploy topic:

    <prefix>/_artifacts/<sha256>/<index>      64 KiB each, index from 0
    <prefix>/_artifacts/<sha256>/info         {"size", "chunk_bytes", "chunks", "sha256"},
                                              published last: there means complete
    <prefix>/<device>/models/<name>/deploy    the release document (+ "locations")

status reads what the devices report, retained, on <prefix>/<device>/models/<name>/state.

paho-mqtt, threaded: a short-lived operator tool (the agent itself never imports this
module). paho reports a PUBACK with an MQTT 5 failure reason code as published, so every
reason code is checked here; "exit 0" means the broker accepted every message.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from agent.errors import ConfigError, ConnectError, OtaError, ReleaseError
from agent.ota.fetch import CHUNK_BYTES, PACKET_OVERHEAD
from agent.urls import redact_url

EXIT_OK = 0
INFLIGHT = 32  # QoS 1 chunks unacknowledged at once (less if the broker says so)
FENCE_S = 5.0  # the longest wait for the retained messages behind a fence
_LEVEL = re.compile(r"[^/+#\x00]+")


# -- the broker connection ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    """Where and how to connect: the URL and the TLS and login options of the command."""

    url: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0

    @property
    def shown(self) -> str:
        return redact_url(self.url)


class _Session:
    """One paho client on its network thread; acks and messages handed over under a lock."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        parts = urlsplit(broker.url)
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            raise ConfigError(f"--broker {broker.shown}: expected mqtt://host:port or "
                              "mqtts://host:port")
        tls = parts.scheme in ("mqtts", "ssl")
        if not tls and (broker.ca or broker.cert):
            raise ConfigError(f"--ca/--cert need an mqtts:// broker, not {broker.shown}")
        self.cond = threading.Condition()
        self.acks: dict[int, int] = {}  # mid -> reason code
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: tuple[int, dict[str, Any]] | None = None
        self.lost: str | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"fogwhisk-model-{uuid.uuid4().hex[:12]}",
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self.client.max_inflight_messages_set(INFLIGHT)  # ours is smaller if the broker's is
        user = broker.username or (unquote(parts.username) if parts.username else None)
        password = broker.password or (unquote(parts.password) if parts.password else None)
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls:
            ctx = ssl.create_default_context(cafile=str(broker.ca) if broker.ca else None)
            if broker.cert:
                ctx.load_cert_chain(str(broker.cert), str(broker.key) if broker.key else None)
            self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.host = parts.hostname
        self.port = parts.port or (8883 if tls else 1883)

    # paho's network thread calls these

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        values: dict[str, Any] = (
            props.json() if isinstance(props, Properties) else {})  # type: ignore[no-untyped-call]
        with self.cond:
            self.connack = (int(rc.value), values)
            self.cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        with self.cond:
            self.lost = f"{rc}" if self.connack is not None else f"closed: {rc}"
            self.cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any = None) -> None:
        with self.cond:
            self.acks[mid] = int(rc.value)
            self.cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any,
                      props: Any = None) -> None:
        with self.cond:
            self.subacks[mid] = [int(c.value) for c in codes]
            self.cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    # the command's thread

    def __enter__(self) -> _Session:
        try:
            self.client.connect(self.host, self.port, keepalive=30, clean_start=True)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot reach {self.broker.shown}: {exc}") from None
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "a CONNACK")
        assert self.connack is not None
        code, _ = self.connack
        if code >= 0x80:
            self.client.loop_stop()
            raise ConnectError(f"{self.broker.shown} refused the connection: {_reason(code)}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float | None = None
             ) -> None:
        """Block until `done()` (under the lock); ConnectError on a drop or the timeout."""
        limit = self.broker.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with self.cond:
            while not done():
                if self.lost is not None:
                    raise ConnectError(f"{self.broker.shown} closed the connection while "
                                       f"waiting for {what}: {self.lost}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectError(f"{self.broker.shown}: no {what} within {limit:g} s")
                self.cond.wait(min(left, 1.0))  # bounded: Ctrl-C is seen within a second

    def server(self, name: str, default: int) -> int:
        assert self.connack is not None
        return int(self.connack[1].get(name, default))

    def retained(self, topic_filter: str) -> list[mqtt.MQTTMessage]:
        """Subscribe and return the retained messages: a second SUBSCRIBE is the fence
        (Mosquitto sends a subscription's retained messages before it reads the next)."""
        with self.cond:
            self.messages.clear()
        # QoS 0: retained QoS 1 messages beyond the in-flight window would be held back
        # behind the fence and missed (500 reports came out as 20 to 40).
        _, sub = self.client.subscribe(topic_filter, qos=0)
        fence_topic = f"{topic_filter.split('/', maxsplit=1)[0]}/_fence/{uuid.uuid4().hex}"
        _, fence_mid = self.client.subscribe(fence_topic, qos=0)
        assert sub is not None and fence_mid is not None  # None only when not connected
        first, fence = sub, fence_mid
        self.wait(lambda: first in self.subacks and fence in self.subacks, "a SUBACK",
                  FENCE_S + self.broker.timeout_s)
        code = self.subacks[first][0]
        if code >= 0x80:
            raise ConnectError(f"{self.broker.shown} refused the subscription to "
                               f"{topic_filter}: {_reason(code)}")
        with self.cond:
            return list(self.messages)


def _reason(code: int) -> str:
    from agent.mqtt.codec import reason_name

    return f"{reason_name(code)} (0x{code:02X})"


# -- push ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Release:
    name: str
    version: int
    sha256: str
    size: int
    raw: bytes
    doc: dict[str, Any]


def _read_release(path: Path) -> _Release:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        signed = doc["signed"]
        name, version = signed["name"], signed["version"]
        sha, size = signed["artifact"]["sha256"], signed["artifact"]["size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"{path}: not a release document ({exc})") from None
    if not (isinstance(name, str) and _LEVEL.fullmatch(name)):
        raise ReleaseError(f"{path}: model name {name!r} cannot be a topic level")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ReleaseError(f"{path}: artifact sha256 {sha!r} is not 64 hex digits")
    if not (isinstance(size, int) and size > 0 and isinstance(version, int)):
        raise ReleaseError(f"{path}: artifact size and version must be whole numbers")
    return _Release(name, version, sha, size, raw, doc)


def _artifact_beside(release_json: Path) -> Path:
    suffix = ".release.json"
    if not release_json.name.endswith(suffix):
        raise ReleaseError(f"{release_json}: cannot find its artifact (pack names them "
                           "<name>-<N>.release.json and <name>-<N>.tar)")
    return release_json.with_name(release_json.name[:-len(suffix)] + ".tar")


def _check_artifact(path: Path, rel: _Release) -> None:
    try:
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read the artifact: {exc.strerror}") from None
    if size != rel.size or h.hexdigest() != rel.sha256:
        raise ReleaseError(f"{path}: {size:,} bytes with sha256 {h.hexdigest()[:16]}..., "
                           f"the release signs {rel.size:,} bytes with {rel.sha256[:16]}...")


def push(release_json: Path, broker_url: str, *, devices: Sequence[str],
         urls: Sequence[str] = (), ca: Path | None = None, cert: Path | None = None,
         key: Path | None = None, username: str | None = None, password: str | None = None,
         prefix: str = "fog", timeout_s: float = 30.0, artifact: Path | None = None,
         out: TextIO | None = None) -> int:
    """Upload the artifact of `release_json` (unless its info is retained already) and
    deploy the release to `devices`; returns 0 once the broker acknowledged every message
    with a success reason code, raises otherwise (ReleaseError, ConfigError, ConnectError,
    OtaError with the refused topic)."""
    out = out or sys.stdout
    rel = _read_release(release_json)
    for d in devices:
        if not _LEVEL.fullmatch(d):
            raise ConfigError(f"--device {d!r}: a device id is one topic level "
                              "(no /, +, # or NUL)")
    for u in urls:
        p = urlsplit(u)
        if p.scheme != "https" or not p.hostname:
            raise ConfigError(f"--url {u!r}: expected https://host/path")
    path = artifact or _artifact_beside(release_json)
    _check_artifact(path, rel)
    payload = rel.raw
    if urls:  # unsigned, beside "signed": the signature still covers exactly what it did
        payload = json.dumps({**rel.doc, "locations": list(urls)},
                             separators=(",", ":"), ensure_ascii=False).encode()
    base = f"{prefix}/_artifacts/{rel.sha256}"
    broker = Broker(broker_url, ca, cert, key, username, password, timeout_s)
    with _Session(broker) as s:
        limit = s.server("MaximumPacketSize", 0)
        if limit and limit < CHUNK_BYTES + PACKET_OVERHEAD:
            raise OtaError(f"{broker.shown} takes packets of at most {limit:,} bytes: too "
                           f"small for the {CHUNK_BYTES // 1024} KiB chunks (raise "
                           "max_packet_size, or deploy with --url only)")
        window = max(1, min(INFLIGHT, s.server("ReceiveMaximum", 65535)))
        publisher = _Publisher(s, window)
        if _uploaded(s, f"{base}/info", rel):
            print(f"artifact {rel.sha256[:12]}: already on {broker.shown}", file=out)
        else:
            chunks = math.ceil(rel.size / CHUNK_BYTES)
            with open(path, "rb") as f:
                for i in range(chunks):
                    publisher.publish(f"{base}/{i}", f.read(CHUNK_BYTES))
            publisher.drain("the chunks")  # info last: present means complete
            info = {"size": rel.size, "chunk_bytes": CHUNK_BYTES, "chunks": chunks,
                    "sha256": rel.sha256}
            publisher.publish(f"{base}/info", json.dumps(info).encode())
            publisher.drain("the chunk info")
            print(f"artifact {rel.sha256[:12]}: {chunks} chunks, {rel.size:,} bytes on "
                  f"{broker.shown}", file=out)
        for d in devices:
            publisher.publish(f"{prefix}/{d}/models/{rel.name}/deploy", payload)
        publisher.drain("the deploys")
    print(f"deployed {rel.name} version {rel.version} to {', '.join(devices)}"
          + (f" (also from {', '.join(urls)})" if urls else ""), file=out)
    return EXIT_OK


def _uploaded(s: _Session, topic: str, rel: _Release) -> bool:
    """True when the retained chunk info names this artifact (it is published last)."""
    for msg in s.retained(topic):
        try:
            info = json.loads(msg.payload)
            return bool(info["sha256"] == rel.sha256 and info["size"] == rel.size)
        except (ValueError, KeyError, TypeError):
            return False
    return False


class _Publisher:
    """Retained QoS 1 publishes, at most `window` unacknowledged; every reason code read."""

    def __init__(self, session: _Session, window: int) -> None:
        self.s = session
        self.window = window
        self.sent: dict[int, str] = {}  # mid -> topic, until checked

    def publish(self, topic: str, payload: bytes) -> None:
        s = self.s
        s.wait(lambda: sum(m not in s.acks for m in self.sent) < self.window,
               "PUBACKs")
        info = s.client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectError(f"{s.broker.shown}: cannot publish {topic}: "
                               f"{mqtt.error_string(info.rc)}")
        self.sent[info.mid] = topic
        self._check()

    def drain(self, what: str) -> None:
        self.s.wait(lambda: all(m in self.s.acks for m in self.sent), f"PUBACKs for {what}")
        self._check()

    def _check(self) -> None:
        with self.s.cond:
            done = [(m, self.s.acks.pop(m)) for m in list(self.sent) if m in self.s.acks]
        for mid, code in done:
            topic = self.sent.pop(mid)
            if code >= 0x80:
                raise OtaError(f"{self.s.broker.shown} refused {topic}: {_reason(code)}")


# -- status -------------------------------------------------------------------------------


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
            _text(update.get("reason")), _age(ts, now))


def _text(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _progress(v: Any) -> str:
    if isinstance(v, dict) and isinstance(v.get("total"), int | float) and v["total"]:
        v = v.get("done", 0) / v["total"]
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1:
        return f"{v * 100:.0f}%"
    return _text(v)


def _age(ts: Any, now: float) -> str:
    if not isinstance(ts, int | float):
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 \
        else f"{s / 3600:.1f} h ago"


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
