"""No message can stop the agent: hostile frames, file references and numbers are
counted as malformed while the agent keeps running, small and stoppable.

End to end through real Mosquitto brokers and the real agent process. The
builders of hostile images at the top are shared with
tests/vision/test_frame_hardening.py (the unit tests of the same defences).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from agent_proc import (
    DEVICE,
    RELAY,
    AgentProcess,
    pipeline_events,
    prime,
    telemetry_when,
    write_config,
)
from brokers import Broker
from helpers import Collector, publish_many

from agent.actions import filter as filter_action
from agent.actions import publish, window
from agent.actions.payload import fields, number
from agent.config import CameraConfig, RuntimeConfig
from agent.errors import PayloadError
from agent.messages import Message, Outgoing
from agent.pipeline import ActionContext
from agent.telemetry import Telemetry
from agent.vision.frames import Frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RSS_BOUND_KIB = 300 * 1024  # the agent's peak RSS with every hostile frame behind it


# -- hostile payloads ---------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG of zeros: about 109 KB that decode to width*height*3 bytes of BGR."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit per pixel, grey
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # the filter byte, then the packed row
    body = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    return (PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))


def jpeg(image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, list(params))
    assert ok
    return bytes(buf.tobytes())


def patch_sof(data: bytes, width: int, height: int) -> bytes:
    """`data` with the dimensions in its frame header (SOF0 or SOF2) replaced."""
    out = bytearray(data)
    i = 2
    while out[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(out[i + 2:i + 4], "big")
    out[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def huge_sof_jpeg(width: int = 30000, height: int = 30000) -> bytes:
    """A 16 x 16 JPEG whose frame header claims `width` x `height` (libjpeg greys the rest)."""
    return patch_sof(jpeg(np.zeros((16, 16, 3), np.uint8)), width, height)


def moving_square(n: int, width: int = 320, height: int = 240) -> list[bytes]:
    """`n` JPEG frames: a grey background and a white 40 px square moving 30 px per frame."""
    frames = []
    for k in range(n):
        img = np.full((height, width, 3), 60, np.uint8)
        x = 20 + 30 * k
        img[100:140, x:x + 40] = 255
        frames.append(jpeg(img))
    return frames


def msgpack_frame(shape: list[int], data: bytes) -> bytes:
    return bytes(msgpack.packb({"ts": 1.0, "shape": shape, "dtype": "uint8", "data": data}))


# -- the agent under test ---------------------------------------------------------------------

def pipelines(root: Path) -> str:
    return RELAY + f"""
[[pipeline]]
name = "refs"
trigger = "refs/+"
steps = [{{ action = "decode" }}, {{ action = "publish" }}]

[[pipeline]]
name = "rooted"
trigger = "rooted/+"
steps = [{{ action = "decode", path_root = "{root}", max_file_bytes = "1MB" }},
         {{ action = "publish" }}]

[[pipeline]]
name = "frames"
trigger = "cams/+/frame"
steps = [{{ action = "decode" }}, {{ action = "motion" }}, {{ action = "publish" }}]

[[pipeline]]
name = "power"
trigger = "meters/+/power"
steps = [{{ action = "window", size = 3, fields = ["w"], agg = ["mean", "min", "max", "sum"] }},
         {{ action = "publish" }}]

[[pipeline]]
name = "packed"
trigger = "rooms/+/temp"
steps = [{{ action = "filter", field = "t", op = ">", value = 25 }},
         {{ action = "publish", format = "msgpack" }}]
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    frames = tmp_path / "frames"
    frames.mkdir()
    return frames


@pytest.fixture
def running(tmp_path: Path, root: Path, local_broker: Broker,
            uplink_broker: Broker) -> Iterator[tuple[AgentProcess, Collector]]:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, pipelines(root))
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            yield agent, cloud
        finally:
            try:
                rc = agent.stop(timeout=30)
            except Exception:
                agent.kill()
                raise AssertionError(f"SIGTERM did not stop the agent:\n{agent.log()}") from None
        assert rc == 0, agent.log()


def counters(cloud: Collector, agent: AgentProcess, pipeline: str, counter: str,
             value: int, timeout: float = 20) -> dict[str, Any]:
    """`pipeline`'s counters in the first telemetry where `counter` reached `value`."""
    doc = telemetry_when(cloud, agent, pipeline, counter, value, timeout)
    return dict(doc["pipelines"][pipeline])


def events(cloud: Collector, pipeline: str, n: int, decode: Any = json.loads,
           timeout: float = 20) -> list[Any]:
    return pipeline_events(cloud, pipeline, n, decode, timeout)


def peak_rss_kib(agent: AgentProcess) -> int:
    for line in Path(f"/proc/{agent.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def strict_json(data: bytes) -> Any:
    """json.loads that refuses NaN and Infinity, as every non-Python parser does."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"event carries {name}: {data!r}")
    return json.loads(data, parse_constant=refuse)


def context() -> ActionContext:
    seq = itertools.count(1)
    return ActionContext(device="d1", prefix="fog", pipeline="p", step=0, data_dir=Path("."),
                         runtime=RuntimeConfig(), camera=CameraConfig(), boot_id="b",
                         telemetry=Telemetry(), next_seq=lambda: next(seq))


def reading(payload: bytes | dict[str, Any], topic: str = "meters/m1") -> Message:
    if isinstance(payload, dict):
        return Message(topic=topic, payload=b"", ts=100.0, data=payload)
    return Message(topic=topic, payload=payload, ts=100.0)


# -- 8: non-finite numbers, unit level ---------------------------------------------------------

NON_FINITE = [b'{"w": NaN}', b'{"w": Infinity}', b'{"w": -Infinity}', b'{"w": 1e400}',
              b'{"w": 1' + b"0" * 400 + b"}", msgpack.packb({"w": math.nan}),
              msgpack.packb({"w": math.inf})]


@pytest.mark.parametrize("payload", NON_FINITE)
def test_a_field_that_is_not_a_finite_double_is_malformed(payload: bytes) -> None:
    with pytest.raises(PayloadError, match="'w'"):
        number(fields(reading(payload)), "w")


def test_a_window_folds_in_no_nan_and_no_sum_beyond_a_double() -> None:
    win = window.build(window.Params(fields=("w",), agg=("mean", "min", "max", "sum"), size=3),
                       context())
    for payload in (b'{"w": 1e308}', b'{"w": NaN}', b'{"w": 1e308}', b'{"w": -1e308}',
                    b'{"w": Infinity}'):
        try:
            out = win.process(reading(payload))
        except PayloadError:
            continue
        assert not out
    (event,) = win.process(reading(b'{"w": 5}'))
    assert event.data["w"] == {"mean": 5 / 3, "min": -1e308, "max": 1e308, "sum": 5.0}
    assert all(math.isfinite(v) for v in event.data["w"].values())


def test_a_filter_refuses_nan_instead_of_failing_every_comparison_silently() -> None:
    gate = filter_action.build(filter_action.Params(field="t", op="!=", value=3), context())
    with pytest.raises(PayloadError, match="not a finite number"):
        gate.process(reading(b'{"t": NaN}'))
    assert gate.process(reading(b'{"t": 4}'))


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("data", [{"t": math.nan}, {"a": {"b": [1.0, -math.inf]}},
                                  {"x": np.float32("nan")}, {"x": np.array([1.0, np.inf])}])
def test_an_event_never_carries_nan_or_infinity(fmt: str, data: dict[str, Any]) -> None:
    pub = publish.build(publish.Params(format=fmt), context())  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="not a finite number"):
        pub.process(reading(data))


def test_an_integer_beyond_64_bits_is_malformed_in_a_msgpack_event() -> None:
    pub = publish.build(publish.Params(format="msgpack"), context())
    with pytest.raises(PayloadError, match="64 bits"):
        pub.process(reading({"n": 10**30}))


# -- 18: frames reaching publish, unit level ---------------------------------------------------

def test_a_frame_reaching_publish_becomes_a_motion_event_without_pixels() -> None:
    frame = Frame(np.zeros((240, 320, 3), np.uint8), 5.0, "cams/a")
    msg = Message(topic="cams/a", payload=b"\xff\xd8 not json", ts=100.0, data=frame,
                  meta={"motion": [[0.1, 0.2, 0.3, 0.4]]}, latency_ms={"motion": 0.2})
    (out,) = publish.build(publish.Params(), context()).process(msg)
    assert isinstance(out, Outgoing)
    event = strict_json(out.payload)
    assert (event["type"], event["width"], event["height"]) == ("motion", 320, 240)
    assert event["motion"] == [[0.1, 0.2, 0.3, 0.4]] and event["topic"] == "cams/a"
    assert len(out.payload) < 400
    (plain,) = publish.build(publish.Params(), context()).process(msg.evolve(meta={}))
    assert strict_json(plain.payload)["type"] == "frame"


def test_window_and_filter_say_a_frame_is_not_a_reading() -> None:
    frame = Frame(np.zeros((2, 2, 3), np.uint8), 5.0)
    msg = Message(topic="cams/a", payload=b"\xff\xd8", ts=1.0, data=frame)
    win = window.build(window.Params(fields=("w",), size=1), context())
    with pytest.raises(PayloadError, match="a frame is not a reading"):
        win.process(msg)


# -- 5: frame references ------------------------------------------------------------------------

def test_without_a_path_root_frame_references_are_malformed_and_nothing_is_read(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    """`file:///dev/zero` used to grow the agent by gigabytes; `/etc/shadow` reached the log.
    Without `path_root` a reference is refused before any file is opened."""
    agent, cloud = running
    bad = [b"file:///dev/zero", json.dumps({"path": "/etc/shadow"}).encode(),
           b"file:///etc/passwd", b"file://localhost/dev/urandom"]
    publish_many(local_broker.url, "refs/cam", bad)
    publish_many(local_broker.url, "refs/cam", [moving_square(1)[0]])
    (event,) = events(cloud, "refs", 1)
    assert (event["type"], event["width"], event["height"]) == ("frame", 320, 240)
    seen = counters(cloud, agent, "refs", "malformed", len(bad))
    assert seen["malformed"] == len(bad) and seen.get("errors", 0) == 0
    log = agent.log()
    assert "path references are off" in log
    for path in ("/etc/passwd", "/etc/shadow"):  # neither was read into the log
        first_line = Path(path).read_text().splitlines()[0]
        assert first_line[:12] not in log
    assert peak_rss_kib(agent) < RSS_BOUND_KIB
    assert agent.running


def test_under_a_path_root_only_small_regular_files_below_it_are_read_and_never_logged(
    running: tuple[AgentProcess, Collector], local_broker: Broker, root: Path, tmp_path: Path
) -> None:
    """A FIFO (used to block decode forever), /dev/zero behind a symlink, a symlink out of
    the root, `..`, an oversized file and a text file are each one malformed message; the
    contents of none of them reach the log, and the agent still stops on SIGTERM."""
    agent, cloud = running
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-OUTSIDE-THE-ROOT\n")
    os.mkfifo(root / "pipe")
    (root / "zero").symlink_to("/dev/zero")
    (root / "escape").symlink_to(secret)
    (root / "big.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 2_000_000 + b"\xff\xd9")
    (root / "notes.jpg").write_text("PRIVATE-NOTE-INSIDE-THE-ROOT\n" * 10)
    good = root / "good.jpg"
    good.write_bytes(moving_square(1)[0])
    bad = [f"file://{root / 'pipe'}", f"file://{root / 'zero'}", f"file://{root / 'escape'}",
           json.dumps({"path": f"{root}/../secret.txt"}), f"file://{root / 'big.jpg'}",
           f"file://{root / 'notes.jpg'}", f"file://{root}", "file:///etc/passwd"]
    publish_many(local_broker.url, "rooted/cam", [b.encode() for b in bad])
    publish_many(local_broker.url, "rooted/cam",
                 [f"file://{good}".encode(), json.dumps({"path": str(good), "ts": 7.5}).encode()])
    got = events(cloud, "rooted", 2)
    assert [(e["type"], e["width"]) for e in got] == [("frame", 320)] * 2
    seen = counters(cloud, agent, "rooted", "malformed", len(bad))
    assert seen["malformed"] == len(bad) and seen.get("errors", 0) == 0
    log = agent.log()
    assert "SECRET" not in log and "PRIVATE" not in log
    assert "not a regular file" in log  # the burst's first; the reasons: test_frame_hardening
    assert peak_rss_kib(agent) < RSS_BOUND_KIB


# -- 6: decompression bombs and bad shapes ---------------------------------------------------

def test_decompression_bombs_and_impossible_shapes_are_malformed_and_rss_stays_low(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    """A 109 KB PNG and a 600-byte JPEG that each claim 30000 x 30000 pixels (5.2 GB
    decoded) are refused from their headers; so are a 0 x 0 frame (it used to reach
    `motion`) and shapes whose product overflows (used to be errors with tracebacks)."""
    agent, cloud = running
    bad = [bomb_png(), huge_sof_jpeg(), msgpack_frame([0, 0, 3], b""),
           msgpack_frame([2**32, 2**32, 1], b""), msgpack_frame([-1, -1, 3], b"\x00" * 3)]
    publish_many(local_broker.url, "cams/door/frame", bad)
    publish_many(local_broker.url, "cams/door/frame", moving_square(3))
    got = events(cloud, "frames", 2)
    assert all(e["type"] == "motion" for e in got)
    seen = counters(cloud, agent, "frames", "malformed", len(bad))
    assert seen["malformed"] == len(bad) and seen.get("errors", 0) == 0
    assert "Traceback" not in agent.log()
    peak = peak_rss_kib(agent)
    print(f"agent peak RSS after the bombs: {peak / 1024:.0f} MB")
    assert peak < RSS_BOUND_KIB
    assert agent.running


# -- 8: non-finite numbers ---------------------------------------------------------------------

def test_non_finite_readings_are_malformed_and_events_are_strict_json(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    """NaN, Infinity and numbers beyond a double used to come out as NaN/Infinity (which
    strict parsers reject) or vanish from min/max; now each is one malformed reading."""
    agent, cloud = running
    bad = [b'{"w": NaN}', b'{"w": Infinity}', b'{"w": -Infinity}', b'{"w": 1e400}',
           b'{"w": 1' + b"0" * 400 + b"}", msgpack.packb({"w": math.nan}),
           msgpack.packb({"w": -math.inf})]
    good = [json.dumps({"w": w}).encode() for w in (10, 20, 60)]
    publish_many(local_broker.url, "meters/m1/power", [good[0], *bad[:4], good[1], *bad[4:],
                                                       good[2]])
    (event,) = events(cloud, "power", 1, decode=strict_json)
    assert event["w"] == {"mean": 30.0, "min": 10.0, "max": 60.0, "sum": 90.0}
    seen = counters(cloud, agent, "power", "malformed", len(bad))
    assert seen["malformed"] == len(bad) and seen.get("errors", 0) == 0


def test_msgpack_events_never_carry_nan_or_infinity(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    """A reading that passes `filter` with NaN in another field is malformed at `publish`."""
    agent, cloud = running
    publish_many(local_broker.url, "rooms/hall/temp",
                 [msgpack.packb({"t": 30, "rh": math.nan}), b'{"t": 31, "rh": Infinity}',
                  msgpack.packb({"t": math.inf}), msgpack.packb({"t": 32, "rh": 40.5})])
    (event,) = events(cloud, "packed", 1, decode=msgpack.unpackb)
    assert (event["t"], event["rh"]) == (32, 40.5)
    seen = counters(cloud, agent, "packed", "malformed", 3)
    assert seen["malformed"] == 3 and seen.get("errors", 0) == 0


# -- 18: frames reaching publish ---------------------------------------------------------------

def test_decode_motion_publish_turns_moving_jpeg_frames_into_motion_events(
    running: tuple[AgentProcess, Collector], local_broker: Broker
) -> None:
    """`publish` used to re-parse each JPEG as JSON and count it malformed. A frame now
    becomes a `motion` event: the boxes, the frame size and no pixels."""
    agent, cloud = running
    frames = moving_square(6)
    publish_many(local_broker.url, "cams/yard/frame", frames)
    got = events(cloud, "frames", len(frames) - 1)  # the first frame is the background
    for e in got:
        assert e["type"] == "motion" and e["topic"] == "cams/yard/frame"
        assert (e["width"], e["height"]) == (320, 240)
        assert e["motion"] and all(len(b) == 4 and all(0 <= v <= 1 for v in b)
                                   for b in e["motion"])
        assert {"decode", "motion", "total"} <= set(e["latency_ms"])
    for m in cloud.snapshot(f"fog/{DEVICE}/events/frames"):
        assert len(m.payload) < 1000  # boxes and sizes, no pixels
    for k, e in enumerate(got, start=1):  # a box covers where the square is now
        centre = (40 + 30 * k) / 320
        assert any(b[0] <= centre <= b[2] for b in e["motion"]), (k, e["motion"])
    seen = counters(cloud, agent, "frames", "frames_motion", len(got))
    assert seen.get("malformed", 0) == 0 and seen.get("errors", 0) == 0
