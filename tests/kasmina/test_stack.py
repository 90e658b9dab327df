"""Stack: a fossilised linear seed folds into the host exactly, and its slot is free again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.kasmina import Blender, GrowthNotApplicable, SeedModule, SlotMode, WidenSite, fold_fossil
from esper.leyline import pb
from esper.urza.modules import LowRankConv, LowRankLinear, SmallMLP
from tests.kasmina.growth_support import make_case

torch.set_num_threads(1)


def _plant(site: WidenSite, body: nn.Module, mode: int = pb.BLEND_MODE_RESIDUAL) -> SeedModule:
    assert site.slot is not None
    seed = SeedModule(body, Blender(mode, site.slot.width))
    if seed.blender.channel_logits is not None:
        nn.init.normal_(seed.blender.channel_logits)
    site.slot.install(seed)
    site.slot.mode = SlotMode.FOSSIL
    return seed


@pytest.mark.parametrize("mode", [pb.BLEND_MODE_RESIDUAL, pb.BLEND_MODE_CONVEX, pb.BLEND_MODE_CHANNEL])
@pytest.mark.parametrize(("kind", "layer"), [("mlp", "fc1"), ("mlp", "fc2"), ("cnn", "conv2")])
def test_folded_lowrank_seed_computes_what_the_fossil_computed(kind: str, layer: str, mode: int) -> None:
    case = make_case(kind)
    site = case.widen_site(layer)
    assert site.slot is not None
    width = site.slot.width
    body = LowRankLinear(width, 2) if kind == "mlp" else LowRankConv(width, 2)
    _plant(site, body, mode)
    with_fossil = case.host(case.x).detach()
    weight = site.consumer.weight
    seed = fold_fossil(site)
    assert seed.body is body
    assert site.slot.is_clean() and site.slot.mode == SlotMode.IDENTITY
    assert site.consumer.weight is weight  # folded in place: the optimizer keeps its moments
    assert torch.allclose(case.host(case.x).detach(), with_fossil, atol=1e-6, rtol=0.0)


def test_lowrank_conv_seed_without_bias_folds_into_a_padded_convolution() -> None:
    case = make_case("cnn")
    site = case.widen_site("conv1")
    body = LowRankConv(site.producer.out_channels, 2)
    assert body.up.bias is not None
    nn.init.zeros_(body.up.bias)
    _plant(site, body)
    with_fossil = case.host(case.x).detach()
    fold_fossil(site)
    assert torch.allclose(case.host(case.x).detach(), with_fossil, atol=1e-6, rtol=0.0)


def test_constant_of_a_seed_before_a_padded_convolution_is_refused_and_nothing_changes() -> None:
    case = make_case("cnn")
    site = case.widen_site("conv1")
    seed = _plant(site, LowRankConv(site.producer.out_channels, 2))
    weight = site.consumer.weight.detach().clone()
    with pytest.raises(GrowthNotApplicable, match="pads with zeros"):
        fold_fossil(site)
    assert site.slot is not None and site.slot.seed is seed
    assert torch.equal(site.consumer.weight, weight)


def test_nonlinear_seeds_and_confidence_blending_are_not_folded() -> None:
    case = make_case("mlp")
    site = case.widen_site("fc1")
    _plant(site, SmallMLP(6, 4))
    with pytest.raises(GrowthNotApplicable, match="not linear"):
        fold_fossil(site)
    other = case.widen_site("fc2")
    _plant(other, LowRankLinear(6, 2), pb.BLEND_MODE_CONFIDENCE)
    with pytest.raises(GrowthNotApplicable, match="blend mode"):
        fold_fossil(other)


def test_only_fossilised_seeds_are_folded() -> None:
    case = make_case("mlp")
    site = case.widen_site("fc1")
    _plant(site, LowRankLinear(6, 2))
    assert site.slot is not None
    site.slot.mode = SlotMode.BLEND
    with pytest.raises(GrowthNotApplicable, match="not fossilised"):
        fold_fossil(site)
