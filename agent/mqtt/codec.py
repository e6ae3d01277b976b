"""MQTT 3.1.1 and 5 packets: the subset a relay needs, as plain functions over bytes.

Why our own codec on the hot path: paho-mqtt builds a `Properties` object per
MQTT 5 packet (about 50 us each: it rebuilds its name tables every time) and
reads each packet with several `recv` calls. A relay handles four packets per
message (PUBLISH and PUBACK on each side), so that was most of its CPU. Here a
packet is a few `struct` calls, reads are parsed from whatever one `recv`
returned, and writes of one loop iteration go out in one `send`.

Covered: CONNECT/CONNACK, PUBLISH QoS 0 and 1 both ways, PUBACK (with reason
codes), SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT. QoS 2 is not spoken:
subscriptions ask for at most QoS 1, which the broker honours by downgrading.

Decoding trusts nothing: every `read_*` and `Reader.feed` raise `MalformedPacket`
(or its subclass `ProtocolError`, carrying the MQTT 5 reason code to disconnect
with) and nothing else, whatever the bytes; tests/test_codec_fuzz.py holds them
to it.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

# Property identifiers (MQTT 5 section 2.2.2.2) and their wire types.
MESSAGE_EXPIRY, SESSION_EXPIRY, RECEIVE_MAXIMUM = 0x02, 0x11, 0x21
MAXIMUM_PACKET_SIZE, USER_PROPERTY, REASON_STRING = 0x27, 0x26, 0x1F
TOPIC_ALIAS = 0x23
MAX_VARINT = 268_435_455  # four bytes of seven bits
MAX_PACKET = 1 + 4 + MAX_VARINT  # fixed header byte, longest remaining length, body
_BYTE, _U16, _U32, _VARINT, _BIN, _STR, _PAIR = range(7)
_PROP_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32,
    0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE,
    0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}

REASONS = {
    0x00: "Success", 0x10: "No matching subscribers", 0x80: "Unspecified error",
    0x81: "Malformed Packet", 0x82: "Protocol Error", 0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version", 0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password", 0x87: "Not authorized", 0x88: "Server unavailable",
    0x89: "Server busy", 0x8A: "Banned", 0x8B: "Server shutting down",
    0x8C: "Bad authentication method", 0x8D: "Keep Alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded", 0x94: "Topic Alias invalid", 0x95: "Packet too large",
    0x96: "Message rate too high", 0x97: "Quota exceeded", 0x98: "Administrative action",
    0x99: "Payload format invalid", 0x9A: "Retain not supported", 0x9B: "QoS not supported",
    0x9C: "Use another server", 0x9D: "Server moved", 0x9F: "Connection rate exceeded",
}
# MQTT 3.1.1 CONNACK return codes, mapped onto the MQTT 5 reason codes they mean.
V311_CONNACK = {0: 0x00, 1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}
UNSUPPORTED_PROTOCOL_VERSION, SESSION_TAKEN_OVER = 0x84, 0x8E

# Properties a server may put in each packet it sends (MQTT 5 section 2.2.2.2); any
# other is a protocol error, as paho's decoder holds it too.
_ALLOWED = {
    PUBLISH: frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26}),
    CONNACK: frozenset({0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24,
                        0x25, 0x26, 0x27, 0x28, 0x29, 0x2A}),
    PUBACK: frozenset({0x1F, 0x26}),
    SUBACK: frozenset({0x1F, 0x26}),
    DISCONNECT: frozenset({0x11, 0x1C, 0x1F, 0x26}),
}
_MULTIPLE = frozenset({0x0B, USER_PROPERTY})  # may appear more than once
# Value ranges the spec sets (section 3): anything else is a protocol error.
_RANGES = {0x01: (0, 1), 0x0B: (1, MAX_VARINT), 0x13: (0, 65535), 0x21: (1, 65535),
           0x23: (1, 65535), 0x24: (0, 1), 0x25: (0, 1), 0x27: (1, 2**32 - 1),
           0x28: (0, 1), 0x29: (0, 1), 0x2A: (0, 1)}


class MalformedPacket(ValueError):
    """Raised when bytes from the peer are not a valid MQTT packet (reason 0x81)."""

    reason = 0x81


class ProtocolError(MalformedPacket):
    """Raised when a well-formed packet breaks the protocol; `reason` is the v5 code."""

    def __init__(self, reason: int, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def reason_name(code: int) -> str:
    name = REASONS.get(code)  # not .get(code, f"..."): that formats on every PUBACK
    return name if name is not None else f"reason 0x{code:02X}"


# -- encoding ------------------------------------------------------------------

def varint(n: int) -> bytes:
    """A variable byte integer; ValueError beyond the four bytes MQTT allows."""
    if not 0 <= n <= MAX_VARINT:
        raise ValueError(f"{n:,} does not fit a variable byte integer (0 to {MAX_VARINT:,})")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    return _bin(s.encode())


def _bin(b: bytes) -> bytes:
    if len(b) > 65535:
        raise ValueError(f"a string or binary field of {len(b):,} bytes exceeds 65,535")
    return struct.pack("!H", len(b)) + b


def properties(props: dict[int, Any] | None) -> bytes:
    """Encode `{identifier: value}`; USER_PROPERTY takes a sequence of (key, value)."""
    if not props:
        return b"\x00"
    body = bytearray()
    for ident, value in props.items():
        kind = _PROP_TYPES[ident]
        items = value if kind == _PAIR else (value,)
        for v in items:
            body.append(ident)
            if kind == _BYTE:
                body.append(v)
            elif kind == _U16:
                body += struct.pack("!H", v)
            elif kind == _U32:
                body += struct.pack("!I", v)
            elif kind == _VARINT:
                body += varint(v)
            elif kind == _BIN:
                body += _bin(v)
            elif kind == _STR:
                body += _str(v)
            else:
                body += _str(v[0]) + _str(v[1])
    return varint(len(body)) + bytes(body)


@functools.lru_cache(maxsize=64)
def _user_key(name: str) -> bytes:
    return bytes((USER_PROPERTY,)) + _str(name)


def key_properties(name: str, value: str, expiry_s: int | None = None) -> bytes:
    """`properties()` for the per-message case (one user property, maybe an expiry), fast."""
    body = _user_key(name) + _str(value)
    if expiry_s is not None:
        body = struct.pack("!BI", MESSAGE_EXPIRY, expiry_s) + body
    return varint(len(body)) + body


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class WillSpec:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect(client_id: str, keepalive_s: int, *, v5: bool, clean: bool,
            username: str | None = None, password: str | None = None,
            will: WillSpec | None = None, props: dict[int, Any] | None = None) -> bytes:
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = _str("MQTT") + bytes((5 if v5 else 4, flags)) + struct.pack("!H", keepalive_s)
    if v5:
        body += properties(props)
    body += _str(client_id)
    if will is not None:
        if v5:
            body += b"\x00"  # no will properties
        body += _str(will.topic) + _bin(will.payload)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _bin(password.encode())
    return _packet(CONNECT << 4, body)


def publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, *, v5: bool,
            props: bytes = b"\x00", dup: bool = False) -> bytes:
    """One PUBLISH; `props` is already encoded (see `properties`)."""
    head = _str(topic)
    if qos:
        head += struct.pack("!H", packet_id)
    if v5:
        head += props
    first = (PUBLISH << 4) | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes((first,)) + varint(len(head) + len(payload)) + head + payload


def puback(packet_id: int) -> bytes:
    """A success PUBACK; MQTT 5 allows omitting reason and properties when both are empty."""
    return struct.pack("!BBH", PUBACK << 4, 2, packet_id)


def subscribe(packet_id: int, filters: tuple[tuple[str, int], ...], *, v5: bool) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if v5 else b"")
    for topic_filter, qos in filters:
        body += _str(topic_filter) + bytes((min(qos, 1),))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def unsubscribe(packet_id: int, filters: tuple[str, ...], *, v5: bool) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if v5 else b"")
    for topic_filter in filters:
        body += _str(topic_filter)
    return _packet((UNSUBSCRIBE << 4) | 0x02, body)


def read_unsuback(b: bytes, *, v5: bool) -> tuple[int, list[int]]:
    """(packet id, one reason code per filter; MQTT 3.1.1 carries none: an empty list)."""
    if not v5:
        if len(b) != 2:
            raise MalformedPacket(f"MQTT 3.1.1 UNSUBACK of {len(b)} bytes (2)")
        return struct.unpack("!H", b)[0], []
    return read_suback(b, v5=True)


PINGREQ_BYTES = bytes((PINGREQ << 4, 0))


def disconnect(*, v5: bool, reason: int = 0) -> bytes:
    return _packet(DISCONNECT << 4, bytes((reason, 0)) if v5 and reason else b"")


# -- decoding ------------------------------------------------------------------

class Reader:
    """Splits a byte stream into packets: feed what `recv` returned, get whole packets.

    A packet larger than `max_size` (the whole packet, as MQTT 5's Maximum Packet
    Size counts it) is refused from its fixed header, before its body arrives.
    A partial packet waits in one bytearray that grows in place, and is not parsed
    again until the bytes its header announced are there: linear in its size,
    however thinly the peer slices it.
    """

    __slots__ = ("buf", "max_size", "need")

    def __init__(self, max_size: int = MAX_PACKET) -> None:
        self.buf = bytearray()
        self.max_size = max_size
        self.need = 0  # size of the packet waiting in `buf`, once its header is known

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int, bytes]]:
        """(type, flags, body) of every complete packet; the rest waits for more bytes.

        `data` may be a view of the caller's read buffer: nothing returned or kept
        refers to it.
        """
        buf = self.buf
        if not buf:  # the common case: parse what recv returned, keep only a tail
            out, pos = self._split(data)
            if pos < len(data):
                buf += memoryview(data)[pos:]
            if type(data) is not bytes:  # bodies are views of it: copy each
                out = [(kind, flags, bytes(body)) for kind, flags, body in out]
            return out
        buf += data
        if len(buf) < self.need:
            return []
        try:
            with memoryview(buf) as view:
                out, pos = self._split(view)
                out = [(kind, flags, bytes(body)) for kind, flags, body in out]
        except MalformedPacket:
            self.buf = bytearray()  # the old one may still be viewed from the traceback
            raise
        del buf[:pos]
        return out

    def _split(self, buf: Any) -> tuple[list[tuple[int, int, Any]], int]:
        """Packets whole in `buf` (bodies sliced from it) and where the rest starts."""
        out: list[tuple[int, int, Any]] = []
        pos = 0
        end = len(buf)
        self.need = 0
        while end - pos >= 2:
            first = buf[pos]
            length = shift = 0
            i = pos + 1
            while True:
                if i >= end:
                    return out, pos
                b = buf[i]
                length |= (b & 0x7F) << shift
                i += 1
                if not b & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            size = i - pos + length
            if size > self.max_size:
                raise ProtocolError(0x95, f"packet of {size:,} bytes exceeds the maximum "
                                          f"packet size of {self.max_size:,}")
            if end - i < length:
                self.need = size
                break
            out.append((first >> 4, first & 0x0F, buf[i:i + length]))
            pos = i + length
        return out, pos


def _read_varint(b: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(b):
            raise MalformedPacket("variable byte integer cut short")
        byte = b[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than 4 bytes")


def _text(raw: bytes, what: str) -> str:
    """An MQTT UTF-8 string: well-formed UTF-8 (so no surrogates) without U+0000."""
    try:
        s = raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{what} is not valid UTF-8: {exc.reason}") from None
    if "\x00" in s:
        raise MalformedPacket(f"{what} holds U+0000")
    return s


def read_properties(b: bytes, pos: int, packet: int | None = None
                    ) -> tuple[dict[int, Any], int]:
    """Properties at `pos`: ({identifier: value}, position after them).

    With `packet` (a packet type) only the properties that packet may carry are
    accepted. USER_PROPERTY and SUBSCRIPTION_IDENTIFIER values come as lists.
    """
    length, pos = _read_varint(b, pos)
    end = pos + length
    if end > len(b):
        raise MalformedPacket(f"properties of {length} bytes run past the packet's end")
    allowed = _ALLOWED.get(packet) if packet is not None else None
    props: dict[int, Any] = {}
    try:
        while pos < end:
            ident = b[pos]
            pos += 1
            kind = _PROP_TYPES.get(ident)
            if kind is None:
                raise MalformedPacket(f"unknown property 0x{ident:02X}")
            if allowed is not None and ident not in allowed:
                raise ProtocolError(0x82, f"property 0x{ident:02X} is not allowed here")
            if ident in props and ident not in _MULTIPLE:
                raise ProtocolError(0x82, f"property 0x{ident:02X} given twice")
            value: Any
            if kind == _BYTE:
                value = b[pos]
                pos += 1
            elif kind == _U16:
                (value,) = struct.unpack_from("!H", b, pos)
                pos += 2
            elif kind == _U32:
                (value,) = struct.unpack_from("!I", b, pos)
                pos += 4
            elif kind == _VARINT:
                value, pos = _read_varint(b, pos)
            elif kind == _PAIR:
                (n,) = struct.unpack_from("!H", b, pos)
                k = _text(bytes(b[pos + 2:pos + 2 + n]), "a user property name")
                pos += 2 + n
                (m,) = struct.unpack_from("!H", b, pos)
                v = _text(bytes(b[pos + 2:pos + 2 + m]), "a user property value")
                pos += 2 + m
                value = (k, v)
            else:
                (n,) = struct.unpack_from("!H", b, pos)
                raw = bytes(b[pos + 2:pos + 2 + n])
                pos += 2 + n
                value = raw if kind == _BIN else _text(raw, f"property 0x{ident:02X}")
            if pos > end:
                raise MalformedPacket(f"property 0x{ident:02X} runs past the properties")
            bounds = _RANGES.get(ident)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                raise ProtocolError(0x82, f"property 0x{ident:02X} of {value} is out of range")
            if ident in _MULTIPLE:
                props.setdefault(ident, []).append(value)
            else:
                props[ident] = value
    except (struct.error, IndexError) as exc:
        raise MalformedPacket(f"properties cut short: {exc}") from None
    return props, end


def read_connack(b: bytes, *, v5: bool) -> tuple[bool, int, dict[int, Any]]:
    """(session present, reason code in MQTT 5 terms, properties).

    An MQTT 5 CONNECT answered the 3.1.1 way (two bytes, return code 1..5, as
    NATS does) means what the 3.1.1 code means: 1 is 0x84 Unsupported Protocol
    Version, not a success below 0x80.
    """
    if len(b) < 2:
        raise MalformedPacket(f"CONNACK of {len(b)} bytes (at least 2)")
    if b[0] & 0xFE:
        raise MalformedPacket(f"CONNACK flags 0x{b[0]:02X} (only bit 0 may be set)")
    session, code = bool(b[0] & 1), b[1]
    if not v5:
        if len(b) != 2:
            raise MalformedPacket(f"MQTT 3.1.1 CONNACK of {len(b)} bytes (2)")
        return session, V311_CONNACK.get(code, 0x80), {}
    if len(b) == 2:  # no property length: a 3.1.1 answer (or a terse success)
        if code in V311_CONNACK:
            return session, V311_CONNACK[code], {}
        raise MalformedPacket(f"CONNACK of 2 bytes with code 0x{code:02X}")
    if 0 < code < 0x80:
        raise MalformedPacket(f"CONNACK reason 0x{code:02X} is not an MQTT 5 reason code")
    props, end = read_properties(b, 2, CONNACK)
    if end != len(b):
        raise MalformedPacket(f"{len(b) - end} bytes after the CONNACK's properties")
    return session, code, props


def read_publish(b: bytes, flags: int, *, v5: bool
                 ) -> tuple[str, int, int, dict[int, Any] | None, bytes]:
    """(topic, qos, packet id or 0, properties, payload)."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    try:
        (n,) = struct.unpack_from("!H", b, 0)
        pos = 2 + n
        if pos > len(b):
            raise MalformedPacket(f"PUBLISH topic of {n} bytes runs past the packet's end")
        # A NUL is left to the topic name's own check (reason 0x90, not 0x81).
        topic = b[2:pos].decode()
        packet_id = 0
        if qos:
            (packet_id,) = struct.unpack_from("!H", b, pos)
            pos += 2
            if not packet_id:
                raise MalformedPacket("PUBLISH with packet identifier 0")
        props = None
        if v5:
            if b[pos] == 0:
                pos += 1
            else:
                props, pos = read_properties(b, pos, PUBLISH)
    except (struct.error, IndexError) as exc:
        raise MalformedPacket(f"PUBLISH cut short: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"the topic is not valid UTF-8: {exc.reason}") from None
    return topic, qos, packet_id, props, b[pos:]


def read_ack(b: bytes, *, v5: bool = True) -> tuple[int, int]:
    """PUBACK: (packet id, reason code; 0 when omitted)."""
    n = len(b)
    if n == 2:  # the hot path: a success with nothing else
        return struct.unpack("!H", b)[0], 0
    if n < 2 or not v5:
        raise MalformedPacket(f"PUBACK of {n} bytes ({'at least ' if v5 else ''}2)")
    (packet_id,) = struct.unpack_from("!H", b, 0)
    if n > 3:
        _, end = read_properties(b, 3, PUBACK)
        if end != n:
            raise MalformedPacket(f"{n - end} bytes after the PUBACK's properties")
    return packet_id, b[2]


def read_suback(b: bytes, *, v5: bool) -> tuple[int, list[int]]:
    """(packet id, one reason code per filter)."""
    if len(b) < 3:
        raise MalformedPacket(f"SUBACK of {len(b)} bytes (at least 3)")
    (packet_id,) = struct.unpack_from("!H", b, 0)
    pos = 2
    if v5:
        _, pos = read_properties(b, pos, SUBACK)
    if pos >= len(b):
        raise MalformedPacket("SUBACK without reason codes")
    return packet_id, list(b[pos:])


def read_disconnect(b: bytes, *, v5: bool = True) -> tuple[int, str]:
    """A DISCONNECT from the server: (reason code, its reason string or "")."""
    if not b:
        return 0, ""
    if not v5:
        raise MalformedPacket(f"MQTT 3.1.1 DISCONNECT of {len(b)} bytes (0)")
    if len(b) == 1:
        return b[0], ""
    props, end = read_properties(b, 1, DISCONNECT)
    if end != len(b):
        raise MalformedPacket(f"{len(b) - end} bytes after the DISCONNECT's properties")
    return b[0], str(props.get(REASON_STRING, ""))
