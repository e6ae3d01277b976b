"""`fogwhisk model fetch`: pretrained model files from pinned registry wheels.

A catalog manifest with a `fetch` table names a wheel pinned to one version
(`mediapipe==0.10.21`) and the file's path inside it. The venv's own pip
downloads the wheel (`--no-deps --only-binary=:all:`: nothing is installed or
imported), the one member is extracted, and it is kept only when its sha256 is
the manifest's, as `<models_dir>/<name>/<file>`, where `ModelStore` looks.
Idempotent: a file that already hashes right is left alone. Versions that OTA
installed (`versions/`, `active`, `previous`) are never touched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import ModelError
from agent.vision.models import CATALOG, Manifest, ModelStore, read_manifest, verify

MAX_MODEL_BYTES = 1 << 30  # a wheel member larger than this is no model file we know
PIP_TIMEOUT_S = 900.0  # a 35 MB wheel over a slow uplink
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Fetched:
    """Where a model's file is now, and how it got there."""

    name: str
    path: Path
    how: Literal["fetched", "present", "shipped"]


def fetchable(catalog: Path = CATALOG) -> list[str]:
    """Catalog models whose file comes from a registry wheel."""
    store = ModelStore(catalog=catalog)
    return [n for n in store.names()
            if read_manifest(catalog / n / "manifest.toml").fetch is not None]


def fetch(name: str, models_dir: Path, *, catalog: Path = CATALOG, wheel: Path | None = None,
          downloads: Path | None = None, say: Callable[[str], None] = print) -> Fetched:
    """Put model `name`'s file into `models_dir`; ModelError says what went wrong.

    `wheel` is a wheel file already at hand (a board without network, or with no
    wheel of its own platform: the member is the same file in every wheel);
    `downloads` keeps downloaded wheels between runs (the checkout's cache).
    """
    directory = ModelStore(catalog=catalog).manifest_dir(name)  # no models_dir: the catalog's
    manifest = read_manifest(directory / "manifest.toml")
    shipped = directory / manifest.file
    if shipped.is_file():
        verify(manifest, shipped)
        return Fetched(name, shipped, "shipped")
    if manifest.fetch is None:
        raise ModelError(f"model {name!r} names no registry wheel to fetch "
                         f"{manifest.file} from: it comes with an OTA release, or copy the "
                         f"file to {models_dir / name / manifest.file}")
    dest = models_dir / name / manifest.file
    if dest.is_file():
        try:
            verify(manifest, dest)
            return Fetched(name, dest, "present")
        except ModelError:
            say(f"{name}: {dest} is not the file the manifest names: fetching it again")
    with tempfile.TemporaryDirectory(prefix="fogwhisk-fetch-") as tmp:
        if wheel is None:
            wheel = _download(manifest, downloads or Path(tmp), say)
        _make_dirs(dest.parent)
        _extract(manifest, wheel, dest)
    return Fetched(name, dest, "fetched")


def _download(manifest: Manifest, dest_dir: Path, say: Callable[[str], None]) -> Path:
    assert manifest.fetch is not None
    spec = manifest.fetch.wheel
    found = _wheel_in(dest_dir, spec)
    if found is not None:
        return found
    say(f"{manifest.name}: downloading {spec} (pip download, nothing is installed)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--dest", str(dest_dir), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelError(f"pip download {spec} took over {PIP_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-3:])
        raise ModelError(f"pip download {spec} failed (exit {proc.returncode}): {tail}; "
                         "with a wheel from elsewhere: fogwhisk model fetch "
                         f"{manifest.name} --wheel FILE")
    found = _wheel_in(dest_dir, spec)
    if found is None:
        raise ModelError(f"pip download {spec} left no wheel in {dest_dir}")
    return found


def _wheel_in(directory: Path, spec: str) -> Path | None:
    project, _, version = spec.partition("==")
    stem = project.lower().replace("-", "_").replace(".", "_")
    found = sorted(directory.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _extract(manifest: Manifest, wheel: Path, dest: Path) -> None:
    """The one member, hashed as it is written; renamed into place only when it matches."""
    assert manifest.fetch is not None
    member = manifest.fetch.member
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ModelError(f"{wheel} has no {member}") from None
            if info.file_size > MAX_MODEL_BYTES:
                raise ModelError(f"{wheel}: {member} is {info.file_size} bytes, "
                                 f"more than any model ({MAX_MODEL_BYTES})")
            with z.open(info) as src, open(part, "wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
    except (OSError, zipfile.BadZipFile) as exc:
        part.unlink(missing_ok=True)
        raise ModelError(f"{wheel}: cannot extract {member}: {exc}") from None
    except ModelError:
        part.unlink(missing_ok=True)
        raise
    if h.hexdigest() != manifest.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"model {manifest.name!r}: {member} in {wheel.name} has sha256 "
                         f"{h.hexdigest()}, the manifest says {manifest.sha256}: not kept")
    _give_away(part, dest.parent)
    os.replace(part, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename survives a power cut
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, each new directory owned like the nearest existing one above it."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir()
        _give_away(d, d.parent)


def _give_away(path: Path, like: Path) -> None:
    """Root fetching for the service: new files belong to the models dir's owner (the
    service user), so OTA can later write beside them."""
    if os.geteuid() != 0:
        return
    st = like.stat()
    if (st.st_uid, st.st_gid) != (0, 0):
        os.chown(path, st.st_uid, st.st_gid)


def main(names: Sequence[str], models_dir: Path, *, every: bool = False,
         wheel: Path | None = None, downloads: Path | None = None) -> int:
    """The command: 0 when every model is in place, 1 when one failed, 2 for bad usage."""
    if every:
        names = [*names, *(n for n in fetchable() if n not in names)]
    if not names:
        print("fogwhisk model fetch: name a model (or --all); fetchable: "
              f"{', '.join(fetchable())}", file=sys.stderr)
        return 2
    known = ModelStore(catalog=CATALOG).names()
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"fogwhisk model fetch: no model {unknown[0]!r} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        try:
            got = fetch(name, models_dir, wheel=wheel, downloads=downloads,
                        say=lambda line: print(line, flush=True))
        except ModelError as exc:
            print(f"fogwhisk model fetch: {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        what = {"fetched": "fetched, sha256 ok", "present": "already there, sha256 ok",
                "shipped": "ships with fogwhisk"}[got.how]
        print(f"{name}: {got.path} ({what})", flush=True)
    return 1 if failed else 0
