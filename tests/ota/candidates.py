"""Candidate models for the device-side OTA tests: the catalog's shapes-ssd, changed.

`model_dir(tmp, knobs=...)` copies it and appends a fake-runtime trailer to the
model file (the manifest then names runtime "fake", which wraps LiteRT or
stands in for it: a crash by SIGSEGV, a hang, a slow or failing invoke), and
fixes the manifest's sha256. `edit` rewrites the manifest text.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.vision.models import ModelStore

NAME = "shapes-ssd"


def catalog_dir() -> Path:
    return ModelStore().manifest_dir(NAME)


def model_dir(tmp: Path, label: str, *, knobs: dict[str, Any] | None = None,
              edit: Callable[[str], str] | None = None, version: int = 1) -> Path:
    """A model directory for `pack` (or a trial): shapes-ssd with `knobs` and `edit`."""
    d = tmp / f"model-{label}"
    shutil.copytree(catalog_dir(), d)
    manifest = d / "manifest.toml"
    text = manifest.read_text()
    text = re.sub(r"(?m)^version = \d+$", f"version = {version}", text)
    if knobs is not None:
        model = d / "shapes-ssd.tflite"
        data = model.read_bytes() + b"\nFOGWHISK-FAKE" + json.dumps(knobs).encode() + b"\n"
        model.write_bytes(data)
        text = re.sub(r"(?m)^sha256 = .*$", f'sha256 = "{hashlib.sha256(data).hexdigest()}"',
                      text)
        text = text.replace("\nlabels = ", '\nruntime = "fake"\nlabels = ', 1)
    if edit is not None:
        text = edit(text)
    manifest.write_text(text)
    return d
