"""Hosts and data for the growth tests: the real hosts (MLP, 2-D CNN, 1-D CNN, Transformer), and a small
1-D CNN without slots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esper.kasmina import Bridge, DeepenSite, WidenSite
from esper.tolaria.hosts import Conv1dHost as SequenceHost
from esper.tolaria.hosts import ConvHost, MLPHost, TransformerHost

# (host kind, layer id): every producer/consumer pairing the hosts have.
WIDEN_CASES = [
    ("mlp", "fc1"),  # Linear -> Linear
    ("mlp", "fc2"),  # Linear -> head
    ("cnn", "conv1"),  # Conv2d -> Conv2d (stride 2, padding 1)
    ("cnn", "conv2"),  # Conv2d -> pool -> flatten -> Linear
    ("conv1d", "conv1"),  # Conv1d -> Conv1d
    ("conv1d", "conv2"),  # Conv1d -> pool -> flatten -> Linear
    ("sequence", "conv1"),  # the 1-D CNN host: Conv1d -> Conv1d
    ("sequence", "conv2"),  # the 1-D CNN host: Conv1d -> pool -> flatten -> Linear
    ("transformer", "ff1"),  # Linear -> Linear on every token [N, T, C]
]
CASE_IDS = [f"{kind}-{layer}" for kind, layer in WIDEN_CASES]


class Conv1dHost(nn.Module):
    """conv1d(4) -> ReLU -> conv1d(6, stride 2) -> ReLU -> average pool to 3 cells -> linear(classes)."""

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, 4, kernel_size=3, padding=1)
        self.after1 = nn.Identity()
        self.conv2 = nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.after2 = nn.Identity()
        self.head = nn.Linear(6 * 3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.after1(torch.relu(self.conv1(x)))
        x = self.after2(torch.relu(self.conv2(x)))
        out: Tensor = self.head(nn.functional.adaptive_avg_pool1d(x, 3).flatten(1))
        return out

    def widen_site(self, layer_id: str) -> WidenSite:
        if layer_id == "conv1":
            return WidenSite("conv1", self.conv1, self.conv2, "relu", Bridge(), None)
        return WidenSite("conv2", self.conv2, self.head, "relu", Bridge(3), None)

    def deepen_site(self, layer_id: str) -> DeepenSite:
        layer, anchor = (self.conv1, self.after1) if layer_id == "conv1" else (self.conv2, self.after2)
        return DeepenSite(layer_id, layer, anchor, "conv1d", layer.out_channels)


@dataclass
class Case:
    """A host, where it grows, and a batch with labels."""

    host: nn.Module
    widen_site: Callable[[str], WidenSite]
    deepen_site: Callable[[str], DeepenSite]
    x: Tensor
    y: Tensor

    def loss(self) -> Tensor:
        """Cross-entropy of the host on the case's batch."""
        return nn.functional.cross_entropy(self.host(self.x), self.y)


def make_case(kind: str, seed: int = 0, batch: int = 32) -> Case:
    """A freshly initialised host of `kind` with a seeded batch (the same for the same seed)."""
    torch.manual_seed(seed)
    host: MLPHost | ConvHost | Conv1dHost | SequenceHost | TransformerHost
    if kind == "transformer":
        host = TransformerHost(7, 10, 3, d_model=4, heads=2, ff_hidden=5)
        x = torch.randint(0, 10, (batch, 7))
    elif kind == "sequence":
        host = SequenceHost((2, 12), 3, channels=(3, 5))
        x = torch.randn(batch, 2, 12)
    elif kind == "mlp":
        host = MLPHost(10, 3, width=6, depth=2)
        x = torch.randn(batch, 10)
    elif kind == "cnn":
        host = ConvHost((1, 8, 8), 3, channels=(4, 6))
        x = torch.randn(batch, 1, 8, 8)
    else:
        host = Conv1dHost()
        x = torch.randn(batch, 2, 12)
    y = torch.randint(0, 3, (batch,))
    return Case(host, host.widen_site, host.deepen_site, x, y)
