"""The action table: name -> module path, imported only when a pipeline uses it.

An action module defines `Params` (a frozen dataclass validated by
`agent.schema.build`) and `build(params, ctx) -> Action`. A user action is
named by import path, `mypkg.mod:func`: a callable taking a Message and
returning a Message, a list of them, or None; its step parameters are passed
through as a dict (checked against the callable's signature at load).

`FLOWS` says what each built-in takes and gives, so that `config` can refuse
a pipeline whose step never gets what it needs (motion before decode, a step
after publish) instead of dropping every message at run time.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Literal

from agent.errors import ConfigError

BUILTINS: dict[str, str] = {
    "forward": "agent.actions.forward",
    "publish": "agent.actions.publish",
    "window": "agent.actions.window",
    "filter": "agent.actions.filter",
    "decode": "agent.actions.decode",
    "motion": "agent.actions.motion",
    "detect": "agent.actions.detect",
    "track": "agent.actions.track",
    "snapshot": "agent.actions.snapshot",
}


# What moves between steps. "bytes": the raw payload of a topic trigger (JSON or
# msgpack for the field-reading steps); "frame": an image in `data`; "dict": fields in
# `data`; "detections": detect's dict with the frame in `meta`; "events": track's
# new/update/end dicts; "sent": nothing goes on (the message left for the outbox);
# "any": a user action, whose types the agent cannot know.
Kind = Literal["bytes", "frame", "dict", "detections", "events", "sent", "any"]


def _kinds(*kinds: Kind) -> frozenset[Kind]:
    return frozenset(kinds)


DICTS = _kinds("dict", "detections", "events")

KIND_NAMES: dict[Kind, str] = {
    "bytes": "the raw payload", "frame": "an image frame", "dict": "a dict of fields",
    "detections": "detections", "events": "track events", "sent": "nothing",
    "any": "what a user action makes",
}


@dataclass(frozen=True, slots=True)
class Flow:
    """What a step takes, what it gives (None: what it took, a gate), and the usual fix."""

    takes: frozenset[Kind]
    gives: Kind | None
    hint: str


FLOWS: dict[str, Flow] = {
    "forward": Flow(_kinds("bytes"), "sent",
                    "forward sends the raw payload; use publish for what a step made"),
    "publish": Flow(_kinds("bytes", "frame") | DICTS, "sent", ""),
    "window": Flow(_kinds("bytes") | DICTS, "dict",
                   "window reads numeric fields of JSON/msgpack readings"),
    "filter": Flow(_kinds("bytes") | DICTS, None,
                   "filter reads fields of JSON/msgpack readings or of events"),
    "decode": Flow(_kinds("bytes", "frame"), "frame",
                   "decode reads images from a topic or camera trigger"),
    "motion": Flow(_kinds("frame"), "frame", "put a decode step before it"),
    "detect": Flow(_kinds("frame", "detections"), "detections",
                   "put a decode step (and motion) before it"),
    "track": Flow(_kinds("detections"), "events", "put a detect step before it"),
    "snapshot": Flow(_kinds("detections", "events"), None,
                     "put a detect or track step before it"),
}
USER_FLOW = Flow(_kinds("any"), "any", "")

# What `fogwhisk[vision]` installs (import names), and the built-ins that need it.
VISION_PACKAGES = frozenset({"numpy", "cv2", "ai_edge_litert"})
VISION_ACTIONS = frozenset({"decode", "motion", "detect", "track", "snapshot"})


def flow(name: str) -> Flow:
    """What action `name` takes and gives; user actions take and give anything."""
    return FLOWS.get(name, USER_FLOW)


@dataclass(frozen=True, slots=True)
class ActionSpec:
    name: str
    params: type[Any]
    build: Callable[[Any, Any], Any]


def lookup(name: str, where: str) -> ActionSpec:
    """The spec of a built-in or `module:callable` action; ConfigError when unknown."""
    if ":" in name:
        return _user_action(name, where)
    module_path = BUILTINS.get(name)
    if module_path is None:
        raise ConfigError(
            f"{where}: unknown action {name!r} (built-in: {', '.join(sorted(BUILTINS))}; "
            "or a user action as 'package.module:function')"
        )
    module = _import(module_path, name, where)
    return ActionSpec(name, module.Params, module.build)


def _import(module_path: str, name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(module_path)
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] in VISION_PACKAGES:
            raise ConfigError(f"{where}: action {name!r} needs the vision stack, which this "
                              f"install lacks ({exc.name}): install fogwhisk[vision] "
                              "(pip install 'fogwhisk[vision]')") from exc
        raise ConfigError(
            f"{where}: action {name!r} needs the package {exc.name!r}: pip install {exc.name}"
        ) from exc
    except Exception as exc:  # user code failing at import: the config cannot run
        raise ConfigError(f"{where}: importing {module_path} for action {name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc


class _UserAction:
    blocking: ClassVar[bool] = False

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        self.blocking = bool(options.pop("blocking", False))  # type: ignore[misc]

    def process(self, msg: Any) -> Sequence[Any]:
        result = self.fn(msg, **self.options) if self.options else self.fn(msg)
        if result is None:
            return ()
        if isinstance(result, list | tuple):
            return result
        return (result,)


def _user_action(name: str, where: str) -> ActionSpec:
    module_path, _, attr = name.partition(":")
    module = _import(module_path, name, where)
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"{where}: {module_path} has no callable {attr!r}")
    fn: Callable[..., Any] = found

    class Params(_PassThrough):
        def __init__(self, opts: dict[str, Any]) -> None:
            super().__init__(opts)
            unknown = _unaccepted(fn, opts)
            if unknown:
                raise ConfigError(f"{where}: {name} does not accept parameters {unknown}")

    def build(params: Any, ctx: Any) -> _UserAction:
        return _UserAction(fn, dict(params))

    return ActionSpec(name, Params, build)


class _PassThrough(dict[str, Any]):
    """Marker: user-action parameters are passed as they are, checked only by name."""


def _unaccepted(fn: Callable[..., Any], opts: dict[str, Any]) -> list[str]:
    """The parameters `fn` has no keyword for (`blocking` is the agent's own)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params} | {"blocking"}
    return sorted(set(opts) - names)
