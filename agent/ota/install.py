"""Installing a downloaded release: safe extraction, contents, and compatibility with
the pipelines that run the model (`Consumer`), then the version on disk.

A candidate must fit the pipelines built around the active model: the same input
and output tensors as the loaded detector, the same input size and dtype, and the
active model's labels at the same class ids (steps read class ids by label).
Blocking (hashing, file writes): the controller runs it in a worker thread.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import ReleaseError
from agent.ota import artifact
from agent.ota.release import Release
from agent.ota.store import VersionStore
from agent.vision.models import Manifest, ModelStore

if TYPE_CHECKING:  # the hub (numpy, OpenCV) exists only where a pipeline detects
    from agent.vision.hub import ModelHub


@dataclass(frozen=True, slots=True)
class Consumer:
    """A detect step that runs the model: what it needs of a new version."""

    pipeline: str
    labels: tuple[str, ...]


def consumers(cfg: Config) -> dict[str, list[Consumer]]:
    out: dict[str, list[Consumer]] = {}
    for p in cfg.pipelines:
        for s in p.steps:
            if s.action == "detect":
                out.setdefault(s.params.model, []).append(Consumer(p.name, s.params.labels))
    return out


def install(store: VersionStore, models: ModelStore, hub: ModelHub | None,
            users: list[Consumer], name: str, r: Release, tar: Path) -> Manifest:
    """Extract, check against the release and the pipelines, install (blocking)."""
    dest = store.incoming / f"{name}-{r.version}.d"
    shutil.rmtree(dest, ignore_errors=True)
    artifact.extract(tar, dest, max_total_bytes=r.artifact_size)
    manifest = artifact.check_contents(dest, r)
    check_compatible(models, hub, users, name, r, manifest)
    if store.active(name) is None:  # the first update: what runs becomes a version
        store.adopt(name, models.resolve(name))
    store.install(name, r.version, dest)
    shutil.rmtree(dest, ignore_errors=True)
    return manifest


def check_compatible(models: ModelStore, hub: ModelHub | None, users: list[Consumer],
                     name: str, r: Release, manifest: Manifest) -> None:
    """The candidate must fit the pipelines built around the active model."""
    names = ", ".join(c.pipeline for c in users)
    current = models.resolve(name, check=False).manifest
    det = None
    if hub is not None:
        det = next((sl.detector for sl in hub.slots.get(name, [])
                    if sl.detector is not None), None)
    if det is not None:
        for kind, want, got in (("input", det.model.inputs, r.inputs),
                                ("output", det.model.outputs, r.outputs)):
            want_t = [{"shape": list(ti.shape), "dtype": str(ti.dtype)} for ti in want]
            if [dict(g) for g in got] != want_t:
                raise ReleaseError(f"incompatible {kind} tensors: the release's model has "
                                   f"{_tensors(got)}, pipeline {names} runs on "
                                   f"{_tensors(want_t)}")
    if (tuple(manifest.input.size), manifest.input.dtype) != \
            (tuple(current.input.size), current.input.dtype):
        raise ReleaseError(f"incompatible input: {_wxh(manifest.input.size)} "
                           f"{manifest.input.dtype}, pipeline {names} runs on "
                           f"{_wxh(current.input.size)} {current.input.dtype}")
    for i, label in enumerate(current.labels):
        new = manifest.labels[i] if i < len(manifest.labels) else None
        if new != label:
            raise ReleaseError(f"incompatible labels: class {i} is {label!r} in the active "
                               f"model, {new!r} in the release (pipeline {names} reads "
                               f"class ids by these labels)")


def _tensors(ts: Any) -> str:
    return ", ".join(f"{list(t['shape'])} {t['dtype']}" for t in ts)


def _wxh(size: Any) -> str:
    return f"{size[0]}x{size[1]}"
