"""Load a model that Esper exported, with plain PyTorch: no seed machinery, no Esper needed.

This file imports only torch, safetensors and the standard library: copy it next to your code and
`load("exported/")` returns an `nn.Module` that computes what the grown model computed. The spec format
(`model.json`) is described in `esper.tolaria.export`; this loader reads version 1.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

SPEC_FORMAT = "esper-model"
SPEC_VERSION = 1


class PortableError(ValueError):
    """The spec cannot be rebuilt: a wrong format, a version this loader does not read, an unknown kind."""


class Sequential(nn.Sequential):
    """Layers in order."""


class Residual(nn.Module):
    """`x + body(x)`."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.body(x)
        return out


class ChannelFirst(nn.Module):
    """`body` applied to `[N, C, T]`, for activations held as `[N, T, C]`."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x.transpose(1, 2)).transpose(1, 2)
        return out


class Seed(nn.Module):
    """A fossilised seed: `x + gate * body(x)` (gate: none, per channel, or per-sample confidence)."""

    def __init__(self, body: nn.Module, gate: dict[str, Any], width: int | None) -> None:
        super().__init__()
        self.body = body
        self.gate = dict(gate)
        if self.gate["kind"] == "channel":
            self.register_buffer("gates", torch.zeros(width or 0))
        elif self.gate["kind"] not in ("none", "confidence"):
            raise PortableError(f"unknown seed gate {self.gate['kind']!r}")

    def forward(self, x: Tensor) -> Tensor:
        s: Tensor = self.body(x)
        kind = self.gate["kind"]
        if kind == "none":
            return x + s
        if kind == "channel":
            gates: Tensor = self.get_buffer("gates")
            return x + (1.0 * gates.reshape((1, s.shape[1]) + (1,) * (s.dim() - 2))) * s
        pooled = s.flatten(2).mean(dim=2) if s.dim() > 2 else s
        confidence = torch.softmax(pooled, dim=1).amax(dim=1)
        g = self.gate
        scale = g["lo"] + (g["hi"] - g["lo"]) * torch.sigmoid(g["k"] * (confidence - g["tau"]))
        out: Tensor = x + (1.0 * scale).reshape((s.shape[0],) + (1,) * (s.dim() - 1)) * s
        return out


class Lambda(nn.Module):
    """A parameter-free function of the spec (activation, flatten, pool, mean)."""

    def __init__(self, node: dict[str, Any]) -> None:
        super().__init__()
        self.node = dict(node)

    def extra_repr(self) -> str:
        return repr(self.node)

    def forward(self, x: Tensor) -> Tensor:  # noqa: PLR0911 (a dispatch on the spec's closed list of functions)
        node = self.node
        kind = node["kind"]
        if kind == "relu":
            return torch.relu(x)
        if kind == "gelu":
            return nn.functional.gelu(x)
        if kind == "tanh":
            return torch.tanh(x)
        if kind == "sigmoid":
            return torch.sigmoid(x)
        if kind == "identity":
            return x
        if kind == "flatten":
            return x.flatten(int(node["start_dim"]))
        if kind == "mean":
            return x.mean(dim=int(node["dim"]))
        if kind == "adaptive_avg_pool":
            pool = (
                nn.functional.adaptive_avg_pool1d if node["dims"] == 1 else nn.functional.adaptive_avg_pool2d
            )
            return pool(x, int(node["size"]))
        pool_max = nn.functional.max_pool1d if node["dims"] == 1 else nn.functional.max_pool2d
        out: Tensor = pool_max(x, node["kernel"], node["stride"], node["padding"])
        return out


class TokenEmbedding(nn.Module):
    """Token ids `[N, T]` to token plus position embeddings `[N, T, dim]`."""

    def __init__(self, vocab: int, length: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)

    def forward(self, ids: Tensor) -> Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        out: Tensor = self.tokens(ids) + self.positions(where)[None]
        return out


class SelfAttention(nn.Module):
    """Batch-first multi-head self-attention `[N, T, dim] -> [N, T, dim]`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.attention(x, x, x, need_weights=False)[0]
        return out


class AttentionLite(nn.Module):
    """Single-head attention over `tokens` chunks of a feature vector (a seed body)."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.token_dim = width // tokens
        self.position = nn.Parameter(torch.zeros(tokens, self.token_dim))
        self.qkv = nn.Linear(self.token_dim, 3 * self.token_dim)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        tokens = x.reshape(batch, self.tokens, self.token_dim) + self.position
        query, key, value = self.qkv(tokens).chunk(3, dim=-1)
        weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(self.token_dim), dim=-1)
        out: Tensor = self.out((weights @ value).reshape(batch, self.tokens * self.token_dim))
        return out


class SqueezeExcite(nn.Module):
    """The input rescaled per channel by gates computed from its global average (a seed body)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        spatial = tuple(range(2, x.dim()))
        gates = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(dim=spatial)))))
        return x * gates.reshape(*gates.shape, *(1,) * len(spatial))


class BatchNorm(nn.Module):
    """Batch normalisation with its running statistics (inference)."""

    def __init__(self, features: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        assert norm.running_mean is not None and norm.running_var is not None
        return nn.functional.batch_norm(
            x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
        )


_CALLS: dict[str, Any] = {
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "flatten": torch.flatten,
    "cat": torch.cat,
}
_METHODS = frozenset(
    {
        "relu",
        "tanh",
        "sigmoid",
        "flatten",
        "view",
        "reshape",
        "mean",
        "sum",
        "transpose",
        "permute",
        "add",
        "mul",
    }
)


class Graph(nn.Module):
    """A traced forward: spec layers and a closed set of tensor functions, run in order."""

    def __init__(self, node: dict[str, Any], where: str) -> None:
        super().__init__()
        self.inputs = list(node["inputs"])
        self.steps = [dict(step) for step in node["nodes"]]
        self.output = str(node["output"])
        modules: list[nn.Module] = []
        for step in self.steps:
            op = step["op"]
            if op == "module":
                if step["layer"] != len(modules):
                    raise PortableError(f"{where}: graph layers out of order at {step['name']!r}")
                modules.append(build_node(step["module"], f"{where}.layers.{len(modules)}"))
            elif op not in ("function", "method"):
                raise PortableError(f"{where}: unknown graph step {op!r}")
            elif step["target"] not in (_CALLS if op == "function" else _METHODS):
                raise PortableError(f"{where}: unknown {op} {step['target']!r} in a graph")
        self.layers = nn.ModuleList(modules)

    def forward(self, *args: Tensor) -> Any:
        values: dict[str, Any] = dict(zip(self.inputs, args, strict=True))

        def resolve(value: Any) -> Any:
            if isinstance(value, dict):
                return values[value["ref"]]
            if isinstance(value, list):
                return [resolve(item) for item in value]
            return value

        for step in self.steps:
            call_args = resolve(step["args"])
            kwargs = {key: resolve(value) for key, value in step["kwargs"].items()}
            op = step["op"]
            if op == "module":
                out = self.layers[step["layer"]](*call_args, **kwargs)
            elif op == "function":
                out = _CALLS[step["target"]](*call_args, **kwargs)
            else:
                out = getattr(call_args[0], step["target"])(*call_args[1:], **kwargs)
            values[step["name"]] = out
        return values[self.output]


_FUNCTIONS = (
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "identity",
    "flatten",
    "mean",
    "adaptive_avg_pool",
    "max_pool",
)


def _width(node: dict[str, Any]) -> int | None:
    """The output width of a seed body (for a channel gate's buffer)."""
    if node["kind"] in ("linear", "conv1d", "conv2d"):
        return int(node["out"])
    if node["kind"] == "sequential":
        widths = [_width(layer) for layer in node["layers"]]
        known = [w for w in widths if w is not None]
        return known[-1] if known else None
    if node["kind"] == "attention_lite":
        return int(node["width"])
    if node["kind"] == "squeeze_excite":
        return int(node["channels"])
    return None


def build_node(node: dict[str, Any], where: str = "model") -> nn.Module:  # noqa: C901, PLR0911, PLR0912 (a dispatch on the spec's closed list of kinds; the loader stays one self-contained file)
    """The module for one spec node (see `esper.tolaria.export` for the kinds)."""
    if not isinstance(node, dict) or "kind" not in node:
        raise PortableError(f"{where}: a node must be an object with a 'kind'")
    kind = node["kind"]
    if kind == "sequential":
        return Sequential(*(build_node(layer, f"{where}.{i}") for i, layer in enumerate(node["layers"])))
    if kind == "graph":
        graph: nn.Module = Graph(node, where)
        return graph
    if kind == "residual":
        return Residual(build_node(node["body"], f"{where}.body"))
    if kind == "channel_first":
        return ChannelFirst(build_node(node["body"], f"{where}.body"))
    if kind == "seed":
        return Seed(build_node(node["body"], f"{where}.body"), node["gate"], _width(node["body"]))
    if kind == "linear":
        return nn.Linear(node["in"], node["out"], bias=node["bias"])
    if kind in ("conv1d", "conv2d"):
        conv = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        return conv(
            node["in"],
            node["out"],
            tuple(node["kernel"]),
            stride=tuple(node["stride"]),
            padding=tuple(node["padding"]),
            dilation=tuple(node["dilation"]),
            groups=node["groups"],
            bias=node["bias"],
        )
    if kind in _FUNCTIONS:
        return Lambda(node)
    if kind == "layer_norm":
        return nn.LayerNorm(node["shape"], eps=node["eps"], elementwise_affine=node["affine"])
    if kind == "batch_norm":
        return BatchNorm(node["features"], node["eps"])
    if kind == "token_embedding":
        return TokenEmbedding(node["vocab"], node["length"], node["dim"])
    if kind == "self_attention":
        return SelfAttention(node["dim"], node["heads"])
    if kind == "attention_lite":
        return AttentionLite(node["width"], node["tokens"])
    if kind == "squeeze_excite":
        return SqueezeExcite(node["channels"], node["hidden"])
    raise PortableError(
        f"{where}: unknown layer kind {kind!r}; this loader reads spec version {SPEC_VERSION}"
    )


def build(spec: dict[str, Any]) -> nn.Module:
    """The model a spec document describes, with freshly initialised weights (load them next)."""
    if spec.get("format") != SPEC_FORMAT:
        raise PortableError(f"not an Esper model spec (format {spec.get('format')!r}, want {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise PortableError(f"spec version {spec.get('version')!r}; this loader reads version {SPEC_VERSION}")
    return build_node(spec["model"])


def load(directory: str | Path, *, device: str = "cpu") -> nn.Module:
    """The exported model in `directory` (`model.json` and its weights), in eval mode."""
    root = Path(directory)
    spec = json.loads((root / "model.json").read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise PortableError(f"{root / 'model.json'} is not a JSON object")
    model = build(spec)
    tensors = load_file(str(root / str(spec.get("weights", "model.safetensors"))), device=device)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


__all__ = ["SPEC_FORMAT", "SPEC_VERSION", "PortableError", "build", "build_node", "load"]
