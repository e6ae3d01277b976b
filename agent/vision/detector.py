"""A model ready to use: preprocessing, invoke, decoding, boxes back on the frame.

`Detector.detect(image, region)` runs the model on one region of a BGR frame
(the whole frame, or a square crop around motion) and returns detections
whose boxes are normalised to the *whole frame*. Preprocessing follows the
manifest: letterbox or stretch resize, colour order, and normalisation plus
input quantisation folded into one 256-entry lookup table, so a frame costs
one resize and one table lookup (made just before invoke: what waits between
the two is uint8). Call it from a worker thread: it blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.config import RuntimeConfig
from agent.errors import ConfigError, ModelError
from agent.schema import build
from agent.vision import decoders, runtimes
from agent.vision.decoders import Decoded
from agent.vision.models import InputSpec, Manifest, ModelRef

log = logging.getLogger(__name__)

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels


@dataclass(frozen=True, slots=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max, normalised to the frame

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score {self.score} outside [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 4),
                "box": [round(v, 4) for v in self.box]}


def input_lut(spec: InputSpec, dtype: np.dtype[Any], scale: float, zero_point: int,
              channels: int) -> np.ndarray:
    """Pixel value -> input tensor value, per channel: shape (256, channels)."""
    px = np.arange(256, dtype=np.float64)[:, None].repeat(channels, axis=1)
    if spec.range is not None:
        lo, hi = spec.range
        val = lo + px * (hi - lo) / 255.0
    elif spec.mean:
        mean = np.resize(np.asarray(spec.mean, np.float64), channels)
        std = np.resize(np.asarray(spec.std, np.float64), channels)
        val = (px - mean) / std
    else:
        val = px
    if scale:  # a quantised input: value -> integer
        val = np.round(val / scale + zero_point)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        val = np.clip(val, info.min, info.max)
    return val.astype(dtype)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A model input made from one region of a frame (the cheap half of a detection).

    It holds uint8 pixels, not the tensor: a float input is 4x their size, and prepared
    crops wait in the assembly line's queues (up to 4 per frame); the table lookup that
    makes the tensor is 0.06 ms.
    """

    pixels: np.ndarray  # uint8 (H, W, C) at the model's input size
    transform: tuple[float, float, float, float]  # (sx, sy, px, py)
    origin: tuple[int, int]  # the region's top-left pixel in the frame
    size: tuple[int, int]  # the frame's (width, height)


class Detector:
    """One loaded model: `detect()` and `invoke_tensor()` (thread-safe through the runtime)."""

    def __init__(self, ref: ModelRef, runtime: RuntimeConfig, telemetry: Any | None = None,
                 model: runtimes.Model | None = None) -> None:
        self.ref = ref
        m = self.manifest = ref.manifest
        chain = runtime.fallback if m.runtime == "any" else (m.runtime,)
        self.model: runtimes.Model = model if model is not None else runtimes.ChainedModel(
            ref.path, chain, runtime.num_threads, float(runtime.reprobe_s), telemetry)
        info = self.model.inputs[0]
        if len(info.shape) != 4:
            raise ModelError(f"model {m.name}: input shape {info.shape} is not NHWC")
        _, self.height, self.width, self.channels = info.shape
        if (self.width, self.height) != tuple(m.input.size):
            raise ModelError(f"model {m.name}: manifest input.size {m.input.size} but the model "
                             f"takes {self.width}x{self.height}")
        self.dtype = info.dtype
        self.lut = input_lut(m.input, info.dtype, info.scale, info.zero_point,
                             1 if m.input.color == "gray" else 3)
        module = decoders.spec(m.decoder.kind)
        try:
            params = build(module.Params, m.decoder.params, f"{ref.directory}: decoder.params")
        except ConfigError as exc:
            raise ModelError(str(exc)) from exc
        self.decoder: decoders.Decoder = module.build(params, self.model.inputs,
                                                      self.model.outputs)

    @property
    def info(self) -> dict[str, Any]:
        return {"name": self.manifest.name, "version": self.manifest.version}

    def resize(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """BGR image -> uint8 pixels (H, W, C) at the input size in the model's colour order,
        and (sx, sy, px, py): input px = image px * s + p."""
        h, w = image.shape[:2]
        spec = self.manifest.input
        if spec.resize == "stretch":
            sx, sy = self.width / w, self.height / h
            resized = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
            px = py = 0.0
        else:
            s = min(self.width / w, self.height / h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            px, py = (self.width - nw) // 2, (self.height - nh) // 2
            small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
            resized = cv2.copyMakeBorder(small, int(py), self.height - nh - int(py), int(px),
                                         self.width - nw - int(px), cv2.BORDER_CONSTANT,
                                         value=(0, 0, 0))
            sx = sy = s
        if spec.color == "rgb":
            resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        elif spec.color == "gray":
            resized = cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY)[..., None]
        if resized.shape[-1] != self.channels:
            raise ModelError(f"model {self.manifest.name}: takes {self.channels} channels, "
                             f"color {spec.color!r} gives {resized.shape[-1]}")
        return resized, (sx, sy, px, py)

    def tensor(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels from `resize` -> the input tensor (1, H, W, C): one table lookup."""
        try:  # OpenCV's LUT: 9x numpy's gather on 224x224x3, and no 8-byte index array
            tensor = cv2.LUT(pixels, self.lut.reshape(256, 1, self.channels))
        except cv2.error:  # a dtype OpenCV has no LUT for (float16, int16 inputs)
            tensor = np.take_along_axis(self.lut, pixels.reshape(-1, self.channels)
                                        .astype(np.intp), axis=0)
        return tensor.reshape(1, self.height, self.width, self.channels)

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """BGR image -> input tensor, and (sx, sy, px, py): input px = image px * s + p."""
        pixels, transform = self.resize(image)
        return self.tensor(pixels), transform

    def invoke_tensor(self, tensor: np.ndarray) -> list[np.ndarray]:
        return self.model.invoke([tensor])

    def decode(self, outputs: Sequence[np.ndarray], min_score: float | None = None) -> Decoded:
        return self.decoder.decode(outputs, self.manifest.min_score if min_score is None
                                   else min_score)

    def detect(self, image: np.ndarray, region: Region | None = None,
               min_score: float | None = None) -> Decoded:
        """Detections in `region` (default: all of `image`), boxes normalised to `image`."""
        return self.infer(self.prepare_region(image, region), min_score)

    def prepare_region(self, image: np.ndarray, region: Region | None = None) -> Prepared:
        """The input tensor for `region` of `image`, and how to map boxes back."""
        h, w = image.shape[:2]
        x0, y0, x1, y1 = region if region is not None else (0, 0, w, h)
        pixels, transform = self.resize(image[y0:y1, x0:x1])
        return Prepared(pixels, transform, (x0, y0), (w, h))

    def infer(self, prep: Prepared, min_score: float | None = None) -> Decoded:
        """Invoke the model on a prepared tensor; boxes normalised to the whole image."""
        found = self.decode(self.invoke_tensor(self.tensor(prep.pixels)), min_score)
        sx, sy, px, py = prep.transform
        x0, y0 = prep.origin
        w, h = prep.size
        if not len(found):
            return found
        # input-normalised -> crop pixels -> frame-normalised
        b = found.boxes.astype(np.float64)
        bx = (b[:, [0, 2]] * self.width - px) / sx + x0
        by = (b[:, [1, 3]] * self.height - py) / sy + y0
        boxes = np.stack([bx[:, 0] / w, by[:, 0] / h, bx[:, 1] / w, by[:, 1] / h], axis=1)
        return Decoded(np.clip(boxes, 0.0, 1.0).astype(np.float32), found.scores, found.classes)

    def to_detections(self, found: Decoded) -> list[Detection]:
        m: Manifest = self.manifest
        return [Detection(m.label(int(c)), float(min(max(s, 0.0), 1.0)),
                          (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
                for b, s, c in zip(found.boxes, found.scores, found.classes, strict=True)]

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close is not None:
            close()
