"""Simulated devices for the rollout tests and `fogwhisk bench rollout`.

One MQTT connection answers deploys for N device ids with the state documents a real
agent publishes (agent/ota/state.py `document()`: name, active, previous, update, seq,
ts), without models, downloads or trials: the rollout's decisions at fleet scale, cheaply.

    python tests/bench/fleet_sim.py --broker mqtt://127.0.0.1:1883 --name shapes-ssd \
        --count 40 [--id sim-%05d] [--plan plan.json] [--step-s 0.02]

Every device starts with a retained state (version 1 active, no update). A deploy of
version V (higher than the active one, not the one in hand) is answered downloading,
verifying, trial, [shadow,] probation and the device's outcome, one report per step
(`step_s` apart, seq + 1 each), retained QoS 1. An empty deploy while the update is
unfinished: `rejected`, "cancelled by the operator" (the device contract in docs/ota.md).

plan.json: {"default": BEHAVIOUR, "devices": {"sim-00003": BEHAVIOUR, ...}}, BEHAVIOUR:
  "outcome": "committed" | "rejected" | "rolled_back" | "silent" (never answers a deploy)
  "reason":  the reason of a rejected or rolled_back report
  "f1":      a shadow agreement, reported as update.shadow.f1 from the shadow step on
  "hold_s":  seconds spent in trial before going on (to be caught mid-wave)

Prints "ready <count>" once every initial state is acknowledged and the deploy
subscription is in, then one JSON line per deploy received: {"device", "version"}
(version null for an empty deploy). SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

CANCELLED = "cancelled by the operator"


@dataclass
class Device:
    id: str
    behaviour: dict[str, Any]
    active: int = 1
    previous: int | None = None
    update: dict[str, Any] | None = None
    seq: int = 1
    epoch: int = 0  # bumped by a cancel or a newer deploy: older scheduled steps are void

    def document(self, name: str, now: float) -> bytes:
        return json.dumps({
            "name": name,
            "active": {"version": self.active, "sha256": "0" * 64, "since": now},
            "previous": None if self.previous is None else {"version": self.previous},
            "update": self.update, "seq": self.seq, "ts": now,
        }, separators=(",", ":")).encode()


@dataclass(order=True)
class Step:
    due: float
    n: int
    device: str = field(compare=False)
    epoch: int = field(compare=False)
    state: str = field(compare=False)


class Fleet:
    def __init__(self, url: str, name: str, ids: list[str], plan: dict[str, Any],
                 step_s: float) -> None:
        self.name = name
        default = plan.get("default", {})
        self.devices = {i: Device(i, {**default, **plan.get("devices", {}).get(i, {})})
                        for i in ids}
        self.step_s = step_s
        self.lock = threading.Condition()
        self.steps: list[Step] = []
        self.counter = itertools.count()
        self.stop = threading.Event()
        parts = urlsplit(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"fleet-sim-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self.client.loop_start()

    def publish(self, d: Device) -> mqtt.MQTTMessageInfo:
        return self.client.publish(f"fog/{d.id}/models/{self.name}/state",
                                   d.document(self.name, time.time()), qos=1, retain=True)

    def start(self) -> None:
        infos = [self.publish(d) for d in self.devices.values()]
        for info in infos:
            info.wait_for_publish(60)
        self.client.subscribe(f"fog/+/models/{self.name}/deploy", qos=1)
        if not self.subscribed.wait(30):
            raise SystemExit("fleet_sim: no SUBACK")
        print(f"ready {len(self.devices)}", flush=True)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[1]
        d = self.devices.get(device)
        if d is None:
            return
        version = None
        if msg.payload:
            try:
                version = int(json.loads(msg.payload)["signed"]["version"])
            except (ValueError, KeyError, TypeError):
                return
        print(json.dumps({"device": device, "version": version}), flush=True)
        with self.lock:
            if version is None:
                self._cancel(d)
            else:
                self._deploy(d, version)
            self.lock.notify()

    def _deploy(self, d: Device, version: int) -> None:
        u = d.update
        if version <= d.active or (u is not None and u["version"] == version):
            return  # redelivered, or not newer
        d.epoch += 1
        if d.behaviour.get("outcome") == "silent":
            return
        self._report(d, {"version": version, "state": "downloading", "progress": 0.0,
                         "reason": None, "ts": time.time()})
        self._after(d, 1, "verifying")

    def _cancel(self, d: Device) -> None:
        u = d.update
        if u is None or u["state"] in ("committed", "rejected", "rolled_back"):
            return
        d.epoch += 1
        self._report(d, {**u, "state": "rejected", "reason": CANCELLED, "progress": None,
                         "ts": time.time()})

    def _after(self, d: Device, steps: float, state: str) -> None:
        heapq.heappush(self.steps, Step(time.monotonic() + steps * self.step_s,
                                        next(self.counter), d.id, d.epoch, state))

    def _report(self, d: Device, update: dict[str, Any]) -> None:
        d.update = update
        d.seq += 1
        self.publish(d)

    def _advance(self, s: Step) -> None:
        d = self.devices[s.device]
        if s.epoch != d.epoch or d.update is None:
            return
        b = d.behaviour
        u = {**d.update, "state": s.state, "progress": None, "ts": time.time()}
        outcome = b.get("outcome", "committed")
        if b.get("f1") is not None and s.state in ("shadow", "probation", "committed",
                                                    "rolled_back"):
            u["shadow"] = {"frames": 200, "f1": b["f1"]}
        nxt: tuple[float, str] | None = None
        if s.state == "verifying":
            nxt = (1, "trial")
        elif s.state == "trial":
            after = "rejected" if outcome == "rejected" else (
                "shadow" if b.get("f1") is not None else "probation")
            nxt = (1 + float(b.get("hold_s", 0.0)) / self.step_s, after)
        elif s.state == "shadow":
            nxt = (1, "probation")
        elif s.state == "probation":
            nxt = (1, "rolled_back" if outcome == "rolled_back" else "committed")
        if s.state in ("rejected", "rolled_back"):
            u["reason"] = b.get("reason", f"simulated {s.state}")
        if s.state == "probation":
            d.previous, d.active = d.active, int(u["version"])
        if s.state == "rolled_back" and d.previous is not None:
            d.active, d.previous = d.previous, None
        self._report(d, u)
        if nxt is not None:
            self._after(d, nxt[0], nxt[1])

    def run(self) -> None:
        with self.lock:
            while not self.stop.is_set():
                now = time.monotonic()
                while self.steps and self.steps[0].due <= now:
                    self._advance(heapq.heappop(self.steps))
                wait = self.steps[0].due - now if self.steps else 0.5
                self.lock.wait(min(max(wait, 0.0), 0.5))
        self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--id", default="sim-%05d", help="printf pattern of the ids, from 0")
    ap.add_argument("--plan", help="a JSON file of behaviours (see the docstring)")
    ap.add_argument("--step-s", type=float, default=0.02)
    args = ap.parse_args(argv)
    plan: dict[str, Any] = {}
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
    ids = [args.id % i for i in range(args.count)]
    fleet = Fleet(args.broker, args.name, ids, plan, args.step_s)

    def stop(*_: object) -> None:
        fleet.stop.set()
        with fleet.lock:
            fleet.lock.notify()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fleet.start()
    fleet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
