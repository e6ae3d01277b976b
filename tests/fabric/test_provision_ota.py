"""Per-device provisioning (`fogwhisk provision`) and OTA releases down through the gateway."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from agent_proc import AgentProcess
from brokers import ROOT
from fabric import fabric, user_property, wait_until
from helpers import Collector, publish_one

from agent import resources


def fogwhisk(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=cwd or ROOT,
                          check=False,
                          capture_output=True, text=True, timeout=60)


def test_a_provisioned_device_runs_its_bundle_behind_the_gateway_and_relays(
        tmp_path: Path) -> None:
    """`fogwhisk provision` issues the certificate (CN = the id), finds the ACL pattern
    covering the id, and writes a bundle; `fogwhisk run -c bundle/agent.toml` connects to
    the gateway over mTLS and its readings reach the cloud. Ids that would collide with
    the ACL's users or with topic syntax are refused with exit 2."""
    with fabric(tmp_path) as fab:
        fab.start_gateway_agent().wait_ready()
        bundle = tmp_path / "bundle"
        done = fogwhisk("provision", "dev-new", "--certs", fab.certs.dir, "--gateway",
                        f"127.0.0.1:{fab.gateway.ports[8883]}", "--out", bundle,
                        "--local", fab.sensors.url, "--data-dir", tmp_path / "dev-new-data")
        assert done.returncode == 0, done.stderr
        assert "covers dev-new by pattern" in done.stdout, done.stdout
        assert sorted(p.name for p in bundle.iterdir()) == \
            ["agent.toml", "ca.pem", "dev-new.key", "dev-new.pem"]
        assert (bundle / "dev-new.key").stat().st_mode & 0o077 == 0
        subject = subprocess.run(["openssl", "x509", "-in", bundle / "dev-new.pem", "-noout",
                                  "-subject"], capture_output=True, text=True, check=True)
        assert subject.stdout.strip() == "subject=CN = dev-new"
        agent = AgentProcess(bundle / "agent.toml")
        fab.agents.append(agent)
        agent.wait_ready()
        with fab.operator("fog/dev-new/#") as cloud:
            def relayed() -> bool:
                publish_one(fab.sensors.url, "sensors/temp", b"21.5")
                return bool(cloud.snapshot("fog/dev-new/sensors/temp"))
            wait_until(relayed, 20, "the provisioned device relayed", fab.logs)
            got = cloud.snapshot("fog/dev-new/sensors/temp")[0]
        assert got.payload == b"21.5"
        assert (user_property(got.properties, "fogwhisk-id") or "").startswith("dev-new:")
    for bad in ("gateway", "operator", "a/b", "_artifacts", "+"):
        refused = fogwhisk("provision", bad, "--certs", tmp_path / "certs", "--out",
                           tmp_path / "nope")
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert refused.stderr.startswith("fogwhisk provision: "), refused.stderr
    assert not (tmp_path / "nope").exists()


def test_a_release_pushed_at_the_cloud_reaches_only_its_device_behind_the_gateway(
        tmp_path: Path) -> None:
    """`fogwhisk model push` to the cloud for dev-01 and dev-02: the gateway's bridge brings
    the retained deploys and artifact chunks in; dev-01, on the gateway's mTLS listener
    with its own certificate, reads its release and every chunk (the artifact's sha256
    matches); dev-02 subscribed to every device's deploy topic gets only its own."""
    with fabric(tmp_path) as fab:
        for d in ("dev-01", "dev-02"):
            fab.provision(d)
        keys, out = tmp_path / "keys", tmp_path / "out"
        assert fogwhisk("model", "keygen", "--out", keys).returncode == 0
        packed = fogwhisk("model", "pack", resources.path("vision", "catalog", "shapes-ssd"),
                          "--version", "2", "--key", keys / "ota.key", "--out", out)
        assert packed.returncode == 0, packed.stderr
        release = out / "shapes-ssd-2.release.json"
        sha256 = hashlib.sha256((out / "shapes-ssd-2.tar").read_bytes()).hexdigest()
        with Collector(fab.gateway.url_for(1883), "fog/_bridge/gateway/state") as state:
            wait_until(lambda: any(m.payload == b"1" for m in state.snapshot()), 20,
                       "the gateway's bridge is up", fab.gateway.log)
        with Collector(fab.devices_url, "fog/+/models/+/deploy", tls=fab.tls("dev-02")) as other:
            pushed = fogwhisk("model", "push", release, "--broker", fab.cloud_url,
                              "--ca", fab.certs.ca, "--cert", fab.certs.cert("operator"),
                              "--key", fab.certs.key("operator"),
                              "--device", "dev-01", "--device", "dev-02")
            assert pushed.returncode == 0, pushed.stderr
            # The bridge brings dev-01's deploy in before dev-02's, on one connection:
            # had dev-02 been allowed to read it, it would have arrived first.
            other.wait_for(1, timeout=20)
            assert [m.topic for m in other.snapshot()] == ["fog/dev-02/models/shapes-ssd/deploy"]
        topics = ["fog/dev-01/models/+/deploy", f"fog/_artifacts/{sha256}/#"]
        with Collector(fab.devices_url, topics, tls=fab.tls("dev-01")) as device:
            wait_until(lambda: len(device.snapshot()) >= 5, 20,
                       "deploy, info and 3 chunks retained at the gateway", fab.gateway.log)
            got = {m.topic: m for m in device.snapshot()}
        deploy = got["fog/dev-01/models/shapes-ssd/deploy"]
        assert deploy.retain and deploy.payload == release.read_bytes()
        info = json.loads(got[f"fog/_artifacts/{sha256}/info"].payload)
        chunks = b"".join(got[f"fog/_artifacts/{sha256}/{i}"].payload
                          for i in range(info["chunks"]))
        assert info["chunks"] == 3 and hashlib.sha256(chunks).hexdigest() == sha256
