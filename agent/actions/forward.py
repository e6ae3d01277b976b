"""`forward`: the input payload byte for byte to `{prefix}/{device}/{topic}`.

The template is checked once at build; each result only for what the input
adds (a topic that grows past 65,535 bytes under the prefix is a PayloadError:
counted as malformed, dropped, its input acknowledged).

`key = "keep"` sends a relayed input under the idempotency key it arrived
with (the `fogwhisk-id` user property a device's outbox set), so the cloud
drops a duplicate made on either hop with one key; an input without one gets
a fresh key. `relay = true` is the gateway's mode: the input's own topic
(`topic = "{topic}"`), `key = "keep"`, only device topics (`{prefix}/<id>/...`
with an id not starting with `_`, never the gateway's own `{prefix}/{device}/`,
never the downward `.../models/+/deploy`), and device status and OTA state
retained again upstream (a subscriber gets no retain flag on a live message).
A kept key must start with the id its topic names (`<id>:`): one device cannot
make the cloud drop another's readings as duplicates (a foreign key is
replaced and counted `foreign_keys`).
`exclude` lists more filters whose inputs are acknowledged and not forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from agent.actions.outgoing import OutgoingParams, checked, fixed_parts
from agent.delivery.uplink import KEY_PROPERTY
from agent.messages import Message, Outgoing
from agent.mqtt import topics
from agent.pipeline import ActionContext

DEFAULT_TOPIC = "{prefix}/{device}/{topic}"
# relay = true: what a gateway must not send back up, and what stays retained upstream.
RELAY_EXCLUDE = ("{prefix}/{device}/#", "{prefix}/+/models/+/deploy")
RELAY_RETAIN = ("{prefix}/+/status", "{prefix}/+/models/+/state")
DECISIONS = 10_000  # topics whose relay decision is cached; cleared when full (stays bounded)
SKIP, SEND, RETAIN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Params(OutgoingParams):
    topic: str = DEFAULT_TOPIC
    key: Literal["new", "keep"] = "new"  # keep: the input's fogwhisk-id, if it has one
    relay: bool = False  # a gateway: "{topic}", key keep, device topics only (module doc)
    exclude: tuple[str, ...] = ()  # filters ({prefix}, {device} allowed) not forwarded

    def __post_init__(self) -> None:
        OutgoingParams.__post_init__(self)
        if self.relay and self.topic not in (DEFAULT_TOPIC, "{topic}"):
            raise ValueError("relay = true forwards on the input's own topic: leave topic out")
        for f in self.exclude:
            try:
                topics.validate_filter(f.format(prefix="x", device="x"))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"exclude {f!r}: {exc} (placeholders: prefix, device)") \
                    from None


class Forward:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.key_prefix = f"{ctx.device}:{ctx.boot_id}:"
        template = "{topic}" if params.relay else params.topic
        self.head, self.tail = fixed_parts(template, ctx)
        self.per_input = "{topic}" in template  # else one fixed topic, checked here
        self.ttl_s = float(params.ttl) if params.ttl else None
        self.keep = params.relay or params.key == "keep"
        fill = {"prefix": ctx.prefix, "device": ctx.device}
        self.exclude = tuple(f.format(**fill) for f in
                             (*(RELAY_EXCLUDE if params.relay else ()), *params.exclude))
        self.retain_on = tuple(f.format(**fill) for f in RELAY_RETAIN) if params.relay else ()
        self.filtering = bool(self.exclude) or params.relay
        self.decided: dict[str, tuple[int, str]] = {}
        self.counters = ctx.telemetry.pipeline(ctx.pipeline)

    def _decide(self, topic: str) -> tuple[int, str]:
        """SKIP, SEND or RETAIN for an input topic, and the start a kept key must have.

        A relayed key must name the device whose topic carries it (`<id>:`): a device
        cannot make the cloud drop another device's readings as duplicates.
        """
        owner = ""
        if self.p.relay:
            levels = topic.split("/", 2)
            if len(levels) < 3 or levels[0] != self.ctx.prefix or levels[1][:1] in ("", "_"):
                return SKIP, owner  # not a device's topic: the bridge's, an artifact's
            owner = f"{levels[1]}:"
        if any(topics.matches(f, topic) for f in self.exclude):
            return SKIP, owner
        if any(topics.matches(f, topic) for f in self.retain_on):
            return RETAIN, owner
        return SEND, owner

    def process(self, msg: Message) -> Sequence[Outgoing]:
        retain = self.p.retain
        owner = ""
        if self.filtering:
            decided = self.decided.get(msg.topic)
            if decided is None:
                if len(self.decided) >= DECISIONS:
                    self.decided.clear()  # a burst of new topics: start over, stay bounded
                decided = self.decided[msg.topic] = self._decide(msg.topic)
            decision, owner = decided
            if decision == SKIP:
                self.counters.inc("excluded")
                return ()
            retain = retain or decision == RETAIN
        topic = checked(f"{self.head}{msg.topic}{self.tail}") if self.per_input else self.head
        key = msg.meta.get(KEY_PROPERTY) if self.keep else None
        if key is not None and not key.startswith(owner):
            self.counters.inc("foreign_keys")  # replaced: counted, the reading still goes
            key = None
        return (Outgoing(
            topic=topic, payload=msg.payload,
            key=key or f"{self.key_prefix}{self.ctx.next_seq()}", pipeline=self.ctx.pipeline,
            priority=self.p.priority, ttl_s=self.ttl_s, qos=self.p.qos, retain=retain,
            created=msg.ts),)


def build(params: Params, ctx: ActionContext) -> Forward:
    return Forward(params, ctx)
