"""The rollout's connection to the broker: its retained record and owner, the devices'
state reports (fed into the `Fleet` on paho's network thread) and their retained deploys.

Operator side only: paho is imported (with agent.ota.push) when a rollout runs, not with
the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.errors import ConnectError, OtaError
from agent.ota.rollout.fleet import Fleet

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from agent.ota.push import _Release, _Session


class Watch:
    """One connection to the broker, on the topics of one release's rollout."""

    def __init__(self, rel: _Release, broker: Any, prefix: str) -> None:
        from agent.ota import push as pushing  # paho: only when a rollout runs

        self.push_mod = pushing
        self.rel = rel
        self.broker = broker
        self.prefix = prefix
        self.topic = f"{prefix}/_rollouts/{rel.name}-{rel.version}"
        self.owner_topic = f"{self.topic}/owner"
        self.state_filter = f"{prefix}/+/models/{rel.name}/state"
        self.deploy_filter = f"{prefix}/+/models/{rel.name}/deploy"
        self.session: _Session = pushing._Session(broker)
        self.client: mqtt.Client = self.session.client
        self.client.on_message = self._on_message
        self.fleet = Fleet(rel.version, ())  # replaced once the record names the devices
        self.record_raw: bytes | None = None
        self.owner_raw: bytes | None = None
        self.deploys: set[str] | None = None  # devices whose retained deploy is this release
        self.owned = False  # the owner topic names this process

    # paho's network thread

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        levels = topic.split("/")
        if len(levels) == 5 and levels[2] == "models" and levels[0] == self.prefix:
            if levels[4] == "state":
                self.fleet.offer(levels[1], bytes(msg.payload))
                return
            if levels[4] == "deploy" and self.deploys is not None:
                if self._ours(bytes(msg.payload)):
                    with self.session.cond:
                        self.deploys.add(levels[1])
                return
        with self.session.cond:
            if topic == self.topic:
                self.record_raw = bytes(msg.payload)
            elif topic == self.owner_topic:
                self.owner_raw = bytes(msg.payload)
            self.session.cond.notify_all()
        with self.fleet.cond:  # wake the main loop: the record moved (--watch)
            self.fleet.changes += 1
            self.fleet.cond.notify_all()

    # the command's thread

    def subscribe(self, *filters: str) -> None:
        """Subscribe and return once their retained messages are in: a second SUBSCRIBE is
        the fence, Mosquitto answers it after the first one's retained messages. At QoS 0:
        retained QoS 1 messages wait behind the broker's in-flight window (20 by default)
        while the fence's SUBACK does not, so it came after the first 20 of 10,000. QoS 0
        loses nothing on a live connection, and a lost one ends the run (--resume)."""
        s = self.session
        _, mid = self.client.subscribe([(f, 0) for f in filters])
        _, fence = self.client.subscribe(f"{self.prefix}/_fence/{uuid.uuid4().hex}", qos=0)
        assert mid is not None and fence is not None
        s.wait(lambda: mid in s.subacks and fence in s.subacks, "a SUBACK")
        for f, code in zip(filters, s.subacks[mid], strict=False):
            if code >= 0x80:
                raise ConnectError(f"{self.broker.shown} refused the subscription to {f}: "
                                   f"0x{code:02X}")

    def publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Retained QoS 1, every reason code checked (push's publisher)."""
        window = max(1, min(self.push_mod.INFLIGHT,
                            self.session.server("ReceiveMaximum", 65535)))
        p = self.push_mod._Publisher(self.session, window)
        for topic, payload in items:
            p.publish(topic, payload)
        p.drain(items[0][0] if len(items) == 1 else f"{len(items)} messages")

    def check_lost(self) -> None:
        if self.session.lost is not None:
            raise ConnectError(f"lost {self.broker.shown}: {self.session.lost}; the rollout "
                               "stays on the broker: --resume continues it")

    def own(self) -> None:
        """Name this process on the owner topic (its last will clears it)."""
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "since": round(time.time(), 3)}).encode()
        self.publish([(self.owner_topic, me)])
        self.owned = True

    def deployed(self, devices: Sequence[str]) -> set[str]:
        """The devices whose retained deploy is this release (pushed before a crash)."""
        with self.session.cond:
            self.deploys = set()
        self.subscribe(self.deploy_filter)
        self.client.unsubscribe(self.deploy_filter)
        with self.session.cond:
            got, self.deploys = self.deploys, None
        return got & set(devices)

    def _ours(self, payload: bytes) -> bool:
        """A deploy of this release (with or without push's unsigned `locations`)."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and doc.get("signed") == self.rel.doc["signed"]

    def close(self) -> None:
        """Give the rollout up (its record stays): clear the owner, disconnect."""
        if self.owned and self.session.lost is None:
            with contextlib.suppress(ConnectError, OtaError):
                self.publish([(self.owner_topic, b"")])
            self.owned = False
