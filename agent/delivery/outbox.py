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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import operator
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from agent.config import OutboxConfig
from agent.delivery.store import (
    BALLAST_BYTES,
    DB_NAME,
    PAGE_BYTES,
    ROW_OVERHEAD,
    Evicted,
    Row,
    Store,
    holders,
)
from agent.delivery.writer import Writer
from agent.errors import DiskFullError, OutboxBusyError, OutboxError
from agent.messages import Done, Outgoing
from agent.mqtt import topics
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

DISK_CHECK_S = 1.0
RETRY_S = 0.5
SPLIT_ROWS = 64  # rows per transaction while recovering from a failed commit
SHRINK_STEPS = 8  # incremental vacuum steps per commit while recovering
VACUUM_AFTER_ROWS = 10_000  # give pages back once a backlog this large drained
OPEN_BUSY_S = 60.0  # how long a start waits for another process's lock on the file
CHECKED_TOPICS = 10_000  # topics known to be valid names; cleared when full (stays bounded)
SETTLE_S = 1.0  # deliveries (deletes) wait for the next commit this long at most
# Inputs waiting for their commit that end the commit interval early, as a share of
# how many unacknowledged messages the broker may send (`Intake.inbound_window`): it
# sends nothing more until they are acknowledged. Without an intake: Mosquitto's
# default limit of 20.
EARLY_SHARE = 0.75
EARLY_INPUTS = 16

_TOPIC, _PAYLOAD = operator.itemgetter(0), operator.itemgetter(1)  # Outgoing fields


class Pausable(Protocol):
    """A connection whose input may wait in its socket for a while (`Outbox.quiet`)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Intake(Pausable, Protocol):
    """Where the input comes from (the local broker's connection)."""

    @property
    def inbound_window(self) -> int: ...


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
        self._inserts: list[Outgoing] = []
        # Per input, in order: (the absolute index where its outputs end in `_inserts`, its
        # ack or None). A batch may end inside an input; its ack waits for the rest.
        self._dones: deque[tuple[int, Done | None]] = deque()
        self._base = 0  # the absolute index of _inserts[0] (dones hold absolute ends)
        self._deletes: list[tuple[int, int]] = []
        self._dead: list[tuple[Row, str]] = []
        self._states: dict[str, bytes] = {}
        self._durable = False
        self._split = False  # the last commit failed: free space (deletes) before inserting
        self._wake = asyncio.Event()
        self._window: asyncio.Future[None] | None = None  # the commit interval running
        self._early = EARLY_INPUTS  # inputs waiting that end it early
        self._settle_timer: asyncio.TimerHandle | None = None  # commits waiting deletes
        self._settling = 0  # deletes and dead letters in the commit under way
        self._urgent = False  # the sender waits for deletes: commit without waiting
        self._room = asyncio.Event()
        self._room.set()
        self._disk_free = 1 << 62
        self._disk_checked = -DISK_CHECK_S
        self._evicted_to: dict[int, int] = {}  # lane -> highest id drop_oldest removed
        self._peak = 0
        self._reserved = True
        self.on_rows: Callable[[list[Row]], None] = lambda rows: None
        self.on_evicted: Callable[[int, int], None] = lambda lane, upto: None
        self.on_settled: Callable[[], None] = lambda: None  # deletes committed
        self.lanes_on_disk: set[int] = set()
        self._valid_topics: set[str] = set()
        # While input is sparse, it waits in its socket (`intake`: the local broker's
        # connection) during each commit and until the next may start, and is then read
        # in one go; so do PUBACKs (`quiet`: the uplink's, while nothing else waits for
        # them). A few loop wake-ups per commit instead of a few per message.
        self.intake: Intake | None = None
        self.quiet: list[Pausable] = []
        self._holding = False

    async def open(self) -> None:
        """Open the store; wait (bounded) while another process holds its lock.

        Raises ConfigError when the file cannot be written (it is kept: exit 2),
        OutboxError for anything else that keeps it from opening.
        """
        waited = 0.0
        while True:
            try:
                self.store = await self._writer.call(Store, self.path, self.cfg)
                self.count, self.bytes, lanes = await self._writer.call(self.store.totals)
                break
            except OutboxError as exc:
                if self.store is not None:
                    self.store.close()
                    self.store = None
                if not isinstance(exc, OutboxBusyError) or waited >= OPEN_BUSY_S:
                    raise OutboxError(f"cannot open the outbox at {self.path}: {exc}"
                                      f"{_by_whom(self.path)}") from exc
                if waited == 0 or waited % 10 < RETRY_S:
                    log.warning("outbox %s is locked by another process%s; waiting (up to "
                                "%.0f s) without touching it", self.path, _by_whom(self.path),
                                OPEN_BUSY_S)
                await asyncio.sleep(RETRY_S)
                waited += RETRY_S
        self.lanes_on_disk = set(lanes)
        self._reserved = await self._call(self.store.reserve)
        self._say_disk(self.store)
        self._peak = self.count
        self._publish_gauges()
        if self.count:
            log.info("outbox: %d messages (%d bytes) waiting from before", self.count, self.bytes)

    def _say_disk(self, store: Store) -> None:
        """At start: a reserve smaller than usual, or none, and a watermark past the disk."""
        fs, reserve = store.fs_bytes, store.reserve_bytes
        if reserve < BALLAST_BYTES:
            what = f"a disk reserve of {reserve >> 10} kB (usually {BALLAST_BYTES >> 20} MB)" \
                if reserve else "no disk reserve; a full disk may need space freed by hand"
            log.warning("outbox: the file system at %s holds only %d kB: %s", self.path.parent,
                        fs >> 10, what)
        if self.cfg.min_free_bytes >= fs // 2:
            log.warning("outbox: min_free_bytes (%d kB) is at least half of the %d kB file "
                        "system at %s: on_full (%s) applies almost at once; lower it",
                        self.cfg.min_free_bytes >> 10, fs >> 10, self.path.parent,
                        self.cfg.on_full)

    # -- intake (loop thread) -------------------------------------------------

    def submit(self, items: list[Outgoing], done: Done | None) -> None:
        """Take a message's outputs; `done` runs once they are committed (then ack the input)."""
        if items and not (len(items) == 1 and items[0].topic in self._valid_topics):
            items = self._publishable(items)
        if items:
            self._inserts.extend(items)
            if not self._durable and (self.cfg.bulk_synchronous == "FULL"
                                      or any(o.priority > 0 for o in items)):
                self._durable = True
        dones = self._dones
        dones.append((self._base + len(self._inserts), done))
        self._wake.set()
        if self._window is not None and len(dones) >= self._early:
            self._end_window()

    def _publishable(self, items: list[Outgoing]) -> list[Outgoing]:
        """`items` without those on a topic no broker takes; each dropped one is counted.

        Forward checks its own topics; this catches every other producer (publish
        templates, user actions) before a row that could never leave is stored.
        """
        known = self._valid_topics
        kept = []
        for o in items:
            if o.topic not in known:
                try:
                    topics.validate_name(o.topic)
                except ValueError as exc:
                    self.telemetry.pipeline(o.pipeline).inc("malformed")
                    self.telemetry.warn_burst(
                        f"outbox:topic:{o.pipeline}", "pipeline %s: dropped a message with "
                        "no valid topic to publish on: %s", o.pipeline, exc)
                    continue
                if len(known) >= CHECKED_TOPICS:
                    known.clear()
                known.add(o.topic)
            kept.append(o)
        return kept

    def save_state(self, states: dict[str, bytes]) -> None:
        """Step state to commit no later than the acks of inputs submitted after this call.

        Newer state overwrites older; a crash after a state commit but before an ack
        makes the broker redeliver that input: counted twice in a window, never lost.
        """
        self._states.update(states)
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
        return row.id <= self._evicted_to.get(row.lane, 0)

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
        return len(self._deletes) + len(self._dead) + self._settling

    def settle_soon(self) -> None:
        """Commit the waiting deletes now, without waiting for the commit interval (the
        sender's window is full of rows that would go again after a crash)."""
        if not self._urgent:
            self._urgent = True
            self._wake.set()
            self._end_window()

    def _end_window(self) -> None:
        window = self._window
        if window is not None and not window.done():
            window.set_result(None)

    def _delete(self, row: Row) -> None:
        """Queue the delete of `row`: it rides with the next commit, starts one when rows
        are held for room (reject_new), or goes after SETTLE_S."""
        self._deletes.append((row.lane, row.id))
        if self._inserts and not self._room.is_set():
            self._wake.set()
        elif self._settle_timer is None:  # whatever the commit interval
            self._settle_timer = asyncio.get_running_loop().call_later(SETTLE_S,
                                                                       self.settle_soon)

    def to_dead(self, row: Row, reason: str) -> None:
        """Move `row` to the dead-letter table (refused by the broker, or too large)."""
        if self.gone(row):
            self._delete(row)
            return
        self._dead.append((row, reason))
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
        acknowledgement. A full batch, enough inputs waiting (`_early`), or the
        sender waiting for deletes (`settle_soon`) start it at once.
        """
        loop = asyncio.get_running_loop()
        interval = self.cfg.commit_interval_ms / 1000.0
        started = -math.inf
        try:
            while True:
                if self.intake is not None:  # its MQTT version may change at a reconnect
                    self._early = max(1, int(self.intake.inbound_window * EARLY_SHARE))
                if self._split:
                    # Recovering from a full disk: look again every second even when idle,
                    # to give freed pages back and make the reserve again (`_low_disk`).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), DISK_CHECK_S)
                    self._low_disk()
                else:
                    await self._wake.wait()
                if not self._urgent and len(self._dones) < self._early \
                        and len(self._inserts) < self.cfg.commit_max_rows:
                    await self._until(started + interval)
                self._wake.clear()
                self._urgent = False
                started = loop.time()
                # Sparse: fewer than end an interval early, so what waits in the socket
                # until the next commit stays within the broker's window (a busy input is
                # read as it comes).
                sparse = bool(interval) and len(self._dones) < self._early and not self._split
                self._hold(sparse)  # sparse input waits in its socket during the commit
                try:
                    await self.flush()
                except OutboxError as exc:
                    self._hold(False)
                    self.counters.inc("commit_errors")
                    self.telemetry.warn_burst("outbox:commit", "outbox: commit failed, will "
                                              "retry (nothing acknowledged meanwhile): %s", exc)
                    await asyncio.sleep(RETRY_S)
                    self._wake.set()
                    continue
                if sparse:
                    await self._quiet(started + interval)
        finally:
            self._hold(False)

    def _hold(self, on: bool) -> None:
        """Leave the input in its socket (on) or read it as it comes (off)."""
        intake = self.intake
        if intake is not None and on != self._holding:
            self._holding = on
            if on:
                intake.pause_reading()
            else:
                intake.resume_reading()

    async def _until(self, when: float) -> None:
        """Wait until the loop's clock reads `when`, or less: enough inputs (`submit`) or
        the sender waiting for deletes (`settle_soon`) end the wait early. One timer per
        commit, never one per message."""
        loop = asyncio.get_running_loop()
        wait = when - loop.time()
        if wait <= 0:
            return
        self._window = window = loop.create_future()
        timer = loop.call_later(wait, _resolve, window)
        try:
            await window
        finally:
            timer.cancel()
            self._window = None

    async def _quiet(self, until: float) -> None:
        """Sparse input: until the next commit may start (`until`), what comes waits in
        the sockets (the input's, and those in `quiet`); then it is read in one go.
        One loop wake-up per commit interval instead of one per message or PUBACK."""
        for p in self.quiet:
            p.pause_reading()
        try:
            if not self._urgent:
                await self._until(until)
        finally:
            self._hold(False)
            for p in self.quiet:
                p.resume_reading()
        # The loop polls the sockets in its next iteration and runs their callbacks
        # (submits, PUBACKs) in the one after: then the next commit takes all of it.
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def flush(self) -> None:
        """Commit everything pending now; then acknowledge inputs and hand rows to the sender."""
        assert self.store is not None
        if self._split:
            # After a failure (a full disk): give the reserve back to the file system, fold
            # the WAL into the file and truncate it, free space (deletes) in transactions
            # sized to the free disk, give freed pages back; then insert in small batches.
            # The WAL would otherwise keep its size until the next auto-checkpoint, which a
            # full disk may never reach.
            if await self._call(self.store.release):
                self._reserved = False
                log.error("outbox: the disk is full; released the %d kB reserve to recover. "
                          "Free disk space: nothing is acknowledged until rows commit again.",
                          self.store.reserve_bytes >> 10)
            await self._run(self.store.checkpoint)
            await self._settle_in_chunks()
            await self._shrink()
        # Bounded batches (rows, and bytes: the WAL frames of one must fit in the disk
        # reserve); after a failure small ones, only into pages deletes freed inside the
        # file (it must not grow while the disk is full) and leaving disk for the WAL of
        # the deletes that free more.
        limit = SPLIT_ROWS if self._split else self.cfg.commit_max_rows
        pending = self._inserts
        if self._split and pending:
            room = await self._call(self.store.free_bytes)
            spare = self._disk_free_now() - self.store.reserve_bytes // 2
            limit = _fit(pending, limit, min(room // 2, spare // 4), 0)
        elif len(pending) > 1:
            limit = _fit(pending, limit, self.store.batch_bytes, 1)
        admit, evict = self._admit(pending[:limit])
        if limit and admit < min(len(pending), limit):
            # reject_new: hold the rest and its acks; the local broker keeps those inputs
            # and sends no more than our receive maximum meanwhile.
            self._room.clear()
        elif not self._room.is_set():
            log.info("outbox: room again (%d messages); taking input", self.count)
            self._room.set()
        inserts, dones = self._take(admit)
        durable = self._durable and bool(inserts)
        if inserts and not self._inserts:
            self._durable = False  # held rows keep their claim to FULL
        # While the disk is full, deletes go only in the sized transactions above.
        deletes, dead = ([], []) if self._split else (self._take_deletes(), self._take_dead())
        states, self._states = self._states, {}
        if not (inserts or deletes or dead or evict or states):
            for _, d in dones:
                if d is not None:
                    d()
            return
        try:
            await self._commit(inserts, dones, deletes, dead, evict, durable or bool(states),
                               states)
        except OutboxError:
            self._durable = self._durable or durable
            raise
        if self._inserts and self._room.is_set():
            self._wake.set()  # more than one batch was waiting

    def _take(self, n: int) -> tuple[list[Outgoing], list[tuple[int, Done | None]]]:
        """The first `n` pending rows and the acks of the inputs they complete."""
        inserts = self._inserts[:n]
        del self._inserts[:n]
        self._base += n
        dones = self._dones
        taken = []
        # Absolute ends: nothing is rebased, so a long queue of held inputs costs nothing.
        while dones and dones[0][0] <= self._base:
            taken.append(dones.popleft())
        return inserts, taken

    def _take_deletes(self) -> list[tuple[int, int]]:
        out, self._deletes = self._deletes, []
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        return out

    def _take_dead(self) -> list[tuple[Row, str]]:
        out, self._dead = self._dead, []
        return out

    async def _commit(self, inserts: list[Outgoing], dones: list[tuple[int, Done | None]],
                      deletes: list[tuple[int, int]], dead: list[tuple[Row, str]], evict: int,
                      durable: bool, states: dict[str, bytes] | None = None) -> None:
        assert self.store is not None
        t0 = time.perf_counter()
        self._settling = len(deletes) + len(dead)
        try:
            # SQLite blocks (and fsyncs): the one writer thread, never the loop.
            rows, evicted = await self._writer.call(
                self.store.commit, inserts, deletes, dead, evict, durable, states)
        except OutboxError as exc:
            self._settling = 0
            # Put everything back in front; nothing was acknowledged yet.
            n = len(inserts)
            self._inserts = inserts + self._inserts
            self._base -= n
            self._dones.extendleft(reversed(dones))
            self._deletes = deletes + self._deletes
            self._dead = dead + self._dead
            self._states = {**(states or {}), **self._states}  # newer state wins
            self._split = self._split or isinstance(exc, DiskFullError)
            raise
        self._settling = 0
        if self._split:
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
        while self._deletes or self._dead:
            row = max(64, self.bytes // max(1, self.count)) + ROW_OVERHEAD
            n = max(1, min(SPLIT_ROWS, self._disk_free_now() // 4 // row))
            chunk, self._deletes = self._deletes[:n], self._deletes[n:]
            dead, self._dead = self._dead[:n], self._dead[n:]
            await self._commit([], [], chunk, dead, 0, False)
            await self._run(self.store.checkpoint)

    def _disk_free_now(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return int(st.f_bavail * st.f_frsize)

    async def _shrink(self) -> None:
        """While recovering from a full disk: give the pages deletes freed back to the disk.

        Otherwise the file keeps its high-water size, the disk stays full and the
        reserve can never be made again. Keeps a few batches' worth for inserts.
        """
        store = self.store
        assert store is not None
        keep = 2 * store.batch_bytes
        step = max(16, store.reserve_bytes // 4 // PAGE_BYTES)
        try:
            for _ in range(SHRINK_STEPS):
                if not await self._call(lambda: store.shrink(keep, step)):
                    break
        except OutboxError as exc:
            log.warning("outbox: giving free pages back failed: %s", exc)

    def _evicted(self, evicted: list[Evicted]) -> None:
        total = 0
        avg = self.bytes // max(1, self.count)
        for lane, upto, n in evicted:
            self._evicted_to[lane] = max(upto, self._evicted_to.get(lane, 0))
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

    def _admit(self, inserts: list[Outgoing]) -> tuple[int, int]:
        """How many of `inserts` to take now, and how many rows to evict after inserting
        them (drop_oldest: the oldest of the lowest lanes, the batch's own included, so
        the bounds hold however large the batch)."""
        low_disk = self._low_disk()
        if not inserts:
            return 0, 0
        n = len(inserts)
        size = sum(len(o.payload) + len(o.topic) for o in inserts)
        over_count = self.count + n - self.cfg.max_messages
        over_bytes = self.bytes + size - self.cfg.max_bytes
        if over_count <= 0 and over_bytes <= 0 and not low_disk:
            return n, 0
        if self.cfg.on_full == "reject_new":
            take = 0 if low_disk else self._whole_inputs(inserts)
            if take < n:
                self.counters.inc("rejected_full")
                self.telemetry.warn_burst(
                    "outbox:reject", "outbox full (%d messages, %d bytes%s): not "
                    "acknowledging new input until it drains", self.count + take,
                    self.bytes, ", disk low" if low_disk else "")
            return take, 0
        avg = max(1, (self.bytes + size) // (self.count + n))
        evict = max(over_count, -(-over_bytes // avg) if over_bytes > 0 else 0, 0)
        if low_disk:  # the disk is short: new rows take the place of old ones
            evict = max(evict, min(n, self.count))
        return n, min(evict, self.count + n)

    def _whole_inputs(self, inserts: list[Outgoing]) -> int:
        """How many of `inserts` (a prefix of the pending rows) fit the bounds, ending
        with an input: the first inputs in order, each with all its outputs. An empty
        outbox takes its first input whatever its size, rather than stall."""
        rows_left = self.cfg.max_messages - self.count
        bytes_left = self.cfg.max_bytes - self.bytes
        fit = 0
        for o in itertools.islice(inserts, max(0, rows_left)):
            bytes_left -= len(o.payload) + len(o.topic)
            if bytes_left < 0:
                break
            fit += 1
        base, cut = self._base, 0
        for end, _ in self._dones:
            if end - base > fit:
                if self.count == 0 and not cut:
                    cut = min(end - base, len(inserts))
                break
            cut = end - base
        return cut

    def _low_disk(self) -> bool:
        now = time.monotonic()
        if now - self._disk_checked > DISK_CHECK_S:
            self._disk_checked = now
            try:
                st = os.statvfs(self.path.parent)
                self._disk_free = st.f_bavail * st.f_frsize
                store = self.store
                if (self._split or not self._reserved) and store is not None and \
                        self._disk_free > 2 * store.reserve_bytes + store.batch_bytes:
                    # Blocking but short: one fallocate once the disk has room again.
                    self._reserved = store.reserve()
                    if self._split and (self._reserved or not store.reserve_bytes):
                        log.info("outbox: disk space is back%s", "; reserve restored"
                                 if self._reserved else "")
                        self._split = False
            except OSError:
                self._disk_free = 1 << 62
        return self._disk_free < self.cfg.min_free_bytes

    # -- reading for the sender --------------------------------------------------

    async def page(self, lane: int, after_id: int, limit: int) -> list[Row]:
        """The next rows of a lane from disk (never the whole backlog: RSS stays flat)."""
        assert self.store is not None
        rows = await self._writer.call(self.store.page, lane, after_id, limit)
        upto = self._evicted_to.get(lane, 0)
        return [r for r in rows if r.id > upto] if rows and rows[0].id <= upto else rows

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
        return sum(d is not None for _, d in self._dones)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _by_whom(path: Path) -> str:
    """" (held by pid 123: sqlite3 outbox.db)", or "" when no holder is found."""
    found = holders(path)
    return f" (held by {', '.join(f'pid {pid}: {cmd}' for pid, cmd in found)})" if found else ""


def _fit(pending: list[Outgoing], limit: int, budget: int, least: int) -> int:
    """How many of the first `limit` rows fit in `budget` bytes on disk (at least `least`)."""
    head = pending[:limit]
    # The usual case, all of them, summed in C (the relay's hot path); else row by row.
    if sum(map(len, map(_PAYLOAD, head))) + sum(map(len, map(_TOPIC, head))) \
            + ROW_OVERHEAD * len(head) <= budget:
        return len(head)
    n = 0
    for o in itertools.islice(pending, limit):
        budget -= len(o.payload) + len(o.topic) + ROW_OVERHEAD
        if budget < 0:
            break
        n += 1
    return max(n, min(least, len(pending)))
