"""GroupedAdam: a widened parameter keeps its Adam moments and step count, extended by the new units'."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from esper.kasmina import GrowthMode, ParameterMerge, UnitGroup, random_fan_in
from esper.tolaria.hosts import MLPHost
from esper.tolaria.optimizer import GroupedAdam, OptimizerStateError

torch.set_num_threads(1)

GROUP = "widen-fc1"


def _setup(
    steps: int = 3, group_steps: int | None = None
) -> tuple[MLPHost, UnitGroup, GroupedAdam, Tensor, Tensor]:
    """An MLP host widened at fc1 by a live unit group, trained `steps` steps (the group `group_steps`)."""
    torch.manual_seed(0)
    host = MLPHost(10, 3, width=6, depth=2)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    site = host.widen_site("fc1")
    group = UnitGroup(site, *random_fan_in(site, 3, generator=torch.Generator().manual_seed(1)))
    group.mode = GrowthMode.LIVE
    group.attach()
    optimizer = GroupedAdam(host.parameters(), lr=0.01, weight_decay=0.001)
    group_steps = steps if group_steps is None else group_steps
    for step in range(steps):
        if step == steps - group_steps:
            optimizer.add_group(GROUP, list(group.parameters()))
        _step(host, optimizer, x, y)
    return host, group, optimizer, x, y


def _step(host: MLPHost, optimizer: GroupedAdam, x: Tensor, y: Tensor) -> None:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(host(x), y).backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _merge(group: UnitGroup, optimizer: GroupedAdam) -> tuple[ParameterMerge, ...]:
    merges = group.merge()
    for merge in merges:
        optimizer.absorb(merge.old, merge.appended, merge.merged, dim=merge.dim)
    optimizer.retire_group(GROUP)
    return merges


def test_merged_parameters_keep_the_old_moments_and_take_the_groups() -> None:
    _, group, optimizer, _, _ = _setup()
    state = optimizer.optimizer.state
    before = {
        id(p): {key: value.clone() for key, value in state[p].items()}
        for p in [*group.site.producer.parameters(), group.site.consumer.weight, *group.parameters()]
    }
    merges = _merge(group, optimizer)
    assert optimizer.group_names == ["host"]
    for merge in merges:
        assert optimizer.holds(merge.merged) and not optimizer.holds(merge.old)
        assert merge.old not in state and merge.appended not in state
        new, old, appended = state[merge.merged], before[id(merge.old)], before[id(merge.appended)]
        assert torch.equal(new["step"], old["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            old_part, new_part = new[key].split(
                [merge.old.shape[merge.dim], merge.appended.shape[merge.dim]], merge.dim
            )
            assert torch.equal(old_part, old[key])
            assert torch.equal(new_part, appended[key])


def test_a_step_after_the_merge_equals_a_step_before_it() -> None:
    host_a, _, optimizer_a, x, y = _setup()
    _step(host_a, optimizer_a, x, y)  # layer + group
    expected = host_a(x).detach()
    host_b, group_b, optimizer_b, _, _ = _setup()
    _merge(group_b, optimizer_b)
    _step(host_b, optimizer_b, x, y)  # the merged, wider layers
    assert torch.allclose(host_b(x).detach(), expected, atol=1e-6, rtol=0.0)


def test_units_the_optimizer_never_held_start_with_zero_moments() -> None:
    _, group, optimizer, _, _ = _setup(group_steps=0)
    merges = group.merge()
    for merge in merges:
        optimizer.absorb(merge.old, merge.appended, merge.merged, dim=merge.dim)
        new = optimizer.optimizer.state[merge.merged]["exp_avg_sq"]
        tail = new.narrow(merge.dim, merge.old.shape[merge.dim], merge.appended.shape[merge.dim])
        assert torch.equal(tail, torch.zeros_like(tail))
    assert all(optimizer.holds(m.merged) for m in merges)


def test_moments_of_a_younger_group_keep_their_bias_corrected_value() -> None:
    _, group, optimizer, _, _ = _setup(steps=4, group_steps=2)
    state = optimizer.optimizer.state
    weight = group.fan_in_weight
    young = {key: state[weight][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    merge = next(m for m in group.merge() if m.appended is weight)
    optimizer.absorb(merge.old, merge.appended, merge.merged, dim=merge.dim)
    new = state[merge.merged]
    assert float(new["step"]) == 4.0
    tail = {key: new[key][merge.old.shape[0] :] for key in young}
    assert torch.allclose(tail["exp_avg"] / (1 - 0.9**4), young["exp_avg"] / (1 - 0.9**2), rtol=1e-5)
    assert torch.allclose(
        tail["exp_avg_sq"] / (1 - 0.999**4), young["exp_avg_sq"] / (1 - 0.999**2), rtol=1e-5
    )


def test_absorb_refuses_foreign_parameters_and_wrong_shapes() -> None:
    _, group, optimizer, _, _ = _setup()
    stranger = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(OptimizerStateError, match="not optimised"):
        optimizer.absorb(stranger, stranger, stranger, dim=0)
    weight = group.site.producer.weight
    with pytest.raises(OptimizerStateError, match="merged shape"):
        optimizer.absorb(weight, group.fan_in_weight, torch.nn.Parameter(torch.zeros(1)), dim=0)
    assert optimizer.holds(weight) and optimizer.holds(group.fan_in_weight)


def test_state_after_a_merge_round_trips() -> None:
    host, group, optimizer, _, _ = _setup()
    _merge(group, optimizer)
    tensors, meta = optimizer.export_state()
    restored = GroupedAdam(host.parameters(), lr=0.01)
    restored.restore_state(tensors, meta)
    for parameter in host.parameters():
        for key, value in optimizer.optimizer.state[parameter].items():
            assert torch.equal(restored.optimizer.state[parameter][key], value)


def test_zero_grad_clears_the_gradient_of_every_group_as_torch_does() -> None:
    torch.manual_seed(0)
    host = MLPHost(10, 3, width=6, depth=2)
    seed = torch.nn.Linear(6, 6)
    optimizer = GroupedAdam(host.parameters(), lr=0.01)
    optimizer.add_group("h1:g1", list(seed.parameters()))
    x = torch.randn(8, 10)
    (host(x).sum() + seed(torch.randn(8, 6)).sum()).backward()
    everything = [*host.parameters(), *seed.parameters()]
    assert all(p.grad is not None for p in everything)
    optimizer.zero_grad()
    assert all(p.grad is None for p in everything)
