"""A frame payload can make the agent read and allocate only so much: sizes come from
the header before decoding, file references stay below `path_root`, and nothing read
from a file is quoted in an error. The agent-level proofs (RSS, SIGTERM, counters) are
in tests/test_input_hardening.py, which also builds the hostile images used here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import struct
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_input_hardening import (  # type: ignore[import-not-found]
    bomb_png,
    huge_sof_jpeg,
    jpeg,
    msgpack_frame,
    patch_sof,
)
from vision_util import make_ctx  # type: ignore[import-not-found]

from agent.actions import decode
from agent.config import ServiceConfig, from_dict
from agent.errors import PayloadError
from agent.service import memory_bytes
from agent.vision.frames import (
    DEFAULT_MAX_PIXELS,
    Frame,
    Limits,
    decode_payload,
    image_size,
    max_pixels_for,
)

PROFILES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] /
                                   "firmware-profiles").glob("*.toml"))
SECRET = "SECRET-0f9a-DO-NOT-LOG"


def small_jpeg(width: int = 64, height: int = 48, *params: int) -> bytes:
    return jpeg(np.full((height, width, 3), 90, np.uint8), *params)


# -- sizes from headers ------------------------------------------------------------------------

def test_sizes_come_from_the_png_ihdr_and_the_jpeg_frame_header() -> None:
    assert image_size(bomb_png()) == (30000, 30000)
    assert image_size(huge_sof_jpeg(40000, 30000)) == (40000, 30000)
    assert image_size(small_jpeg(64, 48)) == (64, 48)
    progressive = small_jpeg(80, 20, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    assert image_size(progressive) == (80, 20)  # SOF2
    assert image_size(cv2.imencode(".png", np.zeros((7, 9, 3), np.uint8))[1].tobytes()) == (9, 7)


def test_a_frame_header_hidden_in_an_app_segment_does_not_fool_the_marker_walk() -> None:
    """A naive search for FF C0 finds the small fake inside APP1; libjpeg uses the real one."""
    real = patch_sof(small_jpeg(), 30000, 30000)
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\x00" * 9
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    hidden = real[:2] + app1 + real[2:]
    assert image_size(hidden) == (30000, 30000)
    with pytest.raises(PayloadError, match="above the limit"):
        decode_payload(hidden, 0.0)


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xd8\xff\xda\x00\x02\xff\xd9", "no frame header"),  # a scan before any SOF
    (b"\xff\xd8\xff\xe0\x00\x04ab" + b"junk" + b"\xff\xc0", "garbage between segments"),
    (b"\xff\xd8\xff\xe0\x00\x01", "segment length"),
    (b"\xff\xd8\xff\xe0\x00\x10abc", "truncated JPEG"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10\x03", "DNL"),  # height 0
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dtEXt", "IHDR"),
])
def test_a_header_without_a_usable_size_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        image_size(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\xff\xd8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"]),
       st.binary(max_size=300))
def test_any_bytes_after_a_jpeg_or_png_signature_raise_only_payload_error(
        head: bytes, tail: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decode_payload(head + tail, 0.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.booleans())
def test_the_header_size_is_the_decoded_size(width: int, height: int, progressive: bool) -> None:
    data = small_jpeg(width, height, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive))
    assert image_size(data) == (width, height)
    assert decode_payload(data, 0.0).image.shape[:2] == (height, width)


# -- the pixel limit ---------------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    """109 KB of PNG and 600 B of JPEG that would each decode to 2.7 GB of BGR."""
    for bomb in (bomb_png(), huge_sof_jpeg()):
        with pytest.raises(PayloadError, match=r"30000x30000 \(900.0 Mpx\) is above the limit"):
            decode_payload(bomb, 0.0)


def test_the_pixel_limit_is_exact() -> None:
    data = small_jpeg(64, 48)
    assert decode_payload(data, 0.0, limits=Limits(max_pixels=64 * 48)).width == 64
    with pytest.raises(PayloadError, match="above the limit"):
        decode_payload(data, 0.0, limits=Limits(max_pixels=64 * 48 - 1))


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_takes_its_own_camera_frames_and_refuses_the_bomb(profile: str) -> None:
    """The limit derives from the profile's service.memory_max (a quarter of it, at the
    9 bytes per pixel a progressive JPEG decode peaks at)."""
    cfg = from_dict({"device": {"id": "d", "profile": profile}})
    limit = max_pixels_for(memory_bytes(cfg.service.memory_max))
    assert limit >= 1920 * 1080 >= cfg.camera.frame_width * cfg.camera.frame_height
    assert limit * 9 * 4 <= (memory_bytes(cfg.service.memory_max) or 0)
    assert limit < 30000 * 30000


def test_without_a_memory_budget_the_limit_is_16_megapixels() -> None:
    assert max_pixels_for(None) == DEFAULT_MAX_PIXELS == 16_000_000
    assert max_pixels_for(192 * 2**20) == 5_592_405  # rpi-zero2w
    assert max_pixels_for(768 * 2**20) == 22_369_621  # rpi4


def test_the_decode_step_takes_its_limit_from_the_memory_budget_or_its_own_key(
        tmp_path: Path) -> None:
    ctx = dataclasses.replace(make_ctx(tmp_path), service=ServiceConfig(memory_max="192M"))
    assert decode.build(decode.Params(), ctx).limits.max_pixels == 5_592_405
    assert decode.build(decode.Params(max_pixels=1000), ctx).limits.max_pixels == 1000
    unbounded = dataclasses.replace(ctx, service=ServiceConfig(memory_max="infinity"))
    assert decode.build(decode.Params(), unbounded).limits.max_pixels == 16_000_000


# -- msgpack frames: no pixels, impossible shapes -------------------------------------------

@pytest.mark.parametrize("shape, data, reason", [
    ([0, 0, 3], b"", "no pixels"),
    ([5, 0], b"", "no pixels"),
    ([2**32, 2**32, 1], b"", "above the limit"),  # the product overflows int64 to 0
    ([2**62, 2**62, 3], b"\x00" * 3, "above the limit"),
    ([-1, -1, 3], b"\x00" * 3, "no pixels"),
    ([1, 4000, 1], b"\x00" * 3, "does not fit"),
    ([2, 2, 4], b"\x00" * 16, "channels"),
    ([2.5, 2], b"\x00" * 5, "integers"),
    ([True, True], b"\x00", "integers"),
    ("2x2", b"\x00" * 4, "integers"),
])
def test_a_msgpack_frame_without_pixels_or_with_an_impossible_shape_is_malformed(
        shape: object, data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_payload(msgpack.packb({"shape": shape, "dtype": "uint8", "data": data}), 0.0)


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), "noon", [1], 10**400])
def test_a_frame_timestamp_that_is_not_a_finite_number_is_malformed(
        ts: object, tmp_path: Path) -> None:
    packed = msgpack.packb({"shape": [1, 1, 3], "data": b"\x00" * 3, "ts": ts}) \
        if not isinstance(ts, int) else None
    if packed is not None:
        with pytest.raises(PayloadError, match="ts"):
            decode_payload(packed, 0.0)
    (tmp_path / "a.jpg").write_bytes(small_jpeg())
    ref = json.dumps({"path": "a.jpg", "ts": ts}).encode()
    with pytest.raises(PayloadError, match="ts"):
        decode_payload(ref, 0.0, limits=Limits(path_root=str(tmp_path)))


def test_an_empty_frame_cannot_exist_so_it_never_reaches_motion() -> None:
    with pytest.raises(ValueError, match="at least one pixel"):
        Frame(np.zeros((0, 0, 3), np.uint8), 0.0)
    with pytest.raises(PayloadError, match="no pixels"):
        decode_payload(msgpack_frame([0, 0, 3], b""), 0.0)


# -- file references ---------------------------------------------------------------------------

def test_without_a_path_root_no_reference_opens_anything(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer
    for ref in (b"file:///dev/zero", b"file:///etc/shadow", f"file://{fifo}".encode(),
                json.dumps({"path": "/etc/passwd"}).encode()):
        with pytest.raises(PayloadError, match="path references are off"):
            decode_payload(ref, 0.0)


@pytest.mark.timeout(60)  # the defect was a read that never returns
def test_under_a_path_root_fifos_and_devices_are_refused_without_blocking(
        tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    os.mknod(tmp_path / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's twin
    limits = Limits(path_root=str(tmp_path))
    for name in ("pipe", "zero", "."):
        with pytest.raises(PayloadError, match="not a regular file"):
            decode_payload(f"file://{tmp_path / name}".encode(), 0.0, limits=limits)
    with pytest.raises(PayloadError, match="not a regular file"):
        decode_payload(b"file:///dev/zero", 0.0, limits=Limits(path_root="/dev"))
    (tmp_path / "elsewhere").symlink_to("/dev/zero")
    with pytest.raises(PayloadError, match="outside"):
        decode_payload(f"file://{tmp_path / 'elsewhere'}".encode(), 0.0, limits=limits)


def test_a_reference_resolving_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "frames"
    root.mkdir()
    sibling = tmp_path / "frames-private"  # shares the root's name as a prefix
    sibling.mkdir()
    (sibling / "a.jpg").write_bytes(small_jpeg())
    (tmp_path / "b.jpg").write_bytes(small_jpeg())
    (root / "link.jpg").symlink_to(tmp_path / "b.jpg")
    (root / "dir").symlink_to(sibling)
    limits = Limits(path_root=str(root))
    for path in (sibling / "a.jpg", root / "link.jpg", root / "dir" / "a.jpg",
                 f"{root}/../b.jpg", "../b.jpg", "/etc/passwd"):
        with pytest.raises(PayloadError, match="outside"):
            decode_payload(json.dumps({"path": str(path)}).encode(), 0.0, limits=limits)
    (root / "real.jpg").write_bytes(small_jpeg())
    (root / "inside.jpg").symlink_to(root / "real.jpg")  # a link within the root is fine
    assert decode_payload(f"file://{root / 'inside.jpg'}".encode(), 0.0, limits=limits).width == 64


def test_a_file_above_max_file_bytes_is_refused_and_at_most_one_byte_more_is_read(
        tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(small_jpeg() + b"\x00" * 1000)
    with pytest.raises(PayloadError, match="above max_file_bytes 500"):
        decode_payload(f"file://{tmp_path / 'big.jpg'}".encode(), 0.0,
                       limits=Limits(path_root=str(tmp_path), max_file_bytes=500))
    # /proc files say they are empty: only the capped read notices how long they are.
    with pytest.raises(PayloadError, match="grew above max_file_bytes 64"):
        decode_payload(b"file:///proc/self/maps", 0.0,
                       limits=Limits(path_root="/proc", max_file_bytes=64))


def test_file_contents_never_appear_in_a_refusal(tmp_path: Path) -> None:
    """It used to say `not a JPEG or PNG image (starts b'root:*:1')` for /etc/shadow."""
    contents = [SECRET.encode() * 4, b"\xff\xd8" + SECRET.encode() * 4,
                b"\x89PNG\r\n\x1a\n" + SECRET.encode() * 4,
                b"\xff\xd8\xff\xe0\x00\x04ab" + SECRET.encode() + b"\xff\xd9"]
    limits = Limits(path_root=str(tmp_path))
    for i, body in enumerate(contents):
        (tmp_path / f"{i}.jpg").write_bytes(body)
        with pytest.raises(PayloadError) as err:
            decode_payload(f"file://{tmp_path}/{i}.jpg".encode(), 0.0, limits=limits)
        assert "SECRET" not in str(err.value) and "0f9a" not in str(err.value)


def test_references_must_be_paths_on_this_host(tmp_path: Path) -> None:
    limits = Limits(path_root=str(tmp_path))
    for ref, reason in ((b"file://nas/frames/a.jpg", "another host"),
                        (b"file:///" + b"a" * 5000, "at most 4096"),
                        (json.dumps({"path": "a\x00b"}).encode(), "not a path"),
                        (json.dumps({"path": ""}).encode(), "not a path")):
        with pytest.raises(PayloadError, match=reason):
            decode_payload(ref, 0.0, limits=limits)


def test_a_relative_path_root_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="absolute"):
        decode.Params(path_root="frames")
