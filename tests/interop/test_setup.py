"""`scripts/setup --interop` on a machine that has the brokers: quick, and no system node."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from brokers import ROOT

SETUP = ROOT / "scripts" / "setup"


def system_rabbit_processes() -> list[str]:
    """Erlang VMs or epmd run by the `rabbitmq` user: the package's service, not ours."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            uid = int((proc / "status").read_text().split("\nUid:")[1].split()[0])
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
        if comm in ("beam.smp", "epmd") and uid != 0 and state != "Z":
            found.append(f"{proc.name} {comm} uid {uid}")
    return found


def test_setup_interop_again_installs_nothing_and_leaves_no_system_node_running() -> None:
    done = subprocess.run([str(SETUP), "--interop"], capture_output=True, text=True,
                          env={**os.environ, "FOGWHISK_SKIP_FETCH": "1"}, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stderr, done.stderr
    assert system_rabbit_processes() == []


def test_setup_names_an_argument_it_does_not_know() -> None:
    done = subprocess.run([str(SETUP), "--interopp"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert "--interopp" in done.stderr and "--interop" in done.stderr
