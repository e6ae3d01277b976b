"""`fogwhisk bench vision`: detection throughput and the motion gate, with baselines.

One run, same frames (vtest.avi as JPEG) and the same model:
  (a) a bare loop: imdecode + resize + invoke + decode outputs;
  (b) the agent end to end: frames in over MQTT (local Mosquitto), events
      out at the uplink Mosquitto; its fps over (a)'s (the bar is 0.9);
  (c) the agent's RSS on the rpi-zero2w profile, peak (VmHWM) and steady
      (VmRSS), next to the 120 MiB bar: idle with a relay pipeline only; idle
      with the relay and a camera pipeline (decode, motion, detect, track,
      publish); that pipeline taking frames from a camera at 10 fps; and taking
      all the JPEG frames at once, as fast as the broker hands them over;
  the motion gate's ms per frame at 640x480 and 1280x720 next to OpenCV's
  MOG2 on the same frames, and the share of vtest.avi frames it spares
  from inference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import RuntimeConfig
from agent.mqtt.connection import free_port
from agent.vision.detector import Detector
from agent.vision.models import ModelStore, samples_dir
from agent.vision.motion import MotionDetector, MotionSettings


def load_frames(limit: int) -> list[np.ndarray]:
    path = samples_dir() / "vtest.avi"
    if not path.is_file():
        raise SystemExit(f"bench vision: {path} is missing: run scripts/fetch-samples")
    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    while len(frames) < limit:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def bare_loop(det: Detector, jpegs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for data in jpegs:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        tensor, _ = det.prepare(img)
        det.decode(det.invoke_tensor(tensor))
    return len(jpegs) / (time.perf_counter() - t0)


def motion_ms(frames: list[np.ndarray], size: tuple[int, int]) -> tuple[float, float]:
    scaled = [cv2.resize(f, size) for f in frames]
    gate = MotionDetector(MotionSettings())
    gate.detect(scaled[0])
    t0 = time.perf_counter()
    for f in scaled:
        gate.detect(f)
    ours = (time.perf_counter() - t0) * 1000.0 / len(scaled)
    mog = cv2.createBackgroundSubtractorMOG2()
    t0 = time.perf_counter()
    for f in scaled:
        mog.apply(f)
    return ours, (time.perf_counter() - t0) * 1000.0 / len(scaled)


def spared(frames: list[np.ndarray]) -> float:
    gate = MotionDetector(MotionSettings())
    return sum(1 for f in frames if not gate.detect(f)) / len(frames)




def start_broker(workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "set_tcp_nodelay true\nmax_queued_messages 100000\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto {name} did not start")


CAMERA_STEPS = """[
  { action = "decode" },
  { action = "motion", threshold = 30, min_area = 10 },
  { action = "detect", model = "MODEL", min_score = 0.4 },
  { action = "track", min_score = 0.4, timeout_s = "3s" },
  { action = "publish" },
]"""
RELAY = """
[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{ action = "forward" }]
"""
MEMORY_BAR_MIB = 120  # the rpi-zero2w profile's unit has 192M, the broker needs its share


def write_config(work: Path, lport: int, uport: int, threads: int, pipelines: str,
                 pi: bool = False) -> Path:
    """The agent's config; `pi`: on the rpi-zero2w profile (its 192M unit), inference
    threads still `threads`."""
    cfg = work / "agent.toml"
    profile = 'profile = "rpi-zero2w"' if pi else ""
    cfg.write_text(f"""
[device]
id = "bench"
{profile}
data_dir = "{work / 'data'}"
[outbox]
min_free_bytes = "1MB"
[local]
url = "mqtt://127.0.0.1:{lport}"
[uplink]
url = "mqtt://127.0.0.1:{uport}"
[runtime]
num_threads = {threads}
[telemetry]
interval_s = "1s"
{pipelines}
""")
    return cfg


def start_agent(work: Path, cfg: Path) -> subprocess.Popen[bytes]:
    log = open(work / "agent.log", "ab")  # noqa: SIM115 - the child owns it
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                             stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return agent


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    try:
        agent.wait(15)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def wait_ready(agent: subprocess.Popen[bytes], work: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while " ready in " not in (work / "agent.log").read_text(errors="replace"):
        if agent.poll() is not None or time.monotonic() > deadline:
            err = (work / "agent.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the agent did not get ready: {err}")
        time.sleep(0.05)


def vm_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def mqtt_client(port: int) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def reset_peak(pid: int) -> None:
    """Start VmHWM over from the current RSS (proc(5): clear_refs, 5), to measure a phase."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class _Finished:
    """Frames the camera pipeline finished, from the agent's telemetry (1 s)."""

    def __init__(self, port: int) -> None:
        self.n = 0
        self.changed = threading.Condition()
        self.client = mqtt_client(port)
        self.client.on_message = self.on_message
        self.client.subscribe("fog/bench/telemetry", qos=0)

    def on_message(self, c: Any, u: Any, m: Any) -> None:
        cam = json.loads(m.payload).get("pipelines", {}).get("camera", {})
        with self.changed:
            self.n = int(cam.get("latency_ms", {}).get("total", {}).get("n", 0))
            self.changed.notify_all()

    def wait(self, n: int, timeout_s: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.n >= n, timeout_s):
                raise RuntimeError(f"the agent finished {self.n} of {n} frames")


def memory(model: str, jpegs: list[bytes], threads: int, settle_s: float = 2.0,
           paced: int = 60, fps: float = 10.0,
           timeout_s: float = 300.0) -> list[tuple[str, dict[str, int]]]:
    """RSS of the agent process (rpi-zero2w profile): relay only, idle; relay + camera
    pipeline, idle; then the peak while it takes `paced` frames from a camera at `fps`;
    then the peak while it takes all `jpegs` as fast as the broker takes them (QoS 1).
    Each running row: the phase's VmHWM, and VmRSS `settle_s` after its last frame."""
    rows: list[tuple[str, dict[str, int]]] = []
    camera = (f'[[pipeline]]\nname = "camera"\ntrigger = "cameras/+/jpeg"\n'
              f"steps = {CAMERA_STEPS.replace('MODEL', model)}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local, lport = start_broker(work, "local")
        uplink, uport = start_broker(work, "uplink")
        try:
            agent = start_agent(work, write_config(work, lport, uport, threads, RELAY, True))
            try:
                wait_ready(agent, work)
                time.sleep(settle_s)
                rows.append(("agent idle, relay only", vm_kib(agent.pid)))
            finally:
                stop_agent(agent)
            agent = start_agent(work, write_config(work, lport, uport, threads,
                                                   RELAY + camera, True))
            try:
                wait_ready(agent, work)
                time.sleep(settle_s)
                rows.append(("relay + camera pipeline, idle", vm_kib(agent.pid)))
                finished = _Finished(uport)
                pub = mqtt_client(lport)
                try:
                    phases = ((f"camera pipeline, {min(paced, len(jpegs))} frames at "
                               f"{fps:g} fps", jpegs[:paced], fps),
                              (f"camera pipeline, {len(jpegs)} frames at full rate",
                               jpegs, 0.0))
                    for label, frames, rate in phases:
                        reset_peak(agent.pid)
                        base = finished.n
                        start = time.monotonic()
                        for i, data in enumerate(frames):
                            if rate:
                                time.sleep(max(0.0, start + i / rate - time.monotonic()))
                            pub.publish("cameras/bench/jpeg", data, qos=1)
                        finished.wait(base + len(frames), timeout_s)
                        peak = vm_kib(agent.pid)["VmHWM"]
                        time.sleep(settle_s)
                        rows.append((label, {"VmHWM": peak,
                                             "VmRSS": vm_kib(agent.pid)["VmRSS"]}))
                finally:
                    pub.loop_stop()
                    finished.client.loop_stop()
            finally:
                stop_agent(agent)
        finally:
            for proc in (local, uplink):
                proc.terminate()
                proc.wait(10)
    return rows


def agent_e2e(model: str, jpegs: list[bytes], threads: int, timeout_s: float) -> float:
    """Frames per second through the agent, publish of the first to event of the last."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local, lport = start_broker(work, "local")
        uplink, uport = start_broker(work, "uplink")
        agent = start_agent(work, write_config(work, lport, uport, threads, f"""
[[pipeline]]
name = "bench"
trigger = "cameras/bench/jpeg"
steps = [
  {{ action = "decode" }},
  {{ action = "detect", model = "{model}", crops = "frame", pass_empty = true, min_score = 0.0 }},
  {{ action = "publish" }},
]
"""))
        got = threading.Event()
        count = [0]
        last = [0.0]

        def on_message(c: Any, u: Any, m: Any) -> None:
            count[0] += 1
            last[0] = time.perf_counter()
            if count[0] >= len(jpegs):
                got.set()

        sub = mqtt_client(uport)
        sub.on_message = on_message
        sub.subscribe("fog/bench/events/#", qos=1)
        pub = mqtt_client(lport)
        try:
            # warm up: the agent has subscribed and loaded the model once one event arrives
            deadline = time.monotonic() + 30
            while count[0] == 0 and time.monotonic() < deadline:
                pub.publish("cameras/bench/jpeg", jpegs[0], qos=1)
                time.sleep(0.5)
            if count[0] == 0:
                err = (work / "agent.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the agent produced no event: {err}")
            time.sleep(1.0)
            count[0] = 0
            t0 = time.perf_counter()
            for data in jpegs:
                pub.publish("cameras/bench/jpeg", data, qos=1)
            got.wait(timeout_s)
            n = count[0]
            return n / (last[0] - t0) if n else 0.0
        finally:
            pub.loop_stop()
            sub.loop_stop()
            stop_agent(agent)
            for proc in (local, uplink):
                proc.terminate()
                proc.wait(10)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fogwhisk bench vision")
    ap.add_argument("--model", default="person")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-agent", action="store_true", help="skip (b), the end-to-end run")
    ap.add_argument("--no-memory", action="store_true", help="skip (c), the RSS table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    frames = load_frames(args.frames)
    jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
             for f in frames]
    memory_results: dict[str, Any] = {}
    if not args.no_memory:  # first: LiteRT pages this process maps stay resident in the agent
        try:
            memory_results["memory_kib"] = {
                label: vm for label, vm in memory(args.model, jpegs, args.threads)}
        except Exception as exc:
            memory_results["memory_error"] = str(exc)
    det = Detector(ModelStore().resolve(args.model), RuntimeConfig(num_threads=args.threads))
    bare_loop(det, jpegs[:10])  # warm-up
    bare = bare_loop(det, jpegs)
    results: dict[str, Any] = {"model": args.model, "frames": len(jpegs),
                               "threads": args.threads, "bare_fps": round(bare, 1),
                               **memory_results}
    if not args.no_agent:
        try:
            e2e = agent_e2e(args.model, jpegs, args.threads, timeout_s=120)
            results["agent_fps"] = round(e2e, 1)
            results["ratio"] = round(e2e / bare, 3) if bare else 0.0
        except Exception as exc:  # report, do not hide the rest of the figures
            results["agent_error"] = str(exc)
    all_frames = load_frames(10_000)
    for w, h in ((640, 480), (1280, 720)):
        ours, mog = motion_ms(all_frames[:200], (w, h))
        results[f"motion_ms_{w}x{h}"] = round(ours, 3)
        results[f"mog2_ms_{w}x{h}"] = round(mog, 2)
    results["vtest_spared_share"] = round(spared(all_frames), 3)
    if args.json:
        print(json.dumps(results))
        return 0
    rows = [
        ("bare loop (decode+resize+invoke+decode)", f"{results['bare_fps']} fps", "baseline"),
        ("agent end to end (MQTT in, events up)", f"{results.get('agent_fps', 'n/a')} fps",
         f"ratio {results.get('ratio', results.get('agent_error', 'n/a'))} (bar >= 0.9)"),
    ]
    for w, h in ((640, 480), (1280, 720)):
        rows.append((f"motion gate {w}x{h}", f"{results[f'motion_ms_{w}x{h}']} ms/frame",
                     f"MOG2 {results[f'mog2_ms_{w}x{h}']} ms/frame"))
    rows.append(("vtest.avi frames spared from inference",
                 f"{results['vtest_spared_share'] * 100:.1f} %", f"of {len(all_frames)}"))
    print(f"bench vision: model {args.model}, {len(jpegs)} frames 768x576 JPEG, "
          f"{args.threads} thread(s), pid {os.getpid()}")
    for name, value, base in rows:
        print(f"  {name:<44} {value:>16}   {base}")
    if "memory_kib" in results or "memory_error" in results:
        print(f"agent RSS (MiB), rpi-zero2w profile, {args.threads} inference thread(s); "
              f"bar {MEMORY_BAR_MIB} MiB peak")
        print(f"  {'configuration':<44} {'peak VmHWM':>12} {'steady VmRSS':>13}")
        for label, vm in results.get("memory_kib", {}).items():
            hwm, rss = vm["VmHWM"] / 1024, vm["VmRSS"] / 1024
            mark = "ok" if hwm <= MEMORY_BAR_MIB else "ABOVE the bar"
            print(f"  {label:<44} {hwm:>12.1f} {rss:>13.1f}   {mark}")
        if "memory_error" in results:
            print(f"  memory: {results['memory_error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
