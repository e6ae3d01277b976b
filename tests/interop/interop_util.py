"""What the interop tests share: agent configs for other brokers, subscribers that ride
out a broker restart, and the verdict on whose a missing reading is.

Custody: a reading is the agent's once the local broker PUBACKed it to the sensor
(`Stream.accepted`). It stays in the agent's outbox until the uplink broker
answers its PUBLISH with a success PUBACK; `AckTap`, a proxy between the agent
and the broker, reads those PUBACKs off the wire. A reading the broker
acknowledged and then never delivered is the broker's loss; one it never
acknowledged and that never arrived is the agent's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from agent_proc import AgentProcess, write_config
from brokers import Broker
from helpers import Collector, publish_many

MQTT311 = mqtt.MQTTv311
RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture


def device_id(what: str) -> str:
    """A device id no other test uses: retained status of one test never meets another."""
    return f"interop-{what}-{uuid.uuid4().hex[:6]}"


def agent_config(path: Path, local: Broker | str, uplink: str | Sequence[str], pipelines: str,
                 *, device: str, uplink_protocol: str | None = "3.1.1",
                 extra: str = "") -> Path:
    """`write_config` with the uplink's protocol and, for a list, every endpoint.

    `uplink_protocol=None` leaves the key out (the default, "auto").
    """
    urls = [uplink] if isinstance(uplink, str) else list(uplink)
    uplink_extra = f'protocol = "{uplink_protocol}"' if uplink_protocol else ""
    write_config(path, local, urls[0], pipelines, device=device, uplink_extra=uplink_extra,
                 extra=extra)
    text = path.read_text()
    if len(urls) > 1 or not isinstance(uplink, str):
        listed = ", ".join(f'"{u}"' for u in urls)
        text = text.replace(f'[uplink]\nurl = "{urls[0]}"', f"[uplink]\nurl = [{listed}]", 1)
    path.write_text(text)
    return path


def subscriber(url: str, topics: str | Sequence[str], *, client_id: str | None = None,
               persistent: bool = False) -> Collector:
    """A 3.1.1 QoS1 subscriber (what RabbitMQ and NATS speak), not yet started.

    `persistent`: clean session off under a fixed client id, so the broker keeps
    queueing for it while a restart cuts it off; paho reconnects on its own
    within a second and resumes the session.
    """
    c = Collector(url, topics, protocol=MQTT311, clean=not persistent,
                  client_id=client_id or f"interop-sub-{uuid.uuid4().hex[:8]}")
    c.client.reconnect_delay_set(1, 1)
    return c


def prime_311(local_url: str, cloud: Collector, agent: AgentProcess, topic: str,
              device: str, timeout_s: float = 20) -> None:
    """`agent_proc.prime` for a 3.1.1 local bus: publish a marker until it is relayed."""
    deadline = time.monotonic() + timeout_s
    while not cloud.snapshot(f"fog/{device}/{topic}"):
        if time.monotonic() > deadline:
            raise AssertionError(f"marker {topic} never relayed:\n{agent.log()}")
        publish_many(local_url, topic, [b"marker"], protocol=MQTT311)
        time.sleep(0.1)


def wait_until(what: str, check: Callable[[], object], timeout_s: float,
               interval_s: float = 0.1) -> None:
    """Poll `check()` until true; fail naming `what` after `timeout_s`."""
    if not settles(check, timeout_s, interval_s):
        raise AssertionError(f"{what}: not within {timeout_s}s")


def settles(check: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `check()` until true or `timeout_s` passed; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def numbers(payloads: Sequence[bytes]) -> set[int]:
    return {int(p.partition(b" ")[0]) for p in payloads}


def whose_losses(broker: str, accepted: Sequence[int], acked: set[int], received: set[int],
                 acked_before_fault: set[int]) -> set[int]:
    """Every accepted reading was handed over (the agent's part); returns what the broker
    lost after acknowledging it, having checked that it lost only what it had taken
    before its own fault.

    Fails when the agent lost one (accepted, never acknowledged by the broker, never
    received) or when a missing reading was acknowledged after the fault (that would not
    be the restart's loss).
    """
    never_acked = set(accepted) - acked
    assert not never_acked, (
        f"the agent never had {len(never_acked)} accepted readings acknowledged by {broker}:"
        f" {sorted(never_acked)[:20]}")
    lost = set(accepted) - received
    late = lost - acked_before_fault
    assert not late, (f"{broker} lost {len(late)} readings it acknowledged after its restart:"
                      f" {sorted(late)[:20]}")
    return lost
