"""Frames: one camera image in a pipeline, and reading them from payloads.

`Frame.image` is always a contiguous `uint8` array `(H, W, 3)` in **BGR**
order, OpenCV's native layout: decoding and the motion gate need no
conversion, and a model that wants RGB converts its own small input once.

Payloads `decode_payload` understands:
  - JPEG or PNG bytes;
  - a msgpack map `{ts, shape, dtype, data}` (raw pixels, `format` "bgr" | "rgb" | "gray");
  - a frame reference: `file:///path`, or JSON `{"path": "...", "ts": ...}`, read from
    local disk only when `Limits.path_root` is set, and then only a regular file below it.
Anything corrupt, truncated, unknown or too large raises `PayloadError`. A payload
never makes the agent allocate more than `Limits.max_pixels` allow: image sizes are
read from the JPEG or PNG header before anything is decoded.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import cv2
import msgpack
import numpy as np

from agent.errors import PayloadError

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 16_000_000  # no memory budget known
DEFAULT_MAX_FILE_BYTES = 32 * 10**6
DECODE_BYTES_PER_PIXEL = 9  # measured peak of cv2.imdecode, progressive JPEG (PNG: 6)
DECODE_SHARE = 4  # one decode may take a quarter of the memory budget
UINT8_NAMES = ("uint8", "u1", "|u1", "B")  # how numpy writers name the one dtype we take
MAX_REF_CHARS = 4096  # PATH_MAX: a longer frame reference is not a path
# JPEG frame headers (SOFn) hold the size; C4 (DHT), C8 (JPG) and CC (DAC) are not SOFs.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def max_pixels_for(memory_bytes: int | None) -> int:
    """The largest frame (in pixels) one decode may make within a memory budget.

    Decoding peaks at up to 9 bytes per pixel: a progressive JPEG holds 16-bit
    coefficients of three components (6 B) besides the 3-byte BGR output
    (measured; baseline JPEG and PNG peak at 6 B). One decode may take a quarter
    of the budget, the rest is the interpreter, models, the outbox and the frames
    in flight between steps. With the profiles' `service.memory_max`: rpi-zero2w
    (192M) 5.6 Mpx, rpi4 (768M) 22.4 Mpx, x86 (2G) 59.7 Mpx. Without a budget
    (None: `infinity` or a percentage) the limit is 16 Mpx.
    """
    if memory_bytes is None:
        return DEFAULT_MAX_PIXELS
    return max(1, memory_bytes // (DECODE_SHARE * DECODE_BYTES_PER_PIXEL))


@dataclass(frozen=True, slots=True)
class Limits:
    """What one payload may make the agent read and allocate."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    path_root: str | None = None  # None: frame references are refused
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ValueError("max_pixels and max_file_bytes must be positive")
        if self.path_root is not None and not os.path.isabs(self.path_root):
            raise ValueError(f"path_root {self.path_root!r} must be an absolute path")


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
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"a Frame needs at least one pixel, got {img.shape}")

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Patch:
    """The part of a frame around one box, copied out of it: what a snapshot of that box
    needs, without holding on to the whole frame (a tracker keeps one per object)."""

    image: np.ndarray  # BGR uint8, a copy
    origin: tuple[int, int]  # its top-left pixel in the frame
    size: tuple[int, int]  # the frame's (width, height)
    ts: float
    source: str = ""

    @classmethod
    def around(cls, frame: Frame, box: tuple[float, float, float, float],
               margin: float) -> Patch:
        """The pixels of `box` (normalised to the frame) and `margin` x its size on each side."""
        w, h = frame.width, frame.height
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * margin, (y1 - y0) * margin
        left = min(w - 1, max(0, math.floor((x0 - mx) * w)))
        top = min(h - 1, max(0, math.floor((y0 - my) * h)))
        right = max(left + 1, min(w, math.ceil((x1 + mx) * w)))
        bottom = max(top + 1, min(h, math.ceil((y1 + my) * h)))
        image = np.array(frame.image[top:bottom, left:right], copy=True)
        return cls(image, (left, top), (w, h), frame.ts, frame.source)

    def frame(self) -> Frame:
        """A frame of the original size, black outside the patch. Its pages outside the
        patch's rows are never written: a fresh mapping reads as zeros and costs nothing."""
        w, h = self.size
        image = np.zeros((h, w, 3), np.uint8)
        x, y = self.origin
        ph, pw = self.image.shape[:2]
        image[y:y + ph, x:x + pw] = self.image
        return Frame(image, self.ts, self.source)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, decoding nothing; PayloadError otherwise."""
    if data.startswith(PNG_MAGIC):
        # IHDR must come first: length 13, type, width, height (PNG spec 11.2.2).
        if len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
            raise PayloadError("PNG without an IHDR chunk first")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(JPEG_SOI):
        return _jpeg_size(data)
    raise PayloadError("not a JPEG or PNG image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments from SOI to the first frame header (SOFn).

    Segment by segment, as libjpeg reads them, so bytes that look like a SOF inside an
    APPn (EXIF, a thumbnail) are skipped. Anything between segments is refused rather
    than skipped over: libjpeg would resync there, and the size must be the one it uses.
    """
    n = len(data)
    i = 2
    while i < n:
        if data[i] != 0xFF:
            raise PayloadError(f"JPEG: no marker at byte {i} (garbage between segments)")
        while i < n and data[i] == 0xFF:  # fill bytes may pad a marker
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _STANDALONE or marker == 0xD8:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan, and no frame header yet
            raise PayloadError("JPEG: no frame header (SOF) before the image data")
        if i + 2 > n:
            break
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2:
            raise PayloadError(f"JPEG: segment length {length} at byte {i}")
        if marker in _SOF:
            if i + 7 > n:
                break
            height = int.from_bytes(data[i + 3:i + 5], "big")
            width = int.from_bytes(data[i + 5:i + 7], "big")
            if height == 0:  # the height would come later, in a DNL segment
                raise PayloadError("JPEG: frame header without a height (DNL is not supported)")
            return width, height
        i += length
    raise PayloadError(f"truncated JPEG ({n} bytes, no frame header)")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """PayloadError for a frame without pixels or with more than `max_pixels`."""
    if width < 1 or height < 1:
        raise PayloadError(f"frame {width}x{height} has no pixels")
    if width * height > max_pixels:
        raise PayloadError(
            f"frame {width}x{height} ({width * height / 1e6:.1f} Mpx) is above the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (decode.max_pixels)")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """JPEG or PNG bytes to BGR uint8; PayloadError when corrupt, truncated or too large.

    The size is checked from the header before decoding: a 109 KB PNG can claim
    30000 x 30000 pixels, 2.7 GB of BGR. Messages never quote the bytes (they may
    be a file's).
    """
    width, height = image_size(data)
    check_pixels(width, height, max_pixels)
    if data.startswith(JPEG_SOI):
        # libjpeg fills a truncated JPEG with grey and only warns: check the end marker.
        if not data.rstrip(b"\x00").endswith(JPEG_EOI):
            raise PayloadError(f"truncated JPEG ({len(data)} bytes, no end-of-image marker)")
    elif b"IEND" not in data[-16:]:
        raise PayloadError(f"truncated PNG ({len(data)} bytes, no IEND chunk)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise PayloadError(f"corrupt image ({len(data)} bytes)")
    return np.ascontiguousarray(img)


def _timestamp(value: Any, default: float) -> float:
    """A frame's own `ts`: a finite number, or the message's time when absent."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"frame ts is {type(value).__name__}, not a number")
    try:
        ts = float(value)
    except OverflowError:
        raise PayloadError("frame ts is beyond the range of a double") from None
    if not math.isfinite(ts):
        raise PayloadError(f"frame ts is {ts!r}, not a finite number")
    return ts


def _from_msgpack(data: bytes, ts: float, source: str, max_pixels: int) -> Frame:
    try:
        doc = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise PayloadError(f"bad msgpack frame: {exc}") from exc
    if not isinstance(doc, dict):
        raise PayloadError("a msgpack frame must be a map {ts, shape, dtype, data}")
    shape = doc.get("shape")
    raw = doc.get("data")
    if not isinstance(shape, list | tuple) or len(shape) not in (2, 3) or any(
            isinstance(x, bool) or not isinstance(x, int) for x in shape):
        raise PayloadError("a msgpack frame needs 'shape': [height, width] or "
                           "[height, width, channels] of integers")
    if doc.get("dtype", "uint8") not in UINT8_NAMES or not isinstance(raw, bytes):
        raise PayloadError("a msgpack frame needs uint8 bytes in 'data'")
    height, width = shape[0], shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    check_pixels(width, height, max_pixels)
    if channels not in (1, 3):
        raise PayloadError(f"msgpack frame: {channels} channels (want 1 or 3)")
    if height * width * channels != len(raw):  # Python ints: no overflow
        raise PayloadError(f"msgpack frame: shape {list(shape)} does not fit {len(raw)} bytes")
    img: np.ndarray = np.frombuffer(raw, np.uint8).reshape(height, width, channels)
    if channels == 1:
        img = cv2.cvtColor(img.reshape(height, width), cv2.COLOR_GRAY2BGR)
    elif doc.get("format") == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    return Frame(np.ascontiguousarray(img), _timestamp(doc.get("ts"), ts), source)


def _shown(path: str) -> str:
    """A path for a message: quoted, and cut if someone sent a novel."""
    return repr(path if len(path) <= 120 else path[:117] + "...")


def _read_ref(path: str, limits: Limits) -> bytes:
    """The bytes of a referenced file: a regular file below `path_root`, at most
    `max_file_bytes`. Never blocks (FIFOs, devices are refused before reading)."""
    if limits.path_root is None:
        raise PayloadError(f"frame reference {_shown(path)}: path references are off "
                           "(set path_root on the decode step)")
    if not path or "\x00" in path:
        raise PayloadError(f"frame reference {_shown(path)} is not a path")
    base = os.path.realpath(limits.path_root)
    real = os.path.realpath(os.path.join(base, path))  # relative: below the root
    if os.path.commonpath([real, base]) != base:
        raise PayloadError(f"frame reference {_shown(path)} is outside {limits.path_root}")
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):  # no open(): a device may act on it
            raise PayloadError(f"frame reference {_shown(path)} is not a regular file")
        # O_NONBLOCK: should a FIFO replace the file meanwhile, open() does not wait for a
        # writer; O_NOFOLLOW: nor may a symlink; fstat below sees what was really opened.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as exc:
        raise PayloadError(f"frame reference {_shown(path)}: {exc.strerror}") from None
    try:
        return _read_capped(fd, path, limits)
    finally:
        os.close(fd)


def _read_capped(fd: int, path: str, limits: Limits) -> bytes:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PayloadError(f"frame reference {_shown(path)} is not a regular file")
        proc_fd = f"/proc/self/fd/{fd}"
        if limits.path_root is not None and os.path.exists(proc_fd):
            # Where the file really is: a directory may have become a symlink since realpath().
            base = os.path.realpath(limits.path_root)
            if os.path.commonpath([os.readlink(proc_fd), base]) != base:
                raise PayloadError(
                    f"frame reference {_shown(path)} is outside {limits.path_root}")
        cap = limits.max_file_bytes
        if st.st_size > cap:
            raise PayloadError(f"frame reference {_shown(path)} is {st.st_size} bytes, above "
                               f"max_file_bytes {cap}")
        chunks: list[bytes] = []
        got = 0
        while got <= cap:  # read at most cap + 1 bytes: the file may grow meanwhile
            chunk = os.read(fd, min(cap + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise PayloadError(f"frame reference {_shown(path)}: {exc.strerror}") from None
    if got > cap:
        raise PayloadError(f"frame reference {_shown(path)} grew above max_file_bytes {cap}")
    return b"".join(chunks)


def _reference(payload: bytes) -> tuple[str, Any]:
    """The path and optional `ts` of a `file://` or JSON frame reference."""
    if len(payload) > MAX_REF_CHARS:
        raise PayloadError(f"frame reference of {len(payload)} bytes (at most {MAX_REF_CHARS})")
    if payload.startswith(b"file://"):
        url = urlsplit(payload.decode("utf-8", "replace").strip())
        if url.netloc not in ("", "localhost"):
            raise PayloadError(f"frame reference on another host {url.netloc!r}")
        return unquote(url.path), None
    try:
        doc: Any = json.loads(payload)
    except ValueError as exc:
        raise PayloadError(f"bad JSON frame reference: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
        raise PayloadError('a JSON frame reference needs {"path": "..."}')
    return doc["path"], doc.get("ts")


def decode_payload(payload: bytes, ts: float, source: str = "",
                   limits: Limits = Limits()) -> Frame:
    """Whatever a camera published, as a Frame; PayloadError otherwise."""
    if payload.startswith((JPEG_SOI, PNG_MAGIC)):
        return Frame(decode_image(payload, limits.max_pixels), ts, source)
    if payload.startswith(b"file://") or payload[:1] == b"{":
        path, ref_ts = _reference(payload)
        frame_ts = _timestamp(ref_ts, ts)
        return Frame(decode_image(_read_ref(path, limits), limits.max_pixels), frame_ts, source)
    if payload[:1] and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        return _from_msgpack(payload, ts, source, limits.max_pixels)
    raise PayloadError(f"unknown frame payload (starts {payload[:8]!r})")


def encode_msgpack(image: np.ndarray, ts: float) -> bytes:
    """A BGR image as a msgpack frame (for replay tools and tests)."""
    packed: bytes = msgpack.packb({"ts": ts, "shape": list(image.shape), "dtype": "uint8",
                                   "format": "bgr", "data": np.ascontiguousarray(image).tobytes()})
    return packed
