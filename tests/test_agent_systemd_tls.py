"""The running agent under systemd's protocol, and over mutual TLS to its uplink.

Real processes throughout: `python -m agent run -c FILE`, Mosquitto brokers
from the fixtures, certificates from scripts/make-certs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Broker, Certs
from helpers import Collector, Tls, publish_many, unique_topic

DEVICE = "cam-frontdoor"


def write_config(path: Path, local: Broker, uplink: Broker, certs: Certs | None = None) -> Path:
    tls = ""
    if certs is not None:
        tls = (f'ca = "{certs.ca}"\ncert = "{certs.cert(DEVICE)}"\n'
               f'key = "{certs.key(DEVICE)}"\n')
    path.write_text(f"""
[device]
id = "{DEVICE}"
data_dir = "{path.parent / 'data'}"

[local]
url = "{local.url}"

[uplink]
url = "{uplink.url}"
{tls}
[service]
grace_s = "5s"

[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{{ action = "forward" }}]
""")
    return path


class Agent:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config.parent / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.kill()


def test_a_running_agent_sends_ready_then_watchdog_pings_then_stopping(
    tmp_path: Path, local_broker: Broker, uplink_broker: Broker, agents: list[Agent]
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker)
    agent = Agent(cfg, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                        "WATCHDOG_USEC": "400000"})  # ping every 0.2 s
    agents.append(agent)
    seen: list[str] = []

    def until(line: str, after: int = -1) -> int:
        """Read datagrams until `line` shows up after index `after`; return its index."""
        while line not in seen[after + 1:]:
            try:
                seen.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pytest.fail(f"no {line} from the agent; got {seen}\n{agent.log()}")
        return seen.index(line, after + 1)

    ready_at = until("READY=1")
    until("WATCHDOG=1", after=ready_at)  # pings come from the running loop
    agent.proc.send_signal(signal.SIGTERM)
    until("STOPPING=1", after=ready_at)
    assert agent.proc.wait(30) == 0, agent.log()
    sock.close()


def test_the_agent_relays_over_mtls_with_make_certs_certificates(
    tmp_path: Path, local_broker: Broker, tls_broker: Broker, certs: Certs,
    agents: list[Agent],
) -> None:
    cfg = write_config(tmp_path / "agent.toml", local_broker, tls_broker, certs)
    operator = Tls(certs.ca, certs.cert("operator"), certs.key("operator"))
    sub = unique_topic("sensors")
    with Collector(tls_broker.url, f"fog/{DEVICE}/#", tls=operator) as cloud:
        agent = Agent(cfg)
        agents.append(agent)
        # Retained birth message: the agent is connected to the uplink over mTLS.
        status = cloud.wait_for(1, timeout=30, topic=f"fog/{DEVICE}/status")
        assert b"online" in status[-1].payload, agent.log()
        payloads = [f"reading {i}".encode() for i in range(20)]
        # The agent subscribes to the local bus on its own schedule: publish
        # one marker until it arrives, then the batch.
        deadline = time.monotonic() + 30
        while not cloud.snapshot(f"fog/{DEVICE}/{sub}/marker"):
            assert time.monotonic() < deadline, agent.log()
            publish_many(local_broker.url, f"{sub}/marker", [b"m"])
            time.sleep(0.1)
        publish_many(local_broker.url, sub, payloads)
        got = cloud.wait_for(len(payloads), timeout=30, topic=f"fog/{DEVICE}/{sub}")
        assert [m.payload for m in got] == payloads
    assert agent.stop() == 0, agent.log()
