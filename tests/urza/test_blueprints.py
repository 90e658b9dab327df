"""Every built-in blueprint builds, keeps the slot's shape, gives finite output and learns."""

from __future__ import annotations

import pytest
import torch

from esper.urza import (
    BUILTIN_FACTORIES,
    BUILTIN_SPECS,
    BlueprintNotApplicable,
    UnknownBlueprint,
    count_parameters,
    param_count,
)
from esper.urza.blueprints import build_blueprint

torch.set_num_threads(1)

CASES = [
    (spec.blueprint_id, kind, width)
    for spec in BUILTIN_SPECS
    for kind in spec.descriptor.host_kinds
    for width in (8, 16, 32, 64)
]


def _input(kind: str, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return torch.randn(5, width, generator=generator)
    if kind == "conv1d":
        return torch.randn(3, width, 10, generator=generator)
    return torch.randn(3, width, 6, 6, generator=generator)


def test_at_least_six_blueprints_cover_both_host_kinds() -> None:
    kinds = [set(spec.descriptor.host_kinds) for spec in BUILTIN_SPECS]
    assert len(BUILTIN_SPECS) >= 6
    assert sum("mlp" in k for k in kinds) >= 3
    assert sum("conv" in k for k in kinds) >= 3


def test_one_dimensional_slots_are_offered_their_own_blueprints() -> None:
    # Slots of the 1-D CNN and the Transformer are "conv1d": [N, width, L].
    offered = [spec.blueprint_id for spec in BUILTIN_SPECS if "conv1d" in spec.descriptor.host_kinds]
    assert len(offered) >= 4
    for blueprint_id in offered:
        assert param_count(blueprint_id, 8, "conv1d") > 0
    assert param_count("conv1d_residual", 8, "conv1d") == 2 * (8 * 8 * 3 + 8)


@pytest.mark.parametrize(("blueprint_id", "kind", "width"), CASES)
def test_blueprint_preserves_shape_with_finite_output_and_nonzero_gradients(
    blueprint_id: str, kind: str, width: int
) -> None:
    torch.manual_seed(0)
    spec = BUILTIN_FACTORIES.get(blueprint_id)
    module = build_blueprint(spec, spec.descriptor, width, kind, {})
    x = _input(kind, width)
    out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0, "a seed whose output is all zero gets no gradient from a residual target"
    # A residual target: the seed learns to produce some delta; every parameter must receive gradient.
    target = torch.randn_like(out)
    torch.nn.functional.mse_loss(out, target).backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, f"{blueprint_id}.{name} got a zero gradient"


@pytest.mark.parametrize(("blueprint_id", "kind", "width"), CASES)
def test_param_count_counts_the_built_module(blueprint_id: str, kind: str, width: int) -> None:
    spec = BUILTIN_FACTORIES.get(blueprint_id)
    module = build_blueprint(spec, spec.descriptor, width, kind, {})
    assert param_count(blueprint_id, width, kind) == count_parameters(module) > 0


@pytest.mark.parametrize(("blueprint_id", "kind", "width"), CASES)
def test_counting_draws_nothing_from_the_global_random_generator(
    blueprint_id: str, kind: str, width: int
) -> None:
    # Tamiyo counts a blueprint's cost while the run trains beside it: a count must not move the random
    # stream the training draws from.
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    param_count(blueprint_id, width, kind)
    assert torch.equal(torch.rand(4), expected)


def test_param_count_matches_hand_counts() -> None:
    # Linear(32, 32) + Linear(32, 32) with biases.
    assert param_count("mlp_small", 32, "mlp") == 2 * (32 * 32 + 32)
    # Down 32x4 without bias, up 4x32 with bias.
    assert param_count("lowrank", 32, "mlp") == 32 * 4 + 4 * 32 + 32
    assert param_count("lowrank", 32, "mlp", rank=8) == 32 * 8 + 8 * 32 + 32
    # Two 3x3 convs 16 -> 16 with biases.
    assert param_count("conv_residual", 16, "conv") == 2 * (16 * 16 * 9 + 16)
    # Up 12 -> 48 and back 48 -> 12, with biases: 48 new hidden units behind a 12-wide layer.
    assert param_count("mlp_expand", 12, "mlp") == (12 * 48 + 48) + (48 * 12 + 12)
    assert param_count("mlp_expand", 12, "mlp", expansion=2) == (12 * 24 + 24) + (24 * 12 + 12)


def test_wider_slots_cost_more_parameters() -> None:
    for spec in BUILTIN_SPECS:
        kind = spec.descriptor.host_kinds[0]
        assert param_count(spec.blueprint_id, 64, kind) > param_count(spec.blueprint_id, 16, kind)


def test_unknown_blueprint_has_no_factory() -> None:
    with pytest.raises(UnknownBlueprint, match="no-such"):
        param_count("no-such", 32, "mlp")


@pytest.mark.parametrize(
    ("blueprint_id", "width", "kind", "params", "match"),
    [
        ("mlp_small", 32, "conv", {}, "host kind 'conv' is not supported"),
        ("conv_se", 32, "mlp", {}, "host kind 'mlp' is not supported"),
        ("mlp_small", 32, "transformer", {}, "not one of"),
        ("mlp_small", 0, "mlp", {}, "width"),
        ("mlp_small", 32, "mlp", {"hidden_ratio": 10.0}, r"outside \[0.25, 4\]"),
        ("mlp_small", 32, "mlp", {"depth": 2.0}, "unknown parameter"),
        ("mlp_small", 32, "mlp", {"hidden_ratio": float("nan")}, "not finite"),
        ("lowrank", 32, "mlp", {"rank": 2.5}, "must be an integer"),
        ("mlp_expand", 12, "mlp", {"expansion": 1.0}, r"outside \[2, 16\]"),
        ("mlp_expand", 12, "conv", {}, "host kind 'conv' is not supported"),
        ("lowrank", 8, "mlp", {"rank": 16}, "exceeds the width"),
        ("attention_lite", 30, "mlp", {}, "not divisible"),
        ("conv_depthwise", 16, "conv", {"kernel_size": 4}, "must be odd"),
    ],
)
def test_inapplicable_builds_are_typed_errors(
    blueprint_id: str, width: int, kind: str, params: dict[str, float], match: str
) -> None:
    with pytest.raises(BlueprintNotApplicable, match=match) as info:
        param_count(blueprint_id, width, kind, **params)
    assert info.value.blueprint_id == blueprint_id


def test_parameters_change_the_module() -> None:
    assert param_count("mlp_small", 32, "mlp", hidden_ratio=2.0) > param_count("mlp_small", 32, "mlp")
    assert param_count("conv_depthwise", 16, "conv", kernel_size=5) > param_count(
        "conv_depthwise", 16, "conv"
    )
