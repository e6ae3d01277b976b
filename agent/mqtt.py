"""Broker connections on the asyncio loop: reconnect, birth and last will, manual acks.

One `Connection` per broker, speaking MQTT 3.1.1 or 5 through
`agent.mqtt_codec` on an asyncio transport (see the codec's docstring for
why not paho on this path). What must survive a reconnect is held elsewhere:
the broker's persistent session for input (fixed client id, no clean start,
a session expiry), the outbox for output. So a connection keeps no state
across attempts except its configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent import mqtt_codec as codec
from agent.config import BrokerConfig
from agent.errors import ConnectError
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.25
STABLE_AFTER_S = 10.0  # a connection that lasted this long resets the backoff
DEFAULT_RECEIVE_MAXIMUM = 20  # when the broker names none: Mosquitto's own default


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class Inbound:
    """A message from the broker; `ack()` must be called once it is safe to forget.

    Not frozen: one is made per received message (a frozen __init__ costs 1.3 us).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[int, Any] | None
    ack: Callable[[], None]


OnPublished = Callable[[int, str], None]  # (reason code, reason name)


def backoff_s(attempt: int, min_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog), never below `min_s`."""
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return random.uniform(min_s, max(min_s, cap))


class _Protocol(asyncio.Protocol):
    """Bytes in and out for one connection attempt; everything else lives in Connection."""

    def __init__(self, conn: Connection, max_packet: int) -> None:
        self.conn = conn
        self.reader = codec.Reader(max_packet)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small QoS1 packets must not wait for the peer's delayed ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.conn.last_in = time.monotonic()
        try:
            for kind, flags, body in self.reader.feed(data):
                self.conn.handle(self, kind, flags, body)
        except (codec.MalformedPacket, ValueError, IndexError) as exc:
            self.fail(f"malformed packet from the broker: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(f"connection closed{f': {exc}' if exc else ''}")

    def send(self, packet: bytes) -> None:
        """Queue a packet; everything queued in one loop iteration leaves in one write."""
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(packet)

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def fail(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        if self.transport is not None:
            self.transport.abort()


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
        self.v5 = cfg.protocol == "5"
        self.counters = telemetry.component(f"mqtt_{name}")
        self.connected = asyncio.Event()
        self.generation = 0  # bumps per attempt; acks meant for an old one are not sent
        self.server_receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.server_max_packet = 0  # 0: the broker announced no limit
        self.last_in = 0.0
        self._proto: _Protocol | None = None
        self._pending: dict[int, OnPublished] = {}
        self._next_id = 0
        self._connack: asyncio.Future[tuple[bool, int, dict[int, Any]]] | None = None
        self._suback: asyncio.Future[list[int]] | None = None
        self._last_refusal = ""
        self._stopping = False
        self._ssl: ssl.SSLContext | None = None

    # -- the connection loop -----------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect with full-jitter backoff until cancelled or closed."""
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._connect_once()
                self._last_refusal = ""
                reason = await self._serve()
                if not self._stopping:
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
            await asyncio.sleep(backoff_s(attempt, self.cfg.reconnect_min_s,
                                          self.cfg.reconnect_max_s))
            attempt += 1

    def _tls(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=self.cfg.ca)
            if self.cfg.cert:
                ctx.load_cert_chain(self.cfg.cert, self.cfg.key)
            self._ssl = ctx
        return self._ssl

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        self.generation += 1
        self._pending.clear()
        timeout = float(self.cfg.connect_timeout_s)
        try:
            ctx = self._tls()
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _Protocol(self, 268_435_455), self.cfg.host, self.cfg.port, ssl=ctx,
                server_hostname=self.cfg.host if ctx else None), timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise ConnectError(f"cannot reach {self.cfg.url}: {exc or 'timed out'}") from exc
        self._proto = proto
        self._connack = loop.create_future()
        user, password = self.cfg.credentials
        props: dict[int, Any] | None = None
        if self.v5:
            props = {codec.SESSION_EXPIRY: int(self.cfg.session_expiry_s),
                     codec.RECEIVE_MAXIMUM: self.receive_maximum}
        will = codec.WillSpec(self.will.topic, self.will.payload, self.will.qos,
                              self.will.retain) if self.will else None
        proto.send(codec.connect(self.client_id, self.cfg.keepalive_s, v5=self.v5,
                                 clean=self.clean_start, username=user, password=password,
                                 will=will, props=props))
        self.last_in = time.monotonic()
        try:
            waits: list[asyncio.Future[Any]] = [self._connack, proto.lost]
            done, _ = await asyncio.wait(waits, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not self._connack.done():
                self._connack.cancel()
        if self._connack not in done or self._connack.cancelled():
            why = proto.lost.result() if proto.lost.done() else f"no CONNACK within {timeout:g} s"
            raise ConnectError(f"{self.cfg.url}: {why}")
        session_present, reason, server = self._connack.result()
        if reason >= 0x80:
            raise ConnectError(f"{self.cfg.url} refused the connection: "
                               f"{codec.reason_name(reason)} (0x{reason:02X})")
        # MQTT 5 reads an absent Receive Maximum as 65,535; we start at 20 in flight
        # unless the broker names its number (Mosquitto does), as for MQTT 3.1.1.
        self.server_receive_maximum = server.get(codec.RECEIVE_MAXIMUM,
                                                 DEFAULT_RECEIVE_MAXIMUM)
        self.server_max_packet = server.get(codec.MAXIMUM_PACKET_SIZE, 0)
        if self.subscriptions:
            await self._subscribe(proto)
        if self.birth is not None:
            b = self.birth()
            self.publish_raw(b.topic, b.payload, b.qos, b.retain)
        self.counters.inc("connects")
        log.info("%s: connected to %s as %s%s (receive maximum %d)", self.name, self.cfg.url,
                 self.client_id, " (session resumed)" if session_present else "",
                 self.server_receive_maximum)
        self.connected.set()
        if self.on_connected is not None:
            result = self.on_connected()
            if result is not None:
                await result

    async def _subscribe(self, proto: _Protocol) -> None:
        self._suback = asyncio.get_running_loop().create_future()
        proto.send(codec.subscribe(self._packet_id(), self.subscriptions, v5=self.v5))
        waits: list[asyncio.Future[Any]] = [self._suback, proto.lost]
        done, _ = await asyncio.wait(waits,
                                     timeout=float(self.cfg.connect_timeout_s),
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._suback not in done:
            raise ConnectError(f"{self.cfg.url}: no SUBACK")
        for (topic_filter, _), code in zip(self.subscriptions, self._suback.result(),
                                           strict=False):
            if code >= 0x80:  # a refused subscription is a config problem; say which
                log.error("%s: %s refused the subscription to %r: %s", self.name,
                          self.cfg.url, topic_filter, codec.reason_name(code))

    async def _serve(self) -> str:
        """Keep the connection alive until it closes; return why it closed."""
        proto = self._proto
        assert proto is not None
        keepalive = float(self.cfg.keepalive_s)
        pinged = 0.0
        while not proto.lost.done():
            await asyncio.wait([proto.lost], timeout=HOUSEKEEPING_S)
            idle = time.monotonic() - self.last_in
            # A blackhole (socket open, nothing arriving) is caught within 1.25x keepalive:
            # ping after half a keepalive of silence, give up after 1.25x.
            if idle > keepalive * 1.25:
                proto.fail(f"no packet from the broker for {idle:.1f} s "
                           f"(keepalive {self.cfg.keepalive_s} s)")
            elif idle > keepalive / 2 and time.monotonic() - pinged > keepalive / 2:
                proto.send(codec.PINGREQ_BYTES)
                pinged = time.monotonic()
        return proto.lost.result()

    def _teardown(self) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail("closed")
        self._pending.clear()
        if was_connected:
            self.counters.inc("disconnects")
            if self.on_lost is not None:
                self.on_lost()

    # -- packets from the broker ---------------------------------------------------

    def handle(self, proto: _Protocol, kind: int, flags: int, body: bytes) -> None:
        if kind == codec.PUBLISH:
            topic, qos, packet_id, props, payload = codec.read_publish(body, flags, v5=self.v5)
            self.counters.inc("received")
            if qos and self.on_message is None:
                proto.send(codec.puback(packet_id))
            elif self.on_message is not None:
                ack = _noop if not qos else self._acker(proto, packet_id)
                self.on_message(Inbound(topic, payload, qos, bool(flags & 1), props, ack))
        elif kind == codec.PUBACK:
            packet_id, reason = codec.read_ack(body)
            cb = self._pending.pop(packet_id, None)
            if cb is not None:
                cb(reason, codec.reason_name(reason))
        elif kind == codec.CONNACK:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(codec.read_connack(body, v5=self.v5))
        elif kind == codec.SUBACK:
            _, codes = codec.read_suback(body, v5=self.v5)
            if self._suback is not None and not self._suback.done():
                self._suback.set_result(codes)
        elif kind == codec.DISCONNECT:
            reason = codec.read_disconnect(body)
            proto.fail(f"the broker disconnected us: {codec.reason_name(reason)}")
        elif kind != codec.PINGRESP:
            proto.fail(f"unexpected packet type {kind}")

    def _acker(self, proto: _Protocol, packet_id: int) -> Callable[[], None]:
        def ack() -> None:
            # Only on the connection that delivered it: after a reconnect the broker
            # redelivers unacknowledged messages itself.
            if self._proto is proto:
                proto.send(codec.puback(packet_id))
        return ack

    # -- publishing --------------------------------------------------------------

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending:
                return self._next_id
        raise ConnectError(f"{self.name}: all 65535 packet identifiers are in flight")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                user_properties: tuple[tuple[str, str], ...] = (),
                expiry_s: int | None = None,
                on_published: OnPublished | None = None) -> None:
        """Queue one PUBLISH; `on_published(reason_code, name)` runs at its PUBACK.

        With MQTT 5 a PUBACK may carry a failure reason code (e.g. 0x87 not
        authorised): the callback gets the code and decides.
        """
        if not self.connected.is_set():
            raise ConnectError(f"{self.name}: not connected to {self.cfg.url}")
        self.publish_raw(topic, payload, qos, retain, user_properties, expiry_s, on_published)

    def publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool,
                    user_properties: tuple[tuple[str, str], ...] = (),
                    expiry_s: int | None = None,
                    on_published: OnPublished | None = None) -> None:
        proto = self._proto
        if proto is None:
            raise ConnectError(f"{self.name}: not connected to {self.cfg.url}")
        props = b"\x00"
        if self.v5 and len(user_properties) == 1:  # the idempotency key: the hot path
            (name, value), = user_properties
            props = codec.key_properties(name, value, expiry_s)
        elif self.v5 and (user_properties or expiry_s is not None):
            p: dict[int, Any] = {}
            if expiry_s is not None:
                p[codec.MESSAGE_EXPIRY] = expiry_s
            if user_properties:
                p[codec.USER_PROPERTY] = user_properties
            props = codec.properties(p)
        packet_id = self._packet_id() if qos else 0
        proto.send(codec.publish(topic, payload, qos, retain, packet_id, v5=self.v5,
                                 props=props))
        self.counters.inc("published")
        if on_published is not None:
            if qos:
                self._pending[packet_id] = on_published
            else:
                on_published(0, "Success")

    async def close(self, last: Will | None = None, timeout_s: float = 2.0) -> None:
        """Publish `last` (e.g. status offline), wait for its PUBACK, disconnect cleanly."""
        self._stopping = True  # no reconnect, so no second birth after the last word
        proto = self._proto
        if proto is None or not self.connected.is_set():
            return
        if last is not None:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def published(rc: int, _name: str) -> None:
                if not done.done():
                    done.set_result(rc)
            try:
                self.publish_raw(last.topic, last.payload, last.qos, last.retain,
                                 on_published=published)
                await asyncio.wait_for(done, timeout_s)
            except (ConnectError, TimeoutError):
                log.warning("%s: could not deliver the final status message", self.name)
        proto.send(codec.disconnect(v5=self.v5))
        proto.flush()
        if proto.transport is not None:
            proto.transport.close()


def _noop() -> None:
    return None


def free_port() -> int:
    """An unused TCP port on loopback (for demos and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
