"""WIDEN and DEEPEN as signed commands under the seed lifecycle: built, gated, merged or culled."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from esper.kasmina import EventKind, RejectionReason, SeedManager, UnitGroup
from esper.leyline import Clock, ManualClock, SignatureVerifier, pb, sign
from esper.tolaria.hosts import MLPHost
from esper.tolaria.optimizer import GroupedAdam
from esper.urza import BlueprintCatalogue
from tests.kasmina.support import RUN_ID, SECRET, command, fast_settings, germinate, open_catalogue

torch.set_num_threads(1)
S = pb
_IDS = itertools.count(1)


def growth_command(
    clock: Clock,
    operation: int,
    layer_id: str,
    *,
    units: int = 4,
    init: int = pb.GROWTH_INIT_GRADMAX,
    hidden: int = 0,
    secret: bytes = SECRET,
    target: str | None = None,
) -> pb.AdaptationCommand:
    message = pb.AdaptationCommand(
        version=1,
        command_id=f"grow-{next(_IDS)}",
        command_type=pb.COMMAND_SEED,
        issued_by="test",
        target_seed_id=layer_id if target is None else target,
        training_run_id=RUN_ID,
    )
    op = message.seed_operation
    op.operation = operation
    op.alpha_ramp_steps = 4
    op.growth.layer_id = layer_id
    op.growth.units = units
    op.growth.init = init
    op.growth.hidden = hidden
    message.issued_at.FromNanoseconds(clock.wall_ns())
    return sign(message, secret, clock=clock)


def widen(clock: Clock, layer_id: str = "fc1", **kw: object) -> pb.AdaptationCommand:
    return growth_command(clock, pb.SEED_OP_WIDEN, layer_id, **kw)  # type: ignore[arg-type]


def deepen(clock: Clock, layer_id: str = "fc1", **kw: object) -> pb.AdaptationCommand:
    return growth_command(clock, pb.SEED_OP_DEEPEN, layer_id, **kw)  # type: ignore[arg-type]


def data(n: int = 128) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=generator)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).clamp(max=2)
    return x, y


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def catalogue(tmp_path: Path) -> BlueprintCatalogue:
    return open_catalogue(tmp_path)


def make(catalogue: BlueprintCatalogue, clock: Clock, **settings: float) -> tuple[MLPHost, SeedManager]:
    torch.manual_seed(0)
    host = MLPHost(6, 3, width=5)
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    manager = SeedManager(
        host.slots(),
        catalogue,
        verifier,
        fast_settings(growth_statistics_steps=2, **settings),
        training_run_id=RUN_ID,
        host=host,
    )
    return host, manager


class Loop:
    """Training as Tolaria does it, with a GroupedAdam that absorbs merges."""

    def __init__(self, host: MLPHost, manager: SeedManager) -> None:
        self.host, self.manager = host, manager
        self.optimizer = GroupedAdam(list(host.parameters()), lr=0.01)
        self.step = 0
        self.x, self.y = data()

    def apply_changes(self) -> None:
        changes = self.manager.drain_parameter_changes()
        for merge in changes.merged:
            self.optimizer.absorb(merge.old, merge.appended, merge.merged, dim=merge.dim)
        for name, _ in changes.retired:
            if name in self.optimizer.group_names:
                self.optimizer.retire_group(name)
        for name, params in changes.added:
            self.optimizer.add_group(name, params)

    def train(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.host(self.x), self.y)
            loss.backward()  # type: ignore[no-untyped-call]
            self.manager.observe_backward(self.step)
            self.optimizer.step()
            self.manager.advance(self.step)
            self.apply_changes()
            self.step += 1

    def measure(self) -> None:
        """Counterfactual contributions of every measurable growth, as the trainer's evaluation does."""
        with torch.no_grad():
            for growth_id in self.manager.measurable_slots():
                loss = float(nn.functional.cross_entropy(self.host(self.x), self.y))
                with self.manager.counterfactual(growth_id):
                    without = float(nn.functional.cross_entropy(self.host(self.x), self.y))
                self.manager.record_contribution(growth_id, accuracy=0.0, loss=without - loss, step=self.step)

    def until(self, growth_id: str, stage: int, limit: int = 400) -> None:
        for _ in range(limit):
            if (
                growth_id in self.manager.growth_ids
                and self.manager.growth(growth_id).lifecycle.stage == stage
            ):
                return
            self.measure()
            self.train()
        raise AssertionError(f"{growth_id} never reached {pb.SeedLifecycleStage.Name(stage)}")

    def ready(self, growth_id: str, limit: int = 400) -> None:
        self.until(growth_id, S.SEED_STAGE_PROBATIONARY, limit)
        for _ in range(limit):
            if self.manager.growth(growth_id).lifecycle.fossilize_ready:
                return
            self.measure()
            self.train()
        raise AssertionError(f"{growth_id} never passed G4")


def outputs(host: nn.Module) -> Tensor:
    with torch.no_grad():
        return host(data()[0]).clone()


@pytest.mark.parametrize("init", [pb.GROWTH_INIT_GRADMAX, pb.GROWTH_INIT_RANDOM])
def test_a_widen_preserves_the_function_at_insertion_and_its_units_get_gradients(
    catalogue: BlueprintCatalogue, clock: ManualClock, init: int
) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    result = manager.apply(widen(clock, units=3, init=init), step=0)
    assert result.accepted, result.detail
    (growth_id,) = manager.growth_ids
    assert growth_id == "fc1:w1"
    loop.train(3)  # gradmax gathers two backward passes, then builds
    growth = manager.growth(growth_id)
    assert isinstance(growth.module, UnitGroup) and growth.module.attached
    before_insert = outputs(host)
    growth.module.detach()
    torch.testing.assert_close(outputs(host), before_insert, atol=1e-6, rtol=0)
    growth.module.attach()
    # In the host's state dict, so checkpoints save the units.
    assert "growth.fc1:w1.fan_in_weight" in host.state_dict()
    loss = nn.functional.cross_entropy(host(loop.x), loop.y)
    loss.backward()  # type: ignore[no-untyped-call]
    assert growth.module.fan_out_weight.grad is not None
    assert float(growth.module.fan_out_weight.grad.abs().sum()) > 0


def test_new_units_are_isolated_while_training(catalogue: BlueprintCatalogue, clock: ManualClock) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    assert manager.apply(widen(clock, init=pb.GROWTH_INIT_RANDOM), step=0).accepted
    loop.until("fc1:w1", S.SEED_STAGE_TRAINING)
    group = manager.growth("fc1:w1").module
    assert isinstance(group, UnitGroup)
    with torch.no_grad():
        group.fan_out_weight.normal_()  # a contribution that would change the host's value and gradient

    def host_grads() -> list[Tensor]:
        host.zero_grad()
        nn.functional.cross_entropy(host(loop.x), loop.y).backward()  # type: ignore[no-untyped-call]
        return [p.grad.clone() for _, _, _, layer in host.host_layers() for p in layer.parameters()]  # type: ignore[union-attr]

    with_group = host_grads()
    group.detach()
    without_group = host_grads()
    for a, b in zip(with_group, without_group, strict=True):
        assert torch.equal(a, b)


def test_a_culled_widen_leaves_the_layer_exactly_as_before(
    catalogue: BlueprintCatalogue, clock: ManualClock
) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    loop.train(2)
    assert manager.apply(widen(clock, init=pb.GROWTH_INIT_RANDOM), step=loop.step).accepted
    loop.apply_changes()
    loop.until("fc1:w1", S.SEED_STAGE_BLENDING)
    host_before = {k: v.clone() for k, v in host.state_dict().items() if not k.startswith("growth.")}
    probe = data()[0]
    with torch.no_grad(), manager.counterfactual("fc1:w1"):
        expected = host(probe).clone()
    cull = command(clock, pb.SEED_OP_CULL, "fc1:w1", "fc1:w1")
    result = manager.apply(cull, step=loop.step)
    assert result.accepted, result.detail
    loop.apply_changes()
    assert "fc1:w1" not in loop.optimizer.group_names
    assert host.state_dict().keys() == host_before.keys()
    for name, tensor in host.state_dict().items():
        assert torch.equal(tensor, host_before[name]), name
    with torch.no_grad():
        assert torch.equal(host(probe), expected)
    assert manager.growth("fc1:w1").lifecycle.stage == S.SEED_STAGE_CULLED
    # After the embargo the record goes and the layer can grow again.
    loop.train(12)
    assert manager.growth_ids == []
    assert manager.apply(widen(clock), step=loop.step).accepted


def test_a_fossilised_widen_merges_and_the_optimizer_extends_adam_moments(
    catalogue: BlueprintCatalogue, clock: ManualClock
) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    loop.train(2)
    assert manager.apply(widen(clock, units=3), step=loop.step).accepted
    loop.ready("fc1:w1")
    group = manager.growth("fc1:w1").module
    assert isinstance(group, UnitGroup)
    old_weight = host.hidden[0].weight
    old_moment = loop.optimizer.optimizer.state[old_weight]["exp_avg"].clone()
    unit_state = loop.optimizer.optimizer.state[group.fan_in_weight]
    unit_moment = unit_state["exp_avg"].clone()
    old_steps = float(loop.optimizer.optimizer.state[old_weight]["step"])
    unit_steps = float(unit_state["step"])
    probe = data()[0]
    with torch.no_grad():
        group.mode, group.alpha = group.mode.LIVE, 1.0
        expected = host(probe).clone()
        manager.growth("fc1:w1").sync()
    result = manager.apply(command(clock, pb.SEED_OP_FOSSILIZE, "fc1:w1", "fc1:w1"), step=loop.step)
    assert result.accepted, result.detail
    loop.apply_changes()
    assert host.hidden[0].out_features == 8 and host.slots()[0].width == 8
    assert manager.growth_ids == [] and "fc1:w1" not in loop.optimizer.group_names
    assert not any(k.startswith("growth.") for k in host.state_dict())
    merged = host.hidden[0].weight
    state = loop.optimizer.optimizer.state[merged]
    assert torch.equal(state["exp_avg"][:5], old_moment)
    # The units' own moments, rescaled so their bias-corrected value holds under the host's step count.
    factor = (1 - 0.9**old_steps) / (1 - 0.9**unit_steps)
    torch.testing.assert_close(state["exp_avg"][5:], unit_moment * factor)
    assert float(state["exp_avg"][5:].abs().sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(host(probe), expected, atol=1e-6, rtol=0)
    loop.train(2)  # the wider host trains on
    assert host.topology().layers[0].width == 8


def test_a_deepen_starts_as_the_identity_and_stays_when_fossilised(
    catalogue: BlueprintCatalogue, clock: ManualClock
) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    before = outputs(host)
    result = manager.apply(deepen(clock, "fc2", hidden=6), step=0)
    assert result.accepted, result.detail
    loop.apply_changes()
    assert "fc2:d1" in loop.optimizer.group_names
    torch.testing.assert_close(outputs(host), before, atol=1e-6, rtol=0)
    # A widen of the layer under the block would break it.
    refused = manager.apply(widen(clock, "fc2"), step=0)
    assert not refused.accepted and refused.reason == RejectionReason.GROWTH_NOT_APPLICABLE
    loop.ready("fc2:d1")
    result = manager.apply(command(clock, pb.SEED_OP_FOSSILIZE, "fc2:d1", "fc2:d1"), step=loop.step)
    assert result.accepted, result.detail
    assert manager.growth("fc2:d1").lifecycle.stage == S.SEED_STAGE_FOSSILIZED
    states = manager.growth_states(learning_rate=0.01, steps_per_epoch=4)
    assert [(s.slot_id, s.blueprint_id, s.stage) for s in states] == [
        ("fc2:d1", "deepen", S.SEED_STAGE_FOSSILIZED)
    ]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("forged", RejectionReason.INVALID_SIGNATURE),
        ("unsigned", RejectionReason.INVALID_SIGNATURE),
        ("unknown_layer", RejectionReason.UNKNOWN_LAYER),
        ("zero_units", RejectionReason.MALFORMED),
        ("no_init", RejectionReason.MALFORMED),
        ("wrong_target", RejectionReason.WRONG_TARGET),
    ],
)
def test_a_bad_widen_is_rejected_and_changes_nothing(
    catalogue: BlueprintCatalogue, clock: ManualClock, tamper: str, reason: RejectionReason
) -> None:
    host, manager = make(catalogue, clock)
    state_before = {k: v.clone() for k, v in host.state_dict().items()}
    if tamper == "forged":
        message = widen(clock, secret=b"not-the-secret-0123456789")
    elif tamper == "unsigned":
        message = widen(clock)
        message.signature = ""
    elif tamper == "unknown_layer":
        message = widen(clock, "fc9")
    elif tamper == "zero_units":
        message = widen(clock, units=0)
    elif tamper == "no_init":
        message = widen(clock, init=pb.GROWTH_INIT_UNSPECIFIED)
    else:
        message = widen(clock, target="h1")
    result = manager.apply(message, step=0)
    assert not result.accepted and result.reason == reason, result.detail
    assert result.events[0].kind == EventKind.COMMAND_REJECTED
    assert manager.growth_ids == [] and not manager.drain_parameter_changes()
    assert host.state_dict().keys() == state_before.keys()


def test_export_and_restore_rebuild_growths_and_widened_layers(
    catalogue: BlueprintCatalogue, clock: ManualClock
) -> None:
    host, manager = make(catalogue, clock)
    loop = Loop(host, manager)
    assert manager.apply(widen(clock, units=2), step=0).accepted
    loop.ready("fc1:w1")
    assert manager.apply(command(clock, pb.SEED_OP_FOSSILIZE, "fc1:w1", "fc1:w1"), step=loop.step).accepted
    loop.apply_changes()
    assert manager.apply(widen(clock, "fc2", units=3), step=loop.step).accepted
    loop.train(1)  # gathering statistics: a checkpoint now must resume the gathering
    saved_state = manager.export_state()
    saved_weights = {k: v.clone() for k, v in host.state_dict().items()}
    probe = data()[0]
    expected = outputs(host)

    fresh_host, fresh = make(catalogue, clock)
    fresh.restore_state(saved_state)
    fresh_host.load_state_dict(saved_weights, strict=True)
    assert fresh_host.hidden[0].out_features == 7
    with torch.no_grad():
        assert torch.equal(fresh_host(probe), expected)
    assert fresh.export_state() == saved_state
    # A rollback onto the manager that grew: the widened layer goes back to its saved width.
    host_before, manager_before = make(catalogue, clock)
    early = manager_before.export_state()
    manager.restore_state(early)
    assert host.hidden[0].out_features == 5 and manager.growth_ids == []
    host.load_state_dict(host_before.state_dict(), strict=True)


def test_growths_dwell_by_their_own_settings_and_seeds_by_theirs(
    catalogue: BlueprintCatalogue, clock: ManualClock
) -> None:
    host, manager = make(catalogue, clock, min_training_steps=40, growth_min_training_steps=3)
    loop = Loop(host, manager)
    assert manager.apply(widen(clock, "fc1", init=pb.GROWTH_INIT_RANDOM), step=0).accepted
    assert manager.apply(germinate(clock, "h2", "mlp_small"), step=0).accepted
    loop.apply_changes()
    loop.until("fc1:w1", S.SEED_STAGE_BLENDING, limit=30)
    assert manager.stage("h2") == S.SEED_STAGE_TRAINING  # the seed still has 40 steps to train
    state = manager.export_state()
    manager.restore_state(state)  # a restored growth keeps its own dwell
    assert manager.growth("fc1:w1").lifecycle.settings.min_training_steps == 3
