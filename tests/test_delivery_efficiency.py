"""Light on a Pi: fewer commits, wake-ups and copies per relayed reading, custody unchanged.

The outbox coalesces inputs into one commit per `commit_interval_ms`, lets
deliveries ride with the next commit, and still acknowledges an input only
after its rows committed and deletes a row only after its PUBACK. The store
speaks `OutboxError`, never sqlite3. The codec reads from a reused buffer
without keeping a view of it. CPU figures are in `fogwhisk bench relay`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker
from chaos.stream import Stream, received, verdict, wait_all
from helpers import Collector
from hypothesis import given, settings
from hypothesis import strategies as st
from test_outbox import Harness, out, run_outbox

from agent.config import BrokerConfig, OutboxConfig
from agent.delivery.outbox import EARLY_INPUTS
from agent.delivery.store import DB_NAME, Store
from agent.errors import OutboxBusyError, OutboxError
from agent.mqtt import codec
from agent.mqtt.connection import DEFAULT_RECEIVE_MAXIMUM, Connection
from agent.telemetry import Telemetry

LONG_MS = 600_000.0  # an interval no test waits out: only what ends it early counts


async def _turns(n: int = 5) -> None:
    """Let the loop run the committer (and the writer thread's answers) a few times."""
    for _ in range(n):
        await asyncio.sleep(0.01)


def test_inputs_within_one_commit_interval_wait_and_then_share_one_commit(
        tmp_path: Path) -> None:
    """After a quiet spell the first input commits at once; the next ones wait for the
    interval, unacknowledged, until enough of them end it early: then all share one
    commit, and each is acknowledged only after it."""
    async def body(h: Harness) -> None:
        run = asyncio.create_task(h.outbox.run())
        try:
            h.submit(0)
            while h.acks != [0]:
                await _turns(1)
            assert h.outbox.counters.values["commits"] == 1
            for i in range(1, EARLY_INPUTS):
                h.submit(i)
                await _turns(1)
            assert h.acks == [0]  # waiting for the interval: not committed, not acked
            assert h.on_disk() == 1
            h.submit(EARLY_INPUTS)  # enough inputs waiting end the interval
            while len(h.acks) < EARLY_INPUTS + 1:
                await _turns(1)
            assert h.acks == list(range(EARLY_INPUTS + 1))
            assert h.outbox.counters.values["commits"] == 2
            assert h.on_disk() == EARLY_INPUTS + 1
        finally:
            run.cancel()

    run_outbox(tmp_path, OutboxConfig(commit_interval_ms=LONG_MS), body)


def test_a_delivery_starts_no_commit_of_its_own_and_its_delete_rides_with_the_next(
        tmp_path: Path) -> None:
    """A PUBACK only queues the delete: no transaction until the next commit, which
    takes it along; until then the row is on disk and counted as settling."""
    async def body(h: Harness) -> None:
        run = asyncio.create_task(h.outbox.run())
        try:
            h.submit(0)
            while not h.rows:
                await _turns(1)
            h.outbox.acked(h.rows[0])
            await _turns()
            assert h.outbox.counters.values["commits"] == 1
            assert h.on_disk() == 1 and h.outbox.settling == 1
            assert h.outbox.count == 0  # counted out at once, deleted with the next commit
            for i in range(1, EARLY_INPUTS + 1):
                h.submit(i)
            while len(h.acks) < EARLY_INPUTS + 1:
                await _turns(1)
            assert h.outbox.counters.values["commits"] == 2
            assert h.on_disk() == EARLY_INPUTS and h.outbox.settling == 0
        finally:
            run.cancel()

    run_outbox(tmp_path, OutboxConfig(commit_interval_ms=LONG_MS), body)


def test_deliveries_reach_the_disk_when_no_input_follows(tmp_path: Path) -> None:
    """With no input to ride with, deletes still commit (after SETTLE_S): an idle
    outbox ends empty on disk."""
    async def body(h: Harness) -> None:
        run = asyncio.create_task(h.outbox.run())
        try:
            for i in range(3):
                h.submit(i)
            await h.outbox.flush()
            for r in h.rows:
                h.outbox.acked(r)
            for _ in range(1000):
                if not h.on_disk():
                    break
                await asyncio.sleep(0.02)
            assert h.on_disk() == 0 and h.outbox.settling == 0
            assert h.outbox.counters.values["delivered"] == 3
        finally:
            run.cancel()

    run_outbox(tmp_path, OutboxConfig(commit_interval_ms=LONG_MS), body)


def test_settle_soon_commits_waiting_deletes_without_waiting_for_the_interval(
        tmp_path: Path) -> None:
    """The sender's window full of delivered rows asks for their deletes: they commit
    at once (a crash then resends at most one window), and the sender hears of it."""
    settled: list[int] = []

    async def body(h: Harness) -> None:
        h.outbox.on_settled = lambda: settled.append(h.outbox.settling)
        run = asyncio.create_task(h.outbox.run())
        try:
            for i in range(5):
                h.submit(i)
            await h.outbox.flush()
            for r in h.rows:
                h.outbox.acked(r)
            assert h.outbox.settling == 5
            h.outbox.settle_soon()
            while not settled:
                await _turns(1)
            assert settled == [0] and h.on_disk() == 0
        finally:
            run.cancel()

    run_outbox(tmp_path, OutboxConfig(commit_interval_ms=LONG_MS), body)


def test_a_store_locked_by_another_process_raises_outbox_busy_not_sqlite3(
        tmp_path: Path) -> None:
    """The store's boundary: a commit that cannot get the lock raises OutboxBusyError
    (an OutboxError), so the outbox never handles sqlite3 errors itself."""
    store = Store(tmp_path / DB_NAME, OutboxConfig())
    other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OutboxBusyError, match="locked"):
            store.commit([out(1)], [], [], 0, True)
        other.execute("ROLLBACK")
        rows, _ = store.commit([out(1)], [], [], 0, True)
        assert len(rows) == 1
        store.db.execute("PRAGMA query_only = 1")
        with pytest.raises(OutboxError) as err:
            store.commit([out(2)], [], [], 0, True)
        assert not isinstance(err.value, sqlite3.Error)
    finally:
        other.close()
        store.close()


def test_an_outbox_commit_error_is_an_outbox_error_and_nothing_is_acknowledged(
        tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.outbox.store is not None
        h.submit(1)
        h.outbox.store.db.execute("PRAGMA query_only = 1")
        with pytest.raises(OutboxError):
            await h.outbox.flush()
        assert h.acks == [] and h.outbox.pending_inputs() == 1
        h.outbox.store.db.execute("PRAGMA query_only = 0")
        await h.outbox.flush()
        assert h.acks == [1]

    run_outbox(tmp_path, OutboxConfig(), body)


def test_the_input_window_is_our_receive_maximum_with_mqtt5_and_mosquittos_20_with_311(
        ) -> None:
    """How many inputs may wait unacknowledged before the broker stops sending: it
    sizes the early end of a commit interval."""
    t = Telemetry()
    v5 = Connection("local", BrokerConfig(url="mqtt://127.0.0.1:1883"), "c", t,
                    receive_maximum=500)
    v311 = Connection("local", BrokerConfig(url="mqtt://127.0.0.1:1883", protocol="3.1.1"),
                      "c", t, receive_maximum=500)
    assert v5.inbound_window == 500
    assert v311.inbound_window == DEFAULT_RECEIVE_MAXIMUM == 20


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
       st.lists(st.integers(1, 200), min_size=1, max_size=20))
def test_packets_read_from_a_reused_buffer_equal_those_read_from_bytes_and_keep_no_view(
        payloads: list[bytes], cuts: list[int]) -> None:
    """A buffered read hands the reader a view of one buffer the next read overwrites:
    the packets are the same as from bytes, whatever the slicing, and stay intact."""
    stream = b"".join(codec.publish(f"t/{i}", p, 1, False, i + 1, v5=True)
                      for i, p in enumerate(payloads)) + codec.puback(7)
    expected = codec.Reader().feed(stream)
    reader = codec.Reader()
    buf = bytearray(256)
    got: list[tuple[int, int, bytes]] = []
    pos, k = 0, 0
    while pos < len(stream):
        n = min(cuts[k % len(cuts)], len(stream) - pos, len(buf))
        buf[:n] = stream[pos:pos + n]
        got += reader.feed(memoryview(buf)[:n])
        buf[:] = b"\xff" * len(buf)  # the next read overwrites the buffer
        pos, k = pos + n, k + 1
    assert got == expected
    assert all(type(body) is bytes for _, _, body in got)


def test_a_steady_stream_shares_commits_and_arrives_whole_and_in_order(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """At a sensor rate with the default interval, many readings share each commit (a
    few commits a second instead of two per reading), every reading arrives once and
    in order, and every delivered row leaves the disk."""
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    agent = AgentProcess(cfg)
    try:
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            stream = Stream(local_broker.url, rate_hz=200).start()
            time.sleep(3)
            stream.stop()
            wait_all(cloud, DEVICE, stream.accepted)
            verdict(received(cloud, DEVICE), stream.accepted, faults=0, window=0)

            def outbox() -> dict[str, int]:
                docs = cloud.snapshot(f"fog/{DEVICE}/telemetry")
                return dict(json.loads(docs[-1].payload)["outbox"]) if docs else {}
            deadline = time.monotonic() + 20
            while outbox().get("delivered", 0) < len(stream.accepted):
                assert time.monotonic() < deadline, outbox()
                time.sleep(0.2)
            counters = outbox()
            assert counters["commits"] * 4 <= counters["stored"], counters
    finally:
        assert agent.stop() == 0, agent.log()
    db = sqlite3.connect(tmp_path / "data" / DB_NAME)
    assert db.execute("SELECT count(*) FROM rows").fetchone()[0] == 0
    db.close()
