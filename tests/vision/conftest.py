"""Vision fixtures: the model store (models fetched by scripts/setup) and action contexts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from vision_util import make_ctx  # type: ignore[import-not-found]

from agent.pipeline import ActionContext
from agent.vision.models import ModelStore, cache_dir


@pytest.fixture(scope="session")
def store() -> ModelStore:
    for name in ("face", "person"):
        manifest = ModelStore().manifest_dir(name)
        if not any((d / name).is_dir() and any((d / name).glob("*.tflite"))
                   for d in (cache_dir(), manifest.parent)):
            pytest.fail(f"model {name} is not fetched: run scripts/fetch-models "
                        "(scripts/setup does)")
    return ModelStore()


@pytest.fixture
def ctx_factory(tmp_path: Path) -> Callable[..., ActionContext]:
    def make(**kw: object) -> ActionContext:
        return make_ctx(tmp_path, **kw)  # type: ignore[arg-type]
    return make
