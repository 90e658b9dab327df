"""The lifecycle state machine: gates on measured signals, one move per step, only legal moves."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.kasmina import LEGAL_TRANSITIONS, IllegalTransition, SeedLifecycle
from esper.leyline import pb
from tests.kasmina.support import fast_settings

S = pb


def _to_training(lifecycle: SeedLifecycle) -> None:
    lifecycle.germinate(alpha_ramp_steps=6)
    lifecycle.record_sanity(True)
    assert lifecycle.advance().to_stage == S.SEED_STAGE_TRAINING


def _to_blending(lifecycle: SeedLifecycle) -> None:
    _to_training(lifecycle)
    for gain in (0.1, 0.2, 0.3, 0.4):
        lifecycle.record_training_gain(gain)
        lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_BLENDING


def test_happy_path_reaches_fossilized_one_gate_at_a_time() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    _to_blending(lifecycle)
    alphas = []
    while lifecycle.stage == S.SEED_STAGE_BLENDING:
        lifecycle.record_gradient_norm(0.5)
        lifecycle.advance()
        alphas.append(lifecycle.alpha)
    assert len(alphas) >= 5
    assert all(b > a for a, b in itertools.pairwise(alphas))
    assert lifecycle.stage == S.SEED_STAGE_SHADOWING and lifecycle.alpha == 1.0
    lifecycle.advance()
    lifecycle.record_contribution(accuracy=0.02, loss=0.05, step=1)
    lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_PROBATIONARY
    with pytest.raises(IllegalTransition):
        lifecycle.fossilize()  # G4 has not passed: probation not held, nothing measured in it
    for _ in range(3):
        lifecycle.advance()
    assert not lifecycle.fossilize_ready
    lifecycle.record_contribution(accuracy=0.01, loss=0.02, step=2)
    lifecycle.advance()
    assert lifecycle.fossilize_ready
    lifecycle.fossilize()
    assert lifecycle.stage == S.SEED_STAGE_FOSSILIZED


def test_unmeasured_signals_wait_and_never_pass() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    lifecycle.germinate(alpha_ramp_steps=6)
    for _ in range(20):
        outcome = lifecycle.advance()
        assert outcome.gate is not None and not outcome.gate.passed and not outcome.gate.failed
    assert lifecycle.stage == S.SEED_STAGE_GERMINATED
    lifecycle.record_sanity(True)
    lifecycle.advance()
    for _ in range(20):  # no training gain was ever measured
        lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_TRAINING


def test_contribution_gate_waits_without_measurement_and_fails_on_negative() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    _to_blending(lifecycle)
    while lifecycle.stage == S.SEED_STAGE_BLENDING:
        lifecycle.record_gradient_norm(0.5)
        lifecycle.advance()
    for _ in range(10):
        lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_SHADOWING
    lifecycle.record_contribution(accuracy=-0.1, loss=-0.2, step=3)
    outcome = lifecycle.advance()
    assert outcome.gate is not None and outcome.gate.failed
    assert lifecycle.stage == S.SEED_STAGE_SHADOWING


def test_blending_gate_fails_on_unhealthy_gradient() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    _to_blending(lifecycle)
    for _ in range(6):
        lifecycle.record_gradient_norm(float("nan"))
        lifecycle.advance()
    outcome = lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_BLENDING
    assert outcome.gate is not None and outcome.gate.failed


def test_cull_embargo_expires_then_reset_returns_to_dormant() -> None:
    lifecycle = SeedLifecycle(fast_settings(embargo_steps=5))
    _to_training(lifecycle)
    lifecycle.cull()
    assert lifecycle.stage == S.SEED_STAGE_CULLED
    lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_EMBARGOED
    for _ in range(4):
        lifecycle.advance()
        assert lifecycle.stage == S.SEED_STAGE_EMBARGOED
    lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_RESETTING
    lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_RESETTING  # G5 waits for the slot to be inspected
    lifecycle.record_slot_clean(True)
    lifecycle.advance()
    assert lifecycle.stage == S.SEED_STAGE_DORMANT


def test_illegal_commands_raise_and_change_nothing() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    with pytest.raises(IllegalTransition):
        lifecycle.cull()
    with pytest.raises(IllegalTransition):
        lifecycle.fossilize()
    lifecycle.germinate(alpha_ramp_steps=4)
    before = lifecycle.export_state()
    with pytest.raises(IllegalTransition):
        lifecycle.germinate(alpha_ramp_steps=4)
    assert lifecycle.export_state() == before


def test_state_round_trips() -> None:
    lifecycle = SeedLifecycle(fast_settings())
    _to_blending(lifecycle)
    lifecycle.record_contribution(accuracy=0.1, loss=0.2, step=7)
    copy = SeedLifecycle.from_state(fast_settings(), lifecycle.export_state())
    assert copy.export_state() == lifecycle.export_state()


_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.none()),
        st.tuples(st.just("germinate"), st.integers(min_value=1, max_value=8)),
        st.tuples(st.just("cull"), st.none()),
        st.tuples(st.just("fossilize"), st.none()),
        st.tuples(st.just("terminate"), st.none()),
        st.tuples(st.just("sanity"), st.booleans()),
        st.tuples(st.just("gain"), st.floats(min_value=-1, max_value=1)),
        st.tuples(st.just("gradient"), st.sampled_from([0.0, 0.5, 2e3, float("nan")])),
        st.tuples(st.just("contribution"), st.floats(min_value=-0.5, max_value=0.5)),
        st.tuples(st.just("clean"), st.booleans()),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(_ACTIONS)
def test_random_sequences_take_only_legal_transitions(actions: list[tuple[str, object]]) -> None:  # noqa: C901 (a state-machine property test: one branch per command kind)
    lifecycle = SeedLifecycle(fast_settings(embargo_steps=2))
    for step, (name, value) in enumerate(actions):
        before = lifecycle.stage
        try:
            if name == "advance":
                outcome = lifecycle.advance()
                assert outcome.from_stage == before
            elif name == "germinate":
                lifecycle.germinate(int(value))  # type: ignore[call-overload]
            elif name == "cull":
                lifecycle.cull()
            elif name == "fossilize":
                lifecycle.fossilize()
            elif name == "terminate":
                lifecycle.terminate()
            elif name == "sanity":
                lifecycle.record_sanity(bool(value))
            elif name == "gain":
                lifecycle.record_training_gain(float(value))  # type: ignore[arg-type]
            elif name == "gradient":
                lifecycle.record_gradient_norm(float(value))  # type: ignore[arg-type]
            elif name == "contribution":
                lifecycle.record_contribution(float(value), float(value), step)  # type: ignore[arg-type]
            else:
                lifecycle.record_slot_clean(bool(value))
        except IllegalTransition:
            assert lifecycle.stage == before
            continue
        after = lifecycle.stage
        assert after == before or after in LEGAL_TRANSITIONS[before], (before, after, name)
        assert 0.0 <= lifecycle.alpha <= 1.0
        if after == S.SEED_STAGE_FOSSILIZED:
            assert before == S.SEED_STAGE_PROBATIONARY
