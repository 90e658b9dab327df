"""Tamiyo's settings, resolved once (prefix `TAMIYO_`) and passed to every component."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from esper.leyline.settings import DAY_S, HOUR_S, MAX_BACKOFF_MULTIPLIER, MINUTE_S, StrictSettings


class TamiyoSettings(StrictSettings):
    """Every knob of Tamiyo. Defaults follow the brief (P1, P2, P8, P9)."""

    model_config = SettingsConfigDict(env_prefix="TAMIYO_")

    # P1: the hard budget of one `evaluate_step`.
    step_timeout_ms: float = Field(
        default=5.0, gt=0, le=MINUTE_S * 1000, description="Deadline of one decision."
    )
    metadata_timeout_ms: float = Field(
        default=20.0, gt=0, le=MINUTE_S * 1000, description="Deadline of a catalogue fetch."
    )
    # P2: compilation of the GNN.
    enable_compile: bool = Field(default=False, description="torch.compile the GNN (with warm-up).")
    enable_plan: bool = Field(
        default=True, description="Trace the GNN's inference path per topology when warming up on it."
    )
    enable_cuda_graph: bool = Field(
        default=False,
        description="P7: capture the GNN's decision forward in a CUDA graph per topology when warming up "
        "on it (a policy on CUDA only; elsewhere it reports not available; a graph of another topology "
        "runs the traced plan or the dense path, and the next warm-up captures again).",
    )
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Where the policy's network lives and runs (its tensors follow its parameters).",
    )
    cpu_threads: int = Field(default=1, ge=1, le=256, description="torch threads of the inference worker.")
    policy: Literal["heuristic", "gnn"] = Field(default="heuristic", description="Policy of `esper run`.")
    policy_size: Literal["default", "full"] = Field(
        default="default",
        description="Size of the GNN policy: `default` is sized to decide within the step budget on a "
        "2-core x86 CPU; `full` is the original, 24x larger network, for a GPU. A checkpoint loads only "
        "into a policy of its own size.",
    )
    prepare_budget_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Share of the step budget the graph build and the network may take when measured at "
        "start (the rest is for validation, risk gates, signing and the machine's noise); above it the "
        "run warns that decisions will miss their deadline.",
    )
    heuristic_growth: bool = Field(
        default=True,
        description="The heuristic also widens and deepens layers (off: it only germinates seeds).",
    )
    heuristic_grow_early: bool = Field(
        default=True,
        description="The heuristic grows from the first decision while growth pays, not only on a "
        "plateau (a static model spends its compute at full size all along; a grown one is small first).",
    )
    heuristic_widen_fraction: float = Field(
        default=1.0, gt=0.0, le=4.0, description="A widen adds this fraction of the layer's width (>= 1)."
    )
    heuristic_min_gain_per_parameter: float = Field(
        default=1e-5,
        ge=0.0,
        le=1.0,
        description="A layer stops widening once its last kept widen lowered the validation loss by less "
        "than this per added parameter (nats per parameter).",
    )
    heuristic_last_growth_progress: float = Field(
        default=0.85,
        ge=0.0,
        le=1.0,
        description="The heuristic starts no growth or seed once this share of the run's steps is done.",
    )
    heuristic_budget_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="The heuristic grows the model to at most this share of the run's growth budget "
        "(TOLARIA_MAX_PARAMS); 1: all of it. Without a budget it has no effect.",
    )
    heuristic_growth_min_improvement: float = Field(
        default=0.10,
        ge=0.0,
        le=1.0,
        description="Relative validation-loss improvement below which the heuristic sees a growth plateau.",
    )
    policy_checkpoint: Path | None = Field(
        default=None, description="safetensors weights of the GNN policy (untrained weights when unset)."
    )
    # P8: blend-mode annotations on seed commands.
    enable_blend_mode_ann: bool = Field(default=True)
    # Telemetry publishing (off the decision's thread).
    telemetry_queue_size: int = Field(
        default=256, ge=1, description="Telemetry packets waiting for the bus before new ones are dropped."
    )
    telemetry_close_timeout_s: float = Field(
        default=2.0, gt=0, le=MINUTE_S, description="How long close() lets queued telemetry reach the bus."
    )
    # Graph builder.
    strict_graph: bool = Field(default=False, description="Raise on a missing feature instead of masking.")
    lifecycle_actions_only: bool = Field(
        default=False,
        description="Mask ADJUST_LR and PAUSE in every graph's action mask: the GNN (and the learner that "
        "rebuilds its graphs) chooses among waiting and the seed lifecycle only.",
    )
    max_layers: int = Field(default=128, ge=1)
    max_seeds: int = Field(default=32, ge=1)
    max_blueprints: int = Field(default=16, ge=1)
    normalizer_flush_every: int = Field(
        default=64, ge=1, description="Graph builds between writes of the normaliser statistics."
    )
    # Inference worker.
    warmup_timeout_ms: float = Field(
        default=120_000.0,
        gt=0,
        le=HOUR_S * 1000,
        description="Deadline of the start-up warm-up (compile included).",
    )
    worker_max_retired: int = Field(
        default=2, ge=0, description="Late workers allowed to wind down at once before decisions fail."
    )
    worker_join_timeout_s: float = Field(default=5.0, gt=0, le=HOUR_S, description="How long close() waits.")
    realtime_priority: int = Field(
        default=10,
        ge=0,
        le=98,
        description="SCHED_FIFO priority of a decision: the inference thread, and the calling thread (one "
        "above) from the packet to the signed command (0: the OS's normal scheduling). Needs "
        "CAP_SYS_NICE or an RLIMIT_RTPRIO allowance; without one an event says so and decisions run at "
        "normal priority.",
    )
    realtime_required: bool = Field(
        default=False,
        description="Refuse to start when the real-time priority cannot be had, instead of announcing it.",
    )
    # Risk gates.
    risk_loss_spike_ratio: float = Field(
        default=1.5, gt=1.0, description="validation_loss above ratio x its running baseline is a spike."
    )
    risk_loss_warmup_steps: int = Field(default=3, ge=1, description="Packets before spikes are judged.")
    risk_loss_ema_decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    risk_latency_fraction: float = Field(
        default=0.9, gt=0.0, description="Last latency above fraction x step budget holds growth."
    )
    risk_max_isolation_violations: float = Field(default=0.0, ge=0.0)
    risk_max_blueprint_risk: float = Field(default=0.8, ge=0.0)
    risk_allow_high_risk_tier: bool = Field(default=False)
    risk_require_blueprint_metadata: bool = Field(
        default=False,
        description="Hold GERMINATE when no catalogue lookup is wired (an unknown blueprint is always held).",
    )
    risk_min_free_memory_frac: float = Field(default=0.05, ge=0.0, le=1.0)
    risk_max_utilization_percent: float = Field(default=98.0, gt=0.0, le=100.0)
    risk_max_temperature_celsius: float = Field(default=90.0, gt=0.0)
    # P8: parameters of the blend-mode annotations.
    blend_gate_k: float = Field(default=10.0, gt=0.0, description="CONFIDENCE gate steepness.")
    blend_gate_tau: float = Field(default=0.5, ge=0.0, le=1.0, description="CONFIDENCE gate threshold.")
    blend_alpha_lo: float = Field(default=0.0, ge=0.0, le=1.0)
    blend_alpha_hi: float = Field(default=1.0, ge=0.0, le=1.0)
    blend_channel_alpha_init: float = Field(
        default=0.982, gt=0.0, lt=1.0, description="CHANNEL: each channel gate's opening when a seed starts."
    )
    # GNN policy.
    gnn_seed: int = Field(default=0, ge=0, description="Seed of weight initialisation and sampling.")
    gnn_greedy: bool = Field(default=False, description="Take the most likely choice instead of sampling.")
    gnn_widen_units: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(2, 4, 8),
        min_length=1,
        description="Units a GNN WIDEN may add, comma-separated (each one of 1, 2, 4, 8, 16, 32: the amount "
        "head's options).",
    )
    # P9: field-report lifecycle.
    fr_obs_window_epochs: int = Field(
        default=1, ge=1, description="Epochs a decision is observed for before its field report is written."
    )
    fr_success_accuracy_gain: float = Field(
        default=0.005, ge=0.0, description="Accuracy gain over the window at which the outcome is SUCCESS."
    )
    fr_regression_accuracy_drop: float = Field(
        default=0.01, ge=0.0, description="Accuracy loss over the window at which the outcome is REGRESSION."
    )
    fr_regression_loss_rise: float = Field(
        default=0.1, ge=0.0, description="Relative rise of validation loss that makes the outcome REGRESSION."
    )
    fr_outbox_batch: int = Field(default=256, ge=1, description="Outbox entries published per bus call.")
    fr_outbox_poll_ms: float = Field(
        default=1000.0,
        gt=0,
        le=HOUR_S * 1000,
        description="Longest the outbox publisher sleeps when nothing is due.",
    )
    fr_retry_backoff_ms: float = Field(default=1000.0, gt=0, le=HOUR_S * 1000)
    fr_retry_backoff_mult: float = Field(default=2.0, ge=1.0, le=MAX_BACKOFF_MULTIPLIER)
    fr_retry_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    fr_retry_limit: int = Field(default=8, ge=0)
    retention_days: float = Field(default=30.0, gt=0, le=10 * 365)
    # P3: policy-update intake.
    update_freshness_s: float = Field(default=3600.0, gt=0, le=30 * DAY_S)
    update_probation_decisions: int = Field(
        default=8, ge=1, description="Decisions a newly swapped-in policy is watched for (rollback window)."
    )
    update_probation_max_failures: int = Field(
        default=1, ge=1, description="Failed or late decisions in the window that roll the policy back."
    )
    update_max_sequence_step: int = Field(
        default=10_000,
        ge=1,
        description="Largest step an update's sequence may take past the newest accepted one; a larger one "
        "is refused (accepted, it would make every later update look old).",
    )

    @field_validator("gnn_widen_units", mode="before")
    @classmethod
    def _split_units(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("gnn_widen_units")
    @classmethod
    def _known_units(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        from esper.tamiyo.model.proposal import WIDEN_UNITS

        unknown = sorted(set(value) - set(WIDEN_UNITS))
        if unknown:
            raise ValueError(f"{unknown} are not widen amount options {list(WIDEN_UNITS)}")
        return value
