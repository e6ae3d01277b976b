"""The agent's configuration: one TOML file, validated once, frozen.

A firmware profile (`device.profile`, a file in `agent/firmware-profiles/`,
shipped as package data) holds board defaults for the `runtime`, `camera`, `outbox`, `service` and
`telemetry` sections; the agent file overrides them key by key.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import ssl
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from agent import resources
from agent.errors import ConfigError
from agent.mqtt import topics
from agent.schema import Duration, Seconds, Size, build, convert
from agent.urls import redact_text, redact_url

PROFILE_DIR = resources.path("firmware-profiles")
PROFILE_SECTIONS = ("runtime", "camera", "outbox", "service", "telemetry")
DEFAULT_URL = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    data_dir: str = "/var/lib/fogwhisk"
    profile: str | None = None
    prefix: str = "fog"

    def __post_init__(self) -> None:
        if not self.id or any(c in self.id for c in "/+#"):
            raise ValueError(f"device id {self.id!r} must be non-empty without / + #")
        try:
            topics.validate_name(self.id)
        except ValueError as exc:
            raise ValueError(f"id: {exc}") from None
        if not self.prefix:
            raise ValueError("prefix: must not be empty")
        try:  # the agent's own topics start with it
            topics.validate_name(topics.status(self.prefix, self.id))
        except ValueError as exc:
            raise ValueError(f"prefix: {self.prefix!r} makes a bad topic: {exc}") from None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """One broker, or a cluster behind several endpoints that share every other key.

    In TOML `url` is one URL or a list of them; `urls` holds them all, `url` the
    first (what code that knows one broker reads: `host`, `port`, `tls`).
    """

    url: str = DEFAULT_URL
    client_id: str | None = None  # default: fogwhisk-{device}-{local|uplink}; fixed for sessions
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # "auto": MQTT 5 first, 3.1.1 for an endpoint that refuses it (agent.mqtt.endpoints).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: Seconds = Seconds(30)
    session_expiry_s: Duration = Duration(86400)
    reconnect_min_s: Duration = Duration(0.5)
    reconnect_max_s: Duration = Duration(5)  # an edge device buffers: back within seconds
    connect_timeout_s: Duration = Duration(10)
    urls: tuple[str, ...] = ()  # every endpoint, `url` first; written `url = [...]` in TOML

    def __post_init__(self) -> None:
        if not self.urls or (len(self.urls) == 1 and self.url != DEFAULT_URL):
            object.__setattr__(self, "urls", (self.url,))  # one URL (or a replace() of it)
        elif self.url not in (self.urls[0], DEFAULT_URL):
            raise ValueError(f"url: {redact_url(self.url)!r} is not the first of urls")
        object.__setattr__(self, "url", self.urls[0])
        many = len(self.urls) > 1
        for i, url in enumerate(self.urls):
            self._check_url(url, f"url[{i}]" if many else "url")
        if self.key is not None and self.cert is None:
            raise ValueError("key: a client key needs its certificate: set cert too")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= self.keepalive_s <= 65535:  # MQTT's two-byte keep alive
            raise ValueError(f"keepalive_s: must lie within 1 s and 65535 s, "
                             f"got {self.keepalive_s}")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:  # MQTT 5's four-byte expiry
            raise ValueError(f"session_expiry_s: must lie within 0 s and 4294967295 s, "
                             f"got {self.session_expiry_s:g}")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be positive")
        if self.client_id is not None and len(self.client_id.encode()) > 65535:
            raise ValueError("client_id: longer than MQTT's 65535 bytes")

    def _check_url(self, url: str, key: str) -> None:
        """One endpoint; `key` is `url`, or `url[i]` in a list, for the error message."""
        shown = redact_url(url)  # error messages never carry the password
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:  # a port that is no number or out of range, a bad IPv6
            raise ValueError(f"{key}: {shown!r}: {redact_text(str(exc))} "
                             "(a port is a number from 1 to 65535)") from None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"{key}: {shown!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{key}: {shown!r} has no host")
        if port == 0:
            raise ValueError(f"{key}: {shown!r}: port 0 cannot be connected to")
        if parts.scheme in ("mqtts", "ssl"):
            return
        for name in ("ca", "cert", "key"):
            if getattr(self, name) is not None:
                where = f" ({key} {shown!r} is one)" if key != "url" else ""
                raise ValueError(f"{name}: TLS files with a plain mqtt:// URL would be "
                                 f"ignored: use mqtts://{where}")
        # Over loopback a password never leaves the machine; anywhere else it would
        # cross the network in clear.
        if not _loopback(parts.hostname):
            if self.password is not None:
                raise ValueError("password: would cross the network in clear over "
                                 f"{shown!r}: use mqtts://")
            if parts.password is not None:
                raise ValueError(f"{key}: {shown!r} holds a password that would cross the "
                                 "network in clear: use mqtts://")

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
        return self.credentials_for(self.url)

    def credentials_for(self, url: str) -> tuple[str | None, str | None]:
        """Username and password from the keys, else from that endpoint's userinfo."""
        parts = urlsplit(url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        pw = self.password or (unquote(parts.password) if parts.password else None)
        return user, pw

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every endpoint."""
        out = []
        for url in self.urls:
            parts = urlsplit(url)
            tls = parts.scheme in ("mqtts", "ssl")
            out.append((parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883)))
        return tuple(out)


def _broker_table(raw: object, where: str) -> object:
    """`url = [...]` in a [local] or [uplink] table becomes `urls` (and `url`, the first)."""
    if not isinstance(raw, dict):
        return raw  # the schema says what is wrong with it
    if "urls" in raw:
        raise ConfigError(f"{where}: unknown key 'urls': write several endpoints as "
                          'url = ["mqtts://a:8883", "mqtts://b:8883"]')
    value = raw.get("url")
    if not isinstance(value, list):
        return raw
    urls = convert(tuple[str, ...], value, f"{where}.url")
    if not urls:
        raise ConfigError(f"{where}.url: an empty list: name at least one broker URL")
    return {**raw, "url": urls[0], "urls": urls}


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    max_bytes: Size = Size(256 * 10**6)
    max_messages: int = 2_000_000
    min_free_bytes: Size = Size(64 * 10**6)  # statvfs watermark on the data dir's disk
    on_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    bulk_synchronous: Literal["FULL", "NORMAL"] = "FULL"  # lane 0 only; NORMAL risks the
    # last batch on power loss (not on a crash), for telemetry that can afford it
    # Commits start at most once per interval: what arrives meanwhile shares one
    # transaction and fsync, and sparse input waits in its socket until then. The most it
    # adds to a reading's acknowledgement and relay. 0: commit at once (most CPU).
    commit_interval_ms: float = 100.0
    commit_max_rows: int = 2000
    inflight: int = 0  # 0: the uplink broker's receive maximum (20 when it names none)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_messages <= 0 or self.commit_max_rows <= 0:
            raise ValueError("max_bytes, max_messages and commit_max_rows must be positive")
        for key in ("min_free_bytes", "commit_interval_ms", "inflight"):
            if getattr(self, key) < 0:  # a negative window would never send anything
                raise ValueError(f"{key}: must not be negative")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    num_threads: int = 2
    fallback: tuple[str, ...] = ("litert",)  # ordered chain, e.g. ["edgetpu", "litert"]
    reprobe_s: Duration = Duration(300)

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError("num_threads: must be at least 1")
        if not self.fallback:
            raise ValueError("fallback: name at least one runtime")
        if self.reprobe_s <= 0:
            raise ValueError("reprobe_s: must be positive")


@dataclass(frozen=True, slots=True)
class CameraConfig:
    frame_width: int = 640
    frame_height: int = 480
    fps_cap: float = 5.0

    def __post_init__(self) -> None:
        if self.frame_width < 1 or self.frame_height < 1:
            raise ValueError("frame_width and frame_height must be positive")
        if self.fps_cap <= 0:
            raise ValueError("fps_cap: must be positive")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    grace_s: Duration = Duration(10)
    memory_max: str = "512M"
    watchdog_s: Duration = Duration(30)
    # The unit's DeviceAllow= (agent/service.py): char-NAME groups from /proc/devices
    # or /dev nodes, granted rw; empty gives PrivateDevices=yes.
    devices: tuple[str, ...] = ()
    # Socket families beyond AF_UNIX AF_INET AF_INET6 (libusb needs AF_NETLINK).
    address_families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from agent.service import memory_bytes  # the unit writer's own rule (imports config)

        if self.grace_s < 0 or self.watchdog_s < 0:
            raise ValueError("grace_s and watchdog_s must not be negative")
        try:
            memory_bytes(self.memory_max)
        except ConfigError as exc:
            raise ValueError(f"memory_max: {str(exc).partition(': ')[2]}") from None


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    interval_s: Duration = Duration(30)
    prometheus: str | None = None  # "127.0.0.1:9108": serve /metrics there (agent/prometheus.py)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:  # 0 would publish telemetry in a busy loop
            raise ValueError("interval_s: must be positive")
        if self.prometheus is not None:
            self.prometheus_address  # noqa: B018 - validates "host:port"

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """(host, port) from `prometheus` ("127.0.0.1:9108", "[::1]:9108"), or None when off."""
        if self.prometheus is None:
            return None
        host, sep, port = self.prometheus.rpartition(":")
        bare = host.removeprefix("[").removesuffix("]")
        if not sep or not bare or (":" in bare and bare == host) \
                or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"prometheus: {self.prometheus!r} is not host:port "
                             "(e.g. \"127.0.0.1:9108\" or \"[::1]:9108\"; a port from 1 to 65535)")
        return bare, int(port)


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """Over-the-air model updates (agent/ota): on when trusted public keys are given."""

    keys: tuple[str, ...] = ()  # Ed25519 public keys (PEM) whose signatures count
    threshold: int = 1  # signatures from this many distinct trusted keys
    max_model_bytes: Size = Size(64 * 10**6)
    probation: Duration = Duration(600)  # unless the release's policy names its own
    trial_timeout: Duration = Duration(60)
    ca: str | None = None  # verifies HTTPS locations; default: uplink.ca, else the system's

    def __post_init__(self) -> None:
        if self.keys and not 1 <= self.threshold <= len(self.keys):
            raise ValueError(f"threshold: must lie within 1 and the {len(self.keys)} keys given")
        if self.max_model_bytes <= 0 or self.probation < 0 or self.trial_timeout <= 0:
            raise ValueError("max_model_bytes and trial_timeout must be positive, "
                             "probation not negative")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    """Where fetched and OTA-installed model files live (`Config.models_dir`)."""

    dir: str | None = None  # default: <data_dir>/models; relative: from the config's directory

    def __post_init__(self) -> None:
        if self.dir is not None and not self.dir.strip():
            raise ValueError("dir: must not be empty (leave it out for <data_dir>/models)")


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
        sections[name] = _broker_table(sections.get(name, {}), f"{where}: {name}")
    # The known-table check above keeps `pipelines` and `source` out of `sections`.
    shell = _sections(Config, sections, where)
    pipelines = tuple(
        _pipeline(p, f"{where}: pipeline[{i}]") for i, p in enumerate(pipelines_raw)
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
        return a == b or (a[1] == b[1] and _loopback(a[0]) and _loopback(b[0]))

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
        if cam is None or not _is_file_source(cam):
            return p
        return replace(p, trigger=replace(p.trigger, camera=at(cam)))

    return replace(cfg, device=replace(cfg.device, data_dir=at(cfg.device.data_dir)),
                   local=broker(cfg.local), uplink=broker(cfg.uplink),
                   ota=replace(cfg.ota, keys=tuple(at(k) for k in cfg.ota.keys),
                               ca=maybe(cfg.ota.ca)),
                   models=replace(cfg.models, dir=maybe(cfg.models.dir)),
                   pipelines=tuple(pipeline(p) for p in cfg.pipelines))


def _is_file_source(camera: str) -> bool:
    """A video file, not a device or a stream (those may come and go; files do not)."""
    return not camera.startswith("/dev/") and "://" not in camera


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def preflight(cfg: Config) -> None:
    """What `run` needs from this machine, checked before it starts (and by check-config).

    TLS files that load, models that are known and fetched with the sha256 their
    manifest names (and the labels a step asks for), runtimes that exist, video files
    that exist, OpenCV for a camera. Kept out of `load` so that `fogwhisk outbox` and
    the unit writer work before certificates arrive. A missing model stops `run`
    here with exit 2, which systemd does not restart (RestartPreventExitStatus=2).
    """
    for which in ("local", "uplink"):
        broker: BrokerConfig = getattr(cfg, which)
        if any(urlsplit(u).scheme in ("mqtts", "ssl") for u in broker.urls):
            _check_tls(broker, f"{cfg.source}: {which}")
    detects = []
    for i, p in enumerate(cfg.pipelines):
        where = f"{cfg.source}: pipeline[{i}] ({p.name})"
        cam = p.trigger.camera
        if cam is not None and _is_file_source(cam) and not os.path.isfile(cam):
            raise ConfigError(f"{where}.trigger.camera: no video file {cam}")
        if cam is not None and importlib.util.find_spec("cv2") is None:
            raise ConfigError(f"{where}.trigger.camera: reading a camera needs OpenCV, which "
                              "this install lacks: install fogwhisk[vision] "
                              "(pip install 'fogwhisk[vision]')")
        detects += [(f"{where}.steps[{k}] (detect)", s.params)
                    for k, s in enumerate(p.steps) if s.action == "detect"]
    if detects:
        _check_runtimes(cfg)
    for where, params in detects:
        _check_model(cfg, params.model, params.labels, where)


def _check_tls(broker: BrokerConfig, where: str) -> None:
    """Each file readable, then loaded as `agent.mqtt` loads them, so a bad one names itself."""
    for key in ("ca", "cert", "key"):
        path = getattr(broker, key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{where}.{key}: {path}: cannot read: {exc.strerror}") from None
    try:
        ctx = ssl.create_default_context(cafile=broker.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}.ca: {broker.ca}: not a PEM CA certificate: "
                          f"{exc.reason or exc}") from None
    if broker.cert is None:
        return
    try:
        # An encrypted key would make OpenSSL ask on the terminal; under systemd there is none.
        ctx.load_cert_chain(broker.cert, broker.key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}.cert, {where.rpartition(': ')[2]}.key: {broker.cert} and "
                          f"{broker.key or 'no key'} are not a certificate and its own "
                          f"unencrypted key: {exc.reason or exc}") from None


def _check_runtimes(cfg: Config) -> None:
    from agent.vision import runtimes  # numpy: only for configs that run a model

    unknown = [r for r in cfg.runtime.fallback if r not in runtimes.RUNTIMES]
    if unknown:
        raise ConfigError(f"{cfg.source}: runtime.fallback: unknown runtime {unknown[0]!r} "
                          f"(known: {', '.join(sorted(runtimes.RUNTIMES))})")


def _check_model(cfg: Config, name: str, labels: tuple[str, ...], where: str) -> None:
    """The model `detect` would resolve: same store, same models dir, same sha256 check."""
    from agent.errors import ModelError
    from agent.vision.models import ModelStore

    try:
        ref = ModelStore(models_dir=cfg.models_dir).resolve(name)
    except ModelError as exc:
        raise ConfigError(f"{where}.model: {exc}") from None
    missing = [label for label in labels if label not in ref.manifest.labels]
    if missing:
        raise ConfigError(f"{where}.labels: model {name!r} has no label {missing[0]!r} "
                          f"(it has: {', '.join(ref.manifest.labels)})")


def with_data_dir(cfg: Config, data_dir: str) -> Config:
    return replace(cfg, device=replace(cfg.device, data_dir=data_dir))
