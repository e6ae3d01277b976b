"""What every step that sends a message upward takes: topic template, lane, TTL, QoS.

Topics are checked where they are made (`agent.mqtt.topics.validate_name`): a
template whose own text can never make a valid topic name (a wildcard, NUL) is
a config error; a topic that only the input makes invalid (a 65,530-byte
sensor topic grows past 65,535 bytes under the prefix) is a `PayloadError`:
that input is malformed for this pipeline, counted, dropped and acknowledged,
since nothing can ever be produced for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ConfigError, PayloadError
from agent.mqtt import topics
from agent.pipeline import ActionContext
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
            literal = self.topic.format(**dict.fromkeys(TEMPLATE_FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"topic template {self.topic!r}: unknown placeholder {exc} "
                             f"(known: {', '.join(TEMPLATE_FIELDS)})") from None
        try:
            topics.validate_name(literal)
        except ValueError as exc:
            raise ValueError(f"topic template {self.topic!r} can never make a valid topic "
                             f"name: {exc}") from None


def fixed_parts(template: str, ctx: ActionContext) -> tuple[str, str]:
    """The template around `{topic}` with everything else filled in, checked once.

    Raises ConfigError naming the step when the filled-in text (e.g. a prefix
    holding `+`) can never make a valid topic name.
    """
    head, _, tail = template.replace("{topic}", "\0").format(
        prefix=ctx.prefix, device=ctx.device, pipeline=ctx.pipeline).partition("\0")
    try:
        topics.validate_name(f"{head}x{tail}")
    except ValueError as exc:
        raise ConfigError(f"pipeline {ctx.pipeline} step {ctx.step}: topic template "
                          f"{template!r} gives no valid topic name: {exc}") from None
    return head, tail


def checked(topic: str) -> str:
    """`topic` if it is a valid topic name to publish on; PayloadError (the reason) if not."""
    try:
        topics.validate_name(topic)
    except ValueError as exc:
        raise PayloadError(f"no valid topic to publish on: {exc}") from None
    return topic
