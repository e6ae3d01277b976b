"""Artifact download as MQTT chunks on the agent's own uplink (what `fogwhisk model push`
publishes), into the artifact's partial file (agent.ota.partial).

The uplink carries chunks of 64 KiB: give its Connection `max_packet_bytes` of at least
UPLINK_MAX_PACKET_BYTES (its default without a message handler only fits acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path

from agent.errors import ConnectError, FetchError
from agent.mqtt.connection import Connection, Inbound
from agent.ota.partial import Partial, Progress, Stall, run_download
from agent.ota.release import Release

CHUNK_BYTES = 64 * 1024  # what `fogwhisk model push` publishes
PACKET_OVERHEAD = 1024  # fixed header, topic, packet id and properties of one chunk
UPLINK_MAX_PACKET_BYTES = CHUNK_BYTES + PACKET_OVERHEAD
MIN_CHUNK_BYTES = 1024
WINDOW = 8  # chunk subscriptions outstanding at once: bounds memory and broker queues


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
        return await run_download(release, dest_dir, progress,
                                  lambda partial: self._download(partial, progress))

    async def _download(self, partial: Partial, progress: Progress) -> None:
        base = f"{self.prefix}/_artifacts/{partial.sha256}"
        inbox: asyncio.Queue[Inbound] = asyncio.Queue()  # bounded by the window
        stall = Stall(self.stall_s, partial)
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

    async def _next(self, inbox: asyncio.Queue[Inbound], stall: Stall, where: str) -> Inbound:
        try:
            return await asyncio.wait_for(inbox.get(), max(0.0, stall.left()))
        except TimeoutError:
            raise stall.error(where) from None

    async def _info(self, base: str, partial: Partial, inbox: asyncio.Queue[Inbound],
                    stall: Stall) -> int:
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
