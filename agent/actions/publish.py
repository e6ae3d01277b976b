"""`publish`: wrap what the pipeline made in the event envelope (schema v1) and send it up.

    {"v": 1, "id": "<device>:<boot>:<seq>", "device", "pipeline", "seq", "ts",
     ...the message's fields (type, detections, model, window, ...), "latency_ms"}

`id` is the idempotency key: stable across retries, unique per event.
A frame that reaches `publish` (`decode -> motion -> publish`) becomes a
`motion` event, `{"type": "motion", "topic", "width", "height", "motion":
[[x0, y0, x1, y1], ...]}` (boxes normalised to the frame), never its pixels;
without a motion step before it, a `frame` event with the size alone.
Events carry no NaN or infinity, in JSON (strict parsers refuse them) or
msgpack alike: such a message is malformed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgpack

from agent.actions.outgoing import OutgoingParams
from agent.actions.payload import fields, nonfinite
from agent.errors import PayloadError
from agent.messages import Message, Outgoing
from agent.pipeline import ActionContext

ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Params(OutgoingParams):
    topic: str = "{prefix}/{device}/events/{pipeline}"
    format: Literal["json", "msgpack"] = "json"


class Publish:
    blocking: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ActionContext) -> None:
        self.p = params
        self.ctx = ctx
        self.key_prefix = f"{ctx.device}:{ctx.boot_id}:"
        self.has_topic = "{topic}" in params.topic
        self.topic = params.topic if self.has_topic else params.topic.format(
            prefix=ctx.prefix, device=ctx.device, pipeline=ctx.pipeline)
        self.ttl_s = float(params.ttl) if params.ttl else None
        self.encode = _json if params.format == "json" else _msgpack

    def process(self, msg: Message) -> Sequence[Outgoing]:
        body = fields(msg) if msg.data is None or isinstance(msg.data, dict) else _frame(msg)
        seq = self.ctx.next_seq()
        key = f"{self.key_prefix}{seq}"
        envelope: dict[str, Any] = {
            "v": ENVELOPE_VERSION, "id": key, "device": self.ctx.device,
            "pipeline": self.ctx.pipeline, "seq": seq, "ts": round(msg.ts, 3),
        }
        clash = [k for k in body if k in envelope]
        if clash:  # the envelope's own fields win; say so once per burst instead of silently
            self.ctx.telemetry.warn_burst(
                f"publish:clash:{self.ctx.pipeline}", "pipeline %s: fields %s are envelope "
                "fields and were not copied into the event", self.ctx.pipeline, clash)
        envelope.update((k, v) for k, v in body.items() if k not in envelope)
        latency = dict(msg.latency_ms)
        latency["total"] = round((time.time() - msg.ts) * 1000.0, 3)
        envelope["latency_ms"] = latency
        topic = self.topic.format(prefix=self.ctx.prefix, device=self.ctx.device,
                                  pipeline=self.ctx.pipeline, topic=msg.topic) \
            if self.has_topic else self.topic
        return (Outgoing(topic=topic, payload=self.encode(envelope), key=key,
                         pipeline=self.ctx.pipeline, priority=self.p.priority,
                         ttl_s=self.ttl_s, qos=self.p.qos, retain=self.p.retain,
                         created=msg.ts),)


def _frame(msg: Message) -> dict[str, Any]:
    """What an event says about a frame: its motion boxes and size, no pixels."""
    from agent.vision.frames import Frame  # here: relays never load cv2; vision steps have

    frame = msg.data
    if not isinstance(frame, Frame):
        return fields(msg)
    boxes = msg.meta.get("motion")
    event: dict[str, Any] = {"type": "frame" if boxes is None else "motion", "topic": msg.topic,
                             "width": frame.width, "height": frame.height}
    if boxes is not None:
        event["motion"] = boxes
    return event


def _json(envelope: dict[str, Any]) -> bytes:
    try:
        return json.dumps(envelope, separators=(",", ":"), default=_plain,
                          allow_nan=False).encode()
    except ValueError as exc:
        raise PayloadError(_refusal(envelope, exc)) from None


def _msgpack(envelope: dict[str, Any]) -> bytes:
    where = nonfinite(envelope)  # msgpack would carry NaN along: refuse it as JSON does
    if where is not None:
        raise PayloadError(_refusal(envelope, None))
    try:
        return bytes(msgpack.packb(envelope, default=_plain))
    except OverflowError:
        raise PayloadError("the event holds an integer beyond 64 bits") from None


def _refusal(envelope: dict[str, Any], exc: Exception | None) -> str:
    where = nonfinite(envelope)
    if where is None:
        return f"cannot encode the event: {exc}"
    return f"field {where!r} is not a finite number (events carry no NaN or infinity)"


def _plain(value: Any) -> Any:
    """numpy scalars and arrays from vision steps become plain numbers and lists."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(value, int):  # msgpack hands back what it cannot pack: beyond 64 bits
        raise PayloadError("the event holds an integer beyond 64 bits")
    raise TypeError(f"cannot encode {type(value).__name__} in an event")


def build(params: Params, ctx: ActionContext) -> Publish:
    return Publish(params, ctx)
