"""Any broker, and a cluster behind several endpoints.

`protocol = "auto"` (the default) speaks MQTT 5 first and falls back to 3.1.1,
at once and for good, at an endpoint that refuses MQTT 5 the way RabbitMQ 3.10
(a close before any CONNACK) or NATS 2.9 (the 3.1.1 CONNACK `20 02 00 01`)
do. `url = [A, B]` fails over from one endpoint to the next without losing a
reading. The 3.1.1-only brokers are `V311Front`s: a real Mosquitto behind a
front that refuses MQTT 5 as those brokers do (tests/interop/ has the real
RabbitMQ and NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker, BrokerFactory, find_free_port
from helpers import Collector, connect, make_client, publish_many
from v311_front import V311Front

from agent import config
from agent.cli import status as status_cli
from agent.config import BrokerConfig
from agent.errors import ConfigError
from agent.mqtt.connection import Connection
from agent.schema import Duration
from agent.telemetry import Telemetry

WAIT_S = 15.0
Refusal = Literal["close", "connack"]
REFUSALS: tuple[Refusal, ...] = ("close", "connack")  # RabbitMQ 3.10's way, NATS 2.9's way


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")


@contextlib.contextmanager
def front(broker: Broker, refuse: Literal["close", "connack", "everything"]
          ) -> Iterator[V311Front]:
    f = V311Front(broker.port, refuse)
    try:
        yield f
    finally:
        f.close()
        f.cut()


def conn_cfg(url: str, protocol: str) -> BrokerConfig:
    return BrokerConfig(url=url, protocol=protocol,  # type: ignore[arg-type]
                        reconnect_min_s=Duration(0.05), reconnect_max_s=Duration(0.2),
                        connect_timeout_s=Duration(5))


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run(), name=conn.name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def said(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if text in r.getMessage() and r.levelno >= level]


# -- protocol "auto" against one connection ---------------------------------------------------


@pytest.mark.parametrize("refuse", REFUSALS)
def test_auto_ends_on_311_at_a_broker_that_refuses_mqtt5_and_keeps_it_for_that_endpoint(
        refuse: Refusal, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """One MQTT 5 CONNECT, then 3.1.1 at once and on every reconnect after; a PUBLISH on
    3.1.1 is acknowledged (custody passes at the PUBACK) and arrives byte-identical, without
    the MQTT 5 properties 3.1.1 cannot carry."""
    acks: list[tuple[int, str]] = []
    with front(broker, refuse) as f, Collector(broker.url, "fog/dev1/#") as cloud:
        conn = Connection("uplink", conn_cfg(f.url, "auto"), "fogwhisk-dev1-uplink",
                          Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(conn.connected.is_set, "connected")
                assert conn.protocol == "3.1.1"
                assert conn.inbound_window == 20  # the outbox sizes its early commits on it
                conn.publish("fog/dev1/sensors/t", b'{"c": 21.5}',
                             user_properties=(("fogwhisk-id", "k1"),), expiry_s=60,
                             on_published=lambda rc, name: acks.append((rc, name)))
                await until(lambda: bool(acks), "the PUBACK")
                f.cut()  # the node goes away and comes back: still 3.1.1, no new trial
                await until(lambda: conn.counters.values["connects"] >= 2, "a reconnect")

        asyncio.run(scenario())
        got = cloud.wait_for(1, topic="fog/dev1/sensors/t")
    assert f.levels[:3] == [5, 4, 4], f.levels
    assert acks == [(0, "Success")]
    assert got[0].payload == b'{"c": 21.5}' and got[0].properties == {}
    assert conn.counters.info == {"endpoint": f.url, "protocol": "3.1.1"}
    assert len(said(caplog, "refused MQTT 5", logging.INFO)) == 1
    kept = said(caplog, f"{f.url} speaks MQTT 3.1.1; kept for this endpoint until restart",
                logging.INFO)
    assert len(kept) == 1, kept
    assert not said(caplog, "uplink", logging.ERROR)


def test_auto_speaks_mqtt5_to_a_broker_that_accepts_it(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto answers MQTT 5: no fallback, and the version is said once."""
    conn = Connection("uplink", conn_cfg(broker.url, "auto"), "fogwhisk-dev1-uplink",
                      Telemetry())

    async def scenario() -> None:
        async with running(conn):
            await until(conn.connected.is_set, "connected")

    asyncio.run(scenario())
    assert conn.protocol == "5" and conn.counters.info["protocol"] == "5"
    assert said(caplog, f"{broker.url} speaks MQTT 5", logging.INFO)
    assert said(caplog, f"connected to {broker.url} with MQTT 5", logging.INFO)
    assert not said(caplog, "refused MQTT 5")


def test_a_close_that_311_is_not_answered_either_is_not_taken_for_a_311_broker(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that closes every CONNECT (for some other reason) teaches nothing about its
    version: each round tries MQTT 5 first again, then 3.1.1 at once (said once)."""
    with front(broker, "everything") as f:
        conn = Connection("uplink", conn_cfg(f.url, "auto"), "fogwhisk-dev1-uplink",
                          Telemetry())

        async def scenario() -> None:
            async with running(conn):
                await until(lambda: len(f.levels) >= 6, "three rounds")

        asyncio.run(scenario())
    assert f.levels[:6] == [5, 4, 5, 4, 5, 4], f.levels
    assert conn.counters.values["connects"] == 0
    assert len(said(caplog, "refused MQTT 5", logging.INFO)) == 1
    assert len(said(caplog, "uplink: ", logging.ERROR)) == 1


@pytest.mark.parametrize("refuse", REFUSALS)
def test_protocol_5_at_a_311_only_broker_says_it_speaks_only_311_and_keeps_trying(
        refuse: Refusal, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """An explicit "5" is kept (no fallback), and the error says what to configure, once."""
    with front(broker, refuse) as f:
        conn = Connection("uplink", conn_cfg(f.url, "5"), "fogwhisk-dev1-uplink", Telemetry())

        async def scenario() -> None:
            async with running(conn) as task:
                await until(lambda: len(f.levels) >= 4, "four attempts")
                assert not task.done()

        asyncio.run(scenario())
    assert set(f.levels) == {5}, f.levels
    assert conn.counters.values["connects"] == 0
    errors = said(caplog, "uplink: ", logging.ERROR)
    assert len(errors) == 1, errors
    assert 'protocol = "auto"' in errors[0], errors
    assert "speaks only MQTT 3.1.1" in errors[0], errors
    if refuse == "connack":
        assert "(0x84)" in errors[0]


# -- url = [A, B] -------------------------------------------------------------------------------


def test_a_connection_moves_to_the_next_endpoint_when_one_is_down(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """The first endpoint refuses connections: the second is used, and said."""
    dead = f"mqtt://127.0.0.1:{find_free_port()}"
    cfg = replace_urls(conn_cfg(dead, "auto"), (dead, broker.url))
    conn = Connection("uplink", cfg, "fogwhisk-dev1-uplink", Telemetry())

    async def scenario() -> None:
        async with running(conn):
            await until(conn.connected.is_set, "connected")

    asyncio.run(scenario())
    assert conn.where == broker.url and conn.counters.info["endpoint"] == broker.url
    assert conn.counters.values["failovers"] >= 1
    assert said(caplog, f"uplink: failing over from {dead} to {broker.url}", logging.INFO)


def replace_urls(cfg: BrokerConfig, urls: tuple[str, ...]) -> BrokerConfig:
    return dataclasses.replace(cfg, url=urls[0], urls=urls)


@pytest.mark.parametrize(("urls", "key"), [
    ('["mqtt://127.0.0.1:1884", "mqtt://127.0.0.1:0"]', "uplink.url[1]: 'mqtt://127.0.0.1:0'"),
    ('["mqtt://127.0.0.1:1884", "mqtt://:1885"]', "uplink.url[1]: 'mqtt://:1885' has no host"),
    ('["http://127.0.0.1:1884", "mqtt://127.0.0.1:1885"]', "uplink.url[0]: 'http://"),
    ('["mqtt://127.0.0.1:1884", 1885]', "uplink.url[1]: expected a string"),
    ('["mqtt://127.0.0.1:1884", "mqtt://u:S3cret@10.0.0.9:1885"]',
     "uplink.url[1]: 'mqtt://u:***@10.0.0.9:1885' holds a password"),
    ("[]", "uplink.url: an empty list"),
])
def test_a_bad_url_in_the_list_fails_the_config_naming_its_index(
        tmp_path: Path, urls: str, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "d"\ndata_dir = "{tmp_path}"\n[uplink]\nurl = {urls}\n')
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    assert f"agent.toml: {key}" in str(refused.value)
    assert "S3cret" not in str(refused.value)


def test_a_url_list_keeps_url_as_its_first_endpoint(tmp_path: Path) -> None:
    """Code that knows one broker (`url`, `host`, `port`, `tls`) reads the first endpoint;
    protocol "auto" is the default of both connections."""
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "d"\ndata_dir = "{tmp_path}"\n[uplink]\n'
                    'url = ["mqtts://a.example:8883", "mqtts://b.example:8884"]\n'
                    'ca = "ca.pem"\n')
    cfg = config.load(path)
    assert cfg.uplink.urls == ("mqtts://a.example:8883", "mqtts://b.example:8884")
    assert (cfg.uplink.url, cfg.uplink.host, cfg.uplink.port, cfg.uplink.tls) == (
        "mqtts://a.example:8883", "a.example", 8883, True)
    assert cfg.local.urls == (cfg.local.url,)
    assert cfg.local.protocol == cfg.uplink.protocol == "auto"


@pytest.mark.parametrize(("uplink", "loops"), [
    ('["mqtt://192.0.2.1:1883", "mqtt://localhost:1883"]', True),
    ('["mqtt://192.0.2.1:1883", "mqtt://localhost:1884"]', False),
])
def test_a_trigger_on_its_own_topics_is_refused_when_any_uplink_endpoint_is_the_local_bus(
        tmp_path: Path, uplink: str, loops: bool) -> None:
    """The agent would read back what it sends through that endpoint, without end."""
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "d"\ndata_dir = "{tmp_path}"\n'
                    '[local]\nurl = "mqtt://127.0.0.1:1883"\n'
                    f'[uplink]\nurl = {uplink}\n'
                    '[[pipeline]]\nname = "p"\ntrigger = "fog/#"\n'
                    'steps = [{ action = "forward" }]\n')
    if not loops:
        config.load(path)
        return
    with pytest.raises(ConfigError, match="matches the agent's own topics"):
        config.load(path)


def test_check_config_shows_every_endpoint_without_its_password_and_refuses_a_bad_one(
        tmp_path: Path) -> None:
    """`check-config` prints the list (passwords masked), and exits 2 naming the bad item."""
    path = tmp_path / "agent.toml"
    head = f'[device]\nid = "d"\ndata_dir = "{tmp_path}"\n'
    path.write_text(head + '[uplink]\nurl = ["mqtts://u:S3cret@a.example:8883", '
                    '"mqtts://u:S3cret@b.example:8883"]\n')
    ok = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)["uplink"]
    assert shown["urls"] == ["mqtts://u:***@a.example:8883", "mqtts://u:***@b.example:8883"]
    assert "S3cret" not in ok.stdout + ok.stderr
    path.write_text(head + '[uplink]\nurl = ["mqtts://a.example:8883", "mqtts://b.example:x"]\n')
    bad = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "agent.toml: uplink.url[1]: 'mqtts://b.example:x'" in bad.stderr, bad.stderr


# -- the agent process ------------------------------------------------------------------------


def agent_config(tmp_path: Path, local: str, uplink: str | list[str], *,
                 uplink_protocol: str | None = None) -> Path:
    """The relay config with `uplink` as one URL or a TOML list of them."""
    marker = "mqtt://127.0.0.1:1"  # replaced below: write_config quotes one URL
    cfg = write_config(tmp_path / "agent.toml", local, marker, RELAY)
    text = cfg.read_text()
    value = json.dumps(uplink)  # a JSON string or array of strings is TOML too
    text = text.replace(f'url = "{marker}"', f"url = {value}", 1)
    if uplink_protocol is not None:
        text = text.replace("[uplink]\n", f'[uplink]\nprotocol = "{uplink_protocol}"\n', 1)
    cfg.write_text(text)
    return cfg


class Readings:
    """Numbered QoS 1 readings on the local bus (a thread), and those PUBACKed there."""

    def __init__(self, url: str, topic: str = "sensors/t", per_tick: int = 10) -> None:
        self.topic = topic
        self.per_tick = per_tick
        self.accepted: list[bytes] = []
        self._n = 0
        self._stop = threading.Event()
        self._client = make_client(url)
        connect(self._client, url)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            infos = []
            for _ in range(self.per_tick):
                payload = f"reading {self._n}".encode()
                self._n += 1
                infos.append((payload, self._client.publish(self.topic, payload, 1)))
            for payload, info in infos:
                info.wait_for_publish(30)
                if info.is_published():
                    self.accepted.append(payload)
            time.sleep(0.05)

    def __enter__(self) -> Readings:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self._client.disconnect()
        self._client.loop_stop()


def wait_until(cond: Callable[[], bool], what: str, agent: AgentProcess,
               timeout_s: float = 30) -> None:
    """Wait for `cond` while the agent runs; fail with its log otherwise."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert agent.running, f"the agent exited waiting for {what}:\n{agent.log()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n{agent.log()}"
        time.sleep(0.02)


def relayed(*clouds: Collector) -> set[bytes]:
    return {m.payload for c in clouds for m in c.snapshot(f"fog/{DEVICE}/sensors/t")
            if m.payload.startswith(b"reading ")}


def wait_all(accepted: list[bytes], clouds: tuple[Collector, ...], agent: AgentProcess,
             timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not set(accepted) <= relayed(*clouds):
        if time.monotonic() > deadline:
            missing = sorted(set(accepted) - relayed(*clouds))
            raise AssertionError(f"{len(missing)} of {len(accepted)} readings never arrived "
                                 f"(first: {missing[:5]}):\n{agent.log()[-4000:]}")
        time.sleep(0.1)


def last_telemetry(cloud: Collector, agent: AgentProcess,
                   cond: Callable[[dict[str, Any]], bool], timeout_s: float = WAIT_S
                   ) -> dict[str, Any]:
    """The first telemetry document at `cloud` for which `cond` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        for m in cloud.snapshot(f"fog/{DEVICE}/telemetry"):
            doc: dict[str, Any] = json.loads(m.payload)
            if cond(doc):
                return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"no such telemetry within {timeout_s} s:\n{agent.log()}")
        time.sleep(0.1)


def test_the_agent_on_auto_relays_every_reading_between_brokers_that_speak_only_311(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    """The local bus refuses MQTT 5 as NATS does, the uplink as RabbitMQ does: both end on
    3.1.1, every reading arrives, also those sent into a dead uplink connection (a row
    leaves the outbox only at its PUBACK, as with MQTT 5), and telemetry names both
    versions."""
    local, cloud_broker = broker_factory("local"), broker_factory("cloud")
    with front(local, "connack") as local_front, front(cloud_broker, "close") as up_front, \
            Collector(cloud_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(agent_config(tmp_path, local_front.url, up_front.url))
        try:
            agent.wait_ready()
            prime(local, cloud, agent, "sensors/t")
            with Readings(local.url) as readings:
                wait_until(lambda: len(relayed(cloud)) >= 100, "100 readings relayed", agent)
                up_front.blackhole()  # what the agent sends now is never acknowledged ...
                held = len(readings.accepted)
                wait_until(lambda: len(readings.accepted) >= held + 50, "50 more", agent)
                up_front.forward()  # ... and is lost with the cut that ends the blackhole
                wait_until(lambda: len(readings.accepted) >= held + 150, "100 more", agent)
            wait_all(readings.accepted, (cloud,), agent)
            doc = last_telemetry(cloud, agent, lambda d: "mqtt_local" in d)
        finally:
            assert agent.stop() == 0, agent.log()
    assert doc["mqtt_local"]["protocol"] == doc["mqtt_uplink"]["protocol"] == "3.1.1"
    assert doc["mqtt_local"]["endpoint"] == local_front.url
    assert doc["mqtt_uplink"]["endpoint"] == up_front.url
    log = agent.log()
    assert f"local: {local_front.url} speaks MQTT 3.1.1" in log
    assert f"uplink: {up_front.url} speaks MQTT 3.1.1" in log
    assert local_front.levels[:2] == up_front.levels[:2] == [5, 4]
    assert 5 not in local_front.levels[2:] + up_front.levels[2:]


def test_an_agent_on_protocol_5_at_a_311_only_uplink_says_so_keeps_running_and_every_reading(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """protocol = "5" is kept: the log says the broker speaks only 3.1.1 and to set "auto";
    the agent keeps running and keeps what it accepted: once restarted on "auto", all of
    it arrives."""
    with front(uplink_broker, "close") as up_front, \
            Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(agent_config(tmp_path, local_broker.url, up_front.url,
                                          uplink_protocol="5"))
        try:
            agent.wait_ready()
            agent.wait_log('protocol = "auto" in [uplink] falls back to 3.1.1')
            with Readings(local_broker.url) as readings:
                wait_until(lambda: len(readings.accepted) >= 50, "50 readings", agent)
            wait_until(lambda: up_front.levels.count(5) >= 4, "four attempts", agent)
            assert agent.running
        finally:
            assert agent.stop() == 0, agent.log()
        assert agent.log().count("falls back to 3.1.1") == 1, agent.log()
        assert 4 not in up_front.levels
        again = AgentProcess(agent_config(tmp_path, local_broker.url, up_front.url),
                             log_name="agent-auto.log")
        try:
            again.wait_ready()
            wait_all(readings.accepted, (cloud,), again)
        finally:
            assert again.stop() == 0, again.log()


def test_failover_from_a_killed_node_loses_no_reading_and_reports_the_new_endpoint(
        tmp_path: Path, broker_factory: BrokerFactory, local_broker: Broker) -> None:
    """url = [A, B]; A hangs mid-stream, then is killed -9: what the agent sent A meanwhile
    was never acknowledged and goes again to B, so a subscriber on each node sees, together,
    every reading; status and telemetry on B name B as the endpoint in use."""
    a, b = broker_factory("a"), broker_factory("b")
    with Collector(a.url, f"fog/{DEVICE}/#") as on_a, \
            Collector(b.url, f"fog/{DEVICE}/#") as on_b:
        agent = AgentProcess(agent_config(tmp_path, local_broker.url, [a.url, b.url]))
        try:
            agent.wait_ready()
            prime(local_broker, on_a, agent, "sensors/t")
            with Readings(local_broker.url) as readings:
                wait_until(lambda: len(relayed(on_a)) >= 100, "100 readings on A", agent)
                assert a.proc is not None
                os.kill(a.proc.pid, signal.SIGSTOP)  # sent to A from now on: never acked
                frozen = len(readings.accepted)
                wait_until(lambda: len(readings.accepted) >= frozen + 50, "50 more", agent)
                a.kill()
                wait_until(lambda: len(readings.accepted) >= frozen + 200, "200 more", agent)
            wait_all(readings.accepted, (on_a, on_b), agent)
            in_flight = set(readings.accepted[frozen:frozen + 20])  # the first window to A
            doc = last_telemetry(on_b, agent,
                                 lambda d: d.get("mqtt_uplink", {}).get("endpoint") == b.url)
            status = [json.loads(m.payload) for m in on_b.snapshot(f"fog/{DEVICE}/status")]
        finally:
            assert agent.stop() == 0, agent.log()
    assert in_flight <= relayed(on_b) and not in_flight & relayed(on_a)
    assert doc["mqtt_uplink"]["protocol"] == "5"
    assert doc["mqtt_uplink"]["failovers"] >= 1
    assert any(s.get("state") == "online" and s.get("endpoint") == b.url for s in status), status
    assert f"uplink: failing over from {a.url} to {b.url}" in agent.log()


# -- fogwhisk status ------------------------------------------------------------------------


@pytest.mark.parametrize("refuse", REFUSALS)
def test_fogwhisk_status_reads_a_311_only_broker_too(refuse: Refusal, broker: Broker) -> None:
    """`fogwhisk status` asks in MQTT 5, then in 3.1.1 where MQTT 5 is refused."""
    doc = {"state": "online", "device": "dev1", "endpoint": "mqtt://b:1884", "protocol": "3.1.1"}
    publish_many(broker.url, "fog/dev1/status", [json.dumps(doc)], retain=True)
    with front(broker, refuse) as f:
        status, _ = status_cli.fetch(f.url, "dev1", "fog", timeout_s=1.0)
    assert status == doc
    assert f.levels[-1] == 4


def test_fogwhisk_status_names_the_endpoint_and_version_each_connection_uses() -> None:
    telemetry = {"uptime_s": 5, "pipelines": {},
                 "mqtt_uplink": {"connects": 2, "failovers": 1, "endpoint": "mqtt://b:1884",
                                 "protocol": "3.1.1"},
                 "mqtt_local": {"connects": 1}}
    text = status_cli.render("dev1", {"state": "online"}, telemetry, now=0.0)
    assert "uplink   mqtt://b:1884 (MQTT 3.1.1): connects 2, failovers 1" in text, text
    assert "local    connects 1" in text, text
