"""Hot swap through the real assembly line: a model swapped while frames stream lands
between two frames; no frame is dropped, each event names the version that made it."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from pathlib import Path

import numpy as np

from agent.actions import detect, publish
from agent.config import CameraConfig, PipelineConfig, RuntimeConfig, StepConfig, TriggerConfig
from agent.messages import Message, Outgoing
from agent.ota.store import VersionStore
from agent.pipeline import ActionContext, Pipeline
from agent.telemetry import Telemetry
from agent.vision.frames import Frame
from agent.vision.hub import ModelHub
from agent.vision.models import ModelStore

NAME = "shapes-ssd"


def two_versions(data: Path, tmp: Path) -> VersionStore:
    """shapes-ssd v1 active and v2 installed beside it (same weights, version 2)."""
    vs = VersionStore(data)
    vs.adopt(NAME, ModelStore().resolve(NAME))
    src = tmp / "release-2"
    shutil.copytree(ModelStore().manifest_dir(NAME), src)
    manifest = src / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("version = 1", "version = 2", 1))
    vs.install(NAME, 2, src)
    return vs


def ctx(data: Path, hub: ModelHub, telemetry: Telemetry, pipeline: str) -> ActionContext:
    seq = itertools.count(1)
    return ActionContext(device="d", prefix="fog", pipeline=pipeline, step=0, data_dir=data,
                         runtime=RuntimeConfig(num_threads=1), camera=CameraConfig(),
                         boot_id="b", telemetry=telemetry, next_seq=lambda: next(seq),
                         models=hub)


def test_a_swap_while_frames_stream_drops_no_frame_and_versions_only_move_forward(
        tmp_path: Path) -> None:
    """Two pipelines on one model, 120 frames each through the staged line (prepare, infer,
    publish on their own threads); the swap happens mid-stream from the loop. Every frame
    gives exactly one event, in order; versions go 1...1 then 2...2 in each pipeline."""
    data = tmp_path / "data"
    vs = two_versions(data, tmp_path)
    telemetry = Telemetry()
    hub = ModelHub(ModelStore(data), RuntimeConfig(num_threads=1), telemetry)
    outs: dict[str, list[Outgoing]] = {"a": [], "b": []}
    pipes = []
    for name in outs:
        c = ctx(data, hub, telemetry, name)
        steps = [detect.build(detect.Params(model=NAME, pass_empty=True), c),
                 publish.build(publish.Params(), c)]
        cfg = PipelineConfig(name, TriggerConfig(topic="x"),
                             (StepConfig("detect", None), StepConfig("publish", None)))
        pipes.append(Pipeline(cfg, steps, telemetry,  # type: ignore[arg-type]
                              lambda o, d, n=name: outs[n].extend(o)))
    assert hub.version(NAME) == 1
    rng = np.random.default_rng(1)
    frames = [Frame(rng.integers(0, 255, (120, 160, 3), np.uint8), float(i)) for i in range(120)]

    async def main() -> None:
        tasks = [asyncio.create_task(p.run()) for p in pipes]
        for i, f in enumerate(frames):
            for p in pipes:
                p.offer(Message("x", b"", f.ts, data=f), None)
            if i == 60:
                detectors = await asyncio.to_thread(hub.load, NAME, vs.ref(NAME, 2))
                old = hub.swap(NAME, detectors)
                assert [d.manifest.version for d in old if d is not None] == [1, 1]
            await asyncio.sleep(0.002)
        while any(len(o) < len(frames) for o in outs.values()):
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 60))
    for name, got in outs.items():
        events = [json.loads(o.payload) for o in got]
        assert [e["ts"] for e in events] == [float(i) for i in range(120)], name
        versions = [e["model"]["version"] for e in events]
        assert versions == sorted(versions), name
        assert versions[0] == 1 and versions[-1] == 2, name
        assert all(e["model"]["name"] == NAME for e in events)
    on_v2 = [o for o in itertools.chain(*outs.values())
             if json.loads(o.payload)["model"]["version"] == 2]
    assert hub.health(NAME, 2).frames == len(on_v2)
    assert telemetry.pipeline("a").values.get("errors", 0) == 0


def test_a_failing_model_is_counted_against_its_own_version(tmp_path: Path) -> None:
    """The hub's health per version is what probation judges: errors of the candidate
    never count against the previous version, nor the other way round."""
    data = tmp_path / "data"
    two_versions(data, tmp_path)
    hub = ModelHub(ModelStore(data), RuntimeConfig(num_threads=1), Telemetry())
    slot = hub.slot(NAME, "p")
    det = slot.current()
    slot.record(det, ok=True, ms=3.0)
    slot.record(det, ok=False)
    assert hub.health(NAME, 1).frames == 2 and hub.health(NAME, 1).error_rate == 0.5
    assert hub.health(NAME, 1).p95_ms == 3.0
    assert hub.health(NAME, 2).frames == 0
