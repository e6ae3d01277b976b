"""Numbered QoS1 readings in, what reached the uplink out, and the verdict on them.

Accepted = PUBACKed by the local broker (it then holds the reading in the agent's
persistent session until the agent acknowledges it after its outbox commit).
"""

from __future__ import annotations

import threading
import time

from helpers import Collector, connect, make_client
from paho.mqtt.client import MQTTv5

TOPIC = "sensors/chaos"


class Stream:
    """Publishes n = 0, 1, 2, ... on `topic` (in a thread with `start`); records the PUBACKed.

    `pad` makes each payload bigger ("n pad"); `received` reads the number back.
    `protocol`: paho's MQTTv5 or MQTTv311 (for a bus that speaks only 3.1.1).
    """

    def __init__(self, url: str, rate_hz: float = 400.0, topic: str = TOPIC,
                 pad: bytes = b"", protocol: int = MQTTv5) -> None:
        self.url = url
        self.pad = b" " + pad if pad else b""
        self.topic = topic
        self.rate_hz = rate_hz
        self.accepted: list[int] = []
        self.next = 0
        self._stop = threading.Event()
        self._client = make_client(url, protocol=protocol)
        connect(self._client, url)
        self._thread: threading.Thread | None = None

    def publish(self, count: int) -> None:
        infos = []
        for _ in range(count):
            info = self._client.publish(self.topic, str(self.next).encode() + self.pad, 1)
            infos.append((self.next, info))
            self.next += 1
        for n, info in infos:
            info.wait_for_publish(30)
            if info.is_published():
                self.accepted.append(n)

    def start(self) -> Stream:
        def loop() -> None:
            while not self._stop.is_set():
                self.publish(max(1, int(self.rate_hz / 20)))
                time.sleep(0.05)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        self._client.disconnect()
        self._client.loop_stop()


def received(cloud: Collector, device: str, topic: str = TOPIC) -> list[int]:
    return [int(m.payload.partition(b" ")[0]) for m in cloud.snapshot(f"fog/{device}/{topic}")]


def wait_all(cloud: Collector, device: str, accepted: list[int], timeout_s: float = 60,
             topic: str = TOPIC) -> None:
    deadline = time.monotonic() + timeout_s
    want = set(accepted)
    while not want <= set(received(cloud, device, topic)):
        if time.monotonic() > deadline:
            missing = sorted(want - set(received(cloud, device, topic)))
            raise AssertionError(f"{len(missing)} accepted readings never arrived: "
                                 f"{missing[:20]}")
        time.sleep(0.1)


def verdict(got: list[int], accepted: list[int], faults: int, window: int,
            sent: list[int] | None = None) -> None:
    """Zero loss, duplicates at most the in-flight window per fault, order kept.

    `sent`: what the agent itself put on the wire (a tap in the proxy), when the broker
    may deliver some readings twice on its own (a persistent session after its crash):
    the duplicate bound then applies to the agent's resends.
    """
    assert not set(accepted) - set(got), "lost accepted readings"
    mine = got if sent is None else sent
    dups = len(mine) - len(set(mine))
    assert dups <= faults * window, f"{dups} duplicates for {faults} faults (window {window})"
    first: list[int] = []
    seen: set[int] = set()
    for n in got:
        if n not in seen:
            seen.add(n)
            first.append(n)
    assert first == sorted(first), "order per lane not kept"
