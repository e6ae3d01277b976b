"""Model artifacts: a deterministic tar of manifest, model file and goldens.

Operator side, `pack` validates a model directory and writes `<name>-<N>.tar` with its
signed `<name>-<N>.release.json`. Device side, `extract` unpacks only regular files
with plain relative names, bounded in number and total size, and `check_contents`
holds what came out against the verified release. Both are blocking (hashing, file
writes): the controller runs them in a worker thread.

The tar is byte-for-byte reproducible: entries sorted by name, ustar headers (no pax
timestamps), mtime 0, uid/gid 0, no owner names, mode 0644. Packing the same
directory twice at the same time gives identical bytes and an identical release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ConfigError, ModelError, OtaError, ReleaseError
from agent.ota import release as rel
from agent.schema import build
from agent.vision.models import Golden, Manifest, cache_dir, read_manifest, samples_dir

MANIFEST = "manifest.toml"
DEFAULT_EXPIRES_S = 30 * 86400.0
MAX_ENTRIES = 256  # a manifest, a model and its goldens; far fewer in practice
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of a .tflite
SAMPLES = "samples"  # where `sample:NAME` goldens travel inside the artifact

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
_CHUNK = 1 << 20


def _one_line(text: str) -> str:
    return " ".join(text.split())


def name_problem(name: str) -> str | None:
    """Why `name` may not be a file in an artifact, or None: plain relative paths only."""
    if name.startswith("/"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a path outside the artifact ('..')"
    if len(name) > 255 or len(parts) > 4 or not all(_PART.fullmatch(p) for p in parts):
        return "not a plain relative path (letters, digits, '.', '_', '-' between '/')"
    return None


def is_tflite(head: bytes) -> bool:
    return head[4:8] == TFLITE_IDENTIFIER


# --- pack (operator side) ---------------------------------------------------------------


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
    _write_atomic(json_path, dump(doc))
    return tar_path, json_path


def dump(doc: dict[str, Any]) -> bytes:
    """A release document as written to disk and published: indented, UTF-8."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


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

    from agent.vision import runtimes

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
            raise ReleaseError(f"manifest input.size is {_wxh(manifest.input.size)}, the model "
                               f"takes {width}x{height}")
    return inputs, outputs


def _wxh(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- extract and check (device side) ----------------------------------------------------


def extract(tar: Path, dest: Path, *, max_total_bytes: int) -> None:
    """Unpack `tar` into `dest` (new or empty): regular files with plain relative names,
    at most MAX_ENTRIES of them, `max_total_bytes` in all. Every header is checked
    before a byte is written; on any refusal `dest` is left as it was (ReleaseError).
    A write that fails (a full disk) is an OtaError: the release is not to blame."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OtaError(f"cannot extract into {dest}: it exists and is not empty")
    try:
        with tarfile.open(tar, "r:") as tf:
            members = _checked_members(tf, max_total_bytes)
            created = not dest.exists()
            try:
                _write_members(tf, members, dest)
            except BaseException:
                _clear(dest, remove=created)
                raise
    except tarfile.TarError as exc:
        raise ReleaseError(_one_line(f"not a complete tar archive: {exc}")) from None
    except EOFError:
        raise ReleaseError("not a complete tar archive: unexpected end of data") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename == str(tar):
            raise OtaError(f"no artifact at {tar}") from None
        raise OtaError(f"cannot extract into {dest}: {exc.strerror or exc}") from None


def _checked_members(tf: tarfile.TarFile, max_total_bytes: int) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    names: set[str] = set()
    total = 0
    while (m := tf.next()) is not None:
        if len(members) >= MAX_ENTRIES:
            raise ReleaseError(f"tar has more than {MAX_ENTRIES} entries")
        problem = name_problem(m.name) or _type_problem(m)
        if problem:
            raise ReleaseError(f"tar entry {m.name!r}: {problem}")
        if m.name in names:
            raise ReleaseError(f"tar entry {m.name!r} appears twice")
        total += m.size
        if total > max_total_bytes:
            raise ReleaseError(f"tar holds more than {max_total_bytes} bytes")
        names.add(m.name)
        members.append(m)
    for name in names:  # `a` and `a/b` cannot both be files
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                parent = "/".join(parts[:i])
                raise ReleaseError(f"tar entry {name!r} lies under the file {parent!r}")
    if not members:
        raise ReleaseError("tar is empty")
    return members


def _type_problem(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"a symlink (to {m.linkname!r}): only regular files are allowed"
    if m.islnk():
        return f"a hard link (to {m.linkname!r}): only regular files are allowed"
    if m.ischr() or m.isblk():
        return "a device: only regular files are allowed"
    if m.isfifo():
        return "a fifo: only regular files are allowed"
    if m.isdir():
        return "a directory: only regular files are allowed"
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse():
        return f"of tar type {m.type!r}: only regular files are allowed"
    return None


def _write_members(tf: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    dirs = {dest}
    for m in members:
        path = dest / m.name
        path.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(path.parent)
        src = tf.extractfile(m)
        if src is None:  # not reached: only regular files get here
            raise ReleaseError(f"tar entry {m.name!r} has no data")
        # O_EXCL | O_NOFOLLOW: never through a link, never over a file already there.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            left = m.size
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise ReleaseError("not a complete tar archive: unexpected end of data")
                out.write(chunk)
                left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _clear(dest: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def check_contents(dest: Path, release: rel.Release) -> Manifest:
    """The manifest in `dest` if what was extracted is what `release` signed: manifest
    name and version, model file sha256 (file == manifest == release), a TFLite file,
    labels hash, input size, every golden present and no other file."""
    from agent.vision.models import sha256_file

    mpath = dest / MANIFEST
    if not _regular(mpath):
        raise ReleaseError(f"artifact has no {MANIFEST}")
    try:
        manifest = read_manifest(mpath)
    except ModelError as exc:
        raise ReleaseError(_one_line(str(exc).replace(str(mpath), MANIFEST))) from None
    if manifest.name != release.name:
        raise ReleaseError(f"manifest names model {manifest.name!r}, the release "
                           f"{release.name!r}")
    if manifest.version != release.version:
        raise ReleaseError(f"manifest has version {manifest.version}, the release "
                           f"{release.version}")
    model = dest / manifest.file
    if not _regular(model):
        raise ReleaseError(f"artifact has no model file {manifest.file}")
    got = sha256_file(model)
    if got != manifest.sha256:
        raise ReleaseError(f"{manifest.file} has sha256 {got}, the manifest says "
                           f"{manifest.sha256}")
    if manifest.sha256 != release.model_sha256:
        raise ReleaseError(f"manifest says model sha256 {manifest.sha256}, the release says "
                           f"model sha256 {release.model_sha256}")
    with open(model, "rb") as f:
        if not is_tflite(f.read(8)):
            raise ReleaseError(f"{manifest.file} is no TFLite model (no TFL3 identifier at "
                               f"bytes 4..8)")
    labels = rel.labels_sha256(manifest.labels)
    if labels != release.labels_sha256:
        raise ReleaseError(f"manifest labels hash to {labels}, the release says "
                           f"{release.labels_sha256}")
    if release.inputs and len(shape := release.inputs[0]["shape"]) == 4 \
            and (shape[2], shape[1]) != tuple(manifest.input.size):
        raise ReleaseError(f"manifest input.size is {_wxh(manifest.input.size)}, the release's "
                           f"model input is {shape}")
    expected = {MANIFEST, manifest.file}
    for g in manifest.golden:
        for name in (g.input, g.outputs):
            if name is None:
                continue
            if name.startswith("sample:"):
                raise ReleaseError(f"golden input {name!r} is not in the artifact")
            if name_problem(name) or not _regular(dest / name):
                raise ReleaseError(f"artifact has no {name} (a golden file the manifest names)")
            expected.add(name)
    for root, _, names in os.walk(dest):
        for n in sorted(names):
            rel_name = Path(root, n).relative_to(dest).as_posix()
            if rel_name not in expected:
                raise ReleaseError(f"artifact has a file its manifest does not name: {rel_name}")
    return manifest


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
