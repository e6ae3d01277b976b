"""SQLite store-and-forward: the durable middle of custody transfer.

A message accepted from the local bus is acknowledged there only after the
transaction holding everything it produced has committed here; a row is
deleted only after the next hop acknowledged it with a success reason code.

- WAL, one writer thread, group commit: rows submitted within
  `commit_interval_ms` share one transaction and one fsync.
- `synchronous=FULL` for batches holding priority >= 1 rows; lane 0 (bulk)
  may use NORMAL (`outbox.bulk_synchronous`).
- Compact rows: a WITHOUT ROWID table clustered on (lane, id), topics and key
  prefixes interned in a small dictionary table, integer timestamps: about
  150 bytes on disk per 100-byte message.
- A database that fails to open or its quick check is moved aside with a loud
  error and a fresh one is started: the agent never crash-loops on its files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import OutboxConfig
from agent.errors import OutboxError
from agent.pipeline import Outgoing
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

DB_NAME = "outbox.db"
SCHEMA_VERSION = 1
DISK_CHECK_S = 1.0
RETRY_S = 0.5

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS intern (n INTEGER PRIMARY KEY, s TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS rows (
    lane INTEGER NOT NULL,          -- priority: higher is sent first, dropped last
    id INTEGER NOT NULL,            -- global insertion order (monotonic across restarts)
    topic INTEGER NOT NULL,         -- intern.n
    kp INTEGER NOT NULL,            -- intern.n of the idempotency key's prefix
    ks TEXT NOT NULL,               -- the key's last part (after the last ':')
    flags INTEGER NOT NULL,         -- qos | retain << 2
    created INTEGER NOT NULL,       -- unix seconds
    expires INTEGER,                -- unix seconds, NULL: never
    payload BLOB NOT NULL,
    PRIMARY KEY (lane, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY, lane INTEGER, topic TEXT, key TEXT, qos INTEGER, retain INTEGER,
    created REAL, expires REAL, payload BLOB, reason TEXT, dead_at REAL
);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One stored message, as the uplink sender sees it."""

    lane: int
    id: int
    topic: str
    key: str
    qos: int
    retain: bool
    created: int
    expires: int | None
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic)


Done = Callable[[], None]


class Store:
    """The SQLite side; every method blocks and runs on the outbox's one writer thread."""

    def __init__(self, path: Path, cfg: OutboxConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.db = self._open()
        self._interned: dict[str, int] = dict(
            (s, n) for n, s in self.db.execute("SELECT n, s FROM intern"))
        self._names: dict[int, str] = {n: s for s, n in self._interned.items()}
        row = self.db.execute("SELECT max(id) FROM (SELECT max(id) AS id FROM rows "
                              "UNION ALL SELECT max(id) FROM dead)").fetchone()
        self.last_id = int(row[0] or 0)
        self._sync = ""

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result}")
            return db
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("OUTBOX DATABASE %s IS UNUSABLE (%s): moved aside to %s; starting a "
                      "fresh one. Inspect the old file with sqlite3 to recover rows.",
                      self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    shutil.move(src, f"{aside}{suffix}")
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only effective on a new file
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA journal_size_limit = 67108864")
        db.execute("PRAGMA cache_size = -8000")  # 8 MB page cache: RSS stays flat
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        return db

    def intern(self, s: str) -> int:
        n = self._interned.get(s)
        if n is None:
            n = self.db.execute("INSERT INTO intern (s) VALUES (?) RETURNING n", (s,)).fetchone()[0]
            self._interned[s] = n
            self._names[n] = s
        return n

    def name(self, n: int) -> str:
        return self._names[n]

    def commit(self, inserts: list[Outgoing], deletes: list[tuple[int, int]],
               dead: list[tuple[Row, str]], evict: int, durable: bool) -> tuple[list[Row], int]:
        """One transaction: insert, delete acknowledged, dead-letter, evict for room.

        Returns the inserted rows (with their ids) and how many rows eviction removed.
        """
        sync = "FULL" if durable else "NORMAL"
        if sync != self._sync:
            self.db.execute(f"PRAGMA synchronous = {sync}")
            self._sync = sync
        db = self.db
        rows: list[Row] = []
        evicted = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            if evict:
                evicted = self._evict(evict)
            if dead:
                db.executemany(
                    "INSERT OR REPLACE INTO dead VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(r.id, r.lane, r.topic, r.key, r.qos, int(r.retain), r.created, r.expires,
                      r.payload, reason, time.time()) for r, reason in dead])
                deletes = deletes + [(r.lane, r.id) for r, _ in dead]
            if deletes:
                db.executemany("DELETE FROM rows WHERE lane = ? AND id = ?", deletes)
            if inserts:
                params = []
                next_id = self.last_id
                for o in inserts:
                    next_id += 1
                    prefix, _, suffix = o.key.rpartition(":")
                    created = int(o.created or time.time())
                    expires = int(created + o.ttl_s) if o.ttl_s else None
                    params.append((o.priority, next_id, self.intern(o.topic), self.intern(prefix),
                                   suffix, o.qos | (int(o.retain) << 2), created, expires,
                                   o.payload))
                    rows.append(Row(o.priority, next_id, o.topic, o.key, o.qos, o.retain,
                                    created, expires, o.payload))
                db.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?)", params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            # Interned strings inserted in the rolled-back transaction are gone again.
            self._interned = dict((s, n) for n, s in db.execute("SELECT n, s FROM intern"))
            self._names = {n: s for s, n in self._interned.items()}
            raise
        if rows:
            self.last_id = rows[-1].id
        return rows, evicted

    def _evict(self, n: int) -> int:
        """Delete the `n` oldest rows of the lowest lanes (drop_oldest)."""
        left = n
        for (lane,) in self.db.execute("SELECT DISTINCT lane FROM rows ORDER BY lane").fetchall():
            cur = self.db.execute(
                "DELETE FROM rows WHERE lane = ? AND id IN "
                "(SELECT id FROM rows WHERE lane = ? ORDER BY id LIMIT ?)", (lane, lane, left))
            left -= cur.rowcount
            if left <= 0:
                break
        return n - left

    def page(self, lane: int, after_id: int, limit: int) -> list[Row]:
        """Rows of one lane after `after_id`, in order: the backlog streams from disk."""
        cur = self.db.execute(
            "SELECT lane, id, topic, kp, ks, flags, created, expires, payload FROM rows "
            "WHERE lane = ? AND id > ? ORDER BY id LIMIT ?", (lane, after_id, limit))
        return [self._row(r) for r in cur]

    def _row(self, r: tuple[Any, ...]) -> Row:
        prefix = self._names[r[3]]
        key = f"{prefix}:{r[4]}" if prefix else r[4]
        return Row(r[0], r[1], self._names[r[2]], key, r[5] & 3, bool(r[5] & 4), r[6], r[7],
                   r[8])

    def totals(self) -> tuple[int, int, list[int]]:
        """(count, logical bytes, lanes present), read once at start."""
        count, size = self.db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM rows").fetchone()
        lanes = [r[0] for r in self.db.execute("SELECT DISTINCT lane FROM rows")]
        topic_bytes = self.db.execute(
            "SELECT coalesce(sum(length(i.s)), 0) FROM rows r JOIN intern i ON i.n = r.topic"
        ).fetchone()[0]
        return int(count), int(size + topic_bytes), lanes

    def vacuum(self) -> None:
        """Give freed pages back to the file system once the backlog drained."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 256:
            self.db.execute("PRAGMA incremental_vacuum")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()


class Outbox:
    """The loop-side face of the store: group commit, bounds, and handing rows to the sender."""

    def __init__(self, data_dir: Path, cfg: OutboxConfig, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.path = data_dir / DB_NAME
        self.counters = telemetry.component("outbox")
        self.telemetry = telemetry
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self.store: Store | None = None
        self.count = 0
        self.bytes = 0
        self._inserts: list[Outgoing] = []
        self._dones: list[Done] = []
        self._deletes: list[tuple[int, int]] = []
        self._dead: list[tuple[Row, str]] = []
        self._durable = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._disk_free = 1 << 62
        self._disk_checked = 0.0
        self.on_rows: Callable[[list[Row]], None] = lambda rows: None
        self.lanes_on_disk: set[int] = set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.store = await loop.run_in_executor(self._executor, Store, self.path, self.cfg)
            self.count, self.bytes, lanes = await loop.run_in_executor(
                self._executor, self.store.totals)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox at {self.path}: {exc}") from exc
        self.lanes_on_disk = set(lanes)
        self.counters.values["backlog"] = self.count
        if self.count:
            log.info("outbox: %d messages (%d bytes) waiting from before", self.count, self.bytes)

    # -- intake (loop thread) -------------------------------------------------

    def submit(self, items: list[Outgoing], done: Done | None) -> None:
        """Take a message's outputs; `done` runs once they are committed (then ack the input)."""
        if items:
            self._inserts.extend(items)
            if any(o.priority > 0 for o in items) or self.cfg.bulk_synchronous == "FULL":
                self._durable = True
        if done is not None:
            self._dones.append(done)
        self._wake.set()

    async def wait_room(self) -> None:
        """Backpressure for `reject_new`: pipelines wait here while the outbox is full."""
        await self._room.wait()

    def acked(self, row: Row) -> None:
        self._deletes.append((row.lane, row.id))
        self.count -= 1
        self.bytes -= row.size
        self.counters.inc("delivered")
        self._wake.set()

    def to_dead(self, row: Row, reason: str) -> None:
        self._dead.append((row, reason))
        self.count -= 1
        self.bytes -= row.size
        self.counters.inc("dead_lettered")
        self.telemetry.warn_burst("outbox:dead", "outbox: message %s on %s dead-lettered: %s",
                                  row.key, row.topic, reason)
        self._wake.set()

    def expired(self, row: Row) -> None:
        self._deletes.append((row.lane, row.id))
        self.count -= 1
        self.bytes -= row.size
        self.counters.inc("dropped_expired")
        self._wake.set()
        self.telemetry.warn_burst("outbox:expired", "outbox: dropped expired message %s on %s",
                                  row.key, row.topic)

    # -- the group committer ----------------------------------------------------

    async def run(self) -> None:
        """Commit batches forever; never lose what was submitted (retry on disk errors)."""
        interval = self.cfg.commit_interval_ms / 1000.0
        while True:
            await self._wake.wait()
            if interval and len(self._inserts) < self.cfg.commit_max_rows:
                await asyncio.sleep(interval)  # linger: a bigger group for one fsync
            self._wake.clear()
            try:
                await self.flush()
            except OutboxError as exc:
                self.counters.inc("commit_errors")
                self.telemetry.warn_burst("outbox:commit", "outbox: commit failed, will retry "
                                          "(nothing acknowledged meanwhile): %s", exc)
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    async def flush(self) -> None:
        """Commit everything pending now."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        inserts, dones = self._inserts, self._dones
        admit, evict = self._admit(inserts)
        if admit < len(inserts):
            # reject_new: hold the batch and its acks; the local broker keeps the inputs
            # and sends no more than our receive maximum meanwhile.
            self._room.clear()
            inserts, dones = [], []
        else:
            self._inserts, self._dones = [], []
            self._room.set()
        deletes, dead = self._deletes, self._dead
        self._deletes, self._dead = [], []
        durable, self._durable = self._durable, False
        if not (inserts or deletes or dead or evict):
            for d in dones:
                d()
            return
        t0 = time.perf_counter()
        try:
            rows, evicted = await loop.run_in_executor(
                self._executor, self.store.commit, inserts, deletes, dead, evict, durable)
        except (sqlite3.Error, OSError) as exc:
            # Put everything back in front; nothing was acknowledged yet.
            self._inserts = inserts + self._inserts
            self._dones = dones + self._dones
            self._deletes = deletes + self._deletes
            self._dead = dead + self._dead
            self._durable = True
            raise OutboxError(str(exc)) from exc
        self.counters.observe("commit", (time.perf_counter() - t0) * 1000.0)
        self.counters.inc("commits")
        if evicted:
            self.count -= evicted
            self.counters.inc("dropped_full", evicted)
            self.telemetry.warn_burst("outbox:full", "outbox full: dropped the %d oldest "
                                      "lowest-priority messages", evicted)
        for r in rows:
            self.count += 1
            self.bytes += r.size
        self.counters.inc("stored", len(rows))
        self.counters.values["backlog"] = self.count
        self.counters.values["backlog_bytes"] = self.bytes
        for d in dones:
            d()  # the inputs may now be acknowledged to the local broker
        if rows:
            self.on_rows(rows)

    def _admit(self, inserts: list[Outgoing]) -> tuple[int, int]:
        """How many of `inserts` fit, and how many old rows to evict for them."""
        if not inserts:
            return 0, 0
        n = len(inserts)
        size = sum(len(o.payload) + len(o.topic) for o in inserts)
        over_count = self.count + n - self.cfg.max_messages
        over_bytes = self.bytes + size - self.cfg.max_bytes
        low_disk = self._low_disk()
        if over_count <= 0 and over_bytes <= 0 and not low_disk:
            return n, 0
        if self.cfg.on_full == "reject_new":
            self.counters.inc("rejected_full")
            self.telemetry.warn_burst("outbox:reject", "outbox full (%d messages, %d bytes%s): "
                                      "not acknowledging new input until it drains",
                                      self.count, self.bytes, ", disk low" if low_disk else "")
            return 0, 0
        avg = max(1, self.bytes // max(1, self.count))
        evict = max(over_count, -(-over_bytes // avg) if over_bytes > 0 else 0,
                    n if low_disk else 0, 0)
        return n, min(evict, self.count)

    def _low_disk(self) -> bool:
        now = time.monotonic()
        if now - self._disk_checked > DISK_CHECK_S:
            self._disk_checked = now
            try:
                st = os.statvfs(self.path.parent)
                self._disk_free = st.f_bavail * st.f_frsize
            except OSError:
                self._disk_free = 1 << 62
        return self._disk_free < self.cfg.min_free_bytes

    # -- reading for the sender --------------------------------------------------

    async def page(self, lane: int, after_id: int, limit: int) -> list[Row]:
        assert self.store is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.store.page, lane, after_id, limit)

    async def vacuum(self) -> None:
        assert self.store is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.vacuum)

    async def close(self) -> None:
        if self.store is not None:
            try:
                await self.flush()
            except OutboxError as exc:
                log.error("outbox: final commit failed: %s", exc)
            await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
            self.store = None
        self._executor.shutdown(wait=True)

    def pending_inputs(self) -> int:
        return len(self._dones)

