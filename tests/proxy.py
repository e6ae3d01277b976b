"""A TCP proxy for chaos tests: forward, cut, refuse, or blackhole a connection.

Threads, not asyncio: the test body stays synchronous. Modes:
  forward    bytes flow both ways
  cut()      close every open connection now (the peer sees a reset/EOF)
  refuse     new connections are accepted and closed at once
  blackhole  sockets stay open but nothing is forwarded either way (a dead NAT,
             a pulled cable): only a keepalive timeout can notice
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from brokers import find_free_port


class Proxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = find_free_port()
        self.mode = "forward"
        self.accepted = 0
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._srv = socket.create_server((host, self.port), reuse_port=False)
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._take(client)

    def _take(self, client: socket.socket) -> None:
        """One accepted client (on the accept thread): refuse it, or pump it upstream."""
        if self.mode == "refuse":
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        self.accepted += 1
        with self._lock:
            self._conns.append((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                if self.mode == "blackhole":
                    continue  # hold the sockets, read nothing, forward nothing
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() closed
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        """Close every connection now; new ones are accepted again (unless refusing)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def refuse(self) -> None:
        self.mode = "refuse"
        self.cut()

    def forward(self) -> None:
        if self.mode == "blackhole":
            self.cut()  # the blackholed sockets are dead to both ends
        self.mode = "forward"

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self.cut()
        self._thread.join(2)
