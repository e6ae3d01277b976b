"""`[telemetry] prometheus = "host:port"`: the agent's telemetry as Prometheus metrics.

Nothing is counted twice: `TelemetryCollector` reads the same `Telemetry` the
MQTT telemetry document is made of, at scrape time, and prometheus_client's
own HTTP server (a daemon thread, one more per scrape) writes the exposition.

    fogwhisk_pipeline_<counter>_total{pipeline}      in, out, malformed, errors, ...
    fogwhisk_pipeline_latency_seconds{pipeline,step} histogram per step, and "total"
    fogwhisk_outbox_<counter>_total, fogwhisk_outbox_backlog (gauge), ...
    fogwhisk_outbox_latency_seconds{step="commit"}   histogram
    fogwhisk_mqtt_<counter>_total{connection}        local, uplink
    fogwhisk_mqtt_endpoint_info{connection,endpoint,protocol} 1   the endpoint in use
    fogwhisk_info{device,version,boot} 1
    process_resident_memory_bytes, process_cpu_seconds_total, ...  (ProcessCollector)
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent import __version__
from agent.config import Config
from agent.errors import ConfigError
from agent.telemetry import BUCKETS_MS, GAUGES, Counters, Histogram, Telemetry

log = logging.getLogger(__name__)

# Component names "<family>_<label value>" share metric names under a label.
LABELLED_COMPONENTS = {"mqtt": "connection"}
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_BOUNDS_S = [b / 1000.0 for b in BUCKETS_MS]


class TelemetryCollector(Collector):
    """Every counter, gauge and step histogram of a `Telemetry`, read when scraped.

    Runs on the HTTP server's thread while the loop and workers keep counting:
    each dict is copied first (one C-level call under the GIL, so no "changed
    size during iteration"), and a histogram's count is the sum of the buckets
    it copied, so the exposition is always self-consistent.
    """

    def __init__(self, telemetry: Telemetry, device: str, boot_id: str) -> None:
        self.telemetry = telemetry
        self.device = device
        self.boot_id = boot_id

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("fogwhisk_info", "The agent: device id, version, boot id",
                                 labels=["device", "version", "boot"])
        info.add_metric([self.device, __version__, self.boot_id], 1)
        yield info
        t = self.telemetry
        yield from _endpoints(dict(t.components))
        scopes = [Scope("pipeline", "pipelines.<pipeline>", ["pipeline"], [name], c)
                  for name, c in sorted(dict(t.pipelines).items())]
        for name, c in sorted(dict(t.components).items()):
            family, _, value = name.partition("_")
            label = LABELLED_COMPONENTS.get(family)
            if label is not None and value:
                scopes.append(Scope(family, f"{family}_<{label}>", [label], [value], c))
            else:
                scopes.append(Scope(_safe(name), name, [], [], c))
        yield from _families(scopes)


def _endpoints(components: dict[str, Counters]) -> Iterator[Metric]:
    """The endpoint and MQTT version each connection uses (text facts, as an info gauge)."""
    family = GaugeMetricFamily("fogwhisk_mqtt_endpoint_info",
                               "The endpoint a connection uses and its MQTT version",
                               labels=["connection", "endpoint", "protocol"])
    for name, c in sorted(components.items()):
        kind, _, connection = name.partition("_")
        facts = dict(c.info)
        if kind == "mqtt" and connection and "endpoint" in facts:
            family.add_metric([connection, facts["endpoint"], facts.get("protocol", "")], 1)
    yield family


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a `Counters` goes: its metric prefix, its telemetry path, its labels."""

    prefix: str
    path: str  # in the MQTT telemetry document, for the HELP text
    labels: list[str]
    values: list[str]
    counters: Counters


def _families(scopes: list[Scope]) -> Iterator[Metric]:
    """One metric family per (prefix, counter name); scopes with one prefix share it."""
    counters: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    latency: dict[str, HistogramMetricFamily] = {}
    for s in scopes:
        for key, value in sorted(dict(s.counters.values).items()):
            name = f"fogwhisk_{s.prefix}_{_safe(key)}"
            family = counters.get(name)
            if family is None:
                kind = GaugeMetricFamily if key in GAUGES else CounterMetricFamily
                family = counters[name] = kind(name, f"telemetry {s.path}.{key}",
                                               labels=s.labels)
            family.add_metric(s.values, value)
        for step, h in sorted(dict(s.counters.hist).items()):
            name = f"fogwhisk_{s.prefix}_latency_seconds"
            hist = latency.get(name)
            if hist is None:
                hist = latency[name] = HistogramMetricFamily(
                    name, f"telemetry {s.path}.latency_ms, per step (p50, p95 there)",
                    labels=[*s.labels, "step"])
            buckets, total_s = _buckets(h)
            hist.add_metric([*s.values, step], buckets, total_s)
    yield from counters.values()
    yield from latency.values()


def _buckets(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs in seconds, ending with +Inf, and the sum in seconds."""
    counts = list(h.counts)  # a copy: observe() may run meanwhile on another thread
    total_s = h.sum / 1000.0
    out: list[tuple[str, float]] = []
    seen = 0
    for bound, n in zip([*_BOUNDS_S, float("inf")], counts, strict=True):
        seen += n
        out.append((floatToGoString(bound), seen))  # type: ignore[no-untyped-call]  # unannotated upstream
    return out, total_s


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


class Exporter:
    """The HTTP server for `/metrics`, serving from its own threads until `serve` is cancelled."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, where: str) -> None:
        self.server = server
        self.thread = thread
        self.where = where

    async def serve(self) -> None:
        """A TaskGroup task: holds the server open; cancelled, shuts it down and closes the port."""
        try:
            await asyncio.Event().wait()
        finally:
            # shutdown() waits for serve_forever's next poll (0.5 s): not on the loop.
            await asyncio.to_thread(self.close)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        log.info("prometheus: stopped serving %s", self.where)


def start(cfg: Config, telemetry: Telemetry, boot_id: str) -> Exporter | None:
    """Listen on `telemetry.prometheus` (None when unset); a port in use is a ConfigError."""
    address = cfg.telemetry.prometheus_address
    if address is None:
        return None
    host, port = address
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(telemetry, cfg.device.id, boot_id))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU, open fds
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:  # in use, an address not on this machine, a privileged port
        reason = exc.strerror or str(exc)
        hint = (f": another process listens there (`ss -ltnp 'sport = :{port}'` names it)"
                if "in use" in reason else "")
        raise ConfigError(f"{cfg.source}: telemetry.prometheus: cannot listen on "
                          f"{cfg.telemetry.prometheus}: {reason}{hint}") from None
    where = f"http://{cfg.telemetry.prometheus}/metrics"
    log.info("prometheus: serving %s", where)
    return Exporter(server, thread, where)
