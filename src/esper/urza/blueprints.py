"""Built-in blueprints: a descriptor and a module factory for each, and the one place modules are built.

A factory receives the slot's width, the host kind and fully resolved parameters (defaults merged with
the caller's, already checked against the descriptor's bounds) and returns a fresh `nn.Module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from esper.leyline import pb
from esper.urza import modules
from esper.urza.errors import BlueprintNotApplicable, DuplicateBlueprint, UnknownBlueprint

HOST_KINDS: tuple[str, ...] = ("mlp", "conv", "conv1d")
"""Slot kinds: "mlp" activations `[N, width]`, "conv" `[N, width, H, W]`, "conv1d" `[N, width, L]` (the 1-D
CNN's feature maps, and the Transformer's token activations, which its slots see channel-first)."""
_CONV_DIMS = {"conv": 2, "conv1d": 1}
MAX_WIDTH = 65_536

Factory = Callable[[int, str, Mapping[str, float]], nn.Module]


@dataclass(frozen=True)
class BlueprintSpec:
    """A blueprint as shipped: its default descriptor, its factory and its parameter defaults."""

    descriptor: pb.BlueprintDescriptor
    factory: Factory
    defaults: Mapping[str, float] = field(default_factory=dict)
    integer_parameters: frozenset[str] = frozenset()

    @property
    def blueprint_id(self) -> str:
        """The id the factory is registered under."""
        return str(self.descriptor.blueprint_id)


class FactoryRegistry:
    """Module factories by blueprint id, in registration order."""

    def __init__(self, specs: Mapping[str, BlueprintSpec] | None = None) -> None:
        self._specs: dict[str, BlueprintSpec] = dict(specs or {})

    def register(self, spec: BlueprintSpec) -> None:
        """Register `spec`; an id registered twice is an error."""
        if spec.blueprint_id in self._specs:
            raise DuplicateBlueprint(spec.blueprint_id)
        self._specs[spec.blueprint_id] = spec

    def get(self, blueprint_id: str) -> BlueprintSpec:
        """The spec of `blueprint_id`, or `UnknownBlueprint`."""
        spec = self._specs.get(blueprint_id)
        if spec is None:
            raise UnknownBlueprint(blueprint_id, "no module factory is registered for it")
        return spec

    def __contains__(self, blueprint_id: object) -> bool:
        return blueprint_id in self._specs

    def __iter__(self) -> Iterator[BlueprintSpec]:
        return iter(list(self._specs.values()))

    def copy(self) -> FactoryRegistry:
        """An independent registry with the same specs (to add custom factories to)."""
        return FactoryRegistry(self._specs)


def resolve_parameters(
    spec: BlueprintSpec, descriptor: pb.BlueprintDescriptor, params: Mapping[str, float]
) -> dict[str, float]:
    """Defaults merged with `params`, each checked against the descriptor's bounds."""
    blueprint_id = str(descriptor.blueprint_id)
    allowed = descriptor.allowed_parameters
    unknown = sorted(name for name in params if name not in allowed)
    if unknown:
        raise BlueprintNotApplicable(
            blueprint_id, f"unknown parameter(s) {unknown}; allowed: {sorted(allowed)}"
        )
    resolved = {**spec.defaults, **params}
    for name, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BlueprintNotApplicable(blueprint_id, f"parameter {name}={value!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise BlueprintNotApplicable(blueprint_id, f"parameter {name}={number} is not finite")
        if name in allowed:
            bounds = allowed[name]
            if not bounds.min_value <= number <= bounds.max_value:
                raise BlueprintNotApplicable(
                    blueprint_id,
                    f"parameter {name}={number:g} is outside [{bounds.min_value:g}, {bounds.max_value:g}]",
                )
        if name in spec.integer_parameters and not number.is_integer():
            raise BlueprintNotApplicable(blueprint_id, f"parameter {name}={number:g} must be an integer")
        resolved[name] = number
    return resolved


def build_blueprint(
    spec: BlueprintSpec,
    descriptor: pb.BlueprintDescriptor,
    width: int,
    kind: str,
    params: Mapping[str, float],
) -> nn.Module:
    """Check kind, width and parameters against `descriptor`, then build a fresh module."""
    blueprint_id = str(descriptor.blueprint_id)
    if kind not in HOST_KINDS:
        raise BlueprintNotApplicable(blueprint_id, f"host kind {kind!r} is not one of {list(HOST_KINDS)}")
    if kind not in descriptor.host_kinds:
        raise BlueprintNotApplicable(
            blueprint_id, f"host kind {kind!r} is not supported (supports {list(descriptor.host_kinds)})"
        )
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise BlueprintNotApplicable(blueprint_id, f"width must be an int in [1, {MAX_WIDTH}], got {width!r}")
    return spec.factory(width, kind, resolve_parameters(spec, descriptor, params))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of `module` (trainable or not)."""
    return sum(parameter.numel() for parameter in module.parameters())


def param_count(blueprint_id: str, width: int, kind: str, **params: float) -> int:
    """Parameters of a built-in blueprint at this width and kind, counted on a module really built (on
    the `meta` device: see `count_built`)."""
    spec = BUILTIN_FACTORIES.get(blueprint_id)
    return count_built(lambda: build_blueprint(spec, spec.descriptor, width, kind, params))


def count_built(build: Callable[[], nn.Module]) -> int:
    """Parameters of the module `build` makes, built on the `meta` device: no memory, and no draw from
    the global random generator. A count is asked for by Tamiyo's budget checks while the run trains
    beside them, and a real build's initialisation drew from the generator the training draws from: a
    decision then changed the run's random stream, depending on what the process had counted before."""
    with torch.device("meta"):
        return count_parameters(build())


# --- the built-in set ------------------------------------------------------------------------------


def _not_applicable(blueprint_id: str, reason: str) -> BlueprintNotApplicable:
    return BlueprintNotApplicable(blueprint_id, reason)


def _small_mlp(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.SmallMLP(width, max(1, round(width * params["hidden_ratio"])))


def _expansion_mlp(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.SmallMLP(width, width * int(params["expansion"]))


def _bottleneck_mlp(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.SmallMLP(width, max(1, width // int(params["reduction"])))


def _low_rank(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    rank = int(params["rank"])
    if rank > width:
        raise _not_applicable(
            "lowrank" if kind != "conv1d" else "conv1d_lowrank", f"rank {rank} exceeds the width {width}"
        )
    if kind == "mlp":
        return modules.LowRankLinear(width, rank)
    return modules.LowRankConv(width, rank, _CONV_DIMS[kind])


def _attention_lite(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    tokens = int(params["tokens"])
    if width % tokens != 0:
        raise _not_applicable("attention_lite", f"width {width} is not divisible into {tokens} tokens")
    return modules.AttentionLite(width, tokens)


def _residual_conv(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.ResidualConvBlock(width, _CONV_DIMS[kind])


def _depthwise_conv(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    kernel_size = int(params["kernel_size"])
    if kernel_size % 2 == 0:
        raise _not_applicable(
            "conv_depthwise" if kind == "conv" else "conv1d_depthwise",
            f"kernel_size {kernel_size} must be odd to keep the shape",
        )
    return modules.DepthwiseSeparableConv(width, kernel_size, _CONV_DIMS[kind])


def _bottleneck_conv(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.BottleneckConv(width, max(1, width // int(params["reduction"])), _CONV_DIMS[kind])


def _squeeze_excitation(width: int, kind: str, params: Mapping[str, float]) -> nn.Module:
    return modules.SqueezeExcitation(width, max(1, width // int(params["reduction"])))


def _descriptor(
    blueprint_id: str,
    name: str,
    *,
    tier: int,
    risk: float,
    kinds: tuple[str, ...],
    description: str,
    bounds: Mapping[str, tuple[float, float]],
) -> pb.BlueprintDescriptor:
    descriptor = pb.BlueprintDescriptor(
        blueprint_id=blueprint_id,
        name=name,
        tier=tier,
        risk=risk,
        stage=1,
        description=description,
        host_kinds=list(kinds),
    )
    for parameter, (low, high) in bounds.items():
        descriptor.allowed_parameters[parameter].min_value = low
        descriptor.allowed_parameters[parameter].max_value = high
    return descriptor


_SAFE = pb.BLUEPRINT_TIER_SAFE
_EXPERIMENTAL = pb.BLUEPRINT_TIER_EXPERIMENTAL

BUILTIN_SPECS: tuple[BlueprintSpec, ...] = (
    BlueprintSpec(
        descriptor=_descriptor(
            "mlp_small",
            "Small MLP",
            tier=_SAFE,
            risk=0.1,
            kinds=("mlp",),
            description="Linear -> GELU -> Linear at hidden_ratio x width.",
            bounds={"hidden_ratio": (0.25, 4.0)},
        ),
        factory=_small_mlp,
        defaults={"hidden_ratio": 1.0},
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "mlp_expand",
            "Expansion MLP",
            tier=_SAFE,
            risk=0.15,
            kinds=("mlp",),
            description="Linear up to expansion x width -> GELU -> Linear back: many new hidden units behind "
            "a narrow layer, for a host whose width limits it.",
            bounds={"expansion": (2.0, 16.0)},
        ),
        factory=_expansion_mlp,
        defaults={"expansion": 4.0},
        integer_parameters=frozenset({"expansion"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "mlp_bottleneck",
            "Bottleneck MLP",
            tier=_SAFE,
            risk=0.1,
            kinds=("mlp",),
            description="Linear down to width/reduction -> GELU -> Linear back up.",
            bounds={"reduction": (2.0, 16.0)},
        ),
        factory=_bottleneck_mlp,
        defaults={"reduction": 4.0},
        integer_parameters=frozenset({"reduction"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "lowrank",
            "Low-rank adapter",
            tier=_SAFE,
            risk=0.05,
            kinds=("mlp", "conv"),
            description="A rank-r linear map (1x1 convolutions on feature maps); the cheapest blueprint.",
            bounds={"rank": (1.0, 64.0)},
        ),
        factory=_low_rank,
        defaults={"rank": 4.0},
        integer_parameters=frozenset({"rank"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "attention_lite",
            "Attention-lite",
            tier=_EXPERIMENTAL,
            risk=0.35,
            kinds=("mlp",),
            description="Single-head self-attention over the features split into tokens, then a projection.",
            bounds={"tokens": (2.0, 16.0)},
        ),
        factory=_attention_lite,
        defaults={"tokens": 4.0},
        integer_parameters=frozenset({"tokens"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv_residual",
            "Residual conv block",
            tier=_SAFE,
            risk=0.15,
            kinds=("conv",),
            description="3x3 conv -> ReLU -> 3x3 conv at the slot's channel count (a ResNet branch).",
            bounds={},
        ),
        factory=_residual_conv,
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv_depthwise",
            "Depthwise-separable conv",
            tier=_SAFE,
            risk=0.1,
            kinds=("conv",),
            description="Depthwise kxk conv -> ReLU -> pointwise 1x1 conv.",
            bounds={"kernel_size": (1.0, 7.0)},
        ),
        factory=_depthwise_conv,
        defaults={"kernel_size": 3.0},
        integer_parameters=frozenset({"kernel_size"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv_bottleneck",
            "Bottleneck conv",
            tier=_SAFE,
            risk=0.15,
            kinds=("conv",),
            description="1x1 reduce -> 3x3 -> 1x1 expand, with ReLUs.",
            bounds={"reduction": (1.0, 16.0)},
        ),
        factory=_bottleneck_conv,
        defaults={"reduction": 2.0},
        integer_parameters=frozenset({"reduction"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv_se",
            "Squeeze-excitation",
            tier=_SAFE,
            risk=0.1,
            kinds=("conv",),
            description="Rescales each channel by a gate computed from the feature map's global average.",
            bounds={"reduction": (1.0, 16.0)},
        ),
        factory=_squeeze_excitation,
        defaults={"reduction": 4.0},
        integer_parameters=frozenset({"reduction"}),
    ),
)

# The 1-D blueprints are blueprints of their own rather than a new host kind of the 2-D ones: a catalogue
# seeds each built-in once, so an existing catalogue learns of new ids but never of new kinds of old ones.
BUILTIN_SPECS += (
    BlueprintSpec(
        descriptor=_descriptor(
            "conv1d_residual",
            "Residual 1-D conv block",
            tier=_SAFE,
            risk=0.15,
            kinds=("conv1d",),
            description="conv(3) -> ReLU -> conv(3) at the slot's channel count, along the sequence.",
            bounds={},
        ),
        factory=_residual_conv,
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv1d_depthwise",
            "Depthwise-separable 1-D conv",
            tier=_SAFE,
            risk=0.1,
            kinds=("conv1d",),
            description="Depthwise conv(k) along the sequence -> ReLU -> pointwise conv(1).",
            bounds={"kernel_size": (1.0, 9.0)},
        ),
        factory=_depthwise_conv,
        defaults={"kernel_size": 5.0},
        integer_parameters=frozenset({"kernel_size"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv1d_bottleneck",
            "Bottleneck 1-D conv",
            tier=_SAFE,
            risk=0.15,
            kinds=("conv1d",),
            description="conv(1) reduce -> conv(3) -> conv(1) expand, with ReLUs.",
            bounds={"reduction": (1.0, 16.0)},
        ),
        factory=_bottleneck_conv,
        defaults={"reduction": 1.0},
        integer_parameters=frozenset({"reduction"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv1d_se",
            "Squeeze-excitation (1-D)",
            tier=_SAFE,
            risk=0.1,
            kinds=("conv1d",),
            description="Rescales each channel by a gate computed from its average along the sequence.",
            bounds={"reduction": (1.0, 16.0)},
        ),
        factory=_squeeze_excitation,
        defaults={"reduction": 1.0},
        integer_parameters=frozenset({"reduction"}),
    ),
    BlueprintSpec(
        descriptor=_descriptor(
            "conv1d_lowrank",
            "Low-rank 1-D adapter",
            tier=_SAFE,
            risk=0.05,
            kinds=("conv1d",),
            description="A rank-r map of the channels at every position (1x1 convolutions).",
            bounds={"rank": (1.0, 64.0)},
        ),
        factory=_low_rank,
        defaults={"rank": 4.0},
        integer_parameters=frozenset({"rank"}),
    ),
)

BUILTIN_FACTORIES = FactoryRegistry({spec.blueprint_id: spec for spec in BUILTIN_SPECS})
