"""Raw YOLOv8 heads: `[1, 4 + nc, N]` (Ultralytics' TFLite export) or `[1, N, 4 + nc]`.

Rows 0..3 are cx, cy, w, h (input pixels, or normalised: detected per
model), the rest are per-class scores, already sigmoid'ed. No Python loop per
cell: one argmax over the class rows, the threshold on raw (quantised) values,
dequantising only the survivors, then class-aware NMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.errors import ModelError
from agent.vision.decoders import EMPTY, Decoded, dequantize, raw_threshold
from agent.vision.tensors import TensorInfo, nms


@dataclass(frozen=True, slots=True)
class Params:
    num_classes: int = 0  # 0: from the output shape
    coords: Literal["auto", "pixels", "normalized"] = "auto"
    nms_iou: float = 0.45
    max_detections: int = 100


class Yolov8Decoder:
    def __init__(self, params: Params, inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 1 or len(outputs[0].shape) != 3:
            raise ModelError("yolov8 needs one output [1, 4+nc, N]; the model has "
                             f"{[o.shape for o in outputs]}")
        self.info = outputs[0]
        _, a, b = self.info.shape
        if params.num_classes:
            self.channels_first = a == 4 + params.num_classes
        else:
            self.channels_first = a < b  # fewer channels than candidate boxes
        nc = (a if self.channels_first else b) - 4
        if nc < 1:
            raise ModelError(f"yolov8: output {self.info.shape} has no class rows")
        self.num_classes = nc
        self.params = params
        _, self.height, self.width, _ = inputs[0].shape

    def decode(self, outputs: Sequence[np.ndarray], min_score: float) -> Decoded:
        out = outputs[0][0]
        rows = out if self.channels_first else out.T  # (4 + nc, N), a view
        cls_raw = rows[4:]
        best = cls_raw.argmax(axis=0)
        best_raw = np.take_along_axis(cls_raw, best[None, :], axis=0)[0]
        idx = np.flatnonzero(best_raw >= raw_threshold(min_score, self.info))
        if not idx.size:
            return EMPTY
        scores = dequantize(best_raw[idx], self.info)
        xywh = dequantize(rows[:4, idx], self.info)
        normalized = self.params.coords == "normalized" or (
            self.params.coords == "auto" and float(np.abs(xywh).max()) <= 2.0)
        if not normalized:
            xywh = xywh / np.array([[self.width], [self.height], [self.width], [self.height]],
                                   np.float32)
        cx, cy, w, h = xywh
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        classes = best[idx].astype(np.int64)
        keep = nms(boxes, scores, self.params.nms_iou, self.params.max_detections, classes)
        return Decoded(boxes[keep].astype(np.float32), scores[keep].astype(np.float32),
                       classes[keep])


def build(params: Params, inputs: Sequence[TensorInfo],
          outputs: Sequence[TensorInfo]) -> Yolov8Decoder:
    return Yolov8Decoder(params, inputs, outputs)
