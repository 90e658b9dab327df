"""Widen: unit groups keep the host's function at insertion, learn, merge exactly and cull cleanly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from esper.kasmina import (
    Blender,
    FanInStatistics,
    GrowthMode,
    GrowthNotApplicable,
    IdentityBlock,
    SeedModule,
    UnitGroup,
    WidenSite,
    gradmax_fan_in,
    random_fan_in,
)
from esper.leyline import pb
from tests.kasmina.growth_support import CASE_IDS, WIDEN_CASES, Case, make_case

torch.set_num_threads(1)


def _statistics(case: Case, site: WidenSite, batches: int = 2) -> FanInStatistics:
    with FanInStatistics(site) as statistics:
        for _ in range(batches):
            case.host.zero_grad()
            case.loss().backward()  # type: ignore[no-untyped-call]
    case.host.zero_grad()
    return statistics


def _group(case: Case, layer: str, init: str, k: int = 3) -> UnitGroup:
    site = case.widen_site(layer)
    if init == "gradmax":
        return UnitGroup(site, *gradmax_fan_in(_statistics(case, site), k))
    return UnitGroup(site, *random_fan_in(site, k, generator=torch.Generator().manual_seed(7)))


def _train_group(case: Case, group: UnitGroup, steps: int = 3) -> None:
    """A few SGD steps on the group only (the host's own parameters do not move)."""
    optimizer = torch.optim.SGD(group.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        case.loss().backward()  # type: ignore[no-untyped-call]
        optimizer.step()


@pytest.mark.parametrize("mode", list(GrowthMode))
@pytest.mark.parametrize("init", ["gradmax", "random"])
@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_insertion_leaves_the_host_output_unchanged(
    kind: str, layer: str, init: str, mode: GrowthMode
) -> None:
    case = make_case(kind)
    before = case.host(case.x).detach()
    group = _group(case, layer, init)
    group.mode, group.alpha = mode, 0.5
    group.attach()
    after = case.host(case.x).detach()
    assert torch.allclose(after, before, atol=1e-6, rtol=0.0)
    assert group.attached and group.fan_out_weight.abs().sum() == 0


@pytest.mark.parametrize("mode", [GrowthMode.INCUBATE, GrowthMode.LIVE])
@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_gradients_reach_the_new_units_after_insertion(kind: str, layer: str, mode: GrowthMode) -> None:
    case = make_case(kind)
    group = _group(case, layer, "gradmax")
    group.mode = mode
    group.attach()
    case.loss().backward()  # type: ignore[no-untyped-call]
    assert group.fan_out_weight.grad is not None and float(group.fan_out_weight.grad.norm()) > 0
    # The fan-in's gradient flows through the fan-out, which is zero on the first backward.
    assert group.fan_in_weight.grad is not None and float(group.fan_in_weight.grad.norm()) == 0
    torch.optim.SGD(group.parameters(), lr=0.1).step()
    group.zero_grad()
    case.loss().backward()  # type: ignore[no-untyped-call]
    assert float(group.fan_in_weight.grad.norm()) > 0


@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_incubating_units_send_no_gradient_to_the_host(kind: str, layer: str) -> None:
    case = make_case(kind)
    group = _group(case, layer, "random")
    with torch.no_grad():
        group.fan_out_weight.normal_()  # a trained group: its contribution is not zero any more
    case.loss().backward()  # type: ignore[no-untyped-call]
    alone = [p.grad.clone() for p in case.host.parameters() if p.grad is not None]
    out_alone = case.host(case.x).detach()
    case.host.zero_grad()
    group.mode = GrowthMode.INCUBATE
    group.attach()
    assert torch.equal(case.host(case.x).detach(), out_alone)
    case.loss().backward()  # type: ignore[no-untyped-call]
    with_group = [p.grad for p in case.host.parameters() if p.grad is not None]
    for before, after in zip(alone, with_group, strict=True):
        assert torch.equal(before, after)
    assert float(group.fan_in_weight.grad.norm()) > 0


@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_statistics_give_the_fan_out_gradient_in_the_linear_regime(kind: str, layer: str) -> None:
    # With an identity activation on the new units, dL/dV = M W^T exactly: this pins the layout of M
    # (patches, bridge, consumer kernel offsets) against autograd.
    case = make_case(kind)
    site = dataclasses.replace(case.widen_site(layer), activation="identity")
    weight, bias = random_fan_in(site, 2, generator=torch.Generator().manual_seed(3))
    group = UnitGroup(site, weight, bias)
    group.mode = GrowthMode.LIVE
    group.attach()
    statistics = _statistics(case, site, batches=1)  # the same backward gives the group its gradient
    matrix = statistics.matrix()  # [O * U, C]
    outputs = group.fan_out_weight.shape[0]
    predicted = (matrix @ weight.flatten(1).T).reshape(outputs, -1, 2).permute(0, 2, 1)
    assert group.fan_out_weight.grad is not None
    actual = group.fan_out_weight.grad.reshape(outputs, 2, -1)
    assert torch.allclose(actual, predicted, atol=1e-6, rtol=1e-5)


# The 1-D CNN host's first layer is left out: its ReLU regime on a random batch breaks the linear-regime
# optimum for some draws (seed 1: gradmax 0.0302 < random 0.0332; gradmax larger for 5 of seeds 1-7).
_GRADMAX_CASES = [case for case in WIDEN_CASES if case != ("sequence", "conv1")]


@pytest.mark.parametrize(
    ("kind", "layer"), _GRADMAX_CASES, ids=[f"{kind}-{layer}" for kind, layer in _GRADMAX_CASES]
)
def test_gradmax_fan_out_gets_a_larger_first_gradient_than_random_at_equal_norm(
    kind: str, layer: str
) -> None:
    norms = {}
    for init in ("gradmax", "random"):
        case = make_case(kind, seed=1, batch=64)
        group = _group(case, layer, init, k=2)
        row_norms = group.fan_in_weight.detach().flatten(1).norm(dim=1)
        assert torch.allclose(row_norms, torch.full_like(row_norms, float(row_norms[0])), rtol=1e-5)
        group.mode = GrowthMode.LIVE
        group.attach()
        case.loss().backward()  # type: ignore[no-untyped-call]
        assert group.fan_out_weight.grad is not None
        norms[init] = (float(group.fan_out_weight.grad.norm()), float(row_norms[0]))
    assert norms["gradmax"][1] == pytest.approx(norms["random"][1], rel=1e-5)
    assert norms["gradmax"][0] > norms["random"][0]


@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_merged_layers_compute_what_layer_and_group_computed(kind: str, layer: str) -> None:
    case = make_case(kind)
    group = _group(case, layer, "gradmax")
    group.mode = GrowthMode.LIVE
    group.attach()
    _train_group(case, group)
    site = group.site
    width = site.producer.weight.shape[0]
    with_group = case.host(case.x).detach()
    merges = group.merge()
    assert not group.attached and group.merged
    merged = case.host(case.x).detach()
    assert torch.allclose(merged, with_group, atol=1e-6, rtol=0.0)
    assert site.producer.weight.shape[0] == width + group.k
    assert {m.appended for m in merges} <= set(group.parameters())
    if site.slot is not None:
        assert site.slot.width == width + group.k
    # The wider host still trains end to end.
    case.loss().backward()  # type: ignore[no-untyped-call]
    assert site.producer.weight.grad is not None


@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_culled_group_leaves_the_layers_bit_for_bit_as_before(kind: str, layer: str) -> None:
    case = make_case(kind)
    site = case.widen_site(layer)
    before_out = case.host(case.x).detach()
    before = {
        name: (tensor, tensor.detach().clone())
        for part in (site.producer, site.consumer)
        for name, tensor in part.named_parameters(prefix=str(id(part)))
    }
    group = _group(case, layer, "gradmax")
    group.mode = GrowthMode.BLEND
    group.alpha = 1.0
    group.attach()
    _train_group(case, group)
    assert not torch.equal(case.host(case.x).detach(), before_out)  # the group did change the output
    group.detach()
    after = {
        name: tensor
        for part in (site.producer, site.consumer)
        for name, tensor in part.named_parameters(prefix=str(id(part)))
    }
    assert after.keys() == before.keys()
    for name, (original, snapshot) in before.items():
        assert after[name] is original
        assert torch.equal(after[name], snapshot)
    assert torch.equal(case.host(case.x).detach(), before_out)


def test_merge_is_refused_while_a_seed_sits_on_the_widened_activation() -> None:
    case = make_case("mlp")
    group = _group(case, "fc1", "random")
    site = group.site
    assert site.slot is not None
    site.slot.install(SeedModule(nn.Linear(6, 6), Blender(pb.BLEND_MODE_RESIDUAL, 6)))
    weight = site.producer.weight
    with pytest.raises(GrowthNotApplicable, match="holds a seed"):
        group.merge()
    assert site.producer.weight is weight and site.slot.width == 6 and not group.merged


def test_sites_reject_layers_that_cannot_be_widened_together() -> None:
    linear, conv = nn.Linear(4, 3), nn.Conv2d(3, 5, 3)
    with pytest.raises(GrowthNotApplicable, match="conv producer"):
        WidenSite("x", linear, conv)
    with pytest.raises(GrowthNotApplicable, match="grouped"):
        WidenSite("x", nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 3))
    with pytest.raises(GrowthNotApplicable, match="channels"):
        WidenSite("x", conv, nn.Conv2d(4, 2, 3))
    with pytest.raises(GrowthNotApplicable, match="k must be"):
        random_fan_in(WidenSite("x", linear, nn.Linear(3, 2)), 0)


def test_statistics_before_any_backward_are_an_error() -> None:
    case = make_case("mlp")
    statistics = FanInStatistics(case.widen_site("fc1"))
    with pytest.raises(GrowthNotApplicable, match="no backward"):
        gradmax_fan_in(statistics, 2)


def test_gradmax_fills_units_beyond_the_fan_in_with_random_directions() -> None:
    case = make_case("mlp")
    site = case.widen_site("fc2")  # fan-in 6
    weight, bias = gradmax_fan_in(_statistics(case, site), 8, row_norm=2.0)
    assert weight.shape == (8, 6) and bias.shape == (8,)
    assert torch.allclose(weight.norm(dim=1), torch.full((8,), 2.0), atol=1e-5)


@pytest.mark.parametrize(("kind", "layer"), WIDEN_CASES, ids=CASE_IDS)
def test_new_parameters_take_the_hosts_dtype(kind: str, layer: str) -> None:
    # Stands in for a device check on machines without an accelerator: nothing is created at a default.
    case = make_case(kind)
    case.host.double()
    if case.x.is_floating_point():  # token ids stay integers
        case.x = case.x.double()
    group = _group(case, layer, "gradmax")
    block = IdentityBlock.for_site(case.deepen_site(layer))
    assert {p.dtype for p in (*group.parameters(), *block.parameters())} == {torch.float64}
    group.mode = GrowthMode.LIVE
    group.attach()
    _train_group(case, group, steps=1)
    group.merge()
    assert {p.dtype for p in case.host.parameters()} == {torch.float64}
