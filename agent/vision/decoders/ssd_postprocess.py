"""The four outputs of TFLite_Detection_PostProcess: boxes, classes, scores, count.

TF1 exports them in that order; TF2 exports reorder them (often scores,
boxes, count, classes). Roles are found by name where names say it, else by
shape: boxes are `[1, N, 4]`, the count has one element, and of the two
`[1, N]` tensors the classes are the one holding whole numbers. Boxes come as
`[y_min, x_min, y_max, x_max]` normalised to the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import ModelError
from agent.vision.decoders import EMPTY, Decoded, by_role, dequantize
from agent.vision.tensors import TensorInfo


@dataclass(frozen=True, slots=True)
class Params:
    label_offset: int = 0  # added to class ids (1 when label 0 is "background")


class SsdPostprocessDecoder:
    def __init__(self, params: Params, outputs: Sequence[TensorInfo]) -> None:
        if len(outputs) != 4:
            raise ModelError(f"ssd_postprocess needs 4 outputs, the model has {len(outputs)}")
        self.params = params
        self.infos = tuple(outputs)
        roles = by_role(outputs, {"boxes": ("box",), "classes": ("class",),
                                  "scores": ("score",), "count": ("num", "count")})
        for pos, info in enumerate(outputs):
            size = int(np.prod(info.shape))
            if "boxes" not in roles and len(info.shape) == 3 and info.shape[-1] == 4:
                roles["boxes"] = pos
            elif "count" not in roles and size == 1:
                roles["count"] = pos
        if "boxes" not in roles or "count" not in roles:
            raise ModelError("ssd_postprocess: cannot tell boxes and count apart in outputs "
                             f"{[(o.name, o.shape) for o in outputs]}")
        self.roles = roles
        # Positions of the two [1, N] tensors, in model order, for the value test at decode.
        self.pair = [p for p in range(4) if p not in (roles["boxes"], roles["count"])]

    def _classes_scores(self, outputs: Sequence[np.ndarray],
                        count: int) -> tuple[np.ndarray, np.ndarray]:
        if "classes" in self.roles and "scores" in self.roles:
            return (dequantize(outputs[self.roles["classes"]], self.infos[self.roles["classes"]]),
                    dequantize(outputs[self.roles["scores"]], self.infos[self.roles["scores"]]))
        a, b = (dequantize(outputs[p], self.infos[p]).reshape(-1) for p in self.pair)
        ha, hb = a[:count], b[:count]
        # Classes hold whole numbers; the op sorts detections by score, best first.
        a_cls = bool(np.all(ha == np.round(ha))) and not bool(np.all(np.diff(ha) <= 0))
        b_cls = bool(np.all(hb == np.round(hb))) and not bool(np.all(np.diff(hb) <= 0))
        if a_cls != b_cls:
            return (a, b) if a_cls else (b, a)
        if float(ha.max(initial=0)) > 1.0 or float(hb.max(initial=0)) > 1.0:
            return (a, b) if float(ha.max(initial=0)) > 1.0 else (b, a)
        # Still ambiguous: TF1 puts boxes first and classes before scores; TF2 exports
        # lead with scores.
        return (a, b) if self.roles["boxes"] == 0 else (b, a)

    def decode(self, outputs: Sequence[np.ndarray], min_score: float) -> Decoded:
        count_arr = outputs[self.roles["count"]]
        count = int(dequantize(count_arr, self.infos[self.roles["count"]]).reshape(-1)[0])
        if count <= 0:
            return EMPTY
        classes, scores = self._classes_scores(outputs, count)
        classes, scores = classes.reshape(-1)[:count], scores.reshape(-1)[:count]
        boxes = dequantize(outputs[self.roles["boxes"]],
                           self.infos[self.roles["boxes"]]).reshape(-1, 4)[:count]
        keep = scores >= min_score
        if not keep.any():
            return EMPTY
        yx = boxes[keep]
        xy = np.stack([yx[:, 1], yx[:, 0], yx[:, 3], yx[:, 2]], axis=1).astype(np.float32)
        ids = classes[keep].astype(np.int64) + self.params.label_offset
        return Decoded(xy, scores[keep].astype(np.float32), ids)


def build(params: Params, inputs: Sequence[TensorInfo],
          outputs: Sequence[TensorInfo]) -> SsdPostprocessDecoder:
    del inputs  # boxes arrive normalised
    return SsdPostprocessDecoder(params, outputs)
