"""`track`: follow detections across frames; publish objects, not frames.

A greedy IoU tracker per source topic and label. An object becomes an
event only when the median of its recent scores (padded with zeros up to
`min_hits`, as Frigate does) reaches `min_score`: a single false positive
never does. Events are messages with `data = {"type": "new" | "update" |
"end", "track", "label", "score", "detections": [best current detection],
"model", "first_seen", "last_seen", "frames"}`; `update` at most every
`update_s`; `end` once an object was unseen for `timeout_s` (on a later
frame, or from the pipeline's clock through `tick`).

Each event carries the object's best detection so far in `meta["best"]` and
its frame in `meta["frame"]` (for a `snapshot` step). Of that frame a track
keeps only the box and `best_margin` x its size on each side: the rest of the
event's frame is black. Whole frames held by every track, tentative ones
included, were most of a camera pipeline's memory (27 tracks, 22 frames of
1.3 MB at once on vtest.avi).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from agent.messages import Message
from agent.pipeline import ActionContext
from agent.schema import Duration
from agent.vision.detector import Detection
from agent.vision.frames import Frame, Patch
from agent.vision.tensors import iou_matrix


@dataclass(frozen=True, slots=True)
class Params:
    iou: float = 0.3  # a detection continues a track when their boxes overlap this much
    min_score: float = 0.5  # median of the recent scores an object needs to become an event
    min_hits: int = 3
    history: int = 10  # recent scores kept per track
    timeout_s: Duration = Duration(2.0)
    update_s: Duration = Duration(5.0)
    best_margin: float = 0.5  # of the best box's size, kept around it on each side

    def __post_init__(self) -> None:
        if not 0 < self.iou <= 1 or not 0 <= self.min_score <= 1:
            raise ValueError("iou must lie in (0, 1] and min_score in [0, 1]")
        if not 0 <= self.best_margin <= 10:
            raise ValueError("best_margin must lie in [0, 10] (a snapshot's margin fits in it)")
        if self.min_hits < 1 or self.history < self.min_hits:
            raise ValueError("need 1 <= min_hits <= history")


@dataclass(slots=True)
class Track:
    id: int
    source: str
    det: Detection
    first_seen: float
    last_seen: float
    scores: deque[float]
    model: Any = None
    frames: int = 1
    published: bool = False
    last_event: float = 0.0
    best: tuple[float, Detection | None, Patch | None] = (0.0, None, None)

    def median(self, min_hits: int) -> float:
        s = list(self.scores) + [0.0] * max(0, min_hits - len(self.scores))
        return float(statistics.median(s))


class Tracker:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.tracks: list[Track] = []
        self.next_id = 1
        self.interval_s = min(1.0, float(params.timeout_s) / 2)
        self._lock = threading.Lock()  # process() runs in a worker thread, tick() on the loop

    def _event(self, kind: str, t: Track, now: float, msg: Message | None) -> Message:
        data = {"type": kind, "track": t.id, "label": t.det.label,
                "score": round(t.median(self.p.min_hits), 4),
                "detections": [t.det.as_dict()], "model": t.model,
                "first_seen": round(t.first_seen, 3), "last_seen": round(t.last_seen, 3),
                "frames": t.frames}
        _, best_det, best_patch = t.best
        meta: dict[str, Any] = ({"best": best_det, "frame": best_patch.frame()}
                                if best_patch is not None else {})
        if msg is not None:
            return msg.evolve(data=data, meta={**msg.meta, **meta}, ts=msg.ts)
        return Message(topic=t.source, payload=b"", ts=now, data=data, meta=meta)

    def _expire(self, now: float, source: str | None) -> list[Message]:
        out: list[Message] = []
        alive: list[Track] = []
        for t in self.tracks:
            if (source is None or t.source == source) and now - t.last_seen > self.p.timeout_s:
                if t.published:
                    out.append(self._event("end", t, now, None))
            else:
                alive.append(t)
        self.tracks = alive
        return out

    def process(self, msg: Message) -> Sequence[Message]:
        dets: list[Detection] = list(msg.meta.get("detections", ()))
        frame = msg.meta.get("frame")
        model = msg.data.get("model") if isinstance(msg.data, dict) else None
        now = msg.ts
        with self._lock:
            out = self._expire(now, msg.topic)
            mine = [t for t in self.tracks if t.source == msg.topic]
            matched = self._match(mine, dets)
            for j, d in enumerate(dets):
                t = matched.get(j)
                if t is None:
                    t = Track(self.next_id, msg.topic, d, now, now, deque(maxlen=self.p.history),
                              model)
                    self.next_id += 1
                    self.tracks.append(t)
                else:
                    t.det, t.last_seen, t.frames = d, now, t.frames + 1
                t.scores.append(d.score)
                if d.score >= t.best[0]:
                    t.best = (d.score, d, Patch.around(frame, d.box, self.p.best_margin)
                              if isinstance(frame, Frame) else None)
                if t.median(self.p.min_hits) < self.p.min_score:
                    continue
                if not t.published:
                    t.published, t.last_event = True, now
                    out.append(self._event("new", t, now, msg))
                elif now - t.last_event >= self.p.update_s:
                    t.last_event = now
                    out.append(self._event("update", t, now, msg))
        return out

    def _match(self, tracks: list[Track], dets: list[Detection]) -> dict[int, Track]:
        """Greedy matching by IoU, best pairs first, same label only."""
        if not tracks or not dets:
            return {}
        a = np.array([d.box for d in dets], np.float64)
        b = np.array([t.det.box for t in tracks], np.float64)
        iou = iou_matrix(a, b)
        same = np.array([[d.label == t.det.label for t in tracks] for d in dets])
        iou = np.where(same, iou, 0.0)
        out: dict[int, Track] = {}
        used: set[int] = set()
        for flat in np.argsort(-iou, axis=None):
            i, k = divmod(int(flat), len(tracks))
            if iou[i, k] < self.p.iou:
                break
            if i in out or k in used:
                continue
            out[i] = tracks[k]
            used.add(k)
        return out

    def tick(self, now: float) -> Sequence[Message]:
        with self._lock:
            return self._expire(now, None)


def build(params: Params, ctx: ActionContext) -> Tracker:
    return Tracker(params, ctx)
