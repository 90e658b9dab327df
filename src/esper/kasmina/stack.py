"""Stack seeds: fold a fossilised seed whose body is linear into the host, so its slot can be reused.

A slot sits on an activation `x` after the host's nonlinearity; a fossilised seed there outputs
`x + g * (A x + a)` at every position, where `A x + a` is its body and `g` the blender's gate. When the
body is linear (the `lowrank` blueprint, or a plain Linear), that is an affine map of `x`, and the layer
that consumes the slot's output absorbs it: for a consumer `V y + c`,

    V (x + G A x + G a) + c  =  (V (I + G A)) x + (c + V G a).

Through an average pool and flatten the same holds per cell (a pool is linear and keeps constants).
Through a convolution the weight part holds at every kernel offset, but the constant `G a` is not added
where the convolution reads zero padding, so a non-zero `a` folds exactly only into an unpadded
convolution. The fold changes the consumer's weight and bias in place (same parameters, so the
optimizer keeps their moments) and empties the slot; the seed's own parameters leave the host.

Blueprints that cannot be folded, and why: `mlp_small`, `mlp_expand`, `mlp_bottleneck` (GELU between
their layers), `attention_lite` (softmax attention), `conv_residual`, `conv_depthwise`, `conv_bottleneck`
(ReLU between their layers) and `conv_se` (a sigmoid gate multiplies the input): each is nonlinear in
`x`, so no weight of a single following layer reproduces it. The CONFIDENCE blend mode scales each sample
by a gate computed from the seed's output, which is nonlinear too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from esper.kasmina.growth import GrowthNotApplicable, WidenSite
from esper.kasmina.slot import SeedModule, SlotMode
from esper.leyline import pb
from esper.urza.modules import LowRankConv, LowRankLinear

FOLDABLE_BLEND_MODES = frozenset({pb.BLEND_MODE_RESIDUAL, pb.BLEND_MODE_CONVEX, pb.BLEND_MODE_CHANNEL})


def affine_residual(seed: SeedModule) -> tuple[Tensor, Tensor]:
    """(A, a) with the fossilised seed's output equal to `x + A x + a` at each position, gate included.

    Raises `GrowthNotApplicable` when the body or the blend mode is not linear in `x`.
    """
    body = seed.body
    matrix: Tensor
    offset: Tensor | None
    with torch.no_grad():
        if isinstance(body, LowRankLinear):
            matrix = body.up.weight @ body.down.weight
            offset = body.up.bias
        elif isinstance(body, LowRankConv):
            matrix = body.up.weight.flatten(1) @ body.down.weight.flatten(1)
            offset = body.up.bias
        elif isinstance(body, nn.Linear) and body.in_features == body.out_features:
            matrix = body.weight
            offset = body.bias
        else:
            raise GrowthNotApplicable(
                "stack", f"seed body {type(body).__name__} is not linear in its input; it cannot be folded"
            )
        if offset is None:
            offset = torch.zeros(matrix.shape[0], device=matrix.device, dtype=matrix.dtype)
        blender = seed.blender
        if blender.mode not in FOLDABLE_BLEND_MODES:
            raise GrowthNotApplicable(
                "stack", f"blend mode {blender.mode} is not linear in the seed's output"
            )
        if blender.mode == pb.BLEND_MODE_CHANNEL:
            assert blender.channel_logits is not None
            gate = torch.sigmoid(blender.channel_logits)
            matrix = gate[:, None] * matrix
            offset = gate * offset
        return matrix.detach().clone(), offset.detach().clone()


def fold_fossil(site: WidenSite) -> SeedModule:
    """Fold the fossilised seed in `site.slot` into `site.consumer`; returns the seed, now out of the host.

    Checks everything first: on any `GrowthNotApplicable` the host and the slot are unchanged.
    """
    slot = site.slot
    if slot is None or slot.seed is None:
        raise GrowthNotApplicable("stack", f"no seed on the activation of {site.layer_id!r}")
    if slot.mode != SlotMode.FOSSIL:
        raise GrowthNotApplicable(
            "stack", f"seed in slot {slot.slot_id!r} is not fossilised (mode {slot.mode.name})"
        )
    consumer = site.consumer
    weight = consumer.weight
    matrix, offset = affine_residual(slot.seed)
    matrix = matrix.to(weight.device, weight.dtype)
    offset = offset.to(weight.device, weight.dtype)
    width = matrix.shape[0]
    mixing = torch.eye(width, device=weight.device, dtype=weight.dtype) + matrix
    with torch.no_grad():
        if isinstance(consumer, nn.Linear):
            per_unit = weight.reshape(weight.shape[0], width, -1)  # [O, C, cells]
            new_weight = torch.einsum("ocu,cd->odu", per_unit, mixing).reshape(weight.shape)
            shift = torch.einsum("ocu,c->o", per_unit, offset)
        else:
            if any(p != 0 for p in consumer.padding) and bool(offset.ne(0).any()):
                raise GrowthNotApplicable(
                    "stack",
                    f"the seed in {slot.slot_id!r} adds a constant and the consumer of {site.layer_id!r} "
                    "pads with zeros, so the constant is lost at the border",
                )
            per_unit = weight.flatten(2)  # [O, C, kernel cells]
            new_weight = torch.einsum("ocu,cd->odu", per_unit, mixing).reshape(weight.shape)
            shift = torch.einsum("ocu,c->o", per_unit, offset)
        if consumer.bias is None and bool(shift.ne(0).any()):
            raise GrowthNotApplicable("stack", "the consumer has no bias to take the seed's constant")
        weight.copy_(new_weight)
        if consumer.bias is not None:
            consumer.bias.add_(shift)
    seed = slot.remove()
    assert seed is not None
    return seed
