"""The MQTT codec: what it writes, it (and paho, a second implementation) reads back."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import codec

topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
                 min_size=1, max_size=200)
payloads = st.binary(max_size=3000)
keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=60)


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_round_trips(n: int) -> None:
    encoded = codec.varint(n)
    assert len(encoded) <= 4
    assert codec._read_varint(encoded + b"junk", 0) == (n, len(encoded))


@given(topics, payloads, st.integers(0, 1), st.booleans(), st.integers(1, 65535),
       st.booleans(), keys, st.one_of(st.none(), st.integers(1, 2**32 - 1)))
def test_publish_round_trips_through_the_reader(topic: str, payload: bytes, qos: int,
                                                retain: bool, packet_id: int, v5: bool,
                                                key: str, expiry: int | None) -> None:
    props = {codec.USER_PROPERTY: (("fogwhisk-id", key),)}
    if expiry is not None:
        props[codec.MESSAGE_EXPIRY] = expiry  # type: ignore[assignment]
    packet = codec.publish(topic, payload, qos, retain, packet_id, v5=v5,
                           props=codec.properties(props))
    reader = codec.Reader()
    # Delivered in two arbitrary pieces, as TCP may do.
    cut = len(packet) // 3
    got = reader.feed(packet[:cut]) + reader.feed(packet[cut:])
    assert len(got) == 1
    kind, flags, body = got[0]
    assert kind == codec.PUBLISH
    assert bool(flags & 1) == retain
    t, q, pid, read_props, p = codec.read_publish(body, flags, v5=v5)
    assert (t, q, p) == (topic, qos, payload)
    assert pid == (packet_id if qos else 0)
    if v5:
        assert read_props is not None
        assert read_props[codec.USER_PROPERTY] == [("fogwhisk-id", key)]
        assert read_props.get(codec.MESSAGE_EXPIRY) == expiry
    assert reader.buf == b""


@given(st.lists(st.tuples(topics, payloads), min_size=1, max_size=20), st.integers(1, 50))
def test_the_reader_splits_any_chunking_of_a_stream(msgs: list[tuple[str, bytes]],
                                                   chunk: int) -> None:
    stream = b"".join(codec.publish(t, p, 1, False, i + 1, v5=True)
                      for i, (t, p) in enumerate(msgs))
    reader = codec.Reader()
    got = []
    for i in range(0, len(stream), chunk):
        got += reader.feed(stream[i:i + chunk])
    decoded = [codec.read_publish(body, flags, v5=True) for _, flags, body in got]
    assert [(d[0], d[4]) for d in decoded] == msgs


@given(keys, st.integers(1, 2**32 - 1), st.integers(1, 65535))
def test_properties_match_paho_encoding(key: str, expiry: int, receive_max: int) -> None:
    """paho is an independent implementation of the same section of the spec."""
    ours = codec.properties({codec.MESSAGE_EXPIRY: expiry,
                             codec.USER_PROPERTY: (("fogwhisk-id", key),)})
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.MessageExpiryInterval = expiry
    theirs.UserProperty = [("fogwhisk-id", key)]
    assert ours == theirs.pack()  # type: ignore[no-untyped-call]
    connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    connect_props.ReceiveMaximum = receive_max
    decoded, _ = codec.read_properties(connect_props.pack(), 0)  # type: ignore[no-untyped-call]
    assert decoded == {codec.RECEIVE_MAXIMUM: receive_max}


def test_a_failure_reason_code_in_a_puback_is_read() -> None:
    assert codec.read_ack(struct.pack("!HB", 7, 0x87) + b"\x00") == (7, 0x87)
    assert codec.read_ack(struct.pack("!H", 7)) == (7, 0)  # reason omitted: success
    assert codec.reason_name(0x87) == "Not authorized"


def test_a_v311_connack_refusal_maps_to_the_v5_reason() -> None:
    assert codec.read_connack(b"\x00\x04", v5=False) == (False, 0x86, {})
    assert codec.read_connack(b"\x01\x00", v5=False) == (True, 0x00, {})


def test_garbage_is_a_malformed_packet_not_a_hang() -> None:
    with pytest.raises(codec.MalformedPacket):
        codec.Reader().feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(codec.MalformedPacket):
        codec.read_publish(b"\x00\x05ab", 2, v5=True)


@given(keys, st.text(max_size=30), st.one_of(st.none(), st.integers(1, 2**32 - 1)))
def test_the_fast_key_property_encodes_like_the_general_one(value: str, name: str,
                                                            expiry: int | None) -> None:
    props: dict[int, object] = {}
    if expiry is not None:
        props[codec.MESSAGE_EXPIRY] = expiry
    props[codec.USER_PROPERTY] = ((name, value),)
    assert codec.key_properties(name, value, expiry) == codec.properties(props)


def test_varint_refuses_what_four_bytes_cannot_hold() -> None:
    """268,435,455 is the largest remaining length; above it (or below 0) nothing is written."""
    assert codec.varint(268_435_455) == b"\xff\xff\xff\x7f"
    for n in (268_435_456, 2**40, -1):
        with pytest.raises(ValueError, match="variable byte integer"):
            codec.varint(n)


def test_a_field_longer_than_65535_bytes_is_a_value_error_not_a_struct_error() -> None:
    with pytest.raises(ValueError, match="65,535"):
        codec.publish("t" * 65_536, b"", 0, False, 0, v5=True)


def test_a_v311_style_connack_to_an_mqtt_5_connect_is_a_refusal() -> None:
    """NATS answers MQTT 5 with `20 02 00 01`: 0x84 Unsupported Protocol Version."""
    assert codec.read_connack(b"\x00\x01", v5=True) == (False, 0x84, {})
    assert codec.read_connack(b"\x00\x05", v5=True) == (False, 0x87, {})
    assert codec.read_connack(b"\x00\x00", v5=True) == (False, 0x00, {})
    with pytest.raises(codec.MalformedPacket):  # 0x01 is no MQTT 5 reason code
        codec.read_connack(b"\x00\x01\x00", v5=True)


def test_a_packet_over_the_maximum_is_refused_from_its_header_alone() -> None:
    """The Maximum Packet Size counts the whole packet: header byte, length bytes, body."""
    reader = codec.Reader(max_size=100)
    assert reader.feed(bytes((0x30, 98)) + b"\x00\x01a" + b"x" * 95) != []  # 100 bytes
    with pytest.raises(codec.ProtocolError) as refused:
        reader.feed(bytes((0x30, 99)))  # 101 bytes announced, none of the body sent
    assert refused.value.reason == 0x95


def test_a_large_packet_in_small_pieces_comes_out_whole_once() -> None:
    body = b"\x00\x03a/b" + bytes(range(256)) * 8192  # 2 MiB
    stream = codec.publish("a/b", body[5:], 0, False, 0, v5=False) + codec.PINGREQ_BYTES
    reader = codec.Reader()
    got = []
    for i in range(0, len(stream), 4096):
        got += reader.feed(stream[i:i + 4096])
    assert got == [(codec.PUBLISH, 0, body), (codec.PINGREQ, 0, b"")]
    assert reader.buf == b""
