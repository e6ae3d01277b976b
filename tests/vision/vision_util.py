"""Vision test helpers: fetched samples (scripts/setup fetches them) and action contexts."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import CameraConfig, RuntimeConfig
from agent.pipeline import ActionContext
from agent.telemetry import Telemetry
from agent.vision.models import samples_dir


def sample_path(name: str) -> Path:
    path = samples_dir() / name
    if not path.is_file():
        pytest.fail(f"sample {path} is missing: run scripts/fetch-samples (scripts/setup does)")
    return path


def sample_image(name: str) -> np.ndarray:
    img = cv2.imread(str(sample_path(name)), cv2.IMREAD_COLOR)
    assert img is not None, name
    return img


def video_frames(name: str = "vtest.avi", limit: int | None = None) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(sample_path(name)))
    out = []
    while limit is None or len(out) < limit:
        ok, img = cap.read()
        if not ok:
            break
        out.append(img)
    cap.release()
    return out


def make_ctx(tmp_path: Path, pipeline: str = "cam", telemetry: Telemetry | None = None,
             runtime: RuntimeConfig | None = None) -> ActionContext:
    seq = itertools.count(1)
    return ActionContext(
        device="dev1", prefix="fog", pipeline=pipeline, step=0, data_dir=tmp_path,
        runtime=runtime or RuntimeConfig(num_threads=1), camera=CameraConfig(),
        boot_id="boot", telemetry=telemetry or Telemetry(), next_seq=lambda: next(seq))
