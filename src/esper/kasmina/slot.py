"""`SeedSlot`: an attach point of known width in a host's forward pass.

A slot with no seed is the identity and costs one attribute test. With a seed, what the slot does depends
on the seed's stage (set by the `SeedManager`):

- GERMINATED: the host output is unchanged; the seed runs once on a real, detached activation so G0 can
  check its shape and finiteness.
- TRAINING: the host output is unchanged *in value*; the seed sees the detached activation and gets the
  gradient the host output receives (a straight-through residual target), so it learns what would lower
  the loss while no gradient from it can reach the host.
- BLENDING / SHADOWING / PROBATIONARY: the seed's residual is blended in with the current alpha; its input
  is still detached, so culling it leaves the host as it was trained.
- FOSSILIZED: the seed is part of the host (its input is no longer detached, alpha is 1).

Stacking (see `esper.kasmina.stack`) then frees the slot for the next seed: a fossil that folds into the
next layer leaves, and one that does not moves to `stacked`, the slot's frozen-in-place host modules,
which act on the activation, in the order they were stacked, before whatever the slot does next.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import torch
from torch import Tensor, nn

from esper.kasmina.blending import Blender

SLOT_KINDS = ("mlp", "conv", "conv1d")


class SlotMode(IntEnum):
    """What the slot's forward does."""

    IDENTITY = 0
    PROBE = 1
    SANITY = 2
    INCUBATE = 3
    BLEND = 4
    FOSSIL = 5


class SeedModule(nn.Module):
    """A seed: the blueprint's module (`body`) and the blender that mixes its output into the host."""

    def __init__(self, body: nn.Module, blender: Blender) -> None:
        super().__init__()
        self.body = body
        self.blender = blender

    def parameter_count(self) -> int:
        """Number of scalar parameters the seed adds to the host."""
        return sum(p.numel() for p in self.parameters())


class _Incubate(torch.autograd.Function):
    """Forward: the host activation, untouched. Backward: its gradient goes to the host and to the seed.

    The seed thus learns from the gradient at the slot as if its output were added (a residual target),
    and records the first-order loss reduction it would bring: -<grad, s>.
    """

    @staticmethod
    def forward(ctx: Any, host: Tensor, seed_out: Tensor, slot: SeedSlot) -> Tensor:
        ctx.save_for_backward(seed_out.detach())
        ctx.slot = slot
        return host.view_as(host)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (seed_out,) = ctx.saved_tensors
        ctx.slot.training_gains.append(float(-(grad * seed_out).sum()))
        return grad, grad, None


class SeedSlot(nn.Module):
    """An attach point in a host: `kind` is "mlp" ([N, width]), "conv" ([N, width, H, W]) or "conv1d"
    ([N, width, L])."""

    def __init__(self, slot_id: str, width: int, kind: str, *, layer_id: str, depth: int) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"slot {slot_id!r}: width must be >= 1, got {width}")
        if kind not in SLOT_KINDS:
            raise ValueError(f"slot {slot_id!r}: kind must be one of {list(SLOT_KINDS)}, got {kind!r}")
        self.slot_id = slot_id
        self.width = width
        self.kind = kind
        self.layer_id = layer_id
        self.depth = depth
        self.seed: SeedModule | None = None
        self.mode = SlotMode.IDENTITY
        self.alpha = 0.0
        self.alpha_override: float | None = None
        # Measurements written by forward and backward, read (and cleared) by the manager.
        self.host_gradient_norm: float | None = None
        self.sanity: tuple[bool, str] | None = None
        self.training_gains: list[float] = []
        self.isolation_violations = 0
        self._seed_parameter_ids: frozenset[int] = frozenset()
        # Fossils kept as host modules, applied first; a plain flag keeps the dormant fast path cheap.
        self.stacked = nn.ModuleList()
        self._has_stacked = False

    def extra_repr(self) -> str:
        return f"slot_id={self.slot_id!r}, width={self.width}, kind={self.kind!r}, mode={self.mode.name}"

    # -- set by the manager ---------------------------------------------------------------------------------

    def install(self, seed: SeedModule) -> None:
        """Put a freshly built seed in the slot (the manager sets the mode next)."""
        self.seed = seed
        self._seed_parameter_ids = frozenset(id(p) for p in seed.parameters())
        self.sanity = None
        self.training_gains.clear()
        self.isolation_violations = 0

    def remove(self) -> SeedModule | None:
        """Take the seed out; the slot is the identity again. Returns the removed seed."""
        seed = self.seed
        self.seed = None
        self._seed_parameter_ids = frozenset()
        self.mode = SlotMode.IDENTITY
        self.alpha = 0.0
        self.alpha_override = None
        self.sanity = None
        self.training_gains.clear()
        return seed

    def is_clean(self) -> bool:
        """True when nothing of a seed remains: no module, no parameters, identity forward (stacked
        fossils are part of the host, not of a seed)."""
        return (
            self.seed is None
            and not self._seed_parameter_ids
            and self.mode in (SlotMode.IDENTITY, SlotMode.PROBE)
            and not any(not name.startswith("stacked.") for name, _ in self.named_parameters())
        )

    @property
    def hooked(self) -> bool:
        """True when a module hook acts on the slot (a block inserted after it, for instance)."""
        return bool(self._forward_pre_hooks or self._forward_hooks)

    def stack(self, seed: SeedModule) -> None:
        """Keep `seed` (a fossil) as a host module acting here before anything else, for good."""
        self.stacked.append(seed)
        self._has_stacked = True

    def clear_stacked(self) -> None:
        """Drop every stacked module (a restore rebuilds them from the checkpoint)."""
        self.stacked = nn.ModuleList()
        self._has_stacked = False

    def arm_gradient_probe(self) -> None:
        """Measure the host's gradient norm at this slot's activation on the next training forward."""
        if self.mode == SlotMode.IDENTITY:
            self.mode = SlotMode.PROBE
        self.host_gradient_norm = None

    # -- forward --------------------------------------------------------------------------------------------

    def __call__(self, x: Tensor) -> Tensor:
        # A dormant slot skips nn.Module's call machinery: one attribute test instead of several
        # microseconds per call (benchmarks/slot_overhead.py). Module hooks on the slot still run.
        if self.mode is SlotMode.IDENTITY and not (
            self._has_stacked or self._forward_pre_hooks or self._forward_hooks
        ):
            return x
        result: Tensor = super().__call__(x)
        return result

    def forward(self, x: Tensor) -> Tensor:
        """The slot's output; the identity when no seed acts here and nothing is stacked."""
        if self._has_stacked:
            for kept in self.stacked:
                assert isinstance(kept, SeedModule)
                x = kept.blender(x, x, kept.body(x), 1.0)
        mode = self.mode
        if mode == SlotMode.IDENTITY:
            return x
        if mode == SlotMode.PROBE:
            return self._probe(x)
        seed = self.seed
        assert seed is not None, f"slot {self.slot_id} in mode {mode.name} without a seed"
        if mode == SlotMode.SANITY:
            return self._sanity(seed, x)
        if mode == SlotMode.INCUBATE:
            return self._incubate(seed, x)
        if mode == SlotMode.BLEND:
            alpha = self.alpha if self.alpha_override is None else self.alpha_override
            if alpha == 0.0:
                return x
            seed_input = x.detach()
            blended: Tensor = seed.blender(x, seed_input, seed.body(seed_input), alpha)
            return blended
        fossil: Tensor = seed.blender(x, x, seed.body(x), 1.0)
        return fossil

    def _probe(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            x.register_hook(self._record_host_gradient)  # type: ignore[no-untyped-call]
            self.mode = SlotMode.IDENTITY
        return x

    def _record_host_gradient(self, grad: Tensor) -> None:
        self.host_gradient_norm = float(grad.norm())

    def _sanity(self, seed: SeedModule, x: Tensor) -> Tensor:
        if self.sanity is None:
            with torch.no_grad():
                out = seed.body(x.detach())
            if out.shape != x.shape:
                self.sanity = (False, f"seed output shape {tuple(out.shape)} != activation {tuple(x.shape)}")
            elif not bool(torch.isfinite(out).all()):
                self.sanity = (False, "seed output is not finite")
            else:
                self.sanity = (True, "")
        return x

    def _incubate(self, seed: SeedModule, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return x
        seed_out = seed.body(x.detach())
        self.isolation_violations += self._foreign_leaves(seed_out)
        result: Tensor = _Incubate.apply(x, seed_out, self)  # type: ignore[no-untyped-call]
        return result

    def _foreign_leaves(self, seed_out: Tensor) -> int:
        """Leaves of the seed's autograd graph that are not the seed's own parameters (0 when isolated)."""
        foreign = 0
        seen: set[int] = set()
        stack = [seed_out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in self._seed_parameter_ids:
                foreign += 1
            stack.extend(next_node for next_node, _ in node.next_functions)
        return foreign
