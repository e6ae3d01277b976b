"""Bad configuration stops the agent with exit code 2 and a message naming file and key;
refused credentials are a failure that is logged once and retried, never "connected"."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_proc import DEVICE, RELAY, AgentProcess, wait_status, write_config
from brokers import Broker, BrokerFactory
from helpers import Collector

BAD_CONFIGS = {
    # name: (text after [device] id, what the message must name)
    "unknown_key": ('[device]\nid = "d"\ncolour = "blue"\n', "colour"),
    "unknown_table": ('[device]\nid = "d"\n[uplnk]\nurl = "mqtt://h"\n', "uplnk"),
    "wrong_type": ('[device]\nid = "d"\n[outbox]\nmax_messages = "many"\n',
                   "outbox.max_messages"),
    "wrong_size": ('[device]\nid = "d"\n[outbox]\nmax_bytes = "lots"\n', "outbox.max_bytes"),
    "missing_required": ('[device]\ndata_dir = "/tmp/x"\n', "'id'"),
    "missing_device": ('[local]\nurl = "mqtt://127.0.0.1:1"\n', "[device]"),
    "bad_profile": ('[device]\nid = "d"\nprofile = "toaster"\n', "toaster"),
    "unknown_action": ('[device]\nid = "d"\n[[pipeline]]\nname = "p"\ntrigger = "a/#"\n'
                       'steps = [{ action = "frobnicate" }]\n', "frobnicate"),
    "bad_step_param": ('[device]\nid = "d"\n[[pipeline]]\nname = "p"\ntrigger = "a/#"\n'
                       'steps = [{ action = "window", fields = ["w"], size = "ten" }]\n',
                       "size"),
    "bad_trigger": ('[device]\nid = "d"\n[[pipeline]]\nname = "p"\ntrigger = "a/#/b"\n'
                    'steps = [{ action = "forward" }]\n', "a/#/b"),
    "bad_url": ('[device]\nid = "d"\n[uplink]\nurl = "http://cloud"\n', "uplink"),
    "not_toml": ('[device\nid = "d"\n', "TOML"),
}


def fogwhisk(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_exits_2_naming_the_file_and_the_key(tmp_path: Path, case: str) -> None:
    text, named = BAD_CONFIGS[case]
    cfg = tmp_path / f"{case}.toml"
    cfg.write_text(text)
    for command in ("check-config", "run"):
        r = fogwhisk(command, "-c", str(cfg))
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert str(cfg) in r.stderr, (command, r.stderr)
        assert named in r.stderr, (command, r.stderr)


def test_check_config_prints_the_effective_config_with_the_profile_applied(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text('[device]\nid = "d"\nprofile = "rpi4"\n[outbox]\nmax_bytes = "1MB"\n'
                   + RELAY)
    r = fogwhisk("check-config", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert '"max_bytes": 1000000' in r.stdout  # the file wins over the profile
    assert '"num_threads": 3' in r.stdout  # from rpi4


@pytest.fixture
def locked_uplink(broker_factory: BrokerFactory, tmp_path: Path) -> Broker:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "s3cret"],
                   check=True, capture_output=True)
    passwd.chmod(0o600)
    return broker_factory("uplink", f"allow_anonymous false\npassword_file {passwd}\n")


def test_refused_credentials_are_logged_once_retried_and_never_reported_connected(
    tmp_path: Path, local_broker: Broker, locked_uplink: Broker
) -> None:
    wrong = write_config(tmp_path / "wrong.toml", local_broker, locked_uplink, RELAY,
                         uplink_extra='username = "agent"\npassword = "guess"')
    with Collector(locked_uplink.url, f"fog/{DEVICE}/#", username="agent",
                   password="s3cret") as cloud:
        agent = AgentProcess(wrong, log_name="wrong.log")
        try:
            agent.wait_ready()
            agent.wait_log("refused", timeout=10)
            # Let it retry a few times (backoff 0.1 s .. 1 s).
            deadline = time.monotonic() + 10
            while locked_uplink.log().count("not authorised") < 3:
                assert time.monotonic() < deadline, locked_uplink.log()
                time.sleep(0.1)
            log = agent.log()
            refusals = [ln for ln in log.splitlines() if "refused" in ln and "uplink" in ln]
            assert len(refusals) == 1, log
            assert "not authori" in refusals[0].lower() or "password" in refusals[0].lower(), log
            assert "uplink: connected" not in log, log
            assert cloud.snapshot() == []  # no birth message ever
        finally:
            assert agent.stop() == 0, agent.log()

        right = write_config(tmp_path / "right.toml", local_broker, locked_uplink, RELAY,
                             uplink_extra='username = "agent"\npassword = "s3cret"')
        agent = AgentProcess(right, log_name="right.log")
        try:
            agent.wait_ready()
            wait_status(cloud, "online", agent)
        finally:
            assert agent.stop() == 0, agent.log()
