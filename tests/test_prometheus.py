"""`[telemetry] prometheus = "host:port"`: the MQTT telemetry's counters and step
histograms over HTTP in the Prometheus text format, read at scrape time."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker, find_free_port
from helpers import Collector, publish_many
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent import config
from agent.errors import ConfigError
from agent.telemetry import BUCKETS_MS, Telemetry

N = 40


def scrape(port: int) -> dict[str, tuple[str, list[Sample]]]:
    """Metric families by name: (type, samples), parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(families: dict[str, tuple[str, list[Sample]]], sample: str, **labels: str) -> float:
    """The one sample named `sample` whose labels include `labels` (0 when absent)."""
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_bucket") \
        .removesuffix("_sum")
    found = [s.value for s in families.get(family, ("", []))[1]
             if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (sample, labels, found)
    return found[0] if found else 0.0


def with_prometheus(cfg: Path, address: str) -> Path:
    """The config with `prometheus` added to its [telemetry] table."""
    text = cfg.read_text()
    assert text.count("[telemetry]\n") == 1
    cfg.write_text(text.replace("[telemetry]\n", f'[telemetry]\nprometheus = "{address}"\n'))
    return cfg


def start_with_prometheus(tmp_path: Path, local: Broker,
                          uplink: Broker) -> tuple[AgentProcess, int]:
    """A ready agent serving /metrics on a free port (another may take it first: retried)."""
    for attempt in range(3):
        port = find_free_port()
        cfg = with_prometheus(write_config(tmp_path / "agent.toml", local, uplink, RELAY),
                              f"127.0.0.1:{port}")
        agent = AgentProcess(cfg, log_name=f"agent-{attempt}.log")
        try:
            agent.wait_ready()
            return agent, port
        except AssertionError:
            if attempt == 2 or "in use" not in agent.log():
                raise
    raise AssertionError("unreachable")


def test_a_scrape_counts_exactly_what_the_agent_relayed(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """Pipeline in/out, the step histograms, the outbox and both connections (and the
    endpoint and MQTT version each uses), RSS: the same figures as the MQTT telemetry, and
    the agent still exits 0 on SIGTERM."""
    with Collector(uplink_broker.url, f"fog/{DEVICE}/sensors/#") as cloud:
        agent, port = start_with_prometheus(tmp_path, local_broker, uplink_broker)
        prime(local_broker, cloud, agent, "sensors/marker")
        publish_many(local_broker.url, "sensors/t", [f'{{"c": {i}}}' for i in range(N)])
        cloud.wait_for(N, topic=f"fog/{DEVICE}/sensors/t")
        deadline = time.monotonic() + 10
        while True:  # a marker may still be on its way, and acks trail the messages
            m = scrape(port)
            relayed = len(cloud.snapshot())
            settled = value(m, "fogwhisk_pipeline_in_total", pipeline="relay") == relayed \
                and value(m, "fogwhisk_outbox_delivered_total") == relayed
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert value(m, "fogwhisk_pipeline_in_total", pipeline="relay") == relayed
        assert value(m, "fogwhisk_pipeline_out_total", pipeline="relay") == relayed
        assert value(m, "fogwhisk_outbox_stored_total") == relayed
        assert value(m, "fogwhisk_outbox_delivered_total") == relayed
        assert value(m, "fogwhisk_outbox_backlog") == 0
        assert value(m, "fogwhisk_mqtt_received_total", connection="local") >= relayed
        assert value(m, "fogwhisk_mqtt_published_total", connection="uplink") >= relayed
        for step in ("total", "0:forward"):
            labels = {"pipeline": "relay", "step": step}
            assert value(m, "fogwhisk_pipeline_latency_seconds_count", **labels) == relayed
            assert value(m, "fogwhisk_pipeline_latency_seconds_bucket", le="+Inf",
                         **labels) == relayed
            assert value(m, "fogwhisk_pipeline_latency_seconds_sum", **labels) > 0
        les = [s.labels["le"] for s in m["fogwhisk_pipeline_latency_seconds"][1]
               if s.name.endswith("_bucket") and s.labels["step"] == "total"]
        assert len(les) == len(BUCKETS_MS) + 1
        assert m["fogwhisk_pipeline_in"][0] == "counter"
        assert m["fogwhisk_outbox_backlog"][0] == "gauge"
        assert m["fogwhisk_pipeline_latency_seconds"][0] == "histogram"
        assert value(m, "fogwhisk_outbox_latency_seconds_count", step="commit") > 0
        assert value(m, "fogwhisk_info", device=DEVICE) == 1
        for connection, broker in (("local", local_broker), ("uplink", uplink_broker)):
            assert value(m, "fogwhisk_mqtt_endpoint_info", connection=connection,
                         endpoint=broker.url, protocol="5") == 1
        assert value(m, "process_resident_memory_bytes") > 1e6
        assert agent.stop() == 0, agent.log()
    with pytest.raises(OSError):  # the port is closed with the agent
        socket.create_connection(("127.0.0.1", port), 1).close()


def test_a_port_in_use_stops_the_agent_with_a_config_error_naming_key_and_address(
        tmp_path: Path, local_broker: Broker) -> None:
    """Exit 2 (systemd does not restart a config error), one line saying what and where."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        cfg = with_prometheus(write_config(tmp_path / "agent.toml", local_broker, local_broker,
                                           RELAY), address)
        agent = AgentProcess(cfg)
        assert agent.wait_exit() == 2, agent.log()
    line = agent.log().strip().splitlines()[-1]
    assert line.startswith("fogwhisk: bad config: "), agent.log()
    assert f"{cfg}: telemetry.prometheus: cannot listen on {address}" in line, line
    assert "in use" in line, line


@pytest.mark.parametrize("bad", ["9108", "localhost", "127.0.0.1:0", "127.0.0.1:65536",
                                 ":9108", "::1:9108"])
def test_a_prometheus_address_that_is_not_host_port_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^a\.toml: telemetry\.prometheus: '{bad}' is not "
                                          r"host:port"):
        config.from_dict({"device": {"id": "d"}, "telemetry": {"prometheus": bad}}, "a.toml")


@pytest.mark.parametrize(("text", "address"), [("127.0.0.1:9108", ("127.0.0.1", 9108)),
                                               ("[::1]:9108", ("::1", 9108)),
                                               ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_a_prometheus_address_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    cfg = config.from_dict({"device": {"id": "d"}, "telemetry": {"prometheus": text}})
    assert cfg.telemetry.prometheus_address == address


def test_prometheus_is_off_unless_configured() -> None:
    assert config.from_dict({"device": {"id": "d"}}).telemetry.prometheus_address is None


def test_histogram_buckets_are_cumulative_in_seconds_with_inclusive_bounds() -> None:
    """A latency equal to a bound counts in that bound's bucket (Prometheus' `le`)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.prometheus import TelemetryCollector

    t = Telemetry()
    for ms in (0.05, 0.07, 1.0, 3.0, 20000.0):
        t.pipeline("p").observe("total", ms)
    t.component("outbox").values["backlog"] = 7
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(t, "d", "b"))
    families = {f.name: (f.type, f.samples) for f in
                text_string_to_metric_families(generate_latest(registry).decode())}
    buckets = {s.labels["le"]: s.value for s in families["fogwhisk_pipeline_latency_seconds"][1]
               if s.name.endswith("_bucket")}
    assert buckets["5e-05"] == 1 and buckets["0.0001"] == 2 and buckets["0.001"] == 3
    assert buckets["0.002"] == 3 and buckets["0.005"] == 4 and buckets["10.0"] == 4
    assert buckets["+Inf"] == 5
    assert value(families, "fogwhisk_pipeline_latency_seconds_sum", step="total") == \
        pytest.approx(20004.12 / 1000)
    assert families["fogwhisk_outbox_backlog"] == ("gauge", [Sample(
        "fogwhisk_outbox_backlog", {}, 7.0)])
