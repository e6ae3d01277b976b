"""A broker that speaks only MQTT 3.1.1: a TCP front before a real Mosquitto.

It reads each client's CONNECT. MQTT 3.1.1 (protocol level 4) goes through to
Mosquitto, and from then on the bytes flow both ways untouched. MQTT 5 (level
5) is refused the way a real 3.1.1-only broker refuses it:

  "close"    the socket closes before any CONNACK (RabbitMQ 3.10)
  "connack"  a 3.1.1 CONNACK with return code 1, unacceptable protocol
             version (`20 02 00 01`), then the close (NATS 2.9)

and "everything" closes every CONNECT unanswered, 3.1.1 too (a broker that
closes for some other reason: nothing to learn about its version).

`levels` records the protocol level of every CONNECT, in order; `cut()`
closes every open connection (a node going away).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

from proxy import Proxy

REFUSE_V5_CONNACK = bytes.fromhex("20020001")
READ_TIMEOUT_S = 5.0


def read_packet(sock: socket.socket) -> bytes | None:
    """One whole MQTT packet from `sock` (its fixed header included); None on a close."""
    head = sock.recv(1)
    if not head:
        return None
    raw = bytearray(head)
    length = shift = 0
    while True:
        b = sock.recv(1)
        if not b:
            return None
        raw += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    while len(raw) < 1 + (shift // 7) + length:
        chunk = sock.recv(1 + (shift // 7) + length - len(raw))
        if not chunk:
            return None
        raw += chunk
    return bytes(raw)


def protocol_level(connect: bytes) -> int:
    """The protocol level of a CONNECT packet: 4 is MQTT 3.1.1, 5 is MQTT 5."""
    i = 1
    while connect[i] & 0x80:  # the remaining length
        i += 1
    body = connect[i + 1:]
    name_len = int.from_bytes(body[:2], "big")
    return body[2 + name_len]


class V311Front(Proxy):
    """A 3.1.1-only broker on `port`, made of this front and the Mosquitto at `target_port`."""

    def __init__(self, target_port: int, refuse: Literal["close", "connack", "everything"]) -> None:
        self.refuse = refuse
        self.levels: list[int] = []
        super().__init__(target_port)

    def _take(self, client: socket.socket) -> None:
        threading.Thread(target=self._greet, args=(client,), daemon=True).start()

    def _greet(self, client: socket.socket) -> None:
        client.settimeout(READ_TIMEOUT_S)
        try:
            connect = read_packet(client)
            if connect is None or connect[0] >> 4 != 1:
                client.close()
                return
            level = protocol_level(connect)
            self.levels.append(level)
            if level == 5 or self.refuse == "everything":
                if self.refuse == "connack":
                    client.sendall(REFUSE_V5_CONNACK)
                client.close()
                return
            upstream = socket.create_connection(self.target, timeout=2)
            upstream.sendall(connect)
        except OSError:
            with contextlib.suppress(OSError):
                client.close()
            return
        client.settimeout(None)
        upstream.settimeout(None)
        self.accepted += 1
        with self._lock:
            self._conns.append((client, upstream))
        self._pump(client, upstream)
