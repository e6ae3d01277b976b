"""Real Mosquitto brokers for the tests, one process per broker, on free ports.

Each broker starts from `broker-config/test.conf`, copied into the test's
temporary directory with the per-broker lines appended (listener, user,
persistence, extras). Never a mocked client.

    def test_x(broker): ...                        # one broker
    def test_y(local_broker, uplink_broker): ...   # an edge bus and a next hop
    def test_z(broker_factory):
        b = broker_factory("cloud", extra_conf="max_packet_size 1000", persistence=True)
        b.kill(); b.start()                        # kill -9 and come back on the same port
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import (
    ROOT,
    Broker,
    BrokerFactory,
    Certs,
    find_free_port,
    make_certs,
    port_open,
)

# Re-exported for old imports; new tests import these from `brokers`.
__all__ = ["ROOT", "Broker", "BrokerFactory", "Certs", "find_free_port", "port_open"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate (127.0.0.1, localhost) and client certificates
    for cam-frontdoor, cam-backyard, gateway and operator, made once per session."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Make and start brokers: `broker_factory(name, extra_conf="", persistence=False)`.

    Every broker made here is killed at teardown, whatever the test did.
    """
    made: list[Broker] = []

    def make(
        name: str = "broker",
        extra_conf: str = "",
        persistence: bool = False,
        *,
        port: int | None = None,
        tls: bool = False,
        start: bool = True,
    ) -> Broker:
        if any(b.name == name for b in made):
            raise ValueError(f"broker name {name!r} used twice in one test")
        broker = Broker(
            name, tmp_path / f"broker-{name}", port=port, extra_conf=extra_conf,
            persistence=persistence, tls=tls,
        )
        made.append(broker)
        if start:
            # A free port can be taken between probing and binding; try a few.
            for attempt in range(3):
                try:
                    broker.start()
                    break
                except RuntimeError:
                    if attempt == 2 or port is not None or "in use" not in broker.log():
                        raise
                    broker.port = find_free_port()
                    broker._write_conf()
        return broker

    try:
        yield make
    finally:
        for b in made:
            b.kill()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    return broker_factory("broker")


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory, certs: Certs) -> Broker:
    """A broker whose listener requires mutual TLS with certificates from `certs`."""
    return broker_factory("tls", extra_conf=certs.mtls_conf(), tls=True)


@pytest.fixture
def local_broker(broker_factory: BrokerFactory) -> Broker:
    """The device-local sensor bus."""
    return broker_factory("local")


@pytest.fixture
def uplink_broker(broker_factory: BrokerFactory) -> Broker:
    """The next hop (gateway or cloud)."""
    return broker_factory("uplink")
