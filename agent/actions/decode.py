"""`decode`: a camera payload (JPEG, PNG, msgpack frame, file reference) to a Frame.

Frames a `camera` trigger made pass through untouched. A corrupt, truncated
or oversized image raises PayloadError: counted as malformed, dropped alone.

    max_pixels      largest frame decoded (0: derived from `service.memory_max`,
                    see `agent.vision.frames.max_pixels_for`; 16 Mpx without a budget)
    path_root       frame references (`file://`, `{"path"}`) are refused unless set;
                    then only regular files below it (after resolving symlinks)
    max_file_bytes  largest referenced file read
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2

from agent.errors import ConfigError
from agent.messages import Message
from agent.pipeline import ActionContext
from agent.schema import Size
from agent.service import memory_bytes
from agent.vision import heap
from agent.vision.frames import (
    DEFAULT_MAX_FILE_BYTES,
    Frame,
    Limits,
    decode_payload,
    max_pixels_for,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Params:
    max_width: int = 0  # shrink wider frames to this width (0: keep the size)
    path_root: str | None = None  # frame references may only point below this directory
    max_pixels: int = 0  # 0: what the memory budget allows
    max_file_bytes: Size = Size(DEFAULT_MAX_FILE_BYTES)

    def __post_init__(self) -> None:
        if self.max_width < 0 or self.max_pixels < 0:
            raise ValueError("max_width and max_pixels must be 0 or positive")
        if self.max_file_bytes < 1:
            raise ValueError("max_file_bytes must be positive")
        if self.path_root is not None and not os.path.isabs(self.path_root):
            raise ValueError(f"path_root {self.path_root!r} must be an absolute path")


class Decode:
    blocking: ClassVar[bool] = True  # cv2.imdecode holds the CPU for milliseconds

    def __init__(self, params: Params, limits: Limits) -> None:
        self.p = params
        self.limits = limits

    def process(self, msg: Message) -> Sequence[Message]:
        if isinstance(msg.data, Frame):
            return (msg,)
        t0 = time.perf_counter()
        frame = decode_payload(msg.payload, msg.ts, msg.topic, self.limits)
        if self.p.max_width and frame.width > self.p.max_width:
            h = max(1, round(frame.height * self.p.max_width / frame.width))
            small = cv2.resize(frame.image, (self.p.max_width, h), interpolation=cv2.INTER_AREA)
            frame = Frame(small, frame.ts, frame.source)
        latency = {**msg.latency_ms, "decode": round((time.perf_counter() - t0) * 1000.0, 3)}
        return (msg.evolve(data=frame, latency_ms=latency),)


def memory_budget(ctx: ActionContext) -> int | None:
    """Bytes the agent's unit may use (`service.memory_max`); None when unbounded."""
    try:
        return memory_bytes(ctx.service.memory_max)
    except ConfigError:  # install-service refuses it; the agent itself runs without a budget
        return None


def build(params: Params, ctx: ActionContext) -> Decode:
    heap.tune_for_frames()  # frames given back to the kernel once dropped (agent.vision.heap)
    limits = Limits(max_pixels=params.max_pixels or max_pixels_for(memory_budget(ctx)),
                    path_root=params.path_root, max_file_bytes=int(params.max_file_bytes))
    log.info("pipeline %s: decode takes frames up to %.1f Mpx; file references %s",
             ctx.pipeline, limits.max_pixels / 1e6,
             f"below {limits.path_root}" if limits.path_root else "off")
    return Decode(params, limits)
