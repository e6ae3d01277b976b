"""The codec against hostile bytes, byte-exact packets, and paho as a second opinion.

Whatever a broker sends, decoding raises `MalformedPacket` (or its subclass
`ProtocolError`) and nothing else: a struct.error, IndexError or
UnicodeDecodeError escaping would become an asyncio "Fatal error" instead of a
logged reconnect. PUBLISH, the packet that carries data, is decoded
differentially against paho 2.2's own decoder (`paho.mqtt._packet.decode_publish`).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket as PahoMalformed
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import codec

# FOGWHISK_FUZZ=20 runs every property 20 times longer (a deep run, not for CI).
DEPTH = int(os.environ.get("FOGWHISK_FUZZ", "1"))
FUZZ = settings(max_examples=400 * DEPTH, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def decode(kind: int, flags: int, body: bytes, v5: bool) -> object:
    """What the connection does with one packet from the broker, decoding only."""
    if kind == codec.PUBLISH:
        return codec.read_publish(body, flags, v5=v5)
    if kind == codec.CONNACK:
        return codec.read_connack(body, v5=v5)
    if kind == codec.PUBACK:
        return codec.read_ack(body, v5=v5)
    if kind == codec.SUBACK:
        return codec.read_suback(body, v5=v5)
    if kind == codec.DISCONNECT:
        return codec.read_disconnect(body, v5=v5)
    return None


READERS: dict[str, Callable[[bytes, int, bool], object]] = {
    "read_publish": lambda b, f, v5: codec.read_publish(b, f, v5=v5),
    "read_connack": lambda b, f, v5: codec.read_connack(b, v5=v5),
    "read_ack": lambda b, f, v5: codec.read_ack(b, v5=v5),
    "read_suback": lambda b, f, v5: codec.read_suback(b, v5=v5),
    "read_disconnect": lambda b, f, v5: codec.read_disconnect(b, v5=v5),
    "read_properties": lambda b, f, v5: codec.read_properties(b, 0, f or None),
}


def only_malformed(fn: Callable[[], object]) -> None:
    with contextlib.suppress(codec.MalformedPacket):
        fn()


# -- anything at all -------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=3000), st.integers(1, 64), st.sampled_from([64, 1000, codec.MAX_PACKET]),
       st.booleans())
def test_any_byte_stream_into_the_reader_and_decoders_raises_only_malformed_packet(
        stream: bytes, chunk: int, max_size: int, v5: bool) -> None:
    reader = codec.Reader(max_size)
    with contextlib.suppress(codec.MalformedPacket):
        for i in range(0, len(stream), chunk):
            for kind, flags, body in reader.feed(stream[i:i + chunk]):
                only_malformed(lambda k=kind, f=flags, b=body: decode(k, f, b, v5))


@FUZZ
@pytest.mark.parametrize("name", list(READERS))
@given(body=st.binary(max_size=300), flags=st.integers(0, 15), v5=st.booleans())
def test_any_body_into_each_read_function_raises_only_malformed_packet(
        name: str, body: bytes, flags: int, v5: bool) -> None:
    only_malformed(lambda: READERS[name](body, flags, v5))


# -- valid packets, then mutated ---------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=20)
user_props = st.lists(st.tuples(texts, texts), max_size=3)


@st.composite
def valid_packets(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One packet a broker may send, encoded by paho where paho can (and by hand where not)."""
    v5 = draw(st.booleans())
    kind = draw(st.sampled_from(["publish", "connack", "puback", "suback", "disconnect"]))
    if kind == "publish":
        qos = draw(st.integers(0, 1))
        props = b"\x00"
        if v5:
            p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if draw(st.booleans()):
                p.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
            if draw(st.booleans()):
                p.ContentType = draw(texts)
            for kv in draw(user_props):
                p.UserProperty = kv
            props = p.pack()  # type: ignore[no-untyped-call]
        return codec.publish(draw(texts.filter(bool)), draw(st.binary(max_size=50)), qos,
                             draw(st.booleans()), draw(st.integers(1, 65535)), v5=v5,
                             props=props), v5
    if kind == "connack":
        if not v5:
            return bytes((0x20, 2, draw(st.integers(0, 1)), draw(st.integers(0, 5)))), v5
        p = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
        if draw(st.booleans()):
            p.ReceiveMaximum = draw(st.integers(1, 65535))
        if draw(st.booleans()):
            p.MaximumPacketSize = draw(st.integers(1, 268_435_455))
        if draw(st.booleans()):
            p.ReasonString = draw(texts)
        body = bytes((draw(st.integers(0, 1)), draw(st.sampled_from([0, 0x80, 0x86, 0x87]))))
        return bytes((0x20,)) + codec.varint(len(body) + len(p.pack())) + body + p.pack(), v5  # type: ignore[no-untyped-call]
    pid = struct.pack("!H", draw(st.integers(1, 65535)))
    if kind == "suback":
        codes = bytes(draw(st.lists(st.sampled_from([0, 1, 0x80]), min_size=1, max_size=4)))
        body = pid + (b"\x00" if v5 else b"") + codes
        return bytes((0x90,)) + codec.varint(len(body)) + body, v5
    p = Properties(PacketTypes.PUBACK if kind == "puback" else PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    if draw(st.booleans()):
        p.ReasonString = draw(texts)
    tail = bytes((draw(st.sampled_from([0, 0x10, 0x80, 0x87])),)) + p.pack()  # type: ignore[no-untyped-call]
    if kind == "puback":
        body = pid + (tail if v5 and draw(st.booleans()) else b"")
        return bytes((0x40,)) + codec.varint(len(body)) + body, v5
    return bytes((0xE0,)) + codec.varint(len(tail)) + tail if v5 else b"\xe0\x00", v5


@st.composite
def mutated(draw: st.DrawFn, packet: bytes) -> bytes:
    """`packet` with a few bytes flipped, cut, inserted or dropped."""
    data = bytearray(packet)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "drop"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x26, 0x23, 0x1F]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "drop" and data:
            del data[at]
    return bytes(data)


def test_the_valid_packets_decode() -> None:
    """The generator above makes packets the codec reads (so mutations start from sense)."""
    @settings(max_examples=200, deadline=None)
    @given(valid_packets())
    def check(case: tuple[bytes, bool]) -> None:
        packet, v5 = case
        (got,) = codec.Reader().feed(packet)
        decode(*got, v5)
    check()


@FUZZ
@given(st.data())
def test_mutated_valid_packets_raise_only_malformed_packet(data: st.DataObject) -> None:
    packet, v5 = data.draw(valid_packets())
    stream = data.draw(mutated(packet))
    reader = codec.Reader(data.draw(st.sampled_from([32, codec.MAX_PACKET])))
    with contextlib.suppress(codec.MalformedPacket):
        for kind, flags, body in reader.feed(stream):
            only_malformed(lambda k=kind, f=flags, b=body: decode(k, f, b, v5))


# -- byte-exact packets we write ------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "hexed"), [
    pytest.param(dict(client_id="c", keepalive_s=30, v5=False, clean=True),
                 "10 0d 0004 4d515454 04 02 001e 0001 63", id="3.1.1 clean, nothing else"),
    pytest.param(dict(client_id="c", keepalive_s=60, v5=False, clean=False,
                      username="u", password="pw"),
                 "10 14 0004 4d515454 04 c0 003c 0001 63 0001 75 0002 7077",
                 id="3.1.1 username (0x80) and password (0x40)"),
    pytest.param(dict(client_id="c", keepalive_s=30, v5=False, clean=True,
                      will=codec.WillSpec("s", b"off", qos=1, retain=True)),
                 "10 15 0004 4d515454 04 2e 001e 0001 63 0001 73 0003 6f6666",
                 id="3.1.1 will QoS 1 retained: 0x04 | 0x08 | 0x20 | clean 0x02"),
    pytest.param(dict(client_id="c", keepalive_s=30, v5=False, clean=False,
                      will=codec.WillSpec("s", b"", qos=0, retain=False)),
                 "10 12 0004 4d515454 04 04 001e 0001 63 0001 73 0000",
                 id="3.1.1 will QoS 0 not retained"),
    pytest.param(dict(client_id="c", keepalive_s=30, v5=True, clean=False,
                      props={codec.SESSION_EXPIRY: 3600, codec.MAXIMUM_PACKET_SIZE: 65536}),
                 "10 18 0004 4d515454 05 00 001e 0a 11 00000e10 27 00010000 0001 63",
                 id="5 properties"),
    pytest.param(dict(client_id="", keepalive_s=30, v5=True, clean=True, password="pw",
                      will=codec.WillSpec("s", b"x", qos=1, retain=False)),
                 "10 18 0004 4d515454 05 4e 001e 00 0000 00 0001 73 0001 78 0002 7077",
                 id="5 password without username, will with empty properties"),
])
def test_connect_bytes_are_exact(kwargs: dict[str, Any], hexed: str) -> None:
    assert codec.connect(**kwargs) == bytes.fromhex(hexed)


def test_subscribe_bytes_are_exact_and_ask_at_most_qos_1() -> None:
    assert codec.subscribe(7, (("a/#", 1), ("b", 2)), v5=True) == bytes.fromhex(
        "82 0d 0007 00 0003 612f23 01 0001 62 01")
    assert codec.subscribe(7, (("a/#", 0),), v5=False) == bytes.fromhex(
        "82 08 0007 0003 612f23 00")


@pytest.mark.parametrize(("hexed", "v5", "expected"), [
    ("0007 01 80", False, (7, [1, 0x80])),
    ("0007 00 00 01 80", True, (7, [0, 1, 0x80])),
    ("0007 05 1f0002 6e6f 87", True, (7, [0x87])),  # with a reason string
])
def test_suback_bytes_decode(hexed: str, v5: bool, expected: tuple[int, list[int]]) -> None:
    assert codec.read_suback(bytes.fromhex(hexed), v5=v5) == expected


@pytest.mark.parametrize(("hexed", "v5"), [
    ("0007", False),  # no reason code
    ("0007 00", True),  # properties, no reason code
    ("0007 05 1f0002 6e", True),  # reason string cut short
    ("0007 03 260000 80", True),  # user property cut short
    ("0007 02 2600 80", True),
    ("0007 03 220001 80", True),  # Topic Alias Maximum is no SUBACK property
])
def test_bad_suback_bytes_are_malformed(hexed: str, v5: bool) -> None:
    with pytest.raises(codec.MalformedPacket):
        codec.read_suback(bytes.fromhex(hexed), v5=v5)


# -- PUBLISH, differentially against paho 2.2 ------------------------------------------------


def paho_props(p: Properties | None) -> dict[int, Any] | None:
    if p is None:
        return None
    out: dict[int, Any] = {}
    for name, ident in p.names.items():
        attr = name.replace(" ", "")
        if hasattr(p, attr):
            out[ident] = getattr(p, attr)
    return out


@st.composite
def publish_bodies(draw: st.DrawFn) -> tuple[int, bytes, bool]:
    """(first byte, body, v5): valid PUBLISH packets, often mutated."""
    packet, v5 = draw(valid_packets().filter(lambda c: c[0][0] >> 4 == codec.PUBLISH))
    if draw(st.booleans()):
        packet = draw(mutated(packet))
    if len(packet) < 2:
        packet = bytes((0x30, 0))
    first = (packet[0] & 0x0F) | 0x30
    i = 1
    while i < len(packet) and packet[i] & 0x80 and i < 4:
        i += 1
    return first, packet[i + 1:], v5


def stricter(first: int, body: bytes, v5: bool, why: str) -> bool:
    """Where the spec lets us refuse what paho's decoder lets through (each one checked)."""
    qos = (first >> 1) & 3
    if qos == 3:
        return why == "PUBLISH with QoS 3"  # MQTT-3.3.1-4
    (n,) = struct.unpack_from("!H", body)
    try:
        body[2:2 + n].decode()
    except UnicodeDecodeError:
        return why.startswith("the topic is not valid UTF-8")  # MQTT-1.5.4-1
    if qos and body[2 + n:4 + n] == b"\x00\x00":
        return why == "PUBLISH with packet identifier 0"  # MQTT-2.2.1-3
    if not v5:
        return False
    pos = 2 + n + (2 if qos else 0)
    length = shift = 0
    while pos < len(body):
        length |= (body[pos] & 0x7F) << shift
        shift += 7
        pos += 1
        if not body[pos - 1] & 0x80:
            break
    if pos + length > len(body):  # paho cuts the last string short at the packet's end
        return "run past the packet's end" in why
    # paho reads a fixed-size value past the property length, from the payload
    return "runs past the properties" in why


@settings(max_examples=1500 * DEPTH, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(publish_bodies())
@example((0x32, bytes.fromhex("0001 61 0000 00"), True)).via("packet id 0")
@example((0x36, bytes.fromhex("0001 61 0001 00"), True)).via("QoS 3")
@example((0x30, bytes.fromhex("0002 c328 00"), True)).via("topic not UTF-8")
@example((0x30, bytes.fromhex("0001 61 01 02 00000000 ff"), True)).via("expiry past the props")
def test_publish_decodes_as_paho_decodes_it(case: tuple[int, bytes, bool]) -> None:
    """Same topic, QoS, packet id, properties and payload; where paho refuses, we refuse;
    where we refuse alone, the spec says so (see `stricter`)."""
    first, body, v5 = case
    version = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    try:
        theirs = paho_packet.decode_publish(first, body, version)
    except PahoMalformed:
        theirs = None
    try:
        ours = codec.read_publish(body, first & 0x0F, v5=v5)
    except codec.MalformedPacket as exc:
        if theirs is not None:  # we refuse alone
            assert stricter(first, body, v5, str(exc)), (str(exc), theirs)
        return
    if theirs is None:
        # paho's 3.1.1 decoder refuses an empty topic; ours leaves it to topics.validate_name
        # on receive (0x90), tested in test_mqtt_hardening.py.
        assert not v5 and ours[0] == "", ours
        return
    topic, qos, packet_id, props, payload = ours
    assert topic.encode() == theirs.topic
    assert (qos, packet_id, payload) == (theirs.qos, theirs.mid, bytes(theirs.payload))
    assert (props or None) == (paho_props(theirs.properties) or None)
