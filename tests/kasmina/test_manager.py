"""SeedManager: verified commands, typed rejections that change nothing, lifecycles driven by training."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from esper.kasmina import EventKind, RejectionReason, SeedManager, SlotMode
from esper.kasmina.lifecycle import SeedLifecycle
from esper.leyline import ManualClock, SignatureVerifier, pb, validate_seed_state
from esper.urza import BlueprintCatalogue
from tests.kasmina.support import (
    RUN_ID,
    SECRET,
    TinyHost,
    command,
    fast_settings,
    germinate,
    make_manager,
    open_catalogue,
    task,
    train_step,
)

torch.set_num_threads(1)
S = pb


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def catalogue(tmp_path: Path) -> BlueprintCatalogue:
    return open_catalogue(tmp_path)


@pytest.fixture
def host() -> TinyHost:
    torch.manual_seed(0)
    return TinyHost()


@pytest.fixture
def manager(host: TinyHost, catalogue: BlueprintCatalogue, clock: ManualClock) -> SeedManager:
    return make_manager(host, catalogue, clock)


def _snapshot(manager: SeedManager, host: TinyHost) -> tuple[object, list[str]]:
    return manager.export_state(), sorted(host.state_dict())


def test_dormant_slots_report_their_own_ids_and_germination_mints_seed_ids(
    manager: SeedManager, clock: ManualClock
) -> None:
    states = manager.seed_states(learning_rate=0.1, steps_per_epoch=10)
    assert [(s.slot_id, s.seed_id, s.stage) for s in states] == [
        ("a", "a", S.SEED_STAGE_DORMANT),
        ("b", "b", S.SEED_STAGE_DORMANT),
    ]
    result = manager.apply(germinate(clock, "a"), step=0)
    assert result.accepted, result.detail
    assert manager.seed_id("a") == "a:g1" and manager.stage("a") == S.SEED_STAGE_GERMINATED
    state = manager.seed_states(learning_rate=0.1, steps_per_epoch=10)[0]
    validate_seed_state(state)
    for key in (
        "alpha",
        "alpha_steps",
        "alpha_total_steps",
        "blend_allowed",
        "stage_steps",
        "contribution_accuracy",
        "contribution_loss",
        "contribution_measured",
        "isolation_violations",
        "param_count",
    ):
        assert key in state.metrics
    assert state.metrics["contribution_measured"] == 0.0 and state.metrics["param_count"] > 0
    changes = manager.drain_parameter_changes()
    assert [seed_id for seed_id, _ in changes.added] == ["a:g1"]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("forged", RejectionReason.INVALID_SIGNATURE),
        ("tampered", RejectionReason.INVALID_SIGNATURE),
        ("stale", RejectionReason.STALE),
        ("future", RejectionReason.FUTURE_DATED),
        ("wrong_run", RejectionReason.WRONG_RUN),
    ],
)
def test_unauthentic_commands_are_rejected_and_change_nothing(
    manager: SeedManager, host: TinyHost, clock: ManualClock, tamper: str, reason: RejectionReason
) -> None:
    before = _snapshot(manager, host)
    if tamper == "forged":
        message = germinate(clock, secret=b"not-the-deployment-secret-xyz")
    elif tamper == "tampered":
        message = germinate(clock)
        message.seed_operation.blueprint_id = "lowrank"
    elif tamper == "stale":
        message = germinate(clock)
        clock.advance(120)
    elif tamper == "future":
        future = ManualClock(wall_ns=clock.wall_ns() + 60 * 10**9)
        message = germinate(future)
    else:
        message = germinate(clock, run_id="another-run")
    result = manager.apply(message, step=0)
    assert not result.accepted and result.reason == reason
    assert _snapshot(manager, host) == before
    assert not manager.drain_parameter_changes()
    assert [e.kind for e in manager.drain_events()] == [EventKind.COMMAND_REJECTED]


def test_replayed_command_is_rejected(manager: SeedManager, host: TinyHost, clock: ManualClock) -> None:
    message = germinate(clock)
    assert manager.apply(message, step=0).accepted
    manager.drain_parameter_changes()
    cull = command(clock, S.SEED_OP_CULL, "a", "a:g1")
    replay = pb.AdaptationCommand()
    replay.CopyFrom(cull)
    assert manager.apply(cull, step=1).accepted
    for _ in range(6):
        manager.advance(2)
    before = _snapshot(manager, host)
    result = manager.apply(replay, step=3)
    assert not result.accepted and result.reason == RejectionReason.REPLAYED
    assert _snapshot(manager, host) == before


def test_inapplicable_commands_are_rejected_with_their_reason(
    manager: SeedManager, host: TinyHost, clock: ManualClock, catalogue: BlueprintCatalogue
) -> None:
    catalogue.quarantine("attention_lite", "misbehaves in tests")
    cases = [
        (germinate(clock, "zz"), RejectionReason.UNKNOWN_SLOT),
        (germinate(clock, blueprint_id="no-such-blueprint"), RejectionReason.UNKNOWN_BLUEPRINT),
        (germinate(clock, blueprint_id="attention_lite"), RejectionReason.QUARANTINED_BLUEPRINT),
        (germinate(clock, blueprint_id="conv_se"), RejectionReason.BLUEPRINT_NOT_APPLICABLE),
        (command(clock, S.SEED_OP_FOSSILIZE, "a", "a"), RejectionReason.WRONG_STAGE),
        (command(clock, S.SEED_OP_CULL, "a", "a"), RejectionReason.WRONG_STAGE),
        (command(clock, S.SEED_OP_CULL, "a", "b:g7"), RejectionReason.WRONG_TARGET),
        (germinate(clock, parameters={"alpha_lo": 2.0}), RejectionReason.INVALID_PARAMETERS),
    ]
    before = _snapshot(manager, host)
    for message, reason in cases:
        result = manager.apply(message, step=0)
        assert (result.accepted, result.reason) == (False, reason), result.detail
        assert result.detail
    assert _snapshot(manager, host) == before
    assert not manager.drain_parameter_changes()


def test_fossilize_is_refused_until_probation_gate_passes(
    manager: SeedManager, host: TinyHost, clock: ManualClock
) -> None:
    x, y = task()
    optimizer = torch.optim.Adam(host.parameters(), lr=0.01)
    assert manager.apply(germinate(clock, "a"), step=0).accepted
    train_step(host, manager, optimizer, (x, y), 0)
    for step in range(1, 200):
        train_step(host, manager, optimizer, (x, y), step)
        if manager.stage("a") == S.SEED_STAGE_SHADOWING:
            manager.record_contribution("a", accuracy=0.01, loss=0.05, step=step)
        if manager.stage("a") == S.SEED_STAGE_PROBATIONARY:
            break
    assert manager.stage("a") == S.SEED_STAGE_PROBATIONARY
    result = manager.apply(command(clock, S.SEED_OP_FOSSILIZE, "a", "a:g1"), step=step)
    assert result.reason == RejectionReason.GATE_NOT_PASSED
    assert manager.stage("a") == S.SEED_STAGE_PROBATIONARY


def test_lifecycle_through_training_to_fossilized_and_cull_back_to_dormant(
    manager: SeedManager, host: TinyHost, clock: ManualClock
) -> None:
    x, y = task()
    optimizer = torch.optim.Adam(host.host_parameters(), lr=0.01)
    assert manager.apply(germinate(clock, "a"), step=0).accepted
    assert manager.apply(germinate(clock, "b", blueprint_id="lowrank"), step=0).accepted
    for _, params in manager.drain_parameter_changes().added:
        optimizer.add_param_group({"params": list(params)})
    params_before = sum(p.numel() for p in host.host_parameters())
    stages_a = [manager.stage("a")]
    alphas: list[float] = []
    culled_at = None
    for step in itertools.count():
        assert step < 400, f"stuck in {manager.stage('a')}"
        train_step(host, manager, optimizer, (x, y), step)
        stage = manager.stage("a")
        if stage != stages_a[-1]:
            stages_a.append(stage)
        if stage == S.SEED_STAGE_BLENDING:
            alphas.append(manager.alpha("a"))
        if stage in (S.SEED_STAGE_SHADOWING, S.SEED_STAGE_PROBATIONARY):
            manager.record_contribution("a", accuracy=0.02, loss=0.1, step=step)
        states = {s.slot_id: s for s in manager.seed_states(learning_rate=0.01, steps_per_epoch=10)}
        if states["a"].metrics["fossilize_ready"] == 1.0:
            result = manager.apply(command(clock, S.SEED_OP_FOSSILIZE, "a", "a:g1"), step=step)
            assert result.accepted, result.detail
            stages_a.append(manager.stage("a"))
        if manager.stage("b") == S.SEED_STAGE_TRAINING and culled_at is None:
            assert manager.apply(command(clock, S.SEED_OP_CULL, "b", "b:g1"), step=step).accepted
            culled_at = step
            retired = manager.drain_parameter_changes().retired
            assert [seed for seed, _ in retired] == ["b:g1"]
        if manager.stage("a") == S.SEED_STAGE_FOSSILIZED and manager.stage("b") == S.SEED_STAGE_DORMANT:
            break
    assert stages_a == [
        S.SEED_STAGE_GERMINATED,
        S.SEED_STAGE_TRAINING,
        S.SEED_STAGE_BLENDING,
        S.SEED_STAGE_SHADOWING,
        S.SEED_STAGE_PROBATIONARY,
        S.SEED_STAGE_FOSSILIZED,
    ]
    assert len(alphas) >= 5 and all(b > a for a, b in itertools.pairwise(alphas))
    transitions_b = [
        (e.from_stage, e.to_stage)
        for e in manager.drain_events()
        if e.kind == EventKind.TRANSITION and e.slot_id == "b"
    ]
    assert transitions_b[-4:] == [
        ("TRAINING", "CULLED"),
        ("CULLED", "EMBARGOED"),
        ("EMBARGOED", "RESETTING"),
        ("RESETTING", "DORMANT"),
    ]
    assert culled_at is not None and step - culled_at >= fast_settings().embargo_steps
    assert manager.seed_id("b") == "b" and host.b.is_clean()
    assert sum(p.numel() for p in host.parameters()) > params_before
    assert manager.seed_parameter_count(fossilized_only=True) > 0
    fossil_params = dict(manager.seed_parameter_groups())["a:g1"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in fossil_params)
    # A fresh germination of the reset slot mints the next generation's id.
    assert manager.apply(germinate(clock, "b"), step=step).accepted
    assert manager.seed_id("b") == "b:g2"


def test_state_round_trips_through_export_and_restore(
    manager: SeedManager, host: TinyHost, clock: ManualClock, catalogue: BlueprintCatalogue
) -> None:
    x, y = task()
    optimizer = torch.optim.Adam(host.parameters(), lr=0.01)
    assert manager.apply(germinate(clock, "a", blend_mode=S.BLEND_MODE_CHANNEL), step=0).accepted
    for step in range(12):
        train_step(host, manager, optimizer, (x, y), step)
    state, weights = manager.export_state(), host.state_dict()
    twin_host = TinyHost()
    twin = make_manager(twin_host, catalogue, clock)
    twin.restore_state(state)
    twin_host.load_state_dict(weights)
    assert twin.export_state() == state
    assert torch.equal(twin_host(x), host(x))
    assert twin.seed_id("a") == "a:g1" and twin.stage("a") == manager.stage("a")


def test_training_run_id_is_required(host: TinyHost, catalogue: BlueprintCatalogue) -> None:
    verifier = SignatureVerifier(SECRET)
    with pytest.raises(ValueError, match="training_run_id"):
        SeedManager([host.a], catalogue, verifier, fast_settings(), training_run_id="")


def test_commands_with_unknown_enum_values_are_rejected_naming_the_value(
    manager: SeedManager, host: TinyHost, clock: ManualClock
) -> None:
    """A signed command from a newer (or broken) sender may carry any enum number: it is refused with a
    reason that names the number, never a ValueError from building the rejection."""
    from esper.leyline import sign

    unknown_type = pb.AdaptationCommand(
        version=1, command_id="cmd-type-99", command_type=99, issued_by="test", training_run_id=RUN_ID
    )
    unknown_type.issued_at.FromNanoseconds(clock.wall_ns())
    cases = [
        (sign(unknown_type, SECRET, clock=clock), "command type 99 (unknown CommandType)"),
        (command(clock, 99, "a", "a", blueprint_id="mlp_small"), "seed operation 99 (unknown SeedOperation)"),
    ]
    before = _snapshot(manager, host)
    for message, named in cases:
        result = manager.apply(message, step=0)
        assert (result.accepted, result.reason) == (False, RejectionReason.UNSUPPORTED)
        assert named in result.detail
    assert _snapshot(manager, host) == before


def test_the_trainer_records_a_command_with_unknown_enum_values() -> None:
    from esper.tolaria.trainer_decisions import _command_record

    message = pb.AdaptationCommand(command_id="c", command_type=99)
    message.seed_operation.operation = 98
    message.seed_operation.blend_mode = 97
    record = _command_record(message)
    assert record["command_type"] == "99 (unknown CommandType)"
    assert record["operation"] == "98 (unknown SeedOperation)"
    assert record["blend_mode"] == "97 (unknown BlendMode)"


def test_advance_skips_dormant_lifecycles_until_a_seed_command_or_restore(
    manager: SeedManager,
    host: TinyHost,
    clock: ManualClock,
    catalogue: BlueprintCatalogue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stepped: list[int] = []
    original = SeedLifecycle.advance

    def counted(self: SeedLifecycle) -> object:
        stepped.append(self.stage)
        return original(self)

    monkeypatch.setattr(SeedLifecycle, "advance", counted)
    for step in range(5):
        assert manager.advance(step) == []
    assert len(stepped) == 2  # the first advance steps both dormant slots; then nothing is left to do
    host.a.arm_gradient_probe()
    manager.advance(5)
    assert host.a.mode == SlotMode.PROBE  # a probe armed on a resting slot stays armed
    stepped.clear()
    assert manager.apply(germinate(clock, "a"), step=6).accepted
    host(task()[0])  # the sanity forward
    events = manager.advance(6)
    assert [e.to_stage for e in events if e.kind == EventKind.TRANSITION] == ["TRAINING"]
    assert len(stepped) == 2
    # A resting manager that restores a live seed steps it again.
    twin = make_manager(TinyHost(), catalogue, clock)
    twin.advance(0)
    twin.advance(1)
    stepped.clear()
    twin.restore_state(manager.export_state())
    twin.advance(7)
    assert S.SEED_STAGE_TRAINING in stepped
