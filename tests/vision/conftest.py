"""Vision fixtures: fetched models and samples (scripts/setup fetches them), action contexts."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import CameraConfig, RuntimeConfig
from agent.models import ModelStore, cache_dir, samples_dir
from agent.pipeline import ActionContext
from agent.telemetry import Telemetry


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


@pytest.fixture(scope="session")
def store() -> ModelStore:
    for name in ("face", "person"):
        manifest = ModelStore().manifest_dir(name)
        if not any((d / name).is_dir() and any((d / name).glob("*.tflite"))
                   for d in (cache_dir(), manifest.parent)):
            pytest.fail(f"model {name} is not fetched: run scripts/fetch-models "
                        "(scripts/setup does)")
    return ModelStore()


def make_ctx(tmp_path: Path, pipeline: str = "cam", telemetry: Telemetry | None = None,
             runtime: RuntimeConfig | None = None) -> ActionContext:
    seq = itertools.count(1)
    return ActionContext(
        device="dev1", prefix="fog", pipeline=pipeline, step=0, data_dir=tmp_path,
        runtime=runtime or RuntimeConfig(num_threads=1), camera=CameraConfig(),
        boot_id="boot", telemetry=telemetry or Telemetry(), next_seq=lambda: next(seq))


@pytest.fixture
def ctx_factory(tmp_path: Path) -> Callable[..., ActionContext]:
    def make(**kw: object) -> ActionContext:
        return make_ctx(tmp_path, **kw)  # type: ignore[arg-type]
    return make
