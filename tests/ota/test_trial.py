"""The trial in a child process: goldens, latency against the active model, and a model
that crashes (SIGSEGV), hangs, runs out of memory, answers wrongly or is too slow is
rejected with that reason while the caller carries on."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from candidates import catalog_dir, faces_dir, model_dir

from agent.errors import ReleaseError
from agent.ota.trial import GoldenScore, TrialResult, run_trial
from agent.vision.models import ModelStore, samples_dir

ACTIVE = ModelStore().resolve("shapes-ssd")


def trial(candidate: Path, **kw: Any) -> TrialResult:
    args: dict[str, Any] = {"fallback": ("litert",), "num_threads": 1, "timeout_s": 60.0,
                            "max_latency_ratio": 2.0, "baseline": (ACTIVE.directory, ACTIVE.path)}
    args.update(kw)
    return asyncio.run(run_trial(candidate, **args))


def test_a_good_candidate_passes_with_its_latency_and_the_active_models() -> None:
    got = trial(catalog_dir())
    assert got.runtime == "litert"
    assert 0 < got.p50_ms <= got.p95_ms
    assert got.baseline_p95_ms is not None and got.baseline_p95_ms > 0


def test_expected_detections_the_model_does_not_find_are_a_golden_mismatch(
        tmp_path: Path) -> None:
    d = model_dir(tmp_path, "moved", edit=lambda t: t.replace(
        "box = [0.0208, 0.0104, 0.2083, 0.1979]", "box = [0.5, 0.05, 0.7, 0.25]"))
    with pytest.raises(ReleaseError, match=r"golden mismatch: golden 1 .*no disc near"):
        trial(d)


def test_raw_outputs_off_by_more_than_the_tolerance_are_a_golden_mismatch(
        tmp_path: Path) -> None:
    d = model_dir(tmp_path, "outputs")
    want = dict(np.load(d / "golden" / "outputs.npz"))
    want["arr_0"] = want["arr_0"] + 0.25  # boxes moved by a quarter of the frame
    np.savez(d / "golden" / "outputs.npz", *[want[f"arr_{k}"] for k in range(len(want))])
    with pytest.raises(ReleaseError, match=r"golden mismatch: .*output 0 differs by 0.25"):
        trial(d)


def test_a_model_that_segfaults_its_process_is_rejected_as_a_crash(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "crash", knobs={"wrap": "litert", "crash": "invoke"})
    with pytest.raises(ReleaseError, match=r"trial crashed: .*SIGSEGV"):
        trial(d)


def test_a_model_that_hangs_is_killed_at_the_timeout_and_rejected(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "hang", knobs={"hang": "load"})
    with pytest.raises(ReleaseError, match="trial hang: no result within 3 s"):
        trial(d, timeout_s=3.0)


def test_a_model_slower_than_the_policy_allows_is_rejected_as_too_slow(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "slow", knobs={"wrap": "litert", "delay_ms": 25})
    with pytest.raises(ReleaseError, match=r"too slow: p95 .* above 2 x the active model's"):
        trial(d, runs=5)
    assert trial(d, runs=5, max_latency_ratio=100.0).p95_ms >= 25  # the policy decides


def test_a_model_that_raises_on_invoke_is_rejected_naming_the_error(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "raises", knobs={"wrap": "litert", "raise": True})
    with pytest.raises(ReleaseError, match="model fails: RuntimeError"):
        trial(d)


def test_the_memory_limit_applies_to_the_trial_process(tmp_path: Path) -> None:
    """Under a 128 MiB address space the runtime cannot even map its libraries: rejected
    with the child's own last words, never an agent that runs out of memory."""
    with pytest.raises(ReleaseError, match=r"exit code 1 \(address space limited to 128 MiB\): .+"):
        trial(catalog_dir(), memory_bytes=128 << 20)


# -- the goldens as a labelled test set: policy.min_golden_recall / min_golden_precision --

FACE = ModelStore().resolve("face")


def face_trial(d: Path, **kw: Any) -> TrialResult:
    return trial(d, baseline=(FACE.directory, FACE.path), max_latency_ratio=1000.0, **kw)


def test_a_real_model_meeting_its_golden_gates_passes_with_recall_and_precision(
        tmp_path: Path) -> None:
    """The face model finds 2 of the 3 labelled faces (not the far one) and nothing
    else: recall 0.67 and precision 1.0 pass gates of 0.6 and 0.9; without the gates,
    the far face is a golden mismatch as every golden detection must be found."""
    d = faces_dir(tmp_path, "faces")
    got = face_trial(d, min_golden_recall=0.6, min_golden_precision=0.9)
    assert got.goldens == GoldenScore(goldens=4, expected=3, found=2, matched=2)
    assert round(got.goldens.recall, 2) == 0.67 and got.goldens.precision == 1.0
    with pytest.raises(ReleaseError, match=r"golden mismatch: golden 4 \(golden/far.png\): "
                                           r"no face near"):
        face_trial(d)


def test_golden_recall_under_the_policy_gate_is_rejected_with_the_figures(
        tmp_path: Path) -> None:
    d = faces_dir(tmp_path, "faces")
    with pytest.raises(ReleaseError) as err:
        face_trial(d, min_golden_recall=0.9)
    assert err.value.reason == (
        "golden recall 0.67 is below 0.9 (recall 0.67: 2 of 3 expected detections found; "
        "precision 1.00: 2 of 2 detections expected; over 4 goldens)")


def test_golden_precision_counts_detections_nobody_labelled(tmp_path: Path) -> None:
    """A fifth golden, camera.png mirrored, whose face nobody labelled: the face the
    model finds there is one unexpected detection of three, precision 0.67."""
    d = faces_dir(tmp_path, "precision", extra="""
[[golden]]
input = "golden/unlabelled.png"
""")
    image = cv2.imread(str(samples_dir() / "camera.png"))
    cv2.imwrite(str(d / "golden" / "unlabelled.png"), cv2.flip(image, 1))
    with pytest.raises(ReleaseError, match=re.escape(
            "golden precision 0.67 is below 0.9 (recall 0.67: 2 of 3 expected detections "
            "found; precision 0.67: 2 of 3 detections expected; over 5 goldens)")):
        face_trial(d, min_golden_recall=0.5, min_golden_precision=0.9)
    assert face_trial(d, min_golden_precision=0.6, min_golden_recall=0.6).goldens == \
        GoldenScore(goldens=5, expected=3, found=3, matched=2)


def test_golden_gates_score_tensor_goldens_and_refuse_a_release_without_goldens(
        tmp_path: Path) -> None:
    """shapes-ssd's golden is an input tensor with three labelled shapes: all three are
    found and nothing else (recall and precision 1.0). A gate on a release whose
    manifest lists no golden has nothing to score: rejected, saying so."""
    got = trial(catalog_dir(), min_golden_recall=1.0, min_golden_precision=1.0)
    assert got.goldens == GoldenScore(goldens=1, expected=3, found=3, matched=3)
    bare = model_dir(tmp_path, "bare", edit=lambda t: t[:t.index("[[golden]]")])
    assert trial(bare).goldens is None
    with pytest.raises(ReleaseError, match="the policy gates golden recall or precision, but "
                                           "the release's manifest lists no golden"):
        trial(bare, min_golden_precision=0.5)
