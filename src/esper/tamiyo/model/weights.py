"""The policy's weights format: safetensors with a JSON header naming the architecture, schema and sizes.

A payload for another architecture, schema or size is refused with `CheckpointIncompatible` before any
tensor is copied. The header reader that needs no PyTorch is `esper.tamiyo.model.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from esper.tamiyo.model.checkpoint import CheckpointIncompatible, SchemaMismatch, read_safetensors_header
from esper.tamiyo.model.distributions import HEADS
from esper.tamiyo.model.gnn import ARCHITECTURE_VERSION, LEGACY_HEADER, POLICY_SIZES, TamiyoGNNConfig, size_of
from esper.tamiyo.model.proposal import ACTIONS, ALPHA_RAMP_STEPS, BLEND_MODES, LR_FACTORS, WIDEN_UNITS

# Keys of the JSON header a `PolicyUpdate` payload carries besides the architecture header of the policy.
LINEAGE_KEYS: tuple[str, ...] = ("tamiyo_policy_version", "parent_version", "sequence", "registry_digest")


def weights_version(payload: bytes) -> str:
    """`gnn-<architecture>-<hash of the encoded weights>`."""
    digest = hashlib.sha256(payload).hexdigest()[:12]
    return f"gnn-{ARCHITECTURE_VERSION}-{digest}"


def encode_weights(module: nn.Module, config: TamiyoGNNConfig) -> bytes:
    """`module`'s weights as safetensors bytes with `config`'s JSON header."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    return bytes(save_safetensors(tensors, metadata={"header": json.dumps(config.header())}))


def decode_weights(payload: bytes, module: nn.Module, config: TamiyoGNNConfig) -> dict[str, Tensor]:
    """The tensors of `payload`, checked against `config`'s header and `module`'s own tensors.

    Every tensor is checked before the caller copies any: a refused payload leaves the weights as they were.
    """
    header = read_safetensors_header(payload)
    expected_schema = config.schema.version
    if header.get("schema_version", "") != expected_schema:  # before any other field: the root cause
        raise SchemaMismatch(header.get("schema_version", ""), expected_schema)
    for key, expected in config.header().items():
        found = header.get(key, LEGACY_HEADER.get(key, ""))
        if found != expected:
            raise CheckpointIncompatible(key, expected, found, hint=_size_hint(header, config))
    try:
        tensors = load_safetensors(payload)
    except SafetensorError as exc:
        raise CheckpointIncompatible("weights", "a readable safetensors payload", str(exc)) from exc
    own = module.state_dict()
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        found = f"missing {missing}, extra {extra}"
        raise CheckpointIncompatible("weights", "this network's tensors", found)
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
            raise CheckpointIncompatible(
                f"tensor {name}",
                f"{own[name].dtype} {list(own[name].shape)}",
                f"{tensor.dtype} {list(tensor.shape)}",
            )
    return tensors


def policy_registry_digest(config: TamiyoGNNConfig) -> str:
    """Digest of everything that gives the policy's outputs their meaning.

    The graph schema (node types, features, relations) and the registries of the heads: actions, blend
    modes, ramp lengths, lr factors. Weights trained against another registry would pick other things.
    """
    body = {
        "schema": config.schema.digest,
        "heads": list(HEADS),
        "actions": list(ACTIONS),
        "blend_modes": list(BLEND_MODES),
        "alpha_ramp_steps": list(ALPHA_RAMP_STEPS),
        "lr_factors": list(LR_FACTORS),
        "widen_units": list(WIDEN_UNITS),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _size_hint(header: dict[str, str], config: TamiyoGNNConfig) -> str:
    """What to do when a checkpoint's sizes differ from the policy's ("" when the sizes agree)."""
    try:
        dims = {name: int(header.get(name, LEGACY_HEADER.get(name, ""))) for name in config.dims()}
    except ValueError:
        return ""  # sizes missing or unreadable: the field and values of the error say enough
    if dims == config.dims():
        return ""
    size = size_of(dims)
    if size in POLICY_SIZES:
        return f"the checkpoint is a {size!r} policy, this one {config.size!r}: set TAMIYO_POLICY_SIZE={size}"
    return f"the checkpoint's sizes {dims} are none of the named sizes ({', '.join(POLICY_SIZES)})"
