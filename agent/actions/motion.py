"""`motion`: a gate that passes only frames where something moved.

Frigate-style (see `agent.vision.motion`): one background model per source topic.
Frames without motion are dropped (counted as `frames_no_motion`); the
others go on with `meta["motion"]`, boxes `[x0, y0, x1, y1]` normalised to
the frame, and `latency_ms["motion"]`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from agent.errors import PayloadError
from agent.messages import Message
from agent.pipeline import ActionContext
from agent.vision.frames import Frame
from agent.vision.motion import MotionDetector, MotionSettings


@dataclass(frozen=True, slots=True)
class Params:
    threshold: int = 30
    min_area: int = 10
    frame_height: int = 100
    alpha: float = 0.02
    lightning: float = 0.8
    dilate: int = 2
    mask: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        self.settings()  # validates

    def settings(self) -> MotionSettings:
        return MotionSettings(self.threshold, self.min_area, self.frame_height, self.alpha,
                              self.lightning, self.dilate, self.mask)


class Motion:
    blocking: ClassVar[bool] = True  # cheap (sub-ms), but it runs next to decode and detect

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.settings = params.settings()
        self.counters = ctx.telemetry.pipeline(ctx.pipeline)
        self.sources: dict[str, MotionDetector] = {}

    def process(self, msg: Message) -> Sequence[Message]:
        frame = msg.data
        if not isinstance(frame, Frame):
            raise PayloadError("motion needs a frame: put a decode step first")
        t0 = time.perf_counter()
        det = self.sources.get(msg.topic)
        if det is None:
            det = self.sources[msg.topic] = MotionDetector(self.settings)
        boxes = det.detect(frame.image)
        ms = (time.perf_counter() - t0) * 1000.0
        self.counters.observe("motion", ms)
        if not boxes:
            self.counters.inc("frames_no_motion")
            return ()
        self.counters.inc("frames_motion")
        return (msg.evolve(meta={**msg.meta, "motion": [[round(v, 4) for v in b] for b in boxes]},
                           latency_ms={**msg.latency_ms, "motion": round(ms, 3)}),)


def build(params: Params, ctx: ActionContext) -> Motion:
    return Motion(params, ctx)
