"""`fogwhisk outbox stats|peek|purge|retry-dead`: look into an agent's store-and-forward.

`stats` and `peek` open the database read-only (`mode=ro`), so they are safe
beside a running agent. `purge` and `retry-dead` change it and refuse while
another process holds it open: the running agent keeps its counters and its
next row id in memory, and rows written behind its back would collide with
them.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.config import OutboxConfig
from agent.delivery.store import DB_NAME, Store, holders
from agent.errors import OutboxError
from agent.messages import Outgoing

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
OPS = ("stats", "peek", "purge", "retry-dead")


def main(op: str, data_dir: str, *, limit: int = 10, dead: bool = False,
         yes: bool = False) -> int:
    """Run one outbox operation on `<data_dir>/outbox.db`; exit code as the CLI's."""
    path = Path(data_dir) / DB_NAME
    if op not in OPS:
        print(f"fogwhisk outbox: unknown operation {op!r} (known: {', '.join(OPS)})",
              file=sys.stderr)
        return EXIT_USAGE
    if not path.is_file():
        print(f"fogwhisk outbox: no outbox database at {path}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if op == "stats":
            return stats(path)
        if op == "peek":
            return peek(path, limit, dead)
        if op == "purge":
            return purge(path, dead, yes)
        return retry_dead(path)
    except (sqlite3.Error, OutboxError) as exc:  # raw SQL here, the Store's own errors
        print(f"fogwhisk outbox: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


@contextmanager
def read_only(path: Path) -> Iterator[sqlite_utils.Database]:
    """The database opened read-only: a running agent is not disturbed."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    with closing(conn):
        conn.execute("PRAGMA busy_timeout = 5000")
        yield sqlite_utils.Database(conn)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _age(created: float | None, now: float) -> str:
    if created is None:
        return "-"
    s = max(0.0, now - created)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _cell(text: str, width: int = 100) -> str:
    """`text` fit for a table: control characters escaped, at most `width` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= width else f"{text[:width - 20]}...({len(text)} chars)"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def stats(path: Path) -> int:
    """Backlog per lane (count, bytes, oldest), dead letters by reason, size on disk."""
    now = time.time()
    with read_only(path) as db:
        lanes = list(db.query(
            "SELECT lane, count(*) AS n, sum(length(payload)) AS bytes, min(created) AS oldest "
            "FROM rows GROUP BY lane ORDER BY lane DESC"))
        reasons = list(db.query(
            "SELECT reason, count(*) AS n, sum(length(payload)) AS bytes FROM dead "
            "GROUP BY reason ORDER BY n DESC"))
        schema = next(db.query("SELECT v FROM meta WHERE k = 'schema'"), {"v": "?"})["v"]
    on_disk = sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
                  if p.exists())
    total = sum(r["n"] for r in lanes)
    print(f"outbox {path} (schema {schema}): {total} messages waiting, "
          f"{_size(on_disk)} on disk")
    if lanes:
        print()
        _table(("lane", "messages", "bytes", "oldest"),
               [(r["lane"], r["n"], _size(r["bytes"] or 0), _age(r["oldest"], now))
                for r in lanes])
    dead_total = sum(r["n"] for r in reasons)
    print(f"\ndead letters: {dead_total}")
    if reasons:
        _table(("reason", "messages", "bytes"),
               [(_cell(r["reason"] or "", 200), r["n"], _size(r["bytes"] or 0))
                for r in reasons])
    return EXIT_OK


def peek(path: Path, limit: int, dead: bool) -> int:
    """The first `limit` rows of each lane (or of the dead-letter table)."""
    now = time.time()
    with read_only(path) as db:
        if dead:
            rows = [(r["lane"], _cell(r["key"] or ""), _cell(r["topic"] or ""),
                     len(r["payload"] or b""), _age(r["dead_at"], now),
                     _cell(r["reason"] or "", 200))
                    for r in db.query("SELECT * FROM dead ORDER BY id LIMIT ?", [limit])]
            _table(("lane", "key", "topic", "size", "dead since", "reason"), rows)
            return EXIT_OK
        out: list[tuple[Any, ...]] = []
        for (lane,) in db.execute("SELECT DISTINCT lane FROM rows ORDER BY lane DESC").fetchall():
            for r in db.query(
                    "SELECT r.lane, r.id, t.s AS topic, "
                    "CASE WHEN k.s = '' THEN r.ks ELSE k.s || ':' || r.ks END AS key, "
                    "length(r.payload) AS size, r.created, r.expires FROM rows r "
                    "JOIN intern t ON t.n = r.topic JOIN intern k ON k.n = r.kp "
                    "WHERE r.lane = ? ORDER BY r.id LIMIT ?", [lane, limit]):
                expires = "-" if r["expires"] is None else _age(now, r["expires"]) \
                    if r["expires"] > now else "expired"
                out.append((r["lane"], _cell(str(r["key"])), _cell(r["topic"]), r["size"],
                            _age(r["created"], now), expires))
        n_dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
    _table(("lane", "key", "topic", "size", "age", "expires in"), out)
    if n_dead:
        print(f"\n{n_dead} dead letters: `fogwhisk outbox peek --dead` shows them with "
              "their reason")
    return EXIT_OK


def _refuse_if_open(path: Path, op: str) -> bool:
    found = holders(path)
    if found:
        print(f"fogwhisk outbox {op}: {path} is open in process "
              f"{', '.join(f'{pid} ({cmd})' for pid, cmd in found)} (a running agent?): "
              "stop it first", file=sys.stderr)
        return True
    return False


def purge(path: Path, dead: bool, yes: bool) -> int:
    """Delete every waiting row (or every dead letter). Needs --yes."""
    what = "dead letters" if dead else "waiting messages"
    if not yes:
        print(f"fogwhisk outbox purge: this deletes all {what} in {path}; "
              "run again with --yes", file=sys.stderr)
        return EXIT_USAGE
    if _refuse_if_open(path, "purge"):
        return EXIT_FAILURE
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute("DELETE FROM dead" if dead else "DELETE FROM rows").rowcount
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"purged {n} {what} from {path}")
    return EXIT_OK


def retry_dead(path: Path) -> int:
    """Move every dead letter back to its lane, behind what is waiting there.

    Goes through `Store.commit`, so topics and keys are interned and ids
    allocated exactly as the agent does. The dead rows are removed in a second
    transaction: a crash between the two leaves a message in both tables (sent
    again later: at least once, with the same idempotency key), never in none.
    """
    if _refuse_if_open(path, "retry-dead"):
        return EXIT_FAILURE
    store = Store(path, OutboxConfig())
    try:
        dead = store.db.execute(
            "SELECT id, lane, topic, key, qos, retain, created, expires, payload FROM dead "
            "ORDER BY id").fetchall()
        if not dead:
            print(f"no dead letters in {path}")
            return EXIT_OK
        now = time.time()
        inserts = [
            Outgoing(topic=topic, payload=bytes(payload), key=key, pipeline="", priority=lane,
                     ttl_s=(expires - created) if expires is not None else None, qos=qos,
                     retain=bool(retain), created=created)
            for _, lane, topic, key, qos, retain, created, expires, payload in dead]
        expired = sum(1 for r in dead if r[7] is not None and r[7] <= now)
        store.commit(inserts, [], [], 0, True)
        store.db.execute("BEGIN IMMEDIATE")
        store.db.executemany("DELETE FROM dead WHERE id = ?", [(r[0],) for r in dead])
        store.db.execute("COMMIT")
    finally:
        store.close()
    note = f" ({expired} already past their TTL: the agent will drop them)" if expired else ""
    print(f"moved {len(dead)} dead letters back to the outbox{note}")
    return EXIT_OK
