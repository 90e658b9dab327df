"""The seed modules behind the built-in blueprints.

Each module's output is a seed's *contribution*, which Kasmina blends into the host's activation. MLP
modules map `[N, width] -> [N, width]`; conv modules map `[N, C=width, H, W]` to the same shape, or, built
with `dims=1` for a 1-D slot, `[N, C=width, L]` to the same shape. Every
layer keeps PyTorch's default (non-zero) initialisation: a module whose output starts at exactly zero
gives its own parameters no gradient from a residual target, and the seed would never learn.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONV: dict[int, type[nn.Conv1d] | type[nn.Conv2d]] = {1: nn.Conv1d, 2: nn.Conv2d}


def _conv_class(dims: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    if dims not in _CONV:
        raise ValueError(f"convolutions are 1-D or 2-D, got dims={dims}")
    return _CONV[dims]


class SmallMLP(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Linear(width, hidden)
        self.project = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, width] -> [N, width]`."""
        out: torch.Tensor = self.project(nn.functional.gelu(self.expand(x)))
        return out


class LowRankLinear(nn.Module):
    """A linear map of rank `rank` (down-projection without bias, up-projection with bias)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, width] -> [N, width]`."""
        out: torch.Tensor = self.up(self.down(x))
        return out


class LowRankConv(nn.Module):
    """The per-pixel (1x1) version of `LowRankLinear` for feature maps."""

    def __init__(self, channels: int, rank: int, dims: int = 2) -> None:
        super().__init__()
        conv = _conv_class(dims)
        self.down = conv(channels, rank, kernel_size=1, bias=False)
        self.up = conv(rank, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, *spatial] -> [N, C, *spatial]`."""
        out: torch.Tensor = self.up(self.down(x))
        return out


class AttentionLite(nn.Module):
    """Single-head self-attention over `tokens` equal chunks of the feature vector.

    The width is split into `tokens` tokens of `width // tokens` features; a learned position embedding
    tells them apart; the attended tokens are joined again and projected back to the width.
    """

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.token_dim = width // tokens
        self.position = nn.Parameter(torch.randn(tokens, self.token_dim) * 0.02)
        self.qkv = nn.Linear(self.token_dim, 3 * self.token_dim)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, width] -> [N, width]`."""
        batch = x.shape[0]
        tokens = x.reshape(batch, self.tokens, self.token_dim) + self.position
        query, key, value = self.qkv(tokens).chunk(3, dim=-1)
        weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(self.token_dim), dim=-1)
        out: torch.Tensor = self.out((weights @ value).reshape(batch, self.tokens * self.token_dim))
        return out


class ResidualConvBlock(nn.Module):
    """Two 3x3 convolutions with a ReLU between them (the residual branch of a ResNet block)."""

    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        conv = _conv_class(dims)
        self.first = conv(channels, channels, kernel_size=3, padding=1)
        self.second = conv(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, *spatial] -> [N, C, *spatial]`."""
        out: torch.Tensor = self.second(torch.relu(self.first(x)))
        return out


class DepthwiseSeparableConv(nn.Module):
    """A depthwise k x k convolution, a ReLU, then a pointwise 1x1 convolution."""

    def __init__(self, channels: int, kernel_size: int, dims: int = 2) -> None:
        super().__init__()
        conv = _conv_class(dims)
        self.depthwise = conv(
            channels, channels, kernel_size=kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.pointwise = conv(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, *spatial] -> [N, C, *spatial]`."""
        out: torch.Tensor = self.pointwise(torch.relu(self.depthwise(x)))
        return out


class BottleneckConv(nn.Module):
    """1x1 reduce, 3x3 at the reduced width, 1x1 expand, with ReLUs between."""

    def __init__(self, channels: int, hidden: int, dims: int = 2) -> None:
        super().__init__()
        conv = _conv_class(dims)
        self.reduce = conv(channels, hidden, kernel_size=1)
        self.spatial = conv(hidden, hidden, kernel_size=3, padding=1)
        self.expand = conv(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, *spatial] -> [N, C, *spatial]`."""
        out: torch.Tensor = self.expand(torch.relu(self.spatial(torch.relu(self.reduce(x)))))
        return out


class SqueezeExcitation(nn.Module):
    """Channel attention: the input rescaled per channel by gates computed from its global average."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, *spatial] -> [N, C, *spatial]`."""
        spatial = tuple(range(2, x.dim()))
        gates = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(dim=spatial)))))
        return x * gates.reshape(*gates.shape, *(1,) * len(spatial))
