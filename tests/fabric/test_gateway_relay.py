"""The gateway agent's relay (`forward` with `relay = true`), against the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fabric import GATEWAY, fabric, user_property, wait_until
from helpers import Collector, connect, make_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import config
from agent.errors import ConfigError

KEY = "fogwhisk-id"


def keyed(key: str | None) -> Properties | None:
    if key is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(KEY, key)]
    return props


def test_the_gateway_relays_device_topics_unprefixed_under_the_devices_own_keys(
        tmp_path: Path) -> None:
    """A device reading reaches the cloud on its own topic with the key it came with; one
    without a key, or with a key naming another device, gets a fresh key (counted
    foreign_keys); device status and OTA state are retained at the cloud; deploys, the
    gateway's own prefix, the bridge's and artifact topics are not sent up (counted
    excluded)."""
    with fabric(tmp_path) as fab:
        gw = fab.start_gateway_agent()
        gw.wait_ready()
        with fab.operator("fog/#") as cloud:
            client = make_client(fab.gateway.url_for(1883))
            connect(client, fab.gateway.url_for(1883))
            sent = [
                ("fog/gateway/sensors/own", b"own prefix", None, False),
                ("fog/_bridge/gateway/x", b"bridge", None, False),
                ("fog/_artifacts/abc/0", b"chunk", None, False),
                ("fog/dev-01/models/m/deploy", b"deploy", None, False),
                ("fog/dev-01/sensors/t", b"1", "dev-01:boot-a:7", False),
                ("fog/dev-01/sensors/t", b"2", None, False),
                ("fog/dev-01/sensors/t", b"3", "dev-02:boot-b:1", False),
                ("fog/dev-01/status", b'{"state": "online"}', "dev-01:boot-a:8", True),
                ("fog/dev-01/models/m/state", b'{"seq": 1}', "dev-01:boot-a:9", True),
                ("fog/dev-01/sensors/end", b"end", None, False),
            ]
            for topic, payload, key, retain in sent:
                client.publish(topic, payload, qos=1, retain=retain,
                               properties=keyed(key)).wait_for_publish(5)
            client.disconnect()
            client.loop_stop()
            cloud.wait_for(1, timeout=20, topic="fog/dev-01/sensors/end")
            got = [(m.topic, m.payload, user_property(m.properties, KEY))
                   for m in cloud.snapshot("fog/dev-01/#")]
            relayed_own = [m for f in ("fog/gateway/sensors/#", "fog/_bridge/gateway/x",
                                       "fog/_artifacts/#") for m in cloud.snapshot(f)]

            def counters() -> dict[str, int]:
                docs = cloud.snapshot(f"fog/{GATEWAY}/telemetry")
                return json.loads(docs[-1].payload)["pipelines"]["relay"] if docs else {}

            wait_until(lambda: counters().get("foreign_keys") == 1, 10,
                       "foreign_keys counted", gw.log)
            excluded = counters().get("excluded", 0)
        assert [(t, p) for t, p, _ in got] == [
            ("fog/dev-01/sensors/t", b"1"), ("fog/dev-01/sensors/t", b"2"),
            ("fog/dev-01/sensors/t", b"3"), ("fog/dev-01/status", b'{"state": "online"}'),
            ("fog/dev-01/models/m/state", b'{"seq": 1}'), ("fog/dev-01/sensors/end", b"end")]
        keys = [k for _, _, k in got]
        assert keys[0] == "dev-01:boot-a:7" and keys[3:5] == ["dev-01:boot-a:8", "dev-01:boot-a:9"]
        assert all(k is not None and k.startswith(f"{GATEWAY}:") for k in (keys[1], keys[2]))
        assert keys[1] != keys[2]
        assert relayed_own == []
        assert excluded >= 4  # own prefix, bridge, artifact, deploy (and the bridge's state)
        with Collector(fab.cloud_url, ["fog/dev-01/status", "fog/dev-01/models/+/state"],
                       tls=fab.tls("operator")) as late:
            retained = {(m.topic, m.retain) for m in late.wait_for(2)}
        assert retained == {("fog/dev-01/status", True), ("fog/dev-01/models/m/state", True)}
        assert "Traceback" not in gw.log(), gw.log()


@pytest.mark.parametrize(("step", "message"), [
    ({"relay": True, "topic": "up/{topic}"}, "relay = true forwards on the input's own topic"),
    ({"key": "reuse"}, "key"),
    ({"exclude": ["fog/#/x"]}, r"exclude 'fog/#/x'"),
    ({"exclude": ["{bogus}/#"]}, r"exclude '\{bogus\}/#'.*placeholders: prefix, device"),
])
def test_relay_options_that_cannot_work_are_config_errors_naming_the_step(
        step: dict[str, object], message: str) -> None:
    raw = {"device": {"id": "gw"},
           "pipeline": [{"name": "relay", "trigger": "fog/+/#",
                         "steps": [{"action": "forward", **step}]}]}
    with pytest.raises(ConfigError, match=message) as exc:
        config.from_dict(raw, "agent.toml")
    assert "steps[0]" in str(exc.value)
