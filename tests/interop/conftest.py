"""Fixtures for the interop tests: RabbitMQ and NATS as the test's own processes.

The brokers come from Debian (`scripts/setup --interop`); `scripts/test` only
collects this directory when they are installed. Each broker is started once per
session (RabbitMQ takes seconds to boot; the cluster once per module) on free
ports with its own data directory, and stopped at the end by its pid, epmd
included. Tests that restart or kill a broker leave it running again for the
next test; tests use their own device id and topics, so what one test retains
does not meet another.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Certs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "chaos"))

from interop_brokers import (
    NATS_ACK_WAIT_S,
    Epmd,
    NatsServer,
    RabbitCluster,
    RabbitNode,
    installed,
)


@pytest.fixture(scope="session", autouse=True)
def _brokers_installed() -> None:
    if not installed():
        pytest.fail("tests/interop needs rabbitmq-server and nats-server: run "
                    "scripts/setup --interop (as root), or leave this directory out "
                    "(scripts/test does when they are missing)", pytrace=False)


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RabbitNode]:
    """One RabbitMQ 3.10 node with rabbitmq_mqtt (MQTT 3.1.1) on free ports: plain
    (`url`) and mutual TLS with the session's test certificates (`tls_port`)."""
    workdir = tmp_path_factory.mktemp("rabbit")
    epmd = Epmd(workdir / "epmd").start()
    node = RabbitNode("single", workdir / "node", epmd, tls=certs)
    try:
        yield node.start()
    finally:
        node.kill()
        epmd.stop()


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes on this machine, clustered (`rabbitmqctl join_cluster`);
    stopped once the module is done (three idle VMs would stay for the whole suite)."""
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """nats-server 2.9 with JetStream and MQTT as a cloud broker: `ack_wait` 30 s, its
    default (a shorter one resends to a subscriber that is merely busy: duplicates)."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), ack_wait="30s")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def nats_bus(tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server as a device's local bus, `ack_wait` NATS_ACK_WAIT_S: what the agent
    took but never acknowledged (a crash) comes again after that long."""
    server = NatsServer(tmp_path / "nats-bus", ack_wait=f"{NATS_ACK_WAIT_S:g}s")
    try:
        yield server.start()
    finally:
        server.stop()
