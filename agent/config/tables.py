"""The small tables: [device], [outbox], [runtime], [camera], [service], [telemetry],
[ota] and [models], each a frozen dataclass that checks itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.errors import ConfigError
from agent.mqtt import topics
from agent.schema import Duration, Size


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
