"""`fogwhisk bench rollout`: `fogwhisk model rollout` over 10,000 simulated devices.

One Mosquitto; tests/bench/fleet_sim.py (a checkout's test tool, not the agent) plays the
fleet on one connection: a retained state document per device id, and each deploy
answered with the reports an agent publishes (downloading ... committed). The rollout
runs as the operator runs it, `python -m agent model rollout ... --json`, in waves of 2,
4, 8, ... until every device committed. Figures, each next to its baseline:

    states received   the 10,000 retained state documents, from SUBSCRIBE to the last
                      one parsed into the rollout's fleet; baseline: a bare paho
                      subscriber receiving the same documents (no parsing)
    peak RSS          of the rollout process; baseline: the bare subscriber holding them
    per wave          decide: from the report that finished a wave's last device to the
                      next wave's push beginning (the decision itself); push: the record
                      before and after plus the deploys, acknowledged by the broker
    judge()           the decision function's cost per call (it reads counters kept as the
                      reports arrive, so it stays flat as the fleet grows)

The release is a real release document with an unsigned block (simulated devices check
nothing; signing needs no broker time), its artifact 64 KiB of random bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.bench.relay import Broker

NAME = "bench-model"
SIM = Path(__file__).resolve().parents[2] / "tests" / "bench" / "fleet_sim.py"

BARE = r"""
import sys, time, threading, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, n = int(sys.argv[1]), int(sys.argv[2])
got, done = {}, threading.Event()
def on(c, u, m):
    got[m.topic] = m.payload
    if len(got) >= n: done.set()
c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.on_message = on
c.connect("127.0.0.1", port); c.loop_start()
t0 = time.perf_counter(); c.subscribe("fog/+/models/%s/state" % sys.argv[3], qos=0)
done.wait(120); t = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(t, len(got), hwm)
"""


def _release(work: Path) -> Path:
    data = os.urandom(64 * 1024)
    (work / f"{NAME}-2.tar").write_bytes(data)
    signed = {"type": "fogwhisk-model-release", "spec": 1, "name": NAME, "version": 2,
              "expires": "2099-01-01T00:00:00Z",
              "artifact": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
              "model": {"sha256": "0" * 64, "inputs": [], "outputs": [],
                        "labels_sha256": "0" * 64}, "policy": {}}
    path = work / f"{NAME}-2.release.json"
    path.write_text(json.dumps({"signed": signed, "signatures": []}))
    return path


class _Peak:
    """The peak RSS of a process (VmHWM), read until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.kib = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.kib = max(self.kib, int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.02)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fogwhisk bench rollout",
                                 description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--devices", type=int, default=10_000, help="simulated devices "
                    "(default 10000)")
    ap.add_argument("--canary", type=int, default=2)
    ap.add_argument("--wave-factor", type=float, default=2.0)
    ap.add_argument("--step-s", type=float, default=0.01,
                    help="the simulated devices' time per state (default 0.01)")
    a = ap.parse_args(argv)
    if not SIM.is_file():
        print(f"fogwhisk bench rollout: needs a checkout ({SIM} is the device simulator)",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="fogwhisk-bench-rollout-"))
    broker = Broker(work, "broker").start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    sim: subprocess.Popen[str] | None = None
    try:
        release = _release(work)
        ids = work / "devices.txt"
        ids.write_text("".join(f"sim-{i:05d}\n" for i in range(a.devices)))
        t0 = time.perf_counter()
        sim = subprocess.Popen([sys.executable, str(SIM), "--broker", url, "--name", NAME,
                                "--count", str(a.devices), "--step-s", str(a.step_s)],
                               stdout=subprocess.PIPE, text=True)
        assert sim.stdout is not None
        if not sim.stdout.readline().startswith("ready"):
            print("fogwhisk bench rollout: the simulator did not start", file=sys.stderr)
            return 1
        threading.Thread(target=sim.stdout.read, daemon=True).start()  # drain its log
        seeded_s = time.perf_counter() - t0
        bare = subprocess.run([sys.executable, "-c", BARE, str(broker.port), str(a.devices),
                               NAME], capture_output=True, text=True, timeout=180,
                              check=True).stdout.split()
        bare_s, bare_n, bare_kib = float(bare[0]), int(bare[1]), int(bare[2])
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "model", "rollout", str(release), "--broker", url,
             "--devices", str(ids), "--canary", str(a.canary), "--wave-factor",
             str(a.wave_factor), "--wave-timeout", "10m", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = _Peak(proc.pid)
        out, err = proc.communicate(timeout=1800)
        total_s = time.perf_counter() - t0
        if proc.returncode != 0 or not out.strip():
            print(f"fogwhisk bench rollout: the rollout failed ({proc.returncode}): {err}",
                  file=sys.stderr)
            return 1
        s: dict[str, Any] = json.loads(out)
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(10)
        broker.stop()
    t = s["timings"]
    print(f"fogwhisk bench rollout: {a.devices:,} simulated devices on one Mosquitto "
          f"(seeded in {seeded_s:.1f} s), waves {', '.join(map(str, s['waves']))}")
    print(f"  {s['status']}: {s['counts']}")
    print(f"  {'':38} {'rollout':>12} {'baseline':>12}")
    print(f"  {'retained state documents received':38} {t['states_loaded_s']:>10.2f} s "
          f"{bare_s:>10.2f} s   (bare paho subscriber, {bare_n:,} documents)")
    print(f"  {'peak RSS':38} {peak.kib / 1024:>8.1f} MiB {bare_kib / 1024:>8.1f} MiB   "
          "(the bare subscriber holding them)")
    print(f"  {'whole rollout':38} {total_s:>10.1f} s")
    j = t["judge_us"]
    print(f"  judge() per call: median {j['median']:.0f} us, max {j['max']:.0f} us over "
          f"{j['calls']:,} calls")
    print(f"  {'wave':>6} {'devices':>8} {'decide ms':>10} {'push ms':>9}")
    for w in t["waves"]:
        decide = "-" if w["decide_ms"] is None else f"{w['decide_ms']:.1f}"
        print(f"  {w['wave']:>6} {w['devices']:>8} {decide:>10} {w['push_ms']:>9.1f}")
    return 0
