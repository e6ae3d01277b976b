"""Model output decoders, registered by name, imported lazily; shared NMS.

    ssd_postprocess   the 4 outputs of TFLite_Detection_PostProcess (TF1 or TF2 order)
    yolov8            raw [1, 4+nc, N] (or [1, N, 4+nc]) boxes and class scores
    anchors           BlazeFace-style SSD anchors (MediaPipe face and pose detectors)
    classify          one score vector: softmax, sigmoid or probabilities

A decoder module defines `Params` (frozen dataclass, validated by
`agent.schema.build` from a manifest's `[decoder.params]`) and
`build(params, inputs, outputs) -> Decoder` (TensorInfo tuples). Decoders
return boxes normalised to the model's input tensor, `[x_min, y_min, x_max,
y_max]`; mapping back to the frame (letterbox, crops) is the caller's job.
Everything is vectorised numpy.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.errors import ModelError
from agent.runtimes import TensorInfo

DECODERS: dict[str, str] = {
    "ssd_postprocess": "agent.decoders.ssd_postprocess",
    "yolov8": "agent.decoders.yolov8",
    "anchors": "agent.decoders.anchors",
    "classify": "agent.decoders.classify",
}


@dataclass(frozen=True, slots=True)
class Decoded:
    """Detections of one invoke: boxes (N, 4) normalised to the input, scores (N,), classes (N,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.classes.shape != (n,):
            raise ValueError(f"inconsistent shapes {self.boxes.shape}, {self.scores.shape}, "
                             f"{self.classes.shape}")

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, keep: np.ndarray) -> Decoded:
        return Decoded(self.boxes[keep], self.scores[keep], self.classes[keep])


EMPTY = Decoded(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


class Decoder(Protocol):
    def decode(self, outputs: Sequence[np.ndarray], min_score: float) -> Decoded: ...


def spec(name: str) -> Any:
    """The decoder module for `name` (with `Params` and `build`); ModelError when unknown."""
    path = DECODERS.get(name)
    if path is None:
        raise ModelError(f"unknown decoder {name!r} (known: {', '.join(sorted(DECODERS))})")
    return importlib.import_module(path)


def concat(parts: Sequence[Decoded]) -> Decoded:
    if not parts:
        return EMPTY
    return Decoded(np.concatenate([p.boxes for p in parts]),
                   np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.classes for p in parts]))


def dequantize(arr: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float32 values of an output (a no-op copy-free view for float outputs)."""
    if not info.quantized:
        return arr.astype(np.float32, copy=False)
    return (arr.astype(np.float32) - info.zero_point) * np.float32(info.scale)


def raw_threshold(value: float, info: TensorInfo) -> float:
    """`value` in the raw (quantised) domain of `info`: compare before dequantising."""
    if not info.quantized:
        return value
    return value / info.scale + info.zero_point


def logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box against (N, 4) boxes."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, (N, 4) x (M, 4) -> (N, M)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_out: int = 100,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first.

    With `classes`, boxes only suppress boxes of their own class (the usual
    offset trick: each class is shifted to its own region of the plane).
    """
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float64)
    if classes is not None:
        b = b + (classes.astype(np.float64) * (float(np.abs(b).max()) + 1.0))[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_out:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        order = rest[iou_one(b[i], b[rest]) <= iou]
    return np.asarray(keep, np.int64)


def by_role(outputs: Sequence[TensorInfo], names: dict[str, Sequence[str]]) -> dict[str, int]:
    """Output positions whose tensor names contain one of the given substrings, per role."""
    found: dict[str, int] = {}
    for role, needles in names.items():
        for pos, info in enumerate(outputs):
            lname = info.name.lower()
            if any(n in lname for n in needles) and pos not in found.values():
                found[role] = pos
                break
    return found
