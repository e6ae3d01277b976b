"""The gateway's Mosquitto bridge (broker-config/gateway.conf) with RabbitMQ as the cloud.

The shipped file bridges to a Mosquitto cloud; its comment names the two lines a
cloud broker that is not Mosquitto needs (`try_private false`, `notifications
false`). Here they are applied to the shipped text, ports and paths localised as
in test_broker_configs, and the bridge runs over mutual TLS with the test
certificates to RabbitMQ's TLS listener.
"""

from __future__ import annotations

from pathlib import Path

from brokers import Certs
from helpers import Collector, publish_many
from interop_brokers import RabbitNode
from interop_util import MQTT311, wait_until
from test_broker_configs import CONF_DIR, ShippedBroker, localize

BRIDGE_ID = "fogwhisk-bridge-gateway"  # remote_clientid in gateway.conf
FOR_ANY_BROKER = {"try_private true": "try_private false",
                  "notifications true": "notifications false"}


def start_gateway(rabbit: RabbitNode, tmp_path: Path, certs: Certs,
                  any_broker: bool) -> ShippedBroker:
    assert rabbit.tls_port is not None
    workdir = tmp_path / "gateway"
    text, ports = localize(CONF_DIR / "gateway.conf", workdir, certs, bridge_to=rabbit.tls_port)
    if any_broker:
        for shipped, instead in FOR_ANY_BROKER.items():
            assert f"#   {instead}" in text, f"gateway.conf does not say {instead!r}"
            assert shipped in text
            text = text.replace(shipped, instead)
    gateway = ShippedBroker("gateway", workdir, text, ports)
    gateway.start()
    return gateway


def test_the_gateway_bridge_brings_releases_down_from_rabbitmq_over_mtls(
        rabbit: RabbitNode, tmp_path: Path, certs: Certs) -> None:
    """With the lines gateway.conf gives for a broker that is not Mosquitto, the bridge
    connects to RabbitMQ under its fixed client id, and a release and an artifact chunk
    published retained in the cloud reach the gateway broker."""
    gateway = start_gateway(rabbit, tmp_path, certs, any_broker=True)
    try:
        wait_until("RabbitMQ lists the bridge", lambda: BRIDGE_ID in rabbit.mqtt_client_ids(),
                   30, interval_s=0.5)
        deploy = "fog/cam-frontdoor/models/person/deploy"
        chunk = "fog/_artifacts/person/3/0"
        with Collector(gateway.url_for(1883), [deploy, chunk]) as local:
            publish_many(rabbit.url, deploy, [b"signed release"], retain=True, protocol=MQTT311)
            publish_many(rabbit.url, chunk, [bytes(range(256)) * 64], retain=True,
                         protocol=MQTT311)
            got = {m.topic: m.payload for m in local.wait_for(2, timeout=20)}
        assert got == {deploy: b"signed release", chunk: bytes(range(256)) * 64}
    finally:
        gateway.kill()


def test_as_shipped_for_a_mosquitto_cloud_the_bridge_cannot_connect_to_rabbitmq(
        rabbit: RabbitNode, tmp_path: Path, certs: Certs) -> None:
    """With `try_private true` the bridge's CONNECT carries protocol level 0x84, which
    RabbitMQ closes as a framing error: why gateway.conf says `try_private false` is
    required for other brokers."""
    log = rabbit.log_file()
    before = log.read_text().count("protocol_header_corrupt")
    gateway = start_gateway(rabbit, tmp_path, certs, any_broker=False)
    try:
        wait_until("RabbitMQ refuses the bridge's CONNECT",
                   lambda: log.read_text().count("protocol_header_corrupt") > before, 30)
        assert BRIDGE_ID not in rabbit.mqtt_client_ids()
    finally:
        gateway.kill()
