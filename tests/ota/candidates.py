"""Candidate models for the device-side OTA tests: the catalog's shapes-ssd, changed.

`model_dir(tmp, knobs=...)` copies it and appends a fake-runtime trailer to the
model file (the manifest then names runtime "fake", which wraps LiteRT or
stands in for it: a crash by SIGSEGV, a hang, a slow or failing invoke), and
fixes the manifest's sha256. `edit` rewrites the manifest text.

`real_dir(tmp, "face", ...)` does the same for a fetched real model (face, person:
MediaPipe's LiteRT files in the fetch cache), its `sample:` goldens copied in as
`samples/NAME` (what `fogwhisk model pack` puts in the artifact), so the directory can
be packed or given to a trial as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.vision.models import ModelStore, cache_dir, samples_dir

NAME = "shapes-ssd"


def catalog_dir() -> Path:
    return ModelStore().manifest_dir(NAME)


def model_dir(tmp: Path, label: str, *, knobs: dict[str, Any] | None = None,
              edit: Callable[[str], str] | None = None, version: int = 1) -> Path:
    """A model directory for `pack` (or a trial): shapes-ssd with `knobs` and `edit`."""
    d = tmp / f"model-{label}"
    shutil.copytree(catalog_dir(), d)
    return _change(d, "shapes-ssd.tflite", knobs=knobs, edit=edit, version=version)


def real_dir(tmp: Path, name: str, label: str, *, knobs: dict[str, Any] | None = None,
             edit: Callable[[str], str] | None = None, version: int = 1) -> Path:
    """The catalog's `name` (a fetched model) as a model directory, changed as `model_dir`
    changes shapes-ssd; `edit` sees the manifest with `samples/NAME` golden inputs."""
    d = tmp / f"model-{label}"
    shutil.copytree(ModelStore().manifest_dir(name), d)
    text = (d / "manifest.toml").read_text()
    file = re.search(r'(?m)^file = "(.+)"$', text)
    cache = cache_dir()
    assert file is not None and cache is not None
    shutil.copy(cache / name / file.group(1), d / file.group(1))
    (d / "samples").mkdir()
    for sample in re.findall(r'"sample:([^"]+)"', text):
        shutil.copy(samples_dir() / sample, d / "samples" / sample)
    (d / "manifest.toml").write_text(re.sub(r'"sample:([^"]+)"', r'"samples/\1"', text))
    return _change(d, file.group(1), knobs=knobs, edit=edit, version=version)


def _change(d: Path, file: str, *, knobs: dict[str, Any] | None,
            edit: Callable[[str], str] | None, version: int) -> Path:
    manifest = d / "manifest.toml"
    text = manifest.read_text()
    text = re.sub(r"(?m)^version = \d+$", f"version = {version}", text)
    if knobs is not None:
        model = d / file
        data = model.read_bytes() + b"\nFOGWHISK-FAKE" + json.dumps(knobs).encode() + b"\n"
        model.write_bytes(data)
        text = re.sub(r"(?m)^sha256 = .*$", f'sha256 = "{hashlib.sha256(data).hexdigest()}"',
                      text)
        text = text.replace("\nlabels = ", '\nruntime = "fake"\nlabels = ', 1)
    if edit is not None:
        text = edit(text)
    manifest.write_text(text)
    return d


def faces_dir(tmp: Path, label: str, extra: str = "", *, version: int = 1) -> Path:
    """The real face model (MediaPipe BlazeFace short range, LiteRT) with its goldens
    (astronaut.png: one face; coffee.png: none) and more labelled real photos, a small
    labelled test set: the cameraman's face in camera.png, and astronaut.png shrunk to
    half size in the corner of a black frame, a face at about twice the distance, which
    this short-range model does not find. `extra`: more manifest text."""
    def add(text: str) -> str:
        return text + f"""
[[golden]]
input = "samples/camera.png"

[[golden.detections]]
label = "face"
score = 0.8
box = [0.34, 0.232, 0.516, 0.409]

[[golden]]
input = "golden/far.png"

[[golden.detections]]
label = "face"
score = 0.9
box = [0.174, 0.0785, 0.265, 0.170]
{extra}"""
    d = real_dir(tmp, "face", label, edit=add, version=version)
    shutil.copy(samples_dir() / "camera.png", d / "samples" / "camera.png")
    image = cv2.imread(str(samples_dir() / "astronaut.png"))
    far = np.zeros_like(image)
    far[:256, :256] = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    (d / "golden").mkdir()
    cv2.imwrite(str(d / "golden" / "far.png"), far)
    return d
