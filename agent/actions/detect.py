"""`detect`: run a model on the frame, or on square crops around motion.

With motion boxes (from a `motion` step) the model sees square crops at
about its own input size around each moving region, so a distant walker is
not shrunk to a few pixels; the boxes are mapped back to the whole frame and
merged with NMS. Without motion boxes (or `crops = "frame"`) it sees the
whole frame. The message goes on with `data = {"type": "detection",
"detections": [...], "model": {name, version}}`, the frame in
`meta["frame"]` and `latency_ms["infer"]`. A model that cannot load or
raises fails the message alone; loading is retried every `runtime.reprobe_s`.

The model comes from the agent's `ModelHub` (`ctx.models`): read once per
frame and kept for both stages of that frame, so an over-the-air update
swaps it between two frames; each event names the version that made it.

While an update's candidate is in shadow (`Slot.candidate`), every k-th frame
also runs on it after the active model, on the same frame and motion: its
detections and time go to the hub for comparison, never into the message. A
candidate that raises is recorded as such; the frame goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from agent.errors import PayloadError
from agent.messages import Message
from agent.pipeline import ActionContext
from agent.vision.decoders import concat
from agent.vision.detector import Detection, Detector, Prepared, Region
from agent.vision.frames import Frame
from agent.vision.hub import ModelHub, ShadowFrame
from agent.vision.models import ModelStore
from agent.vision.tensors import nms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Params:
    model: str
    min_score: float | None = None  # default: the manifest's
    labels: tuple[str, ...] = ()  # keep only these labels (default: all)
    crops: Literal["auto", "motion", "frame"] = "auto"
    max_crops: int = 4
    crop_margin: float = 1.2  # crop side = motion box side x margin (at least the input size)
    nms_iou: float | None = None
    max_detections: int | None = None
    pass_empty: bool = False  # pass frames where nothing was found (else dropped)

    def __post_init__(self) -> None:
        if self.min_score is not None and not 0 <= self.min_score <= 1:
            raise ValueError("min_score must lie in [0, 1]")
        if self.max_crops < 1 or self.crop_margin < 1:
            raise ValueError("max_crops must be >= 1 and crop_margin >= 1")


def square_regions(boxes: Sequence[Sequence[float]], width: int, height: int, min_side: int,
                   margin: float, max_crops: int) -> list[Region]:
    """Square pixel crops covering normalised motion boxes, largest first, merged when nested."""
    regions: list[Region] = []
    limit = min(width, height)

    def square(b: Sequence[float]) -> Region:
        x0, y0, x1, y1 = b[0] * width, b[1] * height, b[2] * width, b[3] * height
        side = min(limit, max(min_side, math.ceil(max(x1 - x0, y1 - y0) * margin)))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(min(max(cx - side / 2, 0), width - side))
        top = int(min(max(cy - side / 2, 0), height - side))
        return (left, top, left + side, top + side)

    ordered = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    for b in ordered:
        x0, y0, x1, y1 = b[0] * width, b[1] * height, b[2] * width, b[3] * height
        if any(r[0] <= x0 and r[1] <= y0 and r[2] >= x1 and r[3] >= y1 for r in regions):
            continue
        regions.append(square(b))
    if len(regions) > max_crops:  # too scattered: one crop around all of it
        regions = [square((min(b[0] for b in boxes), min(b[1] for b in boxes),
                           max(b[2] for b in boxes), max(b[3] for b in boxes)))]
    return regions


PREPARED = "_detect_prepared"  # meta keys between the two stages
DETECTOR = "_detect_detector"
PREPARE_MS = "_detect_prepare_ms"


class Detect:
    blocking: ClassVar[bool] = True  # interpreter.invoke() holds the CPU for milliseconds

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.counters = ctx.telemetry.pipeline(ctx.pipeline)
        hub = ctx.models if ctx.models is not None else ModelHub(
            ModelStore(ctx.data_dir, models_dir=ctx.models_dir), ctx.runtime, ctx.telemetry)
        self.slot = hub.slot(params.model, ctx.pipeline)

    @property
    def detector(self) -> Detector | None:
        """The detector the next frame runs on (None while the model cannot load)."""
        return self.slot.detector

    def regions(self, det: Detector, frame: Frame, motion: Any) -> list[Region] | None:
        if self.p.crops == "frame" or (self.p.crops == "auto" and not motion):
            return None
        if not motion:
            return None
        return square_regions(motion, frame.width, frame.height, min(det.width, det.height),
                              self.p.crop_margin, self.p.max_crops)

    def run(self, det: Detector, frame: Frame, motion: Any) -> list[Detection]:
        return self.finish(det, self.prepare(det, frame, motion))

    def prepare(self, det: Detector, frame: Frame, motion: Any) -> list[Prepared]:
        regions = self.regions(det, frame, motion)
        return [det.prepare_region(frame.image, r)
                for r in (regions if regions is not None else [None])]

    def finish(self, det: Detector, prepared: list[Prepared]) -> list[Detection]:
        m = det.manifest
        min_score = m.min_score if self.p.min_score is None else self.p.min_score
        found = concat([det.infer(p, min_score) for p in prepared])
        if self.p.labels and len(found):
            wanted = np.array([m.label(int(c)) in self.p.labels for c in found.classes])
            found = found.take(np.flatnonzero(wanted))
        iou = m.nms_iou if self.p.nms_iou is None else self.p.nms_iou
        limit = m.max_detections if self.p.max_detections is None else self.p.max_detections
        found = found.take(nms(found.boxes, found.scores, iou, limit, found.classes))
        return det.to_detections(found)

    @property
    def stages(self) -> tuple[tuple[str, Callable[[Message], Sequence[Message]]], ...]:
        """Two stations for an assembly line: resizing the crops of frame n+1 overlaps
        inference on frame n (the model's own thread runs only invoke and decode)."""
        return (("prepare", self.prepare_stage), ("infer", self.infer_stage))

    def prepare_stage(self, msg: Message) -> Sequence[Message]:
        frame = msg.data if isinstance(msg.data, Frame) else msg.meta.get("frame")
        if not isinstance(frame, Frame):
            raise PayloadError("detect needs a frame: put a decode step first")
        det = self.slot.current()  # this frame's model, whatever a swap does meanwhile
        t0 = time.perf_counter()
        prepared = self.prepare(det, frame, msg.meta.get("motion"))
        return (msg.evolve(meta={**msg.meta, "frame": frame, DETECTOR: det, PREPARED: prepared,
                                 PREPARE_MS: (time.perf_counter() - t0) * 1000.0}),)

    def infer_stage(self, msg: Message) -> Sequence[Message]:
        meta = dict(msg.meta)
        det: Detector = meta.pop(DETECTOR)
        prepared: list[Prepared] = meta.pop(PREPARED)
        t0 = time.perf_counter()
        try:
            found = self.finish(det, prepared)
        except Exception:
            self.slot.record(det, ok=False)
            raise
        infer_ms = (time.perf_counter() - t0) * 1000.0
        self.slot.record(det, ok=True, ms=infer_ms)
        if self.slot.candidate is not None:
            self.shadow(meta.get("frame"), meta.get("motion"), found, infer_ms)
        ms = meta.pop(PREPARE_MS) + infer_ms
        self.counters.observe("infer", ms)
        self.counters.inc("frames_inferred")
        if not found and not self.p.pass_empty:
            return ()
        data = {"type": "detection", "detections": [d.as_dict() for d in found],
                "model": det.info}
        return (msg.evolve(data=data, meta={**meta, "detections": found},
                           latency_ms={**msg.latency_ms, "infer": round(ms, 3)}),)

    def shadow(self, frame: Any, motion: Any, found: list[Detection], active_ms: float) -> None:
        """Run the candidate in shadow on this frame when it is due (budget permitting)."""
        cand = self.slot.shadow_due(active_ms)
        if cand is None or not isinstance(frame, Frame):
            return
        error: str | None = None
        got: list[Detection] = []
        with self.slot.shadow_lock:
            if self.slot.candidate is not cand:
                return  # taken out of shadow meanwhile
            try:
                prepared = self.prepare(cand, frame, motion)
                t0 = time.perf_counter()
                try:
                    got = self.finish(cand, prepared)
                finally:
                    ms = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # the candidate's fault, never the frame's
                error = f"{type(exc).__name__}: {exc}"[:200]
                ms = 0.0
        self.slot.hub.add_shadow(self.slot.name, ShadowFrame(tuple(found), tuple(got),
                                                             active_ms, ms, error))

    def process(self, msg: Message) -> Sequence[Message]:
        return [out for m in self.prepare_stage(msg) for out in self.infer_stage(m)]

    def close(self) -> None:
        if self.slot.detector is not None:
            self.slot.detector.close()


def build(params: Params, ctx: ActionContext) -> Detect:
    return Detect(params, ctx)
