"""Action distributions: the factored heads' masked log-probabilities, entropies and evaluation.

Only the heads that matter for the chosen action count (DESIGN §10: per-head credit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from esper.leyline import pb
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.proposal import (
    ACTIONS,
)

HEADS: tuple[str, ...] = ("action", "slot", "blueprint", "blend", "schedule", "lr", "layer", "amount")
_A = {action: index for index, action in enumerate(ACTIONS)}
# Heads whose choice matters for each action (by action head index).
RELEVANT_HEADS: dict[int, tuple[str, ...]] = {
    _A[pb.POLICY_ACTION_WAIT]: ("action",),
    _A[pb.POLICY_ACTION_GERMINATE]: ("action", "slot", "blueprint", "blend", "schedule"),
    _A[pb.POLICY_ACTION_FOSSILIZE]: ("action", "slot"),
    _A[pb.POLICY_ACTION_CULL]: ("action", "slot"),
    _A[pb.POLICY_ACTION_ADJUST_LR]: ("action", "lr"),
    _A[pb.POLICY_ACTION_PAUSE]: ("action",),
    _A[pb.POLICY_ACTION_WIDEN]: ("action", "layer", "amount"),
    _A[pb.POLICY_ACTION_DEEPEN]: ("action", "layer"),
}
MASKED = -1e9


@dataclass(frozen=True)
class ActionEvaluation:
    """Per-head log-probabilities, entropies and relevance for a batch, plus values (for PPO)."""

    log_probs: dict[str, Tensor]  # head -> [B], zero where the head did not matter
    entropies: dict[str, Tensor]  # head -> [B], zero where the head did not matter
    relevant: dict[str, Tensor]  # head -> [B] bool
    values: Tensor  # [B]

    @property
    def total_log_prob(self) -> Tensor:
        """Log-probability of the whole factored choice."""
        return torch.stack(list(self.log_probs.values())).sum(0)


@dataclass
class HeadDistributions:
    """Masked log-probabilities of every head for a batch."""

    action: Tensor  # [B, A]
    slot: Tensor  # [S, A]: per-slot log-prob within its graph, for each action's mask
    slot_ok: Tensor  # [S, A] bool
    blueprint: Tensor  # [P]
    blend: Tensor
    schedule: Tensor
    lr: Tensor
    value: Tensor
    layer: Tensor  # [L, A]: per-layer log-prob within its graph, for each action's mask
    layer_ok: Tensor  # [L, A] bool
    amount: Tensor  # [L, K]: the amount head's log-probs were that layer chosen (its amount mask)


def segment_log_softmax(scores: Tensor, index: Tensor, size: int) -> Tensor:
    """Log-softmax of `scores` within each segment of `index` (graphs of a batch)."""
    if scores.numel() == 0:
        return scores
    maximum = torch.full((size,), float("-inf"), dtype=scores.dtype).scatter_reduce(
        0, index, scores, reduce="amax", include_self=True
    )
    shifted = scores - maximum[index]
    total = torch.zeros(size, dtype=scores.dtype).index_add(0, index, shifted.exp())
    return shifted - total.log()[index]


def head_distributions(out: GNNOutput, graph: TamiyoGraph) -> HeadDistributions:
    """Masked log-probabilities of every head for `graph` (one graph or a batch)."""
    size = graph.num_graphs
    action_mask = graph.action_mask.to(out.action_logits.device)
    action = torch.log_softmax(out.action_logits.masked_fill(~action_mask, MASKED), dim=-1)
    slot_ok = graph.slot_action_mask.to(out.slot_scores.device)
    slot_batch = graph.batch["slot"].to(out.slot_scores.device)
    per_action = out.slot_scores[:, None].expand_as(slot_ok).masked_fill(~slot_ok, MASKED)
    if size == 1:  # one graph: its segments are the whole columns
        slot = torch.log_softmax(per_action, dim=0)
        blueprint = torch.log_softmax(out.blueprint_scores, dim=0)
    else:
        slot = torch.stack(
            [segment_log_softmax(per_action[:, a], slot_batch, size) for a in range(len(ACTIONS))], dim=1
        ).reshape(slot_ok.shape)
        bp_batch = graph.batch["blueprint"].to(out.blueprint_scores.device)
        blueprint = segment_log_softmax(out.blueprint_scores, bp_batch, size)
    layer_ok = graph.layer_action_mask.to(out.layer_scores.device)
    per_layer_action = out.layer_scores[:, None].expand_as(layer_ok).masked_fill(~layer_ok, MASKED)
    if size == 1:
        layer = torch.log_softmax(per_layer_action, dim=0)
    else:
        layer_batch = graph.batch["layer"].to(out.layer_scores.device)
        layer = torch.stack(
            [segment_log_softmax(per_layer_action[:, a], layer_batch, size) for a in range(len(ACTIONS))],
            dim=1,
        ).reshape(layer_ok.shape)
    amount_ok = graph.widen_amount_mask.to(out.amount_logits.device)
    amount_rows = out.amount_logits[graph.batch["layer"].to(out.amount_logits.device)]
    amount = torch.log_softmax(amount_rows.masked_fill(~amount_ok, MASKED), dim=-1)
    return HeadDistributions(
        action=action,
        slot=slot,
        slot_ok=slot_ok,
        blueprint=blueprint,
        blend=torch.log_softmax(out.blend_logits, dim=-1),
        schedule=torch.log_softmax(out.schedule_logits, dim=-1),
        lr=torch.log_softmax(out.lr_logits, dim=-1),
        value=out.value,
        layer=layer,
        layer_ok=layer_ok,
        amount=amount,
    )


def evaluate_choices(
    out: GNNOutput, batch: TamiyoGraph, head_choices: Sequence[dict[str, int]]
) -> ActionEvaluation:
    """Per-head log-probs, entropies and values of recorded choices, from the network's output on `batch`."""
    dists = head_distributions(out, batch)
    size = batch.num_graphs
    actions = torch.tensor([choices["action"] for choices in head_choices], dtype=torch.long)
    relevant = {
        head: torch.tensor([head in RELEVANT_HEADS[int(a)] for a in actions.tolist()], dtype=torch.bool)
        for head in HEADS
    }
    slot_offsets = segment_offsets(batch.batch["slot"], size)
    bp_offsets = segment_offsets(batch.batch["blueprint"], size)

    def pick(head: str, default: int = 0) -> Tensor:
        return torch.tensor([c.get(head, default) for c in head_choices], dtype=torch.long)

    log_probs: dict[str, Tensor] = {"action": dists.action.gather(1, actions[:, None]).squeeze(1)}
    entropies: dict[str, Tensor] = {"action": entropy(dists.action, action_mask=batch.action_mask)}
    # Slot: the log-prob of the chosen slot under the chosen action's mask, entropy per graph.
    slot_actions = actions[batch.batch["slot"]]
    slot_rows = dists.slot.gather(1, slot_actions[:, None]).squeeze(1)
    slot_ok = batch.slot_action_mask.gather(1, slot_actions[:, None]).squeeze(1)
    log_probs["slot"] = pick_segment(slot_rows, slot_offsets, pick("slot"), relevant["slot"])
    entropies["slot"] = segment_entropy(slot_rows, slot_ok, batch.batch["slot"], size)
    bp_ok = torch.ones_like(dists.blueprint, dtype=torch.bool)
    log_probs["blueprint"] = pick_segment(
        dists.blueprint, bp_offsets, pick("blueprint"), relevant["blueprint"]
    )
    entropies["blueprint"] = segment_entropy(dists.blueprint, bp_ok, batch.batch["blueprint"], size)
    # Layer (WIDEN, DEEPEN): as the slot; amount: under the chosen layer's amount mask.
    layer_offsets = segment_offsets(batch.batch["layer"], size)
    layer_actions = actions[batch.batch["layer"]]
    layer_rows = dists.layer.gather(1, layer_actions[:, None]).squeeze(1)
    layer_ok = batch.layer_action_mask.gather(1, layer_actions[:, None]).squeeze(1)
    log_probs["layer"] = pick_segment(layer_rows, layer_offsets, pick("layer"), relevant["layer"])
    entropies["layer"] = segment_entropy(layer_rows, layer_ok, batch.batch["layer"], size)
    if dists.amount.numel():
        chosen = (layer_offsets + pick("layer")).clamp(max=dists.amount.shape[0] - 1)
        amount_table = dists.amount[chosen]
        log_probs["amount"] = amount_table.gather(1, pick("amount")[:, None]).squeeze(1)
        entropies["amount"] = entropy(amount_table, action_mask=batch.widen_amount_mask[chosen])
    else:
        log_probs["amount"] = entropies["amount"] = torch.zeros(size)
    for head in ("blend", "schedule", "lr"):
        table: Tensor = getattr(dists, head)
        log_probs[head] = table.gather(1, pick(head)[:, None]).squeeze(1)
        entropies[head] = entropy(table)
    zero = torch.zeros(size)
    return ActionEvaluation(
        log_probs={h: torch.where(relevant[h], lp, zero) for h, lp in log_probs.items()},
        entropies={h: torch.where(relevant[h], e, zero) for h, e in entropies.items()},
        relevant=relevant,
        values=dists.value,
    )


def segment_offsets(index: Tensor, size: int) -> Tensor:
    counts = torch.bincount(index, minlength=size)
    return torch.cumsum(counts, 0) - counts


def pick_segment(log_probs: Tensor, offsets: Tensor, local: Tensor, relevant: Tensor) -> Tensor:
    if log_probs.numel() == 0:
        return torch.zeros(local.shape[0])
    positions = (offsets + local).clamp(max=log_probs.shape[0] - 1)
    return torch.where(relevant, log_probs[positions], torch.zeros(local.shape[0]))


def entropy(log_probs: Tensor, action_mask: Tensor | None = None) -> Tensor:
    probs = log_probs.exp()
    terms = -(probs * log_probs)
    if action_mask is not None:
        terms = terms * action_mask.float()
    return terms.sum(-1)


def segment_entropy(log_probs: Tensor, ok: Tensor, index: Tensor, size: int) -> Tensor:
    if log_probs.numel() == 0:
        return torch.zeros(size)
    terms = -(log_probs.exp() * log_probs) * ok.float()
    return torch.zeros(size, dtype=terms.dtype).index_add(0, index, terms)
