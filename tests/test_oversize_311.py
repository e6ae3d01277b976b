"""MQTT 3.1.1 exchanges no packet limit: one row above the broker's must not stop its lane.

With MQTT 5 the broker names its Maximum Packet Size in the CONNACK and a
larger row is dead-lettered before it is sent. With 3.1.1 the only sign is
the broker closing the connection (Mosquitto 2.0.11 logs "Client ...
disconnected due to oversize packet" on a PUBLISH above `max_packet_size`).
The sender isolates the row (one in flight at a time after closes with no
PUBACK) and dead-letters the one the broker closed on twice while it was
alone; a network cut with rows in flight dead-letters nothing.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker, BrokerFactory
from helpers import Collector, publish_many
from proxy import Proxy

from agent.delivery.store import DB_NAME

V311 = 'protocol = "3.1.1"\nkeepalive_s = 5'
TOPIC = "sensors/line"
CONNACK_311_BYTES = 4  # 20 02 00 00


def _until(cond: Callable[[], bool], what: str, agent: AgentProcess,
           timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert agent.running, f"agent exited with {agent.proc.poll()}:\n{agent.log()[-4000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{agent.log()[-6000:]}"
        time.sleep(0.1)


def _rows(data: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{(data / DB_NAME).as_uri()}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout = 5000")
    try:
        return list(db.execute(sql).fetchall())
    finally:
        db.close()


def _payloads(cloud: Collector) -> list[bytes]:
    return [m.payload for m in cloud.snapshot(f"fog/{DEVICE}/{TOPIC}")]


def _outbox_telemetry(cloud: Collector) -> dict[str, Any]:
    docs = cloud.snapshot(f"fog/{DEVICE}/telemetry")
    return dict(json.loads(docs[-1].payload)["outbox"]) if docs else {}


def test_a_row_above_the_brokers_limit_on_mqtt_311_is_dead_lettered_and_the_lane_flows(
        tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory) -> None:
    """Mosquitto with max_packet_size 2000, spoken to in MQTT 3.1.1 (no limit is
    exchanged): a 4000-byte reading between 40 small ones makes the broker close the
    connection; the agent dead-letters that reading with the reason, delivers the 40
    others in order and keeps running; the broker's log shows the disconnects."""
    uplink = broker_factory("uplink", extra_conf="max_packet_size 2000")
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink, RELAY,
                       uplink_extra=V311)
    data = tmp_path / "data"
    big = b"B" * 4000
    small = [b"%03d" % n for n in range(40)]
    with Collector(uplink.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, TOPIC, [*small[:20], big, *small[20:]])
            _until(lambda: _payloads(cloud) == small, "the readings behind the big one "
                   f"never arrived (got {len(_payloads(cloud))})", agent)
            _until(lambda: _rows(data, "SELECT count(*) FROM rows")[0][0] == 0,
                   "rows left in the outbox", agent)
            _until(lambda: "dead-lettered" in agent.log(), "no dead-letter warning", agent)
            # Nothing else gets stuck behind it: the lane flows for later readings.
            publish_many(local_broker.url, TOPIC, [b"after"])
            _until(lambda: _payloads(cloud)[-1:] == [b"after"], "a later reading", agent)
            # Counted in telemetry: once isolated, once dead-lettered for this cause.
            _until(lambda: _outbox_telemetry(cloud).get("dead_closed_alone") == 1,
                   "dead_closed_alone not counted in telemetry", agent)
            counted = _outbox_telemetry(cloud)
            assert counted["uplink_isolations"] == 1 and counted["dead_lettered"] == 1, counted
        finally:
            assert agent.stop() == 0, agent.log()
    assert "disconnected due to oversize packet" in uplink.log(), uplink.log()[-3000:]
    dead = _rows(data, "SELECT topic, length(payload), reason FROM dead")
    assert len(dead) == 1, dead
    topic, size, reason = dead[0]
    assert topic == f"fog/{DEVICE}/{TOPIC}" and size == 4000
    assert isinstance(reason, str) and "closed the connection twice on this row alone" in reason
    assert "MQTT 3.1.1" in reason
    log = agent.log()
    assert "one row at a time" in log, log[-4000:]
    peek = subprocess.run([sys.executable, "-m", "agent", "outbox", "peek", "--data-dir",
                           str(data), "--dead"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert peek.returncode == 0 and "closed the connection twice" in peek.stdout, peek.stdout


class RepliesLost(Proxy):
    """A proxy that, while `muted`, passes the broker's CONNACK and nothing after it:
    connections open, rows go out, no PUBACK (nor PINGRESP) ever comes back."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.muted = False

    def _pump(self, a: socket.socket, b: socket.socket) -> None:  # a: agent, b: broker
        passed = 0  # bytes of the broker's that reached the agent
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is b:
                        if self.muted:
                            data = data[:max(0, CONNACK_311_BYTES - passed)]
                        passed += len(data)
                    if data:
                        (b if s is a else a).sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() closed
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


def test_a_flaky_uplink_with_rows_in_flight_dead_letters_nothing_on_mqtt_311(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """MQTT 3.1.1 through a link that passes CONNACKs but loses every PUBACK: two cuts
    with rows in flight make the agent send one row at a time; the keepalive then closes
    two connections with one row alone in flight. No row is dead-lettered; once the
    link heals every reading arrives and the outbox empties."""
    proxy = RepliesLost(uplink_broker.port)
    cfg = write_config(tmp_path / "agent.toml", local_broker, proxy.url, RELAY,
                       uplink_extra='protocol = "3.1.1"\nkeepalive_s = 2')
    data = tmp_path / "data"
    readings = [b"%04d" % n for n in range(300)]
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            agent = AgentProcess(cfg)
            try:
                agent.wait_ready()
                prime(local_broker, cloud, agent, "sensors/marker")
                proxy.muted = True
                publish_many(local_broker.url, TOPIC, readings)
                _until(lambda: _rows(data, "SELECT count(*) FROM rows")[0][0] >= 100,
                       "readings not stored", agent)
                for _ in range(2):  # cut with a window of rows in flight, unacknowledged
                    before = proxy.accepted
                    proxy.cut()
                    _until(lambda b=before: proxy.accepted > b,  # type: ignore[misc]
                           "no reconnect", agent)
                    time.sleep(0.5)
                proxy.cut()
                _until(lambda: "one row at a time" in agent.log(), "no isolation", agent)
                isolated = proxy.accepted
                # Two connections with one row in flight, each closed by the keepalive.
                _until(lambda: proxy.accepted >= isolated + 3, "no keepalive closes", agent)
                proxy.muted = False
                proxy.cut()  # TCP loses no bytes mid-stream: the muted connection is dead
                _until(lambda: set(readings) <= set(_payloads(cloud)),
                       "readings missing", agent, timeout_s=60)
                _until(lambda: _rows(data, "SELECT count(*) FROM rows")[0][0] == 0,
                       "rows left in the outbox", agent)
            finally:
                assert agent.stop() == 0, agent.log()
    finally:
        proxy.close()
    assert _rows(data, "SELECT count(*) FROM dead") == [(0,)]
    log = agent.log()
    assert "dead-lettered" not in log, log[-4000:]
    assert "back to a window of 20" in log, log[-4000:]


def test_on_mqtt_5_the_announced_limit_dead_letters_the_row_before_it_is_sent(
        tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory) -> None:
    """The same broker spoken to in MQTT 5 names its Maximum Packet Size in the CONNACK:
    the 4000-byte reading is dead-lettered before it is sent, the broker never closes
    the connection, no isolation is needed, and the readings around it arrive in order."""
    uplink = broker_factory("uplink", extra_conf="max_packet_size 2000")
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink, RELAY,
                       uplink_extra='protocol = "5"')
    data = tmp_path / "data"
    small = [b"%03d" % n for n in range(20)]
    with Collector(uplink.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, TOPIC, [*small[:10], b"B" * 4000, *small[10:]])
            _until(lambda: _payloads(cloud) == small, "the readings around the big one", agent)
            _until(lambda: _rows(data, "SELECT count(*) FROM dead")[0][0] == 1,
                   "no dead letter", agent)
        finally:
            assert agent.stop() == 0, agent.log()
    dead = _rows(data, "SELECT length(payload), reason FROM dead")
    assert dead[0][0] == 4000 and "maximum packet size 2000" in str(dead[0][1]), dead
    assert "oversize packet" not in uplink.log(), uplink.log()[-3000:]
    assert "one row at a time" not in agent.log()
