"""Fleet smoke test: one `fogwhisk model push` to five real agents on this machine; all
commit the new version and `fogwhisk model status` shows each of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent_proc import AgentProcess
from brokers import ROOT, Broker
from candidates import catalog_dir
from device import NAME, Watch, pack, start_device
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy

DEVICES = [f"cam-{i}" for i in range(5)]


def test_one_push_reaches_five_agents_and_status_shows_them_committed(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    agents: list[AgentProcess] = []
    try:
        for d in DEVICES:
            (tmp_path / d).mkdir()
            agents.append(start_device(tmp_path / d, broker, ota_keys.pub_path, device=d))
        _, release_json = pack(catalog_dir(), 2, tmp_path / "out", ota_keys.private,
                               policy=Policy(probation_s=1.0))
        cmd = [sys.executable, "-m", "agent", "model", "push", str(release_json),
               "--broker", broker.url]
        for d in DEVICES:
            cmd += ["--device", d]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        pushed = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                                check=False)
        assert pushed.returncode == 0, pushed.stderr
        for d, agent in zip(DEVICES, agents, strict=True):
            with Watch(broker.url, device=d) as watch:
                watch.state(2, "committed", agent)
        shown = subprocess.run([sys.executable, "-m", "agent", "model", "status", "--broker",
                                broker.url, "--name", NAME, "--json"], capture_output=True,
                               text=True, timeout=60, env=env, check=False)
        table = subprocess.run([sys.executable, "-m", "agent", "model", "status", "--broker",
                                broker.url], capture_output=True, text=True, timeout=60,
                               env=env, check=False)
    finally:
        for agent in agents:
            agent.stop()
    assert shown.returncode == 0, shown.stderr
    docs = {d["device"]: d for d in json.loads(shown.stdout)}
    assert sorted(docs) == DEVICES
    for d in DEVICES:
        assert docs[d]["active"]["version"] == 2 and docs[d]["update"]["state"] == "committed"
    rows = [ln for ln in table.stdout.splitlines() if "committed" in ln]
    assert sorted(ln.split()[0] for ln in rows) == DEVICES, table.stdout
