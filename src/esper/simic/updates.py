"""Building and signing `PolicyUpdate`s: safetensors payload with a JSON header, hash, HMAC, sequence.

The payload holds the policy's weights as safetensors (never pickle) and a JSON header: the policy's
architecture header (architecture version, schema version and digest, sizes) plus the lineage — the
policy version (a hash of the weights), its parent version, the update sequence and the registry digest.
Tamiyo's intake checks the header against the message, the hash against the payload and the signature
against everything.
"""

from __future__ import annotations

import hashlib
import json
import math

from safetensors.torch import save as save_safetensors

from esper.leyline import SYSTEM_CLOCK, Clock, pb, sign, validate_policy_update
from esper.tamiyo.model.gnn import ARCHITECTURE_VERSION
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.weights import policy_registry_digest


def policy_payload(policy: GNNPolicy, *, parent_version: str, sequence: int) -> bytes:
    """The weights of `policy` as safetensors, with the architecture and lineage header."""
    header = {
        **policy.config.header(),
        "tamiyo_policy_version": policy.version,
        "parent_version": parent_version,
        "sequence": str(sequence),
        "registry_digest": policy_registry_digest(policy.config),
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in policy.module.state_dict().items()}
    return bytes(save_safetensors(tensors, metadata={"header": json.dumps(header, sort_keys=True)}))


def build_policy_update(
    policy: GNNPolicy,
    secret: bytes,
    *,
    parent_version: str,
    sequence: int,
    policy_id: str,
    training_run_id: str = "",
    validation_metrics: dict[str, float] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> pb.PolicyUpdate:
    """A signed update carrying `policy` as version `policy.version`, number `sequence` of its lineage."""
    if sequence < 1:
        raise ValueError(f"sequence must be >= 1, got {sequence}")
    payload = policy_payload(policy, parent_version=parent_version, sequence=sequence)
    update = pb.PolicyUpdate(
        version=1,
        policy_id=policy_id,
        training_run_id=training_run_id,
        tamiyo_policy_version=policy.version,
        payload=payload,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        parent_version=parent_version,
        architecture_version=ARCHITECTURE_VERSION,
        sequence=sequence,
        registry_digest=policy_registry_digest(policy.config),
    )
    # A NaN figure was not measured: it is left out rather than published as a number.
    update.validation_metrics.update(
        {k: float(v) for k, v in (validation_metrics or {}).items() if math.isfinite(v)}
    )
    update.issued_at.FromNanoseconds(clock.wall_ns())
    return sign(validate_policy_update(update), secret, clock=clock)
