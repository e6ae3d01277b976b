"""systemd readiness and watchdog notifications, without a dependency.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named
by `$NOTIFY_SOCKET` (a leading `@` names an abstract socket). Without that
variable, when not started by systemd, every call here is a no-op, so the
agent runs the same way in a terminal, in tests and under `Type=notify`.

The watchdog ping is sent from the event loop itself (`watchdog_loop`), not
from a thread: a loop stuck in blocking code stops pinging and systemd
restarts the service, which is the point of `WatchdogSec=`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

_warned: set[str] = set()  # sockets already complained about


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    if addr.startswith("/"):
        return addr
    return None  # systemd also allows vsock: addresses; the agent never runs under those


def notify(*lines: str) -> bool:
    """Send `KEY=VALUE` lines in one datagram; True when a socket took them.

    Never raises: a full or missing socket must not stop the agent. The first
    failure is logged at WARNING, later ones at DEBUG.
    """
    addr = _address()
    if addr is None or not lines:
        return False
    data = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # called from the event loop; never wait on systemd
            sock.sendto(data, addr)
    except OSError as exc:
        level = logging.DEBUG if addr in _warned else logging.WARNING
        _warned.add(addr)
        log.log(level, "sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _with_status(line: str, status: str | None) -> list[str]:
    return [line] if status is None else [line, f"STATUS={_one_line(status)}"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """READY=1: start-up is done (brokers connected, pipelines running)."""
    return notify(*_with_status("READY=1", status), f"MAINPID={os.getpid()}")


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun; systemd waits up to TimeoutStopSec=."""
    return notify(*_with_status("STOPPING=1", status))


def status(text: str) -> bool:
    """STATUS=...: the one-line state shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """WATCHDOG=1: one keep-alive ping."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for more time to start or stop (a long drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog_interval_s() -> float | None:
    """How often to ping: half of `$WATCHDOG_USEC`, or None without a watchdog.

    `$WATCHDOG_PID`, when set, must be this process: a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


async def watchdog_loop(interval_s: float | None = None) -> None:
    """Ping the watchdog from the event loop until cancelled.

    `interval_s` defaults to `watchdog_interval_s()`. Without a watchdog (or
    without `$NOTIFY_SOCKET`) it returns at once, so it can always be started
    in the agent's TaskGroup.
    """
    interval = interval_s if interval_s is not None else watchdog_interval_s()
    if interval is None or interval <= 0 or _address() is None:
        return
    log.debug("systemd watchdog: pinging every %.1fs", interval)
    while True:
        watchdog()
        await asyncio.sleep(interval)
