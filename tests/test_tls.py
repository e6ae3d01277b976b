"""Mutual TLS with the certificates `scripts/make-certs` issues, against real Mosquitto."""

from __future__ import annotations

import pytest
from brokers import Broker, Certs
from helpers import Collector, Tls, connect, make_client, publish_one, unique_topic


def device_tls(certs: Certs, name: str) -> Tls:
    return Tls(ca=certs.ca, cert=certs.cert(name), key=certs.key(name))


def test_a_device_certificate_round_trips_a_message_over_mtls(
    tls_broker: Broker, certs: Certs
) -> None:
    assert tls_broker.url.startswith("mqtts://")
    topic = unique_topic("fog")
    with Collector(tls_broker.url, topic, tls=device_tls(certs, "operator")) as c:
        publish_one(tls_broker.url, topic, b"over tls", tls=device_tls(certs, "cam-frontdoor"))
        assert c.wait_for(1)[0].payload == b"over tls"


def test_a_client_without_a_certificate_is_refused(tls_broker: Broker, certs: Certs) -> None:
    client = make_client(tls_broker.url, tls=Tls(ca=certs.ca))
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        connect(client, tls_broker.url, timeout=5)
    client.loop_stop()


def test_the_server_certificate_is_checked_against_the_ca(
    tls_broker: Broker, certs: Certs
) -> None:
    """A client that trusts another CA (here: the server's own leaf) will not connect."""
    client = make_client(tls_broker.url, tls=Tls(
        ca=certs.cert("gateway"), cert=certs.cert("cam-frontdoor"), key=certs.key("cam-frontdoor"),
    ))
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        connect(client, tls_broker.url, timeout=5)
    client.loop_stop()
