"""The broker fixtures themselves: real processes, real round trips, real restarts."""

from __future__ import annotations

import pytest
from brokers import Broker, BrokerFactory, port_open
from helpers import Collector, publish_many, publish_one, unique_topic


def test_qos1_messages_round_trip_through_the_fixture_broker(broker: Broker) -> None:
    topic = unique_topic()
    payloads = [f"m{i}".encode() for i in range(50)] + [bytes(range(256))]
    with Collector(broker.url, topic) as c:
        publish_many(broker.url, topic, payloads, qos=1)
        got = c.wait_for(len(payloads))
    assert [m.payload for m in got] == payloads
    assert all(m.topic == topic and m.qos == 1 for m in got)


def test_local_and_uplink_brokers_are_separate_processes(
    local_broker: Broker, uplink_broker: Broker
) -> None:
    assert local_broker.port != uplink_broker.port
    topic = unique_topic()
    with Collector(uplink_broker.url, topic) as up, Collector(local_broker.url, topic) as lo:
        publish_one(local_broker.url, topic, b"only-local")
        assert lo.wait_for(1)[0].payload == b"only-local"
        publish_one(uplink_broker.url, topic, b"only-up")
        assert [m.payload for m in up.wait_for(1)] == [b"only-up"]


def test_killed_broker_comes_back_on_the_same_port(broker: Broker) -> None:
    port = broker.port
    broker.kill()
    assert not broker.running
    assert not port_open(broker.host, port)
    broker.start()
    assert broker.port == port and broker.running
    topic = unique_topic()
    with Collector(broker.url, topic) as c:
        publish_one(broker.url, topic, b"back")
        assert c.wait_for(1)[0].payload == b"back"


def test_persistent_broker_keeps_retained_messages_across_a_clean_restart(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory("persist", persistence=True)
    topic = unique_topic()
    publish_one(b.url, topic, b"kept", retain=True)
    b.restart()
    with Collector(b.url, topic) as c:
        got = c.wait_for(1)
    assert got[0].payload == b"kept" and got[0].retain


def test_extra_conf_lines_reach_the_broker(broker_factory: BrokerFactory) -> None:
    b = broker_factory("small", extra_conf="max_packet_size 200")
    topic = unique_topic()
    with Collector(b.url, topic) as c:
        publish_one(b.url, topic, b"x" * 10)
        assert c.wait_for(1)[0].payload == b"x" * 10
    with pytest.raises(TimeoutError):
        publish_many(b.url, topic, [b"x" * 1000], timeout=2)
