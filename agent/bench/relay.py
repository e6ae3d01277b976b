"""`fogwhisk bench relay`: the agent's durable relay next to a Mosquitto bridge, same hop.

All in one run on this machine, C clients at both ends:
  (a) mosquitto_pub -l -> local broker -> agent (durable outbox) -> uplink -> mosquitto_sub
  (b) mosquitto_pub -l -> local broker -> Mosquitto bridge     -> uplink -> mosquitto_sub
QoS1, 100-byte payloads. Then: a backlog buffered while the uplink is down and
its drain rate after the uplink returns; bytes on disk per buffered message; the
agent's RSS holding a large backlog (streamed from disk, never loaded whole).
The paced runs also give the median relay latency (the pacer's write to the
subscriber's receipt): what `[outbox] commit_interval_ms` trades for the CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from agent import resources
from agent.config import OutboxConfig
from agent.delivery.store import DB_NAME, Store
from agent.messages import Outgoing
from agent.mqtt.connection import free_port

TEST_CONF = resources.path("broker-config", "test.conf")
PAYLOAD = b"x" * 100  # one line for mosquitto_pub -l (which strips the newline)
TOPIC = "sensors/bench"




def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Broker:
    """One Mosquitto from broker-config/test.conf plus `extra` lines, on a free port."""

    def __init__(self, work: Path, name: str, extra: str = "", port: int = 0) -> None:
        self.port = port or free_port()
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        lines = [TEST_CONF.read_text(), "max_inflight_messages 1000",
                 "user root" if os.geteuid() == 0 else "", "persistence false",
                 f"listener {self.port} 127.0.0.1", extra]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen([mosquitto, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _publish(port: int, n: int) -> None:
    """n 100-byte payloads through mosquitto_pub -l (QoS1), at most 50,000 per process.

    mosquitto_pub 2.0.11 -l loses messages once its packet ids wrap past 65,535:
    100,000 lines delivered 34,474 here, with a plain subscriber and no agent.
    """
    line = PAYLOAD + b"\n"  # mosquitto_pub -l sends the line without it
    left = n
    while left:
        k = min(left, 50_000)
        pub = subprocess.Popen(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", TOPIC, "-l"],
                               stdin=subprocess.PIPE)
        assert pub.stdin is not None
        pub.stdin.write(line * k)
        pub.stdin.close()
        pub.wait()
        left -= k


def _subscriber(port: int, topic: str, n: int, timed: IO[bytes] | None = None
                ) -> subprocess.Popen[bytes]:
    """mosquitto_sub for n messages; `timed`: a file that gets "receipt-time payload" lines
    (a file, not a pipe: a full pipe would stop the subscriber reading its socket)."""
    fmt = ["-F", "@s.@N %p"] if timed is not None else []
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", topic,
                            "-C", str(n), "-i", f"bench-sub-{os.getpid()}", *fmt],
                           stdout=subprocess.DEVNULL if timed is None else timed)
    time.sleep(0.3)  # subscribed (mosquitto_sub gives no signal)
    return sub


def _uplink_back(agent: subprocess.Popen[bytes], uplink: Broker, n: int
                 ) -> subprocess.Popen[bytes]:
    """Start the uplink broker and a subscriber for n messages while the agent is stopped
    (SIGSTOP), then let the agent go on: it cannot drain a backlog before the subscriber
    listens (it reconnects within 0.5 s; a small backlog drains in less than a second)."""
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        uplink.start()
        return _subscriber(uplink.port, "fog/bench/#", n)
    finally:
        os.kill(agent.pid, signal.SIGCONT)


def _agent_config(work: Path, local: int, uplink: int, extra: str = "",
                  uplink_extra: str = "") -> Path:
    cfg = work / "agent.toml"
    cfg.write_text(f"""
[device]
id = "bench"
data_dir = "{work / 'data'}"
[local]
url = "mqtt://127.0.0.1:{local}"
[uplink]
url = "mqtt://127.0.0.1:{uplink}"
reconnect_min_s = "0.1s"
reconnect_max_s = "0.5s"
{uplink_extra}
[outbox]
max_messages = 5000000
max_bytes = "2GB"
min_free_bytes = "0"
{extra}
[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{{ action = "forward" }}]
""")
    return cfg


@contextmanager
def _agent(cfg: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(cfg.parent / "agent.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while " ready in " not in (cfg.parent / "agent.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start:\n"
                                   + (cfg.parent / "agent.log").read_text(errors="replace"))
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rate(local: int, uplink: int, topic: str, n: int) -> float:
    sub = _subscriber(uplink, topic, n)
    t0 = time.perf_counter()
    _publish(local, n)
    sub.wait(600)
    return n / (time.perf_counter() - t0)


def _cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _paced_cpu_us(local: int, uplink: int, topic: str, pids: list[int], rate: int,
                  seconds: float) -> tuple[float, float]:
    """CPU microseconds per message of `pids` while `rate` msg/s flow for `seconds`, and
    the median relay latency in ms.

    A sensor fleet does not publish as fast as it can: this is the bill at a steady
    rate. The publisher (mosquitto_pub -l, fed in 10 ms slices) and the subscriber are
    not counted; the path is: local broker, relay (agent or bridge), uplink broker.
    Each payload starts with the time the pacer wrote it.
    """
    n = int(rate * seconds)
    received = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    sub = _subscriber(uplink, topic, n, timed=received)
    pub = subprocess.Popen(["mosquitto_pub", "-p", str(local), "-q", "1", "-t", TOPIC, "-l"],
                           stdin=subprocess.PIPE)
    assert pub.stdin is not None
    t0 = time.monotonic()
    cpu0 = _cpu_s(pids)
    sent = 0
    while sent < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        if due > sent:
            line = f"{time.time():.6f} ".encode().ljust(len(PAYLOAD), b"x") + b"\n"
            pub.stdin.write(line * (due - sent))
            pub.stdin.flush()
            sent = due
        time.sleep(0.01)
    pub.stdin.close()
    pub.wait()
    sub.wait(120)
    cpu = _cpu_s(pids) - cpu0
    with received:
        received.seek(0)
        latencies = sorted(float(got) - float(stamp) for got, stamp, *_ in
                           (ln.split(b" ", 2) for ln in received.read().splitlines()))
    return cpu / n * 1e6, latencies[len(latencies) // 2] * 1000 if latencies else 0.0


def _backlog(data: Path) -> int:
    db = sqlite3.connect(f"file:{data / DB_NAME}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM rows").fetchone()[0])
    finally:
        db.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fill(data: Path, n: int) -> None:
    """Write a backlog of n 100-byte rows straight into an outbox file, as the agent would."""
    store = Store(data / DB_NAME, OutboxConfig())
    batch = 5000
    for start in range(0, n, batch):
        store.commit([Outgoing(f"fog/bench/{TOPIC}", PAYLOAD, f"bench:fill:{i}", "relay")
                      for i in range(start, min(n, start + batch))], [], [], 0, False)
    store.close()


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fogwhisk bench relay")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--backlog", type=int, default=100_000, help="drained after an outage")
    ap.add_argument("--rss-backlog", type=int, default=1_000_000)
    ap.add_argument("--paced-seconds", type=float, default=10.0,
                    help="length of each paced CPU run (s)")
    args = ap.parse_args(argv)
    rates = (200, 2000)
    paced_bridge: dict[int, tuple[float, float]] = {}  # rate -> (CPU us/msg, latency ms)
    paced_agent: dict[int, tuple[float, float]] = {}
    rows: list[tuple[str, str, str, str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="fogwhisk-bench-relay-") as tmp:
        work = Path(tmp)
        # The floor of any hop: mosquitto_pub straight into the cloud broker, no hop at all.
        cloud = Broker(work, "direct").start()
        try:
            direct = _rate(cloud.port, cloud.port, TOPIC, args.messages)
        finally:
            cloud.stop()
        # (b) the Mosquitto bridge, same hop.
        uplink = Broker(work, "uplink-b").start()
        local = Broker(work, "local-b", f"""
connection bench
address 127.0.0.1:{uplink.port}
topic sensors/# out 1 "" fog/bridge/
cleansession true
keepalive_interval 30
""").start()
        time.sleep(0.5)
        try:
            bridge = _rate(local.port, uplink.port, "fog/bridge/#", args.messages)
            pids = [p.pid for p in (local.proc, uplink.proc) if p is not None]
            for r in rates:
                paced_bridge[r] = _paced_cpu_us(local.port, uplink.port, "fog/bridge/#", pids,
                                                r, args.paced_seconds)
        finally:
            local.stop()
            uplink.stop()
        # (a) the agent, durable.
        uplink = Broker(work, "uplink-a").start()
        local = Broker(work, "local-a").start()
        (work / "a").mkdir()
        cfg = _agent_config(work / "a", local.port, uplink.port)
        try:
            with _agent(cfg) as proc:
                agent = _rate(local.port, uplink.port, "fog/bench/#", args.messages)
                pids = [p.pid for p in (local.proc, uplink.proc, proc) if p is not None]
                for r in rates:
                    paced_agent[r] = _paced_cpu_us(local.port, uplink.port,
                                                   f"fog/bench/{TOPIC}",
                                                   pids, r, args.paced_seconds)
                # Outage: the uplink goes away, a backlog builds, then it comes back.
                uplink.stop()
                _publish(local.port, args.backlog)
                deadline = time.monotonic() + 300
                while _backlog(work / "a" / "data") < args.backlog:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"backlog never reached the outbox ({_backlog(work / 'a' / 'data')}"
                            f" rows):\n" + (work / "a" / "agent.log").read_text()[-3000:])
                    time.sleep(0.2)
                disk = sum(p.stat().st_size for p in (work / "a" / "data").glob(f"{DB_NAME}*"))
                sub = _uplink_back(proc, uplink, args.backlog)
                t0 = time.perf_counter()
                sub.wait(600)
                drain = args.backlog / (time.perf_counter() - t0)
        finally:
            local.stop()
            uplink.stop()
        # RSS holding a big backlog: filled offline, the agent started with no uplink.
        (work / "r").mkdir()
        _fill(work / "r" / "data", args.rss_backlog)
        disk_big = sum(p.stat().st_size for p in (work / "r" / "data").glob(f"{DB_NAME}*"))
        local = Broker(work, "local-r").start()
        uplink = Broker(work, "uplink-r", port=free_port())
        try:
            cfg = _agent_config(work / "r", local.port, uplink.port)
            with _agent(cfg) as proc:
                time.sleep(3)
                rss_mib = _rss_kib(proc.pid) / 1024
                # Then the uplink returns: the whole backlog streams out from disk.
                sub = _uplink_back(proc, uplink, args.rss_backlog)
                t0 = time.perf_counter()
                while sub.poll() is None:
                    rss_mib = max(rss_mib, _rss_kib(proc.pid) / 1024)
                    time.sleep(0.2)
                    if time.perf_counter() - t0 > 900:
                        sub.kill()
                        raise RuntimeError("the big backlog did not drain within 900 s")
                drain_big = args.rss_backlog / (time.perf_counter() - t0)
        finally:
            local.stop()
            uplink.stop()
    ratio = agent / bridge
    per_msg = disk / args.backlog
    per_msg_big = disk_big / args.rss_backlog
    rows = [
        ("relay, agent durable (msg/s)", f"{agent:,.0f}", f"bridge {bridge:,.0f}",
         f"{ratio:.2f}", ">= 0.50", ratio >= 0.5),
        ("relay, agent durable, vs no hop (msg/s)", f"{agent:,.0f}", f"direct {direct:,.0f}",
         f"{agent / direct:.2f}", "-", True),
        *((f"CPU per msg at {r:,} msg/s, whole path (us)", f"{paced_agent[r][0]:,.0f}",
           f"bridge {paced_bridge[r][0]:,.0f}",
           f"{paced_agent[r][0] / paced_bridge[r][0]:.2f}", "<= 2.00",
           paced_agent[r][0] / paced_bridge[r][0] <= 2.0) for r in rates),
        # What commit_interval_ms costs: the agent holds sparse input up to that long.
        *((f"relay latency at {r:,} msg/s, median (ms)", f"{paced_agent[r][1]:,.1f}",
           f"bridge {paced_bridge[r][1]:,.1f}", "-", "-", True) for r in rates),
        (f"drain after outage, {args.backlog:,} msgs (msg/s)", f"{drain:,.0f}", "-", "-",
         ">= 10,000", drain >= 10_000),
        # A small backlog is dominated by the WAL (a few MB); the bar is for a big one.
        (f"disk per buffered msg, {args.backlog:,} (B)", f"{per_msg:,.0f}", "-", "-",
         "-", True),
        (f"disk per buffered msg, {args.rss_backlog:,} (B)", f"{per_msg_big:,.0f}", "-", "-",
         "<= 200", per_msg_big <= 200),
        (f"agent RSS, {args.rss_backlog:,} backlog, peak while draining (MiB)",
         f"{rss_mib:,.1f}", "-", "-", "<= 100", rss_mib <= 100),
        (f"drain of the {args.rss_backlog:,} backlog (msg/s)", f"{drain_big:,.0f}", "-", "-",
         ">= 10,000", drain_big >= 10_000),
    ]
    print(f"{'figure':<58} {'value':>10} {'baseline':>16} {'ratio':>6} {'bar':>10}  result")
    for name, value, base, ratio_s, bar, ok in rows:
        verdict = "pass" if ok else "FAIL"
        print(f"{name:<58} {value:>10} {base:>16} {ratio_s:>6} {bar:>10}  {verdict}")
    return 0 if all(r[5] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
