"""Model artifacts on the device: a tar of manifest, model file and goldens.

`extract` unpacks only regular files with plain relative names, bounded in number and
total size; `check_contents` holds what came out against the verified release. Both
block (hashing, file writes): the controller runs them in a worker thread.
`agent.ota.pack` makes artifacts (operator side, with the LiteRT Interpreter); this
module imports no model runtime, so the running agent never loads an unchecked model.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

from agent.errors import ModelError, OtaError, ReleaseError
from agent.ota import release as rel
from agent.vision.models import Manifest, read_manifest, sha256_file

MANIFEST = "manifest.toml"
MAX_ENTRIES = 256  # a manifest, a model and its goldens; far fewer in practice
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of a .tflite

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
        raise ReleaseError(f"manifest input.size is {wxh(manifest.input.size)}, the release's "
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


def wxh(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
