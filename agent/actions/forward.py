"""`forward`: the input payload byte for byte to `{prefix}/{device}/{topic}`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from agent.pipeline import ActionContext, Message, Outgoing
from agent.schema import Duration


@dataclass(frozen=True, slots=True)
class Params:
    topic: str = "{prefix}/{device}/{topic}"  # also {pipeline}
    priority: int = 0
    ttl: Duration | None = None
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1 upstream")
        self.topic.format(prefix="", device="", topic="", pipeline="")


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
