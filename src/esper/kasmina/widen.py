"""Widen a host layer by k units or channels, together with the fan-in of the layer after it.

The k new units live in a `UnitGroup`, apart from the host until they are kept:

- fan-in: k new rows (Linear) or filters (conv) of the producer, with their biases;
- fan-out: the consumer's new input columns (or input channels) for those units, starting at zero.

Attached to a `WidenSite`, the group computes the new units from the producer's input, passes them
through the host's activation and bridge, and adds their fan-out to the consumer's pre-activation. At
insertion the fan-out is zero, so the host's function is unchanged; its gradient is not zero, so the new
units learn. `merge` concatenates the group into the producer and consumer (the wider layers compute
what layer + group computed); `detach` without merging (a cull) leaves both layers as they were, since
they were never touched.

Fan-in initialisation, in closed form (`gradmax_fan_in`): with the fan-out V at zero, the gradient of the
loss with respect to V is E[delta a^T], where delta is the gradient at the consumer's pre-activation and
a the new units' activations. Around the activation's linear regime a = W x (x the producer's input, as
patches for a convolution), so the gradient is M W^T with M = E[delta x^T] (for a convolution consumer,
one block of M per kernel offset, stacked). Under a norm bound on W, its Frobenius norm is largest when
the rows of W are the top right singular vectors of M: the new fan-out then receives the largest first
gradient the bound allows. `FanInStatistics` gathers M from ordinary training steps. `random_fan_in`
is the control: random directions at the same row norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from esper.kasmina.growth import (
    ACTIVATIONS,
    GrowthMode,
    GrowthNotApplicable,
    ParameterMerge,
    WidenSite,
    combine,
    functional_layer,
    in_units,
    out_units,
    record_gain,
)


def _unfold(t: Tensor, conv: nn.Conv1d | nn.Conv2d) -> Tensor:
    """Patches of `t` ([N, C, *spatial]) as `conv` reads them: [N, C * kernel cells, positions]."""
    padding: Any = conv.padding  # ints: sites refuse string padding
    if isinstance(conv, nn.Conv2d):
        return nn.functional.unfold(
            t, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        )
    # Conv1d: a 2-D unfold over a height of one.
    return nn.functional.unfold(
        t.unsqueeze(2),
        (1, conv.kernel_size[0]),
        dilation=(1, conv.dilation[0]),
        padding=(0, padding[0]),
        stride=(1, conv.stride[0]),
    )


def producer_patches(site: WidenSite, x: Tensor, output_spatial: tuple[int, ...]) -> Tensor:
    """What each producer unit sees: `[N, C]` for Linear, `[N, C, *output_spatial]` for a convolution.

    C is the producer's fan-in per unit (in_features, or in_channels x kernel cells), in the order of
    the producer's flattened weight rows. A Linear producer applied to every token of `[N, T, C]` sees
    N x T samples: they come back as `[N * T, C]`.
    """
    producer = site.producer
    if isinstance(producer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = _unfold(x, producer)
    return patches.reshape(patches.shape[0], patches.shape[1], *output_spatial)


def _consumer_patches(site: WidenSite, patches: Tensor) -> Tensor:
    """Producer patches carried through bridge and consumer geometry: `[N, C, U, positions]`.

    U is what the consumer has per unit: pooled cells for a Linear consumer, kernel offsets for a conv.
    """
    consumer = site.consumer
    channels = patches.shape[1]
    if isinstance(consumer, nn.Linear):
        if site.bridge.pooled_side is None:
            return patches[:, :, None, None]
        pooled = site.bridge.apply(patches)
        return pooled.reshape(pooled.shape[0], channels, -1, 1)
    unfolded = _unfold(patches, consumer)
    return unfolded.reshape(unfolded.shape[0], channels, -1, unfolded.shape[-1])


class FanInStatistics:
    """Gathers M = sum over batches of delta x^T at a site, from ordinary forward/backward passes.

    Use as a context manager around training steps (`with stats: ...`); each backward through the
    consumer adds one batch. `matrix()` is M as `[consumer outputs x U, producer fan-in]`; `mean_patch()`
    is the mean input patch, used to orient the new units so that they start active.
    """

    def __init__(self, site: WidenSite) -> None:
        self.site = site
        self.batches = 0
        self._sum: Tensor | None = None
        self._patch_sum: Tensor | None = None
        self._patch_count = 0
        self._pending: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> FanInStatistics:
        if self._handles:
            raise GrowthNotApplicable("statistics", "already gathering")
        self._handles = [
            self.site.producer.register_forward_hook(self._on_producer),
            self.site.consumer.register_forward_hook(self._on_consumer),
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    def _on_producer(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        with torch.no_grad():
            self._pending = producer_patches(self.site, inputs[0].detach(), tuple(output.shape[2:]))

    def _on_consumer(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        patches, self._pending = self._pending, None
        if patches is None or not output.requires_grad:
            return
        output.register_hook(lambda delta: self._accumulate(patches, delta))  # type: ignore[no-untyped-call]

    def _accumulate(self, patches: Tensor, delta: Tensor) -> None:
        with torch.no_grad():
            if isinstance(self.site.consumer, nn.Linear):
                delta = delta.reshape(-1, delta.shape[-1])  # every token is a sample, as in the patches
            carried = _consumer_patches(self.site, patches)
            flat_delta = delta.reshape(delta.shape[0], delta.shape[1], -1)
            batch = torch.einsum("nol,ncul->ouc", flat_delta.to(carried.dtype), carried)
            batch = batch.reshape(-1, carried.shape[1])
            self._sum = batch if self._sum is None else self._sum + batch
            per_patch = patches.reshape(patches.shape[0], patches.shape[1], -1)
            patch_sum = per_patch.sum(dim=(0, 2))
            self._patch_sum = patch_sum if self._patch_sum is None else self._patch_sum + patch_sum
            self._patch_count += per_patch.shape[0] * per_patch.shape[2]
            self.batches += 1

    def export_state(self) -> dict[str, Any]:
        """JSON-ready sums gathered so far (a checkpoint taken while gathering resumes exactly)."""
        return {
            "batches": self.batches,
            "sum": None if self._sum is None else self._sum.tolist(),
            "patch_sum": None if self._patch_sum is None else self._patch_sum.tolist(),
            "patch_count": self._patch_count,
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Inverse of `export_state`, on the device and dtype of the site's producer."""
        like = self.site.producer.weight
        self.batches = int(state["batches"])
        self._patch_count = int(state["patch_count"])
        self._sum = (
            None if state["sum"] is None else torch.tensor(state["sum"], dtype=like.dtype, device=like.device)
        )
        self._patch_sum = (
            None
            if state["patch_sum"] is None
            else torch.tensor(state["patch_sum"], dtype=like.dtype, device=like.device)
        )

    def matrix(self) -> Tensor:
        """M, summed over the batches seen (its scale does not matter to the initialisation)."""
        if self._sum is None:
            raise GrowthNotApplicable("statistics", "no backward pass went through the site yet")
        return self._sum

    def mean_patch(self) -> Tensor:
        """The mean producer input patch over every position and sample seen."""
        if self._patch_sum is None:
            raise GrowthNotApplicable("statistics", "no backward pass went through the site yet")
        return self._patch_sum / self._patch_count


def default_row_norm(site: WidenSite) -> Tensor:
    """The mean norm of the producer's existing fan-in rows: new units start at the scale of the old.

    A 0-d tensor on the producer's device: read on the host nowhere (no device sync while growing)."""
    norm: Tensor = site.producer.weight.detach().flatten(1).norm(dim=1).mean()
    return norm


def _fan_in_shape(site: WidenSite, k: int) -> tuple[int, ...]:
    return (k, *site.producer.weight.shape[1:])


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GrowthNotApplicable("widen", f"k must be an int >= 1, got {k!r}")


def random_fan_in(
    site: WidenSite,
    k: int,
    *,
    row_norm: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of k new units: uniformly random directions at `row_norm`, zero bias (the control).

    Kaiming-like in distribution (Gaussian rows), rescaled to the same row norm as `gradmax_fan_in` so
    that the two differ only in direction.
    """
    _check_k(k)
    reference = site.producer.weight
    norm = default_row_norm(site) if row_norm is None else row_norm
    # Drawn on the CPU (by `generator` or the CPU stream, which checkpoints keep), so that a run draws
    # the same units on every device and a resumed run the same as an uninterrupted one; then moved.
    rows = torch.randn(_fan_in_shape(site, k), generator=generator, device="cpu", dtype=reference.dtype).to(
        reference.device
    )
    flat = rows.flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny) * norm
    bias = torch.zeros(k, device=reference.device, dtype=reference.dtype)
    return flat.reshape(rows.shape), bias


def gradmax_fan_in(
    statistics: FanInStatistics,
    k: int,
    *,
    row_norm: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of k new units whose zero fan-out gets the largest first gradient (see module doc).

    Rows are the top-k right singular vectors of M, each at `row_norm`, oriented so that the mean input
    patch excites them (a ReLU unit then starts active). When k exceeds M's fan-in, the remaining rows
    are random directions. Bias is zero.
    """
    _check_k(k)
    site = statistics.site
    reference = site.producer.weight
    norm = default_row_norm(site) if row_norm is None else row_norm
    matrix = statistics.matrix().float()
    fan_in = matrix.shape[1]
    _, _, vh = torch.linalg.svd(matrix, full_matrices=True)
    chosen = vh[: min(k, fan_in)]
    orientation = torch.sign(chosen @ statistics.mean_patch().float().to(chosen.device))
    chosen = chosen * torch.where(orientation == 0, torch.ones_like(orientation), orientation)[:, None]
    rows = chosen.to(device=reference.device, dtype=reference.dtype) * norm
    if k > fan_in:
        extra, _ = random_fan_in(site, k - fan_in, row_norm=norm, generator=generator)
        rows = torch.cat([rows, extra.flatten(1)], dim=0)
    bias = torch.zeros(k, device=reference.device, dtype=reference.dtype)
    return rows.reshape(_fan_in_shape(site, k)), bias


class UnitGroup(nn.Module):
    """k new units of a site's producer, with their fan-out into the consumer, apart from the host.

    Parameters: `fan_in_weight` (`[k, *producer.weight.shape[1:]]`), `fan_in_bias` (`[k]`, or absent when
    the producer has no bias) and `fan_out_weight` (the consumer's new columns: `[O, k * cells]` for a
    Linear consumer, `[O, k, *kernel]` for a conv), which starts at zero.
    """

    def __init__(self, site: WidenSite, fan_in_weight: Tensor, fan_in_bias: Tensor | None = None) -> None:
        super().__init__()
        producer, consumer = site.producer, site.consumer
        if fan_in_weight.dim() < 2 or tuple(fan_in_weight.shape[1:]) != tuple(producer.weight.shape[1:]):
            raise GrowthNotApplicable(
                "widen",
                f"fan-in of shape {tuple(fan_in_weight.shape)} does not fit producer weight "
                f"{tuple(producer.weight.shape)}",
            )
        k = fan_in_weight.shape[0]
        if (fan_in_bias is None) != (producer.bias is None):
            raise GrowthNotApplicable("widen", "fan-in bias must be given exactly when the producer has one")
        if fan_in_bias is not None and tuple(fan_in_bias.shape) != (k,):
            raise GrowthNotApplicable(
                "widen", f"fan-in bias of shape {tuple(fan_in_bias.shape)}, need ({k},)"
            )
        self.site = site
        self.k = k
        source, like = producer.weight, consumer.weight
        self.fan_in_weight = nn.Parameter(fan_in_weight.detach().to(source.device, source.dtype).clone())
        self.fan_in_bias = (
            None
            if fan_in_bias is None
            else nn.Parameter(fan_in_bias.detach().to(source.device, source.dtype).clone())
        )
        if isinstance(consumer, nn.Linear):
            fan_out_shape: tuple[int, ...] = (consumer.out_features, k * site.cells)
        else:
            fan_out_shape = (consumer.out_channels, k, *consumer.kernel_size)
        self.fan_out_weight = nn.Parameter(torch.zeros(fan_out_shape, device=like.device, dtype=like.dtype))
        self.mode = GrowthMode.INCUBATE
        self.alpha = 0.0
        self.merged = False
        # While INCUBATE: the first-order loss reduction the contribution would bring, per backward.
        self.training_gains: list[float] = []
        self._pending: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def extra_repr(self) -> str:
        return f"layer_id={self.site.layer_id!r}, k={self.k}, mode={self.mode.name}"

    @property
    def attached(self) -> bool:
        """True while the group's contribution reaches the host's forward."""
        return bool(self._handles)

    def parameter_count(self) -> int:
        """Scalar parameters the group adds to the host."""
        return sum(p.numel() for p in self.parameters())

    # -- forward --------------------------------------------------------------------------------------------

    def units(self, x: Tensor) -> Tensor:
        """The new units' activations for the producer's input `x`, after the host's activation."""
        pre = functional_layer(self.site.producer, x, self.fan_in_weight, self.fan_in_bias)
        return ACTIVATIONS[self.site.activation](pre)

    def contribution(self, x: Tensor) -> Tensor:
        """What the new units add to the consumer's pre-activation, for the producer's input `x`."""
        bridged = self.site.bridge.apply(self.units(x))
        return functional_layer(self.site.consumer, bridged, self.fan_out_weight, None)

    def attach(self) -> None:
        """Hook the group into the host's forward (the function is unchanged while the fan-out is zero)."""
        if self.merged:
            raise GrowthNotApplicable("widen", "this unit group was merged into the host")
        if self._handles:
            raise GrowthNotApplicable("widen", "this unit group is already attached")
        self._handles = [
            self.site.producer.register_forward_pre_hook(self._on_producer),
            self.site.consumer.register_forward_hook(self._on_consumer),
        ]

    def detach(self) -> None:
        """Unhook the group; the host computes exactly what it computed before `attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None

    def _on_producer(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._pending = inputs[0]

    def _on_consumer(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x, self._pending = self._pending, None
        if x is None:
            raise GrowthNotApplicable(
                "widen", f"consumer of {self.site.layer_id!r} ran without its producer running first"
            )
        if self.mode == GrowthMode.BLEND and self.alpha == 0.0:
            return output
        source = x if self.mode == GrowthMode.LIVE else x.detach()
        contribution = self.contribution(source)
        result = combine(output, contribution, self.mode, self.alpha)
        if self.mode == GrowthMode.INCUBATE and result.requires_grad:
            record_gain(result, contribution, self.training_gains)
        return result

    # -- keep ----------------------------------------------------------------------------------------------

    def merge(self) -> tuple[ParameterMerge, ...]:
        """Concatenate the group into producer and consumer; returns each replaced parameter.

        The slot on the widened activation, if any, must be empty (a seed there was built at the old
        width); its width grows by k. The group is spent afterwards.
        """
        site = self.site
        if self.merged:
            raise GrowthNotApplicable("widen", "this unit group was merged already")
        if site.slot is not None and site.slot.seed is not None:
            raise GrowthNotApplicable(
                "widen",
                f"slot {site.slot.slot_id!r} on the widened activation holds a seed; it must be dormant",
            )
        if site.slot is not None and len(site.slot.stacked) > 0:
            raise GrowthNotApplicable(
                "widen",
                f"slot {site.slot.slot_id!r} holds stacked fossils built at the layer's width",
            )
        self.detach()
        producer, consumer = site.producer, site.consumer
        merges = [_concatenate(producer, "weight", self.fan_in_weight, 0)]
        if self.fan_in_bias is not None:
            merges.append(_concatenate(producer, "bias", self.fan_in_bias, 0))
        merges.append(_concatenate(consumer, "weight", self.fan_out_weight, 1))
        if isinstance(producer, nn.Linear):
            producer.out_features += self.k
        else:
            producer.out_channels += self.k
        if isinstance(consumer, nn.Linear):
            consumer.in_features += self.k * site.cells
        else:
            consumer.in_channels += self.k
        if site.slot is not None:
            site.slot.width += self.k
        assert out_units(producer) == in_units(consumer) // site.cells
        self.merged = True
        return tuple(merges)


def set_width(site: WidenSite, units: int) -> None:
    """Give the site's producer `units` outputs (and its consumer the matching inputs), values zero.

    For a restore: the caller loads the saved values next. Parameters are replaced, not resized.
    """
    _check_k(units)
    producer, consumer = site.producer, site.consumer
    with torch.no_grad():
        weight = producer.weight
        producer.weight = nn.Parameter(weight.new_zeros((units, *weight.shape[1:])), weight.requires_grad)
        if producer.bias is not None:
            producer.bias = nn.Parameter(producer.bias.new_zeros(units), producer.bias.requires_grad)
        columns = units * site.cells if isinstance(consumer, nn.Linear) else units
        like = consumer.weight
        consumer.weight = nn.Parameter(
            like.new_zeros((like.shape[0], columns, *like.shape[2:])), like.requires_grad
        )
    if isinstance(producer, nn.Linear):
        producer.out_features = units
    else:
        producer.out_channels = units
    if isinstance(consumer, nn.Linear):
        consumer.in_features = columns
    else:
        consumer.in_channels = units
    if site.slot is not None:
        site.slot.width = units


def _concatenate(layer: nn.Module, name: str, appended: nn.Parameter, dim: int) -> ParameterMerge:
    old = getattr(layer, name)
    assert isinstance(old, nn.Parameter)
    merged = nn.Parameter(
        torch.cat([old.detach(), appended.detach()], dim=dim), requires_grad=old.requires_grad
    )
    setattr(layer, name, merged)
    return ParameterMerge(old=old, appended=appended, merged=merged, dim=dim)
