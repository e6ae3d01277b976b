"""Artifact download for OTA model updates: MQTT chunks on the uplink, or HTTPS with Range.

Both transports write into one partial file per artifact (agent.ota.partial: the bytes,
their progress on disk, the stall deadline), so either can resume what the other began,
after a cut link or a kill -9. The transports are `MqttChunkFetcher`
(agent.ota.fetch_mqtt) and `HttpsFetcher` (agent.ota.fetch_https); `fetch_any` tries them
in turn. Their names are re-exported here, where the controller and the push look them up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent.errors import FetchError
from agent.ota.fetch_https import HttpsFetcher
from agent.ota.fetch_mqtt import (
    CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    PACKET_OVERHEAD,
    UPLINK_MAX_PACKET_BYTES,
    WINDOW,
    MqttChunkFetcher,
)
from agent.ota.partial import Partial, Progress
from agent.ota.release import Release

__all__ = ["CHUNK_BYTES", "MIN_CHUNK_BYTES", "PACKET_OVERHEAD", "UPLINK_MAX_PACKET_BYTES",
           "WINDOW", "Fetcher", "HttpsFetcher", "MqttChunkFetcher", "Partial", "Progress",
           "fetch_any"]

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    async def fetch(self, release: Release, dest_dir: Path, progress: Progress) -> Path:
        """The complete artifact's path: size and sha256 equal the release's."""
        ...


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
