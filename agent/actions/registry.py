"""The action table: name -> module path, imported only when a pipeline uses it.

An action module defines `Params` (a frozen dataclass validated by
`agent.schema.build`) and `build(params, ctx) -> Action`. A user action is
named by import path, `mypkg.mod:func`: a callable taking a Message and
returning a Message, a list of them, or None; its step parameters are passed
through as a dict.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

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
        raise ConfigError(
            f"{where}: action {name!r} needs the package {exc.name!r}: pip install {exc.name}"
        ) from exc


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
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_path} has no callable {attr!r}")

    def build(params: Any, ctx: Any) -> _UserAction:
        opts = dict(params)
        if opts and not _accepts_kwargs(fn, opts):
            raise ConfigError(f"{where}: {name} does not accept parameters {sorted(opts)}")
        return _UserAction(fn, opts)

    return ActionSpec(name, _PassThrough, build)


class _PassThrough(dict[str, Any]):
    """Marker: user-action parameters are not validated by the agent."""


def _accepts_kwargs(fn: Callable[..., Any], opts: dict[str, Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params} | {"blocking"}
    return set(opts) <= names
