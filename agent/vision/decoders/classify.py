"""One score vector per image: the top classes, as whole-image detections.

`activation` says what the output holds: `softmax` (logits), `sigmoid`
(independent logits), `none` (already probabilities), or `auto` (softmax
unless the values already look like probabilities). Quantised outputs are
dequantised first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.errors import ModelError
from agent.vision.decoders import EMPTY, Decoded, dequantize, sigmoid
from agent.vision.tensors import TensorInfo


@dataclass(frozen=True, slots=True)
class Params:
    activation: Literal["auto", "softmax", "sigmoid", "none"] = "auto"
    top_k: int = 1


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    out: np.ndarray = e / e.sum()
    return out


class ClassifyDecoder:
    def __init__(self, params: Params, outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 1:
            raise ModelError(f"classify needs one output, the model has {len(outputs)}")
        self.info = outputs[0]
        self.params = params

    def probabilities(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        x = dequantize(outputs[0], self.info).reshape(-1)
        act = self.params.activation
        if act == "auto":
            looks_like_p = x.min() >= 0 and x.max() <= 1 and abs(float(x.sum()) - 1.0) < 0.05
            act = "none" if looks_like_p else "softmax"
        if act == "softmax":
            return softmax(x)
        if act == "sigmoid":
            return sigmoid(x)
        return x

    def decode(self, outputs: Sequence[np.ndarray], min_score: float) -> Decoded:
        p = self.probabilities(outputs)
        top = np.argsort(-p, kind="stable")[: self.params.top_k]
        top = top[p[top] >= min_score]
        if not top.size:
            return EMPTY
        boxes = np.tile(np.array([0, 0, 1, 1], np.float32), (len(top), 1))
        return Decoded(boxes, p[top].astype(np.float32), top.astype(np.int64))


def build(params: Params, inputs: Sequence[TensorInfo],
          outputs: Sequence[TensorInfo]) -> ClassifyDecoder:
    del inputs
    return ClassifyDecoder(params, outputs)
