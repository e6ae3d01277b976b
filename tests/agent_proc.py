"""The agent as a real subprocess (`python -m agent run -c FILE`), for integration tests.

    agent = AgentProcess.start(cfg_path, tmp_path)
    agent.wait_ready()                # the log line "ready" (or a NOTIFY_SOCKET READY=1)
    ...
    assert agent.stop() == 0          # SIGTERM, then the exit code
    agent.kill()                      # kill -9: a crash

`write_config` renders a TOML config for a local and an uplink broker with
the given pipelines; tests pass extra tables as text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from brokers import ROOT, Broker
from helpers import Collector, publish_many

DEVICE = "dev-test"
TESTS_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 20.0


def write_config(
    path: Path,
    local: Broker | str,
    uplink: Broker | str,
    pipelines: str,
    *,
    device: str = DEVICE,
    extra: str = "",
    uplink_extra: str = "",
    grace_s: str = "5s",
    telemetry_s: str = "1s",
) -> Path:
    """A complete agent config; `pipelines` is TOML text of `[[pipeline]]` tables."""
    local_url = local.url if isinstance(local, Broker) else local
    uplink_url = uplink.url if isinstance(uplink, Broker) else uplink
    path.write_text(f"""
[device]
id = "{device}"
data_dir = "{path.parent / 'data'}"

[local]
url = "{local_url}"
reconnect_min_s = "0.1s"
reconnect_max_s = "1s"

[uplink]
url = "{uplink_url}"
reconnect_min_s = "0.1s"
reconnect_max_s = "1s"
{uplink_extra}

[service]
grace_s = "{grace_s}"

[telemetry]
interval_s = "{telemetry_s}"

{extra}

{pipelines}
""")
    return path


RELAY = """
[[pipeline]]
name = "relay"
trigger = "sensors/#"
steps = [{ action = "forward" }]
"""


class AgentProcess:
    """One agent process; its stdout and stderr go to `agent.log` beside the config."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 log_name: str = "agent.log") -> None:
        self.config = config
        self.log_path = config.parent / log_name
        base = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(TESTS_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**base, **(env or {})}, cwd=str(config.parent),
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = READY_TIMEOUT_S, count: int = 1) -> None:
        """Wait until `text` appears `count` times in the log; fail with the log otherwise."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if not self.running:
                raise AssertionError(
                    f"agent exited with {self.proc.returncode} before logging {text!r}:\n"
                    f"{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not log {text!r} in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Wait for the "ready" log line; return seconds since start."""
        self.wait_log(" ready in ", timeout)
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9: a crash, no last words but the broker's last will."""
        if self.running:
            self.proc.kill()
        self.proc.wait()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def status_of(cloud: Collector, device: str = DEVICE) -> list[dict[str, object]]:
    """Every status document the collector has seen for `device`, in order."""
    return [json.loads(m.payload) for m in cloud.snapshot(f"fog/{device}/status")]


def wait_status(cloud: Collector, state: str, agent: AgentProcess | None = None,
                device: str = DEVICE, timeout: float = READY_TIMEOUT_S,
                after: int = 0) -> dict[str, object]:
    """Wait for a status document with `state` among those after index `after`."""
    deadline = time.monotonic() + timeout
    while True:
        docs = status_of(cloud, device)[after:]
        for d in docs:
            if d.get("state") == state:
                return d
        if time.monotonic() > deadline:
            raise AssertionError(f"no {state!r} status within {timeout}s (saw {docs})"
                                 + (f"\n{agent.log()}" if agent else ""))
        time.sleep(0.05)


def prime(local: Broker, cloud: Collector, agent: AgentProcess, topic: str,
          device: str = DEVICE, timeout: float = READY_TIMEOUT_S) -> None:
    """Publish a marker on `topic` until the agent relays it: the local subscription is live.

    The agent subscribes on its own schedule after "ready"; until the
    subscription is in, the local broker would drop what sensors publish.
    """
    deadline = time.monotonic() + timeout
    want = f"fog/{device}/{topic}"
    while not cloud.snapshot(want):
        if time.monotonic() > deadline:
            raise AssertionError(f"marker {topic} never relayed:\n{agent.log()}")
        publish_many(local.url, topic, [b"marker"])
        time.sleep(0.1)


def pipeline_events(cloud: Collector, pipeline: str, n: int, decode: Any = json.loads,
                    timeout: float = 10) -> list[Any]:
    """The first `n` events of `pipeline` at the cloud, decoded."""
    msgs = cloud.wait_for(n, timeout=timeout, topic=f"fog/{DEVICE}/events/{pipeline}")
    return [decode(m.payload) for m in msgs]


def telemetry_when(cloud: Collector, agent: AgentProcess, pipeline: str, counter: str,
                   value: int, timeout: float = 10) -> dict[str, Any]:
    """The first telemetry document where `pipeline`'s `counter` reached `value`."""
    topic = f"fog/{DEVICE}/telemetry"
    seen: dict[str, Any] = {}
    for i in range(1, 1000):
        cloud.wait_for(i, timeout=timeout, topic=topic)
        doc: dict[str, Any] = json.loads(cloud.snapshot(topic)[-1].payload)
        seen = doc["pipelines"].get(pipeline, {})
        if seen.get(counter, 0) >= value:
            return doc
    raise AssertionError(f"{pipeline}.{counter} never reached {value}: {seen}\n{agent.log()}")
