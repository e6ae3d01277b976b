"""The artifact's partial file on disk, which both transports fill and either resumes.

One partial file per artifact in `dest_dir`, so either transport can resume what the
other began, after a cut link or a kill -9:

    <sha256>.part            the bytes so far, each at its offset (allocated at full size)
    <sha256>.progress.json   {"sha256", "size", "done": [[start, end], ...]}: byte ranges
                             written and fsync'd before this file was saved
    <sha256>.tar             the artifact, once its sha256 matched (the .part, renamed)

Bytes written after the last save are fetched again: the progress never claims more
than the disk holds. Nothing past the signed size is ever accepted (the endless-data
attack); a download that makes no progress for `stall_s` fails with "stalled" whatever
the connection thinks of itself. File writes and hashing run in worker threads so the
event loop, which also carries the agent's frames and events, stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import FetchError
from agent.ota.release import Release
from agent.ota.store import fsync_dir

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 20  # progress saved (after an fsync) every MiB ...
FLUSH_S = 1.0  # ... or every second, whichever comes first

Progress = Callable[[int, int], None]  # (bytes on disk, signed size)
T = TypeVar("T")


class Partial:
    """One artifact's bytes on disk and which of them are there.

    Every file operation runs in the partial's own worker thread (disk I/O and hashing
    off the loop), one after the other: a cancelled fetch cannot close the descriptor
    under a write still in flight.
    """

    def __init__(self, dest_dir: Path, sha256: str, size: int) -> None:
        self.dest_dir = dest_dir
        self.sha256 = sha256
        self.size = size
        self.part = dest_dir / f"{sha256}.part"
        self.progress = dest_dir / f"{sha256}.progress.json"
        self.final = dest_dir / f"{sha256}.tar"
        self.done: list[list[int]] = []  # sorted, merged [start, end) byte ranges
        self.fetched = 0  # bytes new to the file in this process (a resume fetches less)
        self._fd = -1
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ota-fetch")
        self._unsaved = 0
        self._saved_at = 0.0

    @classmethod
    async def open(cls, dest_dir: Path, sha256: str, size: int) -> Partial:
        p = cls(dest_dir, sha256, size)
        try:
            await p._in_io(p._open)
        except BaseException:
            p._io.shutdown(wait=False)
            raise
        return p

    async def _in_io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _open(self) -> None:
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        self.done = self._load()
        if not self.done:
            with contextlib.suppress(FileNotFoundError):
                self.part.unlink()
        try:
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)
            if self.size:  # fail now, not at 90 %, when the disk cannot hold it
                os.posix_fallocate(self._fd, 0, self.size)
        except OSError as exc:
            self._discard()  # a file of the full size would hold the disk for nothing
            raise FetchError(f"no room for {self.size:,} bytes in {self.dest_dir}: "
                             f"{exc.strerror or exc}") from exc
        self._saved_at = time.monotonic()

    def _load(self) -> list[list[int]]:
        """The saved ranges, or [] when there are none that fit this artifact."""
        try:
            doc = json.loads(self.progress.read_bytes())
            if (doc["sha256"] != self.sha256 or doc["size"] != self.size
                    or os.stat(self.part).st_size != self.size):
                raise ValueError("another artifact")
            done = [[int(a), int(b)] for a, b in doc["done"]]
            if any(not 0 <= a < b <= self.size for a, b in done):
                raise ValueError("a range outside the artifact")
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ota: progress of %s unusable (%s): starting over", self.sha256[:12],
                        exc)
            return []
        merged: list[list[int]] = []
        for a, b in sorted(done):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return merged

    @property
    def have(self) -> int:
        return sum(b - a for a, b in self.done)

    @property
    def discarded(self) -> bool:
        return self._fd < 0

    @property
    def complete(self) -> bool:
        return self.have == self.size

    def covers(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self.done)

    def first_gap(self) -> int:
        """The offset of the first byte not yet here (size when complete)."""
        return self.done[0][1] if self.done and self.done[0][0] == 0 else 0

    async def write(self, offset: int, data: bytes) -> None:
        """Put `data` at `offset`; refuses anything past the signed size."""
        end = offset + len(data)
        if end > self.size:
            raise FetchError(f"more bytes than the signed size: bytes up to {end:,} "
                             f"offered, the release signs {self.size:,}")
        await self._in_io(self._pwrite, offset, data)
        new = len(data) - self._overlap(offset, end)
        self.fetched += new
        self._unsaved += new
        self._add(offset, end)
        if self._unsaved >= FLUSH_BYTES or time.monotonic() - self._saved_at >= FLUSH_S:
            await self.save()

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                raise FetchError(f"cannot write {self.part}: {exc.strerror or exc}") from exc
            view, offset = view[n:], offset + n

    def _overlap(self, start: int, end: int) -> int:
        return sum(max(0, min(end, b) - max(start, a)) for a, b in self.done)

    def _add(self, start: int, end: int) -> None:
        merged: list[list[int]] = []
        for a, b in sorted([*self.done, [start, end]]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.done = merged

    async def save(self) -> None:
        """fsync the data, then record which ranges it holds (write, fsync, rename)."""
        done = [list(r) for r in self.done]
        self._unsaved, self._saved_at = 0, time.monotonic()
        await self._in_io(self._save, done)

    def _save(self, done: list[list[int]]) -> None:
        if self._fd < 0:
            return
        os.fsync(self._fd)
        tmp = self.progress.with_suffix(".tmp")
        doc = json.dumps({"sha256": self.sha256, "size": self.size, "done": done})
        with open(tmp, "w") as f:
            f.write(doc)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.progress)
        fsync_dir(self.dest_dir)

    async def finish(self) -> Path:
        """Hash the whole file; on a match rename it to `final`, else remove it."""
        await self.save()
        got = await self._in_io(_sha256_of, self.part)
        if got != self.sha256:
            await self.discard()
            raise FetchError(f"sha256 mismatch: the {self.size:,} bytes fetched hash to "
                             f"{got[:16]}..., the release signs {self.sha256[:16]}...")
        await self._in_io(self._promote)
        return self.final

    def _promote(self) -> None:
        self._close()
        os.replace(self.part, self.final)
        with contextlib.suppress(FileNotFoundError):
            self.progress.unlink()
        fsync_dir(self.dest_dir)

    async def discard(self) -> None:
        """Forget everything fetched (after bad bytes: nothing of it is trusted)."""
        self.done = []
        await self._in_io(self._discard)

    def _discard(self) -> None:
        self._close()
        for p in (self.part, self.progress):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def close(self) -> None:
        try:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    await self.save()
                await self._in_io(self._close)
        finally:
            self._io.shutdown(wait=False)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


async def _already_there(dest_dir: Path, sha256: str, size: int) -> Path | None:
    """A final file from an earlier run that still matches (else it is removed)."""
    final = dest_dir / f"{sha256}.tar"

    def check() -> bool:
        try:
            if final.stat().st_size == size and _sha256_of(final) == sha256:
                return True
        except FileNotFoundError:
            return False
        final.unlink()
        return False

    return final if await asyncio.to_thread(check) else None


class Stall:
    """The deadline that moves with every byte: no progress for `stall_s` is a failure."""

    def __init__(self, stall_s: float, partial: Partial) -> None:
        self.stall_s = stall_s
        self.partial = partial
        self.deadline = time.monotonic() + stall_s

    def moved(self) -> None:
        self.deadline = time.monotonic() + self.stall_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def error(self, where: str) -> FetchError:
        return FetchError(f"stalled: no bytes {where} for {self.stall_s:g} s, at "
                          f"{self.partial.have:,} of {self.partial.size:,}")


async def run_download(release: Release, dest_dir: Path, progress: Progress,
                       download: Callable[[Partial], Any]) -> Path:
    """The artifact from an earlier run if it still matches, else its partial file resumed,
    filled by `download` and checked against the signed sha256 (what both fetchers run)."""
    sha, size = release.artifact_sha256, release.artifact_size
    done = await _already_there(dest_dir, sha, size)
    if done is not None:
        progress(size, size)
        return done
    partial = await Partial.open(dest_dir, sha, size)
    try:
        if partial.have:
            log.info("ota: resuming %s at %d of %d bytes", sha[:12], partial.have, size)
        progress(partial.have, size)
        if not partial.complete:
            await download(partial)
        return await partial.finish()
    finally:
        await partial.close()
