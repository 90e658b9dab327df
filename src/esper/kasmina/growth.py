"""What the three growth operations (widen, deepen, stack) share: sites, modes, merges and errors.

A *site* says where an operation acts in a host, in terms of the host's own modules: which layer
produces the activation (`producer`), which layer consumes it (`consumer`), what the host does between
them (an elementwise activation, then a `Bridge`: the identity, or an average pool and a flatten before a
linear head), and which slot, if any, sits on that activation. Hosts build their sites; the operations
never guess a host's structure.

New parameters start as a separate, removable module. While they are not part of the host, a
`GrowthMode` says how their contribution reaches the host: not at all in value but with a gradient
(INCUBATE, the isolation seeds get while TRAINING), scaled by alpha (BLEND), or in full (LIVE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor, nn

from esper.kasmina.slot import SeedSlot
from esper.leyline import EsperError

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}

GrowableLayer = nn.Linear | nn.Conv1d | nn.Conv2d


class GrowthNotApplicable(EsperError):
    """A growth operation cannot act here (layer kind, geometry or state); nothing was changed."""

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation}: {reason}")


class GrowthMode(IntEnum):
    """How grown parameters that are not yet part of the host reach its activation."""

    INCUBATE = 0  # host value unchanged; the new parameters get the gradient, the host none from them
    BLEND = 1  # alpha x contribution, from a detached input
    LIVE = 2  # the full contribution, input attached: what the host computes once merged


def combine(host: Tensor, contribution: Tensor, mode: GrowthMode, alpha: float) -> Tensor:
    """The host's tensor with a contribution added as `mode` says (identity in value while INCUBATE)."""
    if mode == GrowthMode.INCUBATE:
        # Zero in value (x - x is exactly 0 for finite x), yet the gradient reaches the contribution.
        return host + (contribution - contribution.detach())
    if mode == GrowthMode.BLEND:
        return host + alpha * contribution
    return host + contribution


def record_gain(result: Tensor, contribution: Tensor, gains: list[float]) -> None:
    """On backward through `result`, append -<gradient, contribution>: the first-order loss reduction
    the contribution would bring if it were added in full (the signal G1 reads while INCUBATE)."""
    value = contribution.detach()

    def hook(grad: Tensor) -> None:
        gains.append(float(-(grad * value).sum()))

    result.register_hook(hook)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Bridge:
    """What the host does to an activation between the activation function and the consumer.

    `pooled_side` None: nothing (the consumer takes the activation as it is). An int: an adaptive
    average pool to `pooled_side` cells per spatial dimension, then a flatten, channel-major, before a
    linear consumer. Both are linear and act on each channel alone, which is what lets new channels be
    handled apart from the old ones and concatenated after them.
    """

    pooled_side: int | None = None

    def __post_init__(self) -> None:
        if self.pooled_side is not None and self.pooled_side < 1:
            raise GrowthNotApplicable("bridge", f"pooled_side must be >= 1, got {self.pooled_side}")

    def apply(self, activation: Tensor) -> Tensor:
        """The bridge applied to `[N, C, *spatial]` (or `[N, C]` for the identity)."""
        if self.pooled_side is None:
            return activation
        if activation.dim() == 3:
            pooled = nn.functional.adaptive_avg_pool1d(activation, self.pooled_side)
        elif activation.dim() == 4:
            pooled = nn.functional.adaptive_avg_pool2d(activation, self.pooled_side)
        else:
            raise GrowthNotApplicable(
                "bridge", f"cannot pool an activation of shape {tuple(activation.shape)}"
            )
        return pooled.flatten(1)

    def cells(self, spatial_dims: int) -> int:
        """Consumer features per channel (1 for the identity bridge)."""
        if self.pooled_side is None:
            return 1
        return int(self.pooled_side**spatial_dims)


def spatial_dims(layer: nn.Module) -> int:
    """0 for Linear, 1 for Conv1d, 2 for Conv2d; any other module cannot grow."""
    if isinstance(layer, nn.Linear):
        return 0
    if isinstance(layer, nn.Conv1d):
        return 1
    if isinstance(layer, nn.Conv2d):
        return 2
    raise GrowthNotApplicable("site", f"layer {type(layer).__name__} is not Linear, Conv1d or Conv2d")


def out_units(layer: GrowableLayer) -> int:
    """Output features (Linear) or channels (conv)."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_units(layer: GrowableLayer) -> int:
    """Input features (Linear) or channels (conv)."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _check_conv(layer: nn.Module, role: str) -> None:
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        if layer.groups != 1:
            raise GrowthNotApplicable("site", f"{role} is a grouped convolution (groups={layer.groups})")
        if layer.padding_mode != "zeros":
            raise GrowthNotApplicable("site", f"{role} pads with {layer.padding_mode!r}, not zeros")
        if isinstance(layer.padding, str):
            raise GrowthNotApplicable("site", f"{role} has padding {layer.padding!r}; give it in cells")


@dataclass(frozen=True)
class WidenSite:
    """A producer layer, the consumer of its activation, and what the host does between them.

    The host computes `consumer(bridge(slot(activation(producer(x)))))`; `slot` may be None.
    """

    layer_id: str
    producer: GrowableLayer
    consumer: GrowableLayer
    activation: str = "relu"
    bridge: Bridge = Bridge()
    slot: SeedSlot | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GrowthNotApplicable(
                "site", f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        dims = spatial_dims(self.producer)
        consumer_dims = spatial_dims(self.consumer)
        _check_conv(self.producer, "producer")
        _check_conv(self.consumer, "consumer")
        produced = out_units(self.producer)
        if consumer_dims == 0:
            if dims == 0 and self.bridge.pooled_side is not None:
                raise GrowthNotApplicable("site", "a Linear producer has nothing to pool")
            if dims > 0 and self.bridge.pooled_side is None:
                raise GrowthNotApplicable(
                    "site", "a conv producer feeds a Linear consumer only through a pool"
                )
            expected = produced * self.bridge.cells(dims)
            if self.consumer.in_features != expected:
                raise GrowthNotApplicable(
                    "site",
                    f"consumer takes {self.consumer.in_features} features, the bridge gives {expected}",
                )
        else:
            if consumer_dims != dims or self.bridge.pooled_side is not None:
                raise GrowthNotApplicable(
                    "site", f"a {type(self.consumer).__name__} consumer needs a conv producer of its kind"
                )
            if in_units(self.consumer) != produced:
                raise GrowthNotApplicable(
                    "site", f"consumer takes {in_units(self.consumer)} channels, producer gives {produced}"
                )

    @property
    def dims(self) -> int:
        """Spatial dimensions of the producer's output (0 for Linear)."""
        return spatial_dims(self.producer)

    @property
    def cells(self) -> int:
        """Consumer input features per producer unit."""
        return self.bridge.cells(self.dims) if isinstance(self.consumer, nn.Linear) else 1


@dataclass(frozen=True)
class DeepenSite:
    """Where a new block can go: on the output of `anchor` (the slot after the host layer `layer`)."""

    layer_id: str
    layer: GrowableLayer
    anchor: nn.Module
    kind: str  # "linear", "conv1d" or "conv2d": the activation there is [N, width(, *spatial)]
    width: int


@dataclass(frozen=True)
class ParameterMerge:
    """`merged` replaced `old` in the host: `merged` is `old` and `appended` concatenated along `dim`.

    The trainer hands these to its optimizer so that `merged` keeps the moments of both halves.
    """

    old: nn.Parameter
    appended: nn.Parameter
    merged: nn.Parameter
    dim: int


def functional_layer(layer: GrowableLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`layer`'s operation (kind, stride, padding, dilation) with other weights."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, bias)
    if isinstance(layer, nn.Conv1d):
        return nn.functional.conv1d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    return nn.functional.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
