"""Give the kernel back the file pages the agent needed only to start.

Importing NumPy, OpenCV and LiteRT maps about 60 MiB of their libraries' code and
read-only data into the process (the kernel maps whole 64 KiB runs around every page
touched while they initialise); afterwards a camera pipeline runs a small part of
it. On a Raspberry Pi Zero 2 W with ~400 MB usable, those pages count against the
unit's resident set and are the last the kernel reclaims while they stay mapped.
Once the agent is ready it unmaps them: first `MADV_PAGEOUT` (Linux 5.4+) drops the
pages only this process maps from memory altogether, then `MADV_DONTNEED` unmaps
what other processes share (it stays in the page cache for them). What the
pipelines use afterwards faults back in once.

Only read-only file mappings without a single private (copy-on-write) page are
touched: their contents are exactly the file's, so the next access finds the same
bytes. Writable mappings, relocated read-only data and anonymous memory are never
touched, so nothing is lost; a kernel that refuses just keeps the pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # linux/mman-common.h
MADV_PAGEOUT = 21


def resident_file_kib() -> int | None:
    """RssFile of this process in KiB (None where /proc has no such line)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _clean_read_only_file_mappings() -> list[tuple[int, int]]:
    """(start, length) of read-only file mappings that hold no copy-on-write page."""
    spans: list[tuple[int, int]] = []
    span: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            span = None
            path = fields[5] if len(fields) == 6 else ""
            # Files only: a device's mapping (a camera's buffers, a GPU's) is not page cache.
            if path.startswith("/") and not path.startswith("/dev/") and "w" not in fields[1]:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                span = (lo, hi - lo)
        elif span is not None and fields[0] == "Anonymous:":
            if int(fields[1]) == 0:
                spans.append(span)
            span = None
    return spans


def page_out_start_up(*, quiet: bool = False) -> int:
    """Unmap this process's clean read-only file mappings; KiB the resident set shrank by.

    `quiet` logs the figure at debug (a step of start-up, not its end)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = resident_file_kib()
    try:
        spans = _clean_read_only_file_mappings()
    except OSError as exc:
        log.debug("memory: cannot read /proc/self/smaps: %s", exc)
        return 0
    refused = errno = 0
    for advice in (MADV_PAGEOUT, MADV_DONTNEED):
        for start, length in spans:
            if libc.madvise(start, length, advice) != 0:  # that mapping keeps its pages
                refused += 1
                errno = ctypes.get_errno()
    if refused:
        log.debug("memory: madvise refused %d time(s) (last errno %d): those pages stay",
                  refused, errno)
    after = resident_file_kib()
    if before is None or after is None:
        return 0
    released = max(0, before - after)
    log.log(logging.DEBUG if quiet else logging.INFO, "memory: unmapped %.1f MiB of start-up "
            "library pages (library pages now resident: %.1f MiB)", released / 1024, after / 1024)
    return released
