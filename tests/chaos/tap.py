"""A proxy that also reads the MQTT stream it forwards: which readings the broker took.

`AckTap` is the chaos `Proxy` (cut, refuse, blackhole) plus two records on one
topic: every payload the agent published (its own duplicates are resends), and
the payloads whose PUBACK (a success reason code) the broker sent and the proxy
delivered to the agent. Once the agent has that PUBACK, custody has passed: a
reading lost after it is the broker's loss, not the agent's; a duplicate the
broker delivers again after a crash is the broker's too.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from proxy import Proxy

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4


class Frames:
    """Splits a byte stream into MQTT packets: (type, flags, body)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += data
        out = []
        while True:
            length, mult, pos = 0, 1, 1
            while True:
                if pos >= len(self.buf):
                    return out
                byte = self.buf[pos]
                length += (byte & 0x7F) * mult
                mult *= 128
                pos += 1
                if not byte & 0x80:
                    break
            if len(self.buf) < pos + length:
                return out
            first = self.buf[0]
            out.append((first >> 4, first & 0x0F, self.buf[pos:pos + length]))
            self.buf = self.buf[pos + length:]


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        byte = b[pos]
        value += (byte & 0x7F) * mult
        mult *= 128
        pos += 1
        if not byte & 0x80:
            return value, pos


class AckTap(Proxy):
    """The chaos proxy, recording the payloads on `topic` the broker acknowledged."""

    def __init__(self, target_port: int, topic: str) -> None:
        self.topic = topic.encode()
        self.acked: list[bytes] = []
        self.published: list[bytes] = []
        self.sessions: list[int] = []  # protocol level (4: 3.1.1, 5) per accepted CONNECT
        self._acked_lock = threading.Lock()
        super().__init__(target_port)

    def acknowledged(self) -> list[bytes]:
        """Payloads the broker acknowledged to the agent, in order."""
        with self._acked_lock:
            return list(self.acked)

    def sent(self) -> list[bytes]:
        """Payloads the agent published (and the proxy passed on), in order."""
        with self._acked_lock:
            return list(self.published)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """`a` is the client (the agent), `b` the broker; as Proxy._pump, plus the record."""
        peers = {a: b, b: a}
        frames = {a: Frames(), b: Frames()}
        sent: dict[int, bytes] = {}  # packet id -> payload on our topic, this connection
        level = 5  # from the CONNECT: 3.1.1 (4) has no properties in a PUBLISH
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                if self.mode == "blackhole":
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    packets = frames[s].feed(data)
                    peers[s].sendall(data)  # delivered: only now does it count
                    for kind, flags, body in packets:
                        if s is a and kind == CONNECT:
                            level = body[2 + int.from_bytes(body[:2], "big")]
                        elif s is b and kind == CONNACK and body[1] == 0:
                            with self._acked_lock:
                                self.sessions.append(level)
                        elif s is a and kind == PUBLISH and flags & 0x06:
                            n = int.from_bytes(body[:2], "big")
                            if body[2:2 + n] == self.topic:
                                pid = int.from_bytes(body[2 + n:4 + n], "big")
                                props_len, pos = _varint(body, 4 + n) if level == 5 else (0, 4 + n)
                                sent[pid] = body[pos + props_len:]
                                with self._acked_lock:
                                    self.published.append(sent[pid])
                        elif s is b and kind == PUBACK:
                            pid = int.from_bytes(body[:2], "big")
                            ok = len(body) < 3 or body[2] < 0x80
                            payload = sent.pop(pid, None)
                            if ok and payload is not None:
                                with self._acked_lock:
                                    self.acked.append(payload)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
