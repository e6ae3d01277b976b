"""The outbox's disk: free space against `min_free_bytes`, the reserve, a full disk.

The store keeps a reserve of disk (`Store.reserve`). When a commit fails on a
full disk the outbox recovers (`full`): the reserve goes back to the file system,
deletes go in transactions sized to the free disk, freed pages go back to it, and
inserts go in small batches; once the disk has room again the reserve is made
again and commits return to their usual size.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from agent.config import OutboxConfig
from agent.delivery.store import BALLAST_BYTES, PAGE_BYTES, Store
from agent.delivery.writer import Writer
from agent.errors import OutboxError

log = logging.getLogger(__name__)

DISK_CHECK_S = 1.0
SHRINK_STEPS = 8  # incremental vacuum steps per commit while recovering


class Disk:
    """Free space on the outbox's file system, looked at once a second at most."""

    def __init__(self, path: Path, cfg: OutboxConfig) -> None:
        self.path = path  # the outbox's file
        self.cfg = cfg
        self.free = 1 << 62
        self.checked = -DISK_CHECK_S
        self.reserved = True  # the store holds its reserve
        self.full = False  # the last commit failed: free space (deletes) before inserting

    def say(self, store: Store) -> None:
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

    def low(self, store: Store | None) -> bool:
        """Free disk below `min_free_bytes`; makes the reserve again once there is room."""
        now = time.monotonic()
        if now - self.checked > DISK_CHECK_S:
            self.checked = now
            try:
                st = os.statvfs(self.path.parent)
                self.free = st.f_bavail * st.f_frsize
                if (self.full or not self.reserved) and store is not None and \
                        self.free > 2 * store.reserve_bytes + store.batch_bytes:
                    # Blocking but short: one fallocate once the disk has room again.
                    self.reserved = store.reserve()
                    if self.full and (self.reserved or not store.reserve_bytes):
                        log.info("outbox: disk space is back%s", "; reserve restored"
                                 if self.reserved else "")
                        self.full = False
            except OSError:
                self.free = 1 << 62
        return self.free < self.cfg.min_free_bytes

    def free_now(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return int(st.f_bavail * st.f_frsize)

    async def release(self, store: Store, writer: Writer) -> None:
        """The disk is full: give the reserve back to the file system (once)."""
        if await writer.call(store.release):
            self.reserved = False
            log.error("outbox: the disk is full; released the %d kB reserve to recover. "
                      "Free disk space: nothing is acknowledged until rows commit again.",
                      store.reserve_bytes >> 10)

    async def shrink(self, store: Store, writer: Writer) -> None:
        """While recovering from a full disk: give the pages deletes freed back to the disk.

        Otherwise the file keeps its high-water size, the disk stays full and the
        reserve can never be made again. Keeps a few batches' worth for inserts.
        """
        keep = 2 * store.batch_bytes
        step = max(16, store.reserve_bytes // 4 // PAGE_BYTES)
        try:
            for _ in range(SHRINK_STEPS):
                if not await writer.call(lambda: store.shrink(keep, step)):
                    break
        except OutboxError as exc:
            log.warning("outbox: giving free pages back failed: %s", exc)
