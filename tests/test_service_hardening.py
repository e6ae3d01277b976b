"""The service sandbox: systemd's own score of the unit, the agent working inside
an emulation of it, the modes of what it writes, and setup waiting for apt's lock.

No systemd runs here, so the sandbox is rebuilt from the same kernel features
systemd uses: a seccomp filter from `systemd-analyze syscall-filter` (libseccomp
through ctypes), a private mount namespace with its own /proc, no capabilities.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_proc import RELAY, TESTS_DIR, AgentProcess, write_config
from brokers import ROOT, Broker
from helpers import Collector, publish_one

from agent import config, service
from agent.config import PROFILE_DIR
from agent.errors import ConfigError

PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is a perfect sandbox, 10 none at all
MODEL = ROOT / "agent" / "vision" / "catalog" / "shapes-ssd"


# --- the unit, as systemd judges it ------------------------------------------------

def analyze() -> str:
    assert SYSTEMD_ANALYZE, "systemd-analyze is missing: apt-get install systemd (scripts/setup)"
    return SYSTEMD_ANALYZE


def real_executable() -> str:
    """systemd-analyze checks that ExecStart= exists: point it at a real one."""
    script = Path(sys.prefix) / "bin" / "fogwhisk"
    return str(script if script.exists() else Path(sys.executable).resolve())


def make_config(tmp_path: Path, profile: str | None = "rpi4",
                service_table: dict[str, object] | None = None,
                pipelines: list[dict[str, object]] | None = None) -> config.Config:
    (tmp_path / "data").mkdir(exist_ok=True)
    device: dict[str, object] = {"id": "cam-frontdoor", "data_dir": str(tmp_path / "data")}
    if profile is not None:
        device["profile"] = profile
    raw: dict[str, object] = {"device": device}
    if service_table is not None:
        raw["service"] = service_table
    if pipelines is not None:
        raw["pipeline"] = pipelines
    return config.from_dict(raw, "test.toml")


def write_unit(tmp_path: Path, cfg: config.Config) -> Path:
    path = tmp_path / service.UNIT_NAME
    path.write_text(service.render_unit(cfg, service.UnitOptions(exec_path=real_executable())))
    return path


def unit_lines(unit: Path, key: str) -> list[str]:
    return [line.partition("=")[2] for line in unit.read_text().splitlines()
            if line.startswith(f"{key}=")]


def verify_output(unit: Path) -> str:
    proc = subprocess.run([analyze(), "verify", unit.name], capture_output=True, text=True,
                          cwd=unit.parent, check=False)
    return (proc.stdout + proc.stderr).strip() + (
        "" if proc.returncode == 0 else f"\nexit {proc.returncode}")


def exposure(unit: Path) -> float:
    """The "Overall exposure level" systemd-analyze gives the unit file, offline."""
    proc = subprocess.run([analyze(), "security", "--offline=true", unit.name],
                          capture_output=True, text=True, cwd=unit.parent, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, f"no exposure line in systemd-analyze security output:\n{proc.stdout}{proc.stderr}"
    return float(m.group(1))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_scores_at_most_2_in_systemd_analyze_security(
        profile: str, tmp_path: Path) -> None:
    """The unit of every board is sandboxed to an exposure of 2.0 or less, and verify is silent."""
    unit = write_unit(tmp_path, make_config(tmp_path, profile))
    assert verify_output(unit) == ""
    score = exposure(unit)
    assert score <= MAX_EXPOSURE, unit.read_text()


def test_the_exposure_score_falls_with_each_restriction(tmp_path: Path) -> None:
    """The score reads the unit: taking the syscall filter out raises it."""
    unit = write_unit(tmp_path, make_config(tmp_path, "rpi4"))
    hardened = exposure(unit)
    unit.write_text("\n".join(line for line in unit.read_text().splitlines()
                              if not line.startswith("SystemCallFilter=")) + "\n")
    assert exposure(unit) > hardened


@pytest.mark.parametrize("profile", PROFILES)
def test_cameras_stay_reachable_through_a_closed_device_policy(
        profile: str, tmp_path: Path) -> None:
    """PrivateDevices=yes would hide /dev/video*: the real /dev stays, the device cgroup is closed.

    DevicePolicy=closed is explicit also because systemd before 253 turns
    ProtectClock=yes into an implied `DeviceAllow=char-rtc r`, which alone
    would lock every camera out.
    """
    cfg = make_config(tmp_path, profile)
    unit = write_unit(tmp_path, cfg)
    assert "char-video4linux" in cfg.service.devices, "every board profile may carry a camera"
    assert unit_lines(unit, "PrivateDevices") == ["no"]
    assert unit_lines(unit, "DevicePolicy") == ["closed"]
    assert unit_lines(unit, "DeviceAllow") == [f"{d} rw" for d in cfg.service.devices]
    assert unit_lines(unit, "ProtectClock") == ["yes"]


def test_without_devices_the_unit_gets_a_private_dev(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "rpi4", service_table={"devices": []})
    unit = write_unit(tmp_path, cfg)
    assert unit_lines(unit, "PrivateDevices") == ["yes"]
    assert unit_lines(unit, "DeviceAllow") == [] and unit_lines(unit, "DevicePolicy") == []
    assert verify_output(unit) == ""
    assert exposure(unit) <= MAX_EXPOSURE


def test_coral_usb_reaches_usb_devices_and_the_netlink_libusb_needs(tmp_path: Path) -> None:
    """libusb_init fails without its hotplug netlink socket: the Coral profile adds AF_NETLINK."""
    unit = write_unit(tmp_path, make_config(tmp_path, "coral-usb"))
    assert "char-usb_device rw" in unit_lines(unit, "DeviceAllow")
    assert unit_lines(unit, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    rpi4 = write_unit(tmp_path, make_config(tmp_path, "rpi4"))
    assert unit_lines(rpi4, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]


def test_the_unit_carries_the_sandbox_settings(tmp_path: Path) -> None:
    unit = write_unit(tmp_path, make_config(tmp_path, "x86"))
    for key, want in [("SystemCallFilter", ["@system-service", "~@privileged"]),
                      ("SystemCallErrorNumber", ["EPERM"]),
                      ("SystemCallArchitectures", ["native"]),
                      ("ProtectProc", ["invisible"]), ("RemoveIPC", ["yes"]),
                      ("PrivateMounts", ["yes"]), ("UMask", ["0027"])]:
        assert unit_lines(unit, key) == want, key
    # Left out on purpose, with the reason in the unit (see the ProcSubset test below).
    assert unit_lines(unit, "ProcSubset") == []
    assert "ProcSubset=pid" in unit.read_text()  # named in the comment that says why not


@pytest.mark.parametrize(("table", "key"), [
    ({"devices": ["/dev/video*"]}, "service.devices"),
    ({"devices": ["video4linux"]}, "service.devices"),
    ({"devices": ["char-video4linux rw"]}, "service.devices"),
    ({"address_families": ["NETLINK"]}, "service.address_families"),
    ({"address_families": ["AF_NETLINK; rm"]}, "service.address_families"),
])
def test_a_device_or_family_systemd_would_not_take_is_a_config_error(
        table: dict[str, object], key: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "rpi4", service_table=table)
    with pytest.raises(ConfigError, match=re.escape(key)):
        service.render_unit(cfg, service.UnitOptions(exec_path="/usr/bin/true"))


def test_a_camera_pipeline_on_a_unit_without_devices_is_refused_at_install(
        tmp_path: Path) -> None:
    """With PrivateDevices=yes the camera could never open: say so before installing."""
    pipe = {"name": "door", "trigger": {"camera": "/dev/video0"},
            "steps": [{"action": "publish"}]}
    cfg = make_config(tmp_path, "rpi4", service_table={"devices": []}, pipelines=[pipe])
    with pytest.raises(ConfigError, match=r"service\.devices.*door.*/dev/video0"):
        service.render_unit(cfg, service.UnitOptions(exec_path="/usr/bin/true"))


# --- the agent inside the sandbox ------------------------------------------------------

INFER = textwrap.dedent("""
    import sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=sys.argv[1], num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.load(sys.argv[2]))
    it.invoke()
    print("inference done", flush=True)
""")


def run_with_proc(options: str) -> str:
    """INFER in a private mount namespace whose /proc is mounted with `options`."""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t proc -o {options} proc /proc && exec "$@"', "sh",
         sys.executable, "-c", INFER, str(MODEL / "shapes-ssd.tflite"),
         str(MODEL / "golden" / "input.npy")],
        capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "inference done" in out, out
    return out


def test_procsubset_pid_would_turn_xnnpack_off_so_the_unit_keeps_proc_whole() -> None:
    """ProcSubset=pid hides /proc/cpuinfo; XNNPACK's cpuinfo needs it (on ARM and x86).

    Without it the interpreter silently falls back to its reference kernels,
    about 100x slower here. ProtectProc=invisible (hidepid) leaves it alone.
    """
    xnnpack = "Created TensorFlow Lite XNNPACK delegate"
    hidden = run_with_proc("subset=pid")
    assert "failed to parse processor information from /proc/cpuinfo" in hidden
    assert xnnpack not in hidden
    unit_proc = run_with_proc("hidepid=invisible")
    assert xnnpack in unit_proc and "cpuinfo" not in unit_proc


# The sandbox: systemd's SystemCallFilter= (an allow list, then ~deny), with
# SystemCallErrorNumber=EPERM, and RestrictAddressFamilies= on socket(2), loaded
# through libseccomp; then exec the agent. It runs as root without capabilities
# (setpriv), so SQLite still tries its root-only fchown() and gets EPERM from
# ~@privileged (as user fogwhisk under the unit it does not even try).
SANDBOX = textwrap.dedent("""
    import ctypes, errno, json, os, socket, sys
    spec = json.loads(open(sys.argv[1]).read())
    lib = ctypes.CDLL(spec["libseccomp"], use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    CMP_EQ, CMP_GT = 4, 6
    ctx = lib.seccomp_init(ERRNO | errno.EPERM)

    def rule(action, nr, *cmps):
        arr = (Cmp * max(1, len(cmps)))(*cmps)
        assert lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr) == 0, nr

    sock = lib.seccomp_syscall_resolve_name(b"socket")
    for name in spec["allow"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0 and nr != sock:
            rule(ALLOW, nr)
    families = spec["families"]
    for af in range(max(families) + 1):
        if af in families:
            rule(ALLOW, sock, Cmp(0, CMP_EQ, af, 0))
        else:
            rule(ERRNO | errno.EAFNOSUPPORT, sock, Cmp(0, CMP_EQ, af, 0))
    rule(ERRNO | errno.EAFNOSUPPORT, sock, Cmp(0, CMP_GT, max(families), 0))
    assert lib.seccomp_load(ctx) == 0
    checks = []
    try:
        os.setuid(0)  # root may always do this, unless ~@privileged is in force
        checks.append("setuid allowed")
    except PermissionError:
        checks.append("setuid EPERM")
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
        checks.append("netlink allowed")
    except OSError as exc:
        checks.append(f"netlink {errno.errorcode[exc.errno]}")
    print("sandbox:", ", ".join(checks), flush=True)
    os.execv(sys.argv[2], sys.argv[2:])
""")


def syscall_set(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group, its nested groups expanded."""
    seen = set() if seen is None else seen
    out = subprocess.run([analyze(), "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                seen.add(word)
                names |= syscall_set(word, seen)
        else:
            names.add(word)
    return names


def sandbox_spec(unit: Path, out: Path) -> Path:
    """What the unit's SystemCallFilter= and RestrictAddressFamilies= lines allow, as JSON."""
    filters = unit_lines(unit, "SystemCallFilter")
    assert filters and not filters[0].startswith("~"), "the unit has no syscall allow list"
    allow: set[str] = set()
    for value in filters:
        groups = value.lstrip("~").split()
        names = set().union(*(syscall_set(g) if g.startswith("@") else {g} for g in groups))
        allow = allow - names if value.startswith("~") else allow | names
    (families,) = unit_lines(unit, "RestrictAddressFamilies")
    libseccomp = ctypes.util.find_library("seccomp")
    assert libseccomp, "libseccomp is missing (it comes with systemd)"
    out.write_text(json.dumps({
        "allow": sorted(allow), "libseccomp": libseccomp,
        "families": [int(getattr(socket, f)) for f in families.split()]}))
    return out


class SandboxedAgent(AgentProcess):
    """`python -m agent run` inside the emulated sandbox of `unit`, under umask `umask`."""

    def __init__(self, cfg: Path, unit: Path, umask: int = 0o022) -> None:
        self.config = cfg
        self.log_path = cfg.parent / "agent.log"
        spec = sandbox_spec(unit, cfg.parent / "sandbox.json")
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t proc -o hidepid=invisible proc /proc && exec "$@"', "sh",
                "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                sys.executable, "-c", SANDBOX, str(spec),
                sys.executable, "-m", "agent", "run", "-c", str(cfg)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(ROOT)])}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         cwd=str(cfg.parent), umask=umask)
        self.started = time.monotonic()


DETECT = """
[[pipeline]]
name = "shapes"
trigger = "cameras/+/jpeg"
steps = [{ action = "decode" }, { action = "detect", model = "shapes-ssd" },
         { action = "publish" }]
"""


def golden_jpeg() -> bytes:
    rgb = np.load(MODEL / "golden" / "input.npy")[0]
    return bytes(cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


@pytest.fixture
def agent_config(tmp_path: Path, local_broker: Broker, uplink_broker: Broker) -> Path:
    cfg = write_config(tmp_path / "agent.toml", local_broker, uplink_broker, RELAY + DETECT,
                       extra="[runtime]\nnum_threads = 1\n")
    # A data dir two levels below anything that exists: the agent creates all of it.
    cfg.write_text(cfg.read_text().replace(
        f'data_dir = "{tmp_path / "data"}"', f'data_dir = "{tmp_path / "var" / "fogwhisk"}"'))
    return cfg


def relay_and_detect(agent: AgentProcess, local: Broker, uplink: Broker) -> None:
    """A reading is relayed and a frame becomes a detection event at the uplink."""
    with Collector(uplink.url, ["fog/dev-test/sensors/#", "fog/dev-test/events/#"]) as cloud:
        deadline = time.monotonic() + 20
        while not cloud.snapshot("fog/dev-test/sensors/t"):  # the subscription is live
            assert time.monotonic() < deadline, agent.log()
            publish_one(local.url, "sensors/t", b'{"c": 21.5}')
            time.sleep(0.2)
        publish_one(local.url, "cameras/door/jpeg", golden_jpeg())
        event = cloud.wait_for(1, topic="fog/dev-test/events/#", timeout=30)[0]
    labels = {d["label"] for d in json.loads(event.payload)["detections"]}
    assert labels == {"disc"}, (event.payload, agent.log())


def created_modes(top: Path) -> dict[str, tuple[bool, str]]:
    """(is a directory, permission bits) of `top` and all below it, by path from its parent."""
    return {str(p.relative_to(top.parent)): (p.is_dir(), oct(p.stat().st_mode & 0o777))
            for p in (top, *top.rglob("*"))}


def test_the_agent_relays_detects_and_stores_inside_the_units_sandbox(
        tmp_path: Path, agent_config: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """SystemCallFilter, RestrictAddressFamilies and ProtectProc as the unit sets them
    leave relay, LiteRT with XNNPACK, the SQLite outbox and a clean stop working."""
    unit = write_unit(tmp_path, make_config(tmp_path, "x86"))
    agent = SandboxedAgent(agent_config, unit)
    try:
        agent.wait_ready()
        relay_and_detect(agent, local_broker, uplink_broker)
    finally:
        code = agent.stop()
    log = agent.log()
    # The filter really was in force: root was refused setuid, netlink was refused.
    assert "sandbox: setuid EPERM, netlink EAFNOSUPPORT" in log, log
    assert code == 0, log
    assert "Created TensorFlow Lite XNNPACK delegate" in log and "cpuinfo" not in log, log
    assert "Traceback" not in log and "Operation not permitted" not in log, log


def test_data_dir_files_are_0640_and_directories_0750_even_under_umask_022(
        tmp_path: Path, agent_config: Path, local_broker: Broker, uplink_broker: Broker) -> None:
    """Outside systemd (no UMask=0027) the agent still keeps its data from other users."""
    old = os.umask(0o022)  # the child inherits it: the agent must tighten it itself
    try:
        agent = AgentProcess(agent_config)
    finally:
        os.umask(old)
    try:
        agent.wait_ready()
        relay_and_detect(agent, local_broker, uplink_broker)
        modes = created_modes(tmp_path / "var")  # while open: the -wal and -shm exist too
    finally:
        assert agent.stop() == 0, agent.log()
    assert modes["var"] == modes["var/fogwhisk"] == (True, "0o750"), modes
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        assert modes[f"var/fogwhisk/{name}"] == (False, "0o640"), modes
    for path, (is_dir, mode) in modes.items():  # nothing else is wider either
        assert int(mode, 8) & ~(0o750 if is_dir else 0o640) == 0, (path, modes)


# --- scripts/setup: apt waits for another apt/dpkg -------------------------------------

APT_INSTALL = ROOT / "scripts" / "lib" / "apt-install"
DPKG_LOCK = Path("/var/lib/dpkg/lock-frontend")
HOLD = textwrap.dedent("""
    import fcntl, sys
    f = open(sys.argv[1], "a")
    fcntl.lockf(f, fcntl.LOCK_EX)  # a POSIX lock, as apt and dpkg take (flock(1) is not one)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


@pytest.fixture
def apt_env(tmp_path: Path) -> dict[str, str]:
    """apt with no sources and its own lists and cache: `update` is quick, offline, and
    leaves the machine's lists alone; install still takes the real dpkg locks."""
    apt = tmp_path / "apt"
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (apt / d).mkdir(parents=True)
    (apt / "sources.list").write_text("")
    conf = apt / "apt.conf"
    conf.write_text(f'Dir::Etc::sourcelist "{apt}/sources.list";\n'
                    f'Dir::Etc::sourceparts "{apt}/sources.list.d";\n'
                    f'Dir::State::lists "{apt}/lists";\n'
                    f'Dir::Cache "{apt}/cache";\n')
    assert os.geteuid() == 0, "apt-get install needs root: the suite runs as root"
    return {**os.environ, "APT_CONFIG": str(conf), "FOGWHISK_APT_LOCK_TIMEOUT_S": "60"}


@pytest.fixture
def hold() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """hold(path): another process holds apt's lock on `path` until .stdin.close()."""
    holders: list[subprocess.Popen[str]] = []

    def start(path: Path) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        holders.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in holders:
        if p.stdin is not None and not p.stdin.closed:
            p.stdin.close()
        p.wait(10)


def install_while_held(holder: subprocess.Popen[str], env: dict[str, str]) -> str:
    """Run apt-install, release the lock once it says it waits; return its stderr."""
    proc = subprocess.Popen([str(APT_INSTALL), "coreutils"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    waiting = proc.poll() is None  # still running with the lock held: it waits
    assert holder.stdin is not None
    holder.stdin.close()
    err = proc.communicate(timeout=120)[1]
    assert waiting and proc.returncode == 0, first + err
    return first + err


def test_setup_waits_for_the_dpkg_lock_and_says_so(
        apt_env: dict[str, str], hold: Callable[[Path], subprocess.Popen[str]]) -> None:
    """Another apt holding /var/lib/dpkg/lock-frontend: setup waits, then installs."""
    holder = hold(DPKG_LOCK)
    err = install_while_held(holder, apt_env)
    assert err.startswith(
        "setup: waiting for another apt/dpkg to finish (up to 60 s): "
        f"{DPKG_LOCK} is held by process {holder.pid} (python"), err
    assert "E: " not in err, err


def test_setup_waits_for_the_lists_lock_apt_get_update_would_not_wait_for(
        tmp_path: Path, apt_env: dict[str, str],
        hold: Callable[[Path], subprocess.Popen[str]]) -> None:
    """`apt-get update` ignores DPkg::Lock::Timeout for its lists lock (apt 2.6): setup waits."""
    lists_lock = tmp_path / "apt" / "lists" / "lock"
    holder = hold(lists_lock)
    raw = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=60", "update", "-qq"],
                         env=apt_env, capture_output=True, text=True, check=False)
    assert raw.returncode != 0 and "Could not get lock" in raw.stderr  # what setup had
    err = install_while_held(holder, apt_env)
    assert f"waiting for another apt/dpkg to finish (up to 60 s): {lists_lock} is held" in err
    assert "E: " not in err, err


def test_setup_gives_up_after_its_timeout_with_what_to_do(
        apt_env: dict[str, str], hold: Callable[[Path], subprocess.Popen[str]]) -> None:
    holder = hold(DPKG_LOCK)
    proc = subprocess.run([str(APT_INSTALL), "coreutils"],
                          env={**apt_env, "FOGWHISK_APT_LOCK_TIMEOUT_S": "1"},
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert (f"setup: gave up after 1 s: {DPKG_LOCK} is held by process {holder.pid} "
            "(python") in proc.stderr
    assert "run scripts/setup again" in proc.stderr and "E: " not in proc.stderr


def test_setup_updates_the_package_lists_before_installing(
        tmp_path: Path, apt_env: dict[str, str]) -> None:
    """A fresh machine needs `apt-get update` first; apt-get itself is real, only watched."""
    spy = tmp_path / "bin"
    spy.mkdir()
    calls = tmp_path / "calls"
    real = shutil.which("apt-get")
    (spy / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    (spy / "apt-get").chmod(0o755)
    env = {**apt_env, "PATH": f"{spy}:{apt_env['PATH']}"}
    proc = subprocess.run([str(APT_INSTALL), "coreutils", "mawk"], env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    update, install = (line.split() for line in calls.read_text().splitlines())
    assert update[0] == install[0] == "-o" and update[1].startswith("DPkg::Lock::Timeout=")
    assert update[2:] == ["update", "-qq"]
    assert install[2:] == ["install", "-y", "-qq", "--no-install-recommends", "coreutils", "mawk"]
