"""No message, broker or disk stops the agent or loses what it accepted.

Real agent processes, real Mosquitto, real SQLite files; a second process
holding a write transaction, read-only mounts. Each test reproduces one defect
of the hardening issue.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, prime, write_config
from brokers import Broker
from chaos.stream import Stream, received, verdict, wait_all
from helpers import Collector, publish_many
from proxy import Proxy

from agent.config import OutboxConfig
from agent.delivery.store import BALLAST_BYTES, BALLAST_NAME, DB_NAME, Store, reserve_for
from agent.errors import ConfigError
from agent.messages import Outgoing

MAX_TOPIC = 65535


def _until(cond: Callable[[], bool], what: str, agent: AgentProcess,
           timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert agent.running, f"agent exited with {agent.proc.poll()}:\n{agent.log()[-4000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{agent.log()[-4000:]}"
        time.sleep(0.1)


def _db(data: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{(data / DB_NAME).as_uri()}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _count(data: Path, sql: str) -> int:
    db = _db(data)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


def outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "outbox", *args],
                          capture_output=True, text=True, timeout=30, check=False)


# -- 1. a poison row --------------------------------------------------------------


RELAY_AND_EVENTS = RELAY + """
[[pipeline]]
name = "events"
trigger = "events/#"
steps = [{ action = "publish", topic = "{prefix}/{device}/ev/{topic}" }]
"""


def _telemetry_pipelines(cloud: Collector) -> dict[str, Any]:
    msgs = cloud.snapshot(f"fog/{DEVICE}/telemetry")
    return dict(json.loads(msgs[-1].payload)["pipelines"]) if msgs else {}


def test_a_reading_whose_outgoing_topic_would_be_too_long_is_dropped_and_the_rest_flow(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """A reading on a legal topic of 65,530 bytes would become longer than 65,535 bytes
    once `forward` (or a `publish` template with {topic}) prefixes it: the step counts it
    as malformed, drops it and acknowledges its input; the readings behind it arrive, in
    order, the agent keeps running, and a restarted agent is not offered it again."""
    pad = "x" * (65530 - len("sensors/"))  # under "fog/dev-test/": 65,543 bytes
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY_AND_EVENTS)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, "sensors/a", [b"0", b"1"])
            publish_many(local_broker.url, "events/a", [b'{"n": 0}'])
            publish_many(local_broker.url, f"sensors/{pad}", [b"poison"])
            publish_many(local_broker.url, f"events/{pad}", [b'{"n": -1}'])
            publish_many(local_broker.url, "sensors/a", [b"2", b"3"])
            publish_many(local_broker.url, "events/a", [b'{"n": 1}'])
            got = cloud.wait_for(4, topic=f"fog/{DEVICE}/sensors/a", timeout=15)
            assert [m.payload for m in got] == [b"0", b"1", b"2", b"3"]
            events = cloud.wait_for(2, topic=f"fog/{DEVICE}/ev/events/a", timeout=15)
            assert [json.loads(m.payload)["n"] for m in events] == [0, 1]
            _until(lambda: _telemetry_pipelines(cloud).get("relay", {}).get("malformed") == 1
                   and _telemetry_pipelines(cloud).get("events", {}).get("malformed") == 1,
                   "the two poison readings were not counted as malformed", agent)
            assert "longer than 65535" in agent.log()
            # Nothing left behind: no row waits, no input is held.
            data = tmp_path / "data"
            _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0, "rows left", agent)
            assert _count(data, "SELECT count(*) FROM dead") == 0
        finally:
            assert agent.stop() == 0, agent.log()
    # Their inputs were acknowledged: the local broker does not offer them again.
    agent = AgentProcess(cfg, log_name="second.log")
    try:
        agent.wait_ready()
        time.sleep(1.0)
        assert "65535" not in agent.log()
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_topic_template_that_can_never_make_a_valid_topic_is_a_config_error(
        tmp_path: Path) -> None:
    """A wildcard in a forward/publish template, or an empty one, is refused when the
    config loads: exit 2, naming the template and the reason."""
    for step, text in (('{ action = "forward", topic = "{prefix}/+/{topic}" }', "wildcard"),
                       ('{ action = "publish", topic = "a/#" }', "wildcard"),
                       ('{ action = "forward", topic = "" }', "empty")):
        cfg = write_config(tmp_path / "agent.toml", "mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1",
                           f'[[pipeline]]\nname = "p"\ntrigger = "s/#"\nsteps = [{step}]\n')
        r = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 2 and text in r.stderr and "topic template" in r.stderr, r


def _poisoned_outbox(data: Path) -> None:
    """An outbox written before the fix: unpublishable rows first in lane 0, then good ones."""
    data.mkdir(parents=True)
    store = Store(data / DB_NAME, OutboxConfig())
    bad = [
        f"fog/{DEVICE}/" + "x" * MAX_TOPIC,  # longer than MQTT allows
        f"fog/{DEVICE}/sensors/+/wild",  # a wildcard: the broker would disconnect us
        f"fog/{DEVICE}/sensors/nul\0byte",
    ]
    rows = [Outgoing(t, b"poison", f"{DEVICE}:old:{i}", "relay") for i, t in enumerate(bad)]
    rows += [Outgoing(f"fog/{DEVICE}/sensors/old", str(n).encode(), f"{DEVICE}:old:{100 + n}",
                      "relay") for n in range(50)]
    store.commit(rows, [], [], 0, True)
    store.close()


def test_unpublishable_rows_already_in_the_outbox_are_dead_lettered_and_the_lane_drains(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """Rows an older agent stored on topics no broker takes (too long, a wildcard, NUL)
    sit first in their lane: the sender dead-letters each with its reason and delivers
    the 50 rows behind them, in order; the agent keeps running."""
    data = tmp_path / "data"
    _poisoned_outbox(data)
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            got = cloud.wait_for(50, topic=f"fog/{DEVICE}/sensors/old", timeout=20)
            assert [m.payload for m in got] == [str(n).encode() for n in range(50)]
            _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0, "lane not drained",
                   agent)
            assert agent.running
        finally:
            assert agent.stop() == 0, agent.log()
    db = _db(data)
    dead = db.execute("SELECT topic, reason FROM dead ORDER BY id").fetchall()
    db.close()
    assert len(dead) == 3, dead
    reasons = [r for _, r in dead]
    assert "longer than 65535" in reasons[0]
    assert "wildcard" in reasons[1]
    assert "NUL" in reasons[2]
    # The CLI shows each dead letter with its reason.
    peek = outbox_cli("peek", "--data-dir", str(data), "--dead")
    assert peek.returncode == 0, peek.stderr
    for reason in reasons:
        assert reason[:40] in peek.stdout, peek.stdout
    assert len(peek.stdout) < 5000  # a 65 kB topic is shortened, not printed whole
    stats = outbox_cli("stats", "--data-dir", str(data))
    assert "dead letters: 3" in stats.stdout, stats.stdout


def test_qos0_uplink_rows_leave_the_outbox_once_sent_and_never_fill_the_window(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """A `forward` with qos = 0 upstream: a QoS 0 PUBLISH has no PUBACK, so it counts as
    delivered once queued; 200 readings (ten times the in-flight window of 20) all
    arrive and none stays in the outbox."""
    pipelines = RELAY.replace('{ action = "forward" }', '{ action = "forward", qos = 0 }')
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, pipelines)
    data = tmp_path / "data"
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_ready()
            prime(local_broker, cloud, agent, "sensors/marker")
            publish_many(local_broker.url, "sensors/q0", [str(n).encode() for n in range(200)])
            got = cloud.wait_for(200, topic=f"fog/{DEVICE}/sensors/q0", timeout=15)
            assert sorted(int(m.payload) for m in got) == list(range(200))
            _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0, "rows left", agent)
        finally:
            assert agent.stop() == 0, agent.log()


# -- 2. a healthy outbox is kept -------------------------------------------------------

WAITING = 50


def _outbox_with_rows(data: Path, n: int = WAITING) -> None:
    """An outbox a stopped agent left behind: `n` readings waiting for the uplink."""
    data.mkdir(parents=True, exist_ok=True)
    store = Store(data / DB_NAME, OutboxConfig())
    store.commit([Outgoing(f"fog/{DEVICE}/sensors/kept", str(i).encode(), f"{DEVICE}:old:{i}",
                           "relay") for i in range(n)], [], [], 0, True)
    store.close()


class Holder:
    """A second process holding a write transaction (BEGIN IMMEDIATE) on a database."""

    def __init__(self, path: Path) -> None:
        code = ("import sqlite3, sys\n"
                "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('held', flush=True)\n"
                "sys.stdin.readline()\n"
                "db.execute('COMMIT')\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            assert self.proc.wait(10) == 0


def test_an_outbox_locked_by_another_process_is_waited_for_never_moved_aside(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """"database is locked" is not corruption: an agent starting while another process
    holds a write transaction on its outbox waits, keeps the file and, once the lock is
    gone, delivers the 50 readings waiting in it. A lock taken while it runs only
    delays commits: the readings that arrive meanwhile are delivered too."""
    data = tmp_path / "data"
    _outbox_with_rows(data)
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    holder = Holder(data / DB_NAME)
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg)
        try:
            agent.wait_log("locked by another process")
            time.sleep(1.0)
            assert agent.running
            assert not list(data.glob(f"{DB_NAME}.corrupt-*"))
            holder.release()
            got = cloud.wait_for(WAITING, topic=f"fog/{DEVICE}/sensors/kept", timeout=20)
            assert [m.payload for m in got] == [str(i).encode() for i in range(WAITING)]
            prime(local_broker, cloud, agent, "sensors/marker")
            holder = Holder(data / DB_NAME)  # while it runs
            publish_many(local_broker.url, "sensors/new", [str(i).encode() for i in range(20)])
            time.sleep(1.5)
            holder.release()
            got = cloud.wait_for(20, topic=f"fog/{DEVICE}/sensors/new", timeout=20)
            assert [m.payload for m in got] == [str(i).encode() for i in range(20)]
            _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0, "rows left", agent)
            assert not list(data.glob(f"{DB_NAME}.corrupt-*"))
        finally:
            holder.release()
            assert agent.stop() == 0, agent.log()


def _read_only(kind: str, data: Path) -> Callable[[], None]:
    """Make `data` (a read-only mount) or its outbox file (immutable) unwritable, even for
    root; returns the undo."""
    if kind == "read-only mount":
        src = data.with_name("data-src")
        data.rename(src)
        data.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(data)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(data)], check=True)

        def undo() -> None:
            subprocess.run(["umount", "-l", str(data)], check=True)
            data.rmdir()
            src.rename(data)
        return undo
    subprocess.run(["chattr", "+i", str(data / DB_NAME)], check=True)
    return lambda: subprocess.run(["chattr", "-i", str(data / DB_NAME)], check=True) and None


@pytest.mark.parametrize("kind", ["read-only mount", "immutable file"])
def test_a_read_only_outbox_stops_the_agent_with_exit_2_and_keeps_every_row(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker, kind: str) -> None:
    """An outbox that cannot be written (a read-only mount, or `chattr +i`, which stops
    root too) is neither moved aside nor replaced: the agent says which file and what to
    do, and exits 2 (systemd's RestartPreventExitStatus: no restart loop). Once it is
    writable again, the next start delivers every reading that was waiting in it."""
    data = tmp_path / "data"
    _outbox_with_rows(data)
    before = (data / DB_NAME).read_bytes()
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY)
    undo = _read_only(kind, data)
    try:
        agent = AgentProcess(cfg)
        assert agent.wait_exit() == 2, agent.log()
        log = agent.log()
        assert str(data / DB_NAME) in log and "read-only" in log, log
        assert "Traceback" not in log, log
        assert (data / DB_NAME).read_bytes() == before
        assert not list(data.glob(f"{DB_NAME}.corrupt-*"))
    finally:
        undo()
    with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
        agent = AgentProcess(cfg, log_name="second.log")
        try:
            got = cloud.wait_for(WAITING, topic=f"fog/{DEVICE}/sensors/kept", timeout=20)
            assert [m.payload for m in got] == [str(i).encode() for i in range(WAITING)]
        finally:
            assert agent.stop() == 0, agent.log()


def test_an_outbox_from_a_newer_agent_is_kept_and_refused_not_moved_aside(
        tmp_path: Path) -> None:
    """A schema this agent does not read (an OTA rollback after a newer agent ran) is no
    corruption: the file is kept where it is with its rows, and opening it is a
    ConfigError (exit 2) that names the file and the way out."""
    _outbox_with_rows(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("UPDATE meta SET v = '2' WHERE k = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="has schema 2; this agent reads 1") as err:
        Store(tmp_path / DB_NAME, OutboxConfig())
    assert str(tmp_path / DB_NAME) in str(err.value)
    assert _count(tmp_path, "SELECT count(*) FROM rows") == WAITING
    assert _count(tmp_path, "SELECT v FROM meta WHERE k = 'schema'") == 2
    assert not list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))


# -- 3. a small disk recovers ----------------------------------------------------------

PAYLOAD_BYTES = 2000


def _outbox_telemetry(cloud: Collector, agent: AgentProcess, after: float) -> dict[str, Any]:
    """The outbox counters of the first telemetry document the agent made after `after`."""
    found: dict[str, Any] = {}

    def fresh() -> bool:
        for m in cloud.snapshot(f"fog/{DEVICE}/telemetry"):
            doc = json.loads(m.payload)
            if doc["ts"] > after:
                found.update(doc.get("outbox", {}))
                return True
        return False
    _until(fresh, "no telemetry", agent)
    return found


def test_the_disk_reserve_is_an_eighth_of_the_file_system_at_most_8_mb_none_when_tiny() -> None:
    assert reserve_for(2 << 20) == 256 << 10
    assert reserve_for(16 << 20) == 2 << 20
    assert reserve_for(64 << 20) == reserve_for(32 << 30) == BALLAST_BYTES == 8 << 20
    assert reserve_for(256 << 10) == 0  # a 32 kB reserve would help no one


@pytest.mark.parametrize(("size", "crash"), [("2m", False), ("16m", False), ("2m", True)],
                         ids=["2MB", "16MB", "2MB-kill-9-while-full"])
def test_a_small_disk_filled_during_an_outage_drains_completely_once_the_uplink_is_back(
        tmp_path: Path, local_broker: Broker, uplink_broker: Broker, size: str,
        crash: bool) -> None:
    """`data_dir` on a real tmpfs of 2 MB (too small for the usual 8 MB reserve) or 16 MB.
    The uplink is down; readings arrive until the disk is full and commits fail (nothing
    acknowledged: the local broker keeps the rest); in one case the agent is killed then
    and started again on the full disk. Once the uplink is back every accepted reading
    arrives, the outbox empties, `commit_errors` stops growing, and the disk reserve
    (sized to the file system) is back for the next outage."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(data)],
                   check=True)
    proxy = Proxy(uplink_broker.port)
    stream = Stream(local_broker.url, topic="sensors/fill", pad=b"x" * PAYLOAD_BYTES)
    try:
        cfg = write_config(tmp_path / "agent.toml", local_broker, proxy.url, RELAY,
                           extra="[outbox]\nmin_free_bytes = 0",  # let the disk itself fill
                           uplink_extra="keepalive_s = 2")
        with Collector(uplink_broker.url, f"fog/{DEVICE}/#") as cloud:
            agent = AgentProcess(cfg)
            try:
                agent.wait_ready()
                prime(local_broker, cloud, agent, "sensors/marker")
                _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0, "not primed",
                       agent)
                proxy.refuse()
                proxy.cut()
                deadline = time.monotonic() + 60
                while "commit failed" not in agent.log():  # SQLITE_FULL: the disk is full
                    assert time.monotonic() < deadline, agent.log()[-3000:]
                    stream.publish(100)
                    time.sleep(0.05)
                stream.publish(300)  # more while the disk is full: held upstream
                time.sleep(1.0)
                assert agent.running
                if crash:
                    agent.kill()
                    agent = AgentProcess(cfg, log_name="second.log")
                    agent.wait_ready()
                    time.sleep(1.0)
                proxy.forward()
                wait_all(cloud, DEVICE, stream.accepted, topic="sensors/fill", timeout_s=90)
                _until(lambda: _count(data, "SELECT count(*) FROM rows") == 0,
                       "the outbox never emptied", agent, timeout_s=30)
                emptied = time.time()
                errors = _outbox_telemetry(cloud, agent, emptied).get("commit_errors", 0)
                later = _outbox_telemetry(cloud, agent, emptied + 3)  # three reports on
                assert later.get("commit_errors", 0) == errors and later["backlog"] == 0
                verdict(received(cloud, DEVICE, "sensors/fill"), stream.accepted,
                        faults=3 if crash else 2, window=20)
                # Back to normal: new readings flow and the reserve is there again.
                stream.publish(10)
                wait_all(cloud, DEVICE, stream.accepted, topic="sensors/fill")
                st = os.statvfs(data)
                reserve = data / BALLAST_NAME
                _until(lambda: reserve.exists() and reserve.stat().st_size
                       == reserve_for(st.f_blocks * st.f_frsize), "no reserve", agent)
            finally:
                assert agent.stop() == 0, agent.log()[-3000:]
    finally:
        stream.stop()
        proxy.close()
        subprocess.run(["umount", "-l", str(data)], check=True)
