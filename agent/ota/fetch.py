"""Artifact download for OTA model updates: MQTT chunks on the uplink, or HTTPS with Range.

Both transports write into one partial file per artifact in `dest_dir`, so either can
resume what the other began, after a cut link or a kill -9:

    <sha256>.part            the bytes so far, each at its offset (allocated at full size)
    <sha256>.progress.json   {"sha256", "size", "done": [[start, end], ...]}: byte ranges
                             written and fsync'd before this file was saved
    <sha256>.tar             the artifact, once its sha256 matched (the .part, renamed)

Bytes written after the last save are fetched again: the progress never claims more
than the disk holds. Nothing past the signed size is ever accepted (the endless-data
attack); a download that makes no progress for `stall_s` fails with "stalled" whatever
the connection thinks of itself. File writes and hashing run in worker threads so the
event loop, which also carries the agent's frames and events, stays responsive.

The uplink carries chunks of 64 KiB: give its Connection `max_packet_bytes` of at least
UPLINK_MAX_PACKET_BYTES (its default without a message handler only fits acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from agent import __version__
from agent.errors import ConnectError, FetchError
from agent.mqtt.connection import Connection, Inbound
from agent.ota.release import Release

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # what `fogwhisk model push` publishes
PACKET_OVERHEAD = 1024  # fixed header, topic, packet id and properties of one chunk
UPLINK_MAX_PACKET_BYTES = CHUNK_BYTES + PACKET_OVERHEAD
MIN_CHUNK_BYTES = 1024
WINDOW = 8  # chunk subscriptions outstanding at once: bounds memory and broker queues
FLUSH_BYTES = 1 << 20  # progress saved (after an fsync) every MiB ...
FLUSH_S = 1.0  # ... or every second, whichever comes first
HTTP_BUFFER = 256 * 1024  # bytes gathered before one write
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
MAX_HEADER_LINES = 100

Progress = Callable[[int, int], None]  # (bytes on disk, signed size)
T = TypeVar("T")


class Fetcher(Protocol):
    async def fetch(self, release: Release, dest_dir: Path, progress: Progress) -> Path:
        """The complete artifact's path: size and sha256 equal the release's."""
        ...


# -- the partial file ------------------------------------------------------------------


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
        _fsync_dir(self.dest_dir)

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
        _fsync_dir(self.dest_dir)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class _Stall:
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


async def _run(release: Release, dest_dir: Path, progress: Progress,
               download: Callable[[Partial], Any]) -> Path:
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


# -- MQTT chunks on the uplink ------------------------------------------------------------


class MqttChunkFetcher:
    """Chunks from `<prefix>/_artifacts/<sha256>/<index>` (retained, QoS 1) on the agent's
    own uplink: works wherever the device reaches its broker.

    Subscribes to `.../info`, then to the missing chunks by their exact topics, `window`
    at a time (each subscription brings its retained chunk; after a reconnect the
    connection subscribes again, so the chunks in flight come again), and unsubscribes
    from each once written.
    """

    def __init__(self, conn: Connection, prefix: str = "fog", stall_s: float = 60,
                 window: int = WINDOW) -> None:
        self.conn = conn
        self.prefix = prefix
        self.stall_s = stall_s
        self.window = max(1, window)
        self.fetched_bytes = 0  # new bytes written in this process, over all fetches

    async def fetch(self, release: Release, dest_dir: Path, progress: Progress) -> Path:
        return await _run(release, dest_dir, progress,
                          lambda partial: self._download(partial, progress))

    async def _download(self, partial: Partial, progress: Progress) -> None:
        base = f"{self.prefix}/_artifacts/{partial.sha256}"
        inbox: asyncio.Queue[Inbound] = asyncio.Queue()  # bounded by the window
        stall = _Stall(self.stall_s, partial)
        subscribed: list[str] = []

        async def subscribe(filters: list[str]) -> None:
            subscribed.extend(filters)
            try:
                await self.conn.subscribe(tuple((f, 1) for f in filters), inbox.put_nowait)
            except ConnectError as exc:
                raise FetchError(str(exc)) from exc

        before = partial.fetched
        try:
            await subscribe([f"{base}/info"])
            chunk_bytes = await self._info(base, partial, inbox, stall)
            wanted = [i for i in range(math.ceil(partial.size / chunk_bytes))
                      if not partial.covers(i * chunk_bytes,
                                            min(partial.size, (i + 1) * chunk_bytes))]
            outstanding: set[int] = set()
            finished: list[str] = []
            while wanted or outstanding:
                if len(outstanding) <= self.window // 2 and wanted:
                    batch, wanted = wanted[:self.window - len(outstanding)], \
                        wanted[self.window - len(outstanding):]
                    if finished:
                        await self._unsubscribe(finished, subscribed)
                        finished = []
                    outstanding.update(batch)
                    await subscribe([f"{base}/{i}" for i in batch])
                msg = await self._next(inbox, stall, "on the chunk topics")
                index = _chunk_index(msg.topic, base)
                if index is None or index not in outstanding:
                    msg.ack()  # the info again, or a chunk already written
                    continue
                await self._chunk(partial, index, chunk_bytes, msg.payload)
                msg.ack()
                outstanding.discard(index)
                finished.append(msg.topic)
                stall.moved()
                progress(partial.have, partial.size)
        finally:
            self.fetched_bytes += partial.fetched - before
            with contextlib.suppress(ConnectError):
                await self._unsubscribe(list(subscribed), subscribed)
            while not inbox.empty():
                inbox.get_nowait().ack()

    async def _unsubscribe(self, filters: list[str], subscribed: list[str]) -> None:
        for f in filters:
            subscribed.remove(f)
        await self.conn.unsubscribe(tuple(filters))

    async def _next(self, inbox: asyncio.Queue[Inbound], stall: _Stall, where: str) -> Inbound:
        try:
            return await asyncio.wait_for(inbox.get(), max(0.0, stall.left()))
        except TimeoutError:
            raise stall.error(where) from None

    async def _info(self, base: str, partial: Partial, inbox: asyncio.Queue[Inbound],
                    stall: _Stall) -> int:
        """Wait for the retained chunk info and check it against the release."""
        topic = f"{base}/info"
        while True:
            msg = await self._next(inbox, stall, f"and no chunk info on {topic} (pushed? "
                                   "readable by this device?)")
            msg.ack()
            if msg.topic == topic:
                break
        try:
            doc = json.loads(msg.payload)
            size, chunk_bytes, chunks = (int(doc["size"]), int(doc["chunk_bytes"]),
                                         int(doc["chunks"]))
            named = str(doc["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"the chunk info on {topic} is unreadable: {exc}") from None
        if named != partial.sha256:
            raise FetchError(f"the chunk info on {topic} names artifact {named[:16]}...")
        if size > partial.size:
            await partial.discard()
            raise FetchError(f"more bytes than the signed size: the chunk info on {topic} "
                             f"announces {size:,}, the release signs {partial.size:,}")
        if size != partial.size:
            raise FetchError(f"the chunk info on {topic} announces {size:,} bytes, the "
                             f"release signs {partial.size:,}")
        if chunk_bytes < MIN_CHUNK_BYTES or chunks != math.ceil(size / chunk_bytes):
            raise FetchError(f"the chunk info on {topic} is inconsistent: {chunks} chunks "
                             f"of {chunk_bytes} bytes for {size:,} bytes")
        if chunk_bytes + PACKET_OVERHEAD > self.conn.max_packet:
            raise FetchError(f"chunks of {chunk_bytes:,} bytes do not fit the uplink's "
                             f"maximum packet size of {self.conn.max_packet:,} bytes")
        stall.moved()
        return chunk_bytes

    async def _chunk(self, partial: Partial, index: int, chunk_bytes: int,
                     payload: bytes) -> None:
        start = index * chunk_bytes
        end = start + len(payload)
        expected = min(chunk_bytes, partial.size - start)
        if end > partial.size:
            await partial.discard()
            raise FetchError(f"more bytes than the signed size: chunk {index} of "
                             f"{len(payload):,} bytes ends at {end:,}, the release signs "
                             f"{partial.size:,}")
        if len(payload) != expected:
            await partial.discard()
            raise FetchError(f"chunk {index} has {len(payload):,} bytes, expected "
                             f"{expected:,}")
        await partial.write(start, payload)


def _chunk_index(topic: str, base: str) -> int | None:
    tail = topic[len(base) + 1:] if topic.startswith(base + "/") else ""
    return int(tail) if tail.isdigit() and tail == str(int(tail)) else None


# -- HTTPS with Range -----------------------------------------------------------------------


class _Retry(Exception):
    """A transport failure worth another request from where the file stands."""


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpsFetcher:
    """GET with `Range: bytes=<have>-` from each of `release.locations` in turn.

    Like Mender, a resumed response must say (Content-Range) that it starts where the
    file stands and that the total did not change. A cut connection is retried at once
    and then with backoff for as long as bytes keep coming; `stall_s` without a byte
    moves on to the next location.
    """

    def __init__(self, ca: Path | None, stall_s: float = 60) -> None:
        self.ca = ca
        self.stall_s = stall_s
        self.fetched_bytes = 0
        self._ssl: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        """The system's trusted CAs plus `ca` (a private CA beside a public CDN; the
        artifact's integrity comes from the signed sha256 either way)."""
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if self.ca is not None:
                ctx.load_verify_locations(cafile=str(self.ca))
            self._ssl = ctx
        return self._ssl

    async def fetch(self, release: Release, dest_dir: Path, progress: Progress) -> Path:
        if not release.locations:
            raise FetchError("the release names no https location")
        return await _run(release, dest_dir, progress,
                          lambda partial: self._download(partial, release.locations,
                                                         progress))

    async def _download(self, partial: Partial, urls: Sequence[str],
                        progress: Progress) -> None:
        """Each location in turn; bad bytes (the partial is then gone) end the attempt."""
        reasons: list[str] = []
        for url in urls:
            before = partial.fetched
            try:
                await self._from(url, partial, progress)
                return
            except FetchError as exc:
                reasons.append(f"{_shown(url)}: {exc.reason}")
                if partial.discarded:
                    break
                log.warning("ota: %s", reasons[-1])
            finally:
                self.fetched_bytes += partial.fetched - before
        raise FetchError("; ".join(reasons))

    async def _from(self, url: str, partial: Partial, progress: Progress) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise FetchError("not an https:// URL")
        stall = _Stall(self.stall_s, partial)
        attempt = 0
        while not partial.complete:
            have = partial.have
            try:
                await self._get(parts.hostname, parts.port or 443,
                                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                                partial, stall, progress)
            except _Retry as exc:
                if stall.left() <= 0:
                    raise stall.error(f"from {_shown(url)}") from None
                attempt = 0 if partial.have > have else attempt + 1
                delay = min(stall.left(), RETRY_MAX_S, RETRY_MIN_S * 2 ** attempt)
                log.info("ota: %s: %s; again from byte %d in %.1f s", _shown(url), exc,
                         partial.first_gap(), delay * (attempt > 0))
                if attempt:
                    await asyncio.sleep(delay)

    async def _get(self, host: str, port: int, target: str, partial: Partial,
                   stall: _Stall, progress: Progress) -> None:
        """One request for everything from the first missing byte to the end."""
        offset = partial.first_gap()
        try:
            async with asyncio.timeout(max(0.0, stall.left())) as timer:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._tls(), server_hostname=host)
                try:
                    writer.write(_request(host, port, target, offset))
                    status, headers = await _head(reader)
                    start, length = _check(status, headers, offset, partial.size)
                    await self._body(reader, partial, start, length, stall, timer, progress)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                        await asyncio.wait_for(writer.wait_closed(), 1.0)
        except TimeoutError:
            raise _Retry(f"no bytes for {self.stall_s:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise FetchError(f"TLS: {exc.verify_message or exc}") from None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Retry(str(exc) or type(exc).__name__) from None

    async def _body(self, reader: asyncio.StreamReader, partial: Partial, start: int,
                    length: int | None, stall: _Stall, timer: asyncio.Timeout,
                    progress: Progress) -> None:
        pos, end = start, (start + length if length is not None else None)
        buf = bytearray()
        while end is None or pos + len(buf) < end:
            want = HTTP_BUFFER if end is None else min(HTTP_BUFFER, end - pos - len(buf))
            data = await reader.read(want)
            if not data:
                break
            if pos + len(buf) + len(data) > partial.size:
                await partial.discard()
                raise FetchError(f"more bytes than the signed size: the server sent past "
                                 f"byte {partial.size:,}")
            buf += data
            stall.moved()  # any byte is progress; a trickle is not a stall
            timer.reschedule(asyncio.get_running_loop().time() + self.stall_s)
            if len(buf) >= HTTP_BUFFER:
                pos = await self._keep(partial, pos, buf, progress)
        if buf:
            pos = await self._keep(partial, pos, buf, progress)
        if end is not None and pos < end:
            raise _Retry(f"the connection ended at byte {pos:,} of {end:,}")
        if end is None and pos < partial.size:
            raise _Retry(f"the body ended at byte {pos:,} of {partial.size:,}")

    async def _keep(self, partial: Partial, pos: int, buf: bytearray,
                    progress: Progress) -> int:
        await partial.write(pos, bytes(buf))
        pos += len(buf)
        buf.clear()
        progress(partial.have, partial.size)
        return pos


def _request(host: str, port: int, target: str, offset: int) -> bytes:
    hostport = host if port == 443 else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        hostport = f"[{host}]" if port == 443 else f"[{host}]:{port}"
    lines = [f"GET {target} HTTP/1.1", f"Host: {hostport}",
             f"User-Agent: fogwhisk/{__version__}", "Accept-Encoding: identity",
             "Connection: close"]
    if offset:
        lines.append(f"Range: bytes={offset}-")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        line = await reader.readuntil(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
        if m is None:
            raise FetchError(f"not an HTTP response: {line[:60]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                return int(m.group(1)), headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    except asyncio.LimitOverrunError:
        raise FetchError("an HTTP header line longer than 64 KiB") from None
    raise FetchError(f"more than {MAX_HEADER_LINES} HTTP header lines")


def _check(status: int, headers: dict[str, str], offset: int,
           size: int) -> tuple[int, int | None]:
    """Where the body starts and how long it is; refuses what does not fit the release."""
    if "transfer-encoding" in headers:
        raise FetchError(f"Transfer-Encoding {headers['transfer-encoding']} (a static file "
                         "with a Content-Length is expected)")
    length = headers.get("content-length")
    n = int(length) if length is not None and length.isdigit() else None
    if status == 206:
        m = _CONTENT_RANGE.fullmatch(headers.get("content-range", ""))
        if m is None:
            raise FetchError(f"206 without a usable Content-Range "
                             f"({headers.get('content-range')!r})")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) > size:
            raise FetchError(f"more bytes than the signed size: Content-Range total "
                             f"{int(total):,}, the release signs {size:,}")
        if total != str(size):
            raise FetchError(f"the total size changed: Content-Range {m.group(0)!r}, the "
                             f"release signs {size:,}")
        if first != offset or last != size - 1 or (n is not None and n != last - first + 1):
            raise FetchError(f"Content-Range {m.group(0)!r} is not the range asked for "
                             f"(bytes {offset}-{size - 1})")
        return first, last - first + 1
    if status == 200:
        if n is not None and n > size:
            raise FetchError(f"more bytes than the signed size: Content-Length {n:,}, "
                             f"the release signs {size:,}")
        if n is not None and n != size:
            raise FetchError(f"Content-Length {n:,}, the release signs {size:,}")
        if offset:
            log.info("ota: the server ignored Range: fetching from byte 0 again")
        return 0, n
    if status in (408, 425, 429) or status >= 500:
        raise _Retry(f"HTTP {status}")
    raise FetchError(f"HTTP {status}")


def _shown(url: str) -> str:
    """The URL without credentials or query (a signed URL's token stays out of logs)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}{p.path}"


# -- either -----------------------------------------------------------------------------


async def fetch_any(release: Release, dest_dir: Path, fetchers: Sequence[Fetcher],
                    progress: Progress) -> Path:
    """HTTPS first when the release names locations and an HttpsFetcher is given, then
    the others (MQTT chunks); what one fetched the next resumes."""
    https = [f for f in fetchers if isinstance(f, HttpsFetcher)]
    ordered = ([*https] if release.locations else []) + [
        f for f in fetchers if not isinstance(f, HttpsFetcher)]
    if not ordered:
        raise FetchError("no way to fetch: no MQTT fetcher and no https location")
    reasons: list[str] = []
    for fetcher in ordered:
        try:
            return await fetcher.fetch(release, dest_dir, progress)
        except FetchError as exc:
            reasons.append(exc.reason)
            if fetcher is not ordered[-1]:
                log.warning("ota: %s failed (%s); trying %s", type(fetcher).__name__,
                            exc.reason, type(ordered[ordered.index(fetcher) + 1]).__name__)
    raise FetchError("; then ".join(reasons))
