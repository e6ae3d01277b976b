"""`fogwhisk status`: a device's retained status and last telemetry as a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker
from helpers import Collector, publish_many


def status(url: str, device: str = DEVICE, timeout: str = "3") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "status", "--broker", url, "--device", device,
         "--timeout", timeout], capture_output=True, text=True, timeout=30, check=False)


def test_status_shows_state_pipelines_counters_and_outbox_of_a_running_then_stopped_agent(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, "sensors/x", [b"1"] * 5)
            cloud.wait_for(6, topic=f"fog/{DEVICE}/sensors/#")
            # Wait for a telemetry document that counts them.
            for i in range(1, 100):
                cloud.wait_for(i, topic=f"fog/{DEVICE}/telemetry")
                doc = json.loads(cloud.snapshot(f"fog/{DEVICE}/telemetry")[-1].payload)
                if doc["pipelines"].get("relay", {}).get("out", 0) >= 6:
                    break
            r = status(uplink_broker.url)
            assert r.returncode == 0, r.stderr
            out = r.stdout
            assert "state    online" in out
            assert "relay" in out and "p95 ms" in out
            assert "outbox   backlog" in out and "RSS" in out
            relay_row = next(ln for ln in out.splitlines() if ln.startswith("relay "))
            assert relay_row.split()[1:3] == [str(doc["pipelines"]["relay"]["in"]),
                                              str(doc["pipelines"]["relay"]["out"])], out
        finally:
            assert agent.stop() == 0, agent.log()
    r = status(uplink_broker.url)
    assert r.returncode == 0 and "state    offline" in r.stdout, r.stdout + r.stderr


def test_status_exits_1_with_a_reason_when_nothing_is_retained(uplink_broker: Broker) -> None:
    r = status(uplink_broker.url, device="nobody", timeout="0.5")
    assert r.returncode == 1
    assert "nothing retained on fog/nobody/status" in r.stderr


def test_status_exits_1_when_the_broker_is_unreachable() -> None:
    r = status("mqtt://127.0.0.1:1", timeout="0.5")
    assert r.returncode == 1 and "cannot reach" in r.stderr
