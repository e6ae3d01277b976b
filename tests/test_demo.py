"""`fogwhisk demo`: readings reach the cloud with none lost, and no process outlives it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(f"{entry.name}: {cmd}")
    return found


def start_demo(duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--duration", str(duration), "--no-camera"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_demo_delivers_every_reading_to_the_cloud_and_exits_0() -> None:
    demo = start_demo(5)
    out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    assert re.search(r"lost\s+0\b", out), out
    assert "sensors/rooms/kitchen/temperature" in out and "events/vibration" in out
    workdir = re.search(r"logs in (\S+)", out)
    assert workdir is not None, out
    assert processes_mentioning(workdir.group(1)) == []
    assert not Path(workdir.group(1)).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_demo_leaves_no_process_behind(sig: signal.Signals) -> None:
    demo = start_demo(120)
    assert demo.stdout is not None
    line = ""
    deadline = time.monotonic() + 30
    while "logs in" not in line:
        assert time.monotonic() < deadline and demo.poll() is None, line
        line = demo.stdout.readline()
    workdir = line.rsplit("logs in ", 1)[1].strip()
    time.sleep(2)  # sensors running, readings flowing
    assert processes_mentioning(workdir), "the demo's brokers and agent should be running"
    demo.send_signal(sig)
    out, _ = demo.communicate(timeout=60)
    assert "summary" in out, out
    assert processes_mentioning(workdir) == [], out
