"""Validation of a candidate policy before it is published.

A candidate passes when (1) every weight and every training loss is finite, (2) its action distribution
has not moved further than `max_kl` from its parent's (exact KL of the masked action head over the
round's graphs, and the k3 estimate over the recorded factored choices), and (3) it does not regress on a
held-out replay: on held-out decisions of the GNN, the clipped importance-weighted surrogate of the
candidate is at least the parent's minus `regression_tolerance`; for an imitation candidate, its
agreement with the held-out heuristic actions is at least the parent's minus the tolerance. A candidate
that fails is not published; the reasons say why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esper.simic.ppo import Rollout, action_log_probs, k3_kl
from esper.simic.settings import SimicSettings
from esper.simic.transitions import Sample
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.policy import GNNPolicy


@dataclass
class ValidationReport:
    """Whether a candidate may be published, why not, and the figures behind it."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def action_kl(parent: GNNPolicy, candidate: GNNPolicy, graphs: Sequence[TamiyoGraph]) -> float:
    """Mean exact KL(parent || candidate) of the masked action head over `graphs`."""
    if not graphs:
        return 0.0
    p, q = action_log_probs(parent, graphs), action_log_probs(candidate, graphs)
    return float((p.exp() * (p - q)).sum(-1).mean())


def agreement(policy: GNNPolicy, samples: Sequence[Sample]) -> float:
    """Share of samples whose recorded action is `policy`'s most likely action."""
    if not samples:
        return math.nan
    best = action_log_probs(policy, [s.graph for s in samples]).argmax(-1)
    recorded = torch.tensor([s.choices["action"] for s in samples])
    return float((best == recorded).float().mean())


def choice_log_probs(policy: GNNPolicy, samples: Sequence[Sample], batch_size: int = 64) -> Tensor:
    """Log-probability of each sample's recorded factored choice under `policy` (no gradient)."""
    parts: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            parts.append(
                policy.evaluate_actions([s.graph for s in chunk], [s.choices for s in chunk]).total_log_prob
            )
    return torch.cat(parts) if parts else torch.zeros(0)


def clipped_surrogate(policy: GNNPolicy, rollout: Rollout, clip: float) -> float:
    """PPO's clipped importance-weighted estimate of the advantage `policy` would get on `rollout`."""
    ratio = (choice_log_probs(policy, rollout.samples) - rollout.old_log_probs).exp()
    adv = rollout.advantages
    return float(torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv).mean())


def validate_candidate(
    parent: GNNPolicy,
    candidate: GNNPolicy,
    settings: SimicSettings,
    *,
    graphs: Sequence[TamiyoGraph],
    training_losses: Mapping[str, float],
    holdout: Rollout | None = None,
    imitation_holdout: Sequence[Sample] = (),
    kl_bound: bool = True,
    agreement_bound: bool = True,
) -> ValidationReport:
    """Check `candidate` against its parent; see the module docstring for what passes.

    `agreement_bound=False` records the held-out agreement of both without comparing them: for a distil
    round, whose parent was trained on most of the same runs (its held-out figure is inflated), the
    caller judges the round by outcome instead."""
    report = ValidationReport(passed=True)
    if not all(bool(torch.isfinite(p).all()) for p in candidate.module.parameters()):
        report.reasons.append("weights are not finite")
    bad_losses = sorted(name for name, value in training_losses.items() if not math.isfinite(value))
    if bad_losses:
        report.reasons.append(f"training losses are not finite: {', '.join(bad_losses)}")
    if report.reasons:  # nothing else is meaningful on broken weights
        report.passed = False
        return report
    kl = action_kl(parent, candidate, graphs)
    report.metrics["validation.action_kl"] = kl
    choice_kl = math.nan
    if holdout is not None and holdout.samples:
        log_ratio = choice_log_probs(candidate, holdout.samples) - choice_log_probs(parent, holdout.samples)
        choice_kl = float(k3_kl(log_ratio).mean())
        report.metrics["validation.choice_kl"] = choice_kl
    if kl_bound:
        worst = max(kl, choice_kl) if math.isfinite(choice_kl) else kl
        if worst > settings.max_kl:
            report.reasons.append(f"approximate KL {worst:.4f} from the parent exceeds {settings.max_kl}")
    if holdout is not None and holdout.samples:
        parent_score = clipped_surrogate(parent, holdout, settings.clip_coef)
        candidate_score = clipped_surrogate(candidate, holdout, settings.clip_coef)
        report.metrics["validation.holdout_surrogate_parent"] = parent_score
        report.metrics["validation.holdout_surrogate"] = candidate_score
        report.metrics["validation.holdout_size"] = float(len(holdout.samples))
        if candidate_score < parent_score - settings.regression_tolerance:
            report.reasons.append(
                f"held-out surrogate {candidate_score:.4f} regresses from the parent's {parent_score:.4f}"
            )
    elif imitation_holdout:
        parent_score = agreement(parent, imitation_holdout)
        candidate_score = agreement(candidate, imitation_holdout)
        report.metrics["validation.holdout_agreement_parent"] = parent_score
        report.metrics["validation.holdout_agreement"] = candidate_score
        report.metrics["validation.holdout_size"] = float(len(imitation_holdout))
        if agreement_bound and candidate_score < parent_score - settings.regression_tolerance:
            report.reasons.append(
                f"held-out agreement {candidate_score:.3f} regresses from the parent's {parent_score:.3f}"
            )
    else:
        report.reasons.append("no held-out replay to check for regression")
    report.passed = not report.reasons
    return report
