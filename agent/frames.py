"""Frames: one camera image in a pipeline, and reading them from payloads.

`Frame.image` is always a contiguous `uint8` array `(H, W, 3)` in **BGR**
order, OpenCV's native layout: decoding and the motion gate need no
conversion, and a model that wants RGB converts its own small input once.

Payloads `decode_payload` understands:
  - JPEG or PNG bytes;
  - a msgpack map `{ts, shape, dtype, data}` (raw pixels, `format` "bgr" | "rgb" | "gray");
  - a frame reference: `file:///path`, or JSON `{"path": "...", "ts": ...}`
    (read from local disk; `root` restricts which directory may be read).
Anything corrupt, truncated or unknown raises `PayloadError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import cv2
import msgpack
import numpy as np

from agent.errors import PayloadError

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True, slots=True)
class Frame:
    """A BGR uint8 image, when it was taken, and where it came from."""

    image: np.ndarray
    ts: float
    source: str = ""

    def __post_init__(self) -> None:
        img = self.image
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"a Frame holds uint8 (H, W, 3) BGR, got {img.dtype} {img.shape}")

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def decode_image(data: bytes) -> np.ndarray:
    """JPEG or PNG bytes to BGR uint8; PayloadError when corrupt or truncated."""
    if data.startswith(JPEG_SOI):
        # libjpeg fills a truncated JPEG with grey and only warns: check the end marker.
        if not data.rstrip(b"\x00").endswith(JPEG_EOI):
            raise PayloadError(f"truncated JPEG ({len(data)} bytes, no end-of-image marker)")
    elif data.startswith(PNG_MAGIC):
        if b"IEND" not in data[-16:]:
            raise PayloadError(f"truncated PNG ({len(data)} bytes, no IEND chunk)")
    else:
        raise PayloadError(f"not a JPEG or PNG image (starts {data[:8]!r})")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise PayloadError(f"corrupt image ({len(data)} bytes)")
    return np.ascontiguousarray(img)


def _from_msgpack(data: bytes, ts: float, source: str) -> Frame:
    try:
        doc = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise PayloadError(f"bad msgpack frame: {exc}") from exc
    if not isinstance(doc, dict):
        raise PayloadError("a msgpack frame must be a map {ts, shape, dtype, data}")
    try:
        shape = tuple(int(x) for x in doc["shape"])
        dtype = np.dtype(doc.get("dtype", "uint8"))
        raw = doc["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"bad msgpack frame: {exc!r}") from exc
    if not isinstance(raw, bytes) or dtype != np.uint8:
        raise PayloadError("a msgpack frame needs uint8 bytes in 'data'")
    size = int(np.prod(shape))
    if len(shape) not in (2, 3) or size != len(raw) or size > MAX_PIXELS * 3:
        raise PayloadError(f"msgpack frame: shape {shape} does not fit {len(raw)} bytes")
    img: np.ndarray = np.frombuffer(raw, np.uint8).reshape(shape)
    fmt = doc.get("format", "bgr" if img.ndim == 3 else "gray")
    if img.ndim == 2 or img.shape[2] == 1:
        img = cv2.cvtColor(img.reshape(shape[:2]), cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 3 and fmt == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.shape[2] != 3:
        raise PayloadError(f"msgpack frame: {img.shape[2]} channels (want 1 or 3)")
    frame_ts = doc.get("ts", ts)
    return Frame(np.ascontiguousarray(img), float(frame_ts) if frame_ts is not None else ts,
                 source)


def _read_ref(path: str, root: str | None) -> bytes:
    p = Path(path)
    if root is not None:
        real, base = os.path.realpath(p), os.path.realpath(root)
        if os.path.commonpath([real, base]) != base:
            raise PayloadError(f"frame reference {path!r} is outside {root}")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise PayloadError(f"frame reference {path!r}: {exc.strerror}") from exc


def decode_payload(payload: bytes, ts: float, source: str = "",
                   root: str | None = None) -> Frame:
    """Whatever a camera published, as a Frame; PayloadError otherwise."""
    if payload.startswith((JPEG_SOI, PNG_MAGIC)):
        return Frame(decode_image(payload), ts, source)
    if payload.startswith(b"file://"):
        path = unquote(urlsplit(payload.decode("utf-8", "replace").strip()).path)
        return Frame(decode_image(_read_ref(path, root)), ts, source)
    if payload[:1] == b"{":
        try:
            doc: Any = json.loads(payload)
        except ValueError as exc:
            raise PayloadError(f"bad JSON frame reference: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
            raise PayloadError('a JSON frame reference needs {"path": "..."}')
        ref_ts = doc.get("ts", ts)
        image = decode_image(_read_ref(doc["path"], root))
        return Frame(image, float(ref_ts) if isinstance(ref_ts, int | float) else ts, source)
    if payload[:1] and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        return _from_msgpack(payload, ts, source)
    raise PayloadError(f"unknown frame payload (starts {payload[:8]!r})")


def encode_msgpack(image: np.ndarray, ts: float) -> bytes:
    """A BGR image as a msgpack frame (for replay tools and tests)."""
    packed: bytes = msgpack.packb({"ts": ts, "shape": list(image.shape), "dtype": "uint8",
                                   "format": "bgr", "data": np.ascontiguousarray(image).tobytes()})
    return packed
