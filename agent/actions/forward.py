"""`forward`: the input payload byte for byte to `{prefix}/{device}/{topic}`.

The template is checked once at build; each result only for what the input
adds (a topic that grows past 65,535 bytes under the prefix is a PayloadError:
counted as malformed, dropped, its input acknowledged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from agent.actions.outgoing import OutgoingParams, checked, fixed_parts
from agent.messages import Message, Outgoing
from agent.pipeline import ActionContext


@dataclass(frozen=True, slots=True)
class Params(OutgoingParams):
    topic: str = "{prefix}/{device}/{topic}"


class Forward:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.key_prefix = f"{ctx.device}:{ctx.boot_id}:"
        self.head, self.tail = fixed_parts(params.topic, ctx)
        self.per_input = "{topic}" in params.topic  # else one fixed topic, checked here
        self.ttl_s = float(params.ttl) if params.ttl else None

    def process(self, msg: Message) -> Sequence[Outgoing]:
        topic = checked(f"{self.head}{msg.topic}{self.tail}") if self.per_input else self.head
        return (Outgoing(
            topic=topic, payload=msg.payload,
            key=f"{self.key_prefix}{self.ctx.next_seq()}", pipeline=self.ctx.pipeline,
            priority=self.p.priority, ttl_s=self.ttl_s, qos=self.p.qos, retain=self.p.retain,
            created=msg.ts),)


def build(params: Params, ctx: ActionContext) -> Forward:
    return Forward(params, ctx)
