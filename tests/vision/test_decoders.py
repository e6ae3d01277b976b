"""Decoders: golden outputs on real models, and properties of the pure cores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from vision_util import sample_image  # type: ignore[import-not-found]

from agent.config import RuntimeConfig
from agent.vision.decoders import dequantize, raw_threshold
from agent.vision.decoders.anchors import make_anchors
from agent.vision.decoders.ssd_postprocess import Params as SsdParams
from agent.vision.decoders.ssd_postprocess import SsdPostprocessDecoder
from agent.vision.decoders.yolov8 import Params as YoloParams
from agent.vision.decoders.yolov8 import Yolov8Decoder
from agent.vision.detector import Detector
from agent.vision.models import ModelStore
from agent.vision.tensors import TensorInfo, iou_matrix, nms

RUNTIME = RuntimeConfig(num_threads=1)


def all_models() -> list[str]:
    return ModelStore().names()


@pytest.mark.parametrize("name", all_models())
def test_every_model_matches_its_golden_outputs(store: ModelStore, name: str) -> None:
    """Raw outputs within one quantisation step, decoded boxes where the manifest says."""
    ref = store.resolve(name)
    det = Detector(ref, RUNTIME)
    assert ref.manifest.golden, f"{name} has no golden input"
    for g in ref.manifest.golden:
        if g.input.startswith("sample:"):
            image = sample_image(g.input.removeprefix("sample:"))
            found = det.to_detections(det.detect(image, min_score=0.05))
        else:
            x = np.load(ref.directory / g.input)
            outs = det.invoke_tensor(x)
            if g.outputs:
                want = np.load(ref.directory / g.outputs)
                count = None
                if ref.manifest.decoder.kind == "ssd_postprocess":
                    # past `count` the post-processing op leaves its buffers uninitialised
                    count = int(next(o for o in outs if o.size == 1).ravel()[0])
                for k, (info, raw) in enumerate(zip(det.model.outputs, outs, strict=True)):
                    step = info.scale or 0.0
                    got, exp = raw, want[f"arr_{k}"]
                    if count is not None and got.size > 1:
                        got, exp = got[:, :count], exp[:, :count]
                    diff = np.abs(got.astype(np.float64) - exp).max()
                    # one quantisation step of slack: XNNPACK and TF's reference kernels round
                    assert diff <= max(g.atol, 1.0 if step else 1e-3), (name, k, diff)
            found = det.to_detections(det.decode(outs, 0.05))
        for want_det in g.detections:
            near = [d for d in found if d.label == want_det.label and
                    max(abs(a - b) for a, b in zip(d.box, want_det.box, strict=True))
                    <= want_det.box_tol]
            assert near, f"{name}: no {want_det.label} near {want_det.box} in {found}"
            assert max(d.score for d in near) >= want_det.score - want_det.score_tol
        if g.none_above is not None:
            assert all(d.score < g.none_above for d in found), (name, g.input, found)


def test_face_anchors_count_matches_mediapipe() -> None:
    assert len(make_anchors((8, 16, 16, 16), 128, 128)) == 896
    assert len(make_anchors((8, 16, 32, 32, 32), 224, 224)) == 2254


boxes_st = hnp.arrays(np.float64, st.tuples(st.integers(0, 40), st.just(4)),
                      elements=st.floats(0, 1, allow_nan=False))


def as_boxes(raw: np.ndarray) -> np.ndarray:
    x0, x1 = np.minimum(raw[:, 0], raw[:, 2]), np.maximum(raw[:, 0], raw[:, 2])
    y0, y1 = np.minimum(raw[:, 1], raw[:, 3]), np.maximum(raw[:, 1], raw[:, 3])
    return np.stack([x0, y0, x1 + 1e-3, y1 + 1e-3], axis=1)


@settings(max_examples=200, deadline=None)
@given(boxes_st, st.floats(0.1, 0.9), st.data())
def test_nms_keeps_no_overlapping_pair_and_best_first(raw: np.ndarray, thr: float,
                                                      data: st.DataObject) -> None:
    boxes = as_boxes(raw)
    scores = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(boxes),
                                         max_size=len(boxes))))
    keep = nms(boxes, scores, thr, max_out=1000)
    assert len(set(keep.tolist())) == len(keep)
    if len(boxes):
        assert len(keep) >= 1 and scores[keep[0]] == scores.max()
    assert np.all(np.diff(scores[keep]) <= 0)
    kb = boxes[keep]
    ious = iou_matrix(kb, kb)
    np.fill_diagonal(ious, 0)
    assert np.all(ious <= thr + 1e-9)
    # every dropped box overlaps a kept one
    dropped = np.setdiff1d(np.arange(len(boxes)), keep)
    if len(dropped) and len(keep):
        assert np.all(iou_matrix(boxes[dropped], kb).max(axis=1) > thr - 1e-9)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.001, 0.1), st.integers(-128, 127))
def test_thresholding_raw_values_equals_thresholding_dequantised(t: float, scale: float,
                                                                 zp: int) -> None:
    info = TensorInfo("s", 0, (256,), np.dtype(np.int8), scale, zp)
    raw = np.arange(-128, 128, dtype=np.int8)
    before = raw >= raw_threshold(t, info)
    after = dequantize(raw, info) >= np.float32(t)
    # float32 rounding may move the single value sitting on the threshold
    assert np.sum(before != after) <= 1


def naive_yolo(out: np.ndarray, info: TensorInfo, min_score: float, w: int,
               h: int) -> list[tuple[int, float]]:
    """Reference: a Python loop per cell (what the vectorised decoder replaces)."""
    rows = dequantize(out[0], info)
    res = []
    for n in range(rows.shape[1]):
        cls = rows[4:, n]
        c = int(np.argmax(cls))
        if cls[c] >= min_score:
            res.append((c, float(cls[c])))
    return res


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 60), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_yolov8_vectorised_keeps_what_a_loop_per_cell_finds(nc: int, n: int, t: float,
                                                           seed: int) -> None:
    rng = np.random.default_rng(seed)
    info = TensorInfo("out", 0, (1, 4 + nc, n), np.dtype(np.int8), 1 / 255, -128)
    out = rng.integers(-128, 128, (1, 4 + nc, n)).astype(np.int8)
    inp = TensorInfo("in", 0, (1, 64, 64, 3), np.dtype(np.uint8))
    dec = Yolov8Decoder(YoloParams(num_classes=nc, nms_iou=1.0, max_detections=10_000),
                        [inp], [info])
    got = dec.decode([out], t)
    want = naive_yolo(out, info, t, 64, 64)
    assert len(got) == len(want)
    assert np.allclose(np.sort(got.scores), np.sort([s for _, s in want]), atol=1e-6)


def ssd_outputs(rng: np.random.Generator, n: int, count: int) -> dict[str, np.ndarray]:
    boxes = np.sort(rng.random((1, n, 4)).astype(np.float32).reshape(1, n, 2, 2), axis=2)
    boxes = boxes.transpose(0, 1, 3, 2).reshape(1, n, 4)  # y0 x0 y1 x1 with y0<y1, x0<x1
    boxes = boxes[..., [0, 1, 2, 3]]
    return {"boxes": boxes, "classes": rng.integers(0, 5, (1, n)).astype(np.float32),
            "scores": np.sort(rng.random((1, n)).astype(np.float32))[:, ::-1].copy(),
            "count": np.array([count], np.float32)}


@pytest.mark.parametrize("order", list(itertools.permutations(
    ["boxes", "classes", "scores", "count"])))
def test_ssd_roles_are_found_by_shape_in_any_output_order(order: tuple[str, ...]) -> None:
    rng = np.random.default_rng(3)
    outs = ssd_outputs(rng, 10, 7)
    infos = [TensorInfo(f"StatefulPartitionedCall:{i}", i, outs[r].shape,
                        np.dtype(np.float32)) for i, r in enumerate(order)]
    dec = SsdPostprocessDecoder(SsdParams(), infos)
    got = dec.decode([outs[r] for r in order], 0.0)
    assert len(got) == 7
    assert np.allclose(got.scores, outs["scores"][0, :7])
    assert np.array_equal(got.classes, outs["classes"][0, :7].astype(np.int64))
    b = outs["boxes"][0, :7]
    assert np.allclose(got.boxes, b[:, [1, 0, 3, 2]])
