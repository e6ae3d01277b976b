"""Frigate-style motion detection: cheap enough to run on every frame.

The frame is shrunk to about 100 px high and turned to luma, blurred, and
compared with a running-average background; changed pixels are
thresholded, dilated and grouped into contours; contours smaller than
`min_area` (in the small frame's pixels) are noise. When more than
`lightning` of the frame changes at once (lightning, IR switching, auto
exposure) the background is reset and no motion is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 normalised to the frame


@dataclass(frozen=True, slots=True)
class MotionSettings:
    threshold: int = 30  # luma change (0..255) that counts as motion
    min_area: int = 10  # contour area in pixels of the small frame
    frame_height: int = 100
    alpha: float = 0.02  # background learning rate per frame
    lightning: float = 0.8  # share of the frame changed at once that resets the background
    dilate: int = 2  # dilation iterations (joins a walker's limbs into one box)
    mask: tuple[tuple[float, ...], ...] = ()  # polygons, flat [x0, y0, x1, y1, ...] in 0..1

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= 255:
            raise ValueError("threshold must lie in 1..255")
        if not 0 < self.alpha <= 1 or not 0 < self.lightning <= 1:
            raise ValueError("alpha and lightning must lie in (0, 1]")
        if self.frame_height < 8:
            raise ValueError("frame_height must be at least 8")
        for poly in self.mask:
            if len(poly) < 6 or len(poly) % 2:
                raise ValueError("a mask polygon needs at least 3 points as [x0, y0, x1, y1, ...]")


class MotionDetector:
    """One camera's background model; `detect(image)` returns motion boxes (maybe none)."""

    def __init__(self, settings: MotionSettings) -> None:
        self.s = settings
        self.avg: np.ndarray | None = None
        self.size: tuple[int, int] = (0, 0)
        self.keep: np.ndarray | None = None  # 0 where masked, 255 elsewhere
        self.kernel = np.ones((3, 3), np.uint8)
        self.lightning_resets = 0

    def _setup(self, w: int, h: int) -> None:
        sh = self.s.frame_height
        self.size = (max(1, round(w * sh / h)), sh)
        if self.s.mask:
            keep = np.full((sh, self.size[0]), 255, np.uint8)
            for poly in self.s.mask:
                pts = (np.asarray(poly, np.float64).reshape(-1, 2) * [self.size[0], sh])
                cv2.fillPoly(keep, [pts.round().astype(np.int32)], (0,))
            self.keep = keep
        self.avg = None

    def small_luma(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if self.size[1] != self.s.frame_height or self.size[0] != max(
                1, round(w * self.s.frame_height / h)):
            self._setup(w, h)
        # Shrink first: the colour conversion then touches 1/50 of the pixels.
        small = cv2.resize(image, self.size, interpolation=cv2.INTER_LINEAR)
        luma = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        return cv2.GaussianBlur(luma, (3, 3), 0)

    def detect(self, image: np.ndarray) -> list[Box]:
        luma = self.small_luma(image)
        if self.avg is None or self.avg.shape != luma.shape:
            self.avg = luma.astype(np.float32)
            return []
        diff = cv2.absdiff(luma, cv2.convertScaleAbs(self.avg))
        _, changed = cv2.threshold(diff, self.s.threshold, 255, cv2.THRESH_BINARY)
        if self.keep is not None:
            changed = cv2.bitwise_and(changed, self.keep)
        if cv2.countNonZero(changed) > self.s.lightning * changed.size:
            self.avg = luma.astype(np.float32)
            self.lightning_resets += 1
            return []
        cv2.accumulateWeighted(luma, self.avg, self.s.alpha)
        if self.s.dilate:
            changed = cv2.dilate(changed, self.kernel, iterations=self.s.dilate)
        contours, _ = cv2.findContours(changed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        w, h = self.size
        boxes: list[Box] = []
        for c in contours:
            if cv2.contourArea(c) < self.s.min_area:
                continue
            x, y, bw, bh = cv2.boundingRect(c)
            boxes.append((x / w, y / h, (x + bw) / w, (y + bh) / h))
        return boxes


def union(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))
