"""A real nginx (Debian's `nginx-light`) serving files over TLS, as the test's own process.

    with Nginx(tmp_path / "nginx", certs, limit_rate="2m") as web:
        web.put("a.tar", data)
        url = web.url("a.tar")           # https://127.0.0.1:<port>/a.tar
        web.ranges()                     # the Range header of each request, from the log

Its own prefix directory (config, pid, temp paths, access log) and a free port; the
server certificate comes from `scripts/make-certs` (the session's `certs` fixture).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from brokers import Certs, find_free_port, port_open

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
START_TIMEOUT_S = 10.0

CONF = """\
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    default_type application/octet-stream;
    log_format ranges '$status "$http_range" $body_bytes_sent';
    access_log {prefix}/access.log ranges;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {prefix}/www;
        location / {{ limit_rate {limit_rate}; }}
    }}
}}
"""


class Nginx:
    """One nginx master (and its worker) on a free loopback port, serving `www/` by TLS."""

    def __init__(self, prefix: Path, certs: Certs, *, limit_rate: str = "0") -> None:
        self.prefix = prefix
        self.certs = certs
        self.limit_rate = limit_rate
        self.port = find_free_port()
        self.www = prefix / "www"
        self.proc: subprocess.Popen[bytes] | None = None
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.www.mkdir(exist_ok=True)

    def url(self, name: str, port: int | None = None) -> str:
        return f"https://127.0.0.1:{port or self.port}/{name}"

    def put(self, name: str, data: bytes) -> Path:
        """Serve `data` as /name (replaced atomically, as a deploy would)."""
        path = self.www / name
        tmp = path.with_suffix(".tmp-upload")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

    def start(self) -> Nginx:
        if not Path(NGINX).exists():
            raise RuntimeError("nginx is missing: scripts/setup installs nginx-light")
        conf = self.prefix / "nginx.conf"
        conf.write_text(CONF.format(prefix=self.prefix, port=self.port,
                                    cert=self.certs.cert("server"),
                                    key=self.certs.key("server"),
                                    limit_rate=self.limit_rate))
        log = open(self.prefix / "error.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(
                [NGINX, "-e", "stderr", "-p", str(self.prefix), "-c", str(conf)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            if port_open("127.0.0.1", self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        """SIGQUIT would wait for slow clients; SIGTERM stops at once, workers included."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[tuple[int, str, int]]:
        """(status, Range header or "-", body bytes sent) per request, in order."""
        try:
            lines = (self.prefix / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            status, rest = line.split(" ", 1)
            rng, sent = rest.rsplit(" ", 1)
            out.append((int(status), rng.strip('"'), int(sent)))
        return out

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
