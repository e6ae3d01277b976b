"""The outbox on its own: real SQLite files, real corrupt files, a real full file system.

No broker here: rows go in through `Outbox.submit`, leave through `acked`,
`to_dead`, `expired` or eviction, exactly as the uplink sender drives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import OutboxConfig
from agent.delivery.outbox import Outbox
from agent.delivery.store import DB_NAME, Row, Store, _ranges
from agent.errors import OutboxError
from agent.messages import Outgoing
from agent.telemetry import Telemetry


def out(i: int, priority: int = 0, size: int = 100, ttl_s: float | None = None,
        key: str | None = None) -> Outgoing:
    return Outgoing(f"fog/dev/sensors/{i % 3}", bytes([i % 256]) * size,
                    key or f"dev:b00t:{i}", "relay", priority, ttl_s)


class Harness:
    """An open Outbox plus what it handed out: committed rows, acknowledged inputs."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.rows: list[Row] = []
        self.acks: list[int] = []
        self.evicted: list[tuple[int, int]] = []
        outbox.on_rows = self.rows.extend
        outbox.on_evicted = lambda lane, upto: self.evicted.append((lane, upto))

    def submit(self, i: int, **kw: Any) -> None:
        self.outbox.submit([out(i, **kw)], lambda: self.acks.append(i))

    def on_disk(self) -> int:
        assert self.outbox.store is not None
        return int(self.outbox.store.db.execute("SELECT count(*) FROM rows").fetchone()[0])


def run_outbox(tmp: Path, cfg: OutboxConfig, body: Callable[[Harness], Any]) -> None:
    async def main() -> None:
        outbox = Outbox(tmp, cfg, Telemetry())
        await outbox.open()
        try:
            await body(Harness(outbox))
        finally:
            await outbox.close()
    asyncio.run(main())


def test_rows_come_back_in_order_per_lane_with_their_keys_after_a_restart(tmp_path: Path) -> None:
    keys = ["dev:b00t:1", "dev:b00t:0", "dev:b00t:007", "plain", "a:b:c:x²", "dev:b00t:99"]

    async def first(h: Harness) -> None:
        for i, k in enumerate(keys):
            h.outbox.submit([out(i, priority=i % 2, key=k)], None)
        await h.outbox.flush()
        assert [r.key for r in h.rows] == keys

    run_outbox(tmp_path, OutboxConfig(), first)

    async def second(h: Harness) -> None:
        assert h.outbox.count == len(keys)
        assert h.outbox.lanes_on_disk == {0, 1}
        lane0 = await h.outbox.page(0, 0, 100)
        lane1 = await h.outbox.page(1, 0, 100)
        assert [r.key for r in lane0] == keys[0::2]
        assert [r.key for r in lane1] == keys[1::2]
        assert [r.payload for r in lane0] == [out(i).payload for i in (0, 2, 4)]
        assert all(r.qos == 1 and not r.retain for r in lane0 + lane1)
        # Ids keep growing across restarts: an acknowledged id is never reused.
        h.submit(100)
        await h.outbox.flush()
        assert h.rows[-1].id > max(r.id for r in lane0 + lane1)

    run_outbox(tmp_path, OutboxConfig(), second)


def test_an_input_is_acknowledged_only_after_its_rows_are_committed(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.submit(1)
        h.submit(2)
        assert h.acks == []
        await h.outbox.flush()
        assert h.acks == [1, 2]
        # The rows are in the file, readable by another connection.
        other = sqlite3.connect(h.outbox.path)
        assert other.execute("SELECT count(*) FROM rows").fetchone()[0] == 2
        other.close()

    run_outbox(tmp_path, OutboxConfig(), body)


def test_acknowledged_rows_leave_the_disk_and_the_count(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        for i in range(50):
            h.submit(i)
        await h.outbox.flush()
        for r in h.rows[:20]:
            h.outbox.acked(r)
        h.outbox.to_dead(h.rows[20], "refused by the broker: Not authorized (135)")
        await h.outbox.flush()
        assert h.outbox.count == h.on_disk() == 29
        assert h.outbox.counters.values["delivered"] == 20
        assert h.outbox.counters.values["dead_lettered"] == 1
        assert h.outbox.store is not None
        dead = h.outbox.store.db.execute("SELECT id, key, reason, payload FROM dead").fetchall()
        assert dead == [(h.rows[20].id, h.rows[20].key,
                         "refused by the broker: Not authorized (135)", h.rows[20].payload)]

    run_outbox(tmp_path, OutboxConfig(), body)


def test_drop_oldest_evicts_the_oldest_of_the_lowest_lane_and_counts_each_once(
        tmp_path: Path) -> None:
    cfg = OutboxConfig(max_messages=10, on_full="drop_oldest")

    async def body(h: Harness) -> None:
        for i in range(4):
            h.submit(i, priority=1)
        for i in range(4, 10):
            h.submit(i, priority=0)
        await h.outbox.flush()
        in_hand = h.rows[4]  # lane 0's oldest, as if the sender had it in flight
        for i in range(10, 13):
            h.submit(i, priority=0)
        await h.outbox.flush()
        assert h.outbox.counters.values["dropped_full"] == 3
        assert h.evicted == [(0, h.rows[6].id)]  # rows 4, 5, 6 of lane 0
        survivors = await h.outbox.page(0, 0, 100)
        assert [r.payload[0] for r in survivors] == [7, 8, 9, 10, 11, 12]
        assert len(await h.outbox.page(1, 0, 100)) == 4  # the higher lane is untouched
        # The sender acknowledges the evicted row late: it is not counted a second time.
        h.outbox.acked(in_hand)
        await h.outbox.flush()
        assert h.outbox.count == h.on_disk() == 10
        assert h.outbox.counters.values["delivered"] == 0
        assert h.acks == list(range(13))

    run_outbox(tmp_path, cfg, body)


def test_reject_new_holds_inputs_unacknowledged_until_deliveries_make_room(
        tmp_path: Path) -> None:
    cfg = OutboxConfig(max_messages=5, on_full="reject_new")

    async def body(h: Harness) -> None:
        for i in range(5):
            h.submit(i)
        await h.outbox.flush()
        h.submit(5)
        h.submit(6)
        await h.outbox.flush()
        assert h.acks == [0, 1, 2, 3, 4]  # 5 and 6 stay with the local broker
        room = asyncio.ensure_future(h.outbox.wait_room())
        await asyncio.sleep(0.01)
        assert not room.done()
        assert h.outbox.counters.values["rejected_full"] >= 1
        for r in h.rows[:2]:
            h.outbox.acked(r)
        await h.outbox.flush()
        await asyncio.wait_for(room, 1)
        assert h.acks == list(range(7))
        assert h.outbox.count == h.on_disk() == 5
        assert "dropped_full" not in h.outbox.counters.values

    run_outbox(tmp_path, cfg, body)


def test_expired_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.submit(1, ttl_s=0.5)
        await h.outbox.flush()
        row = h.rows[0]
        assert row.expires is not None and row.expires <= time.time() + 1
        h.outbox.expired(row)
        await h.outbox.flush()
        assert h.outbox.count == h.on_disk() == 0
        assert h.outbox.counters.values["dropped_expired"] == 1

    run_outbox(tmp_path, OutboxConfig(), body)


def _good_db(path: Path) -> None:
    store = Store(path, OutboxConfig())
    store.commit([out(i, size=3000) for i in range(300)], [], [], 0, True)
    store.close()


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage bytes": lambda p: p.write_bytes(os.urandom(64 * 1024)),
    "a text file": lambda p: p.write_text("this is not a database\n" * 100),
    "truncated": lambda p: (_good_db(p), os.truncate(p, p.stat().st_size // 3)),
    "pages overwritten": lambda p: (_good_db(p), _scribble(p)),
    "empty header, data after": lambda p: (_good_db(p), _zero_header(p)),
}


def _scribble(path: Path) -> None:
    with open(path, "r+b") as f:  # b-tree pages past the header and schema
        for off in range(8192, path.stat().st_size, 16384):
            f.seek(off)
            f.write(os.urandom(512))


def _zero_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_an_unusable_database_is_moved_aside_loudly_and_a_fresh_one_starts(
        tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / DB_NAME
    CORRUPTIONS[corruption](path)
    with contextlib.suppress(FileNotFoundError):  # a checkpointed WAL is gone already
        (tmp_path / f"{DB_NAME}-wal").unlink()
    original = path.read_bytes()

    async def body(h: Harness) -> None:
        assert h.outbox.count == 0
        h.submit(1)
        await h.outbox.flush()
        assert h.on_disk() == 1

    with caplog.at_level(logging.ERROR, logger="agent.delivery.store"):
        run_outbox(tmp_path, OutboxConfig(), body)
    assert any("IS CORRUPT" in r.getMessage() for r in caplog.records)
    aside = sorted(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
    assert aside and aside[0].read_bytes() == original  # kept for forensics, byte for byte
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MB tmpfs: SQLite hits SQLITE_FULL ('database or disk is full') on it.

    The outbox's disk reserve there is an eighth of it (4 MB); the WAL stays under half
    of that (`agent.delivery.store.reserve_for`).
    """
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_acknowledges_nothing_retries_and_recovers_once_space_returns(
        small_fs: Path) -> None:
    """SQLITE_FULL: no input is acknowledged whose rows did not commit; the failed
    batches are retried, counted, and all commit (in order) once space is back."""
    cfg = OutboxConfig(min_free_bytes=0, max_bytes=10**9)  # let the file system itself fill
    filler = small_fs / "someone-elses-log"
    filler.write_bytes(b"\0" * (8 << 20))

    async def body(h: Harness) -> None:
        run = asyncio.create_task(h.outbox.run())
        try:
            i = 0
            while not h.outbox.counters.values.get("commit_errors"):
                for _ in range(200):
                    h.submit(i, size=4000)
                    i += 1
                await asyncio.sleep(0.02)
                assert i < 20_000, "a 32 MB file system never filled"
            for _ in range(50):  # more input arrives while the disk is full
                h.submit(i, size=4000)
                i += 1
            await asyncio.sleep(1.5)
            # Everything not committed is unacknowledged: the local broker still owns it.
            assert len(h.acks) == len(h.rows) < i
            assert h.acks == list(range(len(h.acks)))
            assert h.outbox.count == h.on_disk() == len(h.rows)
            assert h.outbox.counters.values["commit_errors"] >= 1  # counted; held, not dropped
            assert h.outbox.pending_inputs() == i - len(h.acks)
            # Space comes back (the operator removed a log); delivered rows leave the file.
            filler.unlink()
            for r in h.rows:
                h.outbox.acked(r)
            deadline = time.monotonic() + 30
            while len(h.acks) < i or h.outbox.count or h.on_disk():
                for r in h.rows[h.outbox.counters.values["delivered"]:]:
                    h.outbox.acked(r)
                assert time.monotonic() < deadline, (len(h.acks), i, h.on_disk())
                await asyncio.sleep(0.1)
            assert h.acks == list(range(i))  # every input acknowledged, in order
            assert [r.payload for r in h.rows] == [out(n, size=4000).payload for n in range(i)]
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    run_outbox(small_fs, cfg, body)


def test_a_full_disk_recovers_by_itself_once_delivered_rows_leave_the_file(
        small_fs: Path) -> None:
    """When the outbox itself filled the disk, the deliveries that drain it make the room:
    deletes go in small transactions, each WAL truncated, and held inputs then commit."""
    cfg = OutboxConfig(min_free_bytes=0, max_bytes=10**9)
    (small_fs / "someone-elses-log").write_bytes(b"\0" * (8 << 20))  # stays: no help from outside

    async def body(h: Harness) -> None:
        run = asyncio.create_task(h.outbox.run())
        try:
            i = 0
            while not h.outbox.counters.values.get("commit_errors"):
                for _ in range(200):
                    h.submit(i, size=4000)
                    i += 1
                await asyncio.sleep(0.02)
                assert i < 20_000, "a 32 MB file system never filled"
            for _ in range(50):
                h.submit(i, size=4000)
                i += 1
            await asyncio.sleep(1.0)
            assert len(h.acks) < i  # held while full
            deadline = time.monotonic() + 60
            while len(h.acks) < i or h.outbox.count:
                for r in h.rows[h.outbox.counters.values.get("delivered", 0):]:
                    h.outbox.acked(r)  # the uplink took them
                assert time.monotonic() < deadline, (len(h.acks), i, h.on_disk())
                await asyncio.sleep(0.1)
            assert h.acks == list(range(i))
            assert [r.payload for r in h.rows] == [out(n, size=4000).payload for n in range(i)]
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    run_outbox(small_fs, cfg, body)


def test_the_free_space_watermark_applies_the_full_policy(small_fs: Path) -> None:
    cfg = OutboxConfig(min_free_bytes=10**9, on_full="reject_new")  # always "low" here

    async def body(h: Harness) -> None:
        h.submit(1)
        await h.outbox.flush()
        assert h.acks == []
        assert h.outbox.counters.values["rejected_full"] == 1

    run_outbox(small_fs, cfg, body)


def test_a_commit_error_puts_everything_back_and_raises(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.submit(1)
        os.chmod(tmp_path, 0o500)
        assert h.outbox.store is not None
        h.outbox.store.db.execute("PRAGMA query_only = 1")  # every write now fails
        with pytest.raises(OutboxError):
            await h.outbox.flush()
        assert h.acks == []
        h.outbox.store.db.execute("PRAGMA query_only = 0")
        os.chmod(tmp_path, 0o700)
        await h.outbox.flush()
        assert h.acks == [1]

    run_outbox(tmp_path, OutboxConfig(), body)


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 60)), max_size=80))
def test_delete_ranges_cover_exactly_the_given_ids(keys: list[tuple[int, int]]) -> None:
    covered = {(lane, i) for lane, a, b in _ranges(keys) for i in range(a, b + 1)}
    assert covered == set(keys)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["in0", "in1", "ack", "dead", "flush"]),
                          st.integers(0, 30)), min_size=1, max_size=60))
def test_count_always_equals_rows_on_disk_under_any_mix_of_operations(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    cfg = OutboxConfig(max_messages=12, on_full="drop_oldest")

    async def body(h: Harness) -> None:
        handled: set[int] = set()
        for n, (op, arg) in enumerate(ops):
            if op in ("in0", "in1"):
                h.submit(n, priority=int(op[-1]))
            elif h.rows and op in ("ack", "dead"):
                r = h.rows[arg % len(h.rows)]
                if r.id in handled:
                    continue
                handled.add(r.id)
                h.outbox.acked(r) if op == "ack" else h.outbox.to_dead(r, "test")
            else:
                await h.outbox.flush()
        await h.outbox.flush()
        v = h.outbox.counters.values
        assert h.outbox.count == h.on_disk()
        assert v["stored"] == (v["delivered"] + v["dead_lettered"] + v["dropped_full"]
                               + h.outbox.count)

    run_outbox(tmp, cfg, body)


def test_reject_new_admits_whole_inputs_up_to_the_bound_from_a_batch_larger_than_the_room(
        tmp_path: Path) -> None:
    """A gathered batch bigger than the room left is not refused whole: its first inputs
    fill the outbox to the bound (each with all its outputs), the rest stay with the local
    broker, unacknowledged."""
    cfg = OutboxConfig(max_messages=10, on_full="reject_new")

    async def body(h: Harness) -> None:
        for i in range(6):
            h.submit(i)
        await h.outbox.flush()
        for i in range(6, 9):  # three inputs of two outputs each: only two fit whole
            h.outbox.submit([out(2 * i), out(2 * i + 1)], lambda i=i: h.acks.append(i))
        await h.outbox.flush()
        assert h.acks == [0, 1, 2, 3, 4, 5, 6, 7]
        assert h.outbox.count == h.on_disk() == 10
        assert not h.outbox.has_room()
        h.outbox.acked(h.rows[0])
        await h.outbox.flush()
        assert h.acks == [0, 1, 2, 3, 4, 5, 6, 7]  # input 8 needs two rows of room
        h.outbox.acked(h.rows[1])
        await h.outbox.flush()
        assert h.acks == list(range(9))
        assert h.outbox.count == h.on_disk() == 10
        assert h.outbox.has_room()

    run_outbox(tmp_path, cfg, body)


def test_drop_oldest_holds_the_bound_even_against_one_batch_larger_than_it(
        tmp_path: Path) -> None:
    """One commit of more rows than max_messages still leaves at most max_messages: the
    oldest of the lowest lane go first, the batch's own included, each counted once;
    a higher lane keeps every row."""
    cfg = OutboxConfig(max_messages=10, on_full="drop_oldest")

    async def body(h: Harness) -> None:
        for i in range(4):
            h.submit(i, priority=1)
        await h.outbox.flush()
        for i in range(4, 29):  # 25 bulk rows in one batch
            h.submit(i, priority=0)
        await h.outbox.flush()
        assert h.outbox.count == h.on_disk() == 10
        assert h.outbox.counters.values["dropped_full"] == 19
        assert [r.payload[0] for r in await h.outbox.page(0, 0, 100)] == list(range(23, 29))
        assert len(await h.outbox.page(1, 0, 100)) == 4
        assert h.acks == list(range(29))
        # The sender is handed only rows that are still there.
        assert [r.payload[0] for r in h.rows if r.lane == 0] == list(range(23, 29))

    run_outbox(tmp_path, cfg, body)
