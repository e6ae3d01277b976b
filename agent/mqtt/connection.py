"""Broker connections on the asyncio loop: reconnect, birth and last will, manual acks.

One `Connection` per broker (or cluster: its endpoints, and the MQTT version
each speaks, are `agent.mqtt.endpoints`), speaking MQTT 3.1.1 or 5 through
`agent.mqtt.codec` on an asyncio transport (`agent.mqtt.transport`; see the
codec's docstring for why not paho on this path). What must survive a
reconnect is held elsewhere: the broker's persistent session for input (fixed
client id, no clean start, a session expiry), the outbox for output. So a
connection keeps no state across attempts except its configuration, the
endpoint it is at and the version each endpoint answered in.

A broker that breaks the protocol (a malformed packet, a topic that is no
valid name, a topic alias we never allowed, QoS 2 where we subscribed at
QoS 1, a packet above the Maximum Packet Size we advertised) is answered
with a DISCONNECT carrying the MQTT 5 reason code and a fresh connection:
what it sent is never acknowledged nor handed on. Every close is logged with
its reason, a repeated one once per burst (`agent.mqtt.closes`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.config import BrokerConfig
from agent.errors import ConnectError
from agent.mqtt import codec, topics
from agent.mqtt.closes import STABLE_AFTER_S, Closes
from agent.mqtt.endpoints import CLOSED_BEFORE_CONNACK, Endpoint, Endpoints, backoff_s
from agent.mqtt.transport import PacketProtocol
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

# Keepalive checks: an eighth of the keepalive, between these bounds (30 s -> 1 s, 2 s ->
# 0.25 s): an idle agent wakes a few times a second, not eight.
HOUSEKEEPING_S = 0.25
HOUSEKEEPING_MAX_S = 1.0
DEFAULT_RECEIVE_MAXIMUM = 20  # when the broker names none: Mosquitto's own default
# The Maximum Packet Size we advertise (MQTT 5) and enforce (both versions), counting
# the whole packet. A connection without a message handler (the uplink) receives only
# CONNACK, PUBACK, SUBACK and DISCONNECT; a broker drops their optional properties
# rather than exceed it.
ACKS_MAX_PACKET_BYTES = 65_536
# One with a handler (the local bus) receives camera frames: the largest raw frame the
# decode step takes without a memory budget (16 Mpx BGR, 48 MB, agent.vision.frames) fits as
# msgpack with room; a 256 MB announcement does not. `max_packet_bytes` sets it tighter.
MESSAGES_MAX_PACKET_BYTES = 64 * 2**20
KEEPALIVE_GRACE = 1.25  # keepalives without a complete packet before giving up
CHECKED_TOPICS = 10_000  # inbound topic names known valid; cleared when full (stays bounded)


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
Handler = Callable[[Inbound], None]


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
                 receive_maximum: int = 1000, clean_start: bool = False,
                 max_packet_bytes: int | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.endpoints = Endpoints(name, cfg)
        self.client_id = client_id
        self.will = will
        self.birth = birth
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.receive_maximum = receive_maximum
        self.clean_start = clean_start
        self.max_packet = max_packet_bytes or (
            MESSAGES_MAX_PACKET_BYTES if on_message is not None else ACKS_MAX_PACKET_BYTES)
        self.v5 = self.endpoints.v5()  # the version of the current (or next) attempt
        self.counters = telemetry.component(f"mqtt_{name}")
        self.connected = asyncio.Event()
        self.generation = 0  # bumps per attempt; acks meant for an old one are not sent
        self.server_receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.server_max_packet = 0  # 0: the broker announced no limit
        self.last_in = 0.0
        self._proto: PacketProtocol | None = None
        self._pending: dict[int, OnPublished] = {}
        self._next_id = 0
        self._connack: asyncio.Future[tuple[bool, int, dict[int, Any]]] | None = None
        self._suback: asyncio.Future[list[int]] | None = None
        # Subscriptions added at run time (`subscribe`): filter -> (QoS, handler). Sent
        # again at each connect with the fixed ones; their messages go to their handler.
        self._routes: dict[str, tuple[int, Handler]] = {}
        self._acks: dict[int, asyncio.Future[list[int]]] = {}  # (UN)SUBACKs awaited, by id
        self._last_refusal = ""
        self._refused_v5 = ""  # how the endpoint refused this attempt's MQTT 5 CONNECT
        self._stopping = False
        self._ssl: ssl.SSLContext | None = None
        self.closes = Closes(name, client_id, self.counters, log)  # repeated lines, takeovers
        self._valid_topics: set[str] = set()

    # -- the connection loop -----------------------------------------------------

    async def run(self) -> None:
        """Connect and reconnect with full-jitter backoff until cancelled or closed."""
        attempt = 0  # the backoff's exponent; a connection that lasted resets it
        tries = 0  # attempts since the link went down
        down_since = time.monotonic()
        while not self._stopping:
            started = time.monotonic()
            tries += 1
            self._refused_v5 = ""
            try:
                await self._connect_once()
                connected_at = time.monotonic()
                if tries > 1:
                    log.info("%s down %.0f s, %d attempts", self.name,
                             connected_at - down_since, tries)
                self._last_refusal = ""
                why = await self._serve(connected_at)
                down_since, tries = time.monotonic(), 0
            except ConnectError as exc:
                why = str(exc)
                if self._refused_v5 and self.endpoints.fall_back(self._refused_v5):
                    continue  # at once, in MQTT 3.1.1 (after the teardown below)
                if why != self._last_refusal:  # once per distinct reason, not per retry
                    log.error("%s: %s", self.name, why)
                    self._last_refusal = why
                self.counters.inc("connect_failures")
            finally:
                self._teardown()
            if self._stopping:
                return
            self._fail_over(why)
            if time.monotonic() - started > STABLE_AFTER_S:
                attempt = 0
            delay = backoff_s(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
            if tries:
                log.debug("%s: attempt %d failed: %s; next in %.1f s", self.name, tries, why,
                          delay)
            else:
                log.debug("%s: reconnecting in %.1f s", self.name, delay)
            await asyncio.sleep(delay)
            attempt += 1

    def _fail_over(self, why: str) -> None:
        """After a failed attempt or a lost connection: on to the next endpoint, if any."""
        old = self.endpoints.current
        new = self.endpoints.advance()
        if new is None:
            return
        self.counters.inc("failovers")
        self.closes.say(logging.INFO, f"failover:{old.where}>{new.where}",
                  "%s: failing over from %s to %s (%s)", self.name, old.where, new.where, why)

    @property
    def where(self) -> str:
        """The endpoint in use (or tried next), for messages: never the password."""
        return self.endpoints.current.where

    @property
    def protocol(self) -> str:
        """The MQTT version of the connection in use (or of the next attempt)."""
        return "5" if self.v5 else "3.1.1"

    def _tls(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        if not endpoint.tls:
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
        ep = self.endpoints.current
        self.v5 = self.endpoints.v5()
        try:
            ctx = self._tls(ep)
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: PacketProtocol(self, self.max_packet), ep.host, ep.port,
                ssl=ctx, server_hostname=ep.host if ctx else None), timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.endpoints.unanswered()
            raise ConnectError(f"cannot reach {ep.where}: {exc or 'timed out'}") from exc
        self._proto = proto
        self._connack = loop.create_future()
        user, password = self.cfg.credentials_for(ep.url)
        props: dict[int, Any] | None = None
        if self.v5:
            props = {codec.SESSION_EXPIRY: int(self.cfg.session_expiry_s),
                     codec.RECEIVE_MAXIMUM: self.receive_maximum,
                     codec.MAXIMUM_PACKET_SIZE: self.max_packet}
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
            self.endpoints.unanswered()
            why = proto.lost.result() if proto.lost.done() else f"no CONNACK within {timeout:g} s"
            if self.v5 and proto.hung_up:  # how RabbitMQ 3.x refuses MQTT 5
                self._refused_v5 = CLOSED_BEFORE_CONNACK
                if self.cfg.protocol == "5":
                    why += self.endpoints.closed_hint()
            raise ConnectError(f"{ep.where}: {why}")
        session_present, reason, server = self._connack.result()
        self.endpoints.answered(self.v5, reason)
        if reason >= 0x80:
            if self.v5 and reason == codec.UNSUPPORTED_PROTOCOL_VERSION:  # NATS 2.9's way
                self._refused_v5 = f"CONNACK {codec.reason_name(reason)} (0x{reason:02X})"
            raise ConnectError(self.endpoints.refusal(reason, self.v5))
        # MQTT 5 reads an absent Receive Maximum as 65,535; we start at 20 in flight
        # unless the broker names its number (Mosquitto does), as for MQTT 3.1.1.
        self.server_receive_maximum = server.get(codec.RECEIVE_MAXIMUM,
                                                 DEFAULT_RECEIVE_MAXIMUM)
        self.server_max_packet = server.get(codec.MAXIMUM_PACKET_SIZE, 0)
        if self.subscriptions or self._routes:
            await self._subscribe(proto)
        if self.birth is not None:
            b = self.birth()
            self.publish_raw(b.topic, b.payload, b.qos, b.retain)
        self.counters.inc("connects")
        self.counters.info.update(endpoint=ep.where, protocol=self.protocol)
        log.info("%s: connected to %s with MQTT %s as %s%s (receive maximum %d)", self.name,
                 ep.where, self.protocol, self.client_id,
                 " (session resumed)" if session_present else "", self.server_receive_maximum)
        self.connected.set()
        if self.on_connected is not None:
            result = self.on_connected()
            if result is not None:
                await result

    async def _subscribe(self, proto: PacketProtocol) -> None:
        self._suback = asyncio.get_running_loop().create_future()
        subscriptions = self.subscriptions + tuple((f, q) for f, (q, _) in self._routes.items())
        proto.send(codec.subscribe(self._packet_id(), subscriptions, v5=self.v5))
        waits: list[asyncio.Future[Any]] = [self._suback, proto.lost]
        done, _ = await asyncio.wait(waits,
                                     timeout=float(self.cfg.connect_timeout_s),
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._suback not in done:
            why = proto.lost.result() if proto.lost.done() else "no SUBACK"
            raise ConnectError(f"{self.where}: {why}")
        for (topic_filter, _), code in zip(subscriptions, self._suback.result(),
                                           strict=False):
            if code >= 0x80:  # a refused subscription is a config problem; say which
                log.error("%s: %s refused the subscription to %r: %s", self.name,
                          self.where, topic_filter, codec.reason_name(code))

    async def _serve(self, connected_at: float) -> str:
        """Keep the connection alive until it closes; log and return why it closed."""
        proto = self._proto
        assert proto is not None
        keepalive = float(self.cfg.keepalive_s)
        every_s = min(HOUSEKEEPING_MAX_S, max(HOUSEKEEPING_S, keepalive / 8))
        pinged = 0.0
        while not proto.lost.done():
            await asyncio.wait([proto.lost], timeout=every_s)
            idle = time.monotonic() - self.last_in
            # A blackhole (socket open, no complete packet arriving) is caught within
            # 1.25x keepalive: ping after half a keepalive of silence, give up after 1.25x.
            if idle > keepalive * KEEPALIVE_GRACE:
                proto.fail(f"no complete packet from the broker for {idle:.1f} s "
                           f"(keepalive {self.cfg.keepalive_s} s)")
            elif idle > keepalive / 2 and time.monotonic() - pinged > keepalive / 2:
                proto.send(codec.PINGREQ_BYTES)
                pinged = time.monotonic()
        why = proto.lost.result()
        if not self._stopping:
            self.closes.say(logging.WARNING, f"lost:{why}", "%s: connection to %s lost: %s",
                      self.name, self.where, why)
            self.closes.closed(proto.broker_reason, proto.closed_by_broker,
                               time.monotonic() - connected_at)
        return why

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

    def handle(self, proto: PacketProtocol, kind: int, flags: int, body: bytes) -> Inbound | None:
        """Act on one packet; a PUBLISH for the message handler is returned, not delivered.

        Raises MalformedPacket (or ProtocolError) when the broker broke the protocol.
        """
        if kind == codec.PUBLISH:
            topic, qos, packet_id, props, payload = codec.read_publish(body, flags, v5=self.v5)
            if props is not None and codec.TOPIC_ALIAS in props:
                raise codec.ProtocolError(0x94, f"topic alias {props[codec.TOPIC_ALIAS]} on "
                                                f"{topic[:80]!r}, but we allow none")
            if topic not in self._valid_topics:  # a sensor bus has few: check each once
                try:
                    topics.validate_name(topic)
                except ValueError as exc:
                    raise codec.ProtocolError(0x90, str(exc)) from None
                if len(self._valid_topics) >= CHECKED_TOPICS:
                    self._valid_topics.clear()
                self._valid_topics.add(topic)
            if qos == 2:
                raise codec.ProtocolError(0x9B, f"QoS 2 on {topic[:80]!r}: we subscribe "
                                                "at QoS 1 at most")
            self.counters.inc("received")
            if self.on_message is None and not self._routes:
                if qos:
                    proto.send(codec.puback(packet_id))
                return None
            ack = _noop if not qos else self._acker(proto, packet_id)
            return Inbound(topic, payload, qos, bool(flags & 1), props, ack)
        if flags:
            raise codec.MalformedPacket(f"packet type {kind} with reserved flags 0x{flags:X}")
        if kind == codec.PUBACK:
            packet_id, reason = codec.read_ack(body, v5=self.v5)
            cb = self._pending.pop(packet_id, None)
            if cb is not None:
                self._published(proto, cb, reason)
        elif kind == codec.CONNACK:
            connack = codec.read_connack(body, v5=self.v5)
            if self._connack is None or self._connack.done():
                raise codec.ProtocolError(0x82, "a CONNACK on an open connection")
            self._connack.set_result(connack)
        elif kind == codec.SUBACK:
            packet_id, codes = codec.read_suback(body, v5=self.v5)
            waiter = self._acks.pop(packet_id, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(codes)
            elif self._suback is not None and not self._suback.done():
                self._suback.set_result(codes)
        elif kind == codec.UNSUBACK:
            packet_id, codes = codec.read_unsuback(body, v5=self.v5)
            waiter = self._acks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(codes)
        elif kind == codec.DISCONNECT:
            reason, text = codec.read_disconnect(body, v5=self.v5)
            proto.broker_reason = reason
            proto.fail(f"the broker disconnected us: {codec.reason_name(reason)} "
                       f"(0x{reason:02X}){f': {text}' if text else ''}")
        elif kind == codec.PINGRESP:
            if body:
                raise codec.MalformedPacket(f"PINGRESP of {len(body)} bytes (0)")
        else:
            raise codec.ProtocolError(0x82, f"packet type {kind} is not for a client")
        return None

    def _published(self, proto: PacketProtocol, cb: OnPublished, reason: int) -> None:
        try:
            cb(reason, codec.reason_name(reason))
        except Exception:
            # Whatever the owner recorded is in doubt: start over, and everything
            # unacknowledged goes again (at least once).
            self.counters.inc("handler_errors")
            self.closes.say(logging.ERROR, "published", "%s: the on_published callback failed; "
                      "reconnecting", self.name, exc_info=True)
            proto.fail("the on_published callback failed")

    def deliver(self, msg: Inbound) -> None:
        """Hand a message to the handler; its failure is its own, not the broker's."""
        handler = self.on_message
        if self._routes:
            handler = self._route(msg.topic) or handler
        if handler is None:  # a run-time subscription already removed: nobody wants it
            self.counters.inc("unrouted")
            msg.ack()
            return
        try:
            handler(msg)
        except Exception:
            # Not acknowledged: the broker delivers it again on the next connection.
            self.counters.inc("handler_errors")
            self.closes.say(logging.ERROR, "handler", "%s: the message handler failed on %r; "
                      "left unacknowledged", self.name, msg.topic[:80], exc_info=True)

    def _route(self, topic: str) -> Handler | None:
        for topic_filter, (_, handler) in self._routes.items():
            if topics.matches(topic_filter, topic):
                return handler
        return None

    # -- subscriptions at run time -----------------------------------------------

    async def subscribe(self, filters: tuple[tuple[str, int], ...], handler: Handler) -> None:
        """Subscribe to `filters` (topic filter, QoS) now and at every later connect;
        their messages go to `handler` (which acks them), not to `on_message`.

        Returns once the broker granted them, or at once while disconnected (they go out
        with the next CONNECT). Raises ConnectError naming the filter the broker refused
        (that one is not kept). On a connection without `on_message` give
        `max_packet_bytes` room for the largest message expected.
        """
        for topic_filter, _ in filters:
            topics.validate_filter(topic_filter)
        for topic_filter, qos in filters:
            self._routes[topic_filter] = (qos, handler)
        codes = await self._request(lambda pid: codec.subscribe(pid, filters, v5=self.v5))
        refused = [(f, c) for (f, _), c in zip(filters, codes, strict=False) if c >= 0x80]
        for topic_filter, _ in refused:
            self._routes.pop(topic_filter, None)
        if refused:
            f, c = refused[0]
            raise ConnectError(f"{self.name}: {self.where} refused the subscription to {f!r}: "
                               f"{codec.reason_name(c)} (0x{c:02X})")

    async def unsubscribe(self, filters: tuple[str, ...]) -> None:
        """Drop run-time subscriptions; messages already on their way are acked unread."""
        for topic_filter in filters:
            self._routes.pop(topic_filter, None)
        await self._request(lambda pid: codec.unsubscribe(pid, filters, v5=self.v5))

    async def _request(self, packet: Callable[[int], bytes]) -> list[int]:
        """Send a SUBSCRIBE or UNSUBSCRIBE on the open connection and await its ack; []
        when there is none (the next connect subscribes from `_routes` anyway)."""
        proto = self._proto
        if proto is None or proto.lost.done():
            return []
        packet_id = self._packet_id()
        waiter: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = waiter
        try:
            proto.send(packet(packet_id))
            waits: list[asyncio.Future[Any]] = [waiter, proto.lost]
            await asyncio.wait(waits, timeout=float(self.cfg.connect_timeout_s),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._acks.pop(packet_id, None)
        return waiter.result() if waiter.done() else []

    def violation(self, proto: PacketProtocol, exc: codec.MalformedPacket) -> None:
        """The broker broke the protocol: count it, disconnect with the reason, start over."""
        code = exc.reason
        malformed = type(exc) is codec.MalformedPacket
        self.counters.inc("malformed_packets" if malformed else "protocol_errors")
        how = (f"sent DISCONNECT {codec.reason_name(code)} (0x{code:02X})" if self.v5
               else f"closed the connection ({codec.reason_name(code)}, 0x{code:02X})")
        proto.fail(f"{'malformed packet' if malformed else 'protocol error'} from the "
                   f"broker: {exc}; {how}", code if self.v5 else None)

    def _acker(self, proto: PacketProtocol, packet_id: int) -> Callable[[], None]:
        def ack() -> None:
            # Only on the connection that delivered it: after a reconnect the broker
            # redelivers unacknowledged messages itself.
            if self._proto is proto:
                proto.send(codec.puback(packet_id))
        return ack

    # -- batching input --------------------------------------------------------------

    def pause_reading(self) -> None:
        """Leave what the broker sends in the socket until `resume_reading` (the owner takes
        sparse input in batches: one wake-up for many messages, not one each)."""
        proto = self._proto
        if proto is not None and proto.transport is not None \
                and not proto.transport.is_closing():
            proto.transport.pause_reading()

    def resume_reading(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None \
                and not proto.transport.is_closing():
            proto.transport.resume_reading()

    @property
    def inbound_window(self) -> int:
        """How many unacknowledged QoS 1 messages the broker may send us: our Receive
        Maximum with MQTT 5 (Mosquitto honours it); a 3.1.1 broker keeps its own limit
        (Mosquitto's max_inflight_messages, 20 unless set)."""
        return self.receive_maximum if self.v5 else DEFAULT_RECEIVE_MAXIMUM

    # -- publishing --------------------------------------------------------------

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending and not (
                    self._acks and self._next_id in self._acks):
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
            raise ConnectError(f"{self.name}: not connected to {self.where}")
        self.publish_raw(topic, payload, qos, retain, user_properties, expiry_s, on_published)

    def publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool,
                    user_properties: tuple[tuple[str, str], ...] = (),
                    expiry_s: int | None = None,
                    on_published: OnPublished | None = None) -> None:
        proto = self._proto
        if proto is None:
            raise ConnectError(f"{self.name}: not connected to {self.where}")
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
        packet = codec.publish(topic, payload, qos, retain, packet_id, v5=self.v5, props=props)
        if self.server_max_packet and len(packet) > self.server_max_packet:
            raise ValueError(f"a packet of {len(packet):,} bytes exceeds the broker's maximum "
                             f"packet size of {self.server_max_packet:,}")
        proto.send(packet)
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
