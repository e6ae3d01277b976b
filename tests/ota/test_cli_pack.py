"""The operator's `fogwhisk model keygen|pack|sign` as a real process: files, exit codes
(0 ok, 1 refused, 2 bad usage) and one-line messages."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ota_util import MAX, SHAPES, Keys  # type: ignore[import-not-found]

from agent.ota import release


def fogwhisk(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def verify(release_json: Path, keys: list[Keys], threshold: int = 1,
           now: datetime | None = None) -> release.Release:
    return release.parse_and_verify(
        release_json.read_bytes(), topic_name="shapes-ssd", threshold=threshold,
        keys={k.keyid: k.public for k in keys}, max_bytes=MAX,
        now=now or datetime.now(UTC))


def test_keygen_writes_the_key_pair_and_names_its_keyid(tmp_path: Path) -> None:
    run = fogwhisk("model", "keygen", "--out", tmp_path / "keys")
    assert run.returncode == 0, run.stderr
    key, pub = tmp_path / "keys" / "ota.key", tmp_path / "keys" / "ota.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    (kid, _), = release.load_public_keys([pub]).items()
    assert kid == release.keyid(release.load_private_key(key).public_key())
    assert kid in run.stdout and str(pub) in run.stdout


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    assert fogwhisk("model", "keygen", "--out", tmp_path).returncode == 0
    before = (tmp_path / "ota.key").read_bytes(), (tmp_path / "ota.pub").read_bytes()
    run = fogwhisk("model", "keygen", "--out", tmp_path)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "exists" in run.stderr, run.stderr
    assert ((tmp_path / "ota.key").read_bytes(), (tmp_path / "ota.pub").read_bytes()) == before


def test_pack_writes_a_tar_and_a_release_valid_for_30_days(
        tmp_path: Path, ota_keys: Keys) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                   "--out", tmp_path / "out")
    after = datetime.now(UTC)
    assert run.returncode == 0, run.stderr
    tar = tmp_path / "out" / "shapes-ssd-4.tar"
    release_json = tmp_path / "out" / "shapes-ssd-4.release.json"
    assert str(tar) in run.stdout and str(release_json) in run.stdout
    r = verify(release_json, [ota_keys])
    assert (r.name, r.version, r.artifact_size) == ("shapes-ssd", 4, tar.stat().st_size)
    assert before + timedelta(days=30) <= r.expires <= after + timedelta(days=30)


def test_pack_writes_into_the_current_directory_by_default(
        tmp_path: Path, ota_keys: Keys) -> None:
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["shapes-ssd-4.release.json", "shapes-ssd-4.tar"]


def test_packing_twice_from_the_cli_gives_the_same_artifact(
        tmp_path: Path, ota_keys: Keys) -> None:
    for out in ("a", "b"):
        run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                       "--out", tmp_path / out)
        assert run.returncode == 0, run.stderr
    assert (tmp_path / "a" / "shapes-ssd-4.tar").read_bytes() == \
        (tmp_path / "b" / "shapes-ssd-4.tar").read_bytes()


def test_pack_takes_expiry_and_policy_from_the_command_line(
        tmp_path: Path, ota_keys: Keys) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                   "--out", tmp_path, "--expires", "2h",
                   "--policy", "max_latency_ratio=1.5", "--policy", "probation_s=10m",
                   "--policy", "min_golden_recall=1", "--policy", 'shadow={"frames": 100}')
    after = datetime.now(UTC)
    assert run.returncode == 0, run.stderr
    r = verify(tmp_path / "shapes-ssd-4.release.json", [ota_keys])
    assert before + timedelta(hours=2) <= r.expires <= after + timedelta(hours=2)
    assert r.policy == release.Policy(max_latency_ratio=1.5, probation_s=600.0,
                                      min_golden_recall=1.0, shadow={"frames": 100})


@pytest.mark.parametrize(("args", "words"), [
    (["--expires", "soon"], "--expires"),
    (["--expires", "0s"], "--expires"),
    (["--policy", "speed=3"], "speed"),
    (["--policy", "max_latency_ratio"], "KEY=VALUE"),
    (["--policy", "max_latency_ratio=fast"], "max_latency_ratio"),
    (["--policy", "max_error_rate=2"], "max_error_rate"),
    (["--policy", "shadow=[1]"], "shadow"),
    (["--version", "zero"], "--version"),
    (["--version", "0"], "--version"),
])
def test_pack_names_the_bad_argument_and_exits_2(
        tmp_path: Path, ota_keys: Keys, args: list[str], words: str) -> None:
    base = ["model", "pack", SHAPES, "--key", ota_keys.key_path, "--out", tmp_path]
    if "--version" not in args:
        base += ["--version", "4"]
    run = fogwhisk(*base, *args)
    assert run.returncode == 2, run.stderr
    assert words in run.stderr
    assert not any(tmp_path.iterdir())


def test_pack_refuses_a_broken_model_directory_in_one_line(
        tmp_path: Path, ota_keys: Keys) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "manifest.toml").write_text('name = "m"\n')
    run = fogwhisk("model", "pack", model_dir, "--version", "4", "--key", ota_keys.key_path,
                   "--out", tmp_path / "out")
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "manifest.toml" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_public_key_as_signing_key(tmp_path: Path, ota_keys: Keys) -> None:
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.pub_path,
                   "--out", tmp_path)
    assert run.returncode == 1
    assert "private key" in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_threshold_releases_are_signed_by_several_keys_at_pack_or_later(
        tmp_path: Path, ota_keys: Keys, other_keys: Keys) -> None:
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                   "--key", other_keys.key_path, "--out", tmp_path / "both")
    assert run.returncode == 0, run.stderr
    assert len(verify(tmp_path / "both" / "shapes-ssd-4.release.json",
                      [ota_keys, other_keys], threshold=2).keyids) == 2
    # One operator packs, a second one co-signs the same release later.
    run = fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                   "--out", tmp_path / "later")
    release_json = tmp_path / "later" / "shapes-ssd-4.release.json"
    assert run.returncode == 0, run.stderr
    run = fogwhisk("model", "sign", release_json, "--key", other_keys.key_path,
                   "--trust", ota_keys.pub_path)
    assert run.returncode == 0, run.stderr
    assert other_keys.keyid in run.stdout
    r = verify(release_json, [ota_keys, other_keys], threshold=2)
    assert set(r.keyids) == {ota_keys.keyid, other_keys.keyid}


def test_sign_refuses_a_document_that_no_longer_matches_its_signatures(
        tmp_path: Path, ota_keys: Keys, other_keys: Keys) -> None:
    """A co-signer never vouches for a release someone changed after the first signature."""
    assert fogwhisk("model", "pack", SHAPES, "--version", "4", "--key", ota_keys.key_path,
                    "--out", tmp_path).returncode == 0
    release_json = tmp_path / "shapes-ssd-4.release.json"
    doc = json.loads(release_json.read_bytes())
    doc["signed"]["version"] = 5
    release_json.write_text(json.dumps(doc))
    run = fogwhisk("model", "sign", release_json, "--key", other_keys.key_path,
                   "--trust", ota_keys.pub_path)
    assert run.returncode == 1
    assert "bad signature" in run.stderr, run.stderr
    assert len(json.loads(release_json.read_bytes())["signatures"]) == 1


def test_model_help_lists_the_operator_commands() -> None:
    run = fogwhisk("model", "--help")
    assert run.returncode == 0
    for command in ("keygen", "pack", "sign", "push", "status"):
        assert command in run.stdout


def test_pack_without_the_vision_extra_names_what_to_install(
        tmp_path: Path, ota_keys: Keys) -> None:
    """A relay-only install (no numpy, no LiteRT) refuses to pack in one line."""
    code = (
        "import sys\n"
        "class NoVision:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('numpy', 'cv2', 'ai_edge_litert'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoVision())\n"
        "from agent.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = subprocess.run(
        [sys.executable, "-c", code, "model", "pack", str(SHAPES), "--version", "4",
         "--key", str(ota_keys.key_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1, run.stderr
    assert "pip install 'fogwhisk[vision]'" in run.stderr and run.stderr.count("\n") == 1, \
        run.stderr
    assert not (tmp_path / "out").exists()
