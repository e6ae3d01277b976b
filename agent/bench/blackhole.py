"""`fogwhisk bench blackhole`: how fast the agent notices an uplink that went silent.

A blackhole (a dead NAT entry, a pulled cable upstream) keeps the TCP socket
open and answers nothing; only the MQTT keepalive can notice. A proxy between
the agent and the uplink broker starts swallowing bytes both ways; the time
until the agent closes its side is the detection time. The bar is 1.5 x
keepalive; Mosquitto's own bridge and paho notice after 1.5-2 x.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.bench.relay import Broker, _agent, _agent_config
from agent.mqtt.connection import free_port

KEEPALIVE_S = 2


class _Proxy:
    """Forwards one connection at a time until `blackhole()`; then reads and drops."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self.swallow = threading.Event()
        self.closed_at: float | None = None
        self.connected = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.connected.set()
            self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        if s is a:
                            self.closed_at = time.monotonic()
                        return
                    if not self.swallow.is_set():
                        peers[s].sendall(data)
        except OSError:
            self.closed_at = self.closed_at or time.monotonic()
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self._srv.close()


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fogwhisk bench blackhole")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args(argv)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fogwhisk-bench-blackhole-") as tmp:
        work = Path(tmp)
        local = Broker(work, "local").start()
        uplink = Broker(work, "uplink").start()
        try:
            for i in range(args.trials):
                proxy = _Proxy(uplink.port)
                (work / str(i)).mkdir()
                cfg = _agent_config(work / str(i), local.port, proxy.port,
                                    uplink_extra=f"keepalive_s = {KEEPALIVE_S}")
                with _agent(cfg):
                    if not proxy.connected.wait(30):
                        raise RuntimeError("the agent never connected through the proxy")
                    time.sleep(KEEPALIVE_S * 1.5)  # a settled connection, pings exchanged
                    t0 = time.monotonic()
                    proxy.swallow.set()
                    deadline = t0 + KEEPALIVE_S * 10
                    while proxy.closed_at is None and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if proxy.closed_at is None:
                        raise RuntimeError("the agent never gave up on the silent uplink")
                    times.append(proxy.closed_at - t0)
                proxy.close()
        finally:
            local.stop()
            uplink.stop()
    worst = max(times)
    bar = 1.5 * KEEPALIVE_S
    print(f"{'figure':<50} {'value':>10} {'bar':>10}  result")
    print(f"{'blackhole detected, median of ' + str(len(times)) + ' (s)':<50} "
          f"{statistics.median(times):>10.2f} {'':>10}")
    print(f"{'blackhole detected, worst (s), keepalive ' + str(KEEPALIVE_S) + ' s':<50} "
          f"{worst:>10.2f} {f'<= {bar:g}':>10}  {'pass' if worst <= bar else 'FAIL'}")
    return 0 if worst <= bar else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
