"""A device under OTA for the end-to-end tests: the real agent process with a frame
pipeline on shapes-ssd, a camera stand-in publishing JPEG frames at 10 fps, and a
watcher of the retained state reports and the events at the uplink.

    agent = start_device(tmp_path, broker, keys)
    with Frames(broker.url) as frames, Watch(broker.url) as watch:
        push(release_json, broker, DEVICE)
        watch.state(2, "committed")
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from agent_proc import AgentProcess, write_config
from brokers import Broker
from helpers import Collector, connect, make_client

from agent.ota import pack as packing
from agent.ota import push as pushing
from agent.ota.release import Policy

DEVICE = "cam-ota"
NAME = "shapes-ssd"
FRAMES_TOPIC = "cameras/door/jpeg"
PIPELINE = f"""
[[pipeline]]
name = "door"
trigger = "cameras/+/jpeg"
steps = [{{ action = "decode" }}, {{ action = "detect", model = "{NAME}", pass_empty = true }},
         {{ action = "publish" }}]
"""


def ota_table(keys: Path, probation: str = "2s", trial_timeout: str = "30s",
              ca: str | None = None) -> str:
    return f"""
[ota]
keys = ["{keys}"]
probation = "{probation}"
trial_timeout = "{trial_timeout}"
{f'ca = "{ca}"' if ca else ""}

[runtime]
num_threads = 1
"""


def start_device(tmp_path: Path, broker: Broker, pub: Path, *, device: str = DEVICE,
                 probation: str = "2s", trial_timeout: str = "30s", ca: str | None = None,
                 env: dict[str, str] | None = None, pipeline: str = PIPELINE) -> AgentProcess:
    cfg = write_config(tmp_path / "agent.toml", broker, broker, pipeline, device=device,
                       extra=ota_table(pub, probation, trial_timeout, ca))
    agent = AgentProcess(cfg, env=env)
    agent.wait_ready()
    return agent


def restart(agent: AgentProcess, env: dict[str, str] | None = None) -> AgentProcess:
    again = AgentProcess(agent.config, env=env)
    again.wait_ready()
    return again


def pack(model_dir: Path, version: int, out: Path, key: Any,
         policy: Policy | None = None, **kw: Any) -> tuple[Path, Path]:
    return packing.pack(model_dir, version, out, key, policy=policy, **kw)


def push(release_json: Path, broker: Broker, *devices: str, artifact: Path | None = None,
         urls: tuple[str, ...] = ()) -> None:
    code = pushing.push(release_json, broker.url, devices=list(devices or [DEVICE]),
                        artifact=artifact, urls=urls, out=io.StringIO())
    assert code == 0


def deploy_raw(broker: Broker, doc: bytes, device: str = DEVICE, name: str = NAME) -> None:
    """A deploy document as it is, bytes and all (for documents push would refuse)."""
    from helpers import publish_one

    publish_one(broker.url, f"fog/{device}/models/{name}/deploy", doc, retain=True)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((120, 160, 3), np.uint8)
    x, y = (int(v) for v in rng.integers(10, 100, 2))
    cv2.circle(img, (x + 20, y), 15, (255, 255, 255), -1)
    return bytes(cv2.imencode(".jpg", img)[1].tobytes())


class Frames:
    """Publishes JPEG frames at `fps` (QoS 1, each acknowledged by the broker) until stopped:
    `images` in turn (default: eight discs on black, for shapes-ssd)."""

    def __init__(self, url: str, fps: float = 10.0, images: list[bytes] | None = None,
                 topic: str = FRAMES_TOPIC) -> None:
        self.url = url
        self.topic = topic
        self.period = 1.0 / fps
        self.sent = 0
        self._stop = threading.Event()
        self._frames = images if images is not None else [jpeg(i) for i in range(8)]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        client = make_client(self.url)
        try:
            connect(client, self.url)
            nxt = time.monotonic()
            while not self._stop.is_set():
                info = client.publish(self.topic, self._frames[self.sent % len(self._frames)],
                                      qos=1)
                info.wait_for_publish(10)
                if not info.is_published():
                    raise AssertionError("frame not acknowledged by the broker")
                self.sent += 1
                nxt += self.period
                self._stop.wait(max(0.0, nxt - time.monotonic()))
        except BaseException as exc:
            self.error = exc
        finally:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> Frames:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(15)
        if self.error is not None:
            raise self.error
        return self.sent


class Watch:
    """Every state report and event of the device at the uplink."""

    def __init__(self, url: str, device: str = DEVICE) -> None:
        self.device = device
        self.c = Collector(url, [f"fog/{device}/models/+/state", f"fog/{device}/events/#"])

    def __enter__(self) -> Watch:
        self.c.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.stop()

    def states(self, name: str = NAME) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.c.snapshot(
            f"fog/{self.device}/models/{name}/state")]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.c.snapshot(f"fog/{self.device}/events/#")]

    def state(self, version: int | None, state: str, agent: AgentProcess | None = None,
              timeout: float = 60.0, name: str = NAME, after_seq: int = -1) -> dict[str, Any]:
        """The first report with update (version, state) and a seq above `after_seq`."""
        deadline = time.monotonic() + timeout
        while True:
            for d in self.states(name):
                u = d.get("update") or {}
                if u.get("version") == version and u.get("state") == state \
                        and d["seq"] > after_seq:
                    return d
            if time.monotonic() > deadline:
                seen = [(d["seq"], (d.get("update") or {}).get("version"),
                         (d.get("update") or {}).get("state"),
                         (d.get("update") or {}).get("reason")) for d in self.states(name)]
                raise AssertionError(f"no {state!r} report for version {version} within "
                                     f"{timeout}s; saw {seen}"
                                     + (f"\n{agent.log()[-6000:]}" if agent else ""))
            time.sleep(0.05)

    def latest(self, name: str = NAME) -> dict[str, Any]:
        docs = self.states(name)
        assert docs, "no state report"
        return max(docs, key=lambda d: d["seq"])

    def wait_events(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(got := self.events()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} events, wanted {n}")
            time.sleep(0.05)
        return got


# -- releases push would not make: hand-built tars, forged or altered documents ---------


def publish_chunks(broker: Broker, data: bytes, sha: str | None = None,
                   size: int | None = None, chunk_bytes: int = 64 * 1024) -> None:
    """Retained chunks and info of `data`, under `sha` (default: its own) announcing `size`."""
    import hashlib
    import math

    from helpers import publish_many

    sha = sha or hashlib.sha256(data).hexdigest()
    base = f"fog/_artifacts/{sha}"
    n = math.ceil(len(data) / chunk_bytes)
    for i in range(n):
        publish_many(broker.url, f"{base}/{i}", [data[i * chunk_bytes:(i + 1) * chunk_bytes]],
                     retain=True)
    info = {"size": size if size is not None else len(data), "chunk_bytes": chunk_bytes,
            "chunks": n, "sha256": sha}
    publish_many(broker.url, f"{base}/info", [json.dumps(info).encode()], retain=True)


def resign(release_json: Path, key: Any, out: Path, **changes: Any) -> Path:
    """The release in `release_json` with `changes` to its signed block, signed by `key`;
    written as `out` (a `.release.json`, with its `.tar` beside it when `tar` is given)."""
    from agent.ota import release

    signed = json.loads(release_json.read_bytes())["signed"]
    tar: bytes | None = changes.pop("tar", None)
    if tar is not None:
        import hashlib

        signed["artifact"] = {"sha256": hashlib.sha256(tar).hexdigest(), "size": len(tar)}
        out.with_name(out.name.removesuffix(".release.json") + ".tar").write_bytes(tar)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(signed.get(k), dict):
            signed[k] = {**signed[k], **v}
        else:
            signed[k] = v
    out.write_text(json.dumps(release.sign(signed, key), indent=2))
    return out


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """An uncompressed tar of `files` (names as given, `../` and `/` included) and symlinks."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def files_of(tar: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()  # type: ignore[union-attr]
                if m.isfile()}
