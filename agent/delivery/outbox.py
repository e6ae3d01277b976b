"""Store-and-forward: the durable middle of custody transfer, on the event loop's side.

A message accepted from the local bus is acknowledged there only after the
transaction holding everything it produced has committed (`agent.delivery.store`); a
row is deleted only after the next hop acknowledged it with a success reason
code. Group commit: the next batch gathers while the current one syncs, and
commits start at most once per `commit_interval_ms`, so at sensor rates many
inputs share one transaction (one fsync, one trip to the writer thread).
Deliveries start no transaction of their own: their deletes ride with the next
commit, or go after `SETTLE_S` when no input comes. A crash resends the rows
whose deletes had not committed (duplicates under the same key, never a loss):
the sender counts them against its in-flight window (`settling`), and asks for
a commit (`settle_soon`) when they fill it, so a crash still resends at most
one window.
Bounds (bytes, count, free disk) apply `on_full`, a whole input at a time;
every drop is counted.
An output on a topic no broker takes (a step's mistake) is never stored: it
is counted as malformed on its pipeline and its input acknowledged.

The parts, each in its module: `batch` (what gathers for the next commit),
`cadence` (when a commit starts), `admission` (topics, bounds, on_full),
`settlement` (deletes and dead letters on their way out), `disk` (free space,
the reserve, a full disk) and `opening` (another process's lock on the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.config import OutboxConfig
from agent.delivery.admission import Admission, fit
from agent.delivery.batch import Batch
from agent.delivery.cadence import EARLY_INPUTS, EARLY_SHARE, Cadence, Intake, Pausable
from agent.delivery.disk import DISK_CHECK_S, Disk
from agent.delivery.opening import open_store
from agent.delivery.settlement import Settlement
from agent.delivery.store import DB_NAME, ROW_OVERHEAD, Evicted, Row, Store
from agent.delivery.writer import Writer
from agent.errors import DiskFullError, OutboxError
from agent.messages import Done, Outgoing
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_S = 0.5  # a failed commit is tried again after this
SPLIT_ROWS = 64  # rows per transaction while recovering from a failed commit
VACUUM_AFTER_ROWS = 10_000  # give pages back once a backlog this large drained
# Defined with the commit cadence (`agent.delivery.cadence`), importable from here.
__all__ = ["EARLY_INPUTS", "EARLY_SHARE", "Intake", "Outbox", "Pausable"]


class Outbox:
    """The loop-side face of the store: group commit, bounds, and handing rows to the sender.

    Counting invariant: `count` is the number of rows on disk that are neither
    acknowledged, dead-lettered, expired nor evicted; each row leaves it once.
    """

    def __init__(self, data_dir: Path, cfg: OutboxConfig, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.path = data_dir / DB_NAME
        self.counters = telemetry.component("outbox")
        self.telemetry = telemetry
        self._writer = Writer("outbox")
        self.store: Store | None = None
        self.count = 0
        self.bytes = 0
        self._batch = Batch(cfg.bulk_synchronous == "FULL")
        self._disk = Disk(self.path, cfg)
        self._admission = Admission(cfg, self.counters, telemetry)
        self._cadence = Cadence()
        self._wake = self._cadence.wake  # the same Event: something waits for a commit
        self._leaving = Settlement(self.settle_soon)
        self._room = asyncio.Event()
        self._room.set()
        self._peak = 0
        self.on_rows: Callable[[list[Row]], None] = lambda rows: None
        self.on_evicted: Callable[[int, int], None] = lambda lane, upto: None
        self.on_settled: Callable[[], None] = lambda: None  # deletes committed
        self.lanes_on_disk: set[int] = set()

    # While input is sparse, it waits in its socket (`intake`: the local broker's
    # connection) during each commit and until the next may start, and is then read
    # in one go; so do PUBACKs (`quiet`: the uplink's, while nothing else waits for
    # them). A few loop wake-ups per commit instead of a few per message.

    @property
    def intake(self) -> Intake | None:
        return self._cadence.intake

    @intake.setter
    def intake(self, intake: Intake | None) -> None:
        self._cadence.intake = intake

    @property
    def quiet(self) -> list[Pausable]:
        return self._cadence.quiet

    async def open(self) -> None:
        """Open the store; wait (bounded) while another process holds its lock.

        Raises ConfigError when the file cannot be written (it is kept: exit 2),
        OutboxError for anything else that keeps it from opening.
        """
        self.store, self.count, self.bytes, lanes = await open_store(self._writer, self.path,
                                                                     self.cfg)
        self.lanes_on_disk = set(lanes)
        self._disk.reserved = await self._call(self.store.reserve)
        self._disk.say(self.store)
        self._peak = self.count
        self._publish_gauges()
        if self.count:
            log.info("outbox: %d messages (%d bytes) waiting from before", self.count, self.bytes)

    # -- intake (loop thread) -------------------------------------------------

    def submit(self, items: list[Outgoing], done: Done | None) -> None:
        """Take a message's outputs; `done` runs once they are committed (then ack the input)."""
        if items and not (len(items) == 1 and items[0].topic in self._admission.valid_topics):
            items = self._admission.publishable(items)
        self._batch.add(items, done)
        dones = self._batch.dones
        self._wake.set()
        cadence = self._cadence
        if cadence.window is not None and len(dones) >= cadence.early:
            cadence.end_window()

    def save_state(self, states: dict[str, bytes]) -> None:
        """Step state to commit no later than the acks of inputs submitted after this call.

        Newer state overwrites older; a crash after a state commit but before an ack
        makes the broker redeliver that input: counted twice in a window, never lost.
        """
        self._batch.states.update(states)
        self._wake.set()

    async def states(self) -> dict[str, bytes]:
        assert self.store is not None
        return await self._call(self.store.states)

    def has_room(self) -> bool:
        """False while `reject_new` holds input back (see `wait_room`)."""
        return self._room.is_set()

    async def wait_room(self) -> None:
        """Backpressure for `reject_new`: pipelines wait here while the outbox is full."""
        await self._room.wait()

    def gone(self, row: Row) -> bool:
        """Already counted out: drop_oldest evicted it while it was in the sender's hands."""
        return self._leaving.gone(row)

    def _settle(self, row: Row, counter: str) -> bool:
        """Delete `row` in the next commit; False when drop_oldest already counted it out."""
        self._delete(row)
        if self.gone(row):
            return False
        self.count -= 1
        self.bytes -= row.size
        self.counters.inc(counter)
        self._publish_gauges()  # at once: the delete itself may wait for the next commit
        return True

    def acked(self, row: Row) -> None:
        """The next hop took `row` (success reason code): delete it in the next commit."""
        self._settle(row, "delivered")

    @property
    def settling(self) -> int:
        """Rows delivered (or dead-lettered) whose deletes are not committed yet: a crash
        now would send them again."""
        return self._leaving.pending

    def settle_soon(self) -> None:
        """Commit the waiting deletes now, without waiting for the commit interval (the
        sender's window is full of rows that would go again after a crash)."""
        self._cadence.hurry()

    def _delete(self, row: Row) -> None:
        """Queue the delete of `row`: it rides with the next commit, starts one when rows
        are held for room (reject_new), or goes after SETTLE_S."""
        held = bool(self._batch.rows) and not self._room.is_set()
        self._leaving.delete(row, timed=not held)
        if held:
            self._wake.set()

    def to_dead(self, row: Row, reason: str) -> None:
        """Move `row` to the dead-letter table (refused by the broker, or too large)."""
        if self.gone(row):
            self._delete(row)
            return
        self._leaving.dead.append((row, reason))
        self.count -= 1
        self.bytes -= row.size
        self.counters.inc("dead_lettered")
        self._publish_gauges()
        self.telemetry.warn_burst("outbox:dead", "outbox: message %s on %s dead-lettered: %s",
                                  row.key, row.topic, reason)
        self._wake.set()

    def expired(self, row: Row) -> None:
        """`row` outlived its TTL before it could be sent: drop it, counted."""
        if self._settle(row, "dropped_expired"):
            self.telemetry.warn_burst("outbox:expired",
                                      "outbox: dropped expired message %s on %s",
                                      row.key, row.topic)

    # -- the group committer ----------------------------------------------------

    async def run(self) -> None:
        """Commit batches forever; never lose what was submitted (retry on disk errors).

        Group commit: while one batch is in SQLite (and its fsync), the next gathers
        in memory. A commit starts `commit_interval_ms` after the previous one started
        at the soonest (at once after a quiet spell): the most it adds to an input's
        acknowledgement. A full batch, enough inputs waiting (`Cadence.early`), or the
        sender waiting for deletes (`settle_soon`) start it at once.
        """
        loop = asyncio.get_running_loop()
        interval = self.cfg.commit_interval_ms / 1000.0
        started = -math.inf
        cadence, disk, batch = self._cadence, self._disk, self._batch
        try:
            while True:
                cadence.follow_intake()
                if disk.full:
                    # Recovering from a full disk: look again every second even when idle,
                    # to give freed pages back and make the reserve again (`Disk.low`).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), DISK_CHECK_S)
                    disk.low(self.store)
                else:
                    await self._wake.wait()
                if not cadence.urgent and len(batch.dones) < cadence.early \
                        and len(batch.rows) < self.cfg.commit_max_rows:
                    await cadence.until(started + interval)
                self._wake.clear()
                cadence.urgent = False
                started = loop.time()
                # Sparse: fewer than end an interval early, so what waits in the socket
                # until the next commit stays within the broker's window (a busy input is
                # read as it comes).
                sparse = bool(interval) and len(batch.dones) < cadence.early and not disk.full
                cadence.hold(sparse)  # sparse input waits in its socket during the commit
                try:
                    await self.flush()
                except OutboxError as exc:
                    cadence.hold(False)
                    self.counters.inc("commit_errors")
                    self.telemetry.warn_burst("outbox:commit", "outbox: commit failed, will "
                                              "retry (nothing acknowledged meanwhile): %s", exc)
                    await asyncio.sleep(RETRY_S)
                    self._wake.set()
                    continue
                if sparse:
                    await cadence.quiet_until(started + interval)
        finally:
            cadence.hold(False)

    async def flush(self) -> None:
        """Commit everything pending now; then acknowledge inputs and hand rows to the sender."""
        assert self.store is not None
        disk = self._disk
        if disk.full:
            # After a failure (a full disk): give the reserve back to the file system, fold
            # the WAL into the file and truncate it, free space (deletes) in transactions
            # sized to the free disk, give freed pages back; then insert in small batches.
            # The WAL would otherwise keep its size until the next auto-checkpoint, which a
            # full disk may never reach.
            await disk.release(self.store, self._writer)
            await self._run(self.store.checkpoint)
            await self._settle_in_chunks()
            await disk.shrink(self.store, self._writer)
        # Bounded batches (rows, and bytes: the WAL frames of one must fit in the disk
        # reserve); after a failure small ones, only into pages deletes freed inside the
        # file (it must not grow while the disk is full) and leaving disk for the WAL of
        # the deletes that free more.
        limit = SPLIT_ROWS if disk.full else self.cfg.commit_max_rows
        batch = self._batch
        pending = batch.rows
        if disk.full and pending:
            room = await self._call(self.store.free_bytes)
            spare = disk.free_now() - self.store.reserve_bytes // 2
            limit = fit(pending, limit, min(room // 2, spare // 4), 0)
        elif len(pending) > 1:
            limit = fit(pending, limit, self.store.batch_bytes, 1)
        low_disk = disk.low(self.store)
        admit, evict = self._admission.admit(pending[:limit], self.count, self.bytes, low_disk,
                                             batch.dones, batch.base)
        if limit and admit < min(len(pending), limit):
            # reject_new: hold the rest and its acks; the local broker keeps those inputs
            # and sends no more than our receive maximum meanwhile.
            self._room.clear()
        elif not self._room.is_set():
            log.info("outbox: room again (%d messages); taking input", self.count)
            self._room.set()
        inserts, dones, durable = batch.take(admit)
        # While the disk is full, deletes go only in the sized transactions above.
        leaving = self._leaving
        deletes, dead = ([], []) if disk.full else (leaving.take_deletes(), leaving.take_dead())
        states = batch.take_states()
        if not (inserts or deletes or dead or evict or states):
            for _, d in dones:
                if d is not None:
                    d()
            return
        try:
            await self._commit(inserts, dones, deletes, dead, evict, durable or bool(states),
                               states)
        except OutboxError:
            batch.durable = batch.durable or durable
            raise
        if batch.rows and self._room.is_set():
            self._wake.set()  # more than one batch was waiting

    async def _commit(self, inserts: list[Outgoing], dones: list[tuple[int, Done | None]],
                      deletes: list[tuple[int, int]], dead: list[tuple[Row, str]], evict: int,
                      durable: bool, states: dict[str, bytes] | None = None) -> None:
        assert self.store is not None
        t0 = time.perf_counter()
        self._leaving.committing = len(deletes) + len(dead)
        try:
            # SQLite blocks (and fsyncs): the one writer thread, never the loop.
            rows, evicted = await self._writer.call(
                self.store.commit, inserts, deletes, dead, evict, durable, states)
        except OutboxError as exc:
            self._leaving.committing = 0
            # Put everything back in front; nothing was acknowledged yet.
            self._batch.put_back(inserts, dones, states)
            self._leaving.put_back(deletes, dead)
            self._disk.full = self._disk.full or isinstance(exc, DiskFullError)
            raise
        self._leaving.committing = 0
        if self._disk.full:
            await self._run(self.store.checkpoint)  # keep the WAL from growing the disk
        self.counters.observe("commit", (time.perf_counter() - t0) * 1000.0)
        self.counters.inc("commits")
        if rows:
            self.count += len(rows)
            self.bytes += sum(len(r.payload) + len(r.topic) for r in rows)
            self.counters.inc("stored", len(rows))
            self._peak = max(self._peak, self.count)
        if evicted:
            self._evicted(evicted)
            if rows:  # the sender gets only what is still there
                rows = [r for r in rows if not self.gone(r)]
        self._publish_gauges()
        for _, d in dones:
            if d is not None:
                d()  # the inputs may now be acknowledged to the local broker
        if rows:
            self.on_rows(rows)
        if deletes or dead:
            self.on_settled()
        if self.count == 0 and self._peak > VACUUM_AFTER_ROWS:
            self._peak = 0
            await self.vacuum()

    async def _settle_in_chunks(self) -> None:
        """While the disk is full: deletes and dead letters in transactions sized to the
        free disk, each folded back into the file (WAL truncated): one big delete would
        grow the WAL by megabytes and fill the disk again. A failed chunk stays in front."""
        assert self.store is not None
        leaving = self._leaving
        while leaving.deletes or leaving.dead:
            row = max(64, self.bytes // max(1, self.count)) + ROW_OVERHEAD
            n = max(1, min(SPLIT_ROWS, self._disk.free_now() // 4 // row))
            chunk, dead = leaving.take_chunk(n)
            await self._commit([], [], chunk, dead, 0, False)
            await self._run(self.store.checkpoint)

    def _evicted(self, evicted: list[Evicted]) -> None:
        total = 0
        avg = self.bytes // max(1, self.count)
        for lane, upto, n in evicted:
            self._leaving.evicted(lane, upto)
            self.on_evicted(lane, upto)
            total += n
        self.count -= total
        self.bytes = max(0, self.bytes - total * avg)
        self.counters.inc("dropped_full", total)
        self.telemetry.warn_burst("outbox:full", "outbox full (%d messages, %d bytes): dropped "
                                  "the %d oldest lowest-priority messages", self.count,
                                  self.bytes, total)

    def _publish_gauges(self) -> None:
        self.counters.values["backlog"] = self.count
        self.counters.values["backlog_bytes"] = self.bytes

    # -- reading for the sender --------------------------------------------------

    async def page(self, lane: int, after_id: int, limit: int) -> list[Row]:
        """The next rows of a lane from disk (never the whole backlog: RSS stays flat)."""
        assert self.store is not None
        rows = await self._writer.call(self.store.page, lane, after_id, limit)
        return self._leaving.unevicted(lane, rows)

    async def vacuum(self) -> None:
        assert self.store is not None
        await self._run(self.store.vacuum)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await self._writer.call(fn)

    async def _run(self, fn: Callable[[], None]) -> None:
        """Housekeeping on the writer thread; its failure is logged, never fatal."""
        try:
            await self._writer.call(fn)
        except OutboxError as exc:
            log.warning("outbox: %s failed: %s", fn.__name__, exc)

    async def close(self) -> None:
        if self.store is not None:
            try:
                await self.flush()
            except OutboxError as exc:
                log.error("outbox: final commit failed: %s", exc)
            await self._writer.call(self.store.close)
            self.store = None
        self._writer.shutdown()

    def pending_inputs(self) -> int:
        """Inputs whose outputs are not committed yet (not acknowledged to the local broker)."""
        return self._batch.pending_inputs()
