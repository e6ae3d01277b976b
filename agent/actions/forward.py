"""`forward`: the input payload byte for byte to `{prefix}/{device}/{topic}`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from agent.actions.outgoing import OutgoingParams
from agent.pipeline import ActionContext, Message, Outgoing


@dataclass(frozen=True, slots=True)
class Params(OutgoingParams):
    topic: str = "{prefix}/{device}/{topic}"


class Forward:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.key_prefix = f"{ctx.device}:{ctx.boot_id}:"
        fixed = params.topic.replace("{topic}", "\0")
        self.head, _, self.tail = fixed.format(
            prefix=ctx.prefix, device=ctx.device, pipeline=ctx.pipeline).partition("\0")
        self.ttl_s = float(params.ttl) if params.ttl else None

    def process(self, msg: Message) -> Sequence[Outgoing]:
        return (Outgoing(
            topic=f"{self.head}{msg.topic}{self.tail}", payload=msg.payload,
            key=f"{self.key_prefix}{self.ctx.next_seq()}", pipeline=self.ctx.pipeline,
            priority=self.p.priority, ttl_s=self.ttl_s, qos=self.p.qos, retain=self.p.retain,
            created=msg.ts),)


def build(params: Params, ctx: ActionContext) -> Forward:
    return Forward(params, ctx)
