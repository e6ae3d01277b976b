"""The systemd unit that runs the agent, rendered from its config and profile.

`scripts/install-service` writes the output to
/etc/systemd/system/fogwhisk.service. Values come from the effective config
(the firmware profile overlaid by the agent file): `MemoryMax=` from
`service.memory_max`, `WatchdogSec=` from `service.watchdog_s`,
`TimeoutStopSec=` from `service.grace_s`, `ReadWritePaths=` from
`device.data_dir` (and `models.dir` when it lies elsewhere), `DeviceAllow=`
from `service.devices` (cameras, the Coral), extra `RestrictAddressFamilies=`
from `service.address_families`.
Everything else is fixed here, so every device runs the same hardening;
`systemd-analyze security` scores it 2.0 or less (tests/test_service_hardening.py).

    python -m agent.service -c /etc/fogwhisk/agent.toml --bin /opt/fogwhisk/.venv/bin/fogwhisk
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.config import Config
from agent.errors import ConfigError

UNIT_NAME = "fogwhisk.service"
DEFAULT_CONFIG = "/etc/fogwhisk/agent.toml"
DEFAULT_USER = "fogwhisk"
STOP_SLACK_S = 10  # past grace_s: time to close connections before SIGKILL
BASE_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6")  # sd_notify; MQTT over IPv4 and IPv6
_MEMORY = re.compile(r"(\d+)([KMGT]?)|(\d{1,3})%|infinity")
# A device group of /proc/devices (fnmatch patterns allowed) or one device node.
_DEVICE = re.compile(r"(char|block)-[A-Za-z0-9_.*?/-]+|/dev/[A-Za-z0-9_./:-]+")
_FAMILY = re.compile(r"AF_[A-Z0-9]+")
_MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_bytes(value: str) -> int | None:
    """Bytes of a systemd `MemoryMax=` value (`768M`); None for `infinity` or a percentage.

    Raises ConfigError for anything systemd would reject, so a bad profile fails
    at install time rather than as a unit that ignores its memory limit.
    """
    m = _MEMORY.fullmatch(value.strip())
    if m is None:
        raise ConfigError(
            f"service.memory_max: {value!r} is not a systemd size (768M, 2G, 50%, infinity)"
        )
    if m.group(1) is None:
        if m.group(3) is not None and not 0 < int(m.group(3)) <= 100:
            raise ConfigError(f"service.memory_max: {value!r}: a percentage is 1..100")
        return None
    return int(m.group(1)) * _MEMORY_UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class UnitOptions:
    """What the config does not know: where things are installed on this machine."""

    exec_path: str  # the venv's `fogwhisk` console script, absolute
    config_path: str = DEFAULT_CONFIG
    user: str = DEFAULT_USER
    group: str = DEFAULT_USER
    restart_s: int = 5

    def __post_init__(self) -> None:
        for name in ("exec_path", "config_path"):
            path = getattr(self, name)
            if not PurePosixPath(path).is_absolute() or any(c in path for c in " \n\"'\\"):
                raise ValueError(f"{name} must be an absolute path without spaces or quotes")
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", self.user):
            raise ValueError(f"user {self.user!r} is not a valid system user name")


def _seconds(value: float) -> str:
    return f"{max(1, math.ceil(value))}s"


def _device_lines(cfg: Config) -> list[str]:
    """PrivateDevices= or DevicePolicy=closed plus DeviceAllow=, with the reason in the unit."""
    for dev in cfg.service.devices:
        if not _DEVICE.fullmatch(dev):
            raise ConfigError(
                f"{cfg.source}: service.devices: {dev!r} is neither a device group "
                "(char-video4linux, block-loop; see /proc/devices) nor one /dev node "
                "(/dev/apex_0); for every camera use char-video4linux")
    if not cfg.service.devices:
        for p in cfg.pipelines:
            if p.trigger.camera is not None and p.trigger.camera.startswith("/dev/"):
                raise ConfigError(
                    f"{cfg.source}: service.devices is empty, so the unit hides /dev and "
                    f"pipeline {p.name!r} could not open {p.trigger.camera}: "
                    "add devices = [\"char-video4linux\"] to [service]")
        return ["# No devices named in service.devices: a private /dev with only null, zero,",
                "# random and the like.",
                "PrivateDevices=yes"]
    return [
        "# Devices: PrivateDevices=yes would mount a private /dev holding only pseudo",
        "# devices (null, zero, random...); DeviceAllow= cannot bring /dev/video0 back",
        "# into it. So the real /dev stays visible and the device cgroup admits only",
        "# the groups below (plus the pseudo devices); file modes (groups video,",
        "# plugdev) still apply. DevicePolicy=closed is explicit: before systemd 253,",
        "# ProtectClock=yes alone implies DeviceAllow=char-rtc r, which would shut",
        "# every camera out. A char- group is looked up in /proc/devices when the",
        "# service starts: if no camera driver was loaded then, restart it after",
        "# plugging the first camera in.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
        *(f"DeviceAllow={dev} rw" for dev in cfg.service.devices),
    ]


def _families(cfg: Config) -> str:
    for family in cfg.service.address_families:
        if not _FAMILY.fullmatch(family):
            raise ConfigError(f"{cfg.source}: service.address_families: {family!r} is not a "
                              "socket family name such as AF_NETLINK")
    return " ".join(dict.fromkeys((*BASE_FAMILIES, *cfg.service.address_families)))


def render_unit(cfg: Config, opts: UnitOptions) -> str:
    """The text of fogwhisk.service for this config."""
    memory_bytes(cfg.service.memory_max)  # validate
    data_dir = str(PurePosixPath(cfg.device.data_dir))
    if not PurePosixPath(data_dir).is_absolute() or " " in data_dir:
        raise ConfigError(f"{cfg.source}: device.data_dir must be an absolute path without spaces")
    writable = [data_dir]
    models_dir = PurePosixPath(cfg.models_dir)
    if not models_dir.is_relative_to(data_dir):  # OTA installs model versions there
        if not models_dir.is_absolute() or " " in str(models_dir):
            raise ConfigError(f"{cfg.source}: models.dir must be an absolute path without "
                              "spaces")
        writable.append(str(models_dir))
    stop_s = float(cfg.service.grace_s) + STOP_SLACK_S
    lines = [
        "# Generated by `python -m agent.service` (scripts/install-service); edit the",
        "# config or the firmware profile and re-run rather than editing this file.",
        "[Unit]",
        f"Description=fogwhisk MQTT edge agent ({cfg.device.id})",
        "Wants=network-online.target",
        "After=network-online.target mosquitto.service",
        # Give up after 10 failed starts in 5 minutes instead of looping forever.
        "StartLimitIntervalSec=300",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        # Only the agent's own process may send READY/WATCHDOG (not OTA trial children).
        "NotifyAccess=main",
        f"ExecStart={opts.exec_path} run -c {opts.config_path}",
        f"User={opts.user}",
        f"Group={opts.group}",
        "Restart=on-failure",
        f"RestartSec={opts.restart_s}s",
        # Exit 2 is a bad config: restarting cannot fix it.
        "RestartPreventExitStatus=2",
        f"WatchdogSec={_seconds(float(cfg.service.watchdog_s))}",
        # Loading models and checking the outbox can be slow on a Pi Zero's SD card.
        "TimeoutStartSec=120s",
        # SIGTERM drains within grace_s; then a little slack before SIGKILL.
        f"TimeoutStopSec={_seconds(stop_s)}",
        "KillMode=mixed",
        f"MemoryMax={cfg.service.memory_max}",
        "Environment=PYTHONUNBUFFERED=1",
        "UMask=0027",
        "LimitNOFILE=65536",
        # Hardening: the agent writes only its data dir and needs the network.
        "ProtectSystem=strict",
        f"ReadWritePaths={' '.join(writable)}",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        *_device_lines(cfg),
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "# The agent reads only its own /proc/<pid> (RSS for telemetry). Not ProcSubset=pid:",
        "# it hides /proc/cpuinfo, without which LiteRT gets no XNNPACK delegate and runs",
        "# its reference kernels (about 100x slower on the test models).",
        "ProtectProc=invisible",
        "# @system-service holds every call the agent makes (Python, SQLite, LiteRT,",
        "# OpenCV; V4L2 and usbfs are ioctls) and keeps @resources: numpy's OpenBLAS",
        "# calls mbind(). A call outside it fails with EPERM rather than killing the agent.",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        f"RestrictAddressFamilies={_families(cfg)}",
        # No MemoryDenyWriteExecute=: XNNPACK and other runtimes generate code at run time.
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the unit for a config file; exit 2 on a bad config."""
    from agent import config

    ap = argparse.ArgumentParser(prog="python -m agent.service", description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help=f"the agent's config file (default: {DEFAULT_CONFIG})")
    ap.add_argument("--bin", required=True, help="absolute path of the fogwhisk console script")
    ap.add_argument("--user", default=DEFAULT_USER,
                    help=f"the system user the service runs as (default: {DEFAULT_USER})")
    args = ap.parse_args(argv)
    try:
        cfg = config.load(args.config)
        opts = UnitOptions(exec_path=args.bin, config_path=str(Path(args.config).resolve()),
                           user=args.user, group=args.user)
        sys.stdout.write(render_unit(cfg, opts))
    except (ConfigError, ValueError) as exc:
        print(f"fogwhisk service: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
