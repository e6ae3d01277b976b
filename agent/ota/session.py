"""The operator's connection to the broker, shared by `fogwhisk model push`, `status` and
`rollout`: where to connect (`Broker`) and one paho client on its thread (`_Session`).

paho-mqtt, threaded: short-lived operator tools (the agent itself never imports this
module). paho reports a PUBACK with an MQTT 5 failure reason code as published, so the
callers check every reason code (`_reason` names it).
"""

from __future__ import annotations

import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from agent.errors import ConfigError, ConnectError
from agent.urls import redact_url

INFLIGHT = 32  # QoS 1 chunks unacknowledged at once (less if the broker says so)
FENCE_S = 5.0  # the longest wait for the retained messages behind a fence
_LEVEL = re.compile(r"[^/+#\x00]+")  # one topic level: a model name, a device id


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
