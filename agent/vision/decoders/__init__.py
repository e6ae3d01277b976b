"""Model output decoders, registered by name, imported lazily (NMS: `agent.vision.tensors`).

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
from agent.vision.tensors import TensorInfo

DECODERS: dict[str, str] = {
    "ssd_postprocess": "agent.vision.decoders.ssd_postprocess",
    "yolov8": "agent.vision.decoders.yolov8",
    "anchors": "agent.vision.decoders.anchors",
    "classify": "agent.vision.decoders.classify",
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
