"""The artifact download: MQTT chunks on the agent's own uplink Connection and HTTPS with
Range from a real nginx; resumable after a cut link and after kill -9, never more bytes
than the signed size, stalls detected, the event loop kept free.

Every broker is a real Mosquitto, every web server a real nginx, every fault real (a TCP
proxy cut or blackholed, SIGKILL of the fetching process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from brokers import ROOT, Broker, Certs
from helpers import connect, make_client
from nginx import Nginx
from proxy import Proxy

from agent.config import BrokerConfig
from agent.errors import FetchError
from agent.mqtt.connection import Connection
from agent.ota.fetch import (
    CHUNK_BYTES,
    UPLINK_MAX_PACKET_BYTES,
    HttpsFetcher,
    MqttChunkFetcher,
    fetch_any,
)
from agent.ota.release import Policy, Release
from agent.schema import Duration
from agent.telemetry import Telemetry

WAIT_S = 20.0
MB = 1_000_000


def artifact(size: int, seed: int = 1) -> bytes:
    """Incompressible bytes of `size` (a real tar would be too, mostly)."""
    out = bytearray()
    block = hashlib.sha256(f"seed {seed}".encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def release_for(data: bytes, locations: tuple[str, ...] = ()) -> Release:
    """A release naming `data` (the fetcher reads only sha256, size and locations)."""
    return Release(
        name="shapes", version=2, expires=datetime.now(UTC) + timedelta(days=1),
        artifact_sha256=hashlib.sha256(data).hexdigest(), artifact_size=len(data),
        model_sha256="0" * 64, inputs=(), outputs=(), labels_sha256="0" * 64,
        policy=Policy(), locations=locations, raw=b"{}")


def chunk_messages(data: bytes, prefix: str = "fog",
                   chunk_bytes: int = CHUNK_BYTES) -> dict[str, bytes]:
    """The retained messages `fogwhisk model push` leaves on the broker for `data`."""
    sha = hashlib.sha256(data).hexdigest()
    base = f"{prefix}/_artifacts/{sha}"
    n = math.ceil(len(data) / chunk_bytes)
    out = {f"{base}/{i}": data[i * chunk_bytes:(i + 1) * chunk_bytes] for i in range(n)}
    out[f"{base}/info"] = json.dumps({"size": len(data), "chunk_bytes": chunk_bytes,
                                      "chunks": n, "sha256": sha}).encode()
    return out


def retain(url: str, messages: dict[str, bytes]) -> None:
    """Publish each message retained, QoS 1, and wait for every PUBACK."""
    client = make_client(url)
    client.max_inflight_messages_set(64)
    connect(client, url)
    try:
        infos = [client.publish(t, p, qos=1, retain=True) for t, p in messages.items()]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def uplink(url: str, max_packet_bytes: int = UPLINK_MAX_PACKET_BYTES) -> Connection:
    cfg = BrokerConfig(url=url, reconnect_min_s=Duration(0.05), reconnect_max_s=Duration(0.2),
                       connect_timeout_s=Duration(5))
    return Connection("uplink", cfg, "fogwhisk-dev1-uplink", Telemetry(),
                      max_packet_bytes=max_packet_bytes)


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[Connection]:
    task = asyncio.create_task(conn.run())
    try:
        await asyncio.wait_for(conn.connected.wait(), WAIT_S)
        yield conn
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class LoopLag:
    """How late a 5 ms timer fires while something else runs on the loop."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            self.lags_ms.append((loop.time() - t - 0.005) * 1000)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def p99(self) -> float:
        return statistics.quantiles(self.lags_ms, n=100)[98]


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


@pytest.fixture
def web(tmp_path: Path, certs: Certs) -> Iterator[Nginx]:
    with Nginx(tmp_path / "nginx", certs) as n:
        yield n


@pytest.fixture
def slow_web(tmp_path: Path, certs: Certs) -> Iterator[Nginx]:
    """nginx sending each response at 4 MB/s, so a test can act in the middle of one."""
    with Nginx(tmp_path / "nginx-slow", certs, limit_rate="4m") as n:
        yield n


# -- MQTT chunks --------------------------------------------------------------------------


def test_a_5_mb_artifact_arrives_over_mqtt_chunks_verified_with_the_loop_kept_free(
        broker: Broker, tmp_path: Path) -> None:
    """Chunks retained on the broker are fetched over a live uplink Connection into
    dest_dir, verified and renamed; progress is reported up to the size; the fetcher
    unsubscribes at the end. The event loop's lag p99 is printed (bench material)."""
    data = artifact(5 * MB)
    retain(broker.url, chunk_messages(data))
    rel = release_for(data)
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "incoming"

    async def scenario() -> tuple[Path, float, int]:
        async with running(uplink(broker.url)) as conn:
            fetcher = MqttChunkFetcher(conn, stall_s=10)
            with LoopLag() as lag:
                path = await fetcher.fetch(rel, dest, lambda d, t: seen.append((d, t)))
            received = conn.counters.values["received"]
            retain(broker.url, {f"fog/_artifacts/{rel.artifact_sha256}/0": b"again"})
            await asyncio.sleep(0.3)
            assert conn.counters.values["received"] == received  # unsubscribed
            return path, lag.p99(), fetcher.fetched_bytes

    path, p99, fetched = asyncio.run(scenario())
    print(f"\nevent-loop lag p99 during a 5 MB MQTT chunk download: {p99:.2f} ms")
    assert path.read_bytes() == data
    assert leftovers(dest) == [f"{rel.artifact_sha256}.tar"]
    assert fetched == len(data)
    assert seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_mqtt_chunks_resume_where_a_cut_uplink_stopped(broker: Broker, tmp_path: Path) -> None:
    """The uplink is cut twice mid-download: the connection comes back, subscribes again
    to the chunks in flight, and the download completes without fetching a byte twice."""
    data = artifact(3 * MB, seed=2)
    retain(broker.url, chunk_messages(data))
    rel = release_for(data)
    proxy = Proxy(broker.port)
    cuts: list[int] = []

    def progress(done: int, total: int) -> None:
        if len(cuts) < 2 and done >= total * (len(cuts) + 1) // 3:
            cuts.append(done)
            proxy.cut()

    async def scenario() -> tuple[Path, int]:
        async with running(uplink(proxy.url)) as conn:
            fetcher = MqttChunkFetcher(conn, stall_s=10)
            path = await fetcher.fetch(rel, tmp_path / "in", progress)
            return path, fetcher.fetched_bytes

    try:
        path, fetched = asyncio.run(scenario())
    finally:
        proxy.close()
    assert len(cuts) == 2 and proxy.accepted >= 3
    assert path.read_bytes() == data
    assert fetched == len(data)


def test_a_wrong_artifact_fails_the_sha256_check_and_leaves_nothing_behind(
        broker: Broker, tmp_path: Path) -> None:
    """Chunks of the right sizes but other bytes: FetchError 'sha256 mismatch' at the
    end, and neither the partial file nor its progress stays in dest_dir."""
    data = artifact(300_000, seed=3)
    rel = release_for(data)
    msgs = chunk_messages(data)
    wrong = chunk_messages(artifact(300_000, seed=4))
    for topic in msgs:
        if not topic.endswith("/info"):
            msgs[topic] = wrong[topic.replace(rel.artifact_sha256,
                                              hashlib.sha256(artifact(300_000, 4)).hexdigest())]
    retain(broker.url, msgs)
    dest = tmp_path / "in"

    async def scenario() -> None:
        async with running(uplink(broker.url)) as conn:
            with pytest.raises(FetchError, match="sha256 mismatch"):
                await MqttChunkFetcher(conn, stall_s=10).fetch(rel, dest, lambda d, t: None)

    asyncio.run(scenario())
    assert leftovers(dest) == []


@pytest.mark.parametrize(("how", "reason"), [
    ("info", "more bytes than the signed size: the chunk info"),
    ("last", "more bytes than the signed size: chunk 4"),
    ("middle", "chunk 1 has 1,000 bytes, expected 65,536"),
])
def test_chunks_past_the_signed_size_or_of_the_wrong_size_are_refused(
        broker: Broker, tmp_path: Path, how: str, reason: str) -> None:
    """An info announcing more than the signed size, a last chunk longer than the rest
    of the signed size, a chunk shorter than chunk_bytes: each a FetchError with that
    reason, and the partial file removed."""
    data = artifact(4 * CHUNK_BYTES + 5000, seed=5)
    rel = release_for(data)
    msgs = chunk_messages(data)
    base = f"fog/_artifacts/{rel.artifact_sha256}"
    if how == "info":
        msgs[f"{base}/info"] = json.dumps({"size": len(data) + 1, "chunk_bytes": CHUNK_BYTES,
                                           "chunks": 5, "sha256": rel.artifact_sha256}).encode()
    elif how == "last":
        msgs[f"{base}/4"] += b"x" * 100
    else:
        msgs[f"{base}/1"] = msgs[f"{base}/1"][:1000]
    retain(broker.url, msgs)
    dest = tmp_path / "in"

    async def scenario() -> None:
        async with running(uplink(broker.url)) as conn:
            with pytest.raises(FetchError, match=reason):
                await MqttChunkFetcher(conn, stall_s=10).fetch(rel, dest, lambda d, t: None)

    asyncio.run(scenario())
    assert leftovers(dest) == []


def test_a_missing_chunk_stalls_the_download_and_a_later_fetch_gets_only_what_is_missing(
        broker: Broker, tmp_path: Path) -> None:
    """With one chunk absent from the broker the fetch fails with 'stalled' after
    stall_s; the progress stays on disk, and once the chunk is there the next fetch
    takes exactly that chunk."""
    data = artifact(6 * CHUNK_BYTES, seed=6)
    rel = release_for(data)
    msgs = chunk_messages(data)
    missing = f"fog/_artifacts/{rel.artifact_sha256}/3"
    held = msgs.pop(missing)
    retain(broker.url, msgs)
    dest = tmp_path / "in"

    async def scenario() -> int:
        async with running(uplink(broker.url)) as conn:
            fetcher = MqttChunkFetcher(conn, stall_s=1.0)
            with pytest.raises(FetchError, match=r"stalled: no bytes on the chunk topics for "
                                                 r"1 s, at 327,680 of 393,216"):
                await fetcher.fetch(rel, dest, lambda d, t: None)
            await asyncio.to_thread(retain, broker.url, {missing: held})
            again = MqttChunkFetcher(conn, stall_s=5.0)
            path = await again.fetch(rel, dest, lambda d, t: None)
            assert path.read_bytes() == data
            return again.fetched_bytes

    assert asyncio.run(scenario()) == CHUNK_BYTES


def test_without_chunk_info_the_download_stalls_with_a_reason(
        broker: Broker, tmp_path: Path) -> None:
    """Nothing pushed for this artifact: 'stalled' naming the info topic."""
    rel = release_for(artifact(1000, seed=7))

    async def scenario() -> None:
        async with running(uplink(broker.url)) as conn:
            with pytest.raises(FetchError, match=r"stalled: no bytes and no chunk info on "
                                                 r"fog/_artifacts/[0-9a-f]{64}/info \(pushed\? "
                                                 r"readable by this device\?\) for 0.5 s"):
                await MqttChunkFetcher(conn, stall_s=0.5).fetch(rel, tmp_path,
                                                                lambda d, t: None)

    asyncio.run(scenario())


def test_an_uplink_whose_packets_cannot_hold_a_chunk_is_refused_with_a_reason(
        broker: Broker, tmp_path: Path) -> None:
    """A Connection advertising a maximum packet below a chunk would never get one:
    FetchError says so at once rather than stalling."""
    data = artifact(100_000, seed=8)
    retain(broker.url, chunk_messages(data))

    async def scenario() -> None:
        async with running(uplink(broker.url, max_packet_bytes=65_536)) as conn:
            with pytest.raises(FetchError, match="do not fit the uplink's maximum packet "
                                                 "size of 65,536"):
                await MqttChunkFetcher(conn, stall_s=5).fetch(release_for(data), tmp_path,
                                                              lambda d, t: None)

    asyncio.run(scenario())


def test_a_cancelled_download_unsubscribes_keeps_its_progress_and_resumes_later(
        broker: Broker, tmp_path: Path) -> None:
    """The controller cancels a fetch (a fresh release replaced it, or shutdown): the
    chunk subscriptions end, the progress is saved, and a later fetch takes the rest."""
    data = artifact(2 * MB, seed=18)
    retain(broker.url, chunk_messages(data))
    rel = release_for(data)
    dest = tmp_path / "in"

    async def scenario() -> tuple[int, int]:
        async with running(uplink(broker.url)) as conn:
            half = asyncio.Event()

            def progress(done: int, total: int) -> None:
                if done >= total // 2:
                    half.set()

            task = asyncio.create_task(
                MqttChunkFetcher(conn, stall_s=10).fetch(rel, dest, progress))
            await asyncio.wait_for(half.wait(), WAIT_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            received = conn.counters.values["received"]
            await asyncio.to_thread(
                retain, broker.url, {f"fog/_artifacts/{rel.artifact_sha256}/0": data[:10]})
            await asyncio.sleep(0.3)
            assert conn.counters.values["received"] == received  # no subscription left
            await asyncio.to_thread(
                retain, broker.url, {f"fog/_artifacts/{rel.artifact_sha256}/0":
                                     data[:CHUNK_BYTES]})
            kept = saved_bytes(dest, rel.artifact_sha256)
            again = MqttChunkFetcher(conn, stall_s=10)
            assert (await again.fetch(rel, dest, lambda d, t: None)).read_bytes() == data
            return kept, again.fetched_bytes

    kept, fetched = asyncio.run(scenario())
    assert 0 < kept < len(data) and fetched == len(data) - kept


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB tmpfs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_artifact_larger_than_the_free_disk_is_refused_before_a_byte_is_fetched(
        broker: Broker, small_disk: Path) -> None:
    """dest_dir on a 1 MB tmpfs, a 2 MB artifact: FetchError 'no room' at once (the space
    is allocated up front, not discovered at 90 %), and no partial file stays."""
    data = artifact(2 * MB, seed=19)
    retain(broker.url, chunk_messages(data))

    async def scenario() -> int:
        async with running(uplink(broker.url)) as conn:
            fetcher = MqttChunkFetcher(conn, stall_s=10)
            with pytest.raises(FetchError, match=r"no room for 2,000,000 bytes in .*small/in: "
                                                 r"No space left on device"):
                await fetcher.fetch(release_for(data), small_disk / "in", lambda d, t: None)
            return fetcher.fetched_bytes

    assert asyncio.run(scenario()) == 0
    assert leftovers(small_disk / "in") == []


# -- kill -9 of the fetching process --------------------------------------------------------

CHILD = r"""
import asyncio, sys, time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from agent.config import BrokerConfig
from agent.mqtt.connection import Connection
from agent.ota.fetch import UPLINK_MAX_PACKET_BYTES, HttpsFetcher, MqttChunkFetcher
from agent.ota.release import Policy, Release
from agent.schema import Duration
from agent.telemetry import Telemetry

how, target, sha, size, dest, slow_s = sys.argv[1:7]
rel = Release(name="shapes", version=2, expires=datetime.now(UTC) + timedelta(days=1),
              artifact_sha256=sha, artifact_size=int(size), model_sha256="0" * 64,
              inputs=(), outputs=(), labels_sha256="0" * 64, policy=Policy(),
              locations=(target,) if how == "https" else (), raw=b"{}")

def progress(done, total):
    print("progress", done, flush=True)
    time.sleep(float(slow_s))

async def main():
    if how == "https":
        fetcher = HttpsFetcher(Path(sys.argv[7]), stall_s=10)
        path = await fetcher.fetch(rel, Path(dest), progress)
    else:
        cfg = BrokerConfig(url=target, reconnect_min_s=Duration(0.05),
                           reconnect_max_s=Duration(0.2))
        conn = Connection("uplink", cfg, "fogwhisk-dev1-uplink", Telemetry(),
                          max_packet_bytes=UPLINK_MAX_PACKET_BYTES)
        task = asyncio.create_task(conn.run())
        await conn.connected.wait()
        fetcher = MqttChunkFetcher(conn, stall_s=10)
        path = await fetcher.fetch(rel, Path(dest), progress)
        task.cancel()
    print("done", fetcher.fetched_bytes, path, flush=True)

asyncio.run(main())
"""


def run_child(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def saved_bytes(dest: Path, sha: str) -> int:
    doc = json.loads((dest / f"{sha}.progress.json").read_text())
    return sum(b - a for a, b in doc["done"])


@pytest.mark.parametrize("how", ["mqtt", "https"])
def test_a_download_killed_with_sigkill_continues_from_its_progress_on_disk(
        how: str, broker: Broker, slow_web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """kill -9 of the fetching process past half way; the next process fetches exactly
    the bytes the progress file did not yet hold, not the whole artifact again."""
    data = artifact(3 * MB, seed=9)
    sha = hashlib.sha256(data).hexdigest()
    if how == "mqtt":
        retain(broker.url, chunk_messages(data))
        target = broker.url
    else:
        slow_web.put("a.tar", data)
        target = slow_web.url("a.tar")
    dest = tmp_path / "in"
    common = [how, target, sha, str(len(data)), str(dest)]
    first = run_child([*common, "0.01", certs.ca])
    assert first.stdout is not None
    deadline = time.monotonic() + WAIT_S
    for line in first.stdout:
        if line.startswith("progress") and int(line.split()[1]) >= len(data) // 2:
            break
        assert time.monotonic() < deadline, "the first fetch never got half way"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    kept = saved_bytes(dest, sha)
    print(f"\n{how}: killed with {kept:,} of {len(data):,} bytes saved")
    assert 0 < kept < len(data)

    second = run_child([*common, "0", certs.ca])
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    done = [line.split() for line in out.splitlines() if line.startswith("done")]
    assert int(done[0][1]) == len(data) - kept
    assert Path(done[0][2]).read_bytes() == data
    assert leftovers(dest) == [f"{sha}.tar"]


# -- HTTPS with Range from nginx -----------------------------------------------------------


def test_a_5_mb_artifact_arrives_over_https_from_nginx_with_the_ca_from_config(
        web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """One GET over TLS verified with the configured CA; the event loop's lag p99 during
    the download and hashing is printed."""
    data = artifact(5 * MB, seed=10)
    web.put("model.tar", data)
    rel = release_for(data, (web.url("model.tar"),))

    async def scenario() -> tuple[Path, float, int]:
        fetcher = HttpsFetcher(Path(certs.ca), stall_s=10)
        with LoopLag() as lag:
            path = await fetcher.fetch(rel, tmp_path / "in", lambda d, t: None)
        return path, lag.p99(), fetcher.fetched_bytes

    path, p99, fetched = asyncio.run(scenario())
    print(f"\nevent-loop lag p99 during a 5 MB HTTPS download: {p99:.2f} ms")
    assert path.read_bytes() == data and fetched == len(data)
    assert web.requests() == [(200, "-", len(data))]


def test_https_resumes_with_range_after_the_connection_is_cut(
        slow_web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """A TCP proxy between the fetcher and nginx is cut mid-download: the next request
    asks for `Range: bytes=<have>-`, nginx answers 206, nothing is fetched twice."""
    data = artifact(2 * MB, seed=11)
    slow_web.put("a.tar", data)
    proxy = Proxy(slow_web.port)
    rel = release_for(data, (slow_web.url("a.tar", proxy.port),))
    cut_at: list[int] = []

    def progress(done: int, total: int) -> None:
        if not cut_at and done >= total // 2:
            cut_at.append(done)
            proxy.cut()

    async def scenario() -> tuple[Path, int]:
        fetcher = HttpsFetcher(Path(certs.ca), stall_s=10)
        path = await fetcher.fetch(rel, tmp_path / "in", progress)
        return path, fetcher.fetched_bytes

    try:
        path, fetched = asyncio.run(scenario())
    finally:
        proxy.close()
    assert path.read_bytes() == data and fetched == len(data)
    reqs = slow_web.requests()
    assert reqs[0][:2] == (200, "-")
    status, rng, sent = reqs[-1]
    assert status == 206 and rng.startswith("bytes=") and rng.endswith("-")
    start = int(rng[len("bytes="):-1])
    assert cut_at[0] <= start < len(data) and sent == len(data) - start


def test_a_server_file_larger_than_the_signed_size_is_refused(
        web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """nginx serves more bytes than the release signs: 'more bytes than the signed size'
    before a byte of the body is kept."""
    data = artifact(200_000, seed=12)
    web.put("a.tar", data + b"more")
    rel = release_for(data, (web.url("a.tar"),))
    dest = tmp_path / "in"

    async def scenario() -> None:
        with pytest.raises(FetchError, match="more bytes than the signed size: "
                                             "Content-Length 200,004"):
            await HttpsFetcher(Path(certs.ca), stall_s=5).fetch(rel, dest, lambda d, t: None)

    asyncio.run(scenario())
    assert not (dest / f"{rel.artifact_sha256}.tar").exists()


def test_a_file_replaced_on_the_server_mid_download_is_noticed_by_content_range(
        slow_web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """The file behind the URL changes size between two requests: the resumed 206's
    Content-Range total differs from the signed size, and the fetch says so."""
    data = artifact(2 * MB, seed=13)
    slow_web.put("a.tar", data)
    proxy = Proxy(slow_web.port)
    rel = release_for(data, (slow_web.url("a.tar", proxy.port),))
    swapped: list[int] = []

    def progress(done: int, total: int) -> None:
        if not swapped and done >= total // 2:
            swapped.append(done)
            slow_web.put("a.tar", data[: len(data) - 1000])
            proxy.cut()

    async def scenario() -> None:
        with pytest.raises(FetchError, match=r"the total size changed: Content-Range "
                                             r"'bytes \d+-1998999/1999000'"):
            await HttpsFetcher(Path(certs.ca), stall_s=5).fetch(rel, tmp_path / "in",
                                                                progress)

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_a_blackholed_https_download_stalls_and_mqtt_chunks_finish_it(
        broker: Broker, slow_web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """fetch_any tries HTTPS first; its link goes silent half way, it gives up after
    stall_s, and the MQTT chunks fetch only what HTTPS had not (one partial file)."""
    data = artifact(2 * MB, seed=14)
    slow_web.put("a.tar", data)
    retain(broker.url, chunk_messages(data))
    proxy = Proxy(slow_web.port)
    rel = release_for(data, (slow_web.url("a.tar", proxy.port),))

    def progress(done: int, total: int) -> None:
        if done >= total // 2:
            proxy.blackhole()

    async def scenario() -> tuple[Path, int, int]:
        async with running(uplink(broker.url)) as conn:
            https = HttpsFetcher(Path(certs.ca), stall_s=1.0)
            mqtt = MqttChunkFetcher(conn, stall_s=10)
            path = await fetch_any(rel, tmp_path / "in", [mqtt, https], progress)
            return path, https.fetched_bytes, mqtt.fetched_bytes

    try:
        path, by_https, by_mqtt = asyncio.run(scenario())
    finally:
        proxy.close()
    assert path.read_bytes() == data
    assert by_https >= len(data) // 2 and by_https + by_mqtt == len(data)


def test_an_untrusted_https_server_falls_back_to_mqtt_chunks(
        broker: Broker, web: Nginx, tmp_path: Path) -> None:
    """Without the test CA the TLS handshake fails (no retry: it will not get better);
    fetch_any moves on to the MQTT chunks."""
    data = artifact(300_000, seed=15)
    web.put("a.tar", data)
    retain(broker.url, chunk_messages(data))
    rel = release_for(data, (web.url("a.tar"),))

    async def scenario() -> Path:
        async with running(uplink(broker.url)) as conn:
            return await fetch_any(rel, tmp_path / "in",
                                   [HttpsFetcher(None, stall_s=5), MqttChunkFetcher(conn)],
                                   lambda d, t: None)

    assert asyncio.run(scenario()).read_bytes() == data


def test_fetch_any_names_every_failure_when_all_transports_fail(
        web: Nginx, certs: Certs, tmp_path: Path) -> None:
    """A 404 from HTTPS and no MQTT fetcher: one FetchError naming the URL and status."""
    rel = release_for(artifact(1000, seed=16), (web.url("missing.tar"),))

    async def scenario() -> None:
        with pytest.raises(FetchError, match=r"https://127.0.0.1:\d+/missing.tar: HTTP 404"):
            await fetch_any(rel, tmp_path, [HttpsFetcher(Path(certs.ca))], lambda d, t: None)
        with pytest.raises(FetchError, match="no MQTT fetcher and no https location"):
            await fetch_any(release_for(b"x"), tmp_path, [HttpsFetcher(Path(certs.ca))],
                            lambda d, t: None)

    asyncio.run(scenario())


def test_a_verified_artifact_already_in_dest_dir_is_returned_without_a_transfer(
        broker: Broker, tmp_path: Path) -> None:
    """After a kill between the final rename and the controller's next step, a fetch
    returns the verified file without a request (nothing listens at the URL); a file
    there that does not match is removed and fetched again."""
    data = artifact(100_000, seed=17)
    rel = release_for(data, ("https://127.0.0.1:9/nothing-listens-here",))
    final = tmp_path / f"{rel.artifact_sha256}.tar"
    final.write_bytes(data)

    def noop(done: int, total: int) -> None:
        return None

    async def scenario() -> tuple[Path, Path, int]:
        first = await HttpsFetcher(None, stall_s=1).fetch(rel, tmp_path, noop)
        final.write_bytes(b"y" * len(data))
        await asyncio.to_thread(retain, broker.url, chunk_messages(data))
        async with running(uplink(broker.url)) as conn:
            mqtt = MqttChunkFetcher(conn, stall_s=5)
            second = await mqtt.fetch(rel, tmp_path, noop)
        return first, second, mqtt.fetched_bytes

    first, second, fetched = asyncio.run(scenario())
    assert first == second == final
    assert final.read_bytes() == data and fetched == len(data)
