"""Counters, latency histograms, burst-limited warnings, the telemetry document.

Counting happens on hot paths, so it is plain dict arithmetic with no locks:
worker threads only add to counters, and a lost increment under a data race
is an acceptable price for a counter (CPython's GIL makes it rare). Readers on
other threads (the Prometheus scrape, agent/prometheus.py) copy a dict before
iterating it; `observe` stays a bisect over 16 bounds and three additions.
"""

from __future__ import annotations

import bisect
import logging
import os
import resource
import time
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

# Histogram bucket upper bounds in ms: sub-ms for relays, up to seconds for inference.
BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500, 10000)
BURST_S = 10.0
# Values that are set, not added to (levels, not counts): Prometheus gauges, the rest counters.
GAUGES = frozenset({"backlog", "backlog_bytes", "degraded"})


class Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.count += 1
        self.sum += ms

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return BUCKETS_MS[i] if i < len(BUCKETS_MS) else float("inf")
        return float("inf")


class Counters:
    """Counters and step histograms of one pipeline (or of the outbox, or a connection)."""

    def __init__(self) -> None:
        self.values: defaultdict[str, int] = defaultdict(int)
        self.hist: defaultdict[str, Histogram] = defaultdict(Histogram)
        # Facts that are text, not numbers (a connection's endpoint and MQTT version):
        # in the telemetry document beside the counters, not in Prometheus.
        self.info: dict[str, str] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def observe(self, name: str, ms: float) -> None:
        self.hist[name].observe(ms)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        out.update(self.info)
        if self.hist:
            out["latency_ms"] = {
                k: {"p50": h.quantile(0.5), "p95": h.quantile(0.95), "n": h.count}
                for k, h in self.hist.items()
            }
        return out


class Telemetry:
    """All of the agent's counters, by component, plus burst-limited warnings."""

    def __init__(self) -> None:
        self.started = time.time()
        self.components: dict[str, Counters] = {}
        self.pipelines: dict[str, Counters] = {}
        self._bursts: dict[str, tuple[float, int]] = {}

    def pipeline(self, name: str) -> Counters:
        c = self.pipelines.get(name)
        if c is None:
            c = self.pipelines[name] = Counters()
        return c

    def component(self, name: str) -> Counters:
        c = self.components.get(name)
        if c is None:
            c = self.components[name] = Counters()
        return c

    def warn_burst(self, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        """Log at WARNING once per burst of the same `key`, with how many were suppressed."""
        now = time.monotonic()
        last, suppressed = self._bursts.get(key, (0.0, 0))
        if now - last < BURST_S:
            self._bursts[key] = (last, suppressed + 1)
            return
        self._bursts[key] = (now, 0)
        if suppressed:
            fmt += " (and %d more like it in the last burst)"
            args = (*args, suppressed)
        log.warning(fmt, *args, exc_info=exc_info)

    def document(self, device: str) -> dict[str, Any]:
        """The body of `fog/{device}/telemetry`."""
        return {
            "device": device,
            "ts": round(time.time(), 3),
            "uptime_s": round(time.time() - self.started, 1),
            "rss_bytes": rss_bytes(),
            "pipelines": {k: v.snapshot() for k, v in self.pipelines.items()},
            **{k: v.snapshot() for k, v in self.components.items()},
        }


def rss_bytes() -> int:
    """Current resident set size, from /proc (falls back to the peak where /proc is absent)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
