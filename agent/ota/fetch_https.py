"""Artifact download over HTTPS with Range, from the release's locations, into the
artifact's partial file (agent.ota.partial): a plain HTTP/1.1 client on asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from agent import __version__
from agent.errors import FetchError
from agent.ota.partial import Partial, Progress, Stall, run_download
from agent.ota.release import Release

log = logging.getLogger(__name__)

HTTP_BUFFER = 256 * 1024  # bytes gathered before one write
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
MAX_HEADER_LINES = 100


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
        return await run_download(release, dest_dir, progress,
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
        stall = Stall(self.stall_s, partial)
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
                   stall: Stall, progress: Progress) -> None:
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
                    length: int | None, stall: Stall, timer: asyncio.Timeout,
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
