"""The outbox's SQLite file: schema, compact rows, one transaction per group commit.

Every method blocks and runs on the outbox's one writer thread (`agent.delivery.outbox`).
SQLite's errors stop here: every public method raises `OutboxError` (`DiskFullError`
when the disk has no room, `OutboxBusyError` when another process holds the lock) or
`ConfigError`, never `sqlite3.Error`.

- WAL; `synchronous` per transaction (FULL when it holds priority >= 1 rows).
- Compact rows: a WITHOUT ROWID table clustered on (lane, id), topics and key
  prefixes interned in a small dictionary table, integer timestamps: about
  150 bytes on disk per 100-byte message.
- Only real corruption (not a database, a malformed image, a failed quick
  check) moves a file aside, with a loud error, for a fresh one: the agent
  never crash-loops on its files. A file that is merely busy (another process
  holds a write transaction) is waited for; one that cannot be written (a
  read-only mount, `chattr +i`) or was written by a newer agent is kept as
  it is and the agent refuses to start (`ConfigError`: exit 2, no restart
  loop), saying which file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, ParamSpec, TypeVar

from agent.config import OutboxConfig
from agent.errors import ConfigError, DiskFullError, OutboxBusyError, OutboxError
from agent.messages import Outgoing

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


DB_NAME = "outbox.db"
SCHEMA_VERSION = 1
ROW_OVERHEAD = 40  # bytes a row costs on disk beyond payload and topic, roughly
# Reserved disk space, given up when the disk is full: a WAL cannot be checkpointed
# (so no delete can commit) once the disk has no room left for the pages it moves.
# Sized to the file system (an eighth of it, at most 8 MB; none below 64 kB), and the
# WAL and each transaction are bounded by it, so that releasing it always lets the
# checkpoint finish: an 8 MB reserve cannot exist on a 2 MB disk.
BALLAST_NAME = "outbox.ballast"
BALLAST_BYTES = 8 << 20
RESERVE_FRACTION = 8
RESERVE_FLOOR_BYTES = 64 << 10
PAGE_BYTES = 4096  # SQLite's default page size, which the outbox keeps
BUSY_TIMEOUT_MS = 1000  # SQLite's own wait for another process's lock, per statement

_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_UNWRITABLE = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM,
               sqlite3.SQLITE_AUTH)
_UNWRITABLE_ERRNO = (errno.EROFS, errno.EACCES, errno.EPERM)

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
-- Step state (open windows): committed with the acks of the inputs folded into it.
CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v BLOB NOT NULL);
"""

class Row(NamedTuple):
    """One stored message, as the uplink sender sees it.

    A NamedTuple rather than a frozen dataclass: one is built per message on
    the relay's hot path, 0.8 us against 2.8 us (bench: `fogwhisk bench relay`).
    """

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


Evicted = tuple[int, int, int]  # (lane, highest evicted id, how many): a prefix of the lane


def outbox_error(exc: BaseException) -> OutboxError:
    """The agent's error for a failure of SQLite or of the file system under it."""
    if disk_full(exc):
        return DiskFullError(str(exc))
    if busy(exc):
        return OutboxBusyError(str(exc))
    return OutboxError(str(exc))


def _guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn` raising `OutboxError` (or a leaf) instead of `sqlite3.Error` or `OSError`."""
    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise outbox_error(exc) from exc
    return guarded


class Store:
    """The SQLite side; every method blocks and runs on the outbox's one writer thread."""

    @_guarded
    def __init__(self, path: Path, cfg: OutboxConfig) -> None:
        self.path = path
        self.cfg = cfg
        self._sync = ""
        self.fs_bytes = 0
        self.reserve_bytes = BALLAST_BYTES
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Open and check the database; only a corrupt one is moved aside for a fresh one.

        Raises ConfigError for a file that cannot be written or comes from a newer
        agent (kept as it is), and (through `__init__`) OutboxError for anything else:
        OutboxBusyError for "database is locked" (the caller waits and tries again).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.path.parent)
        except OSError as exc:
            raise self._unwritable(exc) from None
        self.fs_bytes = st.f_blocks * st.f_frsize
        self.reserve_bytes = reserve_for(self.fs_bytes)
        db: sqlite3.Connection | None = None
        try:
            db = self._connect()
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise _Corrupt(f"quick_check: {result}")
            found = db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if found is None or found[0] != str(SCHEMA_VERSION):
                raise ConfigError(
                    f"the outbox {self.path} has schema {found[0] if found else '?'}; this "
                    f"agent reads {SCHEMA_VERSION}. It is kept as it is: run the agent that "
                    "wrote it, or move the file aside to start with an empty outbox.")
            self._load_state(db)
            return db
        except (sqlite3.Error, _Corrupt, ConfigError) as exc:
            if db is not None:
                db.close()
            if not isinstance(exc, _Corrupt) and not corrupt(exc):
                if unwritable(exc):
                    raise self._unwritable(exc) from None
                raise  # busy, or a failure that is not the file's fault: keep the file
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
            log.error("OUTBOX DATABASE %s IS CORRUPT (%s): moved aside to %s; starting a "
                      "fresh one. Inspect the old file with sqlite3 to recover rows.",
                      self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    shutil.move(src, f"{aside}{suffix}")
            db = self._connect()
            self._load_state(db)
            return db

    def _unwritable(self, exc: BaseException) -> ConfigError:
        return ConfigError(
            f"the outbox {self.path} cannot be written ({exc}): read-only file system, "
            "immutable file or no permission. It is kept as it is, with every message "
            f"waiting in it. Make {self.path.parent} writable (remount it read-write; "
            f"`chattr -i {self.path}`; check its owner) and start the agent again.")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only effective on a new file
        db.execute("PRAGMA journal_mode = WAL")
        # Committed WAL frames (at most this plus one transaction, `batch_bytes`) stay
        # inside the reserve, so a checkpoint can finish once it is released; 4 MB
        # (SQLite's default) on big disks.
        wal_pages = max(16, min(1000, self.reserve_bytes // 2 // PAGE_BYTES))
        db.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        db.execute(f"PRAGMA journal_size_limit = {wal_pages * PAGE_BYTES}")
        db.execute("PRAGMA cache_size = -8000")  # 8 MB page cache: RSS stays flat
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._sync = ""
        return db

    def _load_state(self, db: sqlite3.Connection) -> None:
        self._interned: dict[str, int] = dict(
            (s, n) for n, s in db.execute("SELECT n, s FROM intern"))
        self._names: dict[int, str] = {n: s for s, n in self._interned.items()}
        row = db.execute("SELECT max(id) FROM (SELECT max(id) AS id FROM rows "
                         "UNION ALL SELECT max(id) FROM dead)").fetchone()
        self.last_id = int(row[0] or 0)

    def intern(self, s: str) -> int:
        n = self._interned.get(s)
        if n is None:
            n = self.db.execute("INSERT INTO intern (s) VALUES (?) RETURNING n", (s,)).fetchone()[0]
            self._interned[s] = n
            self._names[n] = s
        return n

    def name(self, n: int) -> str:
        return self._names[n]

    @_guarded
    def commit(self, inserts: list[Outgoing], deletes: list[tuple[int, int]],
               dead: list[tuple[Row, str]], evict: int, durable: bool,
               states: dict[str, bytes] | None = None) -> tuple[list[Row], list[Evicted]]:
        """One transaction: dead-letter, delete acknowledged, insert, evict to the bound.

        Deletes run before eviction, so a row already delivered is never also
        counted as dropped; eviction runs after the inserts, so a batch larger
        than the bound loses its own oldest lowest-lane rows too (`evict` counts
        old and new rows). Returns the inserted rows (with their ids; some may be
        in the evicted prefixes) and the evicted prefixes of each lane.
        """
        sync = "FULL" if durable else "NORMAL"
        db = self.db
        if sync != self._sync:
            db.execute(f"PRAGMA synchronous = {sync}")
            self._sync = sync
        rows: list[Row] = []
        evicted: list[Evicted] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            if dead:
                now = time.time()
                db.executemany(
                    "INSERT OR REPLACE INTO dead VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(r.id, r.lane, r.topic, r.key, r.qos, int(r.retain), r.created, r.expires,
                      r.payload, reason, now) for r, reason in dead])
                deletes = deletes + [(r.lane, r.id) for r, _ in dead]
            if deletes:
                db.executemany("DELETE FROM rows WHERE lane = ? AND id BETWEEN ? AND ?",
                               _ranges(deletes))
            if inserts:
                rows = self._insert(inserts)
            if evict:
                evicted = self._evict(evict)
            if states:
                db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", states.items())
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # SQLITE_FULL may have ended it already
                db.execute("ROLLBACK")
            # Interned strings inserted in the rolled-back transaction are gone again.
            self._load_state(db)
            raise
        if rows:
            self.last_id = rows[-1].id
        return rows, evicted

    def _insert(self, inserts: list[Outgoing]) -> list[Row]:
        """Bind and insert; the loop is the relay's hot path, so it stays flat."""
        params = []
        rows = []
        next_id = self.last_id
        interned = self._interned
        intern = self.intern
        now = time.time()
        last_prefix, kp = "", -1
        for o in inserts:
            next_id += 1
            prefix, _, suffix = o.key.rpartition(":")
            if prefix != last_prefix or kp < 0:
                kp = interned.get(prefix) or intern(prefix)
                last_prefix = prefix
            topic_n = interned.get(o.topic) or intern(o.topic)
            # A canonical decimal suffix (the usual boot:seq key) is stored as an integer.
            ks: int | str = int(suffix) if suffix.isascii() and suffix.isdigit() and (
                suffix[0] != "0" or suffix == "0") else suffix
            created = int(o.created or now)
            expires = int(created + o.ttl_s) if o.ttl_s else None
            params.append((o.priority, next_id, topic_n, kp, ks,
                           o.qos | (o.retain << 2), created, expires, o.payload))
            rows.append(Row(o.priority, next_id, o.topic, o.key, o.qos, o.retain, created,
                            expires, o.payload))
        self.db.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?)", params)
        self.last_id = next_id
        return rows

    def _evict(self, n: int) -> list[Evicted]:
        """Delete the `n` oldest rows of the lowest lanes (drop_oldest): a prefix per lane."""
        left = n
        out: list[Evicted] = []
        for (lane,) in self.db.execute("SELECT DISTINCT lane FROM rows ORDER BY lane").fetchall():
            cut = self.db.execute(
                "SELECT max(id) FROM (SELECT id FROM rows WHERE lane = ? ORDER BY id LIMIT ?)",
                (lane, left)).fetchone()[0]
            if cut is None:
                continue
            cur = self.db.execute("DELETE FROM rows WHERE lane = ? AND id <= ?", (lane, cut))
            out.append((lane, int(cut), cur.rowcount))
            left -= cur.rowcount
            if left <= 0:
                break
        return out

    @_guarded
    def page(self, lane: int, after_id: int, limit: int) -> list[Row]:
        """Rows of one lane after `after_id`, in order: the backlog streams from disk."""
        cur = self.db.execute(
            "SELECT lane, id, topic, kp, ks, flags, created, expires, payload FROM rows "
            "WHERE lane = ? AND id > ? ORDER BY id LIMIT ?", (lane, after_id, limit))
        names = self._names
        out = []
        for r in cur:
            prefix = names[r[3]]
            out.append(Row(r[0], r[1], names[r[2]], f"{prefix}:{r[4]}" if prefix else str(r[4]),
                           r[5] & 3, bool(r[5] & 4), r[6], r[7], r[8]))
        return out

    @_guarded
    def states(self) -> dict[str, bytes]:
        """Every saved step state, by key (`pipeline:step`)."""
        return {k: bytes(v) for k, v in self.db.execute("SELECT k, v FROM state")}

    @_guarded
    def totals(self) -> tuple[int, int, list[int]]:
        """(count, logical bytes, lanes present), read once at start."""
        count, size = self.db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM rows").fetchone()
        lanes = [r[0] for r in self.db.execute("SELECT DISTINCT lane FROM rows")]
        topic_bytes = self.db.execute(
            "SELECT coalesce(sum(length(i.s)), 0) FROM rows r JOIN intern i ON i.n = r.topic"
        ).fetchone()[0]
        return int(count), int(size + topic_bytes), lanes

    @_guarded
    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (its space becomes free)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @_guarded
    def free_bytes(self) -> int:
        """Bytes of free pages inside the database file: room that needs no disk."""
        pages = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    @property
    def ballast(self) -> Path:
        return self.path.with_name(BALLAST_NAME)

    @property
    def batch_bytes(self) -> int:
        """The most a transaction may write: its WAL frames must fit in the reserve."""
        return max(64 << 10, self.reserve_bytes // 4)

    def reserve(self) -> bool:
        """Keep `reserve_bytes` of disk for recovering from a full disk; True if it is there.

        A reserve of another size (an older agent's, another disk's) is resized.
        """
        path = self.ballast
        if not self.reserve_bytes:
            path.unlink(missing_ok=True)
            return False
        try:
            if path.exists() and path.stat().st_size == self.reserve_bytes:
                return True
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, 0)
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
            return True
        except OSError:
            path.unlink(missing_ok=True)
            return False

    @_guarded
    def release(self) -> bool:
        """Give the reserve back to the file system; True if there was one."""
        try:
            self.ballast.unlink()
            return True
        except FileNotFoundError:
            return False

    @_guarded
    def shrink(self, keep_bytes: int, step_pages: int) -> int:
        """Give up to `step_pages` free pages beyond `keep_bytes` back to the file system.

        Small steps, each checkpointed: moving pages writes them to the WAL, which a
        full disk has little room for. Returns the bytes given back.
        """
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        pages = min(step_pages, free - keep_bytes // PAGE_BYTES)
        if pages <= 0:
            return 0
        # executescript steps it to the end; execute() would free a single page.
        self.db.executescript(f"PRAGMA incremental_vacuum({pages});")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(pages) * PAGE_BYTES

    @_guarded
    def vacuum(self) -> None:
        """Give freed pages back to the file system once the backlog drained."""
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 256:
            self.db.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @_guarded
    def close(self) -> None:
        self.db.close()


def reserve_for(fs_bytes: int) -> int:
    """The disk reserve for a file system of `fs_bytes`: an eighth, 8 MB at most, else none."""
    size = min(BALLAST_BYTES, fs_bytes // RESERVE_FRACTION)
    return size if size >= RESERVE_FLOOR_BYTES else 0


class _Corrupt(Exception):
    """The file opened but its quick check failed."""


def corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the only errors that justify moving a file aside."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT


def busy(exc: BaseException) -> bool:
    """Another connection holds a lock ("database is locked"): wait and try again."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _BUSY


def unwritable(exc: BaseException) -> bool:
    """Read-only (file system, immutable file), cannot open, no permission."""
    return ((getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNWRITABLE
            or getattr(exc, "errno", 0) in _UNWRITABLE_ERRNO)


def holders(path: Path) -> list[tuple[int, str]]:
    """Other processes that have the database open, with their command lines (Linux /proc)."""
    target = str(path.resolve())
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in (target, f"{target}-wal"):
                    cmd = b" ".join((entry / "cmdline").read_bytes().split())
                    found.append((int(entry.name), cmd.decode(errors="replace")[:120]))
                    break
        except OSError:
            continue  # gone, or not ours to look at
    return found


def disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL (13, also in its extended codes) or ENOSPC from the file system."""
    code = getattr(exc, "sqlite_errorcode", 0)
    return (code & 0xFF) == sqlite3.SQLITE_FULL or getattr(exc, "errno", 0) == errno.ENOSPC


def _ranges(keys: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(lane, id) pairs as (lane, first, last) runs of consecutive ids.

    Acknowledgements arrive nearly in order, so a batch of a thousand deletes
    is usually one range: one B-tree descent instead of a thousand.
    """
    out: list[tuple[int, int, int]] = []
    for lane, id_ in sorted(keys):
        if out and out[-1][0] == lane and id_ <= out[-1][2] + 1:
            if id_ > out[-1][2]:
                out[-1] = (lane, out[-1][1], id_)
        else:
            out.append((lane, id_, id_))
    return out

