"""Models as data: a manifest per model, and the store that finds its file.

`models/<name>/manifest.toml` names the file and its sha256, the input
spec, the decoder and its parameters, labels, thresholds and golden
inputs with expected outputs. Where a file lives:

1. `<data_dir>/models/<name>/versions/<version>/` when `<data_dir>/models/<name>/active`
   names a version (the OTA store; `previous` names the one before);
2. next to the manifest in the repository's `models/<name>/` (small models we build);
3. the fetch cache, `$FOGWHISK_MODEL_CACHE` or `.cache/models/<name>/`
   (pretrained models `scripts/fetch-models` extracts from registry wheels).

A file whose sha256 differs from its manifest is refused: `ModelError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import ConfigError, ModelError
from agent.schema import build

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
MODELS_DIR = REPO / "models"
FETCH_HINT = "run scripts/fetch-models"


def cache_dir() -> Path:
    return Path(os.environ.get("FOGWHISK_MODEL_CACHE", REPO / ".cache" / "models"))


def samples_dir() -> Path:
    return Path(os.environ.get("FOGWHISK_SAMPLES", REPO / ".cache" / "samples"))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How a frame becomes the input tensor."""

    size: tuple[int, int]  # width, height
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["float32", "uint8", "int8"] = "float32"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    # Normalisation: `range = [lo, hi]` maps pixels 0..255 linearly onto lo..hi;
    # else (pixel - mean) / std per channel; neither: raw pixel values.
    range: tuple[float, float] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize: Literal["letterbox", "stretch"] = "letterbox"

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise ValueError(f"input.size must be positive, got {self.size}")
        if len(self.mean) != len(self.std):
            raise ValueError("input.mean and input.std need the same length")
        if any(s == 0 for s in self.std):
            raise ValueError("input.std must not contain 0")


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GoldenDetection:
    label: str
    box: tuple[float, float, float, float]  # normalised to the golden image
    score: float
    box_tol: float = 0.05
    score_tol: float = 0.05


@dataclass(frozen=True, slots=True)
class Golden:
    """A golden input and what the model must answer.

    `input` is a file under the model's directory: `.npy` (the input tensor),
    or an image; `sample:NAME` is an image from the samples cache.
    `outputs` is an `.npz` of raw outputs (arr_0, arr_1, ... by output index)
    compared within `atol`; `detections` are decoded results.
    """

    input: str
    outputs: str | None = None
    atol: float = 1e-4
    detections: tuple[GoldenDetection, ...] = ()
    none_above: float | None = None  # no detection may score at or above this


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: int
    file: str
    sha256: str
    input: InputSpec
    decoder: DecoderSpec
    labels: tuple[str, ...]
    runtime: str = "any"  # "any": the profile's chain; else the one runtime it needs
    min_score: float = 0.5
    nms_iou: float = 0.45
    max_detections: int = 20
    golden: tuple[Golden, ...] = ()
    source: str = ""  # provenance, for people
    license: str = ""

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if not 0 <= self.min_score <= 1 or not 0 <= self.nms_iou <= 1:
            raise ValueError("min_score and nms_iou must lie in [0, 1]")
        if not self.labels:
            raise ValueError("labels must not be empty")
        if "/" in self.file or self.file.startswith("."):
            raise ValueError(f"file {self.file!r} must be a plain file name")

    def label(self, class_id: int) -> str:
        if 0 <= class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A manifest and the verified file it names."""

    manifest: Manifest
    path: Path
    directory: Path  # the manifest's directory: golden files are relative to it


def read_manifest(path: Path) -> Manifest:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return build(Manifest, raw, str(path))
    except ConfigError as exc:
        raise ModelError(str(exc)) from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(manifest: Manifest, path: Path) -> None:
    """ModelError unless `path` hashes to the manifest's sha256."""
    got = sha256_file(path)
    if got != manifest.sha256:
        raise ModelError(
            f"model {manifest.name!r} v{manifest.version}: {path} has sha256 {got}, "
            f"the manifest says {manifest.sha256}: refusing a file that is not the one "
            f"the manifest names ({FETCH_HINT} to restore fetched models)")


class ModelStore:
    """Resolves a model name to its manifest and verified file."""

    def __init__(self, data_dir: Path | None = None, models_dir: Path = MODELS_DIR,
                 cache: Path | None = None) -> None:
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.cache = cache if cache is not None else cache_dir()

    def _installed(self, name: str) -> Path | None:
        if self.data_dir is None:
            return None
        active = self.data_dir / "models" / name / "active"
        try:
            version = active.read_text().strip()
        except OSError:
            return None
        path = self.data_dir / "models" / name / "versions" / version
        return path if (path / "manifest.toml").is_file() else None

    def manifest_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelError(f"bad model name {name!r}")
        installed = self._installed(name)
        if installed is not None:
            return installed
        path = self.models_dir / name
        if not (path / "manifest.toml").is_file():
            known = self.names()
            raise ModelError(f"no model {name!r} (known: {', '.join(known) or 'none'}; "
                             f"manifests live in {self.models_dir}/<name>/manifest.toml)")
        return path

    def resolve(self, name: str, check: bool = True) -> ModelRef:
        directory = self.manifest_dir(name)
        manifest = read_manifest(directory / "manifest.toml")
        if manifest.name != name:
            raise ModelError(f"{directory}/manifest.toml names model {manifest.name!r}, "
                             f"expected {name!r}")
        for candidate in (directory / manifest.file, self.cache / name / manifest.file):
            if candidate.is_file():
                if check:
                    verify(manifest, candidate)
                return ModelRef(manifest, candidate, directory)
        raise ModelError(f"model {name!r}: file {manifest.file} is in neither {directory} nor "
                         f"{self.cache / name}: {FETCH_HINT}")

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.models_dir.glob("*/manifest.toml"))
