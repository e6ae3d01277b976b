"""`fogwhisk model rollout` against real agents: eight agent processes on one Mosquitto,
each running a detect pipeline on shapes-ssd (the catalog's own small model) with OTA on.

The eight agents are started once for the module (starting them is most of the cost);
each test rolls out a higher version than any before it, so the order of the tests
does not matter. The many-device logic is tested with simulated devices in
test_rollout.py; here, with 2 canaries: the canaries stop a release failing its trial
before wave 2, a good one reaches all eight, --resume after kill -9 pushes nobody twice,
and a release whose canaries passed their own shadow gate but agree poorly with the
active model is stopped by --min-agreement; throughout, every agent's event stream
arrives whole at the broker. Last, the device side of a stopped rollout: an empty
deploy makes an agent drop the update in hand.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_proc import AgentProcess, write_config
from brokers import ROOT, Broker
from candidates import catalog_dir, model_dir
from device import NAME, PIPELINE, Frames, Watch, ota_table, pack, push
from helpers import Collector, publish_one
from ota_util import Keys  # type: ignore[import-not-found]

from agent.ota.release import Policy
from agent.ota.rollout import Options, rollout

DEVICES = [f"fleet-{i}" for i in range(1, 9)]  # fleet-1 and fleet-2 are the canaries
# Up to four trials run at once beside eight agents on two cores: a sub-millisecond model's
# p95 then jumps past 2 x its baseline now and then ("too slow"). Latency is not what
# these tests are about; the trial's latency gate has its own tests.
LENIENT = {"max_latency_ratio": 1000.0}


@dataclass
class Fleet:
    broker: Broker
    agents: dict[str, AgentProcess]
    out: Path

    def logs(self) -> str:
        return "\n".join(f"--- {d}\n{a.log()[-3000:]}" for d, a in self.agents.items())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, ota_keys: Keys) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("rollout-fleet")
    broker = Broker("fleet", tmp / "broker").start()
    agents: dict[str, AgentProcess] = {}
    try:
        for d in DEVICES:  # all eight start at once, then each is waited for
            (tmp / d).mkdir()
            cfg = write_config(tmp / d / "agent.toml", broker, broker, PIPELINE, device=d,
                               extra=ota_table(ota_keys.pub_path, probation="1s"))
            agents[d] = AgentProcess(cfg)
        for a in agents.values():
            a.wait_ready(60)
        yield Fleet(broker, agents, tmp / "out")
    finally:
        for a in agents.values():
            a.kill()
        broker.kill()


def run(release: Path, f: Fleet, **options: Any) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    code = rollout(release, f.broker.url, devices=DEVICES,
                   options=Options(**{"wave_timeout_s": 120.0, **options}), as_json=True,
                   out=out, err=err, tick_s=0.05)
    return code, json.loads(out.getvalue()), err.getvalue()


def deployed(c: Collector, version: int) -> dict[str, int]:
    """Deploys of `version` per device, as the broker passed them on."""
    got: dict[str, int] = {}
    for m in c.snapshot("fog/+/models/+/deploy"):
        if m.payload and json.loads(m.payload)["signed"]["version"] == version:
            d = m.topic.split("/")[1]
            got[d] = got.get(d, 0) + 1
    return got


def states(f: Fleet) -> dict[str, dict[str, Any]]:
    """Each device's retained state report."""
    fence = "fence/rollout-fleet"
    with Collector(f.broker.url, [f"fog/+/models/{NAME}/state", fence]) as c:
        publish_one(f.broker.url, fence, b".")
        c.wait_for(1, topic=fence)
        return {m.topic.split("/")[1]: json.loads(m.payload)
                for m in c.snapshot(f"fog/+/models/{NAME}/state")}


def intact(c: Collector, sent: int, timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Each agent's events as the broker passed them on, once every agent's count reached
    the `sent` frames; each agent made exactly one event per frame, in seq order."""
    deadline = time.monotonic() + timeout
    while any(len(c.snapshot(f"fog/{d}/events/#")) < sent for d in DEVICES):
        assert time.monotonic() < deadline, {
            d: len(c.snapshot(f"fog/{d}/events/#")) for d in DEVICES}
        time.sleep(0.1)
    events = {d: [json.loads(m.payload) for m in c.snapshot(f"fog/{d}/events/#")]
              for d in DEVICES}
    for d, evs in events.items():
        seqs = [e["seq"] for e in evs]
        assert seqs == list(range(seqs[0], seqs[0] + sent)), (d, len(evs), sent)
    return events


def test_a_release_failing_its_trial_on_the_canaries_stops_before_wave_2(
        fleet: Fleet, ota_keys: Keys, tmp_path: Path) -> None:
    """A release whose model crashes the trial (SIGSEGV): the canaries reject it, the
    rollout stops with exit 1 and the reason, and the four other agents never get a
    deploy: their state still says version 1 with no update."""
    crashing = model_dir(tmp_path, "crash", knobs={"wrap": "litert", "crash": "invoke"})
    _, release = pack(crashing, 2, tmp_path / "out", ota_keys.private)
    before = states(fleet)
    with Collector(fleet.broker.url, "fog/+/models/+/deploy") as c:
        code, summary, err = run(release, fleet)
        got = {m.topic.split("/")[1] for m in c.snapshot()}
    assert code == 1, (summary, fleet.logs())
    assert summary["status"] == "aborted" and summary["wave"] == 1, summary
    assert re.match(r"[12] of 2 devices pushed failed", summary["reason"]), summary
    assert "aborted" in err
    assert summary["failures"], summary
    for f in summary["failures"]:
        assert f["state"] == "rejected" and f["reason"].startswith("trial crashed"), f
    assert got <= {"fleet-1", "fleet-2"}, got
    after = states(fleet)
    for d in DEVICES[2:]:
        assert after[d] == before[d], d
        assert after[d]["active"]["version"] == 1


def test_a_good_release_reaches_every_agent_and_every_event_arrives(
        fleet: Fleet, ota_keys: Keys, tmp_path: Path) -> None:
    """Waves of 2, 4 and 2: all eight commit version 3 while frames flow; every frame
    gives one event on each agent, in order, the version they name never going back."""
    _, release = pack(catalog_dir(), 3, tmp_path / "out", ota_keys.private,
                      policy=Policy(probation_s=1.0, **LENIENT))
    with Collector(fleet.broker.url, ["fog/+/events/#", "fog/+/models/+/deploy"]) as c, \
            Frames(fleet.broker.url, fps=4) as frames:
        code, summary, err = run(release, fleet)
        time.sleep(1.0)  # a few frames on the new version
        sent = frames.stop()
        events = intact(c, sent)
    assert code == 0, (summary["failures"], summary["reason"], err, fleet.logs())
    assert summary["status"] == "succeeded" and summary["waves"] == [2, 4, 2]
    assert summary["counts"] == {"committed": 8}
    assert deployed(c, 3) == {d: 1 for d in DEVICES}
    for d, evs in events.items():
        versions = [e["model"]["version"] for e in evs]
        assert versions == sorted(versions) and versions[-1] == 3, (d, versions)
    assert all(s["active"]["version"] == 3 for s in states(fleet).values())


def test_resume_after_kill_9_mid_wave_finishes_without_pushing_twice(
        fleet: Fleet, ota_keys: Keys, tmp_path: Path) -> None:
    """The rollout process is killed (-9) while wave 2 is in probation; --resume finishes
    it: all eight agents commit version 4, each got the release exactly once, and every
    frame sent meanwhile gave one event on each agent."""
    _, release = pack(catalog_dir(), 4, tmp_path / "out", ota_keys.private,
                      policy=Policy(probation_s=3.0, **LENIENT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agent", "model", "rollout", str(release), "--broker",
            fleet.broker.url, "--json"]
    record = f"fog/_rollouts/{NAME}-4"
    with Collector(fleet.broker.url, ["fog/+/models/+/deploy", record, "fog/+/events/#"]) as c, \
            Frames(fleet.broker.url, fps=4) as frames:
        first = subprocess.Popen([*base, *(a for d in DEVICES for a in ("--device", d))],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 90
            while not any(m.payload and "1" in json.loads(m.payload)["pushed"]
                          for m in c.snapshot(record)):
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, fleet.logs()
                time.sleep(0.05)
        finally:
            first.kill()
            first.wait()
        again = subprocess.run([*base, "--resume"], env=env, capture_output=True, text=True,
                               timeout=120, check=False)
        assert again.returncode == 0, (again.stdout[-3000:], fleet.logs())
        summary = json.loads(again.stdout)
        assert deployed(c, 4) == {d: 1 for d in DEVICES}
        sent = frames.stop()
        events = intact(c, sent)
    assert summary["status"] == "succeeded" and summary["counts"] == {"committed": 8}
    assert all(s["active"]["version"] == 4 for s in states(fleet).values())
    assert all(evs[-1]["model"]["version"] == 4 for evs in events.values())


def blind(text: str) -> str:
    """shapes-ssd behind a decoder threshold no frame reaches (its golden detections cut,
    so it passes the trial on its raw outputs): a model that loads, runs and sees nothing."""
    text = re.sub(r"(?m)^min_score = .*$", "min_score = 0.999", text)
    return text[:text.index("[[golden.detections]]")]


def test_canaries_agreeing_poorly_in_shadow_stop_the_rollout_by_the_ml_metric(
        fleet: Fleet, ota_keys: Keys, tmp_path: Path) -> None:
    """A release whose model sees nothing, with a device-side shadow gate that lets it
    through (policy.shadow.min_agreement 0, rate ratio from 0): both canaries evaluate it
    on the live frames, pass their own gate and commit it, reporting agreement F1 0.0.
    The rollout, --min-agreement 0.6, stops after the canaries' wave on that median:
    exit 1 with the figure, the six others never get a deploy, and every agent's event
    stream stays whole."""
    _, release = pack(model_dir(tmp_path, "blind", edit=blind), 5, tmp_path / "out",
                      ota_keys.private, policy=Policy(probation_s=1.0, **LENIENT, shadow={
                          "frames": 10, "max_share": 1.0, "max_duration": 120,
                          "min_agreement": 0.0, "rate_ratio": [0.0, 3.0]}))
    before = states(fleet)
    with Collector(fleet.broker.url, ["fog/+/events/#", "fog/+/models/+/deploy"]) as c, \
            Frames(fleet.broker.url, fps=5) as frames:
        code, summary, err = run(release, fleet, min_agreement=0.6)
        sent = frames.stop()
        intact(c, sent)
    assert code == 1, (summary, err, fleet.logs())
    assert summary["status"] == "aborted" and summary["wave"] == 1, summary
    assert summary["reason"] == ("the canaries' shadow agreement median 0.00 over 2 of 2 "
                                 "canaries (--min-agreement 0.6)"), summary["reason"]
    assert summary["agreement"] == {"median": 0.0, "reported": 2, "canaries": 2,
                                    "gate": 0.6, "skipped": False}
    assert summary["counts"]["committed"] == 2 and summary["failures"] == [], summary
    assert "aborted" in err and "median 0.00" in err
    assert set(deployed(c, 5)) == {"fleet-1", "fleet-2"}
    after = states(fleet)
    for d in DEVICES[:2]:
        shadow = after[d]["update"]["shadow"]
        assert after[d]["active"]["version"] == 5 and shadow["f1"] == 0.0, after[d]
        assert shadow["frames"] == 10 and shadow["active_per_frame"] > 0, shadow
    for d in DEVICES[2:]:
        assert after[d] == before[d], d


def test_an_empty_deploy_drops_the_update_in_hand_and_the_active_model_keeps_running(
        tmp_path: Path, broker: Broker, ota_keys: Keys) -> None:
    """What a stopped rollout tells a device, an empty retained deploy: version 2 in its
    trial ends `rejected: cancelled by the operator` while version 1 detects every frame;
    during version 3's probation, a first one drops version 4, which was waiting for the
    probation to end (it never starts), a second one rolls version 3 back to version 1
    with that reason."""
    cfg = write_config(tmp_path / "agent.toml", broker, broker, PIPELINE, device="solo",
                       extra=ota_table(ota_keys.pub_path, probation="60s"))
    agent = AgentProcess(cfg)
    agent.wait_ready()
    slow = model_dir(tmp_path, "slow-load", knobs={"wrap": "litert", "load_ms": 4000})
    _, v2 = pack(slow, 2, tmp_path / "o2", ota_keys.private)
    _, v3 = pack(catalog_dir(), 3, tmp_path / "o3", ota_keys.private)
    _, v4 = pack(catalog_dir(), 4, tmp_path / "o4", ota_keys.private)
    deploy = f"fog/solo/models/{NAME}/deploy"
    try:
        with Watch(broker.url, device="solo") as watch, Frames(broker.url) as frames:
            watch.wait_events(3)
            push(v2, broker, "solo")
            watch.state(2, "trial", agent)
            publish_one(broker.url, deploy, b"", retain=True)
            got = watch.state(2, "rejected", agent)
            assert got["update"]["reason"] == "cancelled by the operator", got
            assert got["active"]["version"] == 1
            push(v3, broker, "solo")
            watch.state(3, "probation", agent)
            push(v4, broker, "solo")
            agent.wait_log("version 4 waits")
            publish_one(broker.url, deploy, b"", retain=True)
            agent.wait_log("version 4 dropped")
            assert watch.latest()["update"]["state"] == "probation"
            publish_one(broker.url, deploy, b"", retain=True)
            got = watch.state(3, "rolled_back", agent)
            assert got["update"]["reason"] == "cancelled by the operator", got
            assert got["active"]["version"] == 1
            n = len(watch.events())
            watch.wait_events(n + 10)  # a second at 10 fps: version 4 would have started
            sent = frames.stop()
            events = watch.wait_events(sent)
            reports = watch.states()
    finally:
        agent.stop()
    assert [d for d in reports if (d["update"] or {}).get("version") == 4] == []
    assert len(events) == sent
    versions = [e["model"]["version"] for e in events]
    runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    assert runs == [1, 3, 1], runs
    errors = [ln for ln in agent.log().splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert all("rolled back to 1: cancelled by the operator" in ln for ln in errors), errors
