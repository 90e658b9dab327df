"""Deepen a host: insert a new block after a host layer that starts as the exact identity.

The block is residual, `x + project(act(expand(x)))`, with `project` (weight and bias) at zero. Why this
form and not an identity-initialised layer `act(I x)`: the residual block is the identity whatever the
activation and whatever the sign of its input (it can go after a pre-activation, a GELU or a tanh),
while `act(I x) == x` holds only where the activation is the identity on the input's range (ReLU after
ReLU). It has no zero-gradient trap: `expand` keeps PyTorch's random initialisation, so `act(expand(x))`
is not zero and `project` gets a gradient on the first backward; `expand` gets one once `project` has
moved.

For convolutions, `expand` is a 3x3 (or 3) convolution with same padding and `project` a 1x1: the block
keeps the activation's shape, as a slot's seed does. The block attaches to the output of the site's
anchor (the slot after the layer) with a forward hook; `detach` removes it and leaves the host as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from esper.kasmina.growth import (
    ACTIVATIONS,
    DeepenSite,
    GrowthMode,
    GrowthNotApplicable,
    combine,
    record_gain,
)

BLOCK_KINDS = ("linear", "conv1d", "conv2d")


class IdentityBlock(nn.Module):
    """A residual block `x + project(act(expand(x)))` whose output projection starts at zero."""

    def __init__(
        self,
        kind: str,
        width: int,
        hidden: int,
        *,
        activation: str = "relu",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise GrowthNotApplicable("deepen", f"block kind {kind!r} is not one of {list(BLOCK_KINDS)}")
        if width < 1 or hidden < 1:
            raise GrowthNotApplicable("deepen", f"width and hidden must be >= 1, got {width} and {hidden}")
        if activation not in ACTIVATIONS:
            raise GrowthNotApplicable(
                "deepen", f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        self.kind = kind
        self.activation = activation
        self.expand: nn.Module
        self.project: nn.Linear | nn.Conv1d | nn.Conv2d
        where: dict[str, Any] = {"device": device, "dtype": dtype}
        if kind == "linear":
            self.expand = nn.Linear(width, hidden, **where)
            self.project = nn.Linear(hidden, width, **where)
        elif kind == "conv1d":
            self.expand = nn.Conv1d(width, hidden, kernel_size=3, padding=1, **where)
            self.project = nn.Conv1d(hidden, width, kernel_size=1, **where)
        else:
            self.expand = nn.Conv2d(width, hidden, kernel_size=3, padding=1, **where)
            self.project = nn.Conv2d(hidden, width, kernel_size=1, **where)
        nn.init.zeros_(self.project.weight)
        assert self.project.bias is not None
        nn.init.zeros_(self.project.bias)
        self.mode = GrowthMode.LIVE
        self.alpha = 1.0
        # While INCUBATE: the first-order loss reduction the residual would bring, per backward.
        self.training_gains: list[float] = []
        self._handle: RemovableHandle | None = None

    @classmethod
    def for_site(
        cls, site: DeepenSite, hidden: int | None = None, *, activation: str = "relu"
    ) -> IdentityBlock:
        """A block for `site` (`hidden` defaults to the width), on the device and dtype of its layer."""
        like = site.layer.weight
        return cls(
            site.kind,
            site.width,
            hidden or site.width,
            activation=activation,
            device=like.device,
            dtype=like.dtype,
        )

    def residual(self, x: Tensor) -> Tensor:
        """What the block adds to `x` (zero at insertion)."""
        out: Tensor = self.project(ACTIVATIONS[self.activation](self.expand(x)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """`x` plus the residual, as the block's mode says (LIVE: the full residual)."""
        if self.mode == GrowthMode.BLEND and self.alpha == 0.0:
            return x
        source = x if self.mode == GrowthMode.LIVE else x.detach()
        residual = self.residual(source)
        result = combine(x, residual, self.mode, self.alpha)
        if self.mode == GrowthMode.INCUBATE and result.requires_grad:
            record_gain(result, residual, self.training_gains)
        return result

    @property
    def attached(self) -> bool:
        """True while the block runs in the host's forward."""
        return self._handle is not None

    def attach(self, site: DeepenSite) -> None:
        """Run the block on the output of `site.anchor`."""
        if self._handle is not None:
            raise GrowthNotApplicable("deepen", "this block is already attached")
        self._handle = site.anchor.register_forward_hook(self._on_anchor)

    def detach(self) -> None:
        """Take the block out; the host computes exactly what it computed before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_anchor(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        result: Tensor = self(output)
        return result
