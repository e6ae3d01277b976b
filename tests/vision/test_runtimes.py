"""Runtimes and the model store: clear errors, fallback without crash loops, sha256 checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelError
from agent.telemetry import Telemetry
from agent.vision import runtimes
from agent.vision.models import ModelStore
from agent.vision.runtimes.fake import FakeModel


def copy_model(store: ModelStore, tmp_path: Path, name: str = "face") -> tuple[Path, Path]:
    """A private models dir and cache holding a copy of `name`."""
    ref = store.resolve(name)
    models, cache = tmp_path / "models", tmp_path / "cache"
    shutil.copytree(ref.directory, models / name)
    (cache / name).mkdir(parents=True)
    shutil.copy(ref.path, cache / name / ref.manifest.file)
    return models, cache


def test_litert_loads_with_threads_and_reports_tensors(store: ModelStore) -> None:
    model = runtimes.load("litert", store.resolve("face").path, 2)
    assert model.runtime == "litert"
    assert model.inputs[0].shape == (1, 128, 128, 3)
    assert sorted(o.shape for o in model.outputs) == [(1, 896, 1), (1, 896, 16)]
    outs = model.invoke([np.zeros((1, 128, 128, 3), np.float32)])
    assert [o.shape for o in outs] == [o.shape for o in model.outputs]


def test_a_model_file_that_differs_from_its_manifest_is_refused(
        store: ModelStore, tmp_path: Path) -> None:
    models, cache = copy_model(store, tmp_path)
    path = cache / "face" / "face_detection_short_range.tflite"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        ModelStore(None, models, cache).resolve("face")


def test_a_missing_model_file_says_to_run_fetch_models(store: ModelStore, tmp_path: Path) -> None:
    models, cache = copy_model(store, tmp_path)
    shutil.rmtree(cache / "face")
    with pytest.raises(ModelError, match="scripts/fetch-models"):
        ModelStore(None, models, cache).resolve("face")


def test_an_unknown_model_names_the_known_ones(store: ModelStore) -> None:
    with pytest.raises(ModelError, match="face"):
        store.resolve("no-such-model")


def test_tflite_runtime_missing_names_the_extra_to_install(store: ModelStore) -> None:
    with pytest.raises(ModelError, match=r"fogwhisk\[tflite\]"):
        runtimes.load("tflite", store.resolve("face").path, 1)


def test_edgetpu_without_a_device_is_a_model_error(store: ModelStore) -> None:
    with pytest.raises(ModelError, match="libedgetpu"):
        runtimes.load("edgetpu", store.resolve("face").path, 1)


def test_unknown_runtime_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="known"):
        runtimes.load("cuda", Path("x.tflite"), 1)


def test_fallback_chain_runs_degraded_instead_of_failing(store: ModelStore) -> None:
    telemetry = Telemetry()
    model = runtimes.ChainedModel(store.resolve("face").path, ("edgetpu", "litert"), 1,
                                  reprobe_s=0.0, telemetry=telemetry)
    assert model.runtime == "litert"
    assert model.degraded and runtimes.degraded()
    assert telemetry.component("runtime").values["degraded"] == 1
    # Re-probing the Edge TPU on every invoke (reprobe_s=0) still serves every invoke.
    for _ in range(3):
        model.invoke([np.zeros((1, 128, 128, 3), np.float32)])
    assert "edgetpu" in model.errors
    model.close()
    assert telemetry.component("runtime").values["degraded"] == 0


def test_no_loadable_runtime_is_one_clear_error(store: ModelStore) -> None:
    with pytest.raises(ModelError, match="no runtime"):
        runtimes.ChainedModel(store.resolve("face").path, ("edgetpu", "tflite"), 1, 60.0)


def test_fake_runtime_is_deterministic(tmp_path: Path) -> None:
    model = runtimes.load("fake", tmp_path / "m.tflite", 1)
    x = np.full((1, 128, 128, 3), 0.5, np.float32)
    a, b = model.invoke([x]), model.invoke([x])
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], model.invoke([x * 0])[0])


def test_a_failing_runtime_falls_back_on_invoke(store: ModelStore, tmp_path: Path) -> None:
    spec = tmp_path / "m.json"
    spec.write_text('{"inputs": [{"shape": [1, 4]}], "outputs": [{"shape": [1, 2]}], '
                    '"raise": true}')
    failing = runtimes.load("fake", spec, 1)
    assert isinstance(failing, FakeModel)
    with pytest.raises(RuntimeError):
        failing.invoke([np.zeros((1, 4), np.float32)])
