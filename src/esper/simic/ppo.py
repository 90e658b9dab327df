"""PPO on Tamiyo's own policy class, written to be read top to bottom (CleanRL style).

Every implementation detail is named where it happens:

0. Critic refit: the critic's last layer is refitted (ridge regression, trunk untouched, so no policy
   output moves) to the discounted returns the batch's own runs earned. The critic comes from the
   previous round or the imitation bootstrap, i.e. from another policy's runs; measured against it,
   the decisions of a policy that grows less than the heuristic all looked worse than waiting, and PPO
   learned never to germinate.
1. Values: the critic of the policy being trained estimates V(s) for every decision (no gradient).
2. Returns and advantages: generalised advantage estimation (`gamma`, `gae_lambda`) along each run's
   decisions in step order; the last decision of a run ends its trajectory.
3. Advantage normalisation: once over the whole training batch (zero mean, unit std).
4. Clipped surrogate: ratio = exp(new log-prob - *recorded behaviour* log-prob) of the whole factored
   choice; loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
5. Value loss: 0.5 * (V(s) - return)^2, weighted by `value_coef`.
6. Entropy bonus: the entropy of every head *where it mattered* for the recorded action (per-head credit,
   DESIGN §10), summed over heads, weighted by `entropy_coef`.
7. Minibatches: shuffled every epoch; each minibatch is one disjoint batch of heterogeneous graphs.
8. Behaviour cloning kept (`bc_coef` > 0 and imitation samples given): each minibatch also adds
   `bc_coef` x the negative log-likelihood of a minibatch of the heuristic's recorded choices.
   Gradient clipping to `max_grad_norm`; Adam.
9. Early stop: a round stops its epochs once the exact KL of the action head from where the round started,
   over the training graphs, passes `target_kl` (the same measure validation bounds by `max_kl`).

Reported every round: policy and value loss, total and per-head entropy, approximate KL overall and per
head, clip fraction, and the critic's explained variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esper.leyline import pb
from esper.simic.settings import SimicSettings
from esper.simic.transitions import Sample
from esper.tamiyo.model.distributions import HEADS, ActionEvaluation
from esper.tamiyo.model.graph import TamiyoGraph, collate
from esper.tamiyo.model.policy import GNNPolicy


@dataclass(frozen=True)
class Rollout:
    """The tensors PPO needs for a list of samples (one row per sample)."""

    samples: list[Sample]
    old_log_probs: Tensor  # recorded behaviour log-probability of the whole choice
    old_head_log_probs: dict[str, Tensor]  # recorded per head (0 where the head did not matter)
    advantages: Tensor
    returns: Tensor
    values: Tensor  # critic estimates the advantages were computed with

    def subset(self, index: Sequence[int]) -> Rollout:
        """The rows `index` as their own rollout."""
        rows = torch.tensor(list(index), dtype=torch.long)
        return Rollout(
            samples=[self.samples[i] for i in index],
            old_log_probs=self.old_log_probs[rows],
            old_head_log_probs={h: t[rows] for h, t in self.old_head_log_probs.items()},
            advantages=self.advantages[rows],
            returns=self.returns[rows],
            values=self.values[rows],
        )


@dataclass
class PPOStats:
    """What one PPO round did, for the round's report."""

    policy_loss: float = math.nan
    value_loss: float = math.nan
    entropy: float = math.nan
    head_entropy: dict[str, float] = field(default_factory=dict)
    approx_kl: float = math.nan
    action_kl: float = math.nan
    head_kl: dict[str, float] = field(default_factory=dict)
    clip_fraction: float = math.nan
    explained_variance: float = math.nan
    bc_loss: float = math.nan
    epochs: int = 0
    minibatches: int = 0
    stopped_early: bool = False

    def as_metrics(self) -> dict[str, float]:
        """Flat name -> value (for logs and `PolicyUpdate.validation_metrics`)."""
        metrics = {
            "ppo.policy_loss": self.policy_loss,
            "ppo.value_loss": self.value_loss,
            "ppo.entropy": self.entropy,
            "ppo.approx_kl": self.approx_kl,
            "ppo.action_kl": self.action_kl,
            "ppo.clip_fraction": self.clip_fraction,
            "ppo.explained_variance": self.explained_variance,
            "ppo.bc_loss": self.bc_loss,
            "ppo.epochs": float(self.epochs),
            "ppo.minibatches": float(self.minibatches),
        }
        metrics.update({f"ppo.entropy.{head}": value for head, value in self.head_entropy.items()})
        metrics.update({f"ppo.kl.{head}": value for head, value in self.head_kl.items()})
        return metrics


_MASKED = -1e9


def action_log_probs(policy: GNNPolicy, graphs: Sequence[TamiyoGraph], batch_size: int = 64) -> Tensor:
    """Masked log-probabilities of the action head, one row per graph (no gradient)."""
    rows: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(graphs), batch_size):
            batch = collate(list(graphs[start : start + batch_size]))
            logits = policy.module(batch).action_logits
            rows.append(torch.log_softmax(logits.masked_fill(~batch.action_mask, _MASKED), dim=-1))
    return torch.cat(rows) if rows else torch.zeros((0, 0))


def critic_values(policy: GNNPolicy, samples: Sequence[Sample], batch_size: int = 64) -> Tensor:
    """V(s) of every sample under `policy` (no gradient)."""
    values: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            evaluation = policy.evaluate_actions([s.graph for s in chunk], [s.choices for s in chunk])
            values.append(evaluation.values.detach())
    return torch.cat(values) if values else torch.zeros(0)


def compute_gae(
    rewards: Tensor, values: Tensor, dones: Tensor, *, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE over rows in trajectory order (`dones[t]` ends a trajectory at t)."""
    advantages = torch.zeros_like(rewards)
    last = torch.tensor(0.0)
    for t in reversed(range(rewards.shape[0])):
        alive = 1.0 - float(dones[t])
        next_value = values[t + 1] if t + 1 < rewards.shape[0] else torch.tensor(0.0)
        delta = rewards[t] + gamma * next_value * alive - values[t]
        last = delta + gamma * gae_lambda * alive * last
        advantages[t] = last
    return advantages, advantages + values


def explained_variance(predicted: Tensor, target: Tensor) -> float:
    """1 - Var(target - predicted) / Var(target); NaN when the target does not vary."""
    if target.numel() < 2:
        return math.nan
    variance = float(target.var())
    if variance == 0.0:
        return math.nan
    return 1.0 - float((target - predicted).var()) / variance


def make_rollout(policy: GNNPolicy, samples: list[Sample], settings: SimicSettings) -> Rollout:
    """Steps 1-2: critic values, then GAE advantages and returns, for samples in trajectory order."""
    values = critic_values(policy, samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    dones = torch.tensor([s.transition.done for s in samples], dtype=torch.float32)
    advantages, returns = compute_gae(
        rewards, values, dones, gamma=settings.gamma, gae_lambda=settings.gae_lambda
    )
    old_head = {
        head: torch.tensor(
            [float(s.transition.decision.head_log_probs.get(head, 0.0)) for s in samples], dtype=torch.float32
        )
        for head in HEADS
    }
    return Rollout(
        samples=samples,
        old_log_probs=torch.tensor([s.old_log_prob for s in samples], dtype=torch.float32),
        old_head_log_probs=old_head,
        advantages=advantages,
        returns=returns,
        values=values,
    )


def k3_kl(log_ratio: Tensor) -> Tensor:
    """Approximate KL(behaviour || new) from log-ratios of sampled choices: mean((r - 1) - log r)."""
    return (log_ratio.exp() - 1.0) - log_ratio


def choice_nll(
    evaluation: ActionEvaluation, samples: Sequence[Sample], *, action_weight: float = 1.0
) -> Tensor:
    """Negative log-likelihood of the recorded choices of `samples` (the heads each record names),
    averaged with weight `action_weight` on a decision other than WAIT and 1 on a WAIT."""
    named = {head: torch.tensor([head in s.choices for s in samples], dtype=torch.float32) for head in HEADS}
    per_sample = -torch.stack([evaluation.log_probs[h] * named[h] for h in HEADS]).sum(0)
    if action_weight == 1.0:
        return per_sample.mean()
    weights = torch.tensor(
        [1.0 if s.transition.decision.action == pb.POLICY_ACTION_WAIT else action_weight for s in samples],
        dtype=torch.float32,
    )
    return (per_sample * weights).sum() / weights.sum()


def ppo_update(
    policy: GNNPolicy,
    rollout: Rollout,
    settings: SimicSettings,
    *,
    generator: torch.Generator,
    imitation: Sequence[Sample] = (),
) -> PPOStats:
    """Steps 3-9 on `policy` in place. Rows must be on-policy material (recorded log-probabilities);
    `imitation`: the heuristic's samples that behaviour cloning keeps (step 8)."""
    size = len(rollout.samples)
    if size == 0:
        raise ValueError("PPO needs at least one sample")
    optimizer = torch.optim.Adam(policy.module.parameters(), lr=settings.learning_rate, eps=1e-5)
    advantages = rollout.advantages
    if settings.normalize_advantages and size > 1:  # step 3
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    stats = PPOStats()
    graphs = [s.graph for s in rollout.samples]
    reference = action_log_probs(policy, graphs)  # where this round started
    policy.module.train()
    try:
        for epoch in range(settings.update_epochs):
            order = torch.randperm(size, generator=generator).tolist()
            for start in range(0, size, settings.minibatch_size):  # step 7
                rows = order[start : start + settings.minibatch_size]
                index = torch.tensor(rows, dtype=torch.long)
                batch = [rollout.samples[i] for i in rows]
                evaluation = policy.evaluate_actions([s.graph for s in batch], [s.choices for s in batch])
                # Step 4: clipped surrogate against the recorded behaviour log-probability.
                log_ratio = evaluation.total_log_prob - rollout.old_log_probs[index]
                ratio = log_ratio.exp()
                adv = advantages[index]
                clipped = torch.clamp(ratio, 1.0 - settings.clip_coef, 1.0 + settings.clip_coef)
                policy_loss = torch.max(-adv * ratio, -adv * clipped).mean()
                # Step 5: value loss.
                value_loss = 0.5 * ((evaluation.values - rollout.returns[index]) ** 2).mean()
                # Step 6: entropy of the heads that mattered (zero rows elsewhere), summed over heads.
                entropy = torch.stack(list(evaluation.entropies.values())).sum(0).mean()
                loss = policy_loss + settings.value_coef * value_loss - settings.entropy_coef * entropy
                if imitation and settings.bc_coef > 0:  # step 8
                    picks = torch.randint(len(imitation), (len(rows),), generator=generator).tolist()
                    cloned = [imitation[i] for i in picks]
                    bc = choice_nll(
                        policy.evaluate_actions([s.graph for s in cloned], [s.choices for s in cloned]),
                        cloned,
                    )
                    loss = loss + settings.bc_coef * bc
                    stats.bc_loss = float(bc.detach())
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(policy.module.parameters(), settings.max_grad_norm)  # step 8
                optimizer.step()
                with torch.no_grad():
                    kl = float(k3_kl(log_ratio.detach()).mean())
                    stats.approx_kl = kl
                    stats.clip_fraction = float(((ratio - 1.0).abs() > settings.clip_coef).float().mean())
                    stats.policy_loss = float(policy_loss)
                    stats.value_loss = float(value_loss)
                    stats.entropy = float(entropy)
                    stats.minibatches += 1
                    _per_head(stats, evaluation, rollout, index)
            stats.epochs = epoch + 1
            now = action_log_probs(policy, graphs)
            stats.action_kl = float((reference.exp() * (reference - now)).sum(-1).mean())
            if stats.action_kl > settings.target_kl:  # step 9
                stats.stopped_early = epoch + 1 < settings.update_epochs
                break
    finally:
        policy.module.eval()
    stats.explained_variance = explained_variance(critic_values(policy, rollout.samples), rollout.returns)
    return stats


def _per_head(stats: PPOStats, evaluation: ActionEvaluation, rollout: Rollout, index: Tensor) -> None:
    """Per-head entropy and KL over the rows where the head mattered (latest minibatch)."""
    for head in HEADS:
        mask = evaluation.relevant[head]
        if not bool(mask.any()):
            continue
        stats.head_entropy[head] = float(evaluation.entropies[head][mask].mean())
        log_ratio = evaluation.log_probs[head][mask].detach() - rollout.old_head_log_probs[head][index][mask]
        stats.head_kl[head] = float(k3_kl(log_ratio).mean())


_ROWS_PER_CRITIC_WEIGHT = 4


def discounted_returns(samples: Sequence[Sample], gamma: float) -> Tensor:
    """Monte-Carlo returns along each run's decisions (samples in trajectory order)."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    dones = torch.tensor([s.transition.done for s in samples], dtype=torch.float32)
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), dones, gamma=gamma, gae_lambda=1.0)
    return returns


def refit_critic(
    policy: GNNPolicy, samples: Sequence[Sample], fit_rows: Sequence[int], settings: SimicSettings
) -> float | None:
    """Step 0 (see the module docstring): the value head refitted in place to the discounted returns of
    `samples` (in trajectory order), fitted on the rows `fit_rows` only; returns the fit's explained
    variance on those rows. Only the value head's weights change. With fewer than four rows per weight
    of the head the fit would only memorise: nothing changes and None is returned."""
    head = policy.module.value_head
    if len(fit_rows) < _ROWS_PER_CRITIC_WEIGHT * (head.in_features + 1):
        return None
    returns = discounted_returns(samples, settings.gamma)
    features: list[Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: features.append(inputs[0].detach()))
    try:
        # Message passing (gradients on, none taken) is the path that calls the value head as a module.
        with torch.enable_grad():
            for start in range(0, len(fit_rows), 64):
                chunk = [samples[i] for i in fit_rows[start : start + 64]]
                policy.evaluate_actions([s.graph for s in chunk], [s.choices for s in chunk])
    finally:
        hook.remove()
    x = torch.cat(features).double()
    y = returns[list(fit_rows)].double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    # Ridge, scaled to the features so that the bias is barely shrunk and the fit is well posed.
    penalty = (1e-2 * float(design.pow(2).mean()) + 1e-8) * torch.eye(design.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(design.T @ design + penalty, design.T @ y)
    with torch.no_grad():
        head.weight.copy_(solution[:-1].to(head.weight.dtype).reshape_as(head.weight))
        assert head.bias is not None
        head.bias.copy_(solution[-1:].to(head.bias.dtype))
    return explained_variance((design @ solution).float(), y.float())
