"""Imitation bootstrap: pre-train the GNN to choose what the heuristic controller chose.

Behaviour cloning over the heuristic's decisions: the negative log-likelihood of each recorded head
choice (only the heads that mattered for the action and that the record names), plus the value head fitted
to the discounted returns the heuristic's decisions earned, so PPO starts from a sensible policy and a
critic that is not random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.simic.ppo import choice_nll, compute_gae
from esper.simic.settings import SimicSettings
from esper.simic.transitions import Sample
from esper.simic.validation import agreement
from esper.tamiyo.model.policy import GNNPolicy


@dataclass(frozen=True)
class ImitationStats:
    """What one imitation run achieved."""

    loss: float
    value_loss: float
    agreement: float
    epochs: int

    def as_metrics(self) -> dict[str, float]:
        """Flat name -> value."""
        return {
            "imitation.loss": self.loss,
            "imitation.value_loss": self.value_loss,
            "imitation.agreement": self.agreement,
            "imitation.epochs": float(self.epochs),
        }


def imitate(
    policy: GNNPolicy, samples: list[Sample], settings: SimicSettings, *, generator: torch.Generator
) -> ImitationStats:
    """Train `policy` in place to reproduce the recorded choices of `samples` (in trajectory order)."""
    if not samples:
        raise ValueError("imitation needs at least one sample")
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    dones = torch.tensor([s.transition.done for s in samples], dtype=torch.float32)
    # Discounted returns: GAE with a zero critic and lambda 1.
    _, returns = compute_gae(rewards, torch.zeros_like(rewards), dones, gamma=settings.gamma, gae_lambda=1.0)
    optimizer = torch.optim.Adam(policy.module.parameters(), lr=settings.imitation_learning_rate)
    size = len(samples)
    loss_value = value_loss_value = float("nan")
    policy.module.train()
    try:
        for _ in range(settings.imitation_epochs):
            order = torch.randperm(size, generator=generator).tolist()
            for start in range(0, size, settings.minibatch_size):
                rows = order[start : start + settings.minibatch_size]
                batch = [samples[i] for i in rows]
                evaluation = policy.evaluate_actions([s.graph for s in batch], [s.choices for s in batch])
                nll = choice_nll(evaluation, batch, action_weight=settings.imitation_action_weight)
                value_loss = 0.5 * ((evaluation.values - returns[rows]) ** 2).mean()
                loss = nll + settings.value_coef * value_loss
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(policy.module.parameters(), settings.max_grad_norm)
                optimizer.step()
                loss_value, value_loss_value = float(nll.detach()), float(value_loss.detach())
    finally:
        policy.module.eval()
    return ImitationStats(
        loss=loss_value,
        value_loss=value_loss_value,
        agreement=agreement(policy, samples),
        epochs=settings.imitation_epochs,
    )
