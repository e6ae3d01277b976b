"""Packing a release (operator side): a model directory becomes a deterministic tar
and its signed release document.

The tar is byte-for-byte reproducible: entries sorted by name, ustar headers (no pax
timestamps), mtime 0, uid/gid 0, no owner names, mode 0644. Packing the same
directory twice at the same time gives identical bytes and an identical release
(Ed25519 signatures are deterministic). Reads the model's tensors with the LiteRT
Interpreter: this module is for `fogwhisk model pack`, never the running agent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import re
import tarfile
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ConfigError, ModelError, ReleaseError
from agent.ota import release as rel
from agent.ota.artifact import MANIFEST, is_tflite, name_problem, wxh
from agent.schema import build
from agent.vision.models import Golden, Manifest, cache_dir, read_manifest, samples_dir

DEFAULT_EXPIRES_S = 30 * 86400.0
SAMPLES = "samples"  # where `sample:NAME` goldens travel inside the artifact


def _one_line(text: str) -> str:
    return " ".join(text.split())


def pack(model_dir: Path, version: int, out_dir: Path,
         key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
         expires_s: float = DEFAULT_EXPIRES_S, policy: rel.Policy | None = None,
         now: datetime | None = None) -> tuple[Path, Path]:
    """Write `out_dir/<name>-<version>.tar` and `.release.json` signed by each key.

    ReleaseError, before anything is written, for a directory it cannot vouch for: bad
    manifest, missing or altered model file (sha256), no TFLite model, missing golden,
    manifest input size other than the model's.
    """
    keys = [key] if isinstance(key, Ed25519PrivateKey) else list(key)
    if not keys:
        raise ReleaseError("pack needs at least one signing key")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReleaseError(f"version must be an integer of at least 1, got {version!r}")
    if not math.isfinite(expires_s) or expires_s <= 0:
        raise ReleaseError(f"expiry must be a positive duration, got {expires_s} s")
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    manifest, text = _read_source_manifest(model_dir)
    model = _model_bytes(model_dir, manifest)
    files: dict[str, bytes] = {manifest.file: model}
    goldens: list[Golden] = []
    for g in manifest.golden:
        input_name = g.input
        if g.input.startswith("sample:"):
            sample = g.input.removeprefix("sample:")
            input_name = f"{SAMPLES}/{sample}"
            text = _rewrite_sample(text, g.input, input_name)
            _add(files, input_name, _read(samples_dir() / sample, f"golden input {g.input!r}"))
        else:
            _add(files, g.input, _golden(model_dir, g.input))
        if g.outputs is not None:
            _add(files, g.outputs, _golden(model_dir, g.outputs))
        goldens.append(dataclasses.replace(g, input=input_name))
    inputs, outputs = _tensors(model_dir / manifest.file, model, manifest)
    expected = dataclasses.replace(manifest, version=version, golden=tuple(goldens))
    text = _set_version(text, version)
    try:
        packed = build(Manifest, tomllib.loads(text), f"{model_dir}/{MANIFEST} (packed)")
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(_one_line(f"cannot set the version: {exc}")) from None
    if packed != expected:
        raise ReleaseError(f"{model_dir}/{MANIFEST}: cannot set version = {version} in it "
                           f"(write `version = {version}` as a top-level line)")
    _add(files, MANIFEST, text.encode())

    name = manifest.name
    out_dir.mkdir(parents=True, exist_ok=True)
    tar_path = out_dir / f"{name}-{version}.tar"
    json_path = out_dir / f"{name}-{version}.release.json"
    tar_bytes = deterministic_tar(files)
    signed: dict[str, Any] = {
        "type": rel.RELEASE_TYPE, "spec": rel.SPEC, "name": name, "version": version,
        "expires": rel.format_time(now + timedelta(seconds=expires_s)),
        "artifact": {"sha256": _sha256(tar_bytes), "size": len(tar_bytes)},
        "model": {"sha256": manifest.sha256, "inputs": inputs, "outputs": outputs,
                  "labels_sha256": rel.labels_sha256(manifest.labels)},
        "policy": (policy or rel.Policy()).to_json(),
    }
    doc = rel.sign(signed, keys[0])
    for k in keys[1:]:
        doc = rel.cosign(doc, k)
    _write_atomic(tar_path, tar_bytes)
    _write_atomic(json_path, rel.dump(doc))
    return tar_path, json_path


def deterministic_tar(files: dict[str, bytes]) -> bytes:
    """A ustar archive of `files` (name -> bytes) that depends on nothing else."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_source_manifest(model_dir: Path) -> tuple[Manifest, str]:
    path = model_dir / MANIFEST
    try:
        manifest = read_manifest(path)
        text = path.read_text(encoding="utf-8")
    except ModelError as exc:
        raise ReleaseError(_one_line(str(exc))) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path}: cannot read: {exc}") from None
    return manifest, text


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{what}: cannot read {path}: {exc.strerror}") from None


def _model_bytes(model_dir: Path, manifest: Manifest) -> bytes:
    problem = name_problem(manifest.file)
    if problem:
        raise ReleaseError(f"model file {manifest.file!r} is {problem}")
    # A fetched model's file may sit in the checkout's fetch cache instead.
    cache = cache_dir()
    candidates = [model_dir / manifest.file]
    if cache is not None:
        candidates.append(cache / manifest.name / manifest.file)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ReleaseError(f"model file {manifest.file} is in neither "
                           f"{' nor '.join(str(c.parent) for c in candidates)}")
    data = _read(path, "model file")
    got = _sha256(data)
    if got != manifest.sha256:
        raise ReleaseError(f"{path} has sha256 {got}, the manifest says {manifest.sha256}")
    if not is_tflite(data[:8]):
        raise ReleaseError(f"{path} is no TFLite model (no TFL3 identifier at bytes 4..8)")
    return data


def _golden(model_dir: Path, name: str) -> bytes:
    problem = name_problem(name)
    if problem:
        raise ReleaseError(f"golden file {name!r} is {problem}")
    path = model_dir / name
    if path.is_symlink() or not path.is_file():
        raise ReleaseError(f"golden file {name} is not a regular file in {model_dir}")
    return _read(path, "golden file")


def _add(files: dict[str, bytes], name: str, data: bytes) -> None:
    problem = name_problem(name)
    if problem:
        raise ReleaseError(f"file {name!r} is {problem}")
    if files.get(name, data) != data:
        raise ReleaseError(f"two different files would be packed as {name}")
    files[name] = data


def _rewrite_sample(text: str, old: str, new: str) -> str:
    """`input = "sample:x.png"` -> `input = "samples/x.png"` (checked by re-parsing)."""
    pattern = re.compile(r"""(["'])""" + re.escape(old) + r"\1")
    return pattern.sub(lambda m: m.group(1) + new + m.group(1), text)


def _set_version(text: str, version: int) -> str:
    """The manifest text with its top-level `version` line set (comments and order kept);
    the caller re-parses the result and compares it with what it expects."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.match(r"\s*\[", line):  # the first table: top-level keys end here
            break
        if re.match(r"""\s*(version|"version"|'version')\s*=""", line):
            lines[i] = f"version = {version}\n"
            return "".join(lines)
    return text  # not found: the comparison after re-parsing refuses it


def _tensors(path: Path, model: bytes, manifest: Manifest
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output tensors as the LiteRT Interpreter reads them from the file."""
    import tempfile

    try:
        from agent.vision import runtimes
    except ImportError as exc:  # a relay-only install: no numpy, no LiteRT
        raise ReleaseError(f"pack reads the model's tensors with LiteRT ({exc.name} is "
                           f"missing): pip install 'fogwhisk[vision]'") from None

    # The bytes we pack, not the path again: the file could change in between.
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(model)
        f.flush()
        try:
            loaded = runtimes.load("litert", Path(f.name), 1)
        except ModelError as exc:
            raise ReleaseError(_one_line(f"{path}: {exc}")) from None
        inputs = [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in loaded.inputs]
        outputs = [{"shape": list(t.shape), "dtype": str(t.dtype)} for t in loaded.outputs]
    if inputs and len(inputs[0]["shape"]) == 4:
        _, height, width, _ = inputs[0]["shape"]
        if (width, height) != tuple(manifest.input.size):
            raise ReleaseError(f"manifest input.size is {wxh(manifest.input.size)}, the model "
                               f"takes {width}x{height}")
    return inputs, outputs


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
