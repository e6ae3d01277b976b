"""Devices, a gateway and the cloud as real processes, from the shipped broker configs.

    cloud      broker-config/cloud-tls.conf (mTLS 8883, devices.acl)
    gateway    broker-config/gateway.conf   (devices on mTLS 8883 with devices.acl,
               the gateway agent on loopback 1883, a bridge bringing OTA in from the cloud)
    gateway agent   `forward` with `relay = true` on fog/+/#, uplink to the cloud's 8883
               through a TCP proxy that tests cut
    devices    agents provisioned with `fogwhisk provision`, uplink to the gateway's 8883;
               one shared sensor bus (each device has its own in production) on which
               device d reads sensors/d/#

Only ports, paths and the bridge address of the shipped configs are rewritten
(tests/test_broker_configs.py: localize).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent_proc import AgentProcess, write_config
from brokers import Broker, Certs, make_certs
from helpers import Collector, Tls
from proxy import Proxy
from test_broker_configs import ShippedBroker, start_shipped

from agent.cli import provision

GATEWAY = "gateway"  # the gateway's certificate CN and device id (user `gateway` in the ACL)

GATEWAY_PIPELINE = """
[[pipeline]]
name = "relay"
trigger = "fog/+/#"
steps = [{ action = "forward", relay = true }]
"""


def device_pipeline(device: str) -> str:
    return f"""
[[pipeline]]
name = "relay"
trigger = "sensors/{device}/#"
steps = [{{ action = "forward" }}]
"""


def tls_table(ca: str, cert: str, key: str) -> str:
    return f'ca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n'


@dataclass
class Fabric:
    work: Path
    certs: Certs
    cloud: ShippedBroker
    gateway: ShippedBroker
    uplink: Proxy  # the gateway agent's way to the cloud
    sensors: Broker
    agents: list[AgentProcess] = field(default_factory=list)

    def tls(self, name: str) -> Tls:
        return Tls(self.certs.ca, self.certs.cert(name), self.certs.key(name))

    @property
    def cloud_url(self) -> str:
        return self.cloud.url_for(8883, tls=True)

    @property
    def devices_url(self) -> str:
        """The gateway's device listener (mTLS, devices.acl)."""
        return self.gateway.url_for(8883, tls=True)

    def operator(self, topics: str | list[str]) -> Collector:
        """A subscriber at the cloud with the operator's certificate (reads fog/#)."""
        return Collector(self.cloud_url, topics, tls=self.tls("operator"))

    def start_gateway_agent(self, extra: str = "") -> AgentProcess:
        cfg_dir = self.work / "gateway-agent"
        cfg_dir.mkdir(exist_ok=True)
        cfg = write_config(
            cfg_dir / "agent.toml", self.gateway.url_for(1883),
            f"mqtts://127.0.0.1:{self.uplink.port}", GATEWAY_PIPELINE, device=GATEWAY,
            uplink_extra=tls_table(self.certs.ca, self.certs.cert(GATEWAY),
                                   self.certs.key(GATEWAY)),
            extra=extra)
        return self._start(AgentProcess(cfg))

    def provision(self, device: str) -> Path:
        """`fogwhisk provision` for `device`: its bundle directory."""
        return provision.provision(
            device, self.certs.dir, gateway=f"127.0.0.1:{self.gateway.ports[8883]}",
            out=self.work / "bundles" / device, acl=None, local=self.sensors.url,
            data_dir=str(self.work / device / "data"), stdout=io.StringIO())

    def device_config(self, device: str, *, cert_of: str | None = None,
                      extra: str = "") -> Path:
        """An agent config for `device` behind the gateway, with the certificate
        provisioned for `cert_of` (default: its own), fast reconnects."""
        bundle = self.provision(cert_of or device)
        name = cert_of or device
        cfg_dir = self.work / device
        cfg_dir.mkdir(exist_ok=True)
        return write_config(
            cfg_dir / "agent.toml", self.sensors, self.devices_url, device_pipeline(device),
            device=device, extra=extra,
            uplink_extra=tls_table(str(bundle / "ca.pem"), str(bundle / f"{name}.pem"),
                                   str(bundle / f"{name}.key")))

    def start_device(self, device: str, **kw: str) -> AgentProcess:
        return self._start(AgentProcess(self.device_config(device, **kw)))

    def _start(self, agent: AgentProcess) -> AgentProcess:
        self.agents.append(agent)
        return agent

    def logs(self) -> str:
        return "\n".join(f"--- {a.config}\n{a.log()[-3000:]}" for a in self.agents) \
            + f"\n--- gateway broker\n{self.gateway.log()[-3000:]}"


@contextmanager
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    """Cloud, gateway broker, uplink proxy and a sensor bus; every process stopped after."""
    certs = make_certs(tmp_path / "certs", (GATEWAY, "operator"))
    cloud = start_shipped("cloud-tls.conf", tmp_path, certs)
    gateway = start_shipped("gateway.conf", tmp_path, certs, bridge_to=cloud.ports[8883])
    uplink = Proxy(cloud.ports[8883])
    sensors = Broker("sensors", tmp_path / "sensors",
                     extra_conf="max_inflight_messages 1000\nmax_queued_messages 0\n").start()
    fab = Fabric(tmp_path, certs, cloud, gateway, uplink, sensors)
    try:
        yield fab
    finally:
        for a in fab.agents:
            a.kill()
        uplink.close()
        for b in (sensors, gateway, cloud):
            b.kill()


def wait_until(check: object, timeout: float, what: str, logs: object = None) -> None:
    """Poll `check()` until true; fail naming `what` (and `logs()` when given)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s"
                                 + (f"\n{logs()}" if callable(logs) else ""))
        time.sleep(0.1)


def user_property(props: dict[str, object], name: str) -> str | None:
    for k, v in props.get("UserProperty", []):  # type: ignore[attr-defined]
        if k == name:
            return str(v)
    return None


def decode(payload: bytes) -> dict[str, object]:
    return json.loads(payload)  # type: ignore[no-any-return]
