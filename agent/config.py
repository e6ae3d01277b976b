"""The agent's configuration: one TOML file, validated once, frozen.

A firmware profile (`device.profile`, a file in `firmware-profiles/`) holds
board defaults for the `runtime`, `camera`, `outbox`, `service` and
`telemetry` sections; the agent file overrides them key by key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from agent import topics
from agent.errors import ConfigError
from agent.schema import Duration, Size, build

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware-profiles"
PROFILE_SECTIONS = ("runtime", "camera", "outbox", "service", "telemetry")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    data_dir: str = "/var/lib/fogwhisk"
    profile: str | None = None
    prefix: str = "fog"

    def __post_init__(self) -> None:
        if not self.id or any(c in self.id for c in "/+#"):
            raise ValueError(f"device id {self.id!r} must be non-empty without / + #")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None  # default: fogwhisk-{device}-{local|uplink}; fixed for sessions
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    session_expiry_s: Duration = Duration(86400)
    reconnect_min_s: Duration = Duration(0.5)
    reconnect_max_s: Duration = Duration(30)
    connect_timeout_s: Duration = Duration(10)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"url {self.url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"url {self.url!r} has no host")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.keepalive_s < 1:
            raise ValueError("keepalive_s must be at least 1")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password from the keys, else from the URL's userinfo."""
        parts = urlsplit(self.url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        pw = self.password or (unquote(parts.password) if parts.password else None)
        return user, pw


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    max_bytes: Size = Size(256 * 10**6)
    max_messages: int = 2_000_000
    min_free_bytes: Size = Size(64 * 10**6)  # statvfs watermark on the data dir's disk
    on_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    bulk_synchronous: Literal["FULL", "NORMAL"] = "FULL"  # lane 0 only; NORMAL risks the
    # last batch on power loss (not on a crash), for telemetry that can afford it
    # Group commit: the next batch gathers while the current one syncs. A linger > 0 makes
    # each batch wait that long for company (fewer fsyncs, more latency).
    commit_interval_ms: float = 0.0
    commit_max_rows: int = 2000
    inflight: int = 0  # 0: the uplink broker's receive maximum (20 when it names none)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_messages <= 0 or self.commit_max_rows <= 0:
            raise ValueError("max_bytes, max_messages and commit_max_rows must be positive")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    num_threads: int = 2
    fallback: tuple[str, ...] = ("litert",)  # ordered chain, e.g. ["edgetpu", "litert"]
    reprobe_s: Duration = Duration(300)


@dataclass(frozen=True, slots=True)
class CameraConfig:
    frame_width: int = 640
    frame_height: int = 480
    fps_cap: float = 5.0


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    grace_s: Duration = Duration(10)
    memory_max: str = "512M"
    watchdog_s: Duration = Duration(30)


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    interval_s: Duration = Duration(30)


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


@dataclass(frozen=True, slots=True)
class Config:
    device: DeviceConfig
    local: BrokerConfig
    uplink: BrokerConfig
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pipelines: tuple[PipelineConfig, ...] = ()
    source: str = "<memory>"

    @property
    def data_dir(self) -> Path:
        return Path(self.device.data_dir)

    def client_id(self, which: Literal["local", "uplink"]) -> str:
        broker = self.local if which == "local" else self.uplink
        return broker.client_id or f"fogwhisk-{self.device.id}-{which}"


def load(path: str | os.PathLike[str]) -> Config:
    """Read, overlay the firmware profile, validate; `ConfigError` names file and key."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    return from_dict(raw, where, base_dir=Path(path).resolve().parent)


def from_dict(raw: dict[str, Any], where: str = "<memory>", base_dir: Path | None = None) -> Config:
    raw = dict(raw)
    device_raw = raw.get("device")
    if not isinstance(device_raw, dict):
        raise ConfigError(f"{where}: missing required table [device]")
    profile_name = device_raw.get("profile")
    if profile_name is not None:
        if not isinstance(profile_name, str):
            raise ConfigError(f"{where}: device.profile: expected a string")
        raw = overlay(load_profile(profile_name, base_dir, where), raw)
    known = {"device", "local", "uplink", "pipeline", *PROFILE_SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown table [{unknown[0]}] (known: {', '.join(sorted(known))})")
    pipelines_raw = raw.pop("pipeline", [])
    if not isinstance(pipelines_raw, list):
        raise ConfigError(f"{where}: pipeline must be an array of tables [[pipeline]]")
    sections = {k: v for k, v in raw.items()}
    for name in ("local", "uplink"):
        sections.setdefault(name, {})
    # The known-table check above keeps `pipelines` and `source` out of `sections`.
    shell = build(Config, sections, where)
    pipelines = tuple(
        _pipeline(p, f"{where}: pipeline[{i}]") for i, p in enumerate(pipelines_raw)
    )
    names = [p.name for p in pipelines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: pipeline name {dupes[0]!r} is used twice")
    return replace(shell, pipelines=pipelines, source=where)


def _pipeline(raw: object, where: str) -> PipelineConfig:
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
    return PipelineConfig(shell.name, shell.trigger, tuple(steps), shell.queue, shell.workers)


@dataclass(frozen=True, slots=True)
class _PipelineShell:
    name: str
    trigger: TriggerConfig
    steps: tuple[Any, ...] = ()
    queue: int = 1000
    workers: int = 1


def load_profile(name: str, base_dir: Path | None = None,
                 where: str = "<memory>") -> dict[str, Any]:
    """A firmware profile by name (`rpi4`) or path; only board-default sections allowed."""
    candidates = [Path(name)] if name.endswith(".toml") else []
    if base_dir is not None:
        candidates.append(base_dir / "firmware-profiles" / f"{name}.toml")
    candidates.append(PROFILE_DIR / f"{name}.toml")
    for path in candidates:
        if path.is_file():
            with open(path, "rb") as f:
                try:
                    raw = tomllib.load(f)
                except tomllib.TOMLDecodeError as exc:
                    raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
            raw.pop("description", None)
            extra = sorted(set(raw) - set(PROFILE_SECTIONS))
            if extra:
                raise ConfigError(
                    f"{path}: a profile may only set {PROFILE_SECTIONS}, not [{extra[0]}]")
            # Validate the profile alone so its own mistakes name its own file.
            build(_ProfileSections, raw, str(path))
            return raw
    known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
    raise ConfigError(
        f"{where}: device.profile: no profile {name!r} (known: {', '.join(known)})")


@dataclass(frozen=True, slots=True)
class _ProfileSections:
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge two TOML tables; `top` wins key by key, sub-tables merge."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = overlay(out[k], v)
        else:
            out[k] = v
    return out


def with_data_dir(cfg: Config, data_dir: str) -> Config:
    return replace(cfg, device=replace(cfg.device, data_dir=data_dir))
