"""`decode`: a camera payload (JPEG, PNG, msgpack frame, file reference) to a Frame.

Frames a `camera` trigger made pass through untouched. A corrupt or
truncated image raises PayloadError: counted as malformed, dropped alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2

from agent.frames import Frame, decode_payload
from agent.pipeline import ActionContext, Message


@dataclass(frozen=True, slots=True)
class Params:
    max_width: int = 0  # shrink wider frames to this width (0: keep the size)
    path_root: str | None = None  # frame references may only point below this directory

    def __post_init__(self) -> None:
        if self.max_width < 0:
            raise ValueError("max_width must be 0 or positive")


class Decode:
    blocking: ClassVar[bool] = True  # cv2.imdecode holds the CPU for milliseconds

    def __init__(self, params: Params) -> None:
        self.p = params

    def process(self, msg: Message) -> Sequence[Message]:
        if isinstance(msg.data, Frame):
            return (msg,)
        t0 = time.perf_counter()
        frame = decode_payload(msg.payload, msg.ts, msg.topic, self.p.path_root)
        if self.p.max_width and frame.width > self.p.max_width:
            h = round(frame.height * self.p.max_width / frame.width)
            small = cv2.resize(frame.image, (self.p.max_width, h), interpolation=cv2.INTER_AREA)
            frame = Frame(small, frame.ts, frame.source)
        latency = {**msg.latency_ms, "decode": round((time.perf_counter() - t0) * 1000.0, 3)}
        return (msg.evolve(data=frame, latency_ms=latency),)


def build(params: Params, ctx: ActionContext) -> Decode:
    del ctx
    return Decode(params)
