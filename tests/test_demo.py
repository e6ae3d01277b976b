"""`fogwhisk demo`: readings reach the cloud with none lost, its logs stay where it says,
Ctrl-C ends it with a summary, and no process outlives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import demo


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


def start_demo(duration: float, state_home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--duration", str(duration), "--no-camera"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "XDG_STATE_HOME": str(state_home)})


def logs_of(out: str) -> Path:
    """The log directory the demo names at start; it must name the same one in its summary."""
    found = re.findall(r"logs in (\S+)", out)
    assert found, out
    assert re.search(rf"^\s*logs\s+{re.escape(found[0])}$", out, re.MULTILINE), out
    return Path(found[0])


def assert_logs_kept(logs: Path, out: str) -> None:
    assert " ready in " in (logs / "agent.log").read_text(), out
    assert (logs / "edge" / "mosquitto.log").is_file() and \
        (logs / "cloud" / "mosquitto.log").is_file(), out
    assert not (logs / "data").exists(), "the outbox and broker stores are not kept"


def test_the_demo_delivers_every_reading_to_the_cloud_and_exits_0(tmp_path: Path) -> None:
    """Its logs stay in $XDG_STATE_HOME/fogwhisk/demo/<time>, named at start and in the summary."""
    run = start_demo(5, tmp_path)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0, out
    assert re.search(r"lost\s+0\b", out), out
    assert "sensors/rooms/kitchen/temperature" in out and "events/vibration" in out
    logs = logs_of(out)
    assert logs.parent == tmp_path / "fogwhisk" / "demo", out
    assert_logs_kept(logs, out)
    assert processes_mentioning(str(logs)) == []


class Output:
    """The demo's output as it comes, read by a thread (nothing left in a pipe buffer)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout or ()),
                                       daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(list(self.lines))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_demo_prints_a_clean_summary_exits_0_and_leaves_no_process_behind(
        sig: signal.Signals, tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM) once the table shows: what was sent arrives, the summary says
    so, the exit code is 0, the logs are kept and every child is gone. More of the same
    signal once the summary shows (an impatient user) change none of that."""
    run = start_demo(120, tmp_path)
    out = Output(run)
    deadline = time.monotonic() + 30
    while "topic at the cloud" not in out.text():  # the live table: readings flowing
        assert time.monotonic() < deadline and run.poll() is None, out.text()
        time.sleep(0.1)
    logs = Path(re.findall(r"logs in (\S+)", out.text())[0])
    assert processes_mentioning(str(logs)), "the demo's brokers and agent should be running"
    table_end = len(out.text())
    run.send_signal(sig)
    deadline = time.monotonic() + 60
    while "summary" not in out.text()[table_end:]:
        assert time.monotonic() < deadline and run.poll() is None, out.text()
        time.sleep(0.05)
    while run.poll() is None:  # while it prints the summary and stops its children
        assert time.monotonic() < deadline, out.text()
        run.send_signal(sig)
        time.sleep(0.05)
    code = run.wait(60)
    out.thread.join(10)
    text = out.text()
    assert code == 0, text
    summary = text[table_end:]
    assert "summary" in summary and re.search(r"lost\s+0\b", summary), text
    assert logs_of(text) == logs
    assert_logs_kept(logs, text)
    assert processes_mentioning(str(logs)) == [], text


def test_only_the_last_few_runs_keep_their_logs(tmp_path: Path) -> None:
    """A new run's directory is the newest; older ones beyond KEEP_RUNS are deleted."""
    base = tmp_path / "fogwhisk" / "demo"
    old = [base / f"2024010{i}-120000" for i in range(1, 9)]
    for d in old:
        (d / "edge").mkdir(parents=True)
        (d / "agent.log").write_text("old\n")
    (base / "notes.txt").write_text("not a run: left alone\n")
    logs = demo.new_log_dir({"XDG_STATE_HOME": str(tmp_path)})
    assert logs.parent == base and logs.is_dir()
    runs = sorted(p for p in base.iterdir() if p.is_dir())
    assert runs == [*old[-(demo.KEEP_RUNS - 1):], logs]
    assert (base / "notes.txt").is_file()


def test_without_xdg_state_home_the_logs_go_under_the_home_directory(tmp_path: Path) -> None:
    logs = demo.new_log_dir({"HOME": str(tmp_path)})
    assert logs.parent == tmp_path / ".local" / "state" / "fogwhisk" / "demo"
