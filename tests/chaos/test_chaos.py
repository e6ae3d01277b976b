"""Nothing accepted is lost: real processes, real faults (cut proxies, kill -9, poison).

Every test ends with the same verdict: zero accepted readings lost, duplicates
at most the in-flight window (20, Mosquitto's receive maximum) per fault, and
the order of first arrivals kept.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from agent_proc import DEVICE, RELAY, AgentProcess, write_config
from brokers import Broker, BrokerFactory
from helpers import Collector, publish_many
from proxy import Proxy
from stream import TOPIC, Stream, received, verdict, wait_all
from tap import AckTap

WINDOW = 20
FAST = 'keepalive_s = 2\nreconnect_min_s = "0.1s"\nreconnect_max_s = "0.5s"'


def _config(tmp: Path, local: Broker | str, uplink: Broker | str, extra: str = "") -> Path:
    return write_config(tmp / "agent.toml", local, uplink, RELAY, extra=extra,
                        uplink_extra="keepalive_s = 2")


def test_no_reading_is_lost_when_the_uplink_is_cut_twice_and_blackholed_once(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """Two hard cuts and a blackhole (sockets open, nothing moves) during a stream: the
    agent notices the blackhole by its keepalive, reconnects, and resends in order."""
    proxy = Proxy(uplink_broker.port)
    agent = AgentProcess(_config(tmp_path, local_broker, proxy.url))
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            agent.wait_ready()
            stream = Stream(local_broker.url).start()
            for fault in ("cut", "cut", "blackhole"):
                time.sleep(1.5)
                before = proxy.accepted
                if fault == "cut":
                    proxy.cut()
                else:
                    proxy.blackhole()
                    time.sleep(4 * 2)  # long past 1.5x the 2 s keepalive
                    proxy.forward()
                deadline = time.monotonic() + 20
                while proxy.accepted == before:  # the agent came back by itself
                    assert time.monotonic() < deadline, agent.log()
                    time.sleep(0.1)
            time.sleep(1)
            stream.stop()
            wait_all(cloud, DEVICE, stream.accepted)
            verdict(received(cloud, DEVICE), stream.accepted, faults=3, window=WINDOW)
    finally:
        agent.stop()
        proxy.close()


def test_no_reading_is_lost_when_the_uplink_broker_is_killed_and_restarted(
        tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory) -> None:
    """kill -9 of the uplink Mosquitto mid-stream; it comes back on the same port later.

    Only the agent's losses count here. A reading the broker acknowledged (PUBACK) has
    left the agent's custody; a kill -9 then loses what the broker had not saved. So the
    broker saves on every change (`autosave_on_changes`, `autosave_interval 1`) and the
    observer holds a persistent session on it: what it acknowledged and queued for the
    observer, and the observer's subscription, survive the kill. What remains is the
    broker's own window between its PUBACK and its save: a tap in the proxy records the
    readings the killed broker acknowledged to the agent, and only those may be missing
    (seen: up to 10 in a row under load). Every other accepted reading must arrive.
    Duplicates are counted where the agent makes them, on the wire (the tap): the
    restored session may deliver a reading to the observer twice on its own.
    """
    uplink = broker_factory("uplink", "autosave_interval 1\nautosave_on_changes true",
                            persistence=True)
    # The proxy holds the agent back until the broker is up again; its tap tells whose
    # loss a missing reading is.
    proxy = AckTap(uplink.port, f"fog/{DEVICE}/{TOPIC}")
    agent = AgentProcess(_config(tmp_path, local_broker, proxy.url))
    cloud = Collector(uplink.url, f"fog/{DEVICE}/#", client_id="observer", clean=False)
    try:
        cloud.start()
        agent.wait_ready()
        stream = Stream(local_broker.url).start()
        time.sleep(1.5)
        proxy.refuse()
        uplink.kill()
        acked_by_killed = {int(p) for p in proxy.acknowledged()}  # nothing flows after refuse()
        time.sleep(2)
        uplink.start()
        cloud.reconnect()  # the saved session: subscription and queued readings
        time.sleep(0.5)
        proxy.forward()
        time.sleep(1.5)
        stream.stop()
        wait_all(cloud, DEVICE, [n for n in stream.accepted if n not in acked_by_killed])
        time.sleep(0.5)  # a moment for any late arrival of the excused ones
        got = received(cloud, DEVICE)
        lost_by_broker = set(stream.accepted) - set(got)
        sent = [int(p) for p in proxy.sent()]
        assert lost_by_broker <= acked_by_killed, "the agent lost readings"
        verdict(got, [n for n in stream.accepted if n not in lost_by_broker], faults=1,
                window=WINDOW, sent=sent)
    finally:
        agent.stop()
        cloud.stop()
        proxy.close()


def test_no_reading_is_lost_when_the_agent_is_killed_mid_stream_also_with_the_uplink_down(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """kill -9 of the agent twice: once with the uplink up, once while it is cut off. The
    local broker redelivers what the agent had not acknowledged; the outbox keeps the rest."""
    proxy = Proxy(uplink_broker.port)
    cfg = _config(tmp_path, local_broker, proxy.url)
    agent = AgentProcess(cfg)
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            agent.wait_ready()
            stream = Stream(local_broker.url).start()
            time.sleep(1.5)
            agent.kill()
            agent = AgentProcess(cfg)
            time.sleep(1.5)
            proxy.refuse()
            time.sleep(1)
            agent.kill()  # with a backlog in its outbox and the uplink unreachable
            agent = AgentProcess(cfg)
            time.sleep(1.5)
            proxy.forward()
            time.sleep(1)
            stream.stop()
            wait_all(cloud, DEVICE, stream.accepted)
            verdict(received(cloud, DEVICE), stream.accepted, faults=2, window=WINDOW)
    finally:
        agent.stop()
        proxy.close()


def test_power_loss_100_kills_during_commits_lose_nothing_and_the_database_stays_sound(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """SIGKILL of the agent at random moments, 100 times, while readings stream in and
    commits run; then the integrity check passes and every accepted reading arrives."""
    cfg = _config(tmp_path, local_broker, uplink_broker)
    rng = random.Random(3)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        first = AgentProcess(cfg)
        first.wait_ready()  # the agent's persistent local session (and subscription) exists
        first.kill()
        stream = Stream(local_broker.url, rate_hz=1000).start()
        for _ in range(100):
            agent = AgentProcess(cfg)
            time.sleep(rng.uniform(0.3, 0.9))
            agent.kill()
        stream.stop()
        db = sqlite3.connect(tmp_path / "data" / "outbox.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        assert not list((tmp_path / "data").glob("outbox.db.corrupt-*"))
        agent = AgentProcess(cfg)
        try:
            wait_all(cloud, DEVICE, stream.accepted, timeout_s=90)
            verdict(received(cloud, DEVICE), stream.accepted, faults=100, window=WINDOW)
        finally:
            agent.stop()


def test_a_poison_message_is_dead_lettered_and_does_not_block_the_lane(
        tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory) -> None:
    """A reading larger than the uplink's maximum packet size goes to the dead-letter
    table; the readings behind it arrive, in order."""
    uplink = broker_factory("uplink", extra_conf="max_packet_size 2000")
    agent = AgentProcess(_config(tmp_path, local_broker, uplink))
    try:
        with Collector(uplink.url, f"fog/{DEVICE}/#") as cloud:
            agent.wait_ready()
            publish_many(local_broker.url, TOPIC, [b"0", b"1", b"9" * 5000, b"2", b"3"])
            deadline = time.monotonic() + 20
            while [m.payload for m in cloud.snapshot(f"fog/{DEVICE}/{TOPIC}")] \
                    != [b"0", b"1", b"2", b"3"]:
                assert time.monotonic() < deadline, cloud.snapshot()
                time.sleep(0.1)
    finally:
        agent.stop()
    db = sqlite3.connect(tmp_path / "data" / "outbox.db")
    dead = db.execute("SELECT length(payload), reason FROM dead").fetchall()
    assert [d[0] for d in dead] == [5000] and "maximum packet size" in dead[0][1]
    assert db.execute("SELECT count(*) FROM rows").fetchone()[0] == 0
