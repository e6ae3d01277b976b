"""The [[pipeline]] tables: a trigger, the steps it feeds, and whether they fit together.

Each step's parameters are validated by its own action (`agent.actions.registry`,
imported lazily: every layer imports config, none of them should import the actions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError
from agent.mqtt import topics
from agent.schema import Duration, build


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    """What feeds a pipeline: a local topic filter, a camera the agent reads, or a timer."""

    topic: str | None = None
    qos: int = 1
    camera: str | None = None  # /dev/video0, rtsp://..., or a video file path
    fps: float | None = None  # camera fps cap; default from the profile
    loop: bool = False  # replay a video file forever
    every_s: Duration | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("topic", "camera", "every_s") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a trigger needs exactly one of topic, camera, every_s")
        if self.topic is not None:
            topics.validate_filter(self.topic)
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        if self.every_s is not None and self.every_s <= 0:
            raise ValueError("every_s: must be positive")
        if self.fps is not None and self.fps <= 0:
            raise ValueError("fps: must be positive")


@dataclass(frozen=True, slots=True)
class StepConfig:
    action: str
    params: Any  # the action's own frozen Params dataclass, already validated


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    name: str
    trigger: TriggerConfig
    steps: tuple[StepConfig, ...]
    queue: int = 1000  # bounded intake; a full queue applies backpressure (QoS1 not acked)
    workers: int = 1  # >1 only for order-free pipelines


def build_pipeline(raw: object, where: str) -> PipelineConfig:
    """One [[pipeline]] table, each step's parameters validated by its action."""
    from agent.actions import registry  # actions validate their own parameters

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    raw = dict(raw)
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} ({name})"
    trigger = raw.get("trigger")
    if isinstance(trigger, str):
        raw["trigger"] = {"topic": trigger}
    steps_raw = raw.pop("steps", None)
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ConfigError(f"{where}: steps must be a non-empty array of tables")
    steps = []
    for i, step in enumerate(steps_raw):
        swhere = f"{where}.steps[{i}]"
        if not isinstance(step, dict) or not isinstance(step.get("action"), str):
            raise ConfigError(f"{swhere}: each step needs an action = \"name\"")
        params = {k: v for k, v in step.items() if k != "action"}
        spec = registry.lookup(step["action"], swhere)
        if issubclass(spec.params, dict):  # a user action: its own parameters, unvalidated
            steps.append(StepConfig(step["action"], spec.params(params)))
        else:
            steps.append(StepConfig(
                step["action"], build(spec.params, params, f"{swhere} ({step['action']})")))
    raw["steps"] = []
    shell = build(_PipelineShell, raw, where)
    if not shell.name or "/" in shell.name or "+" in shell.name or "#" in shell.name:
        raise ConfigError(f"{where}: name must be non-empty without / + #")
    try:  # it names the topic of its events
        topics.validate_name(topics.events("fog", "d", shell.name))
    except ValueError as exc:
        raise ConfigError(f"{where}.name: {exc}") from None
    _check_flow(shell.trigger, steps, where)
    return PipelineConfig(shell.name, shell.trigger, tuple(steps), shell.queue, shell.workers)


def _check_flow(trigger: TriggerConfig, steps: list[StepConfig], where: str) -> None:
    """Each step must be able to take what the one before gives, and something must be sent.

    Otherwise `run` would start and drop every message at that step (counted as
    malformed), or never send anything: a config error is the honest answer.
    """
    from agent.actions import registry

    kind: registry.Kind = ("bytes" if trigger.topic is not None
                           else "frame" if trigger.camera is not None else "dict")
    source = "the trigger"
    for i, step in enumerate(steps):
        swhere = f"{where}.steps[{i}] ({step.action})"
        flow = registry.flow(step.action)
        if kind == "sent":
            raise ConfigError(f"{swhere}: no message reaches it: {source} already sent it "
                              "up (forward and publish end a pipeline)")
        if kind != "any" and "any" not in flow.takes and kind not in flow.takes:
            takes = " or ".join(registry.KIND_NAMES[k] for k in sorted(flow.takes))
            hint = f" ({flow.hint})" if flow.hint else ""
            raise ConfigError(f"{swhere}: takes {takes} but gets "
                              f"{registry.KIND_NAMES[kind]} from {source}{hint}")
        kind = flow.gives or kind
        source = f"steps[{i}] ({step.action})"
    if kind not in ("sent", "any"):
        raise ConfigError(f"{where}.steps: sends nothing up: it ends with {source}, which "
                          f"gives {registry.KIND_NAMES[kind]}; end it with publish or forward")


@dataclass(frozen=True, slots=True)
class _PipelineShell:
    name: str
    trigger: TriggerConfig
    steps: tuple[Any, ...] = ()
    queue: int = 1000
    workers: int = 1

    def __post_init__(self) -> None:
        if self.queue < 1:
            raise ValueError("queue: must be at least 1")
        if self.workers < 1:
            raise ValueError("workers: must be at least 1")


def is_file_source(camera: str) -> bool:
    """A video file, not a device or a stream (those may come and go; files do not)."""
    return not camera.startswith("/dev/") and "://" not in camera
