"""`fogwhisk demo`: the whole path on one machine, watched live.

    sensors (paho) --QoS1--> edge Mosquitto --> agent --QoS1--> cloud Mosquitto --> table

Two Mosquitto brokers from `broker-config/edge.conf` and `cloud.conf`
(rewritten to free ports and a temporary directory), the agent as a child
process with a demo config, simulated sensors at realistic rates (three
rooms' temperature every second, a pump's vibration at 50 Hz, a power
meter), and optionally the replayed lobby camera. At the end: what was sent,
what reached the cloud, what was lost (0 expected). Every child runs in its
own process group and dies with the demo, also on Ctrl-C or SIGTERM; Ctrl-C
still lets what was sent arrive and prints the summary (exit 0 when nothing
was lost).

Logs and configs stay in `$XDG_STATE_HOME/fogwhisk/demo/<time>` (default
`~/.local/state/...`), the last `KEEP_RUNS` runs; the outbox and the brokers'
stores live in its `data/` and are deleted at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent import resources
from agent.mqtt.connection import free_port
from agent.vision.models import samples_dir

DEVICE = "demo-gw"
ROOMS = ("kitchen", "office", "lab")
VIBRATION_HZ = 50.0
START_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 15.0
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CONF_DIR = resources.path("broker-config")
PR_SET_PDEATHSIG = 1
KEEP_RUNS = 5  # log directories kept, this run's included
RUN_NAME = re.compile(r"\d{8}-\d{6}(-\d+)?")  # what new_log_dir makes, and all prune touches

PIPELINES = """
[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{ action = "forward" }]

[[pipeline]]
name = "vibration"
trigger = "machines/+/vibration"
steps = [
  { action = "window", seconds = "1s", fields = ["rms"], agg = ["mean", "max", "count"] },
  { action = "publish" },
]
"""


class Interrupted(Exception):
    """Raised by the SIGTERM handler so that every `finally` runs, as for Ctrl-C."""


def _die_with_parent() -> None:
    """In the child, before exec: its own process group, and SIGKILL when the demo dies."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)




def new_log_dir(env: Mapping[str, str] = os.environ) -> Path:
    """A new run's directory under $XDG_STATE_HOME/fogwhisk/demo; older runs beyond KEEP_RUNS go.

    State, not cache (the XDG spec: logs a user may want after the fact), and
    bounded so that repeated demos do not fill a Pi's SD card.
    """
    state = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the spec says to ignore a relative path
        state = os.path.join(env.get("HOME") or str(Path.home()), ".local", "state")
    base = Path(state) / "fogwhisk" / "demo"
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run.mkdir()
            break
        except FileExistsError:  # another demo in the same second
            continue
    runs = sorted(p for p in base.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name))
    for old in runs[:-KEEP_RUNS]:
        if old != run:
            shutil.rmtree(old, ignore_errors=True)
    return run


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.3):
        return True
    return False


class Child:
    """A child process in its own process group, stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509 - setpgid + PDEATHSIG only

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def broker_conf(shipped: Path, port: int, data_dir: Path) -> str:
    """A shipped broker config on `port`, its store in `data_dir`, its log on stderr."""
    out = [f"# {shipped.name}, rewritten by fogwhisk demo"]
    for line in shipped.read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
        if key == "user":
            # Started as root Mosquitto switches users and then cannot write our data dir.
            if os.geteuid() == 0:
                out.append("user root")
            continue
        if key == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif key == "persistence_location":
            out.append(f"persistence_location {data_dir}/")
        elif key == "log_dest":
            out.append("log_dest stderr")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def start_broker(name: str, workdir: Path, data_dir: Path) -> tuple[Child, int]:
    """Mosquitto with its config and log in `workdir`, its store in `data_dir`."""
    workdir.mkdir(parents=True)
    data_dir.mkdir(parents=True)
    for _ in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(broker_conf(CONF_DIR / f"{name}.conf", port, data_dir))
        child = Child(f"{name} broker", [MOSQUITTO, "-c", str(conf)], workdir / "mosquitto.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while child.alive and time.monotonic() < deadline and not _port_open(port):
            time.sleep(0.05)
        if child.alive and _port_open(port):
            return child, port
        child.stop()
    raise RuntimeError(f"the {name} broker did not start:\n{child.tail()}")


def agent_config(data_dir: Path, edge_port: int, cloud_port: int, camera: bool) -> str:
    text = f"""
[device]
id = "{DEVICE}"
data_dir = "{data_dir}"

[local]
url = "mqtt://127.0.0.1:{edge_port}"

[uplink]
url = "mqtt://127.0.0.1:{cloud_port}"

[service]
grace_s = "5s"

[telemetry]
interval_s = "2s"
{PIPELINES}"""
    if camera:
        cam = (Path(__file__).parent / "demo_camera.toml").read_text()
        text += cam.replace("{samples}", str(samples_dir()))
    return text


@dataclass
class TopicStats:
    count: int = 0
    last: str = ""
    times: deque[float] = field(default_factory=lambda: deque(maxlen=400))


class Cloud:
    """What reaches the cloud broker, per topic; thread-safe (paho's thread writes)."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.topics: dict[str, TopicStats] = {}
        self.events: deque[str] = deque(maxlen=5)
        self.n_events = 0
        self.vibration_n = 0
        self.status = "?"
        self.started = time.monotonic()
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fogwhisk-demo-cloud",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, c: paho.Client, u: Any, f: Any, rc: Any, p: Any = None) -> None:
        c.subscribe(f"fog/{DEVICE}/#", qos=1)

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        short = msg.topic.removeprefix(f"fog/{DEVICE}/")
        now = time.monotonic()
        with self.lock:
            st = self.topics.setdefault(short, TopicStats())
            st.count += 1
            st.times.append(now)
            st.last = self._describe(short, bytes(msg.payload))

    def _describe(self, short: str, payload: bytes) -> str:
        """A short text for the last-value column; events and status are remembered too."""
        try:
            doc = json.loads(payload)
        except ValueError:
            return payload[:30].hex()
        if short == "status" and isinstance(doc, dict):
            self.status = str(doc.get("state"))
            return self.status
        if short == "telemetry" and isinstance(doc, dict):
            return f"rss {doc.get('rss_bytes', 0) / 1e6:.0f} MB"
        if short.startswith("events/") and isinstance(doc, dict):
            if short == "events/vibration":
                self.vibration_n += int(doc.get("n", 0))
                rms = doc.get("rms", {})
                return f"rms mean {rms.get('mean', 0):.2f} max {rms.get('max', 0):.2f}"
            self.n_events += 1
            dets = doc.get("detections") or ([doc["detection"]] if "detection" in doc else [])
            what = ", ".join(f"{d.get('label')} {d.get('score', 0):.2f}" for d in dets
                             if isinstance(d, dict)) or str(doc.get("type", "event"))
            self.events.append(f"{short[7:]}: {doc.get('type', '')} {what}".strip())
            return what[:40]
        if isinstance(doc, dict):
            return ", ".join(f"{k}={v}" for k, v in list(doc.items())[:3])[:40]
        return str(doc)[:40]

    def received(self, prefix: str) -> int:
        with self.lock:
            return sum(s.count for t, s in self.topics.items() if t.startswith(prefix))

    def table(self, sent: int, elapsed: float, duration: float) -> str:
        now = time.monotonic()
        lines = [f"fogwhisk demo  {elapsed:5.1f}/{duration:.0f} s   agent {self.status}   "
                 f"sensor messages acked by the edge broker: {sent}", "",
                 f"{'topic at the cloud (fog/' + DEVICE + '/...)':<44} {'count':>7} "
                 f"{'rate/s':>7}  last"]
        with self.lock:
            for topic in sorted(self.topics):
                st = self.topics[topic]
                recent = [t for t in st.times if now - t <= 5.0]
                rate = len(recent) / min(5.0, max(elapsed, 1e-3))
                lines.append(f"{topic[:44]:<44} {st.count:>7} {rate:>7.1f}  {st.last}")
            if self.events:
                lines += ["", f"camera events ({self.n_events}):", *(f"  {e}" for e in
                                                                     self.events)]
        return "\n".join(lines)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Sensors:
    """Temperature (3 rooms, 1 Hz), pump vibration (50 Hz), a power meter (1 Hz), QoS1."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fogwhisk-demo-sensors",
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.lock = threading.Lock()
        self.acked_relay = 0
        self.acked_vibration = 0
        self._kinds: dict[int, str] = {}
        self._early: set[int] = set()
        self._stop = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, name="sensors", daemon=True)

    @property
    def acked(self) -> int:
        return self.acked_relay + self.acked_vibration

    def _on_publish(self, c: paho.Client, u: Any, mid: int, rc: Any, p: Any = None) -> None:
        with self.lock:
            kind = self._kinds.pop(mid, None)
            if kind is None:  # acknowledged before publish() returned: count it there
                self._early.add(mid)
            else:
                self._count(kind)

    def _count(self, kind: str) -> None:
        if kind == "vibration":
            self.acked_vibration += 1
        else:
            self.acked_relay += 1

    def _publish(self, topic: str, doc: dict[str, Any], kind: str) -> None:
        # Not under self.lock: paho's network thread holds its own lock while it calls
        # on_publish, which takes ours; publish() waits for paho's lock (a deadlock).
        info = self.client.publish(topic, json.dumps(doc, separators=(",", ":")), qos=1)
        with self.lock:
            if info.mid in self._early:
                self._early.remove(info.mid)
                self._count(kind)
            else:
                self._kinds[info.mid] = kind

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(7)
        temps = {room: 20.0 + i for i, room in enumerate(ROOMS)}
        t0 = time.monotonic()
        tick = 0
        step = 1.0 / VIBRATION_HZ
        while not self._stop.is_set():
            now = time.time()
            t = tick * step
            rms = 0.4 + 0.1 * math.sin(t * 0.7) + rng.gauss(0, 0.02) + (1.5 if tick % 500 < 25
                                                                         else 0.0)
            self._publish("machines/pump1/vibration", {"ts": round(now, 3), "rms": round(rms, 4)},
                          "vibration")
            if tick % int(VIBRATION_HZ) == 0:
                for room in ROOMS:
                    temps[room] += rng.gauss(0, 0.05)
                    self._publish(f"sensors/rooms/{room}/temperature",
                                  {"ts": round(now, 3), "c": round(temps[room], 2)}, "relay")
                watts = 1200 + 300 * math.sin(t / 10) + rng.gauss(0, 20)
                self._publish("sensors/meters/main/power",
                              {"ts": round(now, 3), "w": round(watts, 1)}, "relay")
            tick += 1
            self._stop.wait(max(0.0, t0 + tick * step - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(5)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until every publish was acknowledged by the edge broker."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self._kinds:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_ready(agent: Child) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while " ready in " not in agent.tail(200):
        if not agent.alive:
            raise RuntimeError(f"the agent exited with {agent.proc.returncode}:\n{agent.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent was not ready in {START_TIMEOUT_S:.0f} s:\n"
                               f"{agent.tail()}")
        time.sleep(0.05)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def _hold_signals() -> None:
    """From the summary on, the demo only finishes: Ctrl-C and SIGTERM are ignored.

    A late Ctrl-C would otherwise turn a clean run into a failure, or cut the
    children's stop short. That stop is bounded (each child 10 s, then SIGKILL),
    and `main` is the process's last act, so the handlers are not restored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(duration_s: float = 30.0, camera: bool = True) -> int:
    """Run the tour for `duration_s` (or until Ctrl-C); 0 when everything sent arrived."""
    tty = sys.stdout.isatty()
    try:
        logs = new_log_dir()
        kept = f"the last {KEEP_RUNS} runs are kept"
    except OSError as exc:  # no writable home (a service user): the logs go with the run
        logs = Path(tempfile.mkdtemp(prefix="fogwhisk-demo-"))
        kept = f"not kept after a clean run: no state directory ({exc.strerror})"
    data = logs / "data"
    print(f"fogwhisk demo: logs in {logs} ({kept})", flush=True)
    children: list[Child] = []
    clients: list[Sensors | Cloud] = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    ok = False
    interrupted = False
    try:
        if not Path(MOSQUITTO).exists():
            print("fogwhisk demo: mosquitto is not installed (run scripts/setup)",
                  file=sys.stderr)
            return 1
        edge, edge_port = start_broker("edge", logs / "edge", data / "edge")
        children.append(edge)
        cloud_broker, cloud_port = start_broker("cloud", logs / "cloud", data / "cloud")
        children.append(cloud_broker)
        with_camera = camera and (samples_dir() / "vtest.avi").is_file()
        if camera and not with_camera:
            print(f"(no camera: {samples_dir() / 'vtest.avi'} is missing; "
                  "scripts/fetch-samples fetches it)")
        cfg = logs / "agent.toml"
        cfg.write_text(agent_config(data / "agent", edge_port, cloud_port, with_camera))
        cloud = Cloud(cloud_port)
        clients.append(cloud)
        if not cloud.ready.wait(START_TIMEOUT_S):
            raise RuntimeError("no subscription at the cloud broker")
        agent = Child("agent", [sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                      logs / "agent.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        children.append(agent)
        print(f"edge broker :{edge_port}, cloud broker :{cloud_port}, agent pid "
              f"{agent.proc.pid}; Ctrl-C ends the demo early, with its summary", flush=True)
        _wait_ready(agent)
        # The agent subscribes right after "ready"; give it that moment before sensors start.
        time.sleep(0.5)
        sensors = Sensors(edge_port)
        clients.append(sensors)
        sensors.start()
        t0 = cloud.started = time.monotonic()
        every = 1.0 if tty else 5.0
        last_print = 1.0 - every  # the first table after 1 s, then every `every` s
        while (elapsed := time.monotonic() - t0) < duration_s:
            for child in children:
                if not child.alive:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n"
                                       f"{child.tail()}")
            if elapsed - last_print >= every:
                last_print = elapsed
                table = cloud.table(sensors.acked, elapsed, duration_s)
                print(("\x1b[H\x1b[2J" if tty else "\n") + table, flush=True)
            time.sleep(0.1)
        ok = True
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        print("\ninterrupted: stopping the sensors, waiting for what they sent "
              "(Ctrl-C again to skip)", flush=True)
    except RuntimeError as exc:
        print(f"fogwhisk demo: {exc}", file=sys.stderr)
    finally:
        lost = -1
        try:
            # A second Ctrl-C or SIGTERM skips the wait.
            lost = _finish(clients, DRAIN_TIMEOUT_S if ok or interrupted else 3.0, logs)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
        finally:
            _hold_signals()  # the children's stop runs to its end
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()
            for child in reversed(children):  # agent first, then the brokers
                child.stop()
            shutil.rmtree(data, ignore_errors=True)  # the stores; logs and configs stay
        # Stopped early, a clean summary is still a success: nothing sent was lost.
        success = (ok or interrupted) and lost == 0
        if not success:
            print(f"fogwhisk demo: see the logs in {logs}", file=sys.stderr)
        elif not kept.startswith("the last"):
            shutil.rmtree(logs, ignore_errors=True)
    return 0 if success else 1


def _finish(clients: list[Sensors | Cloud], drain_s: float, logs: Path) -> int:
    """Stop the sensors, wait for what is in flight to reach the cloud, print the summary.

    Returns how many readings were lost, -1 when there was nothing to sum up.
    """
    sensors = next((c for c in clients if isinstance(c, Sensors)), None)
    cloud = next((c for c in clients if isinstance(c, Cloud)), None)
    if sensors is None or cloud is None:
        return -1
    sensors.stop()
    sensors.settle()
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        with cloud.lock:
            vib = cloud.vibration_n
        if cloud.received("sensors/") >= sensors.acked_relay and vib >= sensors.acked_vibration:
            break
        time.sleep(0.1)
    relayed = cloud.received("sensors/")
    with cloud.lock:
        vib = cloud.vibration_n
    lost = max(0, sensors.acked_relay - relayed) + max(0, sensors.acked_vibration - vib)
    _hold_signals()
    print()
    elapsed = time.monotonic() - cloud.started
    print(cloud.table(sensors.acked, elapsed, elapsed).split("\n", 1)[1])
    print()
    print("summary")
    print(f"  readings sent (acked by the edge broker) {sensors.acked:>8}")
    print(f"    relayed ones: sent {sensors.acked_relay}, at the cloud {relayed}")
    print(f"    vibration: sent {sensors.acked_vibration}, aggregated at the cloud {vib} "
          f"in {cloud.received('events/vibration')} windows")
    print(f"  lost                                     {lost:>8}")
    print(f"  camera events                            {cloud.n_events:>8}")
    print(f"  logs                                     {logs}", flush=True)
    return lost
