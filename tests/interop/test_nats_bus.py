"""NATS 2.9 (JetStream, MQTT 3.1.1) as the device's local bus, the cloud a Mosquitto.

The agent's local connection is on its default `protocol = "auto"`: NATS answers
its MQTT 5 CONNECT with a 3.1.1 refusal and the agent goes on with 3.1.1.
The agent acknowledges a local message only once its outbox has committed what the
message produced; NATS keeps an unacknowledged message in the agent's session and
sends it again after its `ack_wait` (2 s in this server's config, 30 s by default)
or when the session comes back.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent_proc import RELAY, AgentProcess
from brokers import BrokerFactory
from helpers import Collector
from interop_brokers import NATS_ACK_WAIT_S, NatsServer
from interop_util import MQTT311, agent_config, device_id, prime_311, wait_until
from stream import Stream, received, wait_all


def test_custody_holds_across_an_agent_kill_with_nats_as_the_local_bus(
        nats_bus: NatsServer, broker_factory: BrokerFactory, tmp_path: Path) -> None:
    """kill -9 of the agent at 500 readings/s on the NATS bus, then a new agent on the
    same data directory: every reading NATS accepted reaches the cloud, what the dead
    agent had taken but not acknowledged sent again by NATS (after its ack_wait, which
    the test waits for), duplicates allowed."""
    cloud_broker = broker_factory("cloud")
    dev = device_id("natsbus")
    topic = "sensors/bus"
    cfg = agent_config(tmp_path / "agent.toml", nats_bus.url, cloud_broker.url, RELAY,
                       device=dev, uplink_protocol=None)  # both "auto": NATS ends on 3.1.1
    with Collector(cloud_broker.url, f"fog/{dev}/#") as cloud:
        agent = AgentProcess(cfg)
        agent.wait_ready()
        prime_311(nats_bus.url, cloud, agent, "sensors/prime", dev)
        stream = Stream(nats_bus.url, rate_hz=500, topic=topic, protocol=MQTT311).start()
        try:
            wait_until("1000 readings relayed",
                       lambda: len(received(cloud, dev, topic)) >= 1000, 30)
            agent.kill()
            time.sleep(1)  # NATS keeps taking readings for the dead agent's session
            agent = AgentProcess(cfg, log_name="agent2.log")
            agent.wait_ready()
            wait_until("readings relayed by the new agent",
                       lambda: len(received(cloud, dev, topic)) >= len(stream.accepted), 30)
        finally:
            stream.stop()
        # What the killed agent held unacknowledged comes again after ack_wait.
        wait_all(cloud, dev, stream.accepted, timeout_s=NATS_ACK_WAIT_S + 30, topic=topic)
        assert agent.stop() == 0
    got = received(cloud, dev, topic)
    print(f"\ninterop: nats bus: {len(stream.accepted)} accepted, {len(got)} relayed "
          f"({len(got) - len(set(got))} duplicates) across an agent kill -9")
