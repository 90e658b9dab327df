"""Growths under the lifecycle: one WIDEN or DEEPEN of a host layer, from command to merge or cull.

A `Growth` is what the `SeedManager` keeps for one growth operation, beside its slots' records: the
operation and its parameters, a `SeedLifecycle` (the same stages and gates as a seed), and the module
that carries the new parameters once it is built (a `UnitGroup` or an `IdentityBlock`), registered
under the host so that the host's state dict saves it. The lifecycle stages map onto growth modes:

- GERMINATED: a gradmax WIDEN gathers `FanInStatistics` for `growth_statistics_steps` backward passes,
  then builds its units; a random WIDEN and a DEEPEN build at once. G0 passes once built and finite.
- TRAINING: INCUBATE (the host's value is unchanged; the new parameters learn, the host gets nothing
  from them). G1 reads the first-order gain the new parameters would bring.
- BLENDING, SHADOWING, PROBATIONARY: BLEND with the lifecycle's alpha (forced to 0 for the
  counterfactual). G2-G4 as for a seed.
- FOSSILIZED: a WIDEN merges into the host's layers (its module leaves the host); a DEEPEN stays LIVE.
- CULLED: the module is detached and removed; the host computes exactly what it computed before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from esper.kasmina.deepen import IdentityBlock
from esper.kasmina.growth import DeepenSite, GrowthMode, GrowthNotApplicable, WidenSite, out_units
from esper.kasmina.lifecycle import BLEND_STAGES, FOSSILIZED, GERMINATED, TRAINING, SeedLifecycle
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.widen import FanInStatistics, UnitGroup, gradmax_fan_in, random_fan_in, set_width
from esper.leyline import pb

OPERATION_NAMES = {pb.SEED_OP_WIDEN: "widen", pb.SEED_OP_DEEPEN: "deepen"}
CONTAINER = "growth"


def gradient_norm(grads: Sequence[Tensor]) -> float:
    """The norm of several gradients together, read from the device once (not once per tensor); the
    squares are summed on the host in the same order as before, so the value is the same."""
    squares: list[float] = torch.stack([g.pow(2).sum() for g in grads]).tolist()
    return math.sqrt(sum(squares))


class GrowthHost(Protocol):
    """What Kasmina needs of a host to grow it (Tolaria's `Host` provides it)."""

    def widen_site(self, layer_id: str) -> WidenSite:
        """Where widening `layer_id` acts, or `GrowthNotApplicable`."""
        ...

    def deepen_site(self, layer_id: str) -> DeepenSite:
        """Where a block after `layer_id` goes, or `GrowthNotApplicable`."""
        ...

    def add_module(self, name: str, module: nn.Module | None) -> None:
        """`nn.Module.add_module`."""
        ...


def growth_container(host: GrowthHost) -> nn.ModuleDict:
    """The host's container of growth modules (`host.growth`), created empty."""
    container = nn.ModuleDict()
    host.add_module(CONTAINER, container)
    return container


def module_key(growth_id: str) -> str:
    """The growth's key in the container (module names cannot hold dots)."""
    return growth_id.replace(".", "_")


@dataclass
class Growth:
    """One growth operation and its lifecycle (see the module doc)."""

    growth_id: str
    operation: int
    layer_id: str
    units: int
    init: int
    hidden: int
    lifecycle: SeedLifecycle
    site: WidenSite | DeepenSite
    module: UnitGroup | IdentityBlock | None = None
    statistics: FanInStatistics | None = None
    seed_gradient_norm: float | None = None
    last_gate_failure: str = ""
    ready_reported: bool = False
    param_count: int = 0

    @property
    def name(self) -> str:
        """ "widen" or "deepen" (the `blueprint_id` its `SeedState` carries)."""
        return OPERATION_NAMES[self.operation]

    def touches(self) -> set[int]:
        """Ids of the host layers this growth reads or changes."""
        site = self.site
        if isinstance(site, WidenSite):
            return {id(site.producer), id(site.consumer)}
        return {id(site.layer)}

    def describe(self) -> str:
        """What the growth adds, for events."""
        if self.operation == pb.SEED_OP_WIDEN:
            init = "gradmax" if self.init == pb.GROWTH_INIT_GRADMAX else "random"
            return f"widen {self.layer_id} by {self.units} ({init})"
        return f"deepen after {self.layer_id} (hidden {self.hidden or 'layer width'})"

    # -- building -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Right after the command: gather statistics (gradmax WIDEN) or build at once."""
        if self.operation == pb.SEED_OP_WIDEN and self.init == pb.GROWTH_INIT_GRADMAX:
            assert isinstance(self.site, WidenSite)
            self.statistics = FanInStatistics(self.site)
            self.statistics.__enter__()
            return
        self.build()

    def ready_to_build(self, settings: KasminaSettings) -> bool:
        """True when a gradmax WIDEN has gathered its statistics and has not built yet."""
        return (
            self.module is None
            and self.statistics is not None
            and self.statistics.batches >= settings.growth_statistics_steps
        )

    def build(self, *, empty: bool = False) -> UnitGroup | IdentityBlock:
        """The module, built and attached in INCUBATE. `empty`: zero fan-in (a restore loads values next)."""
        site = self.site
        module: UnitGroup | IdentityBlock
        if isinstance(site, WidenSite):
            producer = site.producer
            if empty:
                weight = producer.weight.detach().new_zeros((self.units, *producer.weight.shape[1:]))
                bias = None if producer.bias is None else producer.bias.detach().new_zeros(self.units)
            elif self.statistics is not None:
                weight, bias = gradmax_fan_in(self.statistics, self.units)
            else:
                weight, bias = random_fan_in(site, self.units)
            self.stop_statistics()
            module = UnitGroup(site, weight, None if producer.bias is None else bias)
            module.attach()
        else:
            module = IdentityBlock.for_site(site, self.hidden or None)
            module.attach(site)
        module.mode = GrowthMode.INCUBATE
        module.alpha = 0.0
        self.module = module
        self.param_count = sum(p.numel() for p in module.parameters())
        return module

    def sanity(self) -> tuple[bool, str]:
        """G0's signal once built: every new parameter is finite."""
        assert self.module is not None
        for parameter in self.module.parameters():
            if not bool(parameter.detach().isfinite().all()):
                return False, "a new parameter is not finite"
        return True, ""

    def stop_statistics(self) -> None:
        """Stop gathering (hooks removed)."""
        if self.statistics is not None:
            self.statistics.__exit__(None, None, None)
            self.statistics = None

    def remove(self) -> tuple[nn.Parameter, ...]:
        """Detach and drop the module (the host as it was before); returns its parameters."""
        self.stop_statistics()
        module, self.module = self.module, None
        if module is None:
            return ()
        module.detach()
        return tuple(module.parameters())

    # -- the step -------------------------------------------------------------------------------------------

    def sync(self, alpha_override: float | None = None) -> None:
        """Set the module's mode and alpha from the lifecycle's stage."""
        module = self.module
        if module is None:
            return
        stage = self.lifecycle.stage
        if stage in (GERMINATED, TRAINING):
            module.mode, module.alpha = GrowthMode.INCUBATE, 0.0
        elif stage == FOSSILIZED:
            module.mode, module.alpha = GrowthMode.LIVE, 1.0
        elif stage in BLEND_STAGES:
            module.mode = GrowthMode.BLEND
            module.alpha = self.lifecycle.alpha if alpha_override is None else alpha_override

    def gradient_norm(self) -> float | None:
        """The norm of the new parameters' gradient on the last backward (None when none reached them)."""
        if self.module is None:
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return gradient_norm(grads)

    # -- persistence ----------------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state (the module's weights live in the host's state dict)."""
        return {
            "growth_id": self.growth_id,
            "operation": self.operation,
            "layer_id": self.layer_id,
            "units": self.units,
            "init": self.init,
            "hidden": self.hidden,
            "lifecycle": self.lifecycle.export_state(),
            "statistics": None if self.statistics is None else self.statistics.export_state(),
            "has_module": self.module is not None,
            "seed_gradient_norm": self.seed_gradient_norm,
            "param_count": self.param_count,
            "last_gate_failure": self.last_gate_failure,
            "ready_reported": self.ready_reported,
        }


def site_for(host: GrowthHost, operation: int, layer_id: str) -> WidenSite | DeepenSite:
    """The host's site for `operation` at `layer_id` (`GrowthNotApplicable` when it has none)."""
    if operation == pb.SEED_OP_WIDEN:
        return host.widen_site(layer_id)
    return host.deepen_site(layer_id)


def restore_growth(host: GrowthHost, settings: KasminaSettings, saved: dict[str, Any]) -> Growth:
    """A `Growth` from `Growth.export_state`, module rebuilt empty and attached (load weights next)."""
    operation = int(saved["operation"])
    layer_id = str(saved["layer_id"])
    growth = Growth(
        growth_id=str(saved["growth_id"]),
        operation=operation,
        layer_id=layer_id,
        units=int(saved["units"]),
        init=int(saved["init"]),
        hidden=int(saved["hidden"]),
        lifecycle=SeedLifecycle.from_state(settings, saved["lifecycle"]),
        site=site_for(host, operation, layer_id),
        param_count=int(saved["param_count"]),
    )
    norm = saved["seed_gradient_norm"]
    growth.seed_gradient_norm = None if norm is None else float(norm)
    growth.last_gate_failure = str(saved.get("last_gate_failure", ""))
    growth.ready_reported = bool(saved.get("ready_reported", False))
    if saved["has_module"]:
        growth.build(empty=True)
    elif saved["statistics"] is not None:
        assert isinstance(growth.site, WidenSite)
        growth.statistics = FanInStatistics(growth.site)
        growth.statistics.restore_state(saved["statistics"])
        growth.statistics.__enter__()
    growth.sync()
    return growth


def resize(host: GrowthHost, layer_id: str, units: int) -> None:
    """Make widened layer `layer_id` `units` wide again (values zero: a restore loads them next)."""
    site = host.widen_site(layer_id)
    if out_units(site.producer) != units:
        set_width(site, units)


__all__ = [
    "CONTAINER",
    "Growth",
    "GrowthHost",
    "GrowthNotApplicable",
    "growth_container",
    "module_key",
    "resize",
    "restore_growth",
    "site_for",
]
