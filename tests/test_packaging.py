"""The wheel works installed: relay-only without the vision stack, and [vision] with models.

One wheel, built once from this working tree (a copy, so the build leaves
nothing in the checkout), installed into fresh venvs made from the system
Python with nothing of the checkout on sys.path:

- `pip install fogwhisk`: no numpy, OpenCV or LiteRT; profiles and broker
  configs come from the wheel; a relay runs through real Mosquitto; a config
  that needs the vision stack exits 2 naming fogwhisk[vision].
- `scripts/install-service --wheel`: a config with a detect step gets the
  vision extra and its model fetched through pip (the issue's "no model
  'person' (known: none; ...site-packages/models/...)"), and check-config
  passes; `fogwhisk model fetch face` then makes a face pipeline valid too.

The installed sizes print with `pytest -s`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_proc import DEVICE, RELAY, write_config
from brokers import ROOT, Broker
from helpers import Collector, publish_many

RELAY_BUDGET_BYTES = 40 * 2**20  # what `pip install fogwhisk` adds to a venv
VENV_TOOLS = ("pip", "setuptools", "pkg_resources", "_distutils_hack")  # `python -m venv`'s
SYSTEM_PYTHON = shutil.which("python3") or sys.executable
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".tools-venv", ".cache", "build", "dist",
                                     "*.egg-info", "__pycache__", ".hypothesis", ".*_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, from a copy of the working tree."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(src),
         "--wheel-dir", str(work / "dist")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    (found,) = (work / "dist").glob("fogwhisk-*.whl")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would let a venv import the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FOGWHISK_MODEL_CACHE")}
    return {**env, **extra}


def venv_runner(venv: Path, cwd: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        exe = venv / "bin" / args[0]
        return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True,
                              check=False, env=clean_env(), cwd=cwd, timeout=300)
    return run


def site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3*/site-packages")
    return found


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024


def installed_size(venv: Path) -> tuple[int, int]:
    """(all of site-packages, what the install added beyond the venv's own pip/setuptools)."""
    sp = site_packages(venv)
    tools = sum(du_bytes(p) for p in sp.iterdir()
                if p.name.split("-")[0].lower() in VENV_TOOLS)
    total = du_bytes(sp)
    return total, total - tools


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def test_relay_only_install_relays_through_mosquitto_without_the_vision_stack(
        wheel: Path, tmp_path: Path, broker_factory: Callable[..., Broker]) -> None:
    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          str(wheel)], capture_output=True, text=True, check=False,
                         env=clean_env())
    assert pip.returncode == 0, pip.stderr
    run = venv_runner(venv, tmp_path)

    probe = run("python", "-c", "import agent, importlib.util as u; print(agent.__file__); "
                "print([m for m in ('numpy', 'cv2', 'ai_edge_litert') if u.find_spec(m)]); "
                "from agent import resources as r; "
                "print(r.path('broker-config', 'test.conf').is_file(), "
                "r.path('firmware-profiles', 'rpi-zero2w.toml').is_file(), "
                "r.path('cli', 'demo_camera.toml').is_file())")
    assert probe.returncode == 0, probe.stderr
    where, vision_found, data_found = probe.stdout.splitlines()
    assert where.startswith(str(site_packages(venv))), "the venv imports the wheel's agent"
    assert vision_found == "[]", "pip install fogwhisk brings no vision stack"
    assert data_found == "True True True", "profiles, broker configs, demo pipeline shipped"
    total, added = installed_size(venv)
    print(f"\nrelay-only install: site-packages {mib(total)}, of which fogwhisk and its "
          f"dependencies {mib(added)} (the rest is the venv's pip and setuptools)")
    assert added <= RELAY_BUDGET_BYTES, f"relay-only install is {mib(added)}"

    local, uplink = broker_factory("local"), broker_factory("uplink")
    cfg = write_config(tmp_path / "agent.toml", local, uplink, RELAY)
    cfg.write_text(cfg.read_text().replace(f'id = "{DEVICE}"',
                                           f'id = "{DEVICE}"\nprofile = "rpi-zero2w"'))
    check = run("fogwhisk", "check-config", "-c", str(cfg))
    assert check.returncode == 0, check.stderr
    assert '"memory_max": "192M"' in check.stdout, "the board profile came from the wheel"

    # What needs the vision stack is refused, naming the extra, before anything runs.
    for name, steps, trigger in (
            ("detect", '{ action = "decode" }, { action = "detect", model = "person" }, '
                       '{ action = "publish" }', '"cams/+/jpeg"'),
            ("camera", '{ action = "publish" }', '{ camera = "/dev/video0" }')):
        bad = tmp_path / f"{name}.toml"
        bad.write_text(cfg.read_text() + f'\n[[pipeline]]\nname = "{name}"\n'
                       f'trigger = {trigger}\nsteps = [{steps}]\n')
        for command in ("check-config", "run"):
            proc = run("fogwhisk", command, "-c", str(bad))
            assert proc.returncode == 2, (name, command, proc.stderr)
            assert "install fogwhisk[vision]" in proc.stderr, proc.stderr

    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([str(venv / "bin" / "fogwhisk"), "run", "-c", str(cfg)],
                                 stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                 cwd=tmp_path)
    try:
        with Collector(uplink.url, f"fog/{DEVICE}/sensors/#") as cloud:
            deadline = time.monotonic() + 20
            while not cloud.snapshot():  # until the agent's subscription is live
                assert agent.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                publish_many(local.url, "sensors/marker", [b"m"])
                time.sleep(0.2)
            payloads = [f"reading {i}".encode() for i in range(200)]
            publish_many(local.url, "sensors/t1", payloads)
            got = cloud.wait_for(200, topic=f"fog/{DEVICE}/sensors/t1", timeout=20)
            assert [m.payload for m in got] == payloads
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert " ready in " in log.read_text()


def test_vision_install_from_a_wheel_fetches_its_models_and_passes_check_config(
        wheel: Path, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "install-service creates users and chowns: the suite runs as root"
    user = "daemon"
    daemon = pwd.getpwnam(user)
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    cfg = etc / "agent.toml"
    cfg.write_text(f"""
[device]
id = "cam-door"
data_dir = "{data}"
profile = "rpi4"
[[pipeline]]
name = "door"
trigger = "cams/door/jpeg"
steps = [{{ action = "decode" }}, {{ action = "motion" }},
         {{ action = "detect", model = "person", min_score = 0.5 }},
         {{ action = "track" }}, {{ action = "publish" }}]
""")
    env = clean_env(FOGWHISK_PREFIX=str(tmp_path / "prefix"), FOGWHISK_ETC=str(etc),
                    FOGWHISK_UNIT_DIR=str(tmp_path / "units"), PYTHON=SYSTEM_PYTHON)
    proc = subprocess.run([str(ROOT / "scripts" / "install-service"), "--wheel", str(wheel),
                           "--user", user, "--no-start"], capture_output=True, text=True,
                          check=False, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "will not start" not in proc.stderr and "missing" not in proc.stderr, proc.stderr
    venv = tmp_path / "prefix" / "venv"
    run = venv_runner(venv, tmp_path)
    probe = run("python", "-c", "import numpy, cv2, ai_edge_litert, agent; print(agent.__file__)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith(str(site_packages(venv)))
    person = data / "models" / "person" / "pose_detection.tflite"
    assert person.is_file() and person.stat().st_uid == daemon.pw_uid
    assert (tmp_path / "units" / "fogwhisk.service").is_file()
    check = run("fogwhisk", "check-config", "-c", str(cfg))
    assert check.returncode == 0, check.stderr
    total, _ = installed_size(venv)
    print(f"\nvision install: site-packages {mib(total)}")

    # Another model for another pipeline: one command, then the config passes.
    face_cfg = tmp_path / "face.toml"
    face_cfg.write_text(cfg.read_text().replace('model = "person"', 'model = "face"'))
    before = run("fogwhisk", "check-config", "-c", str(face_cfg))
    assert before.returncode == 2
    assert f"fogwhisk model fetch face --dir {data / 'models'}" in before.stderr, before.stderr
    fetch = run("fogwhisk", "model", "fetch", "face", "-c", str(face_cfg))
    assert fetch.returncode == 0, fetch.stderr
    assert "(fetched, sha256 ok)" in fetch.stdout
    after = run("fogwhisk", "check-config", "-c", str(face_cfg))
    assert after.returncode == 0, after.stderr
