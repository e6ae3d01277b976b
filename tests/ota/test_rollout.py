"""`fogwhisk model rollout`: waves, the gates that stop it, its record on the broker.

The decisions are tested pure (Fleet, judge) and then through real Mosquitto against
simulated devices (tests/bench/fleet_sim.py: one connection answering deploys for many
device ids with the state documents an agent publishes), so the many-device logic costs
no agent processes. Real agents: test_rollout_fleet.py.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import ROOT, Broker
from helpers import Collector, publish_one
from ota_util import NOW, SHAPES, Keys  # type: ignore[import-not-found]

from agent.errors import ConfigError, OtaError
from agent.ota import pack as packing
from agent.ota.rollout import (
    Fleet,
    MaxFailed,
    Options,
    Record,
    judge,
    plan_waves,
    rollout,
)

NAME = "shapes-ssd"
SIM = ROOT / "tests" / "bench" / "fleet_sim.py"
RECORD = f"fog/_rollouts/{NAME}-2"


# -- pure: the plan and the decisions --------------------------------------------------------


def test_waves_are_the_canaries_then_grow_by_the_factor() -> None:
    ids = [f"d{i}" for i in range(30)]
    assert [len(w) for w in plan_waves(ids, 2, 2)] == [2, 4, 8, 16]
    assert [len(w) for w in plan_waves(ids[:10], 2, 2)] == [2, 4, 4]
    assert [len(w) for w in plan_waves(ids, 1, 3)] == [1, 3, 9, 17]
    assert [len(w) for w in plan_waves(ids[:7], 2, 1.5)] == [2, 3, 2]
    assert [len(w) for w in plan_waves(ids[:3], 5, 2)] == [3]
    assert [d for w in plan_waves(ids, 2, 2) for d in w] == ids  # order kept: canaries first


def test_max_failed_is_a_share_of_the_pushed_devices_or_a_count() -> None:
    ten = MaxFailed.parse("10%")
    assert not ten.reached(0, 30)
    assert not ten.reached(2, 30) and ten.reached(3, 30)  # 3 of 30 is exactly 10%
    assert ten.reached(1, 2) and not ten.reached(1, 11)
    three = MaxFailed.parse("3")
    assert not three.reached(2, 2) and three.reached(3, 1000)
    assert str(ten) == "10%" and str(three) == "3"
    for bad in ("0%", "101%", "0", "-1", "ten", "5.5"):
        with pytest.raises(ConfigError, match="--max-failed"):
            MaxFailed.parse(bad)


def state_doc(seq: int, version: int | None, state: str | None, reason: str | None = None,
              f1: float | None = None) -> bytes:
    update = None if version is None else {"version": version, "state": state,
                                           "progress": None, "reason": reason, "ts": 1.0}
    if update is not None and f1 is not None:
        update["shadow"] = {"frames": 200, "f1": f1}
    return json.dumps({"name": NAME, "active": {"version": 1, "sha256": "0", "since": 1.0},
                       "previous": None, "update": update, "seq": seq, "ts": 1.0}).encode()


def test_a_report_counts_only_when_it_is_about_this_version_and_newer_than_the_last() -> None:
    """Reports about another version, with an older seq, or unreadable change nothing."""
    fleet = Fleet(2, ["a", "b"])
    fleet.push(["a"], {})
    assert fleet.outcome("a") == "waiting" and fleet.outcome("b") == "pending"
    fleet.offer("a", state_doc(5, 2, "trial"))
    assert fleet.outcome("a") == "trial"
    fleet.offer("a", state_doc(4, 2, "rejected", "late and stale"))
    fleet.offer("a", state_doc(6, 3, "rejected", "another version"))
    fleet.offer("a", state_doc(7, None, None))
    fleet.offer("a", b"{not json")
    fleet.offer("a", state_doc(8, True, "rejected"))  # type: ignore[arg-type]
    fleet.offer("intruder", state_doc(9, 2, "committed"))
    assert fleet.outcome("a") == "trial"
    assert fleet.tally() == (1, 0, 1)
    fleet.offer("a", state_doc(9, 2, "rolled_back", "p95 too high"))
    assert fleet.tally() == (1, 1, 0)
    assert fleet.failures == {"a": ("rolled_back", "p95 too high")}


def test_a_device_that_had_refused_the_version_counts_only_a_report_after_its_push() -> None:
    """A rejection from before the push (an earlier, cancelled rollout) says nothing
    about this push; the device's next report does."""
    fleet = Fleet(2, ["a"])
    fleet.offer("a", state_doc(3, 2, "rejected", "cancelled by the operator"))
    stale = fleet.stale_of(["a"])
    assert stale == {"a": 3}
    fleet.push(["a"], stale)
    assert fleet.outcome("a") == "waiting" and fleet.tally() == (1, 0, 1)
    fleet.offer("a", state_doc(4, 2, "downloading"))
    fleet.offer("a", state_doc(5, 2, "committed"))
    assert fleet.outcome("a") == "committed" and fleet.tally() == (1, 0, 0)


def record(devices: list[str], **options: Any) -> Record:
    opts = Options(**options)
    return Record(NAME, 2, "x", opts, plan_waves(devices, opts.canary, opts.wave_factor),
                  pushing={0: 100.0}, pushed={0: 100.0})


def test_failures_stop_the_rollout_as_soon_as_the_rest_cannot_bring_them_under() -> None:
    ids = [f"d{i}" for i in range(12)]
    rec = record(ids, max_failed=MaxFailed.parse("25%"))
    fleet = Fleet(2, ids)
    fleet.push(rec.waves[0], {})
    for d in rec.waves[0]:
        fleet.offer(d, state_doc(2, 2, "committed"))
    assert judge(rec, fleet, 101.0).action == "next"
    rec.wave = 1
    rec.pushing[1] = rec.pushed[1] = 101.0
    fleet.push(rec.waves[1], {})  # 6 pushed: 2 failures are 33% whatever the rest do
    fleet.offer("d2", state_doc(2, 2, "rejected", "golden mismatch"))
    assert judge(rec, fleet, 102.0).action == "wait"  # 1 of 6: the others may succeed
    fleet.offer("d3", state_doc(2, 2, "rolled_back", "error rate"))
    v = judge(rec, fleet, 102.0)
    assert v.action == "abort", v
    assert v.reason.startswith("2 of 6 devices pushed failed (33% of them, 2 of 4 finished)"
                               ": --max-failed is 25%; 2 still working"), v.reason


def test_a_wave_past_its_timeout_times_out_the_devices_still_working() -> None:
    ids = [f"d{i}" for i in range(6)]
    rec = record(ids, wave_timeout_s=60)
    fleet = Fleet(2, ids)
    fleet.push(rec.waves[0], {})
    fleet.offer("d0", state_doc(2, 2, "committed"))
    fleet.offer("d1", state_doc(2, 2, "downloading"))
    assert judge(rec, fleet, 159.0).action == "wait"
    v = judge(rec, fleet, 160.0)
    assert (v.action, v.devices) == ("time_out", ("d1",))
    fleet.time_out("d1", "no final state within 1m (last: downloading)")
    assert fleet.outcome("d1") == "timed_out" and fleet.tally() == (2, 1, 0)
    fleet.offer("d1", state_doc(3, 2, "committed"))  # too late: the decision stands
    assert fleet.outcome("d1") == "timed_out"
    assert judge(rec, fleet, 160.0).action == "abort"  # 1 of 2 is above 10%


def test_the_canaries_median_agreement_is_a_gate_skipped_when_none_reports_one() -> None:
    ids = [f"d{i}" for i in range(6)]
    for f1s, action in (((0.3, 0.5), "abort"), ((0.9, 0.55), "next"), ((None, None), "next"),
                        ((0.2, None), "abort")):
        rec = record(ids, canary=2, min_agreement=0.6)
        fleet = Fleet(2, ids)
        fleet.push(rec.waves[0], {})
        for d, f1 in zip(rec.waves[0], f1s, strict=True):
            fleet.offer(d, state_doc(2, 2, "shadow", f1=f1))
            fleet.offer(d, state_doc(3, 2, "committed"))  # the f1 seen before is kept
        v = judge(rec, fleet, 101.0)
        assert v.action == action, (f1s, v)
        if action == "abort":
            assert "the canaries' shadow agreement median" in v.reason
            assert "(--min-agreement 0.6)" in v.reason


# -- simulated devices through Mosquitto -------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes-ssd version 2, packed and signed (simulated devices do not check it)."""
    from ota_util import make_keys  # type: ignore[import-not-found]

    tmp = tmp_path_factory.mktemp("rollout-release")
    keys: Keys = make_keys(tmp / "keys")
    return packing.pack(SHAPES, 2, tmp / "out", keys.private, now=NOW)[1]


class Sim:
    """tests/bench/fleet_sim.py as a process: `count` devices sim-00000, sim-00001, ..."""

    def __init__(self, broker: Broker, tmp: Path, count: int,
                 plan: dict[str, Any] | None = None, step_s: float = 0.02) -> None:
        plan_path = tmp / f"plan-{uuid.uuid4().hex[:6]}.json"
        plan_path.write_text(json.dumps(plan or {}))
        self.ids = [f"sim-{i:05d}" for i in range(count)]
        self.proc = subprocess.Popen(
            [sys.executable, str(SIM), "--broker", broker.url, "--name", NAME,
             "--count", str(count), "--plan", str(plan_path), "--step-s", str(step_s)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sim_factory(broker: Broker, tmp_path: Path) -> Iterator[Any]:
    made: list[Sim] = []

    def make(count: int, plan: dict[str, Any] | None = None, step_s: float = 0.02) -> Sim:
        made.append(Sim(broker, tmp_path, count, plan, step_s))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def run_rollout(release: Path, broker: Broker, devices: list[str], **options: Any
                ) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    code = rollout(release, broker.url, devices=devices, options=Options(**options),
                   as_json=True, out=out, err=err, tick_s=0.05)
    return code, json.loads(out.getvalue()), err.getvalue()


def retained(broker: Broker, topic_filter: str) -> dict[str, bytes]:
    """Every retained message under `topic_filter` (a fence message marks the end)."""
    fence = f"fence/{uuid.uuid4().hex}"
    with Collector(broker.url, [topic_filter, fence]) as c:
        publish_one(broker.url, fence, b".")
        c.wait_for(1, topic=fence)
        return {m.topic: m.payload for m in c.snapshot(topic_filter)}


def deploys(c: Collector) -> tuple[dict[str, int], dict[str, int]]:
    """Releases and empty deploys per device published while `c` listened (the retained
    ones it found when it subscribed are left out)."""
    full: dict[str, int] = {}
    empty: dict[str, int] = {}
    for m in c.snapshot("fog/+/models/+/deploy"):
        if m.retain:
            continue
        d = m.topic.split("/")[1]
        counts = full if m.payload else empty
        counts[d] = counts.get(d, 0) + 1
    return full, empty


def test_a_good_release_reaches_every_device_wave_after_wave(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """30 simulated devices: waves of 2, 4, 8 and 16, each pushed only after every device
    of the one before committed; each device gets the release exactly once; the record
    retained on the broker says succeeded; no canary reported a shadow summary, so the
    agreement gate was skipped and the summary says so."""
    sim = sim_factory(30)
    with Collector(broker.url, ["fog/+/models/+/deploy", "fog/+/models/+/state"]) as c:
        code, summary, err = run_rollout(release, broker, sim.ids)
        msgs = c.snapshot()
    assert code == 0, (summary, err)
    assert summary["status"] == "succeeded" and summary["waves"] == [2, 4, 8, 16]
    assert summary["counts"] == {"committed": 30} and summary["failures"] == []
    assert summary["agreement"]["skipped"] is True
    full, empty = deploys(c)
    assert full == {d: 1 for d in sim.ids} and empty == {}
    waves = plan_waves(sim.ids, 2, 2)
    for before, after in itertools.pairwise(waves):
        committed = max(i for i, m in enumerate(msgs) if m.topic.endswith("/state")
                        and m.topic.split("/")[1] in before
                        and b'"state":"committed"' in m.payload)
        first = min(i for i, m in enumerate(msgs) if m.topic.endswith("/deploy")
                    and m.topic.split("/")[1] in after)
        assert committed < first
    rec = Record.from_json(retained(broker, RECORD)[RECORD])
    assert rec.status == "succeeded" and sorted(rec.pushed) == [0, 1, 2, 3]
    assert retained(broker, f"{RECORD}/owner") == {}  # cleared when it finished


def test_failures_reaching_max_failed_stop_the_rollout_and_devices_in_flight_drop_it(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """40 devices, --max-failed 10%: the canaries commit; in the second wave one device
    rejects while three are still in their trial. 1 of 6 pushed is past 10% whatever
    those three do: the rollout stops at once, the three get an empty retained deploy
    (and report `rejected: cancelled by the operator`), the 34 others never get a
    deploy, and the exit code is 1 with the reason."""
    slow = {"hold_s": 30}
    plan = {"devices": {"sim-00002": {"outcome": "rejected", "reason": "golden mismatch: 1"},
                        "sim-00003": slow, "sim-00004": slow, "sim-00005": slow}}
    sim = sim_factory(40, plan)
    with Collector(broker.url, ["fog/+/models/+/deploy", "fog/+/models/+/state"]) as c:
        code, summary, err = run_rollout(release, broker, sim.ids)
        in_flight = ["sim-00003", "sim-00004", "sim-00005"]
        deadline = time.monotonic() + 10
        while True:
            dropped = {m.topic.split("/")[1] for m in c.snapshot("fog/+/models/+/state")
                       if b"cancelled by the operator" in m.payload}
            if dropped == set(in_flight) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert code == 1
    assert summary["status"] == "aborted" and summary["wave"] == 2
    assert summary["reason"].startswith("1 of 6 devices pushed failed (17% of them, 1 of 3 "
                                        "finished): --max-failed is 10%"), summary["reason"]
    assert "rollout of shapes-ssd 2 aborted: 1 of 6" in err
    assert summary["failures"] == [{"device": "sim-00002", "state": "rejected",
                                    "reason": "golden mismatch: 1"}]
    assert summary["cancelled"] == in_flight and summary["never_pushed"] == 34
    assert dropped == set(in_flight)
    full, empty = deploys(c)
    assert full == {d: 1 for d in sim.ids[:6]}
    assert empty == {d: 1 for d in in_flight}
    left = retained(broker, "fog/+/models/+/deploy")
    assert sorted(t.split("/")[1] for t in left) == ["sim-00000", "sim-00001", "sim-00002"]
    assert Record.from_json(retained(broker, RECORD)[RECORD]).status == "aborted"
    with pytest.raises(OtaError, match="told 3 devices to drop it; a device answers one "
                       "release document once"):
        run_rollout(release, broker, sim.ids)


def test_a_device_that_never_answers_times_out_and_counts_as_failed(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """One silent device of ten, --wave-timeout 1s, --max-failed 20%: it times out with
    its last state in the reason, 1 of 10 stays under the limit, the rollout finishes."""
    sim = sim_factory(10, {"devices": {"sim-00003": {"outcome": "silent"}}})
    code, summary, err = run_rollout(release, broker, sim.ids, wave_timeout_s=1.0,
                                     max_failed=MaxFailed.parse("20%"))
    assert code == 0, (summary, err)
    assert summary["status"] == "succeeded"
    assert summary["counts"] == {"committed": 9, "timed_out": 1}
    assert summary["failures"] == [{"device": "sim-00003", "state": "timed_out",
                                    "reason": "no final state within 1 s (last: waiting)"}]


def test_low_canary_agreement_stops_the_rollout_before_the_second_wave(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """Both canaries pass and commit, but their shadow summaries say F1 0.3 and 0.5: the
    median 0.4 is under --min-agreement 0.6, so nobody else gets the release."""
    plan = {"devices": {"sim-00000": {"f1": 0.3}, "sim-00001": {"f1": 0.5}}}
    sim = sim_factory(8, plan)
    with Collector(broker.url, "fog/+/models/+/deploy") as c:
        code, summary, _ = run_rollout(release, broker, sim.ids)
    assert code == 1
    assert summary["reason"] == ("the canaries' shadow agreement median 0.40 over 2 of 2 "
                                 "canaries (--min-agreement 0.6)")
    assert summary["agreement"] == {"median": 0.4, "reported": 2, "canaries": 2,
                                    "gate": 0.6, "skipped": False}
    assert summary["counts"] == {"committed": 2} and summary["cancelled"] == []
    assert deploys(c) == ({"sim-00000": 1, "sim-00001": 1}, {})


# -- the command: kill -9 and --resume, two operators --------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "model", "rollout", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class RecordWatch:
    """The rollout record as retained on the broker, followed live."""

    def __init__(self, broker: Broker, topic: str = RECORD) -> None:
        self.topic = topic
        self.c = Collector(broker.url, topic).start()

    def latest(self) -> dict[str, Any] | None:
        got = [m for m in self.c.snapshot() if m.payload]
        return json.loads(got[-1].payload) if got else None

    def wait(self, what: str, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rec = self.latest()
            if rec is not None and ok(rec):
                return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"no record with {what}; last: {rec}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.c.stop()


def test_resume_after_kill_9_mid_wave_finishes_without_pushing_a_device_twice(
        broker: Broker, release: Path, sim_factory: Any, tmp_path: Path) -> None:
    """The rollout process is killed (-9) while its second wave is in trial; --resume
    (another process) finds the record and the owner cleared by the broker, watches that
    wave to its end and pushes the rest: every device got the release exactly once. A
    --watch started between the two follows the rollout to its end across both."""
    sim = sim_factory(14, {"default": {"hold_s": 1.0}})
    ids = tmp_path / "devices.txt"
    ids.write_text("# canaries first\n" + "\n".join(sim.ids) + "\n")
    watch = RecordWatch(broker)
    with Collector(broker.url, "fog/+/models/+/deploy") as c:
        first = subprocess.Popen(cli(str(release), "--broker", broker.url, "--devices",
                                     str(ids), "--json"), env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            watch.wait("wave 2 pushed", lambda r: "1" in r["pushed"])
            time.sleep(0.3)
        finally:
            first.kill()
            first.wait()
        assert deploys(c)[0] == {d: 1 for d in sim.ids[:6]}
        follower = subprocess.Popen(cli(str(release), "--broker", broker.url, "--watch"),
                                    env=env(), stdout=subprocess.PIPE, text=True)
        again = subprocess.run(cli(str(release), "--broker", broker.url, "--resume",
                                   "--json"), env=env(), capture_output=True, text=True,
                               timeout=60, check=False)
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        full, empty = deploys(c)
        followed, _ = follower.communicate(timeout=30)
    watch.stop()
    assert follower.returncode == 0, followed
    assert "rollout shapes-ssd 2: succeeded" in followed
    assert summary["status"] == "succeeded" and summary["counts"] == {"committed": 14}
    assert full == {d: 1 for d in sim.ids} and empty == {}
    decisions = [d["decision"] for d in summary["decisions"]]
    assert decisions.count("wave 2: deployed to 4 devices") == 1, decisions


def test_two_operators_see_one_rollout_and_only_one_runs_it(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """While one process runs the rollout, starting it again is refused (use --resume),
    --resume is refused while the owner's connection is open (use --watch), and --watch
    follows it to the same outcome without pushing anything."""
    sim = sim_factory(6, {"default": {"hold_s": 0.5}})
    devices = [a for d in sim.ids for a in ("--device", d)]
    watch = RecordWatch(broker)
    owner = subprocess.Popen(cli(str(release), "--broker", broker.url, *devices), env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        watch.wait("wave 1 pushed", lambda r: "0" in r["pushed"])
        again = subprocess.run(cli(str(release), "--broker", broker.url, *devices),
                               env=env(), capture_output=True, text=True, timeout=30, check=False)
        assert again.returncode == 1
        assert "a rollout of shapes-ssd version 2 is on the broker (running, wave 1 of 2, " \
               "run by pid" in again.stderr, again.stderr
        assert "--resume continues it" in again.stderr
        resumed = subprocess.run(cli(str(release), "--broker", broker.url, "--resume"),
                                 env=env(), capture_output=True, text=True, timeout=30, check=False)
        assert resumed.returncode == 1
        assert f"is being run by pid {owner.pid}" in resumed.stderr, resumed.stderr
        follower = subprocess.run(cli(str(release), "--broker", broker.url, "--watch"),
                                  env=env(), capture_output=True, text=True, timeout=60,
                                  check=False)
        out, _ = owner.communicate(timeout=60)
    finally:
        owner.kill()
        watch.stop()
    assert owner.returncode == 0, out
    assert follower.returncode == 0, follower.stderr
    assert "rollout shapes-ssd 2: succeeded" in out
    assert "rollout shapes-ssd 2: succeeded" in follower.stdout, follower.stdout
    assert "committed 6" in follower.stdout


def test_the_command_refuses_bad_options_before_it_connects(
        release: Path, tmp_path: Path) -> None:
    """Usage errors exit 2 naming the option; a rollout needs devices; nothing listens on
    the broker port given, so anything else would have failed differently."""
    url = "mqtt://127.0.0.1:9"
    for args, text in ((["--device", "a", "--canary", "0"], "--canary 0"),
                       (["--device", "a", "--max-failed", "0%"], "--max-failed"),
                       (["--device", "a", "--wave-timeout", "soon"], "--wave-timeout"),
                       (["--device", "a", "--device", "a"], "device a is listed twice"),
                       (["--device", "a/b"], "'a/b' is not one topic level"),
                       ([], "--devices FILE or --device ID is needed")):
        got = subprocess.run(cli(str(release), "--broker", url, *args), env=env(),
                             capture_output=True, text=True, timeout=30, check=False)
        assert got.returncode == 2, (args, got.stderr)
        assert text in got.stderr, (args, got.stderr)



def test_a_wave_cut_mid_push_is_resumed_with_only_the_devices_without_the_release(
        broker: Broker, release: Path, sim_factory: Any) -> None:
    """The record says the push of a 200-device wave began and never says it ended (the
    process died in the middle): --resume reads every retained deploy (all 150, not the
    first 20 the broker's in-flight window lets through before a fence) and pushes only
    the 50 devices without the release."""
    import hashlib

    from agent.ota import push as pushing

    sim = sim_factory(200)
    pushing.push(release, broker.url, devices=sim.ids[:150], out=io.StringIO())
    rec = Record(NAME, 2, hashlib.sha256(release.read_bytes()).hexdigest(),
                 Options(canary=200), [sim.ids], pushing={0: time.time()}, started=time.time())
    publish_one(broker.url, RECORD, json.dumps(rec.to_json()).encode(), retain=True)
    with Collector(broker.url, "fog/+/models/+/deploy") as c:
        out = io.StringIO()
        code = rollout(release, broker.url, resume=True, as_json=True, out=out,
                       err=io.StringIO(), tick_s=0.05)
        summary = json.loads(out.getvalue())
    assert code == 0, summary
    assert summary["counts"] == {"committed": 200}
    assert deploys(c) == ({d: 1 for d in sim.ids[150:]}, {})
    assert "wave 1: deployed to 50 devices (150 had it already)" in \
        [d["decision"] for d in summary["decisions"]]
