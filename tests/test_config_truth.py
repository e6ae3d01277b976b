"""`check-config` tells the truth: a config it accepts is one `run` runs and acts on.

What `run` would die on (a bad port, unreadable TLS files) or silently not do (an
unknown model, a step that never gets what it needs, a pipeline that sends
nothing) is refused by both commands with exit code 2 and one line naming the
file and the key. Passwords never appear in what either command prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from brokers import ROOT, Broker, Certs
from hypothesis import assume, given
from hypothesis import strategies as st

from agent import config
from agent.actions import registry
from agent.errors import ConfigError
from agent.urls import redact_text, redact_url

HEAD = '[device]\nid = "d"\ndata_dir = "{data}"\n'


def pipeline(steps: str, trigger: str = '"cams/+/jpeg"') -> str:
    return f'[[pipeline]]\nname = "p"\ntrigger = {trigger}\nsteps = [{steps}]\n'


RELAY = pipeline('{ action = "forward" }')


def write(tmp_path: Path, body: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD.format(data=tmp_path / "data") + body)
    return path


def check(path: Path) -> config.Config:
    """What `check-config` and `run` both do before anything starts."""
    cfg = config.load(path)
    config.preflight(cfg)
    return cfg


def fogwhisk(*args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=full, cwd=ROOT)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# -- what run would die on, or silently not do: refused, naming file and key ---------------

MISSING = "/nonexistent/fogwhisk"

REFUSED = {
    # case: (config body after [device], what the one-line message must name)
    "port_not_a_number": ('[uplink]\nurl = "mqtt://cloud.example:mqtt"\n' + RELAY,
                          "uplink.url"),
    "port_out_of_range": ('[local]\nurl = "mqtt://127.0.0.1:99999"\n' + RELAY, "local.url"),
    "port_zero": ('[uplink]\nurl = "mqtts://cloud.example:0"\n' + RELAY, "uplink.url"),
    "unknown_model": (pipeline('{ action = "decode" }, { action = "detect", model = "nope" }, '
                               '{ action = "publish" }'), "steps[1] (detect).model"),
    "label_the_model_lacks": (pipeline('{ action = "decode" }, { action = "detect", '
                                       'model = "shapes-ssd", labels = ["unicorn"] }, '
                                       '{ action = "publish" }'), "unicorn"),
    "window_after_decode": (pipeline('{ action = "decode" }, { action = "window", size = 3, '
                                     'fields = ["w"] }, { action = "publish" }'),
                            "steps[1] (window)"),
    "motion_without_decode": (pipeline('{ action = "motion" }, { action = "publish" }'),
                              "steps[0] (motion)"),
    "detect_without_decode": (pipeline('{ action = "detect", model = "shapes-ssd" }, '
                                       '{ action = "publish" }'), "steps[0] (detect)"),
    "track_without_detect": (pipeline('{ action = "decode" }, { action = "track" }, '
                                      '{ action = "publish" }'), "steps[1] (track)"),
    "filter_on_a_frame": (pipeline('{ action = "decode" }, { action = "filter", field = "x", '
                                   'op = "exists" }, { action = "publish" }'),
                          "steps[1] (filter)"),
    "step_after_forward": (pipeline('{ action = "forward" }, { action = "publish" }'),
                           "steps[1] (publish)"),
    "step_after_publish": (pipeline('{ action = "publish" }, { action = "forward" }'),
                           "steps[1] (forward)"),
    "forward_after_window": (pipeline('{ action = "window", size = 2, fields = ["w"] }, '
                                      '{ action = "forward" }'), "steps[1] (forward)"),
    "forward_a_camera_frame": (pipeline('{ action = "forward" }',
                                        '{ camera = "/dev/video0" }'), "steps[0] (forward)"),
    "decode_a_timer": (pipeline('{ action = "decode" }, { action = "publish" }',
                                '{ every_s = "1s" }'), "steps[0] (decode)"),
    "sends_nothing": (pipeline('{ action = "window", size = 2, fields = ["w"] }'),
                      "sends nothing"),
    "tls_ca_missing": (f'[uplink]\nurl = "mqtts://cloud.example"\nca = "{MISSING}/ca.pem"\n'
                       + RELAY, f"uplink.ca: {MISSING}/ca.pem"),
    "tls_ca_is_a_directory": ('[uplink]\nurl = "mqtts://cloud.example"\nca = "/tmp"\n' + RELAY,
                              "uplink.ca: /tmp"),
    "tls_cert_missing": (f'[uplink]\nurl = "mqtts://cloud.example"\ncert = "{MISSING}/c.pem"\n'
                         f'key = "{MISSING}/k.pem"\n' + RELAY, f"uplink.cert: {MISSING}/c.pem"),
    "tls_key_without_cert": (f'[uplink]\nurl = "mqtts://cloud.example"\nkey = "{ROOT}/README.md"'
                             '\n' + RELAY, "uplink.key"),
    "tls_files_on_plain_mqtt": (f'[uplink]\nurl = "mqtt://cloud.example"\nca = "{ROOT}/README.md"'
                                '\n' + RELAY, "uplink.ca"),
    "password_on_plain_mqtt": ('[uplink]\nurl = "mqtt://cloud.example"\nusername = "u"\n'
                               'password = "pw"\n' + RELAY, "uplink.password"),
    "password_in_a_plain_url": ('[uplink]\nurl = "mqtt://u:pw@cloud.example"\n' + RELAY,
                                "uplink.url"),
    "same_client_id_twice": ('[local]\nclient_id = "edge"\n[uplink]\nclient_id = "edge"\n'
                             + RELAY, "client_id"),
    "client_id_of_the_other_default": ('[local]\nclient_id = "fogwhisk-d-uplink"\n' + RELAY,
                                       "local.client_id"),
    "keepalive_beyond_mqtt": ('[uplink]\nkeepalive_s = "1d"\n' + RELAY, "uplink.keepalive_s"),
    "keepalive_not_whole": ('[uplink]\nkeepalive_s = "1.5s"\n' + RELAY, "uplink.keepalive_s"),
    "session_expiry_beyond_mqtt": ('[uplink]\nsession_expiry_s = 5000000000\n' + RELAY,
                                   "uplink.session_expiry_s"),
    "connect_timeout_zero": ('[local]\nconnect_timeout_s = 0\n' + RELAY,
                             "local.connect_timeout_s"),
    "duration_not_a_number": ('[telemetry]\ninterval_s = nan\n' + RELAY, "telemetry.interval_s"),
    "telemetry_every_zero": ('[telemetry]\ninterval_s = "0s"\n' + RELAY, "telemetry.interval_s"),
    "timer_every_zero": (pipeline('{ action = "publish" }', '{ every_s = 0 }'), "every_s"),
    "prefix_with_a_wildcard": ('[device]\n' + RELAY, "device.prefix"),  # body patched below
    "negative_inflight": ('[outbox]\ninflight = -1\n' + RELAY, "outbox.inflight"),
    "no_runtime_threads": ('[runtime]\nnum_threads = 0\n' + RELAY, "runtime.num_threads"),
    "empty_runtime_chain": ('[runtime]\nfallback = []\n' + RELAY, "runtime.fallback"),
    "unknown_runtime": ('[runtime]\nfallback = ["gpu"]\n'
                        + pipeline('{ action = "decode" }, { action = "detect", '
                                   'model = "shapes-ssd" }, { action = "publish" }'),
                        "runtime.fallback"),
    "camera_file_missing": (pipeline('{ action = "decode" }, { action = "publish" }',
                                     f'{{ camera = "{MISSING}/lobby.avi" }}'),
                            "trigger.camera"),
    "queue_zero": ('[[pipeline]]\nname = "p"\ntrigger = "a/#"\nqueue = 0\n'
                   'steps = [{ action = "forward" }]\n', "queue"),
    "user_action_parameter_unknown": (pipeline('{ action = "useractions:double", colour = 1 }, '
                                               '{ action = "publish" }'), "colour"),
    "memory_max_systemd_refuses": ('[service]\nmemory_max = "lots"\n' + RELAY,
                                   "service.memory_max"),
    "pipeline_name_with_nul": ('[[pipeline]]\nname = "p\\u0000"\ntrigger = "a/#"\n'
                               'steps = [{ action = "forward" }]\n', "name"),
    "relaying_its_own_output_on_one_broker": (
        '[local]\nurl = "mqtt://127.0.0.1:1883"\n[uplink]\nurl = "mqtt://localhost:1883"\n'
        + pipeline('{ action = "forward" }', '"+/d/#"'), "trigger"),
}


def body_of(case: str) -> str:
    body, _ = REFUSED[case]
    if case == "prefix_with_a_wildcard":  # [device] is in HEAD: set the key there
        return RELAY
    return body


def write_case(tmp_path: Path, case: str) -> Path:
    path = write(tmp_path, body_of(case), f"{case}.toml")
    if case == "prefix_with_a_wildcard":
        path.write_text(path.read_text().replace('id = "d"\n', 'id = "d"\nprefix = "fog/#"\n'))
    return path


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_run_cannot_do_is_a_config_error_naming_file_and_key(
        tmp_path: Path, case: str) -> None:
    path = write_case(tmp_path, case)
    with pytest.raises(ConfigError) as exc:
        check(path)
    message = str(exc.value)
    assert message.startswith(str(path)), message
    assert REFUSED[case][1] in message, message
    assert "\n" not in message, message


@pytest.mark.parametrize("case", ["port_out_of_range", "window_after_decode",
                                  "tls_ca_missing", "same_client_id_twice", "unknown_model"])
def test_check_config_and_run_both_refuse_with_exit_2_and_one_line(
        tmp_path: Path, case: str) -> None:
    """The real commands: exit 2 (systemd does not restart), one line, no traceback."""
    path = write_case(tmp_path, case)
    for command in ("check-config", "run"):
        r = fogwhisk(command, "-c", str(path))
        assert r.returncode == 2, (command, r.stderr)
        assert len(lines(r.stderr)) == 1, (command, r.stderr)
        assert "Traceback" not in r.stderr
        assert str(path) in r.stderr and REFUSED[case][1] in r.stderr, (command, r.stderr)
        assert r.stdout == "", (command, r.stdout)


# -- what it must keep accepting --------------------------------------------------------------

ACCEPTED = {
    "decode_motion_publish": pipeline('{ action = "decode" }, { action = "motion" }, '
                                      '{ action = "publish" }'),
    "camera_motion_publish": pipeline('{ action = "motion" }, { action = "publish" }',
                                      f'{{ camera = "{ROOT}/README.md" }}'),
    "vision_chain": pipeline('{ action = "decode" }, { action = "motion" }, '
                             '{ action = "detect", model = "shapes-ssd", labels = ["disc"] }, '
                             '{ action = "track" }, { action = "snapshot" }, '
                             '{ action = "filter", field = "type", op = "==", value = "new" }, '
                             '{ action = "publish" }'),
    "detections_published": pipeline('{ action = "decode" }, '
                                     '{ action = "detect", model = "shapes-ssd" }, '
                                     '{ action = "publish" }'),
    "readings_windowed": pipeline('{ action = "window", size = 3, fields = ["w"] }, '
                                  '{ action = "publish" }', '"meters/+/power"'),
    "readings_filtered_then_forwarded": pipeline('{ action = "filter", field = "t", op = ">", '
                                                 'value = 25 }, { action = "forward" }'),
    "timer_published": pipeline('{ action = "publish" }', '{ every_s = "10s" }'),
    "user_action_anywhere": pipeline('{ action = "useractions:double", factor = 3 }, '
                                     '{ action = "forward" }'),
    "user_action_last": pipeline('{ action = "decode" }, { action = "useractions:slow" }'),
    "durations_in_broker_tables": ('[local]\nkeepalive_s = "30s"\nconnect_timeout_s = "2s"\n'
                                   '[uplink]\nkeepalive_s = "1m"\nsession_expiry_s = "1d"\n'
                                   + RELAY),
    "password_to_a_loopback_broker": ('[local]\nurl = "mqtt://u:pw@127.0.0.1:1883"\n'
                                      '[uplink]\nurl = "mqtt://localhost"\nusername = "u"\n'
                                      'password = "pw"\n' + RELAY),
    "no_pipelines": "",
    "everything_on_one_broker": ('[local]\nurl = "mqtt://127.0.0.1:1883"\n'
                                 '[uplink]\nurl = "mqtt://127.0.0.1:1883"\n'
                                 + pipeline('{ action = "forward" }', '"sensors/#"')),
    "relaying_everything_to_another_broker": ('[uplink]\nurl = "mqtt://127.0.0.1:1884"\n'
                                              + pipeline('{ action = "forward" }', '"#"')),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_a_config_run_can_run_passes(tmp_path: Path, case: str) -> None:
    check(write(tmp_path, ACCEPTED[case]))


def test_broker_durations_take_units_as_everywhere_else(tmp_path: Path) -> None:
    cfg = check(write(tmp_path, ACCEPTED["durations_in_broker_tables"]))
    assert (cfg.local.keepalive_s, cfg.uplink.keepalive_s) == (30, 60)
    assert isinstance(cfg.uplink.keepalive_s, int)
    assert cfg.uplink.session_expiry_s == 86400


def test_tls_files_that_load_pass_and_relative_ones_are_beside_the_config(
        tmp_path: Path, certs: Certs) -> None:
    """Relative TLS paths are read from the config's directory, by check-config and run alike
    (a service's working directory is not the operator's)."""
    (tmp_path / "tls").mkdir()
    for name, src in (("ca.pem", certs.ca), ("dev.pem", certs.cert("cam-frontdoor")),
                      ("dev.key", certs.key("cam-frontdoor"))):
        (tmp_path / "tls" / name).write_bytes(Path(src).read_bytes())
    cfg = check(write(tmp_path, '[uplink]\nurl = "mqtts://cloud.example"\nca = "tls/ca.pem"\n'
                                'cert = "tls/dev.pem"\nkey = "tls/dev.key"\n' + RELAY))
    assert cfg.uplink.ca == str(tmp_path / "tls" / "ca.pem")
    assert cfg.uplink.key == str(tmp_path / "tls" / "dev.key")


def test_a_certificate_with_a_key_that_is_not_its_own_is_refused(
        tmp_path: Path, certs: Certs) -> None:
    path = write(tmp_path, f'[uplink]\nurl = "mqtts://cloud.example"\nca = "{certs.ca}"\n'
                           f'cert = "{certs.cert("cam-frontdoor")}"\n'
                           f'key = "{certs.key("gateway")}"\n' + RELAY)
    with pytest.raises(ConfigError, match=r"uplink\.cert.*uplink\.key"):
        check(path)


def test_a_model_whose_file_was_never_fetched_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGWHISK_MODEL_CACHE", str(tmp_path / "empty-cache"))
    path = write(tmp_path, pipeline('{ action = "decode" }, { action = "detect", '
                                    'model = "face" }, { action = "publish" }'))
    with pytest.raises(ConfigError, match=r"steps\[1\] \(detect\)\.model.*fetch-models"):
        check(path)


def test_a_user_action_whose_module_fails_to_import_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_action.py").write_text("raise RuntimeError('no sensor library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, pipeline('{ action = "broken_action:f" }, { action = "publish" }'))
    with pytest.raises(ConfigError, match=r"steps\[0\].*broken_action.*no sensor library"):
        check(path)


def test_every_builtin_action_declares_what_it_takes_and_gives() -> None:
    assert set(registry.FLOWS) == set(registry.BUILTINS)


# -- a failure at start is one line, and a config error inside it still exits 2 ---------------

FAULT = '''
"""Imported as a user action: makes a task of the agent's TaskGroup fail at start."""
from agent import systemd
from agent.errors import ConfigError


async def _broken(interval_s=None):
    raise {error}


systemd.watchdog_loop = _broken


def passthrough(msg):
    return msg
'''


def start_with_fault(tmp_path: Path, error: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "startup_fault.py").write_text(FAULT.format(error=error))
    path = write(tmp_path, '[local]\nurl = "mqtt://127.0.0.1:1"\n'
                           '[uplink]\nurl = "mqtt://u:s3cret@127.0.0.1:1"\n'
                 + pipeline('{ action = "startup_fault:passthrough" }, { action = "forward" }',
                            '"a/#"'))
    return fogwhisk("run", "-c", str(path),
                    env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})


def test_an_unexpected_error_at_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = start_with_fault(tmp_path, 'ValueError("Port out of range 0-65535 for '
                                   'mqtt://u:s3cret@127.0.0.1:1")')
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "ExceptionGroup" not in r.stderr, r.stderr
    last = lines(r.stderr)[-1]
    assert "ValueError" in last and "Port out of range" in last, r.stderr
    assert "s3cret" not in r.stderr, r.stderr


def test_the_debug_traceback_of_a_failure_carries_no_password(tmp_path: Path) -> None:
    (tmp_path / "startup_fault.py").write_text(FAULT.format(
        error='ValueError("cannot use mqtt://u:s3cret@127.0.0.1:1")'))
    path = write(tmp_path, '[local]\nurl = "mqtt://127.0.0.1:1"\n'
                 + pipeline('{ action = "startup_fault:passthrough" }, { action = "forward" }',
                            '"a/#"'))
    r = fogwhisk("--log-level", "debug", "run", "-c", str(path),
                 env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "mqtt://u:***@127.0.0.1:1" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr, r.stderr


LATE_FAULT = '''
"""Imported as a user action: a task of the agent fails a moment after it is ready."""
import asyncio

from agent import app


async def _broken(self):
    await asyncio.sleep(0.3)
    raise RuntimeError("a bug found while running")


app.Agent._telemetry_loop = _broken


def passthrough(msg):
    return msg
'''


def test_a_failure_while_running_keeps_its_traceback_and_exits_1(
        tmp_path: Path, local_broker: Broker) -> None:
    (tmp_path / "late_fault.py").write_text(LATE_FAULT)
    path = write(tmp_path, f'[local]\nurl = "{local_broker.url}"\n'
                           '[uplink]\nurl = "mqtt://127.0.0.1:1"\n'
                 + pipeline('{ action = "late_fault:passthrough" }, { action = "forward" }',
                            '"a/#"'))
    r = fogwhisk("run", "-c", str(path),
                 env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert r.returncode == 1, r.stderr
    assert " ready in " in r.stderr and "Traceback" in r.stderr, r.stderr
    assert lines(r.stderr)[-1] == "fogwhisk: RuntimeError: a bug found while running"


def test_a_config_error_raised_inside_the_task_group_still_exits_2(tmp_path: Path) -> None:
    r = start_with_fault(tmp_path, 'ConfigError("agent.toml: uplink.url: no such broker")')
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert lines(r.stderr)[-1] == "fogwhisk: bad config: agent.toml: uplink.url: no such broker"


# -- passwords are never printed --------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://u:s3cret@h:1883", "mqtt://u:***@h:1883"),
    ("mqtts://u:p@ss@h", "mqtts://u:***@h"),
    ("mqtt://:s3cret@h", "mqtt://:***@h"),
    ("mqtt://u@h", "mqtt://u@h"),
    ("mqtt://h:1883", "mqtt://h:1883"),
    ("mqtt://u:s3cret@h:notaport", "mqtt://u:***@h:notaport"),
    ("mqtt://u:s3cret@[::1:1883", "mqtt://u:***@[::1:1883"),
])
def test_redact_url_masks_only_the_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


SECRET_CHARS = st.characters(min_codepoint=33, max_codepoint=126,
                             blacklist_characters="'\"")


@given(st.text(SECRET_CHARS, min_size=3, max_size=20))
def test_no_password_survives_redaction(password: str) -> None:
    url = f"mqtt://u:{password}@h:1"
    assume(password not in "mqtt://u:***@h:1")
    assert redact_text(f"cannot reach {url}: refused") == "cannot reach mqtt://u:***@h:1: refused"
    assert password not in redact_url(url)


def test_redact_text_masks_every_url_in_a_message() -> None:
    text = "cannot reach 'mqtt://a:one@h1:1' nor mqtts://b:t@o@h2/x: refused"
    assert redact_text(text) == "cannot reach 'mqtt://a:***@h1:1' nor mqtts://b:***@h2/x: refused"


@pytest.mark.parametrize("body", [
    '[uplink]\nurl = "http://u:s3cret@cloud.example"\n' + RELAY,
    '[uplink]\nurl = "mqtts://u:s3cret@cloud.example:99999"\n' + RELAY,
    '[uplink]\nurl = "mqtts://u:s3cret@"\n' + RELAY,
    '[uplink]\nurl = "mqtt://u:s3cret@cloud.example"\n' + RELAY,
    '[uplink]\nurl = "mqtts://cloud.example"\npassword = 12345\n' + RELAY,
    '[uplink]\nurl = "mqtts://cloud.example"\npassword = ["s3cret"]\n' + RELAY,
])
def test_config_errors_about_a_broker_never_print_its_password(
        tmp_path: Path, body: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as exc:
        check(path)
    assert "s3cret" not in str(exc.value) and "12345" not in str(exc.value), exc.value
    assert "uplink" in str(exc.value)


def test_check_config_prints_no_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[local]\nurl = "mqtt://edge:s3cret@127.0.0.1:1883"\n'
                           '[uplink]\nurl = "mqtts://dev:p%40ss@cloud.example"\n'
                           'password = "an0ther"\n' + RELAY)
    r = fogwhisk("check-config", "-c", str(path))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "s3cret" not in out and "p%40ss" not in out and "an0ther" not in out, out
    assert "mqtt://edge:***@127.0.0.1:1883" in r.stdout
