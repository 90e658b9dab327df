"""A user's own `nn.Module` as an Esper host: growth points found in it, or marked with `GrowthPoint`.

A growth point is a place in the forward pass right after a growable layer (Linear, Conv1d, Conv2d) and
its elementwise activation, where the next growable layer consumes the activation. Esper can put a seed
there (a `SeedSlot`), widen the layer before it (new units, fan-out into the layer after), or insert a
block after it (deepen). `adapt_model` returns an `AdaptedHost`: a `Host` like the built-in ones, so the
same Kasmina code grows it.

Two ways to name the points:

- found: without any `GrowthPoint` in the model, every `nn.Sequential` (at any depth) is scanned for
  `layer, activation[, pool, flatten], layer` runs; the activation module is replaced, at its index, by
  `nn.Sequential(activation, GrowthPoint())`, so no parameter changes its name;
- marked: the user calls `esper.GrowthPoint()` modules in a custom forward, on the activation. Only the
  marked points are used then.

Either way one forward pass on an example input checks every point before training: which layer
produced its input, which activation lies between (relu, gelu, tanh or identity), which layer consumes
its output and what lies between (nothing, or an average pool and a flatten before a Linear). A point
that cannot be grown raises `GrowthPointError` naming the point and the reason; a model with no point
raises `NoGrowthPoints`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from esper.kasmina import Bridge, DeepenSite, GrowthNotApplicable, SeedSlot, WidenSite
from esper.kasmina.growth import ACTIVATIONS, GrowableLayer, out_units, spatial_dims
from esper.leyline import EsperError
from esper.tolaria.hosts import Host

ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.Tanh: "tanh",
    nn.Identity: "identity",
}
_SLOT_KINDS = {0: "mlp", 1: "conv1d", 2: "conv"}
_BLOCK_KINDS = {0: "linear", 1: "conv1d", 2: "conv2d"}
_TOLERANCE = 1e-5


class AdaptError(EsperError):
    """A user's model cannot be grown as it is; nothing was changed in a way that matters to it."""


class NoGrowthPoints(AdaptError):
    """The model has no place where Esper can grow."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(
            f"{model} has no growth point: {reason}. Put Linear/Conv layers followed by an activation "
            "(ReLU, GELU, Tanh) and another Linear/Conv in an nn.Sequential, or call esper.GrowthPoint() "
            "on an activation in your forward"
        )


class GrowthPointError(AdaptError):
    """A growth point whose surroundings cannot be grown (which point, and why)."""

    def __init__(self, point: str, reason: str) -> None:
        self.point = point
        self.reason = reason
        super().__init__(f"growth point {point!r}: {reason}")


class GrowthPoint(nn.Module):
    """Marks an activation in a forward pass where Esper may grow the model.

    Call it on the output of an activation that follows a Linear/Conv layer and feeds the next one:
    `x = self.point(torch.relu(self.fc1(x)))`. Until the model is adapted it is the identity.
    `producer`, `consumer` (module names, as in `named_modules()`) and `activation` ("relu", "gelu",
    "tanh", "identity") override what the check pass finds; `name` is the point's id (default: its
    module name).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        producer: str | None = None,
        consumer: str | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if activation is not None and activation not in ACTIVATIONS:
            raise GrowthPointError(
                name or "?", f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        self.name = name
        self.producer = producer
        self.consumer = consumer
        self.activation = activation
        self.slot: SeedSlot | None = None

    def extra_repr(self) -> str:
        return "" if self.name is None else f"name={self.name!r}"

    def forward(self, x: Tensor) -> Tensor:
        """`x`, or what the point's seed slot makes of it once adapted."""
        slot = self.slot
        return x if slot is None else slot(x)


@dataclass(frozen=True)
class PointSite:
    """What the check pass established for one growth point."""

    point_id: str
    module_name: str
    producer: str
    consumer: str
    activation: str
    pooled_side: int | None


def _growable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)


def _activation_name(module: nn.Module) -> str | None:
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return None
    return ACTIVATION_MODULES.get(type(module))


def _bridge_after(modules: list[nn.Module], start: int) -> tuple[int, int | None] | None:
    """(index of the consumer, pooled side) when `modules[start:]` is `[pool, flatten,] layer`."""
    if start < len(modules) and _growable(modules[start]):
        return start, None
    if start + 2 < len(modules):
        pool, flatten, layer = modules[start : start + 3]
        side = getattr(pool, "output_size", None)
        if (
            isinstance(pool, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d)
            and isinstance(side, int)
            and isinstance(flatten, nn.Flatten)
            and flatten.start_dim == 1
            and flatten.end_dim == -1
            and isinstance(layer, nn.Linear)
        ):
            return start + 2, side
    return None


def mark_sequentials(model: nn.Module) -> list[tuple[nn.Sequential, int, nn.Module]]:
    """Insert a `GrowthPoint` after each `layer, activation` of every `nn.Sequential` that a growable
    layer consumes (see the module doc); returns (container, index, activation) of each insertion."""
    inserted: list[tuple[nn.Sequential, int, nn.Module]] = []
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module)
        for index in range(len(children) - 2):
            producer, activation = children[index], children[index + 1]
            if not _growable(producer) or _activation_name(activation) is None:
                continue
            if _bridge_after(children, index + 2) is None:
                continue
            inserted.append((module, index + 1, activation))
            module[index + 1] = nn.Sequential(activation, GrowthPoint(f"p{len(inserted)}"))
    return inserted


class _Recorder:
    """Forward hooks recording, in call order, each growable layer's and each point's input and output."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []
        self.handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if _growable(module) or isinstance(module, GrowthPoint):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
                self.calls.append((name, module, inputs[0].detach(), output.detach()))

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=_TOLERANCE, rtol=_TOLERANCE))


def _resolve_point(
    point_id: str, index: int, calls: list[tuple[str, nn.Module, Tensor, Tensor]], point: GrowthPoint
) -> PointSite:
    """Producer, activation, consumer and bridge of the point called at `calls[index]`."""
    module_name, _, point_in, point_out = calls[index]
    layers_before = [c for c in calls[:index] if not isinstance(c[1], GrowthPoint)]
    layers_after = [c for c in calls[index + 1 :] if not isinstance(c[1], GrowthPoint)]
    if point.producer is not None:
        found = [c for c in layers_before if c[0] == point.producer]
        if not found:
            raise GrowthPointError(
                point_id, f"producer {point.producer!r} is not a Linear/Conv layer run before it"
            )
        produced = found[-1]
    elif layers_before:
        produced = layers_before[-1]
    else:
        raise GrowthPointError(point_id, "no Linear/Conv layer runs before it, so there is nothing to widen")
    if point.consumer is not None:
        found = [c for c in layers_after if c[0] == point.consumer]
        if not found:
            raise GrowthPointError(
                point_id, f"consumer {point.consumer!r} is not a Linear/Conv layer run after it"
            )
        consumed = found[0]
    elif layers_after:
        consumed = layers_after[0]
    else:
        raise GrowthPointError(point_id, "no Linear/Conv layer runs after it to take new units")
    producer_name, producer, _, producer_out = produced
    consumer_name, consumer, consumer_in, _ = consumed
    assert isinstance(producer, nn.Linear | nn.Conv1d | nn.Conv2d)
    assert isinstance(consumer, nn.Linear | nn.Conv1d | nn.Conv2d)
    dims = spatial_dims(producer)
    if point_in.dim() != dims + 2:
        raise GrowthPointError(
            point_id,
            f"its input has shape {tuple(point_in.shape)}; after {type(producer).__name__} "
            f"{producer_name!r} a point needs [N, units{', *spatial' if dims else ''}] "
            "(a Linear on every token of a sequence is not a growth point)",
        )
    candidates = [point.activation] if point.activation else list(ACTIVATIONS)
    matching = [a for a in candidates if _close(ACTIVATIONS[a](producer_out.float()), point_in.float())]
    if not matching:
        raise GrowthPointError(
            point_id,
            f"its input is not {' or '.join(candidates)} of the output of {producer_name!r}: something "
            "else happens between them (normalisation, dropout, a residual), so new units could not "
            "be computed apart",
        )
    if len(matching) > 1:
        raise GrowthPointError(
            point_id,
            f"its input matches several activations of {producer_name!r} ({', '.join(matching)}) on "
            "the example; name it: GrowthPoint(activation=...)",
        )
    pooled_side: int | None = None
    if not _close(point_out, consumer_in):
        pooled_side = _find_pool(point_out, consumer_in, consumer)
        if pooled_side is None:
            raise GrowthPointError(
                point_id,
                f"{consumer_name!r} does not take its output as it is (nor through an average pool and a "
                "flatten): widening would not know where new units go",
            )
    return PointSite(point_id, module_name, producer_name, consumer_name, matching[0], pooled_side)


def _find_pool(point_out: Tensor, consumer_in: Tensor, consumer: nn.Module) -> int | None:
    if not isinstance(consumer, nn.Linear) or point_out.dim() not in (3, 4):
        return None
    channels = point_out.shape[1]
    spatial = point_out.dim() - 2
    for side in range(1, max(point_out.shape[2:]) + 1):
        if channels * side**spatial == consumer.in_features and _close(
            Bridge(side).apply(point_out), consumer_in
        ):
            return side
    return None


class AdaptedHost(Host):
    """A user's module with growth points: seeds, widen and deepen through the `Host` interface.

    `model` is the user's module (points inserted or marked); `points` the checked sites in forward
    order. Layer ids are the layers' module names in the user's model; slot ids are the points' ids.
    """

    def __init__(self, model: nn.Module, points: list[PointSite]) -> None:
        super().__init__()
        self.model = model
        self.points = points
        modules = dict(model.named_modules())
        self._layers: dict[str, GrowableLayer] = {}
        for name, module in modules.items():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) and not _inside_point(name, modules):
                self._layers[name] = module
        self._by_producer: dict[str, tuple[PointSite, GrowthPoint]] = {}
        for depth, site in enumerate(points):
            point = modules[site.module_name]
            assert isinstance(point, GrowthPoint)
            producer = self._layers[site.producer]
            kind = _SLOT_KINDS[spatial_dims(producer)]
            point.slot = SeedSlot(
                site.point_id, out_units(producer), kind, layer_id=site.producer, depth=depth
            )
            self._by_producer[site.producer] = (site, point)
        self.slot_kind = _SLOT_KINDS[spatial_dims(self._layers[points[0].producer])]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The user's model's forward."""
        return self.model(*args, **kwargs)

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        return [
            (name, "linear" if isinstance(layer, nn.Linear) else "conv", out_units(layer), layer)
            for name, layer in self._layers.items()
        ]

    def _point(self, layer_id: str, operation: str) -> tuple[PointSite, GrowthPoint]:
        if layer_id not in self._by_producer:
            raise GrowthNotApplicable(
                operation,
                f"no growth point after layer {layer_id!r}; choose one of {sorted(self._by_producer)}",
            )
        return self._by_producer[layer_id]

    def widen_site(self, layer_id: str) -> WidenSite:
        site, point = self._point(layer_id, "widen")
        return WidenSite(
            layer_id,
            self._layers[site.producer],
            self._layers[site.consumer],
            site.activation,
            Bridge(site.pooled_side),
            point.slot,
        )

    def deepen_site(self, layer_id: str) -> DeepenSite:
        site, point = self._point(layer_id, "deepen")
        assert point.slot is not None
        layer = self._layers[site.producer]
        return DeepenSite(layer_id, layer, point.slot, _BLOCK_KINDS[spatial_dims(layer)], out_units(layer))


def _inside_point(name: str, modules: dict[str, nn.Module]) -> bool:
    """True for modules under a GrowthPoint (a seed's or a block's own layers)."""
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), GrowthPoint) for i in range(1, len(parts)))


def adapt_model(model: nn.Module, example: Any) -> AdaptedHost:
    """`model` as a host: its growth points found (or the marked ones used) and checked on `example`.

    `example` is one batch of inputs, as the model's forward takes it (a tensor, or a tuple of
    positional arguments). The model is changed in place (points inserted, slots put in them) and
    wrapped; raises `NoGrowthPoints` or `GrowthPointError` before anything trains, and then leaves the
    model as it was.
    """
    name = type(model).__name__
    if isinstance(model, Host):
        raise AdaptError(f"{name} is already an Esper host")
    marked = [m for m in model.modules() if isinstance(m, GrowthPoint)]
    if any(m.slot is not None for m in marked):
        raise AdaptError(f"{name} was adapted already; adapt a fresh model")
    inserted = [] if marked else mark_sequentials(model)
    if not marked and not inserted:
        raise NoGrowthPoints(
            name, "no nn.Sequential holds a Linear/Conv layer, an activation and another Linear/Conv"
        )
    try:
        sites = _check_points(model, example)
        if not sites:
            raise NoGrowthPoints(name, "its growth points never run in forward on the example")
        host = AdaptedHost(model, sites)
        for site in sites:
            try:
                host.widen_site(site.producer)
            except GrowthNotApplicable as exc:
                raise GrowthPointError(
                    site.point_id, f"layer {site.producer!r} cannot be widened: {exc.reason}"
                ) from exc
    except AdaptError:
        for point in model.modules():
            if isinstance(point, GrowthPoint):
                point.slot = None
        for container, index, activation in inserted:
            container[index] = activation
        raise
    return host


def _check_points(model: nn.Module, example: Any) -> list[PointSite]:
    recorder = _Recorder(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        recorder.close()
        model.train(was_training)
    calls = recorder.calls
    sites: list[PointSite] = []
    seen: dict[str, int] = {}
    for index, (module_name, module, _, _) in enumerate(calls):
        if not isinstance(module, GrowthPoint):
            continue
        point_id = module.name or module_name
        if module_name in seen:
            raise GrowthPointError(point_id, "it runs more than once in one forward; use one point per place")
        seen[module_name] = index
        sites.append(_resolve_point(point_id, index, calls, module))
    producers = [s.producer for s in sites]
    ids = [s.point_id for s in sites]
    for site in sites:
        if ids.count(site.point_id) > 1:
            raise GrowthPointError(site.point_id, "another growth point has the same name")
        if producers.count(site.producer) > 1:
            raise GrowthPointError(site.point_id, f"another point also follows layer {site.producer!r}")
    return sites


__all__ = [
    "AdaptError",
    "AdaptedHost",
    "GrowthPoint",
    "GrowthPointError",
    "NoGrowthPoints",
    "PointSite",
    "adapt_model",
    "mark_sequentials",
]
