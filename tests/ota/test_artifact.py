"""Artifacts: a deterministic tar packed from a model directory with its signed release;
on the device, safe extraction and the checks of what came out against the release."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from ota_util import MAX, NOW, SHAPES, Keys, Packed  # type: ignore[import-not-found]

from agent.errors import OtaError, ReleaseError
from agent.ota import artifact, release
from agent.ota import pack as packing
from agent.vision.models import CATALOG, read_manifest, sha256_file


def verified(p: Packed, keys: Keys, name: str = "shapes-ssd") -> release.Release:
    return release.parse_and_verify(p.doc, topic_name=name, keys={keys.keyid: keys.public},
                                     threshold=1, max_bytes=MAX, now=NOW)


def one_line(exc: pytest.ExceptionInfo[ReleaseError]) -> str:
    text = exc.value.reason
    assert "\n" not in text and len(text) < 300, text
    return text


# --- pack -------------------------------------------------------------------------------


def test_pack_writes_a_tar_and_a_release_that_names_it(packed: Packed, ota_keys: Keys) -> None:
    assert (packed.tar.name, packed.release_json.name) == \
        ("shapes-ssd-2.tar", "shapes-ssd-2.release.json")
    r = verified(packed, ota_keys)
    assert (r.name, r.version) == ("shapes-ssd", 2)
    assert r.artifact_sha256 == hashlib.sha256(packed.tar.read_bytes()).hexdigest()
    assert r.artifact_size == packed.tar.stat().st_size
    manifest = read_manifest(SHAPES / "manifest.toml")
    assert r.model_sha256 == manifest.sha256 == sha256_file(SHAPES / "shapes-ssd.tflite")
    assert r.labels_sha256 == hashlib.sha256(b"square\ndisc").hexdigest()
    assert r.expires == NOW + timedelta(days=30)
    assert r.policy == release.Policy()
    signed = json.loads(packed.doc)["signed"]
    assert signed["policy"] == {"max_latency_ratio": 2.0, "max_error_rate": 0.05}
    assert signed["expires"] == "2030-01-31T12:00:00Z"
    assert (signed["type"], signed["spec"]) == ("fogwhisk-model-release", 1)


def test_pack_reads_the_tensors_from_the_model_file(packed: Packed, ota_keys: Keys) -> None:
    r = verified(packed, ota_keys)
    assert r.inputs == ({"shape": [1, 96, 96, 3], "dtype": "uint8"},)
    assert r.outputs == ({"shape": [1, 10], "dtype": "float32"},
                         {"shape": [1, 10, 4], "dtype": "float32"},
                         {"shape": [1], "dtype": "float32"},
                         {"shape": [1, 10], "dtype": "float32"})


def test_the_tar_holds_the_manifest_model_and_goldens_with_normalised_headers(
        packed: Packed) -> None:
    with tarfile.open(packed.tar) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "golden/input.npy", "golden/outputs.npz", "manifest.toml", "shapes-ssd.tflite"]
        for m in members:
            assert m.isreg() and not m.pax_headers
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        packed_manifest = tar.extractfile("manifest.toml").read()  # type: ignore[union-attr]
        model = tar.extractfile("shapes-ssd.tflite").read()  # type: ignore[union-attr]
    assert model == (SHAPES / "shapes-ssd.tflite").read_bytes()
    assert b"PaxHeader" not in packed.tar.read_bytes()
    # The packed manifest is the author's file (comments kept) with the version set.
    original = (SHAPES / "manifest.toml").read_text()
    assert packed_manifest.decode() == original.replace("version = 1\n", "version = 2\n")


def test_packing_twice_gives_identical_bytes_whatever_the_files_times_and_modes(
        tmp_path: Path, ota_keys: Keys) -> None:
    copy = tmp_path / "shapes-ssd"
    shutil.copytree(SHAPES, copy)
    first = packing.pack(copy, 5, tmp_path / "a", ota_keys.private, now=NOW)
    for path in copy.rglob("*"):
        os.utime(path, (1, 1_000_000))
        if path.is_file():
            path.chmod(0o600)
    second = packing.pack(copy, 5, tmp_path / "b", ota_keys.private, now=NOW)
    assert first[0].read_bytes() == second[0].read_bytes()
    assert first[1].read_bytes() == second[1].read_bytes()


def test_the_version_line_is_found_however_it_is_written(
        tmp_path: Path, ota_keys: Keys) -> None:
    copy = tmp_path / "m"
    shutil.copytree(SHAPES, copy)
    text = (copy / "manifest.toml").read_text()
    assert "version = 1\n" in text
    (copy / "manifest.toml").write_text(
        text.replace("version = 1\n", '  "version"  =  1   # the first one\n'))
    tar, _ = packing.pack(copy, 12, tmp_path / "out", ota_keys.private, now=NOW)
    dest = tmp_path / "x"
    artifact.extract(tar, dest, max_total_bytes=MAX)
    assert read_manifest(dest / "manifest.toml") == dataclasses.replace(
        read_manifest(SHAPES / "manifest.toml"), version=12)


def test_a_golden_from_the_samples_cache_travels_inside_the_artifact(
        tmp_path: Path, ota_keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "shapes.png").write_bytes(b"\x89PNG fake image bytes")
    monkeypatch.setenv("FOGWHISK_SAMPLES", str(samples))
    copy = tmp_path / "m"
    shutil.copytree(SHAPES, copy)
    with open(copy / "manifest.toml", "a") as f:
        f.write('\n[[golden]]\ninput = "sample:shapes.png"\nnone_above = 0.9\n')
    tar, release_json = packing.pack(copy, 3, tmp_path / "out", ota_keys.private, now=NOW)
    dest = tmp_path / "x"
    artifact.extract(tar, dest, max_total_bytes=MAX)
    r = release.parse_and_verify(release_json.read_bytes(), topic_name="shapes-ssd",
                                 keys={ota_keys.keyid: ota_keys.public}, threshold=1,
                                 max_bytes=MAX, now=NOW)
    manifest = artifact.check_contents(dest, r)
    assert [g.input for g in manifest.golden] == ["golden/input.npy", "samples/shapes.png"]
    assert (dest / "samples" / "shapes.png").read_bytes() == b"\x89PNG fake image bytes"


def test_pack_signs_with_every_key_given(tmp_path: Path, ota_keys: Keys,
                                         other_keys: Keys) -> None:
    _, release_json = packing.pack(SHAPES, 2, tmp_path, [ota_keys.private, other_keys.private],
                                    now=NOW)
    r = release.parse_and_verify(
        release_json.read_bytes(), topic_name="shapes-ssd", threshold=2, max_bytes=MAX, now=NOW,
        keys={ota_keys.keyid: ota_keys.public, other_keys.keyid: other_keys.public})
    assert set(r.keyids) == {ota_keys.keyid, other_keys.keyid}


def test_pack_writes_the_expiry_and_policy_it_is_given(tmp_path: Path, ota_keys: Keys) -> None:
    policy = release.Policy(max_latency_ratio=1.25, probation_s=120.0, min_golden_recall=1.0)
    _, release_json = packing.pack(SHAPES, 2, tmp_path, ota_keys.private, expires_s=3600,
                                    policy=policy, now=NOW)
    signed = json.loads(release_json.read_bytes())["signed"]
    assert signed["expires"] == "2030-01-01T13:00:00Z"
    assert signed["policy"] == {"max_latency_ratio": 1.25, "max_error_rate": 0.05,
                                "probation_s": 120.0, "min_golden_recall": 1.0}


def _model_dir(tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    copy = tmp_path / "shapes-ssd"
    shutil.copytree(SHAPES, copy)
    edit(copy)
    return copy


def _set_manifest(old: str, new: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        text = (d / "manifest.toml").read_text()
        assert old in text
        (d / "manifest.toml").write_text(text.replace(old, new))
    return edit


def _garbage_model(d: Path) -> None:
    data = b"\x00" * 64
    (d / "shapes-ssd.tflite").write_bytes(data)
    _set_manifest(read_manifest(d / "manifest.toml").sha256,
                  hashlib.sha256(data).hexdigest())(d)


PACK_BAD: list[tuple[str, Callable[[Path], None], str]] = [
    ("no manifest", lambda d: (d / "manifest.toml").unlink(), "manifest.toml"),
    ("manifest not TOML", lambda d: (d / "manifest.toml").write_text("name = "), "TOML"),
    ("manifest unknown key", _set_manifest("min_score", "speed = 1\nmin_score"), "speed"),
    ("model missing", lambda d: (d / "shapes-ssd.tflite").unlink(), "shapes-ssd.tflite"),
    ("model sha differs", lambda d: (d / "shapes-ssd.tflite").write_bytes(b"x" * 10), "sha256"),
    ("golden missing", lambda d: (d / "golden" / "outputs.npz").unlink(), "golden/outputs.npz"),
    ("golden outside", _set_manifest('"golden/input.npy"', '"../shapes-yolo/golden/input.npy"'),
     "golden"),
    ("no TFLite model", _garbage_model, "TFLite"),
    ("manifest size other than the model's", _set_manifest("[96, 96]", "[128, 128]"), "96x96"),
]


@pytest.mark.parametrize(("case", "edit", "words"), PACK_BAD, ids=[c for c, _, _ in PACK_BAD])
def test_pack_refuses_a_model_directory_it_cannot_vouch_for(
        tmp_path: Path, ota_keys: Keys, case: str, edit: Callable[[Path], None],
        words: str) -> None:
    model_dir = _model_dir(tmp_path, edit)
    with pytest.raises(ReleaseError) as info:
        packing.pack(model_dir, 2, tmp_path / "out", ota_keys.private, now=NOW)
    assert words in one_line(info)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pack_refuses_a_version_below_one_and_a_non_positive_expiry(
        tmp_path: Path, ota_keys: Keys) -> None:
    with pytest.raises(ReleaseError, match="version"):
        packing.pack(SHAPES, 0, tmp_path, ota_keys.private, now=NOW)
    with pytest.raises(ReleaseError, match="expir"):
        packing.pack(SHAPES, 2, tmp_path, ota_keys.private, expires_s=0, now=NOW)


def test_pack_takes_the_fetched_file_from_the_model_cache(
        tmp_path: Path, ota_keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest without its file beside it (a fetched model) packs from the cache."""
    cache = tmp_path / "cache"
    (cache / "shapes-ssd").mkdir(parents=True)
    shutil.copy(SHAPES / "shapes-ssd.tflite", cache / "shapes-ssd")
    monkeypatch.setenv("FOGWHISK_MODEL_CACHE", str(cache))
    model_dir = _model_dir(tmp_path, lambda d: (d / "shapes-ssd.tflite").unlink())
    tar, _ = packing.pack(model_dir, 2, tmp_path / "out", ota_keys.private, now=NOW)
    with tarfile.open(tar) as t:
        assert "shapes-ssd.tflite" in t.getnames()


# --- extract ----------------------------------------------------------------------------


def test_extract_then_check_contents_gives_the_packed_manifest(
        tmp_path: Path, packed: Packed, ota_keys: Keys) -> None:
    dest = tmp_path / "incoming" / "x"
    artifact.extract(packed.tar, dest, max_total_bytes=MAX)
    manifest = artifact.check_contents(dest, verified(packed, ota_keys))
    assert manifest == dataclasses.replace(read_manifest(SHAPES / "manifest.toml"), version=2)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "golden/input.npy", "golden/outputs.npz", "manifest.toml", "shapes-ssd.tflite"]
    for name in ("golden/input.npy", "shapes-ssd.tflite"):
        assert (dest / name).read_bytes() == (SHAPES / name).read_bytes()


def _tar(tmp_path: Path, *entries: tarfile.TarInfo | tuple[str, bytes],
         fmt: int = tarfile.PAX_FORMAT) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for e in entries:
            if isinstance(e, tuple):
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
            else:
                tar.addfile(e)
    return path


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


OK = ("manifest.toml", b"name = 'x'\n")

EXTRACT_BAD: list[tuple[str, tuple[tarfile.TarInfo | tuple[str, bytes], ...], str]] = [
    ("parent path", (OK, ("../evil", b"x")), "'../evil'"),
    ("parent inside", (OK, ("golden/../../evil", b"x")), ".."),
    ("absolute path", (OK, ("/tmp/evil", b"x")), "absolute"),
    ("symlink", (OK, _special("model.tflite", tarfile.SYMTYPE, "/etc/passwd")), "symlink"),
    ("hard link", (OK, _special("model.tflite", tarfile.LNKTYPE, "manifest.toml")), "hard link"),
    ("char device", (OK, _special("zero", tarfile.CHRTYPE)), "device"),
    ("block device", (OK, _special("sda", tarfile.BLKTYPE)), "device"),
    ("fifo", (OK, _special("pipe", tarfile.FIFOTYPE)), "fifo"),
    ("directory", (OK, _special("golden", tarfile.DIRTYPE)), "directory"),
    ("duplicate", (OK, ("manifest.toml", b"name = 'y'\n")), "twice"),
    ("dot path", (OK, ("./x", b"x")), "'./x'"),
    ("backslash", (OK, ("a\\b", b"x")), "'a\\\\b'"),
    ("empty name component", (OK, ("golden//x", b"x")), "golden//x"),
    ("control character", (OK, ("a\nb", b"x")), "'a\\nb'"),
]


@pytest.mark.parametrize(("case", "entries", "words"), EXTRACT_BAD,
                         ids=[c for c, _, _ in EXTRACT_BAD])
def test_extract_refuses_an_unsafe_tar_and_writes_nothing(
        tmp_path: Path, case: str, entries: tuple[tarfile.TarInfo | tuple[str, bytes], ...],
        words: str) -> None:
    tar = _tar(tmp_path, *entries)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ReleaseError) as info:
        artifact.extract(tar, dest, max_total_bytes=MAX)
    assert words in one_line(info)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


def test_extract_refuses_a_total_above_its_bound_before_writing(tmp_path: Path) -> None:
    tar = _tar(tmp_path, ("a.bin", b"x" * 600), ("b.bin", b"y" * 600))
    with pytest.raises(ReleaseError) as info:
        artifact.extract(tar, tmp_path / "dest", max_total_bytes=1000)
    assert "more than 1000 bytes" in one_line(info)
    assert not (tmp_path / "dest").exists()
    artifact.extract(tar, tmp_path / "dest", max_total_bytes=1200)
    assert (tmp_path / "dest" / "b.bin").read_bytes() == b"y" * 600


def test_extract_refuses_more_entries_than_a_model_needs(tmp_path: Path) -> None:
    tar = _tar(tmp_path, *[(f"f{i:04d}", b"") for i in range(artifact.MAX_ENTRIES + 1)])
    with pytest.raises(ReleaseError) as info:
        artifact.extract(tar, tmp_path / "dest", max_total_bytes=MAX)
    assert "entries" in one_line(info)


def test_extract_refuses_what_is_no_tar(tmp_path: Path, packed: Packed) -> None:
    cases = {
        "garbage": b"\x00\x01 this is no tar " * 100,
        "gzip": __import__("gzip").compress(packed.tar.read_bytes()),
        "truncated": packed.tar.read_bytes()[:3000],
        "empty": b"",
    }
    for case, data in cases.items():
        path = tmp_path / f"{case}.tar"
        path.write_bytes(data)
        with pytest.raises(ReleaseError) as info:
            artifact.extract(path, tmp_path / case, max_total_bytes=MAX)
        assert "tar" in one_line(info), case
        assert not (tmp_path / case).exists(), case


def test_extract_needs_a_new_or_empty_destination(tmp_path: Path, packed: Packed) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "left-over").write_bytes(b"x")
    with pytest.raises(OtaError, match="not empty"):
        artifact.extract(packed.tar, dest, max_total_bytes=MAX)
    assert (dest / "left-over").read_bytes() == b"x"


# --- check_contents ---------------------------------------------------------------------


@pytest.fixture
def extracted(tmp_path: Path, packed: Packed, ota_keys: Keys) -> tuple[Path, release.Release]:
    dest = tmp_path / "dest"
    artifact.extract(packed.tar, dest, max_total_bytes=MAX)
    return dest, verified(packed, ota_keys)


def _edit_manifest(dest: Path, old: str, new: str) -> None:
    text = (dest / "manifest.toml").read_text()
    assert old in text
    (dest / "manifest.toml").write_text(text.replace(old, new))


def test_check_contents_refuses_a_manifest_naming_another_model(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    _edit_manifest(dest, 'name = "shapes-ssd"', 'name = "person"')
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert one_line(info) == "manifest names model 'person', the release 'shapes-ssd'"


def test_check_contents_refuses_a_manifest_of_another_version(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    _edit_manifest(dest, "version = 2", "version = 3")
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert one_line(info) == "manifest has version 3, the release 2"


def test_check_contents_refuses_a_model_file_other_than_the_manifests(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    model = dest / "shapes-ssd.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "shapes-ssd.tflite has sha256" in one_line(info)


def test_check_contents_refuses_a_manifest_sha_other_than_the_release(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, dataclasses.replace(r, model_sha256="0" * 64))
    assert "the release says model sha256 0000000000000000" in one_line(info)


def test_check_contents_refuses_labels_other_than_the_release(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    _edit_manifest(dest, 'labels = ["square", "disc"]', 'labels = ["disc", "square"]')
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "labels" in one_line(info)


def test_check_contents_refuses_an_input_size_other_than_the_release(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    other = dataclasses.replace(r, inputs=({"shape": [1, 128, 128, 3], "dtype": "uint8"},))
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, other)
    assert one_line(info) == \
        "manifest input.size is 96x96, the release's model input is [1, 128, 128, 3]"


def test_check_contents_refuses_a_file_that_is_no_tflite_model(
        extracted: tuple[Path, release.Release]) -> None:
    """Even when every hash agrees (a signer who packed by hand), the file must be TFLite."""
    dest, r = extracted
    data = b"\x1c\x00\x00\x00ONNX" + b"\x00" * 100
    (dest / "shapes-ssd.tflite").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    _edit_manifest(dest, r.model_sha256, sha)
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, dataclasses.replace(r, model_sha256=sha))
    assert one_line(info) == \
        "shapes-ssd.tflite is no TFLite model (no TFL3 identifier at bytes 4..8)"


def test_check_contents_refuses_missing_and_unexpected_files(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    (dest / "golden" / "outputs.npz").unlink()
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "golden/outputs.npz" in one_line(info)
    (dest / "golden" / "outputs.npz").write_bytes(b"")
    (dest / "extra.bin").write_bytes(b"x")
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "extra.bin" in one_line(info)


def test_check_contents_refuses_a_missing_or_broken_manifest(
        extracted: tuple[Path, release.Release]) -> None:
    dest, r = extracted
    (dest / "manifest.toml").write_text("name = ")
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "manifest.toml" in one_line(info)
    (dest / "manifest.toml").unlink()
    with pytest.raises(ReleaseError) as info:
        artifact.check_contents(dest, r)
    assert "manifest.toml" in one_line(info)


def test_every_own_model_packs_extracts_and_checks(tmp_path: Path, ota_keys: Keys) -> None:
    """The round trip holds for each model built in this repository."""
    for name in ("shapes-ssd", "shapes-yolo", "motion-cls"):
        tar, release_json = packing.pack(CATALOG / name, 7, tmp_path / "out",
                                          ota_keys.private, now=NOW)
        r = release.parse_and_verify(release_json.read_bytes(), topic_name=name,
                                     keys={ota_keys.keyid: ota_keys.public}, threshold=1,
                                     max_bytes=MAX, now=NOW)
        dest = tmp_path / name
        artifact.extract(tar, dest, max_total_bytes=r.artifact_size)
        assert artifact.check_contents(dest, r).version == 7
