"""`Config`, the whole file: read the TOML, overlay the firmware profile, validate.

A firmware profile (`device.profile`, a file in `agent/firmware-profiles/`,
shipped as package data) holds board defaults for the `runtime`, `camera`, `outbox`, `service` and
`telemetry` sections; the agent file overrides them key by key.
"""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from agent import resources
from agent.config.broker import BrokerConfig, broker_table, loopback
from agent.config.pipeline import PipelineConfig, build_pipeline, is_file_source
from agent.config.tables import (
    CameraConfig,
    DeviceConfig,
    ModelsConfig,
    OtaConfig,
    OutboxConfig,
    RuntimeConfig,
    ServiceConfig,
    TelemetryConfig,
)
from agent.errors import ConfigError
from agent.schema import convert

PROFILE_DIR = resources.path("firmware-profiles")
PROFILE_SECTIONS = ("runtime", "camera", "outbox", "service", "telemetry")


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
    ota: OtaConfig = field(default_factory=OtaConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pipelines: tuple[PipelineConfig, ...] = ()
    source: str = "<memory>"

    @property
    def data_dir(self) -> Path:
        return Path(self.device.data_dir)

    @property
    def models_dir(self) -> Path:
        """Fetched and OTA-installed models: `[models] dir`, default `<data_dir>/models`."""
        return Path(self.models.dir) if self.models.dir is not None else self.data_dir / "models"

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
    known = {"device", "local", "uplink", "pipeline", "ota", "models", *PROFILE_SECTIONS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown table [{unknown[0]}] (known: {', '.join(sorted(known))})")
    pipelines_raw = raw.pop("pipeline", [])
    if not isinstance(pipelines_raw, list):
        raise ConfigError(f"{where}: pipeline must be an array of tables [[pipeline]]")
    sections = {k: v for k, v in raw.items()}
    for name in ("local", "uplink"):
        sections[name] = broker_table(sections.get(name, {}), f"{where}: {name}")
    # The known-table check above keeps `pipelines` and `source` out of `sections`.
    shell = _sections(Config, sections, where)
    pipelines = tuple(
        build_pipeline(p, f"{where}: pipeline[{i}]") for i, p in enumerate(pipelines_raw)
    )
    names = [p.name for p in pipelines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: pipeline name {dupes[0]!r} is used twice")
    cfg = replace(shell, pipelines=pipelines, source=where)
    _check_client_ids(cfg)
    _check_no_loop(cfg)
    return _beside(cfg, base_dir) if base_dir is not None else cfg


def _sections(cls: type[Any], raw: dict[str, Any], where: str) -> Any:
    """Build a dataclass of tables, each named `FILE: table.key` in errors."""
    hints = typing.get_type_hints(cls)
    values = {f.name: convert(hints[f.name], raw[f.name], f"{where}: {f.name}")
              for f in fields(cls) if f.name in raw}
    return cls(**values)


def _check_client_ids(cfg: Config) -> None:
    """Two connections with one client id take each other's session on a shared broker."""
    local, uplink = cfg.client_id("local"), cfg.client_id("uplink")
    if local == uplink:
        key = "local.client_id" if cfg.local.client_id is not None else "uplink.client_id"
        raise ConfigError(f"{cfg.source}: {key}: {local!r} is also the other connection's "
                          "client id; a broker drops one connection for the other: "
                          "give each its own")


def _check_no_loop(cfg: Config) -> None:
    """On one broker, a trigger that matches the agent's own topics feeds on its own output.

    Every status, telemetry and relayed message would come back in, be sent again
    under a longer topic, and so on without end. (Templates pointing elsewhere are
    not followed; the agent's own `{prefix}/{device}/#` is.)
    """
    def same(a: tuple[str, int], b: tuple[str, int]) -> bool:
        return a == b or (a[1] == b[1] and loopback(a[0]) and loopback(b[0]))

    if not any(same(a, b) for a in cfg.local.addresses for b in cfg.uplink.addresses):
        return
    own = f"{cfg.device.prefix}/{cfg.device.id}/#"
    for i, p in enumerate(cfg.pipelines):
        if p.trigger.topic is not None and _overlap(p.trigger.topic, own):
            raise ConfigError(
                f"{cfg.source}: pipeline[{i}] ({p.name}).trigger: {p.trigger.topic!r} matches "
                f"the agent's own topics {own!r} on the broker it also sends to: every "
                "message would come back in; narrow the trigger or use another broker")


def _overlap(a: str, b: str) -> bool:
    """True when some topic matches both filters."""
    la, lb = a.split("/"), b.split("/")
    for x, y in zip(la, lb, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    longer = la if len(la) > len(lb) else lb
    return len(la) == len(lb) or longer[min(len(la), len(lb))] == "#"


def _beside(cfg: Config, base_dir: Path) -> Config:
    """Relative paths read from the config file's directory, as check-config saw them.

    A service's working directory is not the operator's: `run` under systemd and
    `check-config` in a shell must read the same TLS files, data dir and videos.
    """
    def at(path: str) -> str:
        return path if os.path.isabs(path) else str(base_dir / path)

    def maybe(path: str | None) -> str | None:
        return None if path is None else at(path)

    def broker(b: BrokerConfig) -> BrokerConfig:
        return replace(b, ca=maybe(b.ca), cert=maybe(b.cert), key=maybe(b.key))

    def pipeline(p: PipelineConfig) -> PipelineConfig:
        cam = p.trigger.camera
        if cam is None or not is_file_source(cam):
            return p
        return replace(p, trigger=replace(p.trigger, camera=at(cam)))

    return replace(cfg, device=replace(cfg.device, data_dir=at(cfg.device.data_dir)),
                   local=broker(cfg.local), uplink=broker(cfg.uplink),
                   ota=replace(cfg.ota, keys=tuple(at(k) for k in cfg.ota.keys),
                               ca=maybe(cfg.ota.ca)),
                   models=replace(cfg.models, dir=maybe(cfg.models.dir)),
                   pipelines=tuple(pipeline(p) for p in cfg.pipelines))


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
            _sections(_ProfileSections, raw, str(path))
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
