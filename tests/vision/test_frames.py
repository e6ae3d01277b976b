"""Frames in: JPEG, PNG, msgpack and file references decode; anything broken is a PayloadError."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vision_util import sample_image  # type: ignore[import-not-found]

from agent.errors import PayloadError
from agent.vision.frames import Frame, Limits, decode_payload, encode_msgpack


def jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_jpeg_and_png_decode_to_bgr_frames() -> None:
    img = sample_image("astronaut.png")
    for payload in (jpeg(img), cv2.imencode(".png", img)[1].tobytes()):
        frame = decode_payload(payload, 1.0, "cam")
        assert isinstance(frame, Frame)
        assert frame.image.shape == img.shape
        assert np.abs(frame.image.astype(int) - img).mean() < 4  # BGR kept, JPEG loss only


def test_truncated_jpeg_is_a_payload_error() -> None:
    data = jpeg(sample_image("astronaut.png"))
    with pytest.raises(PayloadError, match="truncated"):
        decode_payload(data[: len(data) // 2], 0.0)


def test_truncated_png_is_a_payload_error() -> None:
    data = cv2.imencode(".png", sample_image("coffee.png"))[1].tobytes()
    with pytest.raises(PayloadError):
        decode_payload(data[:-30], 0.0)


def test_corrupt_jpeg_body_is_a_payload_error() -> None:
    data = b"\xff\xd8" + b"\x00" * 500 + b"\xff\xd9"
    with pytest.raises(PayloadError):
        decode_payload(data, 0.0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_payload_error(data: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decode_payload(data, 0.0)


def test_msgpack_frame_round_trips() -> None:
    img = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frame = decode_payload(encode_msgpack(img, 12.5), 0.0)
    assert frame.ts == 12.5
    assert np.array_equal(frame.image, img)


def test_msgpack_frame_with_wrong_shape_is_a_payload_error() -> None:
    import msgpack
    bad = msgpack.packb({"ts": 1.0, "shape": [10, 10, 3], "dtype": "uint8", "data": b"\x00" * 7})
    with pytest.raises(PayloadError):
        decode_payload(bad, 0.0)


def test_file_references_read_local_images_below_the_path_root(tmp_path: Path) -> None:
    path = tmp_path / "f.jpg"
    path.write_bytes(jpeg(sample_image("coffee.png")))
    limits = Limits(path_root=str(tmp_path))
    assert decode_payload(f"file://{path}".encode(), 0.0, limits=limits).width == 600
    ref = json.dumps({"path": str(path), "ts": 5.0}).encode()
    assert decode_payload(ref, 0.0, limits=limits).ts == 5.0
    assert decode_payload(b'{"path": "f.jpg"}', 0.0, limits=limits).width == 600  # relative
    with pytest.raises(PayloadError, match="outside"):
        decode_payload(ref, 0.0, limits=Limits(path_root=str(tmp_path / "elsewhere")))
    with pytest.raises(PayloadError, match="path references are off"):
        decode_payload(ref, 0.0)
    with pytest.raises(PayloadError):
        decode_payload(json.dumps({"path": str(tmp_path / "missing.jpg")}).encode(), 0.0,
                       limits=limits)
