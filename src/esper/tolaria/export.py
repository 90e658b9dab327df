# Over 500 lines: one walk over a grown host, a case per layer kind the spec knows.
"""Export a grown model as plain weights: safetensors, a JSON architecture spec, and a model card.

The spec describes the function the grown host computes, as a tree of plain layers, with no seed
machinery: a fossilised seed is a `seed` node (`x + gate * body(x)`), a kept deepen block a `residual`
node, a merged widen is simply the wider layers; dormant slots leave nothing. `esper.portable` (which
imports only torch, safetensors and json) rebuilds the model from the spec, and the tensors' names are
that rebuilt model's state-dict names, so loading is a strict `load_state_dict`.

Spec format (`model.json`), version `SPEC_VERSION`:

    {"format": "esper-model", "version": 1, "weights": "model.safetensors", "model": NODE}

A NODE is an object with a `kind` and, by kind:

- `sequential` {layers: [NODE]}; `residual` {body: NODE} (`x + body(x)`); `channel_first` {body: NODE}
  (`body(x.transpose(1, 2)).transpose(1, 2)`);
- `linear` {in, out, bias}; `conv1d` / `conv2d` {in, out, kernel, stride, padding, dilation, groups, bias};
- `relu`, `gelu`, `tanh`, `sigmoid`, `identity`; `flatten` {start_dim}; `adaptive_avg_pool` {dims, size};
  `max_pool` {dims, kernel, stride, padding}; `mean` {dim};
- `layer_norm` {shape, eps, affine}; `batch_norm` {dims, features, eps};
- `token_embedding` {vocab, length, dim} (token plus learned position embedding);
  `self_attention` {dim, heads} (batch-first multi-head self-attention);
- `graph` {inputs: [name], nodes: [STEP], output: name}: a traced forward; a STEP is {name, op, args,
  kwargs} with op `module` (and `layer`: its index, `module`: NODE), `function` or `method` (and
  `target`, from a closed list); an argument `{"ref": name}` is a value computed earlier;
- `seed` {body: NODE, gate: {kind: "none"} | {kind: "channel"} | {kind: "confidence", k, tau, lo, hi}};
  `attention_lite` {width, tokens}; `squeeze_excite` {channels, hidden} (seed bodies).

A node's tensors are named by its path in the rebuilt model (`3.body.1.weight`).
"""

from __future__ import annotations

import json
import operator
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors
from torch import Tensor, fx, nn

from esper.kasmina import (
    GrowthMode,
    IdentityBlock,
    KasminaSettings,
    SeedManager,
    SeedModule,
    SeedSlot,
    SlotMode,
)
from esper.leyline import EsperError, SignatureVerifier, pb
from esper.leyline.files import write_atomically
from esper.tolaria.adapt import AdaptedHost, GrowthPoint
from esper.tolaria.checkpoint import CheckpointError, CheckpointStore
from esper.tolaria.hosts import EncoderBlock, Host, MLPHost, TransformerHost, _TwoConvHost, build_host
from esper.tolaria.run import RunConfig, load_task
from esper.urza import BlueprintCatalogue
from esper.urza.modules import (
    AttentionLite,
    BottleneckConv,
    DepthwiseSeparableConv,
    LowRankConv,
    LowRankLinear,
    ResidualConvBlock,
    SmallMLP,
    SqueezeExcitation,
)

SPEC_FORMAT = "esper-model"
SPEC_VERSION = 1
SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
GROWN_MODEL_DIR = "model"
"""Where a run of a user's own model (`esper.grow`) keeps its final model, exported when it ends: the
run directory cannot rebuild the user's classes, so `export_run` copies this export."""
USER_HOST = "user"
"""The host name in `config.json` of a run of a user's own model."""

Node = dict[str, Any]


class ExportError(EsperError):
    """The model or run cannot be exported (what, and why); nothing was written."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"cannot export {what}: {reason}")


class _Writer:
    """Walks a grown host and writes its spec tree and tensors (named by path in the rebuilt model)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    @staticmethod
    def _at(write: Callable[[Any, str], Node | None], module: Any, path: str) -> Node | None:
        """`write(module, path)`: binds a module now and its path later (see `sequence`)."""
        return write(module, path)

    def keep(self, path: str, module: nn.Module) -> None:
        """`module`'s tensors, named as the rebuilt module at `path` names them."""
        for name, value in module.state_dict().items():
            self.tensors[_join(path, name)] = value.detach().clone().contiguous()

    def sequence(self, path: str, parts: list[Callable[[str], Node | None]]) -> Node:
        """A `sequential` node of the parts that produce something (a dormant slot produces nothing)."""
        layers: list[Node] = []
        for part in parts:
            node = part(_join(path, str(len(layers))))
            if node is not None:
                layers.append(node)
        return {"kind": "sequential", "layers": layers}

    def layer(self, module: nn.Module, path: str) -> Node:  # noqa: PLR0911 (a dispatch on the layer kinds the spec knows)
        """A plain module (or an `nn.Sequential` of them) as a node."""
        if isinstance(module, nn.Sequential):
            return self.sequence(path, [partial(self._at, self.layer_or_point, m) for m in module])
        if isinstance(module, nn.Linear):
            self.keep(path, module)
            return {
                "kind": "linear",
                "in": module.in_features,
                "out": module.out_features,
                "bias": module.bias is not None,
            }
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ExportError(
                    path or "model", f"convolution pads with {module.padding_mode!r}/{module.padding!r}"
                )
            self.keep(path, module)
            return {
                "kind": "conv1d" if isinstance(module, nn.Conv1d) else "conv2d",
                "in": module.in_channels,
                "out": module.out_channels,
                "kernel": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": list(module.padding),
                "dilation": list(module.dilation),
                "groups": module.groups,
                "bias": module.bias is not None,
            }
        simple = {
            nn.ReLU: "relu",
            nn.Tanh: "tanh",
            nn.Sigmoid: "sigmoid",
            nn.Identity: "identity",
            nn.Dropout: "identity",
        }
        if type(module) in simple:
            return {"kind": simple[type(module)]}
        if isinstance(module, nn.GELU) and module.approximate == "none":
            return {"kind": "gelu"}
        if isinstance(module, nn.Flatten) and module.end_dim == -1:
            return {"kind": "flatten", "start_dim": module.start_dim}
        if isinstance(module, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d) and isinstance(
            module.output_size, int
        ):
            return {
                "kind": "adaptive_avg_pool",
                "dims": 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2,
                "size": module.output_size,
            }
        if (
            isinstance(module, nn.MaxPool1d | nn.MaxPool2d)
            and module.dilation in (1, (1, 1))
            and not module.ceil_mode
        ):
            return {
                "kind": "max_pool",
                "dims": 1 if isinstance(module, nn.MaxPool1d) else 2,
                "kernel": module.kernel_size,
                "stride": module.stride,
                "padding": module.padding,
            }
        if isinstance(module, nn.LayerNorm):
            self.keep(path, module)
            return {
                "kind": "layer_norm",
                "shape": list(module.normalized_shape),
                "eps": module.eps,
                "affine": module.elementwise_affine,
            }
        if (
            isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
            and module.affine
            and module.track_running_stats
        ):
            self.keep(_join(path, "norm"), module)
            return {
                "kind": "batch_norm",
                "dims": 1 if isinstance(module, nn.BatchNorm1d) else 2,
                "features": module.num_features,
                "eps": module.eps,
            }
        raise ExportError(
            path or "model",
            f"{type(module).__name__} is not a layer the spec knows (a module with its own forward cannot "
            "be described; use nn.Sequential of standard layers, or GrowthPoint in an nn.Sequential)",
        )

    def layer_or_point(self, module: nn.Module, path: str) -> Node | None:
        if isinstance(module, GrowthPoint):
            return None if module.slot is None else self.slot(module.slot, path)
        return self.layer(module, path)

    # -- what Esper grew ------------------------------------------------------------------------------------

    def slot(self, slot: SeedSlot | None, path: str) -> Node | None:
        """A slot's stacked fossils (oldest first), its fossilised seed and the blocks kept after it;
        None when nothing grew there."""
        if slot is None:
            return None
        parts: list[Callable[[str], Node | None]] = [
            partial(self._at, self.seed_node, kept) for kept in slot.stacked if isinstance(kept, SeedModule)
        ]
        if slot.seed is not None:
            if slot.mode != SlotMode.FOSSIL:
                raise ExportError(
                    f"slot {slot.slot_id!r}",
                    f"its seed is still in its lifecycle ({slot.mode.name}); only "
                    "fossilised seeds are part of the model (export at the end of the run)",
                )
            parts.append(partial(self._at, self.seed_node, slot.seed))
        for hook in slot._forward_hooks.values():
            block = getattr(hook, "__self__", None)
            if not isinstance(block, IdentityBlock):
                raise ExportError(
                    f"slot {slot.slot_id!r}", f"a forward hook {hook!r} that is not a kept block"
                )
            parts.append(partial(self._at, self.block, block))
        if not parts:
            return None
        node = self.sequence(path, parts)
        return node

    def block(self, block: IdentityBlock, path: str) -> Node:
        if block.mode != GrowthMode.LIVE:
            raise ExportError("a deepen block", f"it is still in its lifecycle ({block.mode.name})")
        body = path + ".body"
        return {
            "kind": "residual",
            "body": self.sequence(
                body,
                [
                    lambda p: self.layer(block.expand, p),
                    lambda p: {"kind": block.activation},
                    lambda p: self.layer(block.project, p),
                ],
            ),
        }

    def seed_node(self, seed: SeedModule, path: str) -> Node:
        """A fossilised (or stacked) seed: `x + gate * body(x)`."""
        blender = seed.blender
        gate: Node
        if blender.mode in (pb.BLEND_MODE_RESIDUAL, pb.BLEND_MODE_CONVEX):
            gate = {"kind": "none"}
        elif blender.mode == pb.BLEND_MODE_CHANNEL:
            assert blender.channel_logits is not None
            gate = {"kind": "channel"}
            self.tensors[path + ".gates"] = torch.sigmoid(blender.channel_logits.detach()).clone()
        else:
            c = blender.confidence
            gate = {"kind": "confidence", "k": c.k, "tau": c.tau, "lo": c.alpha_lo, "hi": c.alpha_hi}
        return {"kind": "seed", "gate": gate, "body": self.body(seed.body, path + ".body")}

    def body(self, body: nn.Module, path: str) -> Node:
        """A seed's body (an Urza blueprint's module) as a node."""
        relu: Callable[[str], Node] = lambda p: {"kind": "relu"}  # noqa: E731
        chains: dict[type[nn.Module], list[Any]] = {
            SmallMLP: ["expand", lambda p: {"kind": "gelu"}, "project"],
            LowRankLinear: ["down", "up"],
            LowRankConv: ["down", "up"],
            ResidualConvBlock: ["first", relu, "second"],
            DepthwiseSeparableConv: ["depthwise", relu, "pointwise"],
            BottleneckConv: ["reduce", relu, "spatial", relu, "expand"],
        }
        if type(body) in chains:
            parts = [
                (lambda p, n=part: self.layer(getattr(body, n), p)) if isinstance(part, str) else part
                for part in chains[type(body)]
            ]
            return self.sequence(path, parts)
        if isinstance(body, AttentionLite):
            self.keep(path, body)
            return {"kind": "attention_lite", "width": body.out.in_features, "tokens": body.tokens}
        if isinstance(body, SqueezeExcitation):
            self.keep(path, body)
            return {
                "kind": "squeeze_excite",
                "channels": body.squeeze.in_features,
                "hidden": body.squeeze.out_features,
            }
        return self.layer(body, path)

    # -- the hosts ------------------------------------------------------------------------------------------

    def host(self, host: Host) -> Node:
        _check_no_growth_in_flight(host)
        if isinstance(host, MLPHost):
            parts: list[Callable[[str], Node | None]] = [lambda p: {"kind": "flatten", "start_dim": 1}]
            slots = list(host.slot_list) if host.with_slots else [None] * len(host.hidden)
            for layer, slot in zip(host.hidden, slots, strict=True):
                parts += [
                    partial(self._at, self.layer, layer),
                    lambda p: {"kind": "relu"},
                    partial(self._at, self.slot, slot),
                ]
            parts.append(lambda p: self.layer(host.head, p))
            return self.sequence("", parts)
        if isinstance(host, _TwoConvHost):
            dims = host.sample_dims - 1
            return self.sequence(
                "",
                [
                    lambda p: self.layer(host.conv1, p),
                    lambda p: {"kind": "relu"},
                    lambda p: self.slot(host.slot1, p),
                    lambda p: self.layer(host.conv2, p),
                    lambda p: {"kind": "relu"},
                    lambda p: self.slot(host.slot2, p),
                    lambda p: {"kind": "adaptive_avg_pool", "dims": dims, "size": host.pooled},
                    lambda p: {"kind": "flatten", "start_dim": 1},
                    lambda p: self.layer(host.head, p),
                ],
            )
        if isinstance(host, TransformerHost):
            parts = [lambda p: self.embedding(host, p)]
            parts += [
                partial(self._at, self.encoder_block, b) for b in host.blocks if isinstance(b, EncoderBlock)
            ]
            parts += [lambda p: {"kind": "mean", "dim": 1}, lambda p: self.layer(host.head, p)]
            return self.sequence("", parts)
        if isinstance(host, AdaptedHost):
            if isinstance(host.model, nn.Sequential):
                return self.layer(host.model, "")
            return self.graph(host.model, "")
        raise ExportError(type(host).__name__, "no spec is known for this host")

    def graph(self, model: nn.Module, path: str) -> Node:
        """A module with its own forward, traced into a `graph` node of spec layers and calls."""
        return _graph_node(self, model, path)

    def embedding(self, host: TransformerHost, path: str) -> Node:
        embed = host.embed
        self.keep(path, embed)
        return {
            "kind": "token_embedding",
            "vocab": embed.tokens.num_embeddings,
            "length": embed.positions.num_embeddings,
            "dim": embed.tokens.embedding_dim,
        }

    def encoder_block(self, block: EncoderBlock, path: str) -> Node:
        attention = block.attention

        def attend(p: str) -> Node:
            self.keep(p + ".attention", attention.attention)
            return {
                "kind": "self_attention",
                "dim": attention.attention.embed_dim,
                "heads": attention.attention.num_heads,
            }

        def channel_first(slot: SeedSlot | None, p: str) -> Node | None:
            inner = self.slot(slot, p + ".body")
            return None if inner is None else {"kind": "channel_first", "body": inner}

        first: Callable[[str], Node] = lambda p: {  # noqa: E731
            "kind": "residual",
            "body": self.sequence(p + ".body", [lambda q: self.layer(attention.norm, q), attend]),
        }
        second: Callable[[str], Node] = lambda p: {  # noqa: E731
            "kind": "residual",
            "body": self.sequence(
                p + ".body",
                [
                    lambda q: self.layer(block.norm, q),
                    lambda q: self.layer(block.ff, q),
                    lambda q: {"kind": "relu"},
                    lambda q: channel_first(block.hidden_slot, q),
                    lambda q: self.layer(block.proj, q),
                ],
            ),
        }
        return self.sequence(path, [first, second, lambda p: channel_first(block.output_slot, p)])


class _LeafTracer(fx.Tracer):
    """Traces a user's forward; growth points and standard layers stay whole (one node each)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GrowthPoint) or super().is_leaf_module(m, module_qualified_name)


# What a traced forward may call, by the name the spec gives it (`esper.portable` maps them back).
_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    nn.functional.relu: "relu",
    nn.functional.gelu: "gelu",
    torch.tanh: "tanh",
    nn.functional.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    nn.functional.sigmoid: "sigmoid",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "truediv",
    torch.flatten: "flatten",
    torch.cat: "cat",
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


def _argument(value: Any, where: str) -> Any:
    """A traced call's argument as JSON: a value computed earlier is `{"ref": name}`."""
    if isinstance(value, fx.Node):
        return {"ref": value.name}
    if isinstance(value, tuple | list):
        return [_argument(item, where) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ExportError(where, f"an argument of type {type(value).__name__} cannot be written to the spec")


def _graph_node(writer: _Writer, model: nn.Module, path: str) -> Node:
    try:
        traced = _LeafTracer().trace(model)
    except Exception as exc:
        raise ExportError(
            type(model).__name__, f"its forward cannot be traced ({type(exc).__name__}: {exc})"
        ) from exc
    inputs: list[str] = []
    steps: list[Node] = []
    output = ""
    layers = 0
    for node in traced.nodes:
        where = f"{type(model).__name__}: {node.name}"
        if node.op == "placeholder":
            if node.args:
                raise ExportError(where, "a forward argument with a default value")
            inputs.append(node.name)
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node):
                raise ExportError(where, "the forward must return one tensor")
            output = result.name
            continue
        args = _argument(list(node.args), where)
        kwargs = {key: _argument(value, where) for key, value in node.kwargs.items()}
        step: Node = {"name": node.name, "args": args, "kwargs": kwargs}
        if node.op == "call_module":
            assert isinstance(node.target, str)
            module = model.get_submodule(node.target)
            layer_path = _join(path, f"layers.{layers}")
            written = writer.layer_or_point(module, layer_path)
            step.update(op="module", layer=layers, module=written or {"kind": "identity"})
            layers += 1
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            step.update(op="function", target=_FUNCTIONS[node.target])
        elif node.op == "call_method" and node.target in _METHODS:
            step.update(op="method", target=node.target)
        else:
            raise ExportError(
                where,
                f"{node.op} {getattr(node.target, '__name__', node.target)!r} is not something the spec can "
                f"describe (functions: {sorted(set(_FUNCTIONS.values()))}; methods: {sorted(_METHODS)})",
            )
        steps.append(step)
    return {"kind": "graph", "inputs": inputs, "nodes": steps, "output": output}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_no_growth_in_flight(host: Host) -> None:
    """Refuse a host with a widen not merged, or a hook Esper did not put there as a kept block."""
    for name, module in host.named_modules():
        if isinstance(module, SeedSlot):
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            raise ExportError(
                name or "model", "a growth is still in its lifecycle there (or a foreign hook is attached)"
            )


def model_spec(host: Host) -> tuple[Node, dict[str, Tensor]]:
    """The spec document of `host`'s grown function, and its tensors (see the module doc)."""
    writer = _Writer()
    model = writer.host(host)
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "weights": WEIGHTS_FILE, "model": model}
    return spec, writer.tensors


def export_model(host: Host, out_dir: Path, card: dict[str, Any] | None = None) -> Path:
    """Write `host` to `out_dir` as `model.safetensors`, `model.json` and `model_card.json`."""
    spec, tensors = model_spec(host)
    card = dict(card or {})
    card.setdefault(
        "parameters", sum(t.numel() for k, t in tensors.items() if not k.endswith("num_batches_tracked"))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / WEIGHTS_FILE, save_tensors({k: v.cpu() for k, v in tensors.items()}))
    write_atomically(out_dir / SPEC_FILE, (json.dumps(spec, indent=2) + "\n").encode())
    write_atomically(out_dir / CARD_FILE, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return out_dir


# -- from a run directory -------------------------------------------------------------------------------


def final_host(run_dir: Path) -> tuple[Host, int]:
    """The run's final model: its newest checkpoint restored, then the end of run applied (every seed or
    growth not fossilised taken out, as the trainer does after its last checkpoint). Returns it with the
    checkpoint's step."""

    if not run_dir.is_dir():
        raise ExportError(str(run_dir), "no such directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(str(run_dir), "no config.json: not a run directory")
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir() or not any(checkpoints.glob("ckpt-*.json")):
        raise ExportError(str(run_dir), "the run has no checkpoint to export (it never saved one)")
    try:
        config = RunConfig.from_json(json.loads(config_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(str(config_path), f"not a run configuration: {exc}") from exc
    settings = config.tolaria
    dataset = load_task(config.task, config.host, seed=settings.seed, difficulty=config.difficulty)
    host = build_host(
        config.host,
        dataset.input_shape,
        dataset.num_classes,
        vocab_size=dataset.vocab_size,
        width=settings.host_width,
    )
    try:
        checkpoint = CheckpointStore(checkpoints).latest()
    except CheckpointError as exc:
        raise ExportError(str(run_dir), str(exc)) from exc
    if checkpoint is None:
        raise ExportError(str(run_dir), "the run has no checkpoint to export")
    restore_final(
        host, config.kasmina, config.training_run_id, checkpoint.meta["manager"], checkpoint.tensors
    )
    return host, checkpoint.step


def restore_final(
    host: Host,
    settings: KasminaSettings,
    training_run_id: str,
    manager_state: dict[str, Any],
    tensors: dict[str, Tensor],
) -> None:
    """Put a checkpoint's seeds, growths and weights into `host`, then end the run's lifecycles."""
    with tempfile.TemporaryDirectory() as scratch:
        catalogue = BlueprintCatalogue.open_default(Path(scratch) / "urza.sqlite3")
        try:
            verifier = SignatureVerifier(b"export-applies-no-command" * 2, freshness_s=1.0, future_skew_s=1.0)
            manager = SeedManager(
                host.slots(), catalogue, verifier, settings, training_run_id=training_run_id, host=host
            )
            state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            try:
                manager.restore_state(manager_state)
                host.load_state_dict(state, strict=True)
            except (EsperError, RuntimeError, KeyError, TypeError, ValueError) as exc:
                raise ExportError(
                    training_run_id, f"the checkpoint does not fit the run's host: {exc}"
                ) from exc
            manager.terminate(0)
        finally:
            catalogue.close()
    host.eval()


def model_card(run_dir: Path, host: Host, step: int) -> dict[str, Any]:
    """What the run's summary and events say about the model: task, accuracy, parameters, growth."""
    summary = _read_json(run_dir / "summary.json")
    history: list[dict[str, Any]] = []
    events = run_dir / "events.jsonl"
    if events.is_file():
        for line in events.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("kind") == "transition":
                history.append(
                    {
                        key: event.get(key)
                        for key in (
                            "step",
                            "slot_id",
                            "seed_id",
                            "blueprint_id",
                            "from_stage",
                            "to_stage",
                            "reason",
                        )
                        if event.get(key) is not None
                    }
                )
    return {
        "run_id": summary.get("run_id"),
        "task": summary.get("task"),
        "host": summary.get("host"),
        "policy": summary.get("policy"),
        "status": summary.get("status", "unknown (no summary.json)"),
        "final_val_accuracy": summary.get("final_val_accuracy"),
        "final_val_loss": summary.get("final_val_loss"),
        "params_initial": summary.get("params_initial"),
        "params_final": summary.get("params_final"),
        "parameters": host.parameter_count(),
        "checkpoint_step": step,
        "growth_history": history,
    }


def _saved_user_model(run_dir: Path) -> Path | None:
    """The final model a run of a user's own model saved; None for a run of a built-in host."""
    config = _read_json(run_dir / "config.json") if run_dir.is_dir() else {}
    if config.get("host") != USER_HOST:
        return None
    saved = run_dir / GROWN_MODEL_DIR
    missing = [name for name in (WEIGHTS_FILE, SPEC_FILE, CARD_FILE) if not (saved / name).is_file()]
    if missing:
        raise ExportError(
            str(run_dir),
            f"a run of your own model is exported from the model it saved when it ended, and "
            f"{saved} lacks {', '.join(missing)} (the run did not end, or its model could not be exported)",
        )
    return saved


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """`esper export`: the run's final model, with its model card, written to `out_dir`.

    A run of a user's own model (host `user`) hands over the export it wrote when it ended."""
    saved = _saved_user_model(run_dir)
    if saved is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, SPEC_FILE, CARD_FILE):
            write_atomically(out_dir / name, (saved / name).read_bytes())
        return out_dir
    host, step = final_host(run_dir)
    return export_model(host, out_dir, model_card(run_dir, host, step))


__all__ = [
    "CARD_FILE",
    "GROWN_MODEL_DIR",
    "SPEC_FILE",
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "USER_HOST",
    "WEIGHTS_FILE",
    "ExportError",
    "export_model",
    "export_run",
    "final_host",
    "model_card",
    "model_spec",
]
