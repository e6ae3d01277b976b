"""No message or broker stops the agent's MQTT connections, and every close says why.

Real peers only. Where Mosquitto can show the behaviour, the peer is a
Mosquitto from the fixtures. A broker that misbehaves cannot be had from
Mosquitto, so `FakeBroker` is a real TCP server (a thread per connection)
that answers with the exact bytes a test names and records what the client
sent back. The client under test is the agent's own `Connection`, on an
asyncio loop in the test, or the agent process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agent_proc import RELAY, AgentProcess, write_config
from brokers import Broker, BrokerFactory, find_free_port
from helpers import publish_many
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BrokerConfig
from agent.errors import ConnectError
from agent.mqtt import connection as mqtt
from agent.mqtt.connection import Connection, Inbound
from agent.schema import Duration
from agent.telemetry import Telemetry

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC = 1, 2, 3, 4, 5
SUBSCRIBE, PINGREQ, DISCONNECT = 8, 12, 14
CONNACK_V5 = bytes.fromhex("2003000000")
CONNACK_311 = bytes.fromhex("20020000")
PEER_TIMEOUT_S = 10.0
WAIT_S = 10.0


# -- a broker that sends exactly what the test says ----------------------------------


def vbi(n: int) -> bytes:
    """A variable byte integer, written here independently of the codec under test."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + vbi(len(body)) + body


def raw_publish(topic: bytes, qos: int = 1, pid: int = 1, *, v5: bool = True,
                props: bytes = b"\x00", payload: bytes = b"x") -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", pid)
    if v5:
        body += props
    return packet((PUBLISH << 4) | (qos << 1), body + payload)


class Peer:
    """One TCP connection accepted by the fake broker, read packet by packet."""

    def __init__(self, sock: socket.socket, v5: bool) -> None:
        self.sock = sock
        self.v5 = v5
        self.buf = b""
        self.received: list[tuple[int, bytes]] = []  # (first byte, body) from the client
        self.closed = threading.Event()  # the client closed the connection
        sock.settimeout(PEER_TIMEOUT_S)

    def _split(self) -> tuple[int, bytes] | None:
        length = shift = 0
        i = 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                break
            shift += 7
        if len(self.buf) < i + length:
            return None
        pkt = (self.buf[0], self.buf[i:i + length])
        self.buf = self.buf[i + length:]
        self.received.append(pkt)
        return pkt

    def read(self, timeout_s: float = PEER_TIMEOUT_S) -> tuple[int, bytes] | None:
        """The next packet from the client; None once it closed the connection."""
        self.sock.settimeout(timeout_s)
        while True:
            pkt = self._split()
            if pkt is not None:
                return pkt
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed.set()
                return None
            self.buf += data

    def expect(self, kind: int) -> bytes:
        pkt = self.read()
        assert pkt is not None and pkt[0] >> 4 == kind, f"wanted type {kind}, got {pkt}"
        return pkt[1]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, *, subscribe: bool = False) -> bytes:
        """Read CONNECT, accept it; answer the SUBSCRIBE that follows. Returns CONNECT's body."""
        connect = self.expect(CONNECT)
        self.send(CONNACK_V5 if self.v5 else CONNACK_311)
        if subscribe:
            sub = self.expect(SUBSCRIBE)
            granted = b"\x00\x01" if self.v5 else b"\x01"
            self.send(packet(0x90, sub[:2] + granted))
        return connect

    def until_closed(self, timeout_s: float = PEER_TIMEOUT_S) -> list[tuple[int, bytes]]:
        """Every packet the client sends until it closes; fails if it does not close."""
        deadline = time.monotonic() + timeout_s
        while self.read(max(0.01, deadline - time.monotonic())) is not None:
            pass
        return self.received

    def closed_within(self, seconds: float) -> bool:
        """Read (and record) for up to `seconds`; True once the client closed."""
        try:
            while self.read(seconds) is not None:
                pass
        except TimeoutError:
            return False
        return True

    def kinds(self) -> list[int]:
        return [first >> 4 for first, _ in self.received]


class FakeBroker:
    """A TCP server on loopback; `script(peer, n)` plays the n-th connection (from 0)."""

    def __init__(self, script: Callable[[Peer, int], None], *, v5: bool = True) -> None:
        self.script = script
        self.v5 = v5
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="fake-broker").start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer = Peer(sock, self.v5)
            self.peers.append(peer)
            threading.Thread(target=self._play, args=(peer, len(self.peers) - 1),
                             daemon=True).start()

    def _play(self, peer: Peer, n: int) -> None:
        try:
            self.script(peer, n)
        except Exception as exc:
            if not self._stop.is_set():
                self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                peer.sock.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        for p in self.peers:
            with contextlib.suppress(OSError):
                p.sock.close()
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hold(peer: Peer) -> None:
    """Keep a connection open, answering pings, until the client closes it."""
    while True:
        pkt = peer.read(60)
        if pkt is None:
            return
        if pkt[0] >> 4 == PINGREQ:
            peer.send(b"\xd0\x00")


# -- the client under test ----------------------------------------------------------------


def broker_cfg(url: str, *, protocol: str = "5", keepalive_s: int = 30,
               client_id: str | None = None) -> BrokerConfig:
    return BrokerConfig(url=url, protocol=protocol, keepalive_s=keepalive_s,  # type: ignore[arg-type]
                        client_id=client_id, reconnect_min_s=Duration(0.05),
                        reconnect_max_s=Duration(0.2), connect_timeout_s=Duration(5))


class Recorder:
    """The message callback of a local connection: keeps and acknowledges what arrives."""

    def __init__(self) -> None:
        self.messages: list[Inbound] = []

    def __call__(self, msg: Inbound) -> None:
        self.messages.append(msg)
        msg.ack()

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]


def local_conn(url: str, recorder: Recorder | None = None, *, protocol: str = "5",
               keepalive_s: int = 30, name: str = "local", **kw: object) -> Connection:
    return Connection(name, broker_cfg(url, protocol=protocol, keepalive_s=keepalive_s),
                      "fogwhisk-dev1-local", Telemetry(), subscriptions=(("sensors/#", 1),),
                      on_message=recorder if recorder is not None else Recorder(),
                      **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*conns: Connection) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c.run(), name=c.name) for c in conns]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def lines(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()
            and r.levelno >= level]


def no_fatal_errors(caplog: pytest.LogCaptureFixture) -> None:
    fatal = [r for r in caplog.records if (r.name == "asyncio" and r.levelno >= logging.ERROR)
             or "Fatal error" in r.getMessage()]
    assert not fatal, [r.getMessage() for r in fatal]


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")


# -- 4. reconnect: bounded, jittered, and said -------------------------------------------


def test_every_retry_is_logged_at_debug_and_the_outage_is_summed_up_at_info(
        broker_factory: BrokerFactory, caplog: pytest.LogCaptureFixture) -> None:
    """While the uplink is down each attempt leaves a debug line; the reconnect says how
    long it was down and after how many attempts; the error itself is logged once."""
    uplink = broker_factory("uplink", start=False)
    conn = Connection("uplink", broker_cfg(uplink.url), "fogwhisk-dev1-uplink", Telemetry())

    async def scenario() -> None:
        async with running(conn):
            await until(lambda: len(lines(caplog, "uplink: attempt")) >= 4, "4 retries")
            await asyncio.to_thread(uplink.start)
            await until(conn.connected.is_set, "connected")

    asyncio.run(scenario())
    retries = lines(caplog, "uplink: attempt")
    assert all(r.levelno == logging.DEBUG for r in caplog.records
               if "uplink: attempt" in r.getMessage())
    summaries = [m for m in lines(caplog, "uplink down", logging.INFO)
                 if re.fullmatch(r"uplink down \d+ s, \d+ attempts", m)]
    assert len(summaries) == 1, lines(caplog, "down")
    attempts = int(summaries[0].split(", ")[1].split()[0])
    assert attempts == len(retries) + 1  # every failed one, and the one that worked
    assert len(lines(caplog, "cannot reach", logging.ERROR)) == 1


@given(st.integers(0, 10_000), st.floats(0.01, 5), st.floats(0, 60))
def test_backoff_stays_between_reconnect_min_s_and_reconnect_max_s(
        attempt: int, min_s: float, extra_s: float) -> None:
    delay = mqtt.backoff_s(attempt, min_s, min_s + extra_s)
    assert min_s <= delay <= min_s + extra_s


def test_the_default_backoff_fits_an_edge_device_a_few_jittered_seconds() -> None:
    """After a long outage the next attempt comes within a few seconds, never in lockstep."""
    cfg = BrokerConfig()
    assert cfg.reconnect_max_s <= 5
    delays = {round(mqtt.backoff_s(50, cfg.reconnect_min_s, cfg.reconnect_max_s), 3)
              for _ in range(50)}
    assert len(delays) > 10  # jittered
    assert max(delays) <= cfg.reconnect_max_s


# -- 7. an invalid PUBLISH from the broker is a protocol error ----------------------------


ALIAS_1 = b"\x03\x23\x00\x01"  # property length 3: Topic Alias = 1

INVALID_PUBLISH = {
    "empty topic": (raw_publish(b""), 0x90),
    "+ wildcard": (raw_publish(b"sensors/+/t"), 0x90),
    "# wildcard": (raw_publish(b"sensors/#"), 0x90),
    "NUL in topic": (raw_publish(b"sensors/a\x00b"), 0x90),
    "unknown topic alias": (raw_publish(b"", props=ALIAS_1), 0x94),
    "topic alias never allowed": (raw_publish(b"sensors/a", props=ALIAS_1), 0x94),
    "QoS 2 to a QoS 1 subscription": (raw_publish(b"sensors/a", qos=2), 0x9B),
}


@pytest.mark.parametrize("case", list(INVALID_PUBLISH))
def test_an_invalid_publish_is_never_acked_nor_delivered_and_ends_the_connection_with_its_reason(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    """The broker broke the protocol: the client counts it, logs it once, disconnects with
    the v5 reason code, reconnects, and takes the next valid message as usual."""
    bad, reason = INVALID_PUBLISH[case]

    def script(peer: Peer, n: int) -> None:
        peer.handshake(subscribe=True)
        if n == 0:
            peer.send(bad)
            peer.until_closed()
        else:
            peer.send(raw_publish(b"sensors/ok", pid=7))
            hold(peer)

    got = Recorder()
    with FakeBroker(script) as fake:
        conn = local_conn(fake.url, got)

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: got.messages != [], "the valid message arrived")
                await until(lambda: PUBACK in fake.peers[1].kinds(), "it was acknowledged")

        asyncio.run(scenario())
        first = fake.peers[0]
        assert PUBACK not in first.kinds() and PUBREC not in first.kinds(), first.received
        assert first.received[-1] == (DISCONNECT << 4, bytes((reason, 0))), first.received
    assert got.topics() == ["sensors/ok"]
    assert conn.counters.values["protocol_errors"] == 1
    said = lines(caplog, "protocol error", logging.WARNING)
    assert len(said) == 1 and f"0x{reason:02X}" in said[0], said
    no_fatal_errors(caplog)


@pytest.mark.parametrize("bad", [raw_publish(b"sensors/+", v5=False),
                                 raw_publish(b"sensors/a", qos=2, v5=False)],
                         ids=["wildcard", "QoS 2"])
def test_mqtt_311_closes_on_an_invalid_publish_without_acking_it(
        bad: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT 3.1.1 has no reason codes: the client closes the socket (a DISCONNECT would
    discard the last will) and reconnects."""
    def script(peer: Peer, n: int) -> None:
        peer.handshake(subscribe=True)
        if n == 0:
            peer.send(bad)
            peer.until_closed()
        else:
            hold(peer)

    got = Recorder()
    with FakeBroker(script, v5=False) as fake:
        conn = local_conn(fake.url, got, protocol="3.1.1")

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 2 and conn.connected.is_set(),
                            "reconnected")

        asyncio.run(scenario())
        assert fake.peers[0].kinds() == [CONNECT, SUBSCRIBE], fake.peers[0].received
    assert got.messages == []
    assert conn.counters.values["protocol_errors"] == 1
    no_fatal_errors(caplog)


# -- 9. every decoder error is a malformed packet -----------------------------------------


MALFORMED = {
    # (phase, bytes): "connack" replaces the CONNACK, "suback" the SUBACK, "serve" follows.
    "CONNACK of one byte": ("connack", bytes.fromhex("200100")),
    "CONNACK with truncated properties": ("connack", bytes.fromhex("2005000005 2100")),
    "CONNACK with an unknown property": ("connack", bytes.fromhex("2005000002 7f00")),
    "CONNACK with a reason string that is not UTF-8": ("connack",
                                                       bytes.fromhex("2008000005 1f0002fffe")),
    "SUBACK of one byte": ("suback", bytes.fromhex("900100")),
    "SUBACK with truncated properties": ("suback", bytes.fromhex("90040001 0526")),
    "PUBLISH whose properties run past its end": ("serve", bytes.fromhex(
        "320a 0003 612f62 0001 0a 0200")),
    "PUBLISH with QoS 3": ("serve", bytes.fromhex("3608 0003 612f62 0001 00")),
    "PUBACK of one byte": ("serve", bytes.fromhex("400100")),
    "DISCONNECT with truncated properties": ("serve", bytes.fromhex("e0028b05")),
    "remaining length of five bytes": ("serve", bytes.fromhex("30ffffffff01")),
    "PINGRESP with a body": ("serve", bytes.fromhex("d00100")),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_packet_is_logged_once_and_followed_by_a_reconnect(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    """No decoder error escapes as an asyncio "Fatal error" traceback: each one is a
    malformed packet, said once, and the connection starts over."""
    phase, bad = MALFORMED[case]

    def script(peer: Peer, n: int) -> None:
        if n > 0:
            peer.handshake(subscribe=True)
            hold(peer)
            return
        peer.expect(CONNECT)
        peer.send(bad if phase == "connack" else CONNACK_V5)
        if phase != "connack":
            sub = peer.expect(SUBSCRIBE)
            peer.send(bad if phase == "suback" else packet(0x90, sub[:2] + b"\x00\x01"))
        if phase == "serve":
            peer.send(bad)
        peer.until_closed()

    with FakeBroker(script) as fake:
        conn = local_conn(fake.url)

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 2 and conn.connected.is_set(),
                            "reconnected after the malformed packet")

        asyncio.run(scenario())
    said = lines(caplog, "malformed", logging.WARNING)
    assert len(said) == 1, said
    assert conn.counters.values["malformed_packets"] == 1
    no_fatal_errors(caplog)


def test_an_exception_from_the_message_callback_is_not_called_a_malformed_packet(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the consumer is logged with its traceback as the consumer's; the message
    stays unacknowledged (the broker redelivers it) and the connection goes on."""
    def script(peer: Peer, n: int) -> None:
        peer.handshake(subscribe=True)
        peer.send(raw_publish(b"sensors/poison", pid=1))
        peer.send(raw_publish(b"sensors/fine", pid=2))
        hold(peer)

    seen: list[str] = []

    def on_message(msg: Inbound) -> None:
        seen.append(msg.topic)
        if msg.topic == "sensors/poison":
            raise ValueError("bug in the consumer")
        msg.ack()

    with FakeBroker(script) as fake:
        conn = local_conn(fake.url)
        conn.on_message = on_message

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: fake.peers and PUBACK in fake.peers[0].kinds(),
                            "the second message was acknowledged")

        asyncio.run(scenario())
        acks = [body for first, body in fake.peers[0].received if first >> 4 == PUBACK]
        assert [struct.unpack("!H", a[:2])[0] for a in acks] == [2]
        assert len(fake.peers) == 1  # never reconnected
    assert seen == ["sensors/poison", "sensors/fine"]
    assert not lines(caplog, "malformed")
    handler = [r for r in caplog.records if "message handler" in r.getMessage()]
    assert len(handler) == 1 and handler[0].exc_info is not None
    no_fatal_errors(caplog)


def test_an_exception_from_an_on_published_callback_reconnects_instead_of_a_fatal_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """What the owner recorded at that PUBACK is in doubt: a fresh connection makes it
    send everything unacknowledged again (at least once), and nobody calls it malformed."""
    def script(peer: Peer, n: int) -> None:
        peer.handshake()
        if n == 0:
            pub = peer.expect(PUBLISH)
            (n_topic,) = struct.unpack_from("!H", pub)
            peer.send(packet(PUBACK << 4, pub[2 + n_topic:4 + n_topic]))
        hold(peer)

    def on_published(rc: int, name: str) -> None:
        raise KeyError("bug in the owner")

    with FakeBroker(script) as fake:
        conn = Connection("uplink", broker_cfg(fake.url), "fogwhisk-dev1-uplink", Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(conn.connected.is_set, "connected")
                conn.publish("fog/dev1/x", b"1", on_published=on_published)
                await until(lambda: len(fake.peers) >= 2 and conn.connected.is_set(),
                            "reconnected")

        asyncio.run(scenario())
    assert conn.counters.values["handler_errors"] == 1
    assert not lines(caplog, "malformed")
    no_fatal_errors(caplog)


# -- 10. maximum packet size, both ways ---------------------------------------------------


def _connect_props(connect_body: bytes) -> Properties:
    """The properties of an MQTT 5 CONNECT body, read by paho (an independent reader)."""
    (n,) = struct.unpack_from("!H", connect_body)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.unpack(connect_body[2 + n + 4:])  # protocol name, level, flags, keepalive
    return props


def _client_id(connect_body: bytes) -> str:
    props = _connect_props(connect_body)
    at = 10 + len(props.pack())  # type: ignore[no-untyped-call]
    (n,) = struct.unpack_from("!H", connect_body, at)
    return connect_body[at + 2:at + 2 + n].decode()


def test_both_connections_advertise_a_maximum_packet_size_fitting_what_they_receive() -> None:
    """The uplink receives only acknowledgements; the local bus receives camera frames."""
    connects: list[bytes] = []

    def script(peer: Peer, n: int) -> None:
        connects.append(peer.expect(CONNECT))
        peer.send(CONNACK_V5)
        hold(peer)

    with FakeBroker(script) as fake:
        uplink = Connection("uplink", broker_cfg(fake.url), "fogwhisk-dev1-uplink", Telemetry())
        local = Connection("local", broker_cfg(fake.url), "fogwhisk-dev1-local", Telemetry(),
                           on_message=Recorder())

        async def scenario() -> None:
            async with running(uplink, local):
                await until(lambda: uplink.connected.is_set() and local.connected.is_set(),
                            "both connected")

        asyncio.run(scenario())
    sizes = {_client_id(b): _connect_props(b).MaximumPacketSize for b in connects}
    up, loc = sizes["fogwhisk-dev1-uplink"], sizes["fogwhisk-dev1-local"]
    assert up <= 65_536  # acknowledgements, and a CONNACK or DISCONNECT with properties
    assert 16_000_000 * 3 < loc < 256 * 2**20  # decode's largest raw frame fits, 256 MB not


def test_mosquitto_keeps_a_packet_above_our_maximum_from_us_and_the_connection_lives(
        broker: Broker) -> None:
    """Mosquitto honours the advertised maximum: the too-large message is not sent to us,
    the connection stays, the next message arrives."""
    got = Recorder()
    conn = local_conn(broker.url, got, max_packet_bytes=50_000)

    async def scenario() -> None:
        async with running(conn):
            await until(conn.connected.is_set, "connected")
            await asyncio.to_thread(publish_many, broker.url, "sensors/big", [b"x" * 100_000])
            await asyncio.to_thread(publish_many, broker.url, "sensors/small", [b"y"])
            await until(lambda: got.messages != [], "the small message arrived")
            assert conn.counters.values["connects"] == 1
            assert conn.counters.values["disconnects"] == 0

    asyncio.run(scenario())
    assert got.topics() == ["sensors/small"]


def test_a_packet_announced_above_our_maximum_closes_the_connection_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A broker announcing a 256 MB packet is disconnected (0x95 Packet too large) from the
    header alone, without waiting for or buffering the body."""
    def script(peer: Peer, n: int) -> None:
        peer.handshake(subscribe=True)
        if n == 0:
            peer.send(bytes.fromhex("30ffffff7f") + b"\x00\x03a/b" + b"z" * 100)
            peer.until_closed()
        else:
            hold(peer)

    with FakeBroker(script) as fake:
        conn = local_conn(fake.url)

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 2 and conn.connected.is_set(),
                            "reconnected")

        asyncio.run(scenario())
        assert fake.peers[0].received[-1] == (DISCONNECT << 4, b"\x95\x00")
    said = lines(caplog, "maximum packet size", logging.WARNING)
    assert len(said) == 1 and "268435460" in said[0].replace(",", ""), said
    no_fatal_errors(caplog)


# -- 11. keepalive counts complete packets -------------------------------------------------


def test_a_broker_trickling_one_byte_at_a_time_is_disconnected_for_keepalive(
        caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that never complete a packet do not keep a connection alive."""
    outcome: list[str] = []

    def script(peer: Peer, n: int) -> None:
        peer.handshake(subscribe=True)
        if n > 0:
            hold(peer)
            return
        peer.send(bytes.fromhex("3080 01"))  # a PUBLISH of 128 bytes is coming...
        for _ in range(40):  # ...one byte every 0.25 s: 10 s for 40 bytes
            peer.send(b"z")
            if peer.closed_within(0.25):
                outcome.append("closed by the client")
                return
        outcome.append("still open after 10 s")

    with FakeBroker(script) as fake:
        conn = local_conn(fake.url, keepalive_s=1)

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: outcome != [], "the trickle ended", 15)

        asyncio.run(scenario())
    assert outcome == ["closed by the client"]
    assert len(lines(caplog, "no complete packet from the broker", logging.WARNING)) == 1


# -- 13. a v5 CONNECT answered the 3.1.1 way -------------------------------------------------


def test_a_v311_style_refusal_of_mqtt_5_is_unsupported_protocol_version_and_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """NATS answers an MQTT 5 CONNECT with `20 02 00 01`: that is a refusal (0x84), not a
    success, and the log tells what to configure."""
    def script(peer: Peer, n: int) -> None:
        peer.expect(CONNECT)
        peer.send(bytes.fromhex("20020001"))
        peer.until_closed()

    with FakeBroker(script) as fake:
        conn = Connection("uplink", broker_cfg(fake.url), "fogwhisk-dev1-uplink", Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 3, "three attempts")
                await until(fake.peers[2].closed.is_set, "the third was given up")

        asyncio.run(scenario())
    assert conn.counters.values["connects"] == 0
    said = lines(caplog, 'broker refused MQTT 5; set protocol = "3.1.1"', logging.ERROR)
    assert len(said) == 1 and "0x84" in said[0], said


# -- 16. no password in any log line -----------------------------------------------------------


def test_a_connection_never_puts_the_password_of_its_url_in_a_log_record_or_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """Below any log formatter: the records and errors a Connection makes carry no secret."""
    url = f"mqtt://fogwhisk:S3cret@127.0.0.1:{find_free_port()}"
    conn = Connection("uplink", broker_cfg(url), "fogwhisk-dev1-uplink", Telemetry())

    async def scenario() -> None:
        async with running(conn):
            await until(lambda: len(lines(caplog, "uplink: attempt")) >= 2, "two retries")
            with pytest.raises(ConnectError) as refused:
                conn.publish("fog/dev1/x", b"1")
            assert "fogwhisk:***@127.0.0.1" in str(refused.value)
            assert "S3cret" not in str(refused.value)

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert any("cannot reach mqtt://fogwhisk:***@127.0.0.1" in m for m in said), said
    assert not [m for m in said if "S3cret" in m]


def test_a_password_in_the_uplink_url_never_reaches_the_log(
        tmp_path: Path, local_broker: Broker) -> None:
    """Every retry against a dead uplink (logged at debug) names the URL without its secret."""
    dead = f"mqtt://fogwhisk:S3cret@127.0.0.1:{find_free_port()}"
    cfg = write_config(tmp_path / "agent.toml", local_broker, dead, RELAY)
    agent = AgentProcess(cfg, env={"FOGWHISK_LOG": "debug"})
    try:
        agent.wait_ready()
        agent.wait_log("uplink: attempt", count=3)
    finally:
        assert agent.stop() == 0, agent.log()
    log = agent.log()
    assert "cannot reach mqtt://fogwhisk:***@127.0.0.1" in log
    assert "S3cret" not in log


# -- 17. two agents with one device id ---------------------------------------------------------


def test_a_disconnect_with_session_taken_over_is_named_once_per_burst(
        caplog: pytest.LogCaptureFixture) -> None:
    def script(peer: Peer, n: int) -> None:
        peer.handshake()
        peer.send(bytes.fromhex("e0028e00"))
        peer.until_closed()

    with FakeBroker(script) as fake:
        conn = Connection("uplink", broker_cfg(fake.url), "fogwhisk-dev1-uplink", Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 4, "four sessions taken over")

        asyncio.run(scenario())
    said = lines(caplog, "took the session over", logging.WARNING)
    assert len(said) == 1, said
    assert "two agents with device id dev1?" in said[0]
    assert conn.counters.values["session_takeovers"] >= 3


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_clients_with_one_client_id_on_mosquitto_are_reported_as_a_session_takeover(
        protocol: str, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto closes the older connection without a word (no DISCONNECT 0x8E, even in
    MQTT 5): repeated closes right after connecting are named for what they are."""
    cfg = broker_cfg(broker.url, protocol=protocol)
    twins = [Connection(name, cfg, "fogwhisk-twin-uplink", Telemetry()) for name in ("a", "b")]

    def said(name: str) -> list[str]:
        return [m for m in lines(caplog, "took the session over", logging.WARNING)
                if m.startswith(f"{name}:")]

    async def scenario() -> None:
        async with running(*twins):
            await until(lambda: said("a") and said("b"), "both named the takeover")
            # It goes on (each reconnects within 0.2 s), yet is not said again.
            await until(lambda: all(t.counters.values["session_takeovers"] >= 6
                                    for t in twins), "more takeovers")

    asyncio.run(scenario())
    for name in ("a", "b"):
        assert len(said(name)) == 1, said(name)
        assert "two agents with device id twin?" in said(name)[0]


def test_two_agents_with_one_device_id_each_say_so_instead_of_only_connection_closed(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """The issue's scenario with two real agent processes: each names the takeover and the
    device id, on both connections, and not on every one of the repeated takeovers."""
    agents = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        agents.append(AgentProcess(write_config(tmp_path / name / "agent.toml", local_broker,
                                                uplink_broker, RELAY)))
    try:
        for agent in agents:
            for conn in ("local", "uplink"):
                agent.wait_log(f"{conn}: the broker closed the connection right after connecting")
    finally:
        for agent in agents:
            agent.stop()
    for agent in agents:
        log = agent.log()
        for conn in ("local", "uplink"):
            said = [ln for ln in log.splitlines() if f"{conn}: " in ln and "took the session" in ln]
            assert said and all("two agents with device id dev-test?" in ln for ln in said), log
            assert len(said) < log.count(f"{conn}: connected to"), log


def test_every_close_names_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """The broker's DISCONNECT reason and reason string, or a plain close, are said."""
    def script(peer: Peer, n: int) -> None:
        peer.handshake()
        if n == 0:  # Server busy, reason string "overloaded"
            peer.send(bytes.fromhex("e00f89 0d 1f000a") + b"overloaded")
        elif n == 1:
            return  # closes the socket
        else:
            hold(peer)

    with FakeBroker(script) as fake:
        conn = Connection("uplink", broker_cfg(fake.url), "fogwhisk-dev1-uplink", Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(fake.peers) >= 3 and conn.connected.is_set(),
                            "third session")

        asyncio.run(scenario())
    lost = lines(caplog, "connection to", logging.WARNING)
    assert "Server busy (0x89): overloaded" in lost[0], lost
    assert lost[1].endswith("the broker closed the connection"), lost
