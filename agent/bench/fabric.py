"""`fogwhisk bench fabric`: the gateway tier, the relaying agent next to a Mosquitto bridge.

Both in one run on this machine, the same devices and the same cloud broker:
  (a) devices -> gateway Mosquitto -> gateway agent (`forward`, relay = true,
      durable outbox) -> cloud Mosquitto -> mosquitto_sub
  (b) devices -> gateway Mosquitto bridging `fog/# out 1` -> cloud -> mosquitto_sub
  (c) as (a) with `[outbox] commit_interval_ms = 0` (the latency end of the trade)
The devices are MQTT 5 clients (paho, in this process), 10 by default, each
publishing QoS1 at 50 msg/s on fog/<id>/r with its own `fogwhisk-id`, as a
device agent's outbox does; the payload is the send time. Figures: end-to-end
latency device -> cloud (p50, p99), the gateway's CPU per message
(utime + stime from /proc/PID/stat over the paced run: the agent alone, and the
whole gateway, broker included) and resident memory.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.bench.relay import Broker, _agent, _cpu_s, _rss_kib

SETTLE_S = 1.0  # connections and subscriptions in place before a paced run
WARMUP_S = 2.0  # the same traffic, not measured, first


@dataclass(frozen=True)
class Run:
    """One paced run through one gateway."""

    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    relay_cpu_us: float  # the agent (or the bridging broker) per message
    gateway_cpu_us: float  # the gateway broker and the agent together
    rss_mib: float  # the agent's (or the bridging broker's) resident set at the end


class Devices:
    """`n` MQTT 5 clients publishing QoS1 at `rate` msg/s each, keys as a device agent's."""

    def __init__(self, port: int, n: int, rate: float) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.rate = rate
        self.ids = [f"dev-{i:02d}" for i in range(n)]
        self.clients = []
        for d in self.ids:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{d}",
                            protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(100)
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)

    def run(self, seconds: float, topic: str = "r") -> int:
        """Publish on fog/<id>/<topic> for `seconds`, paced in 20 ms slices; the number of
        messages sent."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        n = int(self.rate * seconds)
        t0 = time.monotonic()
        sent = 0
        infos = []
        while sent < n:
            due = min(n, int((time.monotonic() - t0) * self.rate) + 1)
            while sent < due:
                sent += 1
                for d, c in zip(self.ids, self.clients, strict=True):
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call] # paho ships no hints here
                    props.UserProperty = [("fogwhisk-id", f"{d}:bench:{sent}")]
                    infos.append(c.publish(f"fog/{d}/{topic}", f"{time.time():.6f}", qos=1,
                                           properties=props))
            time.sleep(0.02)
        for info in infos:
            info.wait_for_publish(30)
        return n * len(self.clients)

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


@contextmanager
def _subscriber(port: int, n: int, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """mosquitto_sub at the cloud for n device messages, "receipt-time payload" lines in `out`
    (a file, not a pipe: a full pipe would stop it reading its socket)."""
    with open(out, "wb") as f:
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "fog/+/r",
                                "-C", str(n), "-F", "@s.@N %p", "-i", f"bench-cloud-{port}"],
                               stdout=f)
    try:
        time.sleep(0.3)  # subscribed (mosquitto_sub gives no signal)
        yield sub
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def _paced(work: Path, gateway: Broker, cloud: Broker, relay_pid: int, agent: bool,
           devices: int, rate: float, seconds: float) -> Run:
    n = int(rate * seconds) * devices
    timed = work / "received"
    dev = Devices(gateway.port, devices, rate)
    try:
        dev.run(WARMUP_S, "warmup")  # connections, caches and paged-out library code warm
        with _subscriber(cloud.port, n, timed) as sub:
            time.sleep(SETTLE_S)
            pids = [relay_pid] + ([gateway.proc.pid] if agent and gateway.proc else [])
            cpu0, relay0 = _cpu_s(pids), _cpu_s([relay_pid])
            sent = dev.run(seconds)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sub.wait(60)  # else counted below: fewer received than sent
            cpu, relay_cpu = _cpu_s(pids) - cpu0, _cpu_s([relay_pid]) - relay0
            rss = _rss_kib(relay_pid) / 1024
    finally:
        dev.close()
    latencies = sorted(float(got) - float(stamp) for got, stamp in
                       (ln.split(b" ", 1) for ln in timed.read_bytes().splitlines() if b" " in ln))
    k = len(latencies)
    return Run(sent, k, latencies[k // 2] * 1000 if k else 0.0,
               latencies[min(k - 1, k * 99 // 100)] * 1000 if k else 0.0,
               relay_cpu / sent * 1e6, cpu / sent * 1e6, rss)


def _agent_gateway(work: Path, devices: int, rate: float, seconds: float,
                   commit_interval_ms: int | None = None) -> Run:
    cloud = Broker(work, "cloud").start()
    gateway = Broker(work, "gateway").start()
    cfg = work / "agent.toml"
    outbox = f"[outbox]\ncommit_interval_ms = {commit_interval_ms}\n" \
        if commit_interval_ms is not None else ""
    cfg.write_text(f"""
[device]
id = "gateway"
data_dir = "{work / 'data'}"
[local]
url = "mqtt://127.0.0.1:{gateway.port}"
[uplink]
url = "mqtt://127.0.0.1:{cloud.port}"
{outbox}
[[pipeline]]
name = "relay"
trigger = "fog/+/#"
steps = [{{ action = "forward", relay = true }}]
""")
    try:
        with _agent(cfg) as proc:
            return _paced(work, gateway, cloud, proc.pid, True, devices, rate, seconds)
    finally:
        gateway.stop()
        cloud.stop()


def _bridge_gateway(work: Path, devices: int, rate: float, seconds: float) -> Run:
    cloud = Broker(work, "cloud").start()
    gateway = Broker(work, "gateway", f"""
connection cloud
address 127.0.0.1:{cloud.port}
remote_clientid bench-bridge
bridge_protocol_version mqttv311
cleansession false
local_cleansession false
topic fog/# out 1
keepalive_interval 30
""").start()
    try:
        assert gateway.proc is not None
        time.sleep(SETTLE_S)  # the bridge connects on its own schedule
        return _paced(work, gateway, cloud, gateway.proc.pid, False, devices, rate, seconds)
    finally:
        gateway.stop()
        cloud.stop()


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fogwhisk bench fabric")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rate", type=float, default=50.0, help="msg/s per device")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each paced run")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fogwhisk-bench-fabric-") as tmp:
        work = Path(tmp)
        for name in ("bridge", "agent", "agent0"):
            (work / name).mkdir()
        b = _bridge_gateway(work / "bridge", args.devices, args.rate, args.seconds)
        a = _agent_gateway(work / "agent", args.devices, args.rate, args.seconds)
        a0 = _agent_gateway(work / "agent0", args.devices, args.rate, args.seconds,
                            commit_interval_ms=0)
    total = args.devices * args.rate
    print(f"{args.devices} devices x {args.rate:g} msg/s = {total:g} msg/s for "
          f"{args.seconds:g} s, QoS1, through the gateway to the cloud")
    rows: list[tuple[str, str, str, str, str, bool]] = []
    for label, r in (("agent", a), ("agent, commit_interval_ms = 0", a0)):
        rows += [
            (f"delivered, {label}", f"{r.received:,}/{r.sent:,}", f"bridge {b.received:,}/"
             f"{b.sent:,}", "-", "all", r.received >= r.sent),
            (f"latency device -> cloud p50, {label} (ms)", f"{r.p50_ms:,.1f}",
             f"bridge {b.p50_ms:,.1f}", _ratio(r.p50_ms, b.p50_ms), "-", True),
            (f"latency device -> cloud p99, {label} (ms)", f"{r.p99_ms:,.1f}",
             f"bridge {b.p99_ms:,.1f}", _ratio(r.p99_ms, b.p99_ms), "-", True),
            (f"CPU per msg, the relay itself, {label} (us)", f"{r.relay_cpu_us:,.0f}",
             f"bridge {b.relay_cpu_us:,.0f}", _ratio(r.relay_cpu_us, b.relay_cpu_us), "-",
             True),
            (f"CPU per msg, gateway broker + relay, {label} (us)", f"{r.gateway_cpu_us:,.0f}",
             f"bridge {b.gateway_cpu_us:,.0f}", _ratio(r.gateway_cpu_us, b.gateway_cpu_us),
             "-", True),
            (f"RSS at the end, {label} (MiB)", f"{r.rss_mib:,.1f}",
             f"bridge {b.rss_mib:,.1f}", _ratio(r.rss_mib, b.rss_mib), "-", True),
        ]
    print(f"{'figure':<72} {'value':>12} {'baseline':>18} {'ratio':>6} {'bar':>5}  result")
    for name, value, base, ratio_s, bar, ok in rows:
        print(f"{name:<72} {value:>12} {base:>18} {ratio_s:>6} {bar:>5}  "
              f"{'pass' if ok else 'FAIL'}")
    return 0 if all(r[5] for r in rows) else 1


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
