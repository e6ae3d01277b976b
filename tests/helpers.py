"""Small paho-based MQTT clients for tests: a subscriber that records, a publisher.

They talk to the real brokers from `conftest.py`. Every wait has a timeout and
fails with what did arrive, so a hung test says why.
"""

from __future__ import annotations

import itertools
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEFAULT_TIMEOUT_S = 10.0
_ids = itertools.count()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    properties: dict[str, Any]
    qos: int
    retain: bool

    def text(self) -> str:
        return self.payload.decode()


@dataclass(frozen=True)
class Tls:
    """Client-side TLS material: a CA, and for mTLS a certificate and key."""

    ca: str
    cert: str | None = None
    key: str | None = None


def unique_topic(prefix: str = "test") -> str:
    """A topic no other test uses (aiomqtt's habit: one topic per test)."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def make_client(
    url: str,
    *,
    client_id: str | None = None,
    protocol: int = mqtt.MQTTv5,
    tls: Tls | None = None,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
) -> mqtt.Client:
    """A paho client for `url` (mqtt:// or mqtts://), not yet connected."""
    cid = client_id or f"test-{next(_ids)}-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol,
        clean_session=None if protocol == mqtt.MQTTv5 else clean,
    )
    parts = urlsplit(url)
    user = username or (unquote(parts.username) if parts.username else None)
    pw = password or (unquote(parts.password) if parts.password else None)
    if user is not None:
        client.username_pw_set(user, pw)
    if parts.scheme in ("mqtts", "ssl"):
        if tls is None:
            raise ValueError(f"{url}: mqtts needs tls=Tls(ca=...)")
        client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def connect(client: mqtt.Client, url: str, clean: bool = True,
            timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Connect and wait for a successful CONNACK; raise with the reason otherwise."""
    parts = urlsplit(url)
    done = threading.Event()
    result: list[Any] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result.append(rc)
        done.set()

    def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        # Closed before any CONNACK, e.g. a TLS peer that rejected our certificate.
        if not done.is_set():
            result.append(rc)
            done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    port = parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
    kwargs: dict[str, Any] = {}
    if client.protocol == mqtt.MQTTv5:
        kwargs["clean_start"] = clean
        if not clean:  # a session that outlives the connection needs an expiry
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs["properties"] = props
    client.connect(parts.hostname or "127.0.0.1", port, keepalive=30, **kwargs)
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise TimeoutError(f"no CONNACK from {url} within {timeout}s")
    rc = result[0]
    client.on_disconnect = None
    if rc.is_failure:
        client.loop_stop()
        raise ConnectionError(f"{url} refused or closed the connection: {rc}")


class Collector:
    """Subscribes to one or more filters and records every message, thread-safely.

        with Collector(broker.url, "fog/#") as c:
            ...
            msgs = c.wait_for(3)
    """

    def __init__(
        self,
        url: str,
        topics: str | Sequence[str] = "#",
        *,
        qos: int = 1,
        tls: Tls | None = None,
        protocol: int = mqtt.MQTTv5,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        clean: bool = True,
    ) -> None:
        self.url = url
        self.clean = clean
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.qos = qos
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._suback = threading.Event()
        self.client = make_client(
            url, client_id=client_id, protocol=protocol, tls=tls,
            username=username, password=password, clean=clean,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props: dict[str, Any] = {}
        if isinstance(msg.properties, Properties):
            props = {k: v for k, v in msg.properties.json().items() if v is not None}
        rec = Received(msg.topic, bytes(msg.payload), props, msg.qos, bool(msg.retain))
        with self._cond:
            self.messages.append(rec)
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: Any, props: Any = None) -> None:
        self._suback.set()

    def start(self, timeout: float = DEFAULT_TIMEOUT_S) -> Collector:
        """Connect and subscribe; returns once the SUBACK is in, so nothing is missed."""
        connect(self.client, self.url, clean=self.clean, timeout=timeout)
        self._suback.clear()
        self.client.subscribe([(t, self.qos) for t in self.topics])
        if not self._suback.wait(timeout):
            raise TimeoutError(f"no SUBACK from {self.url} for {self.topics}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def reconnect(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Connect again (after a broker restart), resuming a persistent session."""
        self.client.loop_stop()
        connect(self.client, self.url, clean=self.clean, timeout=timeout)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, n: int, timeout: float = DEFAULT_TIMEOUT_S,
                 topic: str | None = None) -> list[Received]:
        """Block until at least `n` messages (on `topic`, if given) arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self._select(topic)
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = ", ".join(sorted({m.topic for m in self.messages})[:10])
                    raise AssertionError(
                        f"wanted {n} messages{f' on {topic}' if topic else ''} within "
                        f"{timeout}s, got {len(got)} (topics seen: {seen or 'none'})"
                    )
                self._cond.wait(left)

    def _select(self, topic: str | None) -> list[Received]:
        if topic is None:
            return list(self.messages)
        return [m for m in self.messages if mqtt.topic_matches_sub(topic, m.topic)]

    def snapshot(self, topic: str | None = None) -> list[Received]:
        with self._cond:
            return self._select(topic)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()


def publish_many(
    url: str,
    topic: str,
    payloads: Iterable[bytes | str],
    qos: int = 1,
    *,
    retain: bool = False,
    tls: Tls | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    protocol: int = mqtt.MQTTv5,
) -> int:
    """Publish every payload to `topic` and wait for all acknowledgements; return the count."""
    client = make_client(url, protocol=protocol, tls=tls)
    connect(client, url, timeout=timeout)
    try:
        infos = [client.publish(topic, p, qos=qos, retain=retain) for p in payloads]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"publish to {url} {topic} not acknowledged in {timeout}s")
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


def publish_one(url: str, topic: str, payload: bytes | str, qos: int = 1, *,
                retain: bool = False, tls: Tls | None = None) -> None:
    publish_many(url, topic, [payload], qos=qos, retain=retain, tls=tls)
