"""Stacking under the manager: a fossil becomes part of the host and its slot hosts the next seed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from esper.kasmina import EventKind, SeedManager, SeedSlot
from esper.leyline import ManualClock, SignatureVerifier, pb
from esper.tolaria.hosts import Host
from esper.tolaria.optimizer import GroupedAdam
from esper.urza import BlueprintCatalogue
from tests.kasmina.growth_support import make_case
from tests.kasmina.support import RUN_ID, SECRET, command, fast_settings, germinate, open_catalogue
from tests.kasmina.test_growth_commands import widen

torch.set_num_threads(1)

# (host kind, slot, blueprint, folded): a foldable and an unfoldable seed on every host kind.
STACK_CASES = [
    ("mlp", "h1", "lowrank", True),  # Linear body, Linear consumer: merged into fc2
    ("mlp", "h2", "mlp_small", False),  # GELU between its layers: kept as a host module
    ("cnn", "c1", "lowrank", False),  # its constant would be lost in conv2's zero padding
    ("cnn", "c2", "lowrank", True),  # through the pool into the head
    ("cnn", "c1", "conv_residual", False),
    ("sequence", "s2", "conv1d_lowrank", True),
    ("sequence", "s1", "conv1d_residual", False),
    ("transformer", "f1", "conv1d_lowrank", True),  # per token into proj1
    ("transformer", "t1", "conv1d_residual", False),  # after the residual sum: no single consumer
]


@pytest.fixture
def catalogue(tmp_path: Path) -> BlueprintCatalogue:
    return open_catalogue(tmp_path)


class Rig:
    """A real host, its manager, and Tolaria's optimizer, stepped as the trainer steps them."""

    def __init__(self, kind: str, catalogue: BlueprintCatalogue) -> None:
        case = make_case(kind)
        assert isinstance(case.host, Host)
        self.host: Host = case.host
        self.x, self.y = case.x, case.y
        self.clock = ManualClock()
        verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=self.clock)
        self.manager = SeedManager(
            self.host.slots(), catalogue, verifier, fast_settings(), training_run_id=RUN_ID, host=self.host
        )
        self.optimizer = GroupedAdam(self.host.parameters(), lr=0.01)
        self.step = 0

    def slot(self, slot_id: str) -> SeedSlot:
        return next(s for s in self.host.slots() if s.slot_id == slot_id)

    def changes(self) -> None:
        changes = self.manager.drain_parameter_changes()
        for seed_id, _ in changes.retired:
            if seed_id in self.optimizer.group_names:
                self.optimizer.retire_group(seed_id)
        for seed_id, params in changes.added:
            self.optimizer.add_group(seed_id, params)

    def train(self) -> None:
        self.host.train()
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.host(self.x), self.y).backward()  # type: ignore[no-untyped-call]
        self.manager.observe_backward(self.step)
        self.optimizer.step()
        self.manager.advance(self.step)
        self.changes()
        self.step += 1

    def outputs(self) -> Tensor:
        self.host.eval()
        with torch.no_grad():
            return self.host(self.x)

    def grow_to_fossil(self, slot_id: str, blueprint: str) -> str:
        """Germinate `blueprint` in `slot_id` and train until the manager accepts its FOSSILIZE."""
        assert self.manager.apply(germinate(self.clock, slot_id, blueprint), step=self.step).accepted
        self.changes()
        seed_id = self.manager.seed_id(slot_id)
        for _ in itertools.count():
            assert self.step < 600, f"stuck in {self.manager.stage(slot_id)}"
            self.train()
            stage = self.manager.stage(slot_id)
            if stage in (pb.SEED_STAGE_SHADOWING, pb.SEED_STAGE_PROBATIONARY):
                self.manager.record_contribution(slot_id, accuracy=0.02, loss=0.1, step=self.step)
            states = {s.slot_id: s for s in self.manager.seed_states(learning_rate=0.01, steps_per_epoch=10)}
            if states[slot_id].metrics["fossilize_ready"] == 1.0:
                fossilize = command(self.clock, pb.SEED_OP_FOSSILIZE, slot_id, seed_id)
                result = self.manager.apply(fossilize, step=self.step)
                assert result.accepted, result.detail
                assert self.manager.stage(slot_id) == pb.SEED_STAGE_FOSSILIZED
                return seed_id
        raise AssertionError("unreachable")

    def stack(self) -> list[dict[str, object]]:
        """The advance after fossilisation stacks the fossil; returns the STACKED events' details."""
        self.manager.drain_events()
        self.manager.advance(self.step)
        self.changes()
        return [
            {"seed_id": e.seed_id, "reason": e.reason, **e.detail}
            for e in self.manager.drain_events()
            if e.kind == EventKind.STACKED
        ]


@pytest.mark.parametrize(("kind", "slot_id", "blueprint", "folded"), STACK_CASES)
def test_stacking_a_fossil_preserves_the_function_and_frees_its_slot(
    catalogue: BlueprintCatalogue, kind: str, slot_id: str, blueprint: str, folded: bool
) -> None:
    rig = Rig(kind, catalogue)
    seed_id = rig.grow_to_fossil(slot_id, blueprint)
    before = rig.outputs()
    parameters = rig.host.parameter_count()
    stacked = rig.stack()
    assert [(e["seed_id"], e["folded"]) for e in stacked] == [(seed_id, folded)], stacked
    torch.testing.assert_close(rig.outputs(), before, atol=1e-6, rtol=0.0)
    slot = rig.slot(slot_id)
    assert rig.manager.stage(slot_id) == pb.SEED_STAGE_DORMANT and slot.seed is None and slot.is_clean()
    assert rig.manager.seed_id(slot_id) == slot_id and rig.manager.fossilized_count() == 1
    # A folded seed's parameters leave the host; a kept one's stay, as a host module.
    assert (rig.host.parameter_count() < parameters) == folded
    assert (len(slot.stacked) == 1) == (not folded)
    assert (seed_id in rig.optimizer.group_names) == (not folded)


def test_a_slot_hosts_three_seeds_one_after_another(catalogue: BlueprintCatalogue) -> None:
    rig = Rig("mlp", catalogue)
    stacked: list[dict[str, object]] = []
    for blueprint in ("lowrank", "mlp_small", "mlp_expand"):
        rig.grow_to_fossil("h1", blueprint)
        before = rig.outputs()
        stacked += rig.stack()
        torch.testing.assert_close(rig.outputs(), before, atol=1e-6, rtol=0.0)
        assert rig.manager.stage("h1") == pb.SEED_STAGE_DORMANT
        for _ in range(3):
            rig.train()  # the kept fossils train with the host
    assert [e["seed_id"] for e in stacked] == ["h1:g1", "h1:g2", "h1:g3"]
    assert [e["folded"] for e in stacked] == [True, False, False]
    assert rig.manager.fossilized_count() == 3
    assert [s["seed_id"] for s in rig.manager.stacked_seeds()] == ["h1:g1", "h1:g2", "h1:g3"]
    assert len(rig.slot("h1").stacked) == 2


def test_stacking_keeps_the_optimizer_state_of_existing_parameters(catalogue: BlueprintCatalogue) -> None:
    rig = Rig("mlp", catalogue)
    rig.grow_to_fossil("h1", "mlp_small")
    state = rig.optimizer.optimizer.state

    def moments() -> dict[int, tuple[Tensor, Tensor]]:
        return {
            id(p): (state[p]["exp_avg"].clone(), state[p]["exp_avg_sq"].clone())
            for p in rig.host.parameters()
            if p in state
        }

    held = moments()
    seed_parameters = {id(p) for p in rig.slot("h1").seed.parameters()}  # type: ignore[union-attr]
    assert seed_parameters <= set(held)
    rig.stack()
    after = moments()
    assert set(after) == set(held)  # the kept seed's parameters keep theirs too
    for key, (avg, avg_sq) in held.items():
        assert torch.equal(after[key][0], avg) and torch.equal(after[key][1], avg_sq)


def test_a_widen_is_refused_on_a_layer_whose_slot_holds_a_stacked_fossil(
    catalogue: BlueprintCatalogue,
) -> None:
    rig = Rig("mlp", catalogue)
    rig.grow_to_fossil("h1", "mlp_small")
    rig.stack()
    result = rig.manager.apply(widen(rig.clock, "fc1"), step=rig.step)
    assert not result.accepted and "stacked" in result.detail


def test_export_and_restore_rebuild_stacked_fossils(catalogue: BlueprintCatalogue) -> None:
    rig = Rig("mlp", catalogue)
    rig.grow_to_fossil("h1", "lowrank")
    rig.stack()
    rig.grow_to_fossil("h1", "mlp_small")
    rig.stack()
    state, weights, expected = rig.manager.export_state(), rig.host.state_dict(), rig.outputs()
    fresh = Rig("mlp", catalogue)
    fresh.manager.restore_state(state)
    fresh.host.load_state_dict(weights, strict=True)
    torch.testing.assert_close(fresh.outputs(), expected, atol=0.0, rtol=0.0)
    assert fresh.manager.fossilized_count() == 2 and fresh.manager.stage("h1") == pb.SEED_STAGE_DORMANT
    assert [g for g, _ in fresh.manager.seed_parameter_groups()] == ["h1:g2"]
