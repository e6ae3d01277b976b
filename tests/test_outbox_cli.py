"""`fogwhisk outbox`: stats and peek beside a running agent; purge, retry-dead when stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from agent_proc import DEVICE, RELAY, AgentProcess, write_config
from brokers import Broker, BrokerFactory, find_free_port
from helpers import Collector, publish_many


def outbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "outbox", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def wait_stats(data_dir: Path, text: str, agent: AgentProcess, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        r = outbox("stats", "--data-dir", str(data_dir))
        if r.returncode == 0 and text in r.stdout:
            return r.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never showed {text!r}:\n{r.stdout}{r.stderr}\n"
                                 f"{agent.log()}")
        time.sleep(0.2)


def test_stats_and_peek_read_a_running_agents_backlog_and_purge_needs_a_stopped_agent_and_yes(
    tmp_path: Path, local_broker: Broker
) -> None:
    nowhere = f"mqtt://127.0.0.1:{find_free_port()}"  # the uplink is down all along
    cfg = write_config(tmp_path / "agent.toml", local_broker, nowhere, RELAY)
    data = tmp_path / "data"
    agent = AgentProcess(cfg)
    try:
        agent.wait_ready()
        deadline = time.monotonic() + 15
        # Until the agent's subscription is in, the local broker drops readings: repeat.
        while outbox("stats", "--data-dir", str(data)).returncode != 0 or \
                "0 messages waiting" in outbox("stats", "--data-dir", str(data)).stdout:
            assert time.monotonic() < deadline, agent.log()
            publish_many(local_broker.url, "sensors/probe", [b"p"])
            time.sleep(0.2)
        publish_many(local_broker.url, "sensors/hall/temp", [b"21.5"] * 30)
        out = wait_stats(data, "lane", agent)
        assert "messages waiting" in out and "dead letters: 0" in out
        peek = outbox("peek", "--data-dir", str(data), "-n", "3")
        assert peek.returncode == 0, peek.stderr
        assert f"fog/{DEVICE}/sensors/" in peek.stdout
        assert f"{DEVICE}:" in peek.stdout  # idempotency keys
        assert len(peek.stdout.strip().splitlines()) == 2 + 3  # header, rule, three rows
        busy = outbox("purge", "--data-dir", str(data), "--yes")
        assert busy.returncode == 1 and "stop it first" in busy.stderr
        assert agent.running
    finally:
        assert agent.stop() == 0, agent.log()
    r = outbox("purge", "--data-dir", str(data))
    assert r.returncode == 2 and "--yes" in r.stderr
    r = outbox("purge", "--data-dir", str(data), "--yes")
    assert r.returncode == 0, r.stderr
    assert "0 messages waiting" in outbox("stats", "--data-dir", str(data)).stdout


def test_a_message_too_large_for_the_uplink_is_dead_lettered_and_retry_dead_sends_it_later(
    tmp_path: Path, local_broker: Broker, broker_factory: BrokerFactory
) -> None:
    small = broker_factory("small", "max_packet_size 2000")
    big = os.urandom(5000)
    cfg = write_config(tmp_path / "agent.toml", local_broker, small, RELAY)
    data = tmp_path / "data"
    with Collector(small.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            deadline = time.monotonic() + 15
            while not cloud.snapshot(f"fog/{DEVICE}/sensors/after"):
                assert time.monotonic() < deadline, agent.log()
                publish_many(local_broker.url, "sensors/big", [big])
                publish_many(local_broker.url, "sensors/after", [b"ok"])
                time.sleep(0.2)
        finally:
            assert agent.stop() == 0, agent.log()
    out = outbox("stats", "--data-dir", str(data)).stdout
    assert "dead letters: 0" not in out, out
    dead = outbox("peek", "--data-dir", str(data), "--dead")
    assert f"fog/{DEVICE}/sensors/big" in dead.stdout and "5000" in dead.stdout, dead.stdout
    n_dead = len(dead.stdout.strip().splitlines()) - 2

    moved = outbox("retry-dead", "--data-dir", str(data))
    assert moved.returncode == 0, moved.stderr
    assert f"moved {n_dead} dead letters" in moved.stdout
    assert "dead letters: 0" in outbox("stats", "--data-dir", str(data)).stdout

    roomy = broker_factory("roomy")
    cfg2 = write_config(tmp_path / "agent.toml", local_broker, roomy, RELAY)
    with Collector(roomy.url, f"fog/{DEVICE}/sensors/big") as cloud:
        agent = AgentProcess(cfg2, log_name="second.log")
        try:
            got = cloud.wait_for(n_dead, timeout=15)
            assert all(m.payload == big for m in got)
        finally:
            assert agent.stop() == 0, agent.log()


def test_outbox_commands_fail_clearly_without_a_database(tmp_path: Path) -> None:
    r = outbox("stats", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "no outbox database" in r.stderr
