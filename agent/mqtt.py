"""Broker connections on the asyncio loop: reconnect, birth and last will, manual acks.

paho-mqtt does the protocol; this module drives it with its external-loop
API (`loop_read` / `loop_write` / `loop_misc` on the event loop's own socket
readiness), so every paho call happens on the loop thread without paho's
locks contending. A fresh paho client is made per connection attempt:
paho's session lives in memory only, and what must survive a reconnect is
held elsewhere (the broker's persistent session for input, the outbox for
output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import ConnectError
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 0.25
STABLE_AFTER_S = 10.0  # a connection that lasted this long resets the backoff
DEFAULT_RECEIVE_MAXIMUM = 20  # MQTT 5 default when the CONNACK names none; Mosquitto's too


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from the broker; `ack()` must be called once it is safe to forget."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    ack: Callable[[], None]


OnPublished = Callable[[int, str], None]  # (reason code value, reason name)


def backoff_s(attempt: int, min_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog): uniform in [min, cap]."""
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return random.uniform(min_s, max(min_s, cap))


class Connection:
    """One broker: connects, keeps connecting, and tells its owner what happens.

    `on_connected` runs after each successful CONNACK (subscriptions and the
    birth message are already sent); `on_lost` after each drop. Publishing
    while disconnected raises `ConnectError`: the outbox decides what to do.
    """

    def __init__(self, name: str, cfg: BrokerConfig, client_id: str, telemetry: Telemetry, *,
                 will: Will | None = None, birth: Callable[[], Will] | None = None,
                 subscriptions: tuple[tuple[str, int], ...] = (),
                 on_message: Callable[[Inbound], None] | None = None,
                 on_connected: Callable[[], Awaitable[None] | None] | None = None,
                 on_lost: Callable[[], None] | None = None,
                 receive_maximum: int = 1000, clean_start: bool = False) -> None:
        self.name = name
        self.cfg = cfg
        self.client_id = client_id
        self.will = will
        self.birth = birth
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.receive_maximum = receive_maximum
        self.clean_start = clean_start
        self.counters = telemetry.component(f"mqtt_{name}")
        self.connected = asyncio.Event()
        self.generation = 0  # bumps per connection; acks from an old one are not sent
        self.server_receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.server_max_packet = 0  # 0: no limit announced
        self._client: paho.Client | None = None
        self._pending: dict[int, OnPublished] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._connack: asyncio.Future[tuple[ReasonCode, Properties | None, bool]] | None = None
        self._closed: asyncio.Future[str] | None = None
        self._last_in = 0.0
        self._last_refusal = ""
        self._stopping = False

    @property
    def mqtt5(self) -> bool:
        return self.cfg.protocol == "5"

    # -- the connection loop -------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect forever, with full-jitter backoff, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        attempt = 0
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    await self._connect_once()
                    self._last_refusal = ""
                    reason = await self._serve()
                    log.warning("%s: connection to %s lost: %s", self.name, self.cfg.url, reason)
                except ConnectError as exc:
                    text = str(exc)
                    if text != self._last_refusal:  # once per distinct reason, not per retry
                        log.error("%s: %s", self.name, text)
                        self._last_refusal = text
                    self.counters.inc("connect_failures")
                finally:
                    self._teardown()
                if self._stopping:
                    return
                if time.monotonic() - started > STABLE_AFTER_S:
                    attempt = 0
                delay = backoff_s(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            self._teardown()

    def _new_client(self) -> paho.Client:
        protocol = paho.MQTTv5 if self.mqtt5 else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
            clean_session=None if self.mqtt5 else self.clean_start, manual_ack=True,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho.{self.name}"))
        client.max_inflight_messages_set(0)  # our outbox windows in-flight itself
        client.max_queued_messages_set(0)
        client.connect_timeout = float(self.cfg.connect_timeout_s)
        user, password = self.cfg.credentials
        if user is not None:
            client.username_pw_set(user, password)
        if self.cfg.tls:
            ctx = ssl.create_default_context(cafile=self.cfg.ca)
            if self.cfg.cert:
                ctx.load_cert_chain(self.cfg.cert, self.cfg.key)
            client.tls_set_context(ctx)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_socket_close = self._on_socket_close
        return client

    async def _connect_once(self) -> None:
        assert self._loop is not None
        self.generation += 1
        client = self._client = self._new_client()
        self._pending.clear()
        self._connack = self._loop.create_future()
        self._closed = self._loop.create_future()
        props: Properties | None = None
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
            props.SessionExpiryInterval = int(self.cfg.session_expiry_s)
            props.ReceiveMaximum = self.receive_maximum
        try:
            # A blocking socket connect and TLS handshake: keep them off the loop.
            await asyncio.to_thread(
                client.connect, self.cfg.host, self.cfg.port, self.cfg.keepalive_s,
                clean_start=self.clean_start if self.mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConnectError(f"cannot reach {self.cfg.url}: {exc}") from exc
        sock = client.socket()
        if sock is None:
            raise ConnectError(f"cannot reach {self.cfg.url}: no socket")
        # paho leaves Nagle on: small QoS1 PUBLISHes then wait for the peer's delayed ACK
        # and throughput collapses to a few thousand per second.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, self._readable)
        if client.want_write():
            self._loop.add_writer(sock, self._writable)
        self._last_in = time.monotonic()
        misc = asyncio.create_task(self._misc_until(self._connack), name=f"mqtt:{self.name}:misc")
        try:
            reason, properties, _session = await asyncio.wait_for(
                asyncio.shield(self._connack), timeout=float(self.cfg.connect_timeout_s))
        except TimeoutError as exc:
            raise ConnectError(f"no CONNACK from {self.cfg.url} within "
                               f"{self.cfg.connect_timeout_s:g} s") from exc
        finally:
            misc.cancel()
        if reason.is_failure:
            raise ConnectError(f"{self.cfg.url} refused the connection: {reason.getName()} "
                               f"({reason.value})")
        if properties is not None:
            self.server_receive_maximum = getattr(properties, "ReceiveMaximum",
                                                  DEFAULT_RECEIVE_MAXIMUM)
            self.server_max_packet = getattr(properties, "MaximumPacketSize", 0)
        for topic_filter, qos in self.subscriptions:
            client.subscribe(topic_filter, qos)
        if self.birth is not None:
            b = self.birth()
            client.publish(b.topic, b.payload, b.qos, b.retain)
        self.counters.inc("connects")
        log.info("%s: connected to %s as %s", self.name, self.cfg.url, self.client_id)
        self.connected.set()
        if self.on_connected is not None:
            result = self.on_connected()
            if result is not None:
                await result

    async def _serve(self) -> str:
        """Run paho's housekeeping until the connection closes; return why."""
        assert self._closed is not None
        return str(await self._misc_until(self._closed))

    async def _misc_until(self, fut: asyncio.Future[Any]) -> Any:
        keepalive = float(self.cfg.keepalive_s)
        while not fut.done():
            client = self._client
            if client is None:
                break
            client.loop_misc()
            idle = time.monotonic() - self._last_in
            # Catch a blackhole (socket open, nothing arriving) within 1.25x keepalive:
            # ping after half a keepalive of silence, give up after 1.25x.
            if idle > keepalive * 1.25:
                self._fail(f"no packet from the broker for {idle:.1f} s "
                           f"(keepalive {self.cfg.keepalive_s} s)")
                break
            if idle > keepalive / 2 and client.is_connected():
                client._send_pingreq()  # paho pings only after a full keepalive
            # Not wait_for: on 3.11 it swallows a cancel that lands as `fut` completes.
            await asyncio.wait([fut], timeout=MISC_INTERVAL_S)
        return await fut

    def _fail(self, reason: str) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(reason)
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectError(f"{self.cfg.url}: {reason}"))

    def _teardown(self) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            try:
                sock_obj = client.socket()
                if sock_obj is not None:
                    sock_obj.close()
            except OSError:
                pass
        if self._connack is not None and not self._connack.done():
            self._connack.cancel()
        if was_connected:
            self.counters.inc("disconnects")
            if self.on_lost is not None:
                self.on_lost()
        self._pending.clear()

    # -- socket readiness ----------------------------------------------------

    def _readable(self) -> None:
        client = self._client
        if client is None:
            return
        self._last_in = time.monotonic()
        rc = client.loop_read()
        sock = client.socket()
        # TLS may hold decrypted bytes the selector cannot see.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) \
                and sock.pending():
            rc = client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._fail(f"read failed: {paho.error_string(rc)}")

    def _writable(self) -> None:
        client = self._client
        if client is None:
            return
        rc = client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._fail(f"write failed: {paho.error_string(rc)}")

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self._loop.add_writer(sock, self._writable)  # type: ignore[union-attr]
                      if client is self._client else None)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self._loop.remove_writer(sock))  # type: ignore[union-attr]

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def close() -> None:
            assert self._loop is not None
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            if client is self._client:
                self._fail("socket closed")
        self._on_loop(close)

    def _on_loop(self, fn: Callable[[], Any]) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn()
        else:  # paho's connect() ran in a worker thread
            self._loop.call_soon_threadsafe(fn)

    # -- paho callbacks (all on the loop thread) -------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((reason, properties, bool(flags.session_present)))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if client is self._client:
            self._fail(f"disconnected: {reason.getName() if reason is not None else 'unknown'}")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.counters.inc("received")
        if self.on_message is None:
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        ack = _NOOP if msg.qos == 0 else self._acker(msg.mid, msg.qos)
        self.on_message(Inbound(msg.topic, bytes(msg.payload), msg.qos, msg.retain,
                                getattr(msg, "properties", None), ack))

    def _acker(self, mid: int, qos: int) -> Callable[[], None]:
        generation = self.generation

        def ack() -> None:
            # A PUBACK for an earlier connection's packet id would acknowledge the wrong
            # message: the broker redelivers those after the reconnect instead.
            client = self._client
            if client is not None and self.generation == generation:
                client.ack(mid, qos)
        return ack

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        cb = self._pending.pop(mid, None)
        if cb is not None:
            cb(reason.value, reason.getName())

    # -- publishing ------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                user_properties: tuple[tuple[str, str], ...] = (),
                expiry_s: int | None = None,
                on_published: OnPublished | None = None) -> None:
        """Queue one PUBLISH; `on_published(reason_code, name)` runs at its PUBACK.

        With MQTT 5 a PUBACK may carry a failure reason code (e.g. 135 not
        authorised); paho still calls that "published", so the callback gets the code.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectError(f"{self.name}: not connected to {self.cfg.url}")
        properties = self.new_properties()
        if properties is not None:
            if user_properties:
                properties.UserProperty = list(user_properties)
            if expiry_s is not None:
                properties.MessageExpiryInterval = expiry_s
        info = client.publish(topic, payload, qos, retain, properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectError(f"{self.name}: publish failed: {paho.error_string(info.rc)}")
        self.counters.inc("published")
        if on_published is not None:
            if qos == 0:
                on_published(0, "Success")
            else:
                self._pending[info.mid] = on_published

    def new_properties(self) -> Properties | None:
        if not self.mqtt5:
            return None
        return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho untyped

    async def close(self, last: Will | None = None, timeout_s: float = 2.0) -> None:
        """Publish `last` (e.g. status offline), wait for its PUBACK, then disconnect cleanly."""
        self._stopping = True  # no reconnect, and so no second birth after the last word
        client = self._client
        if client is None or not self.connected.is_set():
            return
        if last is not None:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def published(rc: int, _name: str) -> None:
                if not done.done():
                    done.set_result(rc)
            try:
                self.publish(last.topic, last.payload, last.qos, last.retain,
                             on_published=published)
                await asyncio.wait_for(done, timeout_s)
            except (ConnectError, TimeoutError):
                log.warning("%s: could not deliver the final status message", self.name)
        client.disconnect()
        client.loop_write()


def _noop() -> None:
    return None


_NOOP = _noop


def free_port() -> int:
    """An unused TCP port on loopback (for demos and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
