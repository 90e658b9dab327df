"""Simic's settings, resolved once (prefix `SIMIC_`) and passed to every component."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from esper.leyline.settings import MINUTE_S, StrictSettings


class SimicSettings(StrictSettings):
    """Reward weights, PPO hyperparameters, validation bounds and the rhythm of training rounds."""

    model_config = SettingsConfigDict(env_prefix="SIMIC_")

    # Reward (DESIGN §10: start simple). Per decision, over its observation window.
    reward_accuracy_weight: float = Field(default=1.0, ge=0, description="x validation accuracy change.")
    reward_loss_weight: float = Field(default=0.5, ge=0, description="x validation loss decrease.")
    reward_contribution_weight: float = Field(
        default=0.5, ge=0, description="x counterfactual accuracy contribution of the seed, when measured."
    )
    reward_seed_outcome_weight: float = Field(
        default=1.0,
        ge=0,
        description="x counterfactual accuracy contribution of the seed a germination planted (or of the "
        "units or block a WIDEN or DEEPEN added), as measured when it was fossilised or culled (credited "
        "to the germination, WIDEN or DEEPEN).",
    )
    reward_param_cost: float = Field(
        default=0.01, ge=0, description="Cost per 1000 parameters added over the window."
    )
    reward_clip: float = Field(default=1.0, gt=0, description="Rewards are clipped to [-clip, clip].")
    reward_mode: Literal["window", "episode"] = Field(
        default="window",
        description="window: each decision is paid what its own observation window measured. episode: the "
        "run's outcome (accuracy at the last window's close minus reward_param_cost per 1000 parameters) "
        "is paid at its last decision and credited to the earlier ones through returns; germinations "
        "keep their seed's counterfactual contribution, WIDENs and DEEPENs their growth's.",
    )
    # Returns and advantages over the decisions of one run, in step order.
    gamma: float = Field(default=0.9, ge=0, le=1)
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    # PPO.
    learning_rate: float = Field(default=3e-4, gt=0, le=10.0)
    update_epochs: int = Field(default=4, ge=1)
    minibatch_size: int = Field(default=32, ge=1)
    clip_coef: float = Field(default=0.2, gt=0, lt=1)
    value_coef: float = Field(default=0.5, ge=0)
    entropy_coef: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=0.5, gt=0)
    bc_coef: float = Field(
        default=0.0,
        ge=0,
        le=100.0,
        description="Behaviour cloning kept during PPO: x the negative log-likelihood of the heuristic's "
        "recorded choices (the imitation samples the learner keeps), added to every PPO minibatch's loss.",
    )
    normalize_advantages: bool = Field(default=True)
    target_kl: float = Field(
        default=0.03,
        gt=0,
        description="Stop a round's epochs once the action head moved this far (exact KL).",
    )
    # Validation before publishing.
    max_kl: float = Field(default=0.1, gt=0, description="Largest approximate KL from the parent allowed.")
    holdout_fraction: float = Field(default=0.2, ge=0, lt=1, description="Share of transitions held out.")
    regression_tolerance: float = Field(
        default=0.005,
        ge=0,
        description="How much worse than the parent the held-out figure may be (reward units, or agreement): "
        "a candidate that barely moved must not be refused for noise in the last digit.",
    )
    min_transitions: int = Field(default=16, ge=2, description="Fewest transitions that make a round.")
    # Imitation bootstrap from the heuristic's decisions.
    imitation_epochs: int = Field(default=30, ge=1)
    imitation_learning_rate: float = Field(default=1e-3, gt=0, le=10.0)
    imitation_action_weight: float = Field(
        default=1.0,
        ge=1.0,
        le=1000.0,
        description="Weight of a decision other than WAIT in behaviour cloning, against 1 for a WAIT: a "
        "threshold rule's rare choices (grow, fossilise) are few among its decisions, and a sampled "
        "imitation seldom reproduces them at weight 1.",
    )
    # Rounds (`esper simic serve`).
    round_min_new_reports: int = Field(default=64, ge=1, description="New field reports that start a round.")
    poll_ms: int = Field(
        default=500, ge=1, le=MINUTE_S * 1000, description="How long one poll of the bus blocks."
    )
    max_transitions: int = Field(default=20_000, ge=1, description="Newest transitions kept for training.")
    # Identity and determinism.
    policy_id: str = Field(default="tamiyo-gnn", min_length=1)
    seed: int = Field(default=0, ge=0)
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads of the learner.")
