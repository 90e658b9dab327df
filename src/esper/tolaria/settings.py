"""Tolaria's settings, resolved once (prefix `TOLARIA_`) and passed to the trainer."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from esper.leyline.settings import StrictSettings


class TolariaSettings(StrictSettings):
    """The training loop's knobs: schedule, optimiser, decisions, checkpoints and rollback."""

    model_config = SettingsConfigDict(env_prefix="TOLARIA_")

    epochs: int = Field(default=40, ge=1, description="Passes over the training split.")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0, le=10.0, description="Adam learning rate (host and seeds).")
    weight_decay: float = Field(default=0.0, ge=0)
    decision_interval: int = Field(default=20, ge=1, description="Training steps between decisions.")
    anticipation_steps: int = Field(
        default=2,
        ge=0,
        description="Training steps before each decision at which the controller is told one is coming, "
        "so it can warm up in the background (0: never; at most decision_interval - 1 is used).",
    )
    decision_lag_steps: int = Field(
        default=1,
        ge=0,
        description="Training steps between submitting a decision and applying its command; the decision "
        "runs beside training meanwhile (0: the trainer waits for it, within the controller's budget). "
        "At most decision_interval.",
    )
    max_consecutive_misses: int = Field(
        default=50,
        ge=1,
        description="Decisions in a row that miss the controller's deadline before the run stops (a late "
        "decision is dropped and counted; only a policy that never answers in time stops a run).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of every random choice of the run.")
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads of the trainer.")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the run computes: auto (the first CUDA device when there is one, else the CPU), "
        "cpu, cuda or cuda:N. A run given its own model computes on that model's device.",
    )
    hardware_context: bool = Field(
        default=True,
        description="Measure the device's memory for every packet (Tamiyo's graph and resource gate read "
        "it). Off: packets name the device only, so a GNN run's inputs do not depend on the machine's "
        "state (runs compared bit for bit, resumed or not).",
    )
    eval_batch_size: int = Field(default=1024, ge=1)
    checkpoint_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400.0,
        description="Seconds of training between periodic checkpoints (a crash loses at most about this "
        "much). A checkpoint also follows every structural change (a seed or growth germinated, "
        "fossilised or culled, or parameters added, merged or retired) and ends the run.",
    )
    checkpoint_every_epochs: int = Field(
        default=0, ge=0, description="Also a checkpoint every this many epochs (0: none by epochs)."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept on disk (newest).")
    # Loss explosion: NaN/inf, or a spike above `spike_factor` times the running loss (and by at least
    # `spike_min_delta`), once `spike_warmup_steps` have set the running loss.
    spike_factor: float = Field(default=4.0, gt=1.0)
    spike_min_delta: float = Field(default=1.0, gt=0)
    spike_warmup_steps: int = Field(default=50, ge=1)
    loss_ema_decay: float = Field(default=0.95, gt=0, lt=1)
    rollback_lr_factor: float = Field(
        default=0.5, gt=0, le=1.0, description="lr multiplier after a rollback."
    )
    max_rollbacks: int = Field(default=3, ge=0)
    halt_on_divergence: bool = Field(
        default=True,
        description="A run that diverges (max_rollbacks used up) broadcasts a HALT to every process on the "
        "bus. Off: it ends alone, failed (Simic's actors: a diverged episode is an outcome to learn from, "
        "not an emergency).",
    )
    max_controller_failures: int = Field(
        default=3, ge=1, description="Consecutive failed decisions before the run stops."
    )
    max_params: int = Field(
        default=0,
        ge=0,
        description="Growth budget: the controller grows the model no further than this many parameters "
        "(host and seeds; 0: unbounded).",
    )
    host_width: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Width the host starts at (0: the host's default): units of each MLP layer, channels "
        "of the first conv layer (the second has twice as many), the Transformer's feed-forward width.",
    )
    min_lr: float = Field(default=1e-6, gt=0, le=10.0)
    max_lr: float = Field(default=1.0, gt=0, le=10.0)

    @model_validator(mode="after")
    def _lag_within_interval(self) -> TolariaSettings:
        if self.decision_lag_steps > self.decision_interval:
            raise ValueError(
                f"decision_lag_steps ({self.decision_lag_steps}) must be at most decision_interval "
                f"({self.decision_interval}): one decision is in flight at a time"
            )
        return self
