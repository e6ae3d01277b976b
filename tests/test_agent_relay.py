"""The agent relays the local bus to its uplink, says who it is, and survives broker restarts.

Real processes: the agent (`python -m agent run`) and two Mosquitto brokers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from agent_proc import DEVICE, RELAY, AgentProcess, prime, status_of, wait_status, write_config
from brokers import Broker
from helpers import Collector, publish_many, unique_topic

from agent import __version__

TWO_PIPELINES = RELAY + """
[[pipeline]]
name = "vibration"
trigger = "machines/+/vibration"
steps = [{ action = "window", size = 5, fields = ["rms"], agg = ["mean", "max"] },
         { action = "publish" }]
"""


def test_qos1_binary_payloads_arrive_at_the_uplink_byte_for_byte_and_in_order(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    topic = unique_topic("sensors")
    payloads = [b"", b"\x00", b"\x00\x00\xff\x00", bytes(range(256)), os.urandom(1000),
                b"\xff" * 70000, *(os.urandom(i % 97) + b"\x00" for i in range(200))]
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, f"{topic}/marker")
            publish_many(local_broker.url, topic, payloads, qos=1)
            got = cloud.wait_for(len(payloads), topic=f"fog/{DEVICE}/{topic}")
            assert [m.payload for m in got] == payloads
            assert all(m.qos == 1 for m in got)
        finally:
            assert agent.stop() == 0, agent.log()


def test_birth_is_retained_online_json_with_version_and_pipelines_and_kill_9_leaves_offline(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, TWO_PIPELINES)
    agent = AgentProcess(cfg)
    try:
        agent.wait_ready()
        # A subscriber that comes later still sees the birth: it is retained.
        with Collector(uplink_broker.url, f"fog/{DEVICE}/status") as late:
            doc = wait_status(late, "online", agent)
            assert late.snapshot()[0].retain
            assert doc["version"] == __version__
            assert doc["pipelines"] == ["relay", "vibration"]
            assert doc["device"] == DEVICE
            n = len(status_of(late))
            agent.kill()
            # Mosquitto publishes the last will when it notices the dead socket.
            wait_status(late, "offline", agent, after=n)
        with Collector(uplink_broker.url, f"fog/{DEVICE}/status") as later:
            msgs = later.wait_for(1)
            assert msgs[-1].retain
            assert json.loads(msgs[-1].payload)["state"] == "offline"
    finally:
        agent.kill()


def test_relaying_continues_after_the_local_broker_restarts(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    topic = unique_topic("sensors")
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, f"{topic}/before")
            publish_many(local_broker.url, topic, [b"a1", b"a2"])
            cloud.wait_for(2, topic=f"fog/{DEVICE}/{topic}")
            local_broker.restart()  # no persistence: the agent must subscribe again
            prime(local_broker, cloud, agent, f"{topic}/after")
            publish_many(local_broker.url, topic, [b"b1", b"b2", b"b3"])
            got = cloud.wait_for(5, topic=f"fog/{DEVICE}/{topic}")
            assert [m.payload for m in got] == [b"a1", b"a2", b"b1", b"b2", b"b3"]
            assert agent.running
        finally:
            assert agent.stop() == 0, agent.log()


def test_relaying_continues_and_nothing_is_lost_across_an_uplink_restart(
    tmp_path: Path, local_broker: Broker, broker_factory: object
) -> None:
    uplink: Broker = broker_factory("uplink", persistence=True)  # type: ignore[operator]
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink, RELAY)
    topic = unique_topic("sensors")
    cloud = Collector(uplink.url, f"fog/{DEVICE}/#", client_id="cloud-sub", clean=False).start()
    agent = AgentProcess(cfg)
    try:
        agent.wait_ready()
        wait_status(cloud, "online", agent)
        prime(local_broker, cloud, agent, f"{topic}/marker")
        # SIGTERM: Mosquitto saves the cloud subscriber's session (a kill -9 would lose it,
        # which is the subscriber's problem, not the agent's).
        uplink.stop()
        # Readings taken while the uplink is down wait in the outbox.
        publish_many(local_broker.url, topic, [f"r{i}".encode() for i in range(50)])
        time.sleep(0.5)
        uplink.start()
        cloud.reconnect()
        got = cloud.wait_for(50, timeout=20, topic=f"fog/{DEVICE}/{topic}")
        assert sorted(m.payload for m in got) == sorted(f"r{i}".encode() for i in range(50))
        # And the agent said hello again on the new connection.
        wait_status(cloud, "online", agent, after=1)
        publish_many(local_broker.url, topic, [b"after"])
        cloud.wait_for(51, topic=f"fog/{DEVICE}/{topic}")
    finally:
        rc = agent.stop()
        cloud.stop()
        assert rc == 0, agent.log()


def test_mqtt_311_on_both_sides_relays_byte_for_byte(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    """MQTT 3.1.1 brokers (older gateways, some cloud endpoints) work on either side."""
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY,
                       uplink_extra='protocol = "3.1.1"')
    cfg.write_text(cfg.read_text().replace("[local]\n", '[local]\nprotocol = "3.1.1"\n', 1))
    topic = unique_topic("sensors")
    payloads = [os.urandom(i % 300) for i in range(300)]
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, f"{topic}/marker")
            publish_many(local_broker.url, topic, payloads, qos=1)
            got = cloud.wait_for(len(payloads), topic=f"fog/{DEVICE}/{topic}")
            assert [m.payload for m in got] == payloads
        finally:
            assert agent.stop() == 0, agent.log()
