"""`window`: aggregate numeric fields over a count or a time window, per topic.

`size = 10` emits after every 10 readings of a topic; `seconds = 60` emits
each topic's aggregate once a minute (from the pipeline's clock). The
emitted message's data is `{"topic", "n", "start", "end", "<field>": {agg: value}}`.
A reading whose field is not a finite number (NaN, Infinity, 1e400), or would
overflow the window's sum, is malformed: it is counted and not folded in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgpack

from agent.actions.payload import fields, number
from agent.errors import PayloadError
from agent.messages import Message
from agent.pipeline import ActionContext
from agent.schema import Duration

Agg = Literal["mean", "min", "max", "count", "sum", "last"]


@dataclass(frozen=True, slots=True)
class Params:
    fields: tuple[str, ...]
    agg: tuple[Agg, ...] = ("mean",)
    size: int | None = None
    seconds: Duration | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.seconds is None):
            raise ValueError("a window needs exactly one of size (messages) or seconds")
        if self.size is not None and self.size < 1:
            raise ValueError("size must be at least 1")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError("seconds must be positive")
        if not self.fields or not self.agg:
            raise ValueError("fields and agg must not be empty")


@dataclass(slots=True)
class _Acc:
    start: float
    end: float = 0.0
    n: int = 0
    sums: list[float] = field(default_factory=list)
    mins: list[float] = field(default_factory=list)
    maxs: list[float] = field(default_factory=list)
    lasts: list[float] = field(default_factory=list)


class Window:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params) -> None:
        self.p = params
        self.accs: dict[str, _Acc] = {}
        self.interval_s = float(params.seconds) if params.seconds else 3600.0

    def process(self, msg: Message) -> Sequence[Message]:
        values = fields(msg)
        nums = [number(values, f) for f in self.p.fields]  # finite; all checked before folding
        acc = self.accs.get(msg.topic)
        sums = nums if acc is None else [s + v for s, v in zip(acc.sums, nums, strict=True)]
        for name, s in zip(self.p.fields, sums, strict=True):
            if not math.isfinite(s):  # refuse the reading, not the window: counted, not folded
                raise PayloadError(f"field {name!r}: the window's sum would overflow a double")
        if acc is None:
            k = len(nums)
            acc = self.accs[msg.topic] = _Acc(msg.ts, sums=[0.0] * k, mins=[math.inf] * k,
                                              maxs=[-math.inf] * k, lasts=[0.0] * k)
        acc.n += 1
        acc.end = msg.ts
        for i, v in enumerate(nums):
            acc.sums[i] = sums[i]
            acc.mins[i] = min(acc.mins[i], v)
            acc.maxs[i] = max(acc.maxs[i], v)
            acc.lasts[i] = v
        if self.p.size is not None and acc.n >= self.p.size:
            del self.accs[msg.topic]
            return (self._emit(msg.topic, acc, msg),)
        return ()

    def snapshot(self) -> bytes:
        """Open windows, so readings folded in but not yet emitted survive a crash."""
        return bytes(msgpack.packb({t: [a.start, a.end, a.n, a.sums, a.mins, a.maxs, a.lasts]
                                    for t, a in self.accs.items()}))

    def restore(self, state: bytes) -> None:
        k = len(self.p.fields)
        for topic, (start, end, n, sums, mins, maxs, lasts) in msgpack.unpackb(state).items():
            if len(sums) == k:  # the fields may have changed since: drop what no longer fits
                self.accs[topic] = _Acc(start, end, n, sums, mins, maxs, lasts)

    def tick(self, now: float) -> Sequence[Message]:
        if self.p.seconds is None:
            return ()
        out = [self._emit(topic, acc, None) for topic, acc in self.accs.items()]
        self.accs.clear()
        return out

    def _emit(self, topic: str, acc: _Acc, last: Message | None) -> Message:
        data: dict[str, Any] = {"topic": topic, "n": acc.n, "start": round(acc.start, 3),
                                "end": round(acc.end, 3)}
        for i, name in enumerate(self.p.fields):
            stats = {"mean": acc.sums[i] / acc.n, "min": acc.mins[i], "max": acc.maxs[i],
                     "count": acc.n, "sum": acc.sums[i], "last": acc.lasts[i]}
            data[name] = {a: stats[a] for a in self.p.agg}
        ts = last.ts if last is not None else time.time()
        return Message(topic=topic, payload=b"", ts=ts, data=data)


def build(params: Params, ctx: ActionContext) -> Window:
    return Window(params)
