"""`filter`: a gate on one field of a JSON or msgpack payload (`field op value`)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from agent.actions.payload import fields
from agent.errors import PayloadError
from agent.messages import Message
from agent.pipeline import ActionContext

Op = Literal["==", "!=", ">", ">=", "<", "<=", "in", "exists"]
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
    "<": operator.lt, "<=": operator.le, "in": lambda a, b: a in b,
}


@dataclass(frozen=True, slots=True)
class Params:
    field: str
    op: Op = "=="
    value: Any = None

    def __post_init__(self) -> None:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs a list value")
        if self.op != "exists" and self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")


class Filter:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params) -> None:
        self.p = params
        self.path = params.field.split(".")

    def process(self, msg: Message) -> Sequence[Message]:
        values = fields(msg)
        v: Any = values
        for part in self.path:
            if not isinstance(v, dict) or part not in v:
                if self.p.op == "exists":
                    return ()
                raise PayloadError(f"field {self.p.field!r} is missing")
            v = v[part]
        if self.p.op == "exists":
            return (msg.evolve(data=values),)
        if isinstance(v, float) and not math.isfinite(v):  # NaN fails every test silently
            raise PayloadError(f"field {self.p.field!r} is {v!r}, not a finite number")
        try:
            ok = _OPS[self.p.op](v, self.p.value)
        except TypeError:
            raise PayloadError(
                f"field {self.p.field!r} ({type(v).__name__}) cannot be compared with "
                f"{self.p.value!r}") from None
        return (msg.evolve(data=values),) if ok else ()


def build(params: Params, ctx: ActionContext) -> Filter:
    return Filter(params)
