"""`snapshot`: a small JPEG of the best detection, base64, in the event.

Takes the frame and detection a `track` step kept as the object's best
(else the current frame's top detection), crops around the box with a
margin, shrinks to `max_side` and lowers the JPEG quality until it fits
`max_bytes`. Adds `data["snapshot"] = {"format": "jpeg", "b64", "box",
"width", "height"}`; messages without a frame pass unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from agent.messages import Message
from agent.pipeline import ActionContext
from agent.schema import Size
from agent.vision.detector import Detection
from agent.vision.frames import Frame


@dataclass(frozen=True, slots=True)
class Params:
    max_bytes: Size = Size(32_000)
    max_side: int = 320
    quality: int = 85
    margin: float = 0.15  # of the box size, on each side
    types: tuple[str, ...] = ("new", "update", "end")

    def __post_init__(self) -> None:
        if self.max_bytes < 1000 or self.max_side < 16 or not 10 <= self.quality <= 100:
            raise ValueError("need max_bytes >= 1000, max_side >= 16, quality in 10..100")


def encode_crop(image: np.ndarray, box: Sequence[float], p: Params) -> tuple[bytes, int, int]:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * p.margin, (y1 - y0) * p.margin
    left, top = max(0, int((x0 - mx) * w)), max(0, int((y0 - my) * h))
    right = min(w, max(left + 1, int(np.ceil((x1 + mx) * w))))
    bottom = min(h, max(top + 1, int(np.ceil((y1 + my) * h))))
    crop = image[top:bottom, left:right]
    scale = min(1.0, p.max_side / max(crop.shape[:2]))
    if scale < 1.0:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)),
                                 max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    quality = p.quality
    while True:
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        data = buf.tobytes()
        # base64 grows 4/3: cap the encoded size
        if len(data) * 4 // 3 + 4 <= p.max_bytes or quality <= 20:
            if len(data) * 4 // 3 + 4 > p.max_bytes:  # still too big: halve the size
                crop = cv2.resize(crop, (max(1, crop.shape[1] // 2), max(1, crop.shape[0] // 2)),
                                  interpolation=cv2.INTER_AREA)
                quality = p.quality
                if min(crop.shape[:2]) < 8:
                    return data, crop.shape[1], crop.shape[0]
                continue
            return data, crop.shape[1], crop.shape[0]
        quality -= 15


class Snapshot:
    blocking: ClassVar[bool] = True  # cv2.imencode holds the CPU for milliseconds

    def __init__(self, params: Params) -> None:
        self.p = params

    def process(self, msg: Message) -> Sequence[Message]:
        data = msg.data
        if not isinstance(data, dict) or data.get("type") not in self.p.types:
            return (msg,)
        frame = msg.meta.get("frame")
        best = msg.meta.get("best")
        if not isinstance(best, Detection):
            dets = msg.meta.get("detections") or ()
            best = max(dets, key=lambda d: d.score) if dets else None
        if not isinstance(frame, Frame) or best is None:
            return (msg,)
        jpeg, w, h = encode_crop(frame.image, best.box, self.p)
        snap = {"format": "jpeg", "b64": base64.b64encode(jpeg).decode("ascii"),
                "box": [round(v, 4) for v in best.box], "width": w, "height": h}
        return (msg.evolve(data={**data, "snapshot": snap}),)


def build(params: Params, ctx: ActionContext) -> Snapshot:
    del ctx
    return Snapshot(params)
