"""Hosts: small, deliberately narrow models that declare seed slots in their forward pass.

A host is capacity-limited on purpose (DESIGN §10): growth can only show when the host alone plateaus.
Each host exposes its `HostTopology` (layers and slots) for the controller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from esper.kasmina import Bridge, DeepenSite, GrowthNotApplicable, SeedSlot, WidenSite
from esper.leyline import EsperError, pb

HOST_KINDS = ("mlp", "cnn")
POOLED_SIDE = 2
POOLED_CELLS = POOLED_SIDE * POOLED_SIDE


class HostNotApplicable(EsperError):
    """The host cannot be built for this input (a CNN needs image-shaped samples)."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"host {host!r}: {reason}")


class Host(nn.Module):
    """A model with seed slots. `slot_kind` is the kind of its slots ("mlp" or "conv")."""

    slot_kind: str = ""

    def slots(self) -> list[SeedSlot]:
        """The host's slots, in forward order."""
        return [module for module in self.modules() if isinstance(module, SeedSlot)]

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        """(layer id, kind, width, module) of the host's own layers, in forward order."""
        raise NotImplementedError

    def widen_site(self, layer_id: str) -> WidenSite:
        """Where widening `layer_id` acts: the layer, the consumer of its activation, what lies between."""
        raise GrowthNotApplicable("widen", f"{type(self).__name__} declares no widen sites")

    def deepen_site(self, layer_id: str) -> DeepenSite:
        """Where a block inserted after `layer_id` goes: the output of the slot on its activation."""
        raise GrowthNotApplicable("deepen", f"{type(self).__name__} declares no deepen sites")

    def host_parameter_count(self) -> int:
        """Parameters of the host's own layers (seeds excluded)."""
        return sum(p.numel() for _, _, _, layer in self.host_layers() for p in layer.parameters())

    def parameter_count(self) -> int:
        """Every parameter now: host and seeds."""
        return sum(p.numel() for p in self.parameters())

    def topology(self) -> pb.HostTopology:
        """Layers (id, kind, width, depth, parameters) and slots (id, layer, width, kind)."""
        topology = pb.HostTopology()
        for depth, (layer_id, kind, width, layer) in enumerate(self.host_layers()):
            topology.layers.add(
                layer_id=layer_id,
                kind=kind,
                width=width,
                depth=depth,
                parameter_count=sum(p.numel() for p in layer.parameters()),
            )
        for slot in self.slots():
            topology.slots.add(slot_id=slot.slot_id, layer_id=slot.layer_id, width=slot.width, kind=slot.kind)
        return topology


class MLPHost(Host):
    """input -> [linear(width) -> ReLU -> slot] x depth -> linear(classes)."""

    slot_kind = "mlp"

    def __init__(
        self, input_size: int, num_classes: int, *, width: int = 12, depth: int = 2, with_slots: bool = True
    ) -> None:
        super().__init__()
        self.hidden = nn.ModuleList()
        self.slot_list = nn.ModuleList()
        self.with_slots = with_slots
        features = input_size
        for index in range(depth):
            self.hidden.append(nn.Linear(features, width))
            if with_slots:
                self.slot_list.append(
                    SeedSlot(f"h{index + 1}", width, "mlp", layer_id=f"fc{index + 1}", depth=index)
                )
            features = width
        self.head = nn.Linear(features, num_classes)

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        layers: list[tuple[str, str, int, nn.Module]] = [
            (f"fc{i + 1}", "linear", layer.out_features, layer)
            for i, layer in enumerate(self.hidden)
            if isinstance(layer, nn.Linear)
        ]
        layers.append(("head", "linear", self.head.out_features, self.head))
        return layers

    def _hidden_index(self, layer_id: str, operation: str) -> int:
        names = [f"fc{i + 1}" for i in range(len(self.hidden))]
        if layer_id not in names:
            raise GrowthNotApplicable(operation, f"no hidden layer {layer_id!r}; hidden layers are {names}")
        return names.index(layer_id)

    def widen_site(self, layer_id: str) -> WidenSite:
        index = self._hidden_index(layer_id, "widen")
        producer = self.hidden[index]
        consumer = self.hidden[index + 1] if index + 1 < len(self.hidden) else self.head
        assert isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)
        slot = self.slot_list[index] if self.with_slots else None
        assert slot is None or isinstance(slot, SeedSlot)
        return WidenSite(layer_id, producer, consumer, "relu", Bridge(), slot)

    def deepen_site(self, layer_id: str) -> DeepenSite:
        index = self._hidden_index(layer_id, "deepen")
        if not self.with_slots:
            raise GrowthNotApplicable("deepen", "a host without slots has no anchor for a block")
        layer = self.hidden[index]
        assert isinstance(layer, nn.Linear)
        return DeepenSite(layer_id, layer, self.slot_list[index], "linear", layer.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for `x` of shape [N, features] (or any shape that flattens to it)."""
        x = x.flatten(1)
        if self.with_slots:
            for layer, slot in zip(self.hidden, self.slot_list, strict=True):
                x = slot(torch.relu(layer(x)))
        else:
            for layer in self.hidden:
                x = torch.relu(layer(x))
        logits: Tensor = self.head(x)
        return logits


class ConvHost(Host):
    """conv(c1) -> ReLU -> slot -> conv(c2, stride 2) -> ReLU -> slot -> 2x2 average pool -> linear.

    The head sees a 2x2 average of the last feature map rather than a global average: a global average
    throws away where strokes are, and the host then learns so slowly that it never plateaus within a
    run, so the controller never has a reason to grow it.
    """

    slot_kind = "conv"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: tuple[int, int] = (6, 12),
        with_slots: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise HostNotApplicable("cnn", f"needs image samples [C, H, W], got shape {input_shape}")
        in_channels = input_shape[0]
        c1, c2 = channels
        self.with_slots = with_slots
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(c2 * POOLED_CELLS, num_classes)
        self.slot1 = SeedSlot("c1", c1, "conv", layer_id="conv1", depth=0) if with_slots else None
        self.slot2 = SeedSlot("c2", c2, "conv", layer_id="conv2", depth=1) if with_slots else None

    def host_layers(self) -> list[tuple[str, str, int, nn.Module]]:
        return [
            ("conv1", "conv", self.conv1.out_channels, self.conv1),
            ("conv2", "conv", self.conv2.out_channels, self.conv2),
            ("head", "linear", self.head.out_features, self.head),
        ]

    def widen_site(self, layer_id: str) -> WidenSite:
        if layer_id == "conv1":
            return WidenSite("conv1", self.conv1, self.conv2, "relu", Bridge(), self.slot1)
        if layer_id == "conv2":
            return WidenSite("conv2", self.conv2, self.head, "relu", Bridge(POOLED_SIDE), self.slot2)
        raise GrowthNotApplicable("widen", f"no widenable layer {layer_id!r}; choose conv1 or conv2")

    def deepen_site(self, layer_id: str) -> DeepenSite:
        anchors = {"conv1": (self.conv1, self.slot1), "conv2": (self.conv2, self.slot2)}
        if layer_id not in anchors:
            raise GrowthNotApplicable(
                "deepen", f"no layer {layer_id!r} to deepen after; choose conv1 or conv2"
            )
        layer, slot = anchors[layer_id]
        if slot is None:
            raise GrowthNotApplicable("deepen", "a host without slots has no anchor for a block")
        return DeepenSite(layer_id, layer, slot, "conv2d", layer.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for `x` of shape [N, C, H, W]."""
        x = torch.relu(self.conv1(x))
        if self.slot1 is not None:
            x = self.slot1(x)
        x = torch.relu(self.conv2(x))
        if self.slot2 is not None:
            x = self.slot2(x)
        pooled = nn.functional.adaptive_avg_pool2d(x, POOLED_SIDE).flatten(1)
        logits: Tensor = self.head(pooled)
        return logits


def build_host(
    host: str, input_shape: tuple[int, ...], num_classes: int, *, with_slots: bool = True, scale: float = 1.0
) -> Host:
    """The host named `host` ("mlp" or "cnn") for this input; `scale` widens it (for static baselines)."""
    if host == "mlp":
        return MLPHost(
            math.prod(input_shape), num_classes, width=max(1, round(12 * scale)), with_slots=with_slots
        )
    if host == "cnn":
        channels = (max(1, round(6 * scale)), max(1, round(12 * scale)))
        return ConvHost(input_shape, num_classes, channels=channels, with_slots=with_slots)
    raise HostNotApplicable(host, f"unknown host; choose one of {', '.join(HOST_KINDS)}")
