"""Built-in and user actions in a running agent: window, filter, publish envelope,
user actions by import path; malformed input is counted and dropped, never fatal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from agent_proc import pipeline_events as events
from agent_proc import telemetry_when as telemetry
from brokers import Broker
from helpers import Collector, publish_many

from agent import __version__

PIPELINES = RELAY + """
[[pipeline]]
name = "power"
trigger = "meters/+/power"
steps = [{ action = "window", size = 3, fields = ["w"], agg = ["mean", "min", "max", "count"] },
         { action = "publish" }]

[[pipeline]]
name = "hot"
trigger = "rooms/+/temp"
steps = [{ action = "filter", field = "t", op = ">", value = 25 },
         { action = "publish", format = "msgpack" }]

[[pipeline]]
name = "minute"
trigger = "vib/+"
steps = [{ action = "window", seconds = "1s", fields = ["rms"], agg = ["mean", "max"] },
         { action = "publish" }]

[[pipeline]]
name = "user"
trigger = "user/double"
steps = [{ action = "useractions:double", factor = 3 }, { action = "publish" }]

[[pipeline]]
name = "fragile"
trigger = "user/fragile"
steps = [{ action = "useractions:explode_on_odd" }, { action = "publish" }]
"""


@pytest.fixture
def running(tmp_path: Path, local_broker: Broker,
            uplink_broker: Broker) -> Iterator[tuple[AgentProcess, Collector]]:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, PIPELINES)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            yield agent, cloud
        finally:
            rc = agent.stop()
        assert rc == 0, agent.log()


def test_a_count_window_emits_aggregates_in_an_envelope_v1_with_increasing_seq(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    _, cloud = running
    publish_many(local_broker.url, "meters/m1/power",
                 [json.dumps({"w": w}).encode() for w in (10, 20, 60, 1, 2, 3)])
    first, second = events(cloud, "power", 2)
    assert first["w"] == {"mean": 30.0, "min": 10.0, "max": 60.0, "count": 3}
    assert second["w"] == {"mean": 2.0, "min": 1.0, "max": 3.0, "count": 3}
    for e in (first, second):
        assert e["v"] == 1
        assert e["device"] == DEVICE
        assert e["pipeline"] == "power"
        assert e["topic"] == "meters/m1/power"
        assert isinstance(e["ts"], float)
        assert e["id"].startswith(f"{DEVICE}:") and e["id"].endswith(f":{e['seq']}")
        assert "total" in e["latency_ms"]
    assert second["seq"] > first["seq"]
    assert first["id"] != second["id"]


def test_a_time_window_emits_once_its_period_passes(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    _, cloud = running
    publish_many(local_broker.url, "vib/pump", [msgpack.packb({"rms": r}) for r in (1, 2, 6)])
    # The three may share one window or straddle a tick; together they add up.
    got = events(cloud, "minute", 1)
    if sum(x["n"] for x in got) < 3:
        got = events(cloud, "minute", 2)
    assert sum(x["n"] for x in got) == 3
    assert max(x["rms"]["max"] for x in got) == 6.0
    assert all(x["topic"] == "vib/pump" for x in got)


def test_filter_passes_matching_readings_and_publish_encodes_msgpack(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    _, cloud = running
    publish_many(local_broker.url, "rooms/kitchen/temp",
                 [json.dumps({"t": t, "i": i}).encode() for i, t in enumerate((20, 26, 25, 30))])
    got = events(cloud, "hot", 2, decode=msgpack.unpackb)
    assert [e["t"] for e in got] == [26, 30]
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    assert got[0]["v"] == 1 and got[0]["pipeline"] == "hot"


def test_malformed_payloads_are_counted_per_pipeline_and_good_ones_around_them_flow(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    agent, cloud = running
    good = [json.dumps({"w": w}).encode() for w in (1, 2, 3)]
    bad = [b"{not json", b"\xc1\xc1garbage", json.dumps({"w": "heavy"}).encode(),
           msgpack.packb([1, 2]), json.dumps({"volts": 3}).encode()]
    publish_many(local_broker.url, "meters/m2/power", [good[0], *bad[:3], good[1], *bad[3:],
                                                      good[2]])
    (e,) = events(cloud, "power", 1)
    assert e["w"]["count"] == 3 and e["w"]["mean"] == 2.0
    publish_many(local_broker.url, "rooms/hall/temp",
                 [b"[]", json.dumps({"t": "warm"}).encode(), json.dumps({"x": 1}).encode(),
                  json.dumps({"t": 40}).encode()])
    assert [e["t"] for e in events(cloud, "hot", 1, decode=msgpack.unpackb)] == [40]
    doc = telemetry(cloud, agent, "power", "malformed", len(bad))
    assert doc["pipelines"]["power"]["malformed"] == len(bad)
    doc = telemetry(cloud, agent, "hot", "malformed", 3)
    assert doc["pipelines"]["hot"]["malformed"] == 3
    assert doc["pipelines"]["hot"]["in"] == 4
    with Collector(cloud.url, f"fog/{DEVICE}/telemetry") as late:  # retained: seen later too
        assert late.wait_for(1)[0].retain
    assert "malformed" in agent.log()
    assert agent.running


def test_a_user_action_by_import_path_gets_its_parameters(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    _, cloud = running
    publish_many(local_broker.url, "user/double", [b'{"v": 2}', b'{"v": 5}'])
    got = events(cloud, "user", 2)
    assert [(e["type"], e["value"]) for e in got] == [("doubled", 6), ("doubled", 15)]


def test_a_user_action_that_raises_is_counted_and_the_pipeline_keeps_running(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    agent, cloud = running
    publish_many(local_broker.url, "user/fragile",
                 [json.dumps({"v": v}).encode() for v in range(10)])
    got = events(cloud, "fragile", 5)
    assert [e["value"] for e in got] == [0, 2, 4, 6, 8]
    doc = telemetry(cloud, agent, "fragile", "errors", 5)
    assert doc["pipelines"]["fragile"]["errors"] == 5
    assert "user code failed" in agent.log()
    publish_many(local_broker.url, "user/fragile", [b'{"v": 100}'])
    assert events(cloud, "fragile", 6)[-1]["value"] == 100


def test_telemetry_is_retained_with_per_pipeline_counters_latency_outbox_and_rss(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    agent, cloud = running
    publish_many(local_broker.url, "sensors/a", [b"1", b"2"])
    doc = telemetry(cloud, agent, "relay", "out", 3)  # the marker and two readings
    relay = doc["pipelines"]["relay"]
    assert relay["in"] >= 3
    assert set(relay["latency_ms"]["total"]) >= {"p50", "p95"}
    assert doc["rss_bytes"] > 0
    assert doc["device"] == DEVICE
    assert "outbox" in doc
    status = json.loads(cloud.snapshot(f"fog/{DEVICE}/status")[-1].payload)
    assert status["version"] == __version__


def test_an_open_window_survives_kill_9_of_the_agent(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    """Readings folded into an open window were acknowledged: a crash must not lose them.

    The window's state is committed with their acks, and restored at the next start.
    """
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, PIPELINES)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, "meters/m2/power",
                         [json.dumps({"w": w}).encode() for w in (10, 20)], qos=1)
            telemetry(cloud, agent, "power", "in", 2)  # both taken and acknowledged
            agent.kill()
            agent = AgentProcess(cfg)
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker2")
            publish_many(local_broker.url, "meters/m2/power", [json.dumps({"w": 60}).encode()],
                         qos=1)
            (event,) = events(cloud, "power", 1)
            assert event["w"] == {"mean": 30.0, "min": 10.0, "max": 60.0, "count": 3}
        finally:
            agent.stop()
