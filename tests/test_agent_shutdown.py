"""SIGTERM stops intake, drains, says offline and exits 0 without losing accepted input;
a second signal exits at once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from agent_proc import DEVICE, RELAY, AgentProcess, prime, wait_status, write_config
from brokers import Broker
from helpers import Collector, publish_many, unique_topic

SLOW = RELAY + """
[[pipeline]]
name = "slow"
trigger = "slow/#"
steps = [{ action = "useractions:slow", blocking = true }, { action = "publish" }]
"""


def test_sigterm_exits_0_leaves_offline_retained_and_loses_no_accepted_reading(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    topic = unique_topic("sensors")
    sent = [f"reading-{i:05d}".encode() for i in range(3000)]
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg, log_name="first.log")
        agent.wait_ready()
        prime(local_broker, cloud, agent, f"{topic}/marker")
        publish_many(local_broker.url, topic, sent)  # the local broker accepted all of them
        rc = agent.stop()
        assert rc == 0, agent.log()
        assert "stopping intake" in agent.log()
        # What had not gone up yet waits in the local broker's session or the outbox.
        again = AgentProcess(cfg, log_name="second.log")
        try:
            again.wait_ready()
            # At least once: wait for every distinct reading, not for a count (the
            # resends after a stop are duplicates, and would end a count too early).
            deadline = time.monotonic() + 30
            while True:
                got = {m.payload for m in cloud.snapshot(f"fog/{DEVICE}/{topic}")}
                if set(sent) <= got or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert set(sent) <= got, (sorted(set(sent) - got)[:10], again.log()[-2000:])
        finally:
            assert again.stop() == 0, again.log()
    with Collector(uplink_broker.url, f"fog/{DEVICE}/status") as late:
        last = late.wait_for(1)[-1]
        assert last.retain
        assert json.loads(last.payload)["state"] == "offline"


def test_a_second_sigterm_during_the_drain_exits_at_once(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, SLOW,
                       grace_s="60s")
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            wait_status(cloud, "online", agent)
            prime(local_broker, cloud, agent, "sensors/marker")
            # Twenty readings at 0.5 s each: a drain of ten seconds.
            publish_many(local_broker.url, "slow/job", [b"{}"] * 20)
            cloud.wait_for(1, topic=f"fog/{DEVICE}/events/slow", timeout=10)
            agent.signal(signal.SIGTERM)
            agent.wait_log("stopping intake")
            agent.signal(signal.SIGTERM)
            rc = agent.wait_exit(timeout=5)  # well inside the 60 s grace period
            assert rc != 0, agent.log()
            assert "second SIGTERM" in agent.log()
        finally:
            agent.kill()
