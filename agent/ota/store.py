"""Model versions on disk, and the update state beside them, power-loss safe.

    <models_dir>/<name>/versions/<version>/   manifest.toml, model file, goldens
    <models_dir>/<name>/active                the version that runs (what ModelStore reads)
    <models_dir>/<name>/previous              the fallback
    <data_dir>/ota/<name>.json                the update state (agent.ota.state)
    <data_dir>/ota/incoming/                  downloads and extractions in progress

(`<models_dir>` is `[models] dir`, default `<data_dir>/models`.) Every change
is a new file or directory made complete and synced under a temporary name,
then renamed into place, then the directory synced: a kill -9 or a power cut
at any point leaves either the old or the new version, never a half-written
one. `active` is always renamed last, so it only ever names a complete
version directory. `recover()` at start removes what an interrupted step
left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from agent.errors import ModelError, OtaError
from agent.ota.state import ModelState, from_json, to_json
from agent.vision.models import ModelRef, read_manifest, verify

log = logging.getLogger(__name__)

TMP = ".tmp-"  # prefix of everything not yet complete
KEEP = 2  # versions kept: active and previous


def _no_checkpoint(_where: str) -> None:
    return None


# Called between the steps of every change with the step's name; tests set it to kill
# the process there and check what a restart finds.
checkpoint: Callable[[str], None] = _no_checkpoint


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f"{TMP}{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    checkpoint(f"wrote {tmp.name}")
    os.replace(tmp, path)
    checkpoint(f"renamed {path.name}")
    fsync_dir(path.parent)


def _copy_synced(src: Path, dest: Path) -> None:
    """Copy a directory tree (regular files only) and fsync every file and directory."""
    dest.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.is_symlink():
            raise OtaError(f"{item}: a link where a model file was expected")
        if item.is_dir():
            _copy_synced(item, dest / item.name)
        elif item.is_file():
            with open(item, "rb") as fin, open(dest / item.name, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
    fsync_dir(dest)


class VersionStore:
    """Installs, switches and prunes versions of models under one data dir."""

    def __init__(self, data_dir: Path, models_dir: Path | None = None) -> None:
        self.models_dir = models_dir if models_dir is not None else data_dir / "models"
        self.ota_dir = data_dir / "ota"
        self.incoming = self.ota_dir / "incoming"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.models_dir / name / "versions" / str(version)

    # -- reading -----------------------------------------------------------------

    def _pointer(self, name: str, which: str) -> int | None:
        try:
            text = (self.model_dir(name) / which).read_text().strip()
        except FileNotFoundError:
            return None
        try:
            version = int(text)
        except ValueError:
            raise OtaError(f"{self.model_dir(name) / which}: {text[:40]!r} is no version") \
                from None
        return version if (self.version_dir(name, version) / "manifest.toml").is_file() else None

    def active(self, name: str) -> int | None:
        return self._pointer(name, "active")

    def previous(self, name: str) -> int | None:
        return self._pointer(name, "previous")

    def ref(self, name: str, version: int) -> ModelRef:
        """An installed version's manifest and sha256-verified file (OtaError otherwise)."""
        d = self.version_dir(name, version)
        try:
            manifest = read_manifest(d / "manifest.toml")
            path = d / manifest.file
            verify(manifest, path)
        except (ModelError, OSError) as exc:
            raise OtaError(f"model {name} version {version}: {exc}") from exc
        return ModelRef(manifest, path, d)

    def versions(self, name: str) -> list[int]:
        root = self.model_dir(name) / "versions"
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())

    # -- changing ----------------------------------------------------------------

    def recover(self) -> None:
        """Remove what an interrupted change left: temporary files and directories."""
        for root in [self.ota_dir, *(d for d in self.models_dir.glob("*") if d.is_dir()),
                     *self.models_dir.glob("*/versions")]:
            if not root.is_dir():
                continue
            for item in root.iterdir():
                if item.name.startswith(TMP):
                    log.info("ota: removing %s left by an interrupted update", item)
                    if item.is_dir() and not item.is_symlink():
                        shutil.rmtree(item, ignore_errors=True)
                    else:
                        item.unlink(missing_ok=True)

    def install(self, name: str, version: int, src: Path) -> Path:
        """Copy a verified, extracted release into versions/<version> (not active yet)."""
        if version in (self.active(name), self.previous(name)):
            raise OtaError(f"model {name}: version {version} is installed and in use")
        root = self.model_dir(name) / "versions"
        root.mkdir(parents=True, exist_ok=True)
        final = root / str(version)
        if final.exists():  # a leftover of an attempt that was rejected or interrupted
            shutil.rmtree(final)
            fsync_dir(root)
        tmp = root / f"{TMP}{version}"
        if tmp.exists():
            shutil.rmtree(tmp)
        _copy_synced(src, tmp)
        checkpoint("copied")
        os.rename(tmp, final)
        checkpoint("installed")
        fsync_dir(root)
        return final

    def adopt(self, name: str, ref: ModelRef) -> int:
        """Copy the model the agent runs today (repository or cache) in as a version and make
        it active, so that the first update has a previous version to fall back to."""
        version = ref.manifest.version
        if self.active(name) == version:
            return version
        root = self.model_dir(name) / "versions"
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP}{version}"
        if tmp.exists():
            shutil.rmtree(tmp)
        _copy_synced(ref.directory, tmp)
        if not (tmp / ref.manifest.file).is_file():  # the fetch cache holds the file
            with open(ref.path, "rb") as fin, open(tmp / ref.manifest.file, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            fsync_dir(tmp)
        final = root / str(version)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        self.switch(name, version, None)
        return version

    def switch(self, name: str, active: int, previous: int | None) -> None:
        """Point `active` (and `previous`) at installed versions, each file atomically.

        `previous` is written first: a cut between the two leaves the old `active`,
        which is complete, and a `previous` that may equal it (harmless).
        """
        for v in (active, previous):
            if v is not None and not (self.version_dir(name, v) / "manifest.toml").is_file():
                raise OtaError(f"model {name}: version {v} is not installed")
        d = self.model_dir(name)
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                (d / "previous").unlink()
                fsync_dir(d)
        else:
            write_atomic(d / "previous", f"{previous}\n".encode())
        checkpoint("previous")
        write_atomic(d / "active", f"{active}\n".encode())
        checkpoint("active")

    def prune(self, name: str) -> list[int]:
        """Remove every version but active and previous (keep 2); return those removed."""
        keep = {self.active(name), self.previous(name)} - {None}
        if not keep:
            return []
        gone = [v for v in self.versions(name) if v not in keep]
        for v in gone:
            shutil.rmtree(self.version_dir(name, v), ignore_errors=True)
        if gone:
            fsync_dir(self.model_dir(name) / "versions")
        return gone

    def discard(self, name: str, version: int) -> None:
        """Remove a version that never became active (rejected)."""
        if version in (self.active(name), self.previous(name)):
            return
        path = self.version_dir(name, version)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            fsync_dir(path.parent)

    # -- the update state ----------------------------------------------------------

    def _state_path(self, name: str) -> Path:
        return self.ota_dir / f"{name}.json"

    def load_state(self, name: str) -> ModelState | None:
        """The persisted state of `name`'s update; None when there is none (or unreadable,
        said in the log: the update starts over from what is on disk)."""
        path = self._state_path(name)
        try:
            raw = json.loads(path.read_bytes())
            return from_json(raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ota: %s is unreadable (%s); starting from what is on disk", path, exc)
            return None

    def save_state(self, s: ModelState) -> None:
        self.ota_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._state_path(s.name),
                     json.dumps(to_json(s), separators=(",", ":")).encode())
