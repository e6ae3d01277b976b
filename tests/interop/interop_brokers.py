"""Real RabbitMQ and NATS brokers for the interop tests, each the test's own process.

Installed from Debian by `scripts/setup --interop`. Every node runs on free
ports with its own data directory under the test's temporary directory, and
nothing of the system service is used:

    epmd = Epmd(tmp).start()                      # the nodes' port mapper, ours to stop
    node = RabbitNode("a", tmp / "a", epmd).start()
    node.url                                      # mqtt://127.0.0.1:PORT (MQTT 3.1.1)
    node.kill(); node.start()                     # kill -9, back on the same ports and data
    nats = NatsServer(tmp / "nats", ack_wait="2s").start()

RabbitMQ: `rabbitmq_mqtt` is the only plugin; the guest user may connect from
loopback (anonymous MQTT connections log in as guest). The Erlang VM would start
an `epmd` daemon that outlives it; `Epmd` starts one first, in the foreground,
on a free port, so it is stopped by its pid like everything else here. Nodes of
one cluster share it and one HOME with the same `.erlang.cookie`.

NATS: JetStream (the MQTT sessions and QoS1 messages live there) and the `mqtt`
block; `ack_wait` is how long NATS waits for a PUBACK from a subscriber before
it sends the message again (no redelivery before that, or a reconnect).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from brokers import Certs, find_free_port, port_open

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # not /usr/sbin: that wrapper su's to `rabbitmq`
RABBITMQ_SERVER = RABBIT_BIN / "rabbitmq-server"
RABBITMQCTL = RABBIT_BIN / "rabbitmqctl"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
RABBIT_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
NATS_ACK_WAIT_S = 2.0  # of the local-bus NATS: short, so a test waits seconds for a resend


def installed() -> bool:
    """Both brokers are on this machine (`scripts/setup --interop`)."""
    return RABBITMQ_SERVER.is_file() and Path(NATS_SERVER).is_file()


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path,
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} in {timeout}s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} not written)"


def _end(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Epmd:
    """The Erlang port mapper on a free port, in the foreground: stopped by its pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port()
        self.log_path = workdir / "epmd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Epmd:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([EPMD, "-port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "epmd", self.log_path, 10)
        return self

    def stop(self) -> None:
        _end(self.proc, signal.SIGKILL)


class RabbitNode:
    """One RabbitMQ node with the MQTT plugin; keeps its ports and data across restarts."""

    def __init__(self, name: str, workdir: Path, epmd: Epmd, home: Path | None = None,
                 tls: Certs | None = None) -> None:
        self.name = name
        self.workdir = workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.epmd = epmd
        self.nodename = f"fw-{name}-{os.getpid()}@localhost"
        self.port = find_free_port()  # MQTT
        self.amqp_port = find_free_port()
        self.dist_port = find_free_port()
        self.tls_port = find_free_port() if tls else None  # MQTT over mutual TLS
        self.home = (home or workdir / "home").resolve()
        self.log_path = workdir / "console.log"
        self.pid_file = workdir / "beam.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_files(tls)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_files(self, tls: Certs | None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq.conf").write_text("\n".join([
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = true",
            # guest may only log in from loopback by default; these tests are loopback
            # anyway, but the plugin's anonymous user is guest and must not be refused.
            "loopback_users.guest = false",
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            "log.console = false",
            "log.file.level = info",
            *([] if tls is None else [
                # Mutual TLS as cloud-tls.conf has it: a client certificate is required.
                f"mqtt.listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {tls.ca}",
                f"ssl_options.certfile = {tls.cert('server')}",
                f"ssl_options.keyfile = {tls.key('server')}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "ssl_options.versions.1 = tlsv1.2",
            ]), "",
        ]))

    def env(self) -> dict[str, str]:
        """What rabbitmq-server and rabbitmqctl need to find this node and nothing else."""
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd.port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),  # none
            "ERL_CRASH_DUMP": str(self.workdir / "erl_crash.dump"),
            # Clustering on loopback only; and no scheduler busy-waiting, which on a
            # shared 2-core machine burns the CPU the agent and the other tests need.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface "
            "{127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none",
        }

    def spawn(self) -> RabbitNode:
        """Start the process without waiting (`wait_started` waits)."""
        if self.running:
            return self
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            # The script traps SIGTERM and stops the VM cleanly; the VM's own pid
            # (for kill -9) is in RABBITMQ_PID_FILE.
            self.proc = subprocess.Popen([str(RABBITMQ_SERVER)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(), cwd=self.workdir,
                                         start_new_session=True)
        return self

    def wait_started(self, timeout: float = RABBIT_START_TIMEOUT_S) -> RabbitNode:
        assert self.proc is not None
        _wait_port(self.port, self.proc, f"rabbitmq {self.nodename}", self.log_file(), timeout)
        return self

    def start(self) -> RabbitNode:
        return self.spawn().wait_started()

    def log_file(self) -> Path:
        logs = sorted((self.workdir / "log").glob("*.log"))
        return logs[0] if logs else self.log_path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def beam_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    def kill(self) -> None:
        """kill -9 of the Erlang VM: a crash (then its wrapper script ends too)."""
        pid = self.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _end(self.proc, signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        """A clean stop (SIGTERM to the script: it stops the VM and waits for it)."""
        _end(self.proc, signal.SIGTERM)
        pid = self.beam_pid()  # a VM the script did not take down with it
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS...`; its stdout, or an error with its output."""
        done = subprocess.run([str(RABBITMQCTL), "-n", self.nodename, *args],
                              env=self.env(), capture_output=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.nodename} failed "
                               f"({done.returncode}):\n{done.stdout.decode()}"
                               f"{done.stderr.decode()}")
        return done.stdout.decode()

    def mqtt_client_ids(self) -> list[str]:
        """Client ids of the MQTT connections this node holds."""
        out = self.ctl("list_mqtt_connections", "client_id", "--quiet", "--no-table-headers")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"RabbitNode({self.nodename}, {self.url}, running={self.running})"


class RabbitCluster:
    """Three nodes on this machine, one epmd and one Erlang cookie, joined with
    `rabbitmqctl join_cluster`."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.epmd = Epmd(workdir / "epmd")
        home = workdir / "home"
        self.nodes = [RabbitNode(f"c{i}", workdir / f"node{i}", self.epmd, home=home)
                      for i in range(size)]

    def start(self) -> RabbitCluster:
        self.epmd.start()
        for n in self.nodes:  # in parallel: the VMs boot side by side
            n.spawn()
        for n in self.nodes:
            n.wait_started()
        first = self.nodes[0]
        for n in self.nodes[1:]:
            n.ctl("stop_app")
            n.ctl("join_cluster", first.nodename)
            n.ctl("start_app")
        for n in self.nodes[1:]:
            n.wait_started()
        return self

    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def running_nodes(self) -> list[str]:
        """Node names the first live node sees running in the cluster."""
        node = next(n for n in self.nodes if n.running)
        out = node.ctl("eval", "rabbit_nodes:all_running().")
        return [n for n in (n.nodename for n in self.nodes) if f"'{n}'" in out]

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
        self.epmd.stop()


class NatsServer:
    """nats-server with JetStream and MQTT on free ports, its store in `workdir`."""

    def __init__(self, workdir: Path, ack_wait: str = "30s") -> None:
        self.workdir = workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port()  # MQTT
        self.client_port = find_free_port()  # NATS protocol (unused, but it listens)
        self.conf_path = workdir / "nats.conf"
        self.log_path = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path.write_text(f"""
server_name: fw_test_{os.getpid()}
listen: 127.0.0.1:{self.client_port}
jetstream {{
    store_dir: "{workdir / 'jetstream'}"
}}
mqtt {{
    listen: 127.0.0.1:{self.port}
    # How long NATS waits for a subscriber's PUBACK before sending the message again.
    ack_wait: "{ack_wait}"
}}
""")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> NatsServer:
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "nats-server", self.log_path, 30)
        return self

    def stop(self) -> None:
        """A clean stop (SIGTERM: nats-server's lame-duck-free shutdown)."""
        _end(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        _end(self.proc, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
