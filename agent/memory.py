"""Give the kernel back the file pages the agent needed only to start.

Importing NumPy, OpenCV and LiteRT maps about 60 MiB of their libraries' code and
read-only data into the process (the kernel maps whole 64 KiB runs around every page
touched while they initialise); afterwards a camera pipeline runs a small part of
it. On a Raspberry Pi Zero 2 W with ~400 MB usable, those pages are memory the
broker and the page cache do not get until the kernel is under pressure, and they
count against the unit's resident set. Once the agent is ready it asks the kernel
to page them out (`madvise(MADV_PAGEOUT)`, Linux 5.4+): clean file pages that only
this process maps are dropped, pages other processes share are left alone, and
what the pipelines use afterwards faults back in once (read from disk). Writable
mappings and anonymous memory are never touched, so nothing is lost; a kernel
without MADV_PAGEOUT just keeps the pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman-common.h
MIB = 1024 * 1024


def resident_file_kib() -> int | None:
    """RssFile of this process in KiB (None where /proc has no such line)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _read_only_file_mappings() -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or "w" in fields[1]:
            continue
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        spans.append((lo, hi - lo))
    return spans


def page_out_start_up() -> int:
    """Page out this process's read-only file mappings; the KiB the resident set shrank by."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = resident_file_kib()
    try:
        spans = _read_only_file_mappings()
    except OSError as exc:
        log.debug("memory: cannot read /proc/self/maps: %s", exc)
        return 0
    for start, length in spans:
        if libc.madvise(start, length, MADV_PAGEOUT) != 0:
            log.debug("memory: madvise(MADV_PAGEOUT) refused (errno %d): keeping the pages",
                      ctypes.get_errno())
            return 0
    after = resident_file_kib()
    if before is None or after is None:
        return 0
    released = max(0, before - after)
    log.info("memory: paged out %.1f MiB of start-up code and data (library pages now "
             "resident: %.1f MiB)", released / 1024, after / 1024)
    return released
