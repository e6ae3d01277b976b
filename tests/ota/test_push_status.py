"""`fogwhisk model push` and `fogwhisk model status` against a real Mosquitto: the artifact
uploaded once as retained chunks a device can fetch, the release deployed per device,
every PUBACK reason code checked, the state table read from retained reports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokers import ROOT, Broker, BrokerFactory, Certs
from helpers import Collector, Tls, connect, make_client, publish_one
from ota_util import MAX, NOW, Keys, Packed  # type: ignore[import-not-found]

from agent.config import BrokerConfig
from agent.errors import ConfigError, ConnectError, OtaError, ReleaseError
from agent.mqtt.connection import Connection
from agent.ota import release
from agent.ota.fetch import CHUNK_BYTES, UPLINK_MAX_PACKET_BYTES, MqttChunkFetcher
from agent.ota.push import push, status
from agent.schema import Duration
from agent.telemetry import Telemetry

NAME = "shapes-ssd"


def fogwhisk(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def quiet_push(packed: Packed, url: str, devices: list[str], **kw: object) -> str:
    out = io.StringIO()
    assert push(packed.release_json, url, devices=devices, out=out,  # type: ignore[arg-type]
                timeout_s=10, **kw) == 0
    return out.getvalue()


def sha_of(packed: Packed) -> str:
    return hashlib.sha256(packed.tar.read_bytes()).hexdigest()


# -- push -----------------------------------------------------------------------------------


def test_push_uploads_retained_chunks_and_info_then_deploys_the_release_to_each_device(
        broker: Broker, packed: Packed, ota_keys: Keys, tmp_path: Path) -> None:
    """After push: 64 KiB retained chunks and the info under fog/_artifacts/<sha256>/,
    the release byte for byte on each device's deploy topic, and a device's
    MqttChunkFetcher gets back exactly the tar."""
    data = packed.tar.read_bytes()
    sha = sha_of(packed)
    text = quiet_push(packed, broker.url, ["cam-1", "cam-2"])
    assert f"deployed {NAME} version 2 to cam-1, cam-2" in text

    n = -(-len(data) // CHUNK_BYTES)
    with Collector(broker.url, ["fog/_artifacts/#", "fog/+/models/+/deploy"]) as c:
        got = {m.topic: m for m in c.wait_for(n + 3)}
    assert all(m.retain and m.qos == 1 for m in got.values())
    chunks = [got[f"fog/_artifacts/{sha}/{i}"].payload for i in range(n)]
    assert b"".join(chunks) == data and {len(ch) for ch in chunks[:-1]} <= {CHUNK_BYTES}
    assert json.loads(got[f"fog/_artifacts/{sha}/info"].payload) == {
        "size": len(data), "chunk_bytes": CHUNK_BYTES, "chunks": n, "sha256": sha}
    for dev in ("cam-1", "cam-2"):
        assert got[f"fog/{dev}/models/{NAME}/deploy"].payload == packed.doc

    rel = release.parse_and_verify(packed.doc, topic_name=NAME, keys={
        ota_keys.keyid: ota_keys.public}, threshold=1, max_bytes=MAX, now=NOW)

    async def device() -> bytes:
        cfg = BrokerConfig(url=broker.url, reconnect_min_s=Duration(0.05),
                           reconnect_max_s=Duration(0.2))
        conn = Connection("uplink", cfg, "fogwhisk-cam-1-uplink", Telemetry(),
                          max_packet_bytes=UPLINK_MAX_PACKET_BYTES)
        task = asyncio.create_task(conn.run())
        try:
            await asyncio.wait_for(conn.connected.wait(), 10)
            path = await MqttChunkFetcher(conn, stall_s=10).fetch(rel, tmp_path / "in",
                                                                  lambda d, t: None)
            return path.read_bytes()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert asyncio.run(device()) == data


def test_a_second_push_of_the_same_artifact_sends_no_chunk_again(
        broker: Broker, packed: Packed) -> None:
    """The retained info says the artifact is there: the next push (to another device)
    publishes only its deploy."""
    quiet_push(packed, broker.url, ["cam-1"])
    with Collector(broker.url, ["fog/#"]) as c:
        time.sleep(0.3)
        c.clear()  # the retained ones, flagged; count only what the second push sends
        text = quiet_push(packed, broker.url, ["cam-3"])
        c.wait_for(1)
        time.sleep(0.3)
        live = [m for m in c.snapshot() if not m.retain]
    assert "already on" in text
    assert [m.topic for m in live] == [f"fog/cam-3/models/{NAME}/deploy"]


def test_push_with_url_adds_https_locations_and_the_signature_still_verifies(
        broker: Broker, packed: Packed, ota_keys: Keys) -> None:
    """--url puts an unsigned top-level "locations" list in the deployed document; the
    device's verification passes and its Release carries the URLs."""
    url = "https://models.example.com/shapes-ssd-2.tar"
    quiet_push(packed, broker.url, ["cam-1"], urls=[url])
    with Collector(broker.url, f"fog/cam-1/models/{NAME}/deploy") as c:
        doc = c.wait_for(1)[0].payload
    rel = release.parse_and_verify(doc, topic_name=NAME, keys={
        ota_keys.keyid: ota_keys.public}, threshold=1, max_bytes=MAX, now=NOW)
    assert rel.locations == (url,)
    assert json.loads(doc)["signed"] == json.loads(packed.doc)["signed"]


def test_push_refuses_an_artifact_that_is_not_the_one_the_release_signs(
        broker: Broker, packed: Packed) -> None:
    """A tar changed after pack: ReleaseError naming both hashes, nothing published."""
    packed.tar.write_bytes(packed.tar.read_bytes()[:-1] + b"\x01")
    with Collector(broker.url, ["fog/#"]) as c:
        with pytest.raises(ReleaseError, match=r"\.tar: .* bytes with sha256 .*, the release "
                                               r"signs"):
            push(packed.release_json, broker.url, devices=["cam-1"], out=io.StringIO())
        time.sleep(0.3)
        assert c.snapshot() == []


def test_push_fails_naming_the_topic_the_broker_refused(
        broker_factory: BrokerFactory, packed: Packed, tmp_path: Path) -> None:
    """The broker's ACL lets the operator write chunks but not one device's deploy topic:
    paho counts that PUBACK (0x87) as published, push does not: OtaError naming it."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite fog/_artifacts/#\ntopic readwrite fog/_fence/#\n"
                   "topic readwrite fog/cam-1/#\n")
    b = broker_factory("acl", extra_conf=f"allow_anonymous true\nacl_file {acl}")
    with pytest.raises(OtaError, match=f"refused fog/cam-2/models/{NAME}/deploy: "
                                       r"Not authorized \(0x87\)"):
        push(packed.release_json, b.url, devices=["cam-1", "cam-2"], out=io.StringIO(),
             timeout_s=10)


def test_push_to_a_broker_whose_packets_cannot_hold_a_chunk_says_so(
        broker_factory: BrokerFactory, packed: Packed) -> None:
    """Mosquitto's max_packet_size below a chunk: OtaError before any publish."""
    b = broker_factory("small", extra_conf="max_packet_size 20000")
    with pytest.raises(OtaError, match="packets of at most 20,000 bytes"):
        push(packed.release_json, b.url, devices=["cam-1"], out=io.StringIO(), timeout_s=10)


def test_push_over_mutual_tls_with_the_operator_certificate(
        tls_broker: Broker, certs: Certs, packed: Packed) -> None:
    """--ca/--cert/--key reach the broker's mTLS listener; without the CA it is refused
    with a reason."""
    quiet_push(packed, tls_broker.url, ["cam-1"], ca=Path(certs.ca),
               cert=Path(certs.cert("operator")), key=Path(certs.key("operator")))
    tls = Tls(certs.ca, certs.cert("operator"), certs.key("operator"))
    with Collector(tls_broker.url, f"fog/cam-1/models/{NAME}/deploy", tls=tls) as c:
        assert c.wait_for(1)[0].payload == packed.doc
    with pytest.raises(ConnectError, match="certificate verify failed"):
        push(packed.release_json, tls_broker.url, devices=["cam-1"], out=io.StringIO(),
             cert=Path(certs.cert("operator")), key=Path(certs.key("operator")))


@pytest.mark.parametrize(("kw", "message"), [
    ({"devices": ["cam/1"]}, "--device 'cam/1': a device id is one topic level"),
    ({"devices": ["cam-1"], "urls": ["http://x/a.tar"]}, "--url 'http://x/a.tar': expected "
                                                           "https://"),
])
def test_push_refuses_bad_arguments_before_connecting(
        packed: Packed, kw: dict[str, object], message: str) -> None:
    """A device id that is no topic level, a URL that is not https: ConfigError (exit 2)
    naming the argument; no broker is needed to say so."""
    with pytest.raises(ConfigError, match=message):
        push(packed.release_json, "mqtt://127.0.0.1:9", out=io.StringIO(),
             **kw)  # type: ignore[arg-type]


def test_the_cli_pushes_and_exits_0_and_names_bad_input_with_exit_1_or_2(
        broker: Broker, packed: Packed, tmp_path: Path) -> None:
    """`fogwhisk model push` as an operator runs it: 0 when acknowledged; 1 with one
    line for a release that is not one; 2 for a non-https --url."""
    ok = fogwhisk("model", "push", packed.release_json, "--broker", broker.url,
                  "--device", "cam-1", "--device", "cam-2")
    assert ok.returncode == 0, ok.stderr
    assert f"deployed {NAME} version 2 to cam-1, cam-2" in ok.stdout
    bogus = tmp_path / "x.release.json"
    bogus.write_text("{}")
    bad = fogwhisk("model", "push", bogus, "--broker", broker.url, "--device", "cam-1")
    assert bad.returncode == 1 and "not a release document" in bad.stderr
    usage = fogwhisk("model", "push", packed.release_json, "--broker", broker.url,
                     "--device", "cam-1", "--url", "ftp://x/y")
    assert usage.returncode == 2 and "--url 'ftp://x/y'" in usage.stderr


# -- status ---------------------------------------------------------------------------------


def state_doc(name: str, active: int, update: dict[str, object] | None, seq: int,
              previous: int | None = None) -> dict[str, object]:
    return {"name": name, "active": {"version": active, "sha256": "ab" * 32,
                                     "since": time.time() - 600},
            "previous": {"version": previous} if previous else None,
            "update": update, "seq": seq, "ts": time.time()}


def report(url: str, device: str, name: str, doc: dict[str, object] | bytes) -> None:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    publish_one(url, f"fog/{device}/models/{name}/state", payload, retain=True)


@pytest.fixture
def fleet(broker: Broker) -> Broker:
    """Three devices' retained reports, as their controllers publish them."""
    report(broker.url, "cam-1", NAME, state_doc(NAME, 3, {
        "version": 3, "state": "committed", "progress": None, "reason": None,
        "ts": time.time()}, 10, previous=2))
    report(broker.url, "cam-2", NAME, state_doc(NAME, 2, {
        "version": 3, "state": "downloading", "progress": 0.42, "reason": None,
        "ts": time.time()}, 4))
    report(broker.url, "cam-2", "person", state_doc("person", 1, {
        "version": 2, "state": "rejected", "progress": None,
        "reason": "golden mismatch: cat.jpg", "ts": time.time()}, 7))
    report(broker.url, "cam-3", NAME, b"not json")
    return broker


def test_status_prints_a_table_of_every_devices_models(fleet: Broker) -> None:
    """One row per (device, model), sorted, with active, previous, the update's version,
    state, progress and reason; an unreadable report is a row saying so."""
    out = io.StringIO()
    assert status(fleet.url, out=out, timeout_s=10) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["device", "model", "active", "previous", "update", "state",
                                "progress", "reason", "reported"]
    rows = [line.split()[:6] for line in lines[1:]]
    assert rows == [["cam-1", NAME, "3", "2", "3", "committed"],
                    ["cam-2", "person", "1", "-", "2", "rejected"],
                    ["cam-2", NAME, "2", "-", "3", "downloading"],
                    ["cam-3", NAME, "?", "?", "?", "unreadable"]]
    assert "42%" in lines[3] and "golden mismatch: cat.jpg" in lines[2]


def test_status_filters_by_device_and_name_and_speaks_json(fleet: Broker) -> None:
    """--device and --name narrow the subscription; --json gives the documents with
    the device id added."""
    out = io.StringIO()
    status(fleet.url, device="cam-2", name="person", as_json=True, out=out, timeout_s=10)
    docs = json.loads(out.getvalue())
    assert [(d["device"], d["name"], d["update"]["state"]) for d in docs] == [
        ("cam-2", "person", "rejected")]


def test_status_with_no_reports_says_where_devices_would_report(broker: Broker) -> None:
    out = io.StringIO()
    assert status(broker.url, out=out, timeout_s=10) == 0
    assert "no model state retained" in out.getvalue()


def test_status_watch_prints_each_new_report_and_skips_an_older_one(fleet: Broker) -> None:
    """`fogwhisk model status --watch`: the table, then one line per new report; a
    report with a lower seq than the one shown is ignored; Ctrl-C exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", "model", "status", "--broker",
                             fleet.url, "--device", "cam-2", "--watch"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # header and two rows
        assert lines[0].startswith("device")
        report(fleet.url, "cam-2", NAME, state_doc(NAME, 2, {
            "version": 3, "state": "downloading", "progress": 0.1, "reason": None,
            "ts": time.time()}, 3))  # older than seq 4: ignored
        report(fleet.url, "cam-2", NAME, state_doc(NAME, 2, {
            "version": 3, "state": "verifying", "progress": 1.0, "reason": None,
            "ts": time.time()}, 5))
        line = proc.stdout.readline()
        assert line.split()[:6] == ["cam-2", NAME, "2", "-", "3", "verifying"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "downloading" not in out


def test_status_shows_every_device_of_a_large_fleet(broker: Broker) -> None:
    """500 retained reports all appear: the retained documents are read at QoS 0, so the
    broker's in-flight limit cannot hold some back behind the fence that ends the read."""
    client = make_client(broker.url)
    connect(client, broker.url)
    try:
        infos = [client.publish(f"fog/cam-{i:04d}/models/{NAME}/state",
                                json.dumps(state_doc(NAME, 1, None, 1)).encode(), 1, retain=True)
                 for i in range(500)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()
    out = io.StringIO()
    assert status(broker.url, as_json=True, out=out, timeout_s=10) == 0
    assert len({d["device"] for d in json.loads(out.getvalue())}) == 500
