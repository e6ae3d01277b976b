"""A RabbitMQ cluster of three nodes on this machine as the uplink: the agent has all
three endpoints and fails over when the node it is connected to dies."""

from __future__ import annotations

import time
from pathlib import Path

from agent_proc import RELAY, AgentProcess, prime, status_of
from brokers import BrokerFactory
from helpers import Collector
from interop_brokers import RabbitCluster
from interop_util import (
    RecordProperty,
    agent_config,
    device_id,
    numbers,
    settles,
    subscriber,
    wait_until,
    whose_losses,
)
from stream import Stream, received
from tap import AckTap


def endpoint_of(cloud: Collector, dev: str, after: int = 0) -> str | None:
    """The uplink endpoint the agent reports in its latest "online" status after `after`."""
    docs = [d for d in status_of(cloud, dev)[after:] if d.get("state") == "online"]
    return str(docs[-1]["endpoint"]) if docs and "endpoint" in docs[-1] else None


def test_the_agent_fails_over_to_a_surviving_node_and_no_reading_is_lost(
        rabbit_cluster: RabbitCluster, broker_factory: BrokerFactory, tmp_path: Path,
        record_property: RecordProperty) -> None:
    """kill -9 of the node the agent is connected to, at 500 readings/s: the agent moves
    to another endpoint of its list and a subscriber on a surviving node gets every
    reading the local broker accepted (duplicates allowed).

    The subscriber's queue lives on a surviving node: the subscriber connects to a node
    the agent is not on (found from the endpoint in the agent's status, checked with
    `rabbitmqctl list_mqtt_connections`), with clean session off and QoS1, so RabbitMQ
    declares its durable queue on that node (the default queue locator is client-local);
    `rabbitmqctl list_queues name pid` confirms where it is. Only the agent's node dies.
    A tap in front of each node reads the broker's PUBACKs off the wire: a missing
    reading the cluster had acknowledged would be the cluster's loss, not the agent's.
    """
    nodes = rabbit_cluster.nodes
    assert rabbit_cluster.running_nodes() == [n.nodename for n in nodes]  # one cluster
    local = broker_factory("local")
    dev = device_id("cluster")
    topic = "sensors/failover"
    taps = [AckTap(n.port, f"fog/{dev}/{topic}") for n in nodes]
    cfg = agent_config(tmp_path / "agent.toml", local, [t.url for t in taps], RELAY,
                       device=dev, uplink_protocol="3.1.1")
    agent = AgentProcess(cfg)
    try:
        agent.wait_ready()
        # Where the agent is, from its status (read on any node: status is retained).
        with subscriber(nodes[0].url, f"fog/{dev}/status") as peek:
            wait_until("the agent's status names its endpoint",
                       lambda: endpoint_of(peek, dev) is not None, 20)
            endpoint = endpoint_of(peek, dev)
        home = next(i for i, t in enumerate(taps) if endpoint and endpoint.endswith(f":{t.port}"))
        assert f"fogwhisk-{dev}-uplink" in nodes[home].mqtt_client_ids()
        survivor = nodes[(home + 1) % len(nodes)]
        sub_id = f"interop-failover-{dev}"
        cloud = subscriber(survivor.url, f"fog/{dev}/#", client_id=sub_id, persistent=True)
        cloud.start()
        try:
            queues = survivor.ctl("list_queues", "name", "pid", "--quiet", "--no-table-headers")
            mine = [q for q in queues.splitlines() if sub_id in q]
            assert mine and all(survivor.nodename in q for q in mine), queues
            prime(local, cloud, agent, "sensors/prime", device=dev)
            stream = Stream(local.url, rate_hz=500, topic=topic).start()
            wait_until("500 readings relayed", lambda: len(received(cloud, dev, topic)) >= 500,
                       30)
            seen = len(status_of(cloud, dev))
            acked_before = set().union(*(numbers(t.acknowledged()) for t in taps))
            killed = time.monotonic()
            nodes[home].kill()
            acked_before |= numbers(taps[home].acknowledged())  # the dead node acks no more
            others = [t for i, t in enumerate(taps) if i != home]
            wait_until("a session on another node",
                       lambda: any(t.sessions for t in others), 30, interval_s=0.02)
            failover_s = time.monotonic() - killed
            wait_until("readings acknowledged by another node",
                       lambda: sum(len(t.acknowledged()) for t in others) >= 500, 30)
            stream.stop()
            accepted = stream.accepted

            def acked() -> set[int]:
                return set().union(*(numbers(t.acknowledged()) for t in taps))

            wait_until("every accepted reading acknowledged by the cluster",
                       lambda: set(accepted) <= acked(), 60)
            settles(lambda: set(accepted) <= set(received(cloud, dev, topic)), 20)
            new_endpoint = endpoint_of(cloud, dev, after=seen)
            assert agent.stop() == 0
        finally:
            cloud.stop()
    finally:
        agent.kill()
        for t in taps:
            t.close()
    assert new_endpoint is not None and new_endpoint != endpoint, (endpoint, new_endpoint)
    lost = whose_losses("the RabbitMQ cluster", accepted, acked(),
                        set(received(cloud, dev, topic)), acked_before)
    got = received(cloud, dev, topic)
    record_property("failover_s", round(failover_s, 2))
    print(f"\ninterop: rabbit cluster: kill -9 of the agent's node; new session on another "
          f"node after {failover_s:.2f} s; {len(accepted)} accepted, "
          f"{len(got) - len(set(got))} duplicates, {len(lost)} lost by the cluster")
    assert not lost, (f"the cluster acknowledged {len(lost)} readings and never delivered "
                      f"them to a queue on a surviving node: {sorted(lost)[:20]}")
