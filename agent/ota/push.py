"""`fogwhisk model push`: the operator's upload of a release over MQTT.

push uploads a packed artifact once, as retained QoS 1 chunks the devices fetch over
the connection they already have (agent.ota.fetch_mqtt.MqttChunkFetcher), then publishes
the release retained on each device's deploy topic:

    <prefix>/_artifacts/<sha256>/<index>      64 KiB each, index from 0
    <prefix>/_artifacts/<sha256>/info         {"size", "chunk_bytes", "chunks", "sha256"},
                                              published last: there means complete
    <prefix>/<device>/models/<name>/deploy    the release document (+ "locations")

Every PUBACK's reason code is checked (paho reports a failure code as published): "exit 0"
means the broker accepted every message. The connection is agent.ota.session's; `status`
(agent.ota.status), `Broker`, `_Session` and `INFLIGHT` are re-exported here, where the
CLI and the rollout look them up.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from agent.errors import ConfigError, ConnectError, OtaError, ReleaseError
from agent.ota.fetch_mqtt import CHUNK_BYTES, PACKET_OVERHEAD
from agent.ota.session import _LEVEL, INFLIGHT, Broker, _reason, _Session
from agent.ota.status import status

__all__ = ["EXIT_OK", "INFLIGHT", "Broker", "_Session", "push", "status"]

EXIT_OK = 0


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
