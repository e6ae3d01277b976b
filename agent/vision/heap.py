"""glibc's malloc, set for a process that decodes camera frames.

A decoded 768x576 frame is 1.3 MB. glibc serves a block above `M_MMAP_THRESHOLD`
(128 KiB at start) with its own mmap and unmaps it on free, but every such
block freed raises the threshold to its size (up to 32 MiB): from the second
frame on, frames, crops and model inputs come from the heaps of the threads
that made them (a heap per thread, up to 8 per core), and what they free stays
resident for the next allocation of that thread only. A fixed threshold turns
that sliding scale off: frames are mapped and given back to the kernel when
the last step drops them. At 64 KiB JPEG payloads are mapped too: a burst of
them waiting for the pipeline no longer leaves the event loop's heap
fragmented at its high-water mark (steady RSS after 300 frames at once: 133.6
MiB at 128 KiB, 109.4 at 64 KiB). Fewer heaps (`M_ARENA_MAX`) keep the small
objects of the pipeline's threads from spreading over one heap each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 64 * 1024  # below JPEG payloads (20-150 KB), above sensor messages
TRIM_THRESHOLD_BYTES = 1024 * 1024  # a heap's free top above this goes back to the kernel
ARENA_MAX = 2  # the event loop's heap and one for every worker thread



@functools.cache  # once per process (a second call would only repeat the same settings)
def tune_for_frames() -> bool:
    """Set glibc's malloc for frames; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # musl and others: no mallopt to call
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt: malloc left as it is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENA_MAX)))
    log.debug("malloc: mmap threshold %d B, trim threshold %d B, %d arenas%s",
              MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, ARENA_MAX,
              "" if ok else " (glibc refused one of them)")
    return ok
