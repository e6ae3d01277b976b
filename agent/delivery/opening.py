"""Opening the outbox's file, waiting (bounded) while another process holds its lock.

Two agents on one data directory, or an operator's `sqlite3 outbox.db`, hold the
file's lock: a start waits up to `OPEN_BUSY_S` without touching it, saying every
ten seconds who holds it (Linux /proc), rather than fail at once or write beside it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from agent.config import OutboxConfig
from agent.delivery.store import Store, holders
from agent.delivery.writer import Writer
from agent.errors import OutboxBusyError, OutboxError

log = logging.getLogger(__name__)

RETRY_S = 0.5
OPEN_BUSY_S = 60.0  # how long a start waits for another process's lock on the file


async def open_store(writer: Writer, path: Path,
                     cfg: OutboxConfig) -> tuple[Store, int, int, list[int]]:
    """The store at `path` on the writer thread, with its totals (count, bytes, lanes).

    Raises ConfigError when the file cannot be written (it is kept: exit 2),
    OutboxError for anything else that keeps it from opening.
    """
    waited = 0.0
    while True:
        store: Store | None = None
        try:
            store = await writer.call(Store, path, cfg)
            count, nbytes, lanes = await writer.call(store.totals)
        except OutboxError as exc:
            if store is not None:
                store.close()
            if not isinstance(exc, OutboxBusyError) or waited >= OPEN_BUSY_S:
                raise OutboxError(f"cannot open the outbox at {path}: {exc}"
                                  f"{by_whom(path)}") from exc
            if waited == 0 or waited % 10 < RETRY_S:
                log.warning("outbox %s is locked by another process%s; waiting (up to "
                            "%.0f s) without touching it", path, by_whom(path), OPEN_BUSY_S)
            await asyncio.sleep(RETRY_S)
            waited += RETRY_S
        else:
            return store, count, nbytes, lanes


def by_whom(path: Path) -> str:
    """" (held by pid 123: sqlite3 outbox.db)", or "" when no holder is found."""
    found = holders(path)
    return f" (held by {', '.join(f'pid {pid}: {cmd}' for pid, cmd in found)})" if found else ""
