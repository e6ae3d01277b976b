"""Bytes in and out of one connection attempt, on an asyncio transport.

Everything else (what a packet means, what to answer) lives in `Connection`;
this only splits the stream into packets for it, batches what goes out, and
says how the connection ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING

from agent.mqtt import codec

if TYPE_CHECKING:
    from agent.mqtt.connection import Connection

DISCONNECT_LINGER_S = 1.0  # our DISCONNECT gets this long to leave before the socket goes
READ_BYTES = 256 * 1024  # one recv_into at most; asyncio's own reads are as large


class PacketProtocol(asyncio.BufferedProtocol):
    """Bytes in and out for one connection attempt; everything else lives in Connection.

    Buffered: the kernel writes into one buffer of ours (`recv_into`); a plain
    Protocol's 256 KiB `recv` costs an mmap, an mremap and a munmap per read.
    """

    def __init__(self, conn: Connection, max_packet: int) -> None:
        self.conn = conn
        self.reader = codec.Reader(max_packet)
        self.inbuf = memoryview(bytearray(READ_BYTES))
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed_by_broker = False  # the broker closed the socket without a DISCONNECT
        self.hung_up = False  # ... or reset it
        self.broker_reason: int | None = None  # the reason of the broker's DISCONNECT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small QoS1 packets must not wait for the peer's delayed ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.inbuf

    def buffer_updated(self, nbytes: int) -> None:
        # The reader copies what it keeps: the buffer is reused by the next read.
        self.data_received(self.inbuf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        conn = self.conn
        try:
            packets = self.reader.feed(data)
        except codec.MalformedPacket as exc:
            conn.violation(self, exc)
            return
        if not packets:
            return
        conn.last_in = time.monotonic()  # keepalive counts complete packets only
        for kind, flags, body in packets:
            if self.lost.done():
                return  # given up on after an earlier packet of this read
            try:
                msg = conn.handle(self, kind, flags, body)
            except codec.MalformedPacket as exc:
                conn.violation(self, exc)
                return
            if msg is not None:  # outside the try: the consumer's errors are its own
                conn.deliver(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.closed_by_broker = exc is None
            self.hung_up = exc is None or isinstance(exc, ConnectionResetError)
            self.lost.set_result("the broker closed the connection" if exc is None
                                 else f"connection lost: {exc}")

    def send(self, packet: bytes) -> None:
        """Queue a packet; everything queued in one loop iteration leaves in one write."""
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(packet)

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def fail(self, reason: str, disconnect: int | None = None) -> None:
        """Give up on this connection; with `disconnect`, say so in an MQTT 5 DISCONNECT."""
        if not self.lost.done():
            self.lost.set_result(reason)
        t = self.transport
        if t is None or t.is_closing():
            return
        if disconnect is None:
            t.abort()
            return
        self.flush()
        t.write(codec.disconnect(v5=True, reason=disconnect))
        t.close()  # after the write; a peer that reads nothing gets aborted
        asyncio.get_running_loop().call_later(DISCONNECT_LINGER_S, t.abort)
