"""Subscriptions added to a live Connection at run time (the OTA fetcher's chunks on the
uplink): their messages reach their own handler, they outlive a reconnect, they end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from brokers import Broker
from helpers import publish_many, publish_one, unique_topic
from proxy import Proxy
from test_mqtt_hardening import (
    CONNACK_V5,
    CONNECT,
    DISCONNECT,
    SUBSCRIBE,
    FakeBroker,
    Peer,
    hold,
    packet,
)

from agent.config import BrokerConfig
from agent.errors import ConnectError
from agent.mqtt.connection import Connection, Inbound
from agent.schema import Duration
from agent.telemetry import Telemetry

WAIT_S = 10.0


class Got:
    """A handler: records the payloads per topic and acknowledges."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    def __call__(self, msg: Inbound) -> None:
        self.messages.append((msg.topic, msg.payload, msg.retain))
        msg.ack()

    def payloads(self) -> list[bytes]:
        return [p for _, p, _ in self.messages]


def uplink(url: str, protocol: str = "5", **kw: object) -> Connection:
    cfg = BrokerConfig(url=url, protocol=protocol,  # type: ignore[arg-type]
                       reconnect_min_s=Duration(0.05), reconnect_max_s=Duration(0.2),
                       connect_timeout_s=Duration(5))
    return Connection("uplink", cfg, "fogwhisk-dev1-uplink", Telemetry(),
                      **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(conn: Connection) -> AsyncIterator[None]:
    task = asyncio.create_task(conn.run())
    try:
        await asyncio.wait_for(conn.connected.wait(), WAIT_S)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: object, what: str) -> None:
    assert callable(cond)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not cond():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def publish(url: str, topic: str, payload: bytes, retain: bool = False) -> None:
    await asyncio.to_thread(publish_one, url, topic, payload, retain=retain)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_subscription_added_to_a_live_uplink_brings_retained_and_new_messages_to_its_handler(
        broker: Broker, protocol: str) -> None:
    """The uplink has no message handler of its own; a run-time subscription brings the
    retained message and later ones to the handler given, and unsubscribe ends it."""
    base = unique_topic("fog/_artifacts")
    got = Got()

    async def scenario() -> None:
        await publish(broker.url, f"{base}/0", b"retained", retain=True)
        conn = uplink(broker.url, protocol)
        async with running(conn):
            await conn.subscribe(((f"{base}/+", 1),), got)
            await until(lambda: got.payloads() == [b"retained"], "the retained message came")
            await publish(broker.url, f"{base}/1", b"live")
            await until(lambda: got.payloads() == [b"retained", b"live"], "the live one came")
            await conn.unsubscribe((f"{base}/+",))
            await publish(broker.url, f"{base}/2", b"after")
            await publish(broker.url, f"{base}/3", b"after")
            await asyncio.sleep(0.3)
            assert conn.counters.values.get("handler_errors", 0) == 0

    asyncio.run(scenario())
    assert got.payloads() == [b"retained", b"live"]


def test_a_run_time_subscription_is_renewed_after_the_link_is_cut(broker: Broker) -> None:
    """After a cut the connection subscribes again to what was added at run time (the
    retained message comes again); an unsubscribed filter stays gone."""
    base = unique_topic("fog/_artifacts")
    got, gone = Got(), Got()
    proxy = Proxy(broker.port)

    async def scenario() -> None:
        await publish(broker.url, f"{base}/a", b"A", retain=True)
        await publish(broker.url, f"{base}/b", b"B", retain=True)
        conn = uplink(proxy.url)
        async with running(conn):
            await conn.subscribe(((f"{base}/a", 1),), got)
            await conn.subscribe(((f"{base}/b", 1),), gone)
            await until(lambda: got.payloads() == [b"A"] and gone.payloads() == [b"B"],
                        "both retained messages came")
            await conn.unsubscribe((f"{base}/b",))
            proxy.cut()
            await until(lambda: not conn.connected.is_set(), "the cut was noticed")
            await asyncio.wait_for(conn.connected.wait(), WAIT_S)
            await until(lambda: got.payloads() == [b"A", b"A"], "the retained one came again")
            await publish(broker.url, f"{base}/a", b"A2")
            await publish(broker.url, f"{base}/b", b"B2")
            await until(lambda: got.payloads()[-1:] == [b"A2"], "the live one came")
            await asyncio.sleep(0.2)

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()
    assert gone.payloads() == [b"B"]


def test_a_subscription_added_while_disconnected_is_made_at_the_next_connect(
        broker: Broker) -> None:
    """subscribe() while the broker is away returns at once; the CONNECT after brings
    the subscription and its retained message."""
    base = unique_topic("fog/_artifacts")
    got = Got()
    proxy = Proxy(broker.port)

    async def scenario() -> None:
        await publish(broker.url, f"{base}/info", b"{}", retain=True)
        conn = uplink(proxy.url)
        async with running(conn):
            proxy.refuse()
            await until(lambda: not conn.connected.is_set(), "the link is down")
            await asyncio.wait_for(conn.subscribe(((f"{base}/info", 1),), got), WAIT_S)
            proxy.forward()
            await until(lambda: got.payloads() == [b"{}"], "the retained message came")

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_a_refused_run_time_subscription_raises_naming_the_filter() -> None:
    """A filter the broker refuses (SUBACK 0x87) raises ConnectError naming the filter
    and the reason, and is not asked for again at the next connect; the granted one
    stays, and the connection lives on."""
    subscribes: list[bytes] = []

    def script(peer: Peer, n: int) -> None:
        peer.expect(CONNECT)
        peer.send(CONNACK_V5)
        if n == 0:
            sub = peer.expect(SUBSCRIBE)
            subscribes.append(sub)
            peer.send(packet(0x90, sub[:2] + b"\x00" + b"\x01\x87"))
            peer.expect(DISCONNECT)  # the test's "cut": the client leaves, comes back
            return
        sub = peer.expect(SUBSCRIBE)
        subscribes.append(sub)
        peer.send(packet(0x90, sub[:2] + b"\x00\x01"))
        hold(peer)

    with FakeBroker(script) as fake:
        async def scenario() -> None:
            conn = uplink(fake.url)
            async with running(conn):
                with pytest.raises(ConnectError, match=r"'secret/x'.*Not authorized \(0x87\)"):
                    await conn.subscribe((("fog/_artifacts/x/+", 1), ("secret/x", 1)), Got())
                assert conn.connected.is_set()
                assert conn._proto is not None
                conn._proto.fail("test", 0x98)  # disconnect; the client connects again
                await until(lambda: len(subscribes) == 2, "subscribed again")

        asyncio.run(scenario())
    assert b"fog/_artifacts/x/+" in subscribes[1]
    assert b"secret/x" not in subscribes[1]


def test_messages_of_a_dropped_subscription_are_acknowledged_not_redelivered_forever(
        broker: Broker) -> None:
    """With a persistent session, messages queued for a run-time subscription the
    process no longer has (a restart) are acknowledged unread and counted as unrouted,
    so they do not come again."""
    base = unique_topic("fog/_artifacts")
    got, other = Got(), Got()

    async def scenario() -> None:
        first = uplink(broker.url)
        async with running(first):
            await first.subscribe(((f"{base}/+", 1),), got)
        # The session keeps the subscription; a new process (no route) connects later.
        await asyncio.to_thread(publish_many, broker.url, f"{base}/0", [b"q1", b"q2"])
        second = uplink(broker.url)
        await second.subscribe(((f"{base}/other", 1),), other)  # routes, none for these
        async with running(second):
            await until(lambda: second.counters.values.get("unrouted", 0) == 2,
                        "both queued messages were acknowledged unread")
        third = uplink(broker.url)
        async with running(third):
            await asyncio.sleep(0.3)
            assert third.counters.values.get("received", 0) == 0

    asyncio.run(scenario())
    assert got.payloads() == [] and other.payloads() == []
