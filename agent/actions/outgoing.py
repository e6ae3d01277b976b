"""What every step that sends a message upward takes: topic template, lane, TTL, QoS."""

from __future__ import annotations

from dataclasses import dataclass

from agent.schema import Duration

TEMPLATE_FIELDS = ("prefix", "device", "pipeline", "topic")


@dataclass(frozen=True, slots=True)
class OutgoingParams:
    topic: str = "{prefix}/{device}/{topic}"  # placeholders: prefix, device, pipeline, topic
    priority: int = 0  # lane: higher goes first and is dropped last
    ttl: Duration | None = None  # MQTT 5 message expiry; dropped and counted once past
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1 upstream")
        try:
            self.topic.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"topic template {self.topic!r}: unknown placeholder {exc} "
                             f"(known: {', '.join(TEMPLATE_FIELDS)})") from None
