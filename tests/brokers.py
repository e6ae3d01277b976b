"""Real Mosquitto processes for tests, and the mTLS material to run them with.

The fixtures in `conftest.py` build on these; tests import the classes from
here (`from brokers import Broker`), never from `conftest`, whose module name
is shared by every conftest.py in the tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_CONF = ROOT / "broker-config" / "test.conf"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class Broker:
    """One Mosquitto process; keeps its port and persistence across restarts."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        port: int | None = None,
        extra_conf: str = "",
        persistence: bool = False,
        tls: bool = False,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or find_free_port()
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.tls = tls
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.data_dir = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_conf()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_conf(self) -> None:
        lines = [TEST_CONF.read_text(), "", "# --- appended by tests/conftest.py ---"]
        if os.geteuid() == 0:
            # Started as root Mosquitto switches to user `mosquitto`, which cannot
            # write into the test's temporary directory.
            lines.append("user root")
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.data_dir}/"]
        else:
            lines.append("persistence false")
        lines.append(f"listener {self.port} {self.host}")
        lines.append(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        """Start the process and wait until the port accepts connections."""
        if self.running:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto {self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            if port_open(self.host, self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto {self.name} did not listen on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM: a clean stop (persistence is saved); waits for the exit."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is saved since the last autosave."""
        self._signal(signal.SIGKILL)

    def restart(self, kill: bool = False) -> Broker:
        self.kill() if kill else self.stop()
        return self.start()

    def _signal(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # The port is free again once the process is gone (SO_REUSEADDR on restart).

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"Broker({self.name!r}, {self.url}, running={self.running})"


BrokerFactory = Callable[..., Broker]

MAKE_CERTS = ROOT / "scripts" / "make-certs"
CERT_CLIENTS = ("cam-frontdoor", "cam-backyard", "gateway", "operator")


@dataclass(frozen=True)
class Certs:
    """Output of `scripts/make-certs`: a CA, `server.pem` and one pair per client."""

    dir: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    def cert(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def mtls_conf(self, require_certificate: bool = True) -> str:
        """Listener lines for mutual TLS; the certificate CN becomes the username."""
        return "\n".join([
            f"cafile {self.ca}",
            f"certfile {self.cert('server')}",
            f"keyfile {self.key('server')}",
            f"require_certificate {'true' if require_certificate else 'false'}",
            f"use_identity_as_username {'true' if require_certificate else 'false'}",
            "tls_version tlsv1.2",
        ])


def make_certs(out: Path, clients: tuple[str, ...] = CERT_CLIENTS) -> Certs:
    """Run scripts/make-certs into `out`."""
    subprocess.run([str(MAKE_CERTS), str(out), *clients], check=True, capture_output=True)
    return Certs(out)
