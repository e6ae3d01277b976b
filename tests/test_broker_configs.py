"""Every Mosquitto file in broker-config/ parses, starts and does what its comments say.

The shipped configs name production ports and paths (1883, 8883,
/var/lib/mosquitto, /etc/mosquitto/certs/fogwhisk). Here only those are
rewritten: ports to free ones on 127.0.0.1, paths into the test's temporary
directory or the test certificates, `user` to one that may write there, logs
to stderr. Every other line runs as shipped.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from brokers import ROOT, Broker, Certs, find_free_port, port_open
from helpers import (
    Collector,
    Tls,
    connect,
    make_client,
    publish_many,
    publish_one,
    unique_topic,
)

CONF_DIR = ROOT / "broker-config"
CONF_FILES = sorted(CONF_DIR.glob("*.conf"))
ACL_FILES = sorted(CONF_DIR.glob("*.acl"))
PASSWD_FILES = sorted(CONF_DIR.glob("*.passwd*"))
PATH_KEYS = {"cafile", "certfile", "keyfile", "bridge_cafile", "bridge_certfile",
             "bridge_keyfile", "acl_file", "password_file", "persistence_location"}
TOPIC_OK = re.compile(r"^[^#+]*(/\+|/#|\+|#)?([^#]*)$")


class ShippedBroker(Broker):
    """A Broker running a shipped config, localised to the test's directory."""

    def __init__(self, name: str, workdir: Path, text: str, ports: dict[int, int]) -> None:
        self.text = text
        self.ports = ports
        super().__init__(name, workdir)

    def _write_conf(self) -> None:
        self.conf_path.write_text(self.text)
        self.port = next(iter(self.ports.values()))

    def url_for(self, shipped_port: int, tls: bool = False) -> str:
        return f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.ports[shipped_port]}"


def localize(path: Path, workdir: Path, certs: Certs,
             bridge_to: int | None = None) -> tuple[str, dict[int, int]]:
    """The config text with ports, paths, user and logs rewritten; and the port map."""
    ports: dict[int, int] = {}
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            out.append(raw)
            continue
        key, _, rest = line.partition(" ")
        value = rest.strip()
        if key == "listener":
            shipped = int(value.split()[0])
            ports[shipped] = find_free_port()
            out.append(f"listener {ports[shipped]} 127.0.0.1")
        elif key == "user":
            out.append("user root" if os.geteuid() == 0 else "")
        elif key == "log_dest":
            out.append("log_dest stderr")
        elif key == "address":
            assert bridge_to is not None, f"{path.name}: a bridge needs a target in this test"
            out.append(f"address 127.0.0.1:{bridge_to}")
        elif key in PATH_KEYS:
            name = Path(value).name
            if key == "persistence_location":
                (workdir / "data").mkdir(parents=True, exist_ok=True)
                target = f"{workdir / 'data'}/"
            elif key in ("acl_file", "password_file"):
                found = [p for p in (CONF_DIR / name, CONF_DIR / f"{name}.example") if p.exists()]
                assert found, f"{path.name}: {key} {value}: no {name} in broker-config/"
                target = str(found[0])
            else:
                target = str(certs.dir / name)
                assert Path(target).exists(), f"{path.name}: {key} {name} is not made by make-certs"
            out.append(f"{key} {target}")
        else:
            out.append(raw)
    assert ports, f"{path.name} defines no listener"
    return "\n".join(out) + "\n", ports


def start_shipped(name: str, tmp_path: Path, certs: Certs,
                  bridge_to: int | None = None) -> ShippedBroker:
    workdir = tmp_path / name.replace(".", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    text, ports = localize(CONF_DIR / name, workdir, certs, bridge_to)
    broker = ShippedBroker(name, workdir, text, ports)
    broker.start()  # waits for the first listener; the others open in the same pass
    deadline = time.monotonic() + 10
    while not all(port_open("127.0.0.1", p) for p in ports.values()):
        assert broker.running and time.monotonic() < deadline, broker.log()
        time.sleep(0.02)
    return broker


@pytest.fixture
def shipped(tmp_path: Path, certs: Certs):  # type: ignore[no-untyped-def]
    started: list[ShippedBroker] = []

    def start(name: str, bridge_to: int | None = None) -> ShippedBroker:
        b = start_shipped(name, tmp_path, certs, bridge_to)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()


def test_there_are_configs_for_every_tier() -> None:
    names = {p.name for p in CONF_FILES}
    assert {"test.conf", "edge.conf", "gateway.conf", "cloud.conf", "cloud-tls.conf"} <= names


@pytest.mark.parametrize("conf", [p.name for p in CONF_FILES if p.name != "test.conf"])
def test_every_shipped_config_starts_and_listens_on_all_its_ports(conf: str, shipped) -> None:  # type: ignore[no-untyped-def]
    bridge_to = None
    if "connection " in (CONF_DIR / conf).read_text():
        bridge_to = shipped("cloud-tls.conf").ports[8883]
    broker = shipped(conf, bridge_to)
    assert broker.running, broker.log()
    for port in broker.ports.values():
        assert port_open("127.0.0.1", port), f"{conf}: port {port} closed\n{broker.log()}"
    assert "Error" not in broker.log(), broker.log()


def test_every_shipped_config_sets_tcp_nodelay() -> None:
    """Without it concurrent QoS1 publishes stall at a few hundred per second."""
    for path in CONF_FILES:
        lines = {line.strip() for line in path.read_text().splitlines()}
        assert "set_tcp_nodelay true" in lines, path.name


def test_no_persistent_config_keeps_the_default_queue_limit() -> None:
    """Past the default 1000 queued messages Mosquitto drops silently."""
    for path in CONF_FILES:
        text = path.read_text()
        if re.search(r"^persistence true", text, re.M):
            assert re.search(r"^max_queued_messages (0|\d{5,})$", text, re.M), path.name
            assert re.search(r"^max_queued_bytes \d+$", text, re.M), path.name


def test_the_edge_broker_queues_past_the_default_limit_for_an_offline_agent(
    shipped,  # type: ignore[no-untyped-def]
) -> None:
    """3,000 readings sent while the agent is away all wait for it (the default keeps 1,000)."""
    edge = shipped("edge.conf")
    url = edge.url_for(1883)
    topic = unique_topic("sensors")
    agent = Collector(url, topic, client_id="fogwhisk-edge-test-local", clean=False).start()
    agent.stop()  # disconnected; its session (and subscription) stays on the broker
    payloads = [f"{i}".encode() for i in range(3000)]
    publish_many(url, topic, payloads, qos=1, timeout=60)
    agent.reconnect()
    try:
        got = agent.wait_for(len(payloads), timeout=60)
        assert [m.payload for m in got] == payloads
    finally:
        agent.stop()


def test_the_gateway_bridge_carries_ota_down_to_the_device_listener_over_mtls(
    shipped, certs: Certs  # type: ignore[no-untyped-def]
) -> None:
    """A release published at the cloud reaches a device on the gateway's mTLS listener.

    Device traffic goes up through the gateway agent (tests/fabric/), not the bridge.
    """
    cloud = shipped("cloud-tls.conf")
    gateway = shipped("gateway.conf", bridge_to=cloud.ports[8883])
    with Collector(gateway.url_for(1883), "fog/_bridge/gateway/state") as state:
        while state.wait_for(1)[-1].payload != b"1":  # the bridge is up
            state.clear()
    deploy = f"fog/cam-frontdoor/models/{unique_topic('m').replace('/', '-')}/deploy"
    device = Tls(certs.ca, certs.cert("cam-frontdoor"), certs.key("cam-frontdoor"))
    operator = Tls(certs.ca, certs.cert("operator"), certs.key("operator"))
    publish_one(cloud.url_for(8883, tls=True), deploy, b"manifest", retain=True, tls=operator)
    with Collector(gateway.url_for(8883, tls=True), deploy, tls=device) as dev:
        assert [m.payload for m in dev.wait_for(1)] == [b"manifest"], gateway.log()


def test_the_bridge_session_outlives_a_gateway_restart(
    shipped, certs: Certs  # type: ignore[no-untyped-def]
) -> None:
    """An OTA manifest sent while the gateway is down reaches it after it restarts.

    This is what `cleansession false` (MQTT 3.1.1) buys on Mosquitto 2.0, which
    has no `bridge_session_expiry_interval`: the cloud keeps the bridge's session.
    """
    cloud = shipped("cloud-tls.conf")
    gateway = shipped("gateway.conf", bridge_to=cloud.ports[8883])
    local = gateway.url_for(1883)
    with Collector(local, "fog/_bridge/gateway/state") as state:
        while state.wait_for(1)[-1].payload != b"1":  # the bridge is up
            state.clear()
    deploy = "fog/cam-frontdoor/models/person/deploy"
    dev = Collector(local, deploy, client_id="persistent-device", clean=False).start()
    try:
        gateway.stop()
        operator = Tls(certs.ca, certs.cert("operator"), certs.key("operator"))
        publish_one(cloud.url_for(8883, tls=True), deploy, b"manifest v2", tls=operator)
        gateway.start()
        dev.reconnect()
        assert [m.payload for m in dev.wait_for(1)] == [b"manifest v2"]
    finally:
        dev.stop()


def test_the_device_acl_confines_each_device_to_its_own_prefix(
    shipped, certs: Certs  # type: ignore[no-untyped-def]
) -> None:
    """A device writes only fog/<its id>/# and reads only its own OTA manifests.

    Denied messages are sent before allowed ones on the same connection;
    Mosquitto handles one connection in order, so once the allowed one has
    arrived a denied one would have arrived before it.
    """
    cloud = shipped("cloud-tls.conf")
    url = cloud.url_for(8883, tls=True)

    def tls(name: str) -> Tls:
        return Tls(certs.ca, certs.cert(name), certs.key(name))

    with Collector(url, "fog/#", tls=tls("operator")) as seen:
        client = make_client(url, tls=tls("cam-frontdoor"))
        connect(client, url)
        for t in ("fog/cam-backyard/events/x", "other/topic", "fog/cam-frontdoor/events/x"):
            client.publish(t, t.encode(), qos=1).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
        seen.wait_for(1)
        assert [m.topic for m in seen.snapshot()] == ["fog/cam-frontdoor/events/x"]

    deploy = "fog/cam-frontdoor/models/person/deploy"
    filters = ["fog/cam-backyard/#", "fog/cam-frontdoor/models/+/deploy",
               "fog/cam-frontdoor/status"]
    with Collector(url, filters, tls=tls("cam-frontdoor")) as dev:
        publish_one(url, "fog/cam-backyard/events/y", b"not yours", tls=tls("operator"))
        publish_one(url, "fog/cam-frontdoor/status", b"not readable", tls=tls("operator"))
        publish_one(url, deploy, b"manifest", tls=tls("operator"))
        dev.wait_for(1)
        assert [(m.topic, m.payload) for m in dev.snapshot()] == [(deploy, b"manifest")]


def test_password_listener_accepts_the_example_credentials_and_refuses_others(
    shipped, certs: Certs  # type: ignore[no-untyped-def]
) -> None:
    cloud = shipped("cloud-tls.conf")
    url = cloud.url_for(8884, tls=True)
    good = make_client(url, tls=Tls(certs.ca), username="cam-frontdoor", password="change-me")
    connect(good, url)
    good.disconnect()
    good.loop_stop()
    bad = make_client(url, tls=Tls(certs.ca), username="cam-frontdoor", password="wrong")
    with pytest.raises(ConnectionError):
        connect(bad, url)
    bad.loop_stop()


@pytest.mark.parametrize("path", ACL_FILES, ids=lambda p: p.name)
def test_acl_files_are_well_formed(path: Path) -> None:
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        where = f"{path.name}:{n}: {line}"
        assert words[0] in ("user", "topic", "pattern"), where
        if words[0] == "user":
            assert len(words) == 2, where
            continue
        if len(words) == 3:
            assert words[1] in ("read", "write", "readwrite", "deny"), where
        assert len(words) in (2, 3), where
        topic = words[-1]
        for i, level in enumerate(topic.split("/")):
            assert level in ("+", "#") or ("+" not in level and "#" not in level), where
            assert level != "#" or i == len(topic.split("/")) - 1, where


@pytest.mark.parametrize("path", PASSWD_FILES, ids=lambda p: p.name)
def test_password_files_hold_only_hashed_entries(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        user, _, hashed = line.partition(":")
        assert user and re.fullmatch(r"\$[67]\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", hashed), line
