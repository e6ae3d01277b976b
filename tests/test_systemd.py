"""sd_notify: the datagrams systemd would see, on a real AF_UNIX socket."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def recv_lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.watchdog() is False
    assert systemd.stopping("bye") is False
    assert systemd.status("x") is False


def test_ready_stopping_and_status_reach_the_socket(notify_socket: socket.socket) -> None:
    assert systemd.ready("2 pipelines\nrunning")
    lines = recv_lines(notify_socket)
    assert lines[0] == "READY=1"
    assert "STATUS=2 pipelines running" in lines
    assert f"MAINPID={os.getpid()}" in lines
    assert systemd.status("draining")
    assert recv_lines(notify_socket) == ["STATUS=draining"]
    assert systemd.stopping()
    assert recv_lines(notify_socket) == ["STOPPING=1"]
    assert systemd.extend_timeout(2.5)
    assert recv_lines(notify_socket) == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_abstract_socket_names_starting_with_at_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"fogwhisk-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.watchdog()
        assert recv_lines(sock) == ["WATCHDOG=1"]


def test_a_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("garbage", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval_s() == expected


def test_watchdog_loop_pings_repeatedly_until_cancelled(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def main() -> None:
        task = asyncio.create_task(systemd.watchdog_loop())
        loop = asyncio.get_running_loop()
        for _ in range(3):
            data = await loop.run_in_executor(None, notify_socket.recv, 4096)
            assert data == b"WATCHDOG=1"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_watchdog_loop_returns_at_once_without_a_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(systemd.watchdog_loop(), 5))
