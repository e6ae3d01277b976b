"""Bounds and refusals: a full outbox under both policies, a broker that says no.

Real agent, real Mosquitto, the uplink cut off with a refusing TCP proxy. Every
test ends with the suite's verdict: zero accepted readings lost (or, under
drop_oldest, exactly the counted oldest bulk ones missing), duplicates at most
the in-flight window per fault, order kept per lane.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker, BrokerFactory
from helpers import Collector, connect, make_client
from proxy import Proxy
from stream import TOPIC, Stream, received, verdict, wait_all

WINDOW = 20
MAX_MESSAGES = 300
BULK, ALERT = "sensors/bulk/r", "sensors/alert/r"
TWO_LANES = """
[[pipeline]]
name = "bulk"
trigger = "sensors/bulk/#"
steps = [{ action = "forward", priority = 0 }]

[[pipeline]]
name = "alert"
trigger = "sensors/alert/#"
steps = [{ action = "forward", priority = 1 }]
"""


def _config(tmp: Path, local: Broker, uplink: Broker | str, pipelines: str = RELAY,
            extra: str = "", uplink_extra: str = "keepalive_s = 2") -> Path:
    return write_config(tmp / "agent.toml", local, uplink, pipelines, extra=extra,
                        uplink_extra=uplink_extra)


def _outbox(tmp: Path, sql: str, *args: Any) -> Any:
    """One value from the agent's outbox, read-only beside the running agent."""
    db = sqlite3.connect(f"{(tmp / 'data' / 'outbox.db').as_uri()}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        return db.execute(sql, args).fetchone()[0]
    finally:
        db.close()


def _until(cond: Callable[[], bool], what: str, agent: AgentProcess,
           timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}:\n{agent.log()[-3000:]}"
        time.sleep(0.1)


def _outbox_counters(cloud: Collector, agent: AgentProcess, want: str) -> dict[str, Any]:
    """The outbox counters from the newest telemetry document that reports `want`."""
    found: dict[str, Any] = {}

    def seen() -> bool:
        for m in reversed(cloud.snapshot(f"fog/{DEVICE}/telemetry")):
            counters = json.loads(m.payload).get("outbox", {})
            if counters.get(want):
                found.update(counters)
                return True
        return False

    _until(seen, f"no telemetry with outbox.{want}", agent)
    return found


def _primed_then_cut(tmp: Path, local: Broker, cloud: Collector, agent: AgentProcess,
                     proxy: Proxy, marker: str) -> None:
    """The agent's local subscription is live and its outbox empty; then the uplink goes."""
    agent.wait_ready()
    prime(local, cloud, agent, marker)
    _until(lambda: _outbox(tmp, "SELECT count(*) FROM rows") == 0, "markers not drained",
           agent)
    proxy.refuse()


def test_reject_new_holds_input_at_the_local_broker_and_loses_nothing(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """With the uplink down and `on_full = "reject_new"`, the agent stops acknowledging
    once its outbox holds max_messages: the local broker keeps the rest of 1,000
    readings in the agent's session. When the uplink returns, every reading arrives,
    in order."""
    proxy = Proxy(uplink_broker.port)
    cfg = _config(tmp_path, local_broker, proxy.url,
                  extra=f'[outbox]\nmax_messages = {MAX_MESSAGES}\non_full = "reject_new"')
    agent = AgentProcess(cfg)
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            _primed_then_cut(tmp_path, local_broker, cloud, agent, proxy, "sensors/marker")
            stream = Stream(local_broker.url)
            stream.publish(1000)
            assert len(stream.accepted) == 1000  # the local broker took them all
            _until(lambda: _outbox(tmp_path, "SELECT count(*) FROM rows") >= MAX_MESSAGES - 50,
                   "the outbox never filled", agent)
            agent.wait_log("not acknowledging new input")
            for _ in range(10):  # full, and held there: the rest waits at the local broker
                assert _outbox(tmp_path, "SELECT count(*) FROM rows") <= MAX_MESSAGES
                time.sleep(0.1)
            proxy.forward()
            wait_all(cloud, DEVICE, stream.accepted)
            verdict(received(cloud, DEVICE), stream.accepted, faults=1, window=WINDOW)
            counters = _outbox_counters(cloud, agent, "rejected_full")
            assert counters.get("dropped_full", 0) == 0
    finally:
        agent.stop()
        proxy.close()


def test_drop_oldest_drops_only_the_oldest_bulk_readings_and_counts_each(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """With the uplink down and `on_full = "drop_oldest"`, 1,000 bulk (priority 0) and 100
    alert (priority 1) readings overflow a 300-message outbox: every alert arrives, the
    bulk readings missing are exactly the oldest ones, as many as `dropped_full` says,
    and both lanes keep their order."""
    proxy = Proxy(uplink_broker.port)
    cfg = _config(tmp_path, local_broker, proxy.url, TWO_LANES,
                  extra=f'[outbox]\nmax_messages = {MAX_MESSAGES}\non_full = "drop_oldest"')
    agent = AgentProcess(cfg)
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            _primed_then_cut(tmp_path, local_broker, cloud, agent, proxy, "sensors/alert/mark")
            bulk = Stream(local_broker.url, topic=BULK)
            alert = Stream(local_broker.url, topic=ALERT)
            for _ in range(10):
                bulk.publish(100)
                alert.publish(10)
            bulk.stop()
            alert.stop()
            assert (len(bulk.accepted), len(alert.accepted)) == (1000, 100)

            def taken_in() -> bool:  # the newest of each lane is in the outbox
                return all(_outbox(tmp_path, "SELECT count(*) FROM rows WHERE lane = ? AND "
                                   "payload = ?", lane, last) == 1
                           for lane, last in ((0, b"999"), (1, b"99")))
            _until(taken_in, "the outbox never took the last readings", agent)
            assert _outbox(tmp_path, "SELECT count(*) FROM rows") <= MAX_MESSAGES
            assert _outbox(tmp_path, "SELECT count(*) FROM rows WHERE lane = 1") == 100
            proxy.forward()
            wait_all(cloud, DEVICE, alert.accepted, topic=ALERT)
            dropped = _outbox_counters(cloud, agent, "dropped_full")["dropped_full"]
            assert dropped >= 1000 + 100 - MAX_MESSAGES
            kept = bulk.accepted[dropped:]
            wait_all(cloud, DEVICE, kept, topic=BULK)
            got_bulk = received(cloud, DEVICE, BULK)
            assert set(bulk.accepted) - set(got_bulk) == set(bulk.accepted[:dropped])
            verdict(got_bulk, kept, faults=1, window=WINDOW)
            verdict(received(cloud, DEVICE, ALERT), alert.accepted, faults=1, window=WINDOW)
    finally:
        agent.stop()
        proxy.close()


def test_readings_an_acl_refuses_are_dead_lettered_and_the_rest_pass_in_order(
        tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory) -> None:
    """An uplink whose ACL lets the agent write only under fog/<device>/sensors/chaos/ok/ answers
    every tenth reading (sent elsewhere) with PUBACK 0x87 Not authorized (Mosquitto 2.0
    does, to MQTT 5 clients): those land in the dead-letter table, and the readings
    behind them in the same lane arrive, all of them, in order."""
    ok, denied = f"{TOPIC}/ok", f"{TOPIC}/denied"
    acl = tmp_path / "uplink.acl"
    acl.write_text(f"topic read fog/#\n\nuser {DEVICE}\ntopic write fog/{DEVICE}/{ok}/#\n")
    uplink = broker_factory("uplink", extra_conf=f"acl_file {acl}")
    agent = AgentProcess(_config(tmp_path, local_broker, uplink,
                                 uplink_extra=f'username = "{DEVICE}"'))
    try:
        with Collector(uplink.url, f"fog/{DEVICE}/#") as cloud:
            agent.wait_ready()
            prime(local_broker, cloud, agent, f"{ok}/marker")
            sensor = make_client(local_broker.url)
            connect(sensor, local_broker.url)
            infos = [(n, sensor.publish(denied if n % 10 == 3 else ok, str(n).encode(), 1))
                     for n in range(500)]
            for _, info in infos:
                info.wait_for_publish(30)
            sensor.disconnect()
            sensor.loop_stop()
            accepted = [n for n, info in infos if info.is_published() and n % 10 != 3]
            assert len(accepted) == 450
            wait_all(cloud, DEVICE, accepted, topic=ok)
            _until(lambda: _outbox(tmp_path, "SELECT count(*) FROM dead") == 50,
                   "refused readings not dead-lettered", agent)
            verdict(received(cloud, DEVICE, ok), accepted, faults=0, window=WINDOW)
            assert not received(cloud, DEVICE, denied)
    finally:
        agent.stop()
    db = sqlite3.connect(f"{(tmp_path / 'data' / 'outbox.db').as_uri()}?mode=ro", uri=True)
    dead = db.execute("SELECT topic, payload, reason FROM dead ORDER BY id").fetchall()
    assert db.execute("SELECT count(*) FROM rows").fetchone()[0] == 0
    db.close()
    assert [int(p) for _, p, _ in dead] == [n for n in range(500) if n % 10 == 3]
    assert {t for t, _, _ in dead} == {f"fog/{DEVICE}/{denied}"}
    assert all("Not authorized" in r or "135" in r for _, _, r in dead), dead[:3]
