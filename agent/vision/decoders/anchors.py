"""BlazeFace-style SSD anchors: MediaPipe's face and pose detectors.

The model outputs raw regressors `[1, A, 4 + 2K]` (dx, dy, w, h, then K
keypoints, in input pixels relative to the anchor centre) and score logits
`[1, A, 1]`. Anchors follow MediaPipe's SsdAnchorsCalculator with a fixed
anchor size: consecutive layers of equal stride share one grid, two anchors
per layer per cell. Thresholding happens on logits, before any sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.errors import ModelError
from agent.vision.decoders import EMPTY, Decoded, dequantize, logit, raw_threshold
from agent.vision.tensors import TensorInfo


@dataclass(frozen=True, slots=True)
class Params:
    strides: tuple[int, ...] = (8, 16, 16, 16)
    anchor_offset: float = 0.5
    anchors_per_layer: int = 2
    scale: float = 0.0  # pixels of the regressors; 0: the input width
    score_clip: float = 100.0
    keypoints: int = 6
    # "box": the regressed box; "circle": a square around keypoint a with radius |b - a|
    # (BlazePose: hips centre to the full-body circle point), scaled by circle_scale.
    box_from: Literal["box", "circle"] = "box"
    circle_keypoints: tuple[int, int] = (0, 1)
    circle_scale: float = 1.0


def make_anchors(strides: Sequence[int], width: int, height: int, offset: float = 0.5,
                 per_layer: int = 2) -> np.ndarray:
    """Anchor centres (A, 2) in [0, 1], in the model's output order."""
    groups: list[tuple[int, int]] = []  # (stride, number of layers)
    for s in strides:
        if groups and groups[-1][0] == s:
            groups[-1] = (s, groups[-1][1] + 1)
        else:
            groups.append((s, 1))
    parts = []
    for stride, layers in groups:
        fh, fw = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid((np.arange(fh) + offset) / fh, (np.arange(fw) + offset) / fw,
                             indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        parts.append(np.repeat(centres, layers * per_layer, axis=0))
    return np.concatenate(parts).astype(np.float32)


class AnchorDecoder:
    def __init__(self, params: Params, inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 2:
            raise ModelError(f"anchors decoder needs 2 outputs, the model has {len(outputs)}")
        _, height, width, _ = inputs[0].shape
        self.params = params
        # The regressors are the output with more than one value per anchor.
        self.reg_pos = 0 if outputs[0].shape[-1] > outputs[1].shape[-1] else 1
        self.reg_info, self.score_info = outputs[self.reg_pos], outputs[1 - self.reg_pos]
        self.anchors = make_anchors(params.strides, width, height, params.anchor_offset,
                                    params.anchors_per_layer)
        count = self.reg_info.shape[1]
        if len(self.anchors) != count:
            raise ModelError(f"anchors decoder: strides {params.strides} give "
                             f"{len(self.anchors)} anchors, the model has {count}")
        self.scale = params.scale or float(width)

    def decode(self, outputs: Sequence[np.ndarray], min_score: float) -> Decoded:
        p = self.params
        raw_scores = outputs[1 - self.reg_pos].reshape(-1)
        cut = raw_threshold(logit(min_score), self.score_info)
        idx = np.flatnonzero(raw_scores >= cut)
        if not idx.size:
            return EMPTY
        logits = np.clip(dequantize(raw_scores[idx], self.score_info), -p.score_clip,
                         p.score_clip)
        scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        reg = dequantize(outputs[self.reg_pos].reshape(len(self.anchors), -1)[idx],
                         self.reg_info) / self.scale
        centres = self.anchors[idx]
        if p.box_from == "circle":
            a, b = p.circle_keypoints
            ka = centres + reg[:, 4 + 2 * a: 6 + 2 * a]
            kb = centres + reg[:, 4 + 2 * b: 6 + 2 * b]
            r = np.linalg.norm(kb - ka, axis=1) * p.circle_scale
            boxes = np.stack([ka[:, 0] - r, ka[:, 1] - r, ka[:, 0] + r, ka[:, 1] + r], axis=1)
        else:
            cx, cy = centres[:, 0] + reg[:, 0], centres[:, 1] + reg[:, 1]
            hw, hh = reg[:, 2] / 2, reg[:, 3] / 2
            boxes = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)
        return Decoded(boxes.astype(np.float32), scores, np.zeros(len(idx), np.int64))


def build(params: Params, inputs: Sequence[TensorInfo],
          outputs: Sequence[TensorInfo]) -> AnchorDecoder:
    return AnchorDecoder(params, inputs, outputs)
