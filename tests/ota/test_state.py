"""The update state machine, table-driven: every state has a deadline and a way out,
refused and rolled-back versions are never taken again, a fresh release replaces an
unfinished one, and the persisted form round-trips."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import OtaError
from agent.ota.state import (
    STATES,
    UNFINISHED,
    Adopt,
    Advance,
    Boot,
    Commit,
    Event,
    Fail,
    Installed,
    ModelState,
    Offer,
    Progress,
    Refuse,
    RollBack,
    ShadowReport,
    Swapped,
    Tick,
    Timeouts,
    Update,
    document,
    from_json,
    step,
    to_json,
    verdict,
)

T = Timeouts(download_s=100, verify_s=10, trial_s=20, probation_s=30)
V1 = Installed(1, "a" * 64, 0.0)
V2 = Installed(2, "b" * 64, 50.0)
IDLE = ModelState("m", active=V1)


def at(state: str, version: int = 2, since: float = 10.0, **kw: Any) -> ModelState:
    """Model m with v1 active and v2 in `state` (probation: v2 active, v1 previous)."""
    deadline = since + (T.of(state) or 0) if state in UNFINISHED else None  # type: ignore[arg-type]
    u = Update(version, state, since, deadline, 0.0 if state == "downloading" else None,  # type: ignore[arg-type]
               release=f"r{version}")
    if state == "probation":
        return ModelState("m", active=V2, previous=V1, update=u, **kw)
    return ModelState("m", active=V1, update=u, **kw)


def offer(version: int, now: float = 20.0) -> Offer:
    return Offer(version, f"r{version}", now, T)


# (name, start, event, expected state, expected reason fragment, expected refused set)
CASES: list[tuple[str, ModelState, Event, str | None, str | None, set[int]]] = [
    ("a release above the active version starts downloading",
     IDLE, offer(2), "downloading", None, set()),
    ("a fresh release replaces an unfinished download",
     at("downloading"), offer(3), "downloading", None, set()),
    ("a fresh release replaces a verification",
     at("verifying"), offer(3), "downloading", None, set()),
    ("a fresh release replaces a trial",
     at("trial"), offer(3), "downloading", None, set()),
    ("an untrusted document never displaces the update in hand",
     at("trial"), Refuse(None, "not JSON", 20.0), "trial", None, set()),
    ("an untrusted document is reported when nothing is in hand",
     IDLE, Refuse(None, "not JSON", 20.0), "rejected", "not JSON", set()),
    ("progress is recorded while downloading",
     at("downloading"), Progress(0.5, 20.0), "downloading", None, set()),
    ("a download goes on to verification",
     at("downloading"), Advance("verifying", 20.0, T), "verifying", None, set()),
    ("a verification goes on to the trial",
     at("verifying"), Advance("trial", 20.0, T), "trial", None, set()),
    ("a passed trial swaps into probation",
     at("trial"), Swapped(V2, 20.0, 30.0), "probation", None, set()),
    ("a failed check rejects the version for good",
     at("verifying"), Fail("golden mismatch", 20.0), "rejected", "golden mismatch", {2}),
    ("a failed transfer rejects this attempt but not the version",
     at("downloading"), Fail("stalled", 20.0, remember=False), "rejected", "stalled", set()),
    ("a degraded candidate is rolled back and remembered",
     at("probation"), RollBack("error rate 0.5 above 0.05", 20.0), "rolled_back",
     "error rate", {2}),
    ("probation ends committed",
     at("probation"), Commit(20.0), "committed", None, set()),
    ("a download past its deadline is rejected, the version not remembered",
     at("downloading"), Tick(10.0 + T.download_s), "rejected", "timed out in downloading", set()),
    ("a verification past its deadline is rejected",
     at("verifying"), Tick(10.0 + T.verify_s), "rejected", "timed out in verifying", {2}),
    ("a trial past its deadline is rejected",
     at("trial"), Tick(10.0 + T.trial_s), "rejected", "timed out in trial", {2}),
    ("a probation nobody faulted ends committed at its deadline",
     at("probation"), Tick(10.0 + T.probation_s), "committed", None, set()),
    ("a tick before the deadline changes nothing",
     at("trial"), Tick(11.0), "trial", None, set()),
    ("a passed trial with a shadow policy goes on to shadow",
     at("trial"), Advance("shadow", 20.0, T), "shadow", None, set()),
    ("the shadow comparison so far is recorded",
     at("shadow"), ShadowReport({"frames": 5, "f1": 0.9}, 20.0), "shadow", None, set()),
    ("a candidate that passed its shadow evaluation swaps into probation",
     at("shadow"), Swapped(V2, 20.0, 30.0), "probation", None, set()),
    ("a candidate that failed its shadow gates is rejected for good",
     at("shadow"), Fail("shadow: agreement F1 0.00 is below 0.5", 20.0), "rejected",
     "agreement F1 0.00", {2}),
    ("too few frames in shadow rejects the attempt, not the version",
     at("shadow"), Fail("not enough frames: 3 evaluated in shadow", 20.0, remember=False),
     "rejected", "not enough frames", set()),
    ("a shadow evaluation past its deadline is rejected, the version not remembered",
     at("shadow"), Tick(10.0 + T.shadow_s), "rejected", "timed out in shadow", set()),
    ("a fresh release replaces a shadow evaluation",
     at("shadow"), offer(3), "downloading", None, set()),
    ("the first start in probation only counts",
     at("probation"), Boot(20.0), "probation", None, set()),
    ("the third start in probation is a crash loop: rolled back",
     at("probation", starts=2), Boot(20.0), "rolled_back", "crash loop", {2}),
]


@pytest.mark.parametrize(("name", "start", "event", "state", "reason", "refused"), CASES,
                         ids=[c[0] for c in CASES])
def test_transition(name: str, start: ModelState, event: Event, state: str,
                    reason: str | None, refused: set[int]) -> None:
    end = step(start, event)
    assert end.update is not None
    assert end.update.state == state, name
    if reason is None:
        assert end.update.reason is None
    else:
        assert reason in (end.update.reason or "")
    assert end.refused == frozenset(refused)
    if end != start:
        assert end.seq == start.seq + 1 and end.ts == event.now


@pytest.mark.parametrize(("start", "version", "want", "why"), [
    (IDLE, 1, "refuse", "not higher than the active version 1"),
    (IDLE, 0, "refuse", "not higher than the active version 1"),
    (replace(IDLE, refused=frozenset({5})), 4, "refuse", "rejected or rolled back"),
    (replace(IDLE, refused=frozenset({5})), 5, "refuse", "rejected or rolled back"),
    (replace(IDLE, refused=frozenset({5})), 6, "accept", ""),
    (at("downloading", 3), 2, "refuse", "not higher than version 3 in downloading"),
    (at("downloading", 3), 3, "duplicate", ""),
    (at("probation"), 3, "defer", "in probation"),
    (at("committed"), 2, "duplicate", ""),
    (at("rejected"), 2, "accept", ""),  # rejected without being remembered: try again
])
def test_release_versions_must_rise_above_active_and_refused(
        start: ModelState, version: int, want: str, why: str) -> None:
    got, reason = verdict(start, version, f"r{version}")
    assert got == want
    assert why in reason


def test_a_redelivered_release_that_was_rejected_is_a_duplicate_not_a_new_refusal() -> None:
    s = step(at("verifying"), Fail("bad tar", 20.0))
    assert verdict(s, 2, "r2")[0] == "duplicate"
    assert verdict(s, 2, "other document")[0] == "refuse"


def test_swap_moves_active_to_previous_and_rollback_moves_it_back() -> None:
    s = step(at("trial"), Swapped(V2, 20.0, 30.0))
    assert s.active == V2 and s.previous == V1 and s.update is not None
    assert s.update.deadline == 50.0
    back = step(s, RollBack("p95 400 ms above 2.0 x 100 ms", 25.0))
    assert back.active is not None and back.active.version == 1 and back.previous is None
    assert back.floor == 2


def test_a_crash_loop_counter_resets_when_probation_ends_committed() -> None:
    s = at("probation", starts=2)
    s = step(s, Commit(20.0))
    assert s.starts == 0
    s = step(s, Boot(30.0))
    assert s.update is not None and s.update.state == "committed" and s.starts == 0


@pytest.mark.parametrize("state", ["downloading", "verifying", "trial", "shadow"])
def test_events_out_of_order_are_errors_not_silent(state: str) -> None:
    with pytest.raises(OtaError):
        step(at(state), Commit(20.0))
    with pytest.raises(OtaError):
        step(IDLE, Progress(0.1, 20.0))


def test_a_failure_in_probation_must_be_a_rollback() -> None:
    with pytest.raises(OtaError, match="RollBack"):
        step(at("probation"), Fail("x", 20.0))


def test_every_unfinished_state_has_a_deadline_and_leaves_it() -> None:
    for state in UNFINISHED:
        s = at(state)
        assert s.update is not None and s.update.deadline is not None
        end = step(s, Tick(s.update.deadline))
        assert end.update is not None and not end.update.unfinished, state


@pytest.mark.parametrize("state", ["downloading", "verifying", "probation"])
def test_shadow_comes_only_after_the_trial_and_reports_only_in_shadow(state: str) -> None:
    with pytest.raises(OtaError):
        step(at(state), Advance("shadow", 20.0, T))
    with pytest.raises(OtaError):
        step(at(state), ShadowReport({"f1": 1.0}, 20.0))


def test_the_shadow_summary_stays_in_the_report_through_probation_and_the_outcome() -> None:
    """`update.shadow` (with `f1`, which a fleet rollout reads) is reported from the
    first summary on, in probation, committed, and in a rejection."""
    summary = {"frames": 20, "f1": 0.91, "rate_ratio": 1.0, "latency_ratio": 1.1,
               "flags": []}
    s = step(step(at("trial"), Advance("shadow", 20.0, T)), ShadowReport(summary, 21.0))
    assert document(s)["update"]["shadow"] == summary
    live = step(s, Swapped(V2, 22.0, 30.0))
    assert document(live)["update"]["shadow"]["f1"] == 0.91
    done = step(live, Commit(23.0))
    assert document(done)["update"]["state"] == "committed"
    assert document(done)["update"]["shadow"] == summary
    bad = step(s, Fail("shadow: agreement F1 0.10 is below 0.5", 22.0))
    assert document(bad)["update"]["shadow"] == summary
    assert from_json(to_json(bad)) == bad


def test_adopt_takes_what_is_on_disk_only_when_nothing_is_known() -> None:
    fresh = step(ModelState("m"), Adopt(V1, None, 5.0))
    assert fresh.active == V1
    assert step(fresh, Adopt(V2, V1, 6.0)) is fresh


def test_the_report_carries_the_contract_fields() -> None:
    s = step(at("downloading"), Progress(0.25, 20.0))
    doc = document(s)
    assert set(doc) == {"name", "active", "previous", "update", "seq", "ts"}
    assert doc["active"] == {"version": 1, "sha256": "a" * 64, "since": 0.0}
    assert doc["update"] == {"version": 2, "state": "downloading", "progress": 0.25,
                             "reason": None, "ts": 10.0}
    assert doc["seq"] == 1


installed = st.builds(Installed, st.integers(1, 99), st.text("0123456789abcdef", min_size=64,
                                                           max_size=64),
                      st.floats(0, 2e9, allow_nan=False))
updates = st.builds(Update, st.none() | st.integers(0, 99), st.sampled_from(STATES),
                    st.floats(0, 2e9, allow_nan=False),
                    st.none() | st.floats(0, 2e9, allow_nan=False),
                    st.none() | st.floats(0, 1), st.none() | st.text(max_size=20),
                    st.text("0123456789abcdef", max_size=64),
                    st.none() | st.fixed_dictionaries({"frames": st.integers(0, 500),
                                                       "f1": st.floats(0, 1)}))


@given(st.builds(ModelState, st.text(min_size=1, max_size=10), st.none() | installed,
                 st.none() | installed, st.none() | updates,
                 st.frozensets(st.integers(1, 99)), st.integers(0, 5), st.integers(0, 10**6),
                 st.floats(0, 2e9, allow_nan=False)))
def test_the_persisted_form_round_trips(s: ModelState) -> None:
    assert from_json(to_json(s)) == s


def test_shadow_in_observe_mode_has_no_deadline_and_ends_only_by_a_newer_release() -> None:
    observe = replace(T, shadow_s=None)
    s = step(at("trial"), Advance("shadow", 20.0, observe))
    assert s.update is not None and s.update.deadline is None
    assert step(s, Tick(20.0 + 10**9)) is s
    assert step(s, offer(3, 30.0)).update.state == "downloading"  # type: ignore[union-attr]
