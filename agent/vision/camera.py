"""A camera the agent reads itself: V4L2 device, RTSP URL or video file, via OpenCV.

`frames()` yields pipeline Messages (data = Frame) at most `fps` per second.
OpenCV reads in a worker thread (VideoCapture.read blocks); between the
reader and the pipeline sits a one-slot queue where the newest frame wins:
a frame replaced before the pipeline took it is counted as `frames_dropped`.
A camera that fails or ends is reopened with backoff (a file with `loop`
restarts at once; without `loop` the source ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import cv2

from agent.config import CameraConfig, TriggerConfig
from agent.messages import Message
from agent.telemetry import Telemetry
from agent.vision import heap
from agent.vision.frames import Frame

log = logging.getLogger(__name__)

REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0


def _open(source: str, cfg: CameraConfig) -> Any:
    target: str | int = source
    if source.startswith("/dev/video") and source[10:].isdigit():
        target = int(source[10:])
    cap = cv2.VideoCapture(target)
    if isinstance(target, int) and cap.isOpened():
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.frame_width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.frame_height)
    if not cap.isOpened():
        cap.release()
        return None
    return cap


class _Reader:
    """The worker thread: read, pace to `fps`, hand the newest frame to the loop."""

    def __init__(self, trigger: TriggerConfig, cfg: CameraConfig, telemetry: Telemetry,
                 name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.source = trigger.camera or ""
        self.fps = float(trigger.fps or cfg.fps_cap)
        self.repeat = trigger.loop
        self.cfg = cfg
        self.counters = telemetry.pipeline(name)
        self.telemetry = telemetry
        self.name = name
        self.loop = loop
        self.slot: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=1)
        self.stop = threading.Event()

    def _put(self, item: Frame | None) -> None:
        # On the loop: latest wins, the replaced frame is counted.
        if self.slot.full():
            self.slot.get_nowait()
            if item is not None:
                self.counters.inc("frames_dropped")
                self.telemetry.warn_burst(f"camera-drop:{self.name}",
                                          "camera %s: pipeline %s is slower than %.1f fps; "
                                          "dropping stale frames", self.source, self.name,
                                          self.fps)
        self.slot.put_nowait(item)

    def run(self) -> None:
        backoff = REOPEN_MIN_S
        period = 1.0 / self.fps if self.fps > 0 else 0.0
        is_file = not self.source.startswith(("/dev/", "rtsp://", "http://", "https://"))
        try:
            while not self.stop.is_set():
                cap = _open(self.source, self.cfg)
                if cap is None:
                    log.warning("camera %s: cannot open; retrying in %.1fs", self.source, backoff)
                    if self.stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, REOPEN_MAX_S)
                    continue
                got_any = False
                next_t = time.monotonic()
                try:
                    while not self.stop.is_set():
                        ok, image = cap.read()  # blocks: this is why we are in a thread
                        if not ok or image is None:
                            break
                        got_any = True
                        backoff = REOPEN_MIN_S
                        self.counters.inc("frames_read")
                        frame = Frame(image, time.time(), self.source)
                        self.loop.call_soon_threadsafe(self._put, frame)
                        if period:
                            next_t = max(next_t + period, time.monotonic() - period)
                            if self.stop.wait(max(0.0, next_t - time.monotonic())):
                                return
                finally:
                    cap.release()
                if is_file and got_any and not self.repeat:
                    return
                if not (is_file and got_any):
                    log.warning("camera %s: stream ended; reopening in %.1fs", self.source,
                                backoff)
                    if self.stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, REOPEN_MAX_S)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self.loop.call_soon_threadsafe(self._put, None)


async def frames(trigger: TriggerConfig, camera_cfg: CameraConfig, telemetry: Telemetry,
                 name: str) -> AsyncIterator[Message]:
    """Frames from `trigger.camera` as Messages (topic: the camera source), newest first."""
    if not trigger.camera:
        raise ValueError("frames() needs a trigger with camera = ...")
    heap.tune_for_frames()  # frames given back to the kernel once dropped (agent.vision.heap)
    reader = _Reader(trigger, camera_cfg, telemetry, name, asyncio.get_running_loop())
    thread = threading.Thread(target=reader.run, name=f"camera:{name}", daemon=True)
    thread.start()
    try:
        while True:
            frame = await reader.slot.get()
            if frame is None:
                return
            yield Message(topic=reader.source, payload=b"", ts=frame.ts, data=frame)
    finally:
        reader.stop.set()
        await asyncio.to_thread(thread.join, 5.0)
