"""Validation with counterfactual contributions: every live seed measured with its alpha as it is and
with alpha forced to 0, in the same pass over the validation split (DESIGN §10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from esper.kasmina import SeedManager

Loss = Callable[[Tensor, Tensor], Tensor]
"""A training loss: (the host's output, the targets) -> the batch's mean loss, a scalar tensor."""


@dataclass(frozen=True)
class Contribution:
    """What a seed adds: accuracy with it minus without, and loss without it minus with (positive helps)."""

    accuracy: float
    loss: float


@dataclass(frozen=True)
class Evaluation:
    """Validation loss and accuracy of the model as it is, and each measured seed's contribution."""

    loss: float
    accuracy: float
    contributions: dict[str, Contribution] = field(default_factory=dict)


def classifies(output: Tensor, targets: Tensor) -> bool:
    """True when (output, targets) is a classification batch: scores [N, C] and integer labels [N].
    Accuracy is counted only for such batches; for any other task (a regression) it stays 0."""
    return (
        output.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and len(output) == len(targets)
    )


def evaluate(
    model: nn.Module,
    manager: SeedManager,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    criterion: Loss | None = None,
) -> Evaluation:
    """Evaluate `model` on (x, y) in eval mode, with the counterfactual of every measurable slot; the
    validation loss is `criterion` (cross-entropy by default). Accuracy is counted for classification
    batches only (`classifies`): 0 for any other task."""
    slots = manager.measurable_slots()
    variants: list[str | None] = [None, *slots]
    # Summed where the model computes and read once at the end (one device sync per evaluation, not two
    # per batch): losses in float64 and counts in int64, so the figures are those of summing on the host.
    loss_sums = torch.zeros(len(variants), dtype=torch.float64, device=x.device)
    correct_counts = torch.zeros(len(variants), dtype=torch.int64, device=x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # no autograd state, no version counters; as many reads as a plain loop
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                for position, variant in enumerate(variants):
                    if variant is None:
                        logits = model(xb)
                    else:
                        with manager.counterfactual(variant):
                            logits = model(xb)
                    if criterion is None:
                        batch_loss = nn.functional.cross_entropy(logits, yb, reduction="sum").double()
                    else:
                        batch_loss = criterion(logits, yb).double() * len(yb)
                    loss_sums[position] += batch_loss
                    if classifies(logits, yb):
                        correct_counts[position] += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    summed: list[float] = loss_sums.tolist()
    counted: list[int] = correct_counts.tolist()
    loss_sum = dict(zip(variants, summed, strict=True))
    correct = dict(zip(variants, counted, strict=True))
    n = max(1, len(x))
    loss = loss_sum[None] / n
    accuracy = correct[None] / n
    contributions = {
        slot: Contribution(accuracy=accuracy - correct[slot] / n, loss=loss_sum[slot] / n - loss)
        for slot in slots
    }
    return Evaluation(loss=loss, accuracy=accuracy, contributions=contributions)
