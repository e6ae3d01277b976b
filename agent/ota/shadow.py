"""Shadow evaluation, the pure part: does the candidate still see what the active model sees?

The device runs the candidate beside the active model on the same live frames
(`agent.vision.hub`); each evaluated frame gives a `Frame`: both models'
detections and inference times. `summarize` turns the frames into a `Summary`:

- agreement: per frame, detections matched one to one by label and IoU >= 0.5
  (greedy, highest IoU first); precision, recall and F1 of the candidate against
  the active model over all frames (1.0 when neither detected anything);
- detection-rate ratio: candidate detections per frame / active detections per
  frame (when the active model saw nothing: the candidate's count, at least 1);
- output sanity flags: `non-finite` (a NaN or infinite score or box, or an
  inference that raised), `constant` (the candidate gave the same non-empty
  output on every frame while the active model's varied), `one-class` (every
  candidate detection has one label while the active model saw several);
- latency: the candidate's p95 over the active model's p95 (taken as at least
  5 ms, as the trial does: a sub-millisecond p95 is a scheduler time slice).

`judge(summary, policy)` applies the signed gates (`ShadowPolicy`: min_agreement,
rate_ratio, max_latency_ratio, the sanity flags) and returns the reason a
candidate fails, or None. With `mode = "observe"` the device never promotes the
candidate: it publishes one summary per `interval` (champion/challenger data).
No I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IOU_MATCH = 0.5
MIN_BASELINE_MS = 5.0  # as agent.ota.trial: latency ratios are taken against at least this
Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max
Mode = Literal["gate", "observe"]


@dataclass(frozen=True, slots=True)
class Seen:
    """One detection, as both models report it."""

    label: str
    score: float
    box: Box


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame both models ran on; `error`: the candidate raised on it."""

    active: tuple[Seen, ...]
    candidate: tuple[Seen, ...]
    active_ms: float
    candidate_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ShadowPolicy:
    """`policy.shadow` of a signed release (every key optional)."""

    frames: int = 200  # evaluated frames to decide on
    min_frames: int = 20  # at max_duration_s, fewer than this: rejected, not enough frames
    max_duration_s: float = 1800.0
    max_share: float = 0.5  # of the active model's inference time the candidate may take
    min_agreement: float = 0.5
    rate_ratio: tuple[float, float] = (0.33, 3.0)
    max_latency_ratio: float = 2.0
    mode: Mode = "gate"  # "observe": never promoted, one summary per interval
    interval_s: float = 60.0  # observe: seconds per published summary

    def __post_init__(self) -> None:
        if self.frames < 1 or self.min_frames < 1:
            raise ValueError("policy.shadow.frames and min_frames must be 1 or more")
        if not self.max_duration_s > 0:
            raise ValueError("policy.shadow.max_duration must be above 0")
        if not 0 < self.max_share <= 1:
            raise ValueError("policy.shadow.max_share must lie in (0, 1]")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("policy.shadow.min_agreement must lie in [0, 1]")
        lo, hi = self.rate_ratio
        if not 0 <= lo <= hi:
            raise ValueError("policy.shadow.rate_ratio must be [low, high] with 0 <= low <= high")
        if not self.max_latency_ratio > 0:
            raise ValueError("policy.shadow.max_latency_ratio must be above 0")
        if not self.interval_s >= 1:
            raise ValueError("policy.shadow.interval must be 1 s or more")

    @property
    def enough(self) -> int:
        """Frames needed to decide at the deadline."""
        return min(self.min_frames, self.frames)

    @classmethod
    def from_json(cls, raw: object, where: str = "policy.shadow") -> ShadowPolicy:
        """ValueError naming the key for anything but the known keys with sane values."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be an object")
        args: dict[str, Any] = {}
        for key, value in raw.items():
            if key in ("frames", "min_frames"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
                args[key] = value
            elif key in ("max_duration", "max_share", "min_agreement", "max_latency_ratio"):
                args["max_duration_s" if key == "max_duration" else key] = \
                    _number(value, f"{where}.{key}")
            elif key == "rate_ratio":
                if not isinstance(value, list | tuple) or len(value) != 2:
                    raise ValueError(f"{where}.rate_ratio must be [low, high], got {value!r}")
                args[key] = (_number(value[0], f"{where}.rate_ratio"),
                             _number(value[1], f"{where}.rate_ratio"))
            elif key == "mode":
                if value not in ("gate", "observe"):
                    raise ValueError(f"{where}.mode must be \"gate\" or \"observe\", "
                                     f"got {value!r}")
                args[key] = value
            elif key == "interval":
                args["interval_s"] = _number(value, f"{where}.interval")
            else:
                raise ValueError(f"{where} key {key!r} is not known to this agent")
        return cls(**args)


def _number(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or \
            not math.isfinite(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Summary:
    frames: int
    f1: float
    precision: float
    recall: float
    active_per_frame: float
    candidate_per_frame: float
    rate_ratio: float
    active_p95_ms: float | None
    candidate_p95_ms: float | None
    latency_ratio: float | None
    flags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The state report's `update.shadow` (the rollout reads `f1`)."""
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)
        return {"frames": self.frames, "f1": r(self.f1), "precision": r(self.precision),
                "recall": r(self.recall), "rate_ratio": r(self.rate_ratio),
                "active_per_frame": r(self.active_per_frame),
                "candidate_per_frame": r(self.candidate_per_frame),
                "latency_ratio": r(self.latency_ratio), "flags": list(self.flags)}


def iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matches(active: Sequence[Seen], candidate: Sequence[Seen]) -> int:
    """Pairs of one frame matched one to one by label and IoU >= 0.5, best IoU first."""
    pairs = sorted(((iou(a.box, c.box), i, j) for i, a in enumerate(active)
                    for j, c in enumerate(candidate) if a.label == c.label), reverse=True)
    used_a: set[int] = set()
    used_c: set[int] = set()
    for overlap, i, j in pairs:
        if not overlap >= IOU_MATCH:
            break
        if i not in used_a and j not in used_c:
            used_a.add(i)
            used_c.add(j)
    return len(used_a)


def p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _finite(d: Seen) -> bool:
    return math.isfinite(d.score) and all(math.isfinite(v) for v in d.box)


def _signature(ds: Sequence[Seen]) -> tuple[tuple[str, float, tuple[float, ...]], ...]:
    return tuple(sorted((d.label, round(d.score, 4), tuple(round(v, 4) for v in d.box))
                        for d in ds))


def summarize(frames: Sequence[Frame]) -> Summary:
    n = len(frames)
    tp = fp = fn = 0
    a_count = c_count = 0
    flags: list[str] = []
    for f in frames:
        m = matches(f.active, f.candidate)
        tp += m
        fp += len(f.candidate) - m
        fn += len(f.active) - m
        a_count += len(f.active)
        c_count += len(f.candidate)
    if any(f.error is not None or not all(_finite(d) for d in f.candidate) for f in frames):
        flags.append("non-finite")
    if n >= 2:
        cand = {_signature(f.candidate) for f in frames if f.error is None}
        act = {_signature(f.active) for f in frames}
        if len(cand) == 1 and next(iter(cand)) and len(act) > 1:
            flags.append("constant")
    a_labels = {d.label for f in frames for d in f.active}
    c_labels = {d.label for f in frames for d in f.candidate}
    if len(c_labels) == 1 and len(a_labels) > 1:
        flags.append("one-class")
    precision = tp / (tp + fp) if tp + fp else 1.0 if fn == 0 else 0.0
    recall = tp / (tp + fn) if tp + fn else 1.0 if fp == 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    a_rate = a_count / n if n else 0.0
    c_rate = c_count / n if n else 0.0
    ratio = c_rate / a_rate if a_count else max(1.0, float(c_count))
    a_p95 = p95([f.active_ms for f in frames])
    c_p95 = p95([f.candidate_ms for f in frames if f.error is None])
    lat = None if a_p95 is None or c_p95 is None else c_p95 / max(a_p95, MIN_BASELINE_MS)
    return Summary(n, f1, precision, recall, a_rate, c_rate, ratio, a_p95, c_p95, lat,
                   tuple(flags))


def judge(s: Summary, policy: ShadowPolicy) -> str | None:
    """Why the candidate fails its shadow evaluation, or None when it passes (called
    when `policy.frames` were evaluated, or at the deadline on what there is)."""
    if s.frames < policy.enough:
        return (f"not enough frames: {s.frames} evaluated in shadow, at least "
                f"{policy.enough} needed")
    figures = (f"(F1 {s.f1:.2f}, rate ratio {s.rate_ratio:.2f}, latency ratio "
               f"{'-' if s.latency_ratio is None else f'{s.latency_ratio:.2f}'} over "
               f"{s.frames} frames)")
    if s.flags:
        return f"shadow: output sanity: {', '.join(s.flags)} {figures}"
    if s.f1 < policy.min_agreement:
        return f"shadow: agreement F1 {s.f1:.2f} is below {policy.min_agreement:g} {figures}"
    lo, hi = policy.rate_ratio
    if not lo <= s.rate_ratio <= hi:
        return (f"shadow: detection-rate ratio {s.rate_ratio:.2f} is outside "
                f"[{lo:g}, {hi:g}] {figures}")
    if s.latency_ratio is not None and s.latency_ratio > policy.max_latency_ratio:
        return (f"shadow: latency p95 ratio {s.latency_ratio:.2f} is above "
                f"{policy.max_latency_ratio:g} {figures}")
    return None


def every(active_ms: float, candidate_ms: float, max_share: float) -> int:
    """Evaluate every k-th frame so that the candidate costs at most `max_share` of the
    active model's inference time (from their mean times so far)."""
    ratio = candidate_ms / active_ms if active_ms > 0 and candidate_ms > 0 else 1.0
    return max(1, math.ceil(ratio / max_share - 1e-9))
