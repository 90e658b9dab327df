"""`esper.grow`: grow a user's own `nn.Module` while it trains, through the one run assembly.

The model's growth points are found (or the marked `esper.GrowthPoint`s used), the data is read and one
batch is run through the model and the loss before anything is created, then the run is built and
trained by `esper.assembly.RunAssembly` exactly as `esper run` does: the same Tolaria, Kasmina and
Tamiyo, a normal run directory. The signing key and the catalogue are created on first use under
`ESPER_DATA_DIR`; there is no setup step. When the run ends its final model is exported into the run
directory (`model/`), which is what `esper export RUN_DIR` hands over for a run of a user's model.
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from esper.api.inputs import GrowInputError, check_split, default_loss, read_split, to_dataset
from esper.assembly import RunAssembly, RunInputs, RunSettings, RunSummary, require_writable
from esper.leyline import ConfigurationError, resolve_signing_secret
from esper.nissa.layout import DataLayout
from esper.tolaria.adapt import AdaptedHost, adapt_model
from esper.tolaria.export import GROWN_MODEL_DIR, USER_HOST, ExportError, export_model, model_card
from esper.tolaria.run import RunConfig, new_training_run_id

logger = logging.getLogger("esper.api")

POLICIES = ("heuristic", "gnn")


@dataclass(frozen=True)
class GrowthResult:
    """What `esper.grow` returns.

    `model` is the user's module, grown in place (its fossilised seeds and merged units are part of
    it); `host` the same model as Esper's host; `summary` the run's `RunSummary`; `run_dir` the run
    directory (`esper report`, `esper runs`, `esper watch` and `esper export` read it); `task` says
    whether accuracy applies ("classification") or only the loss does ("other")."""

    model: nn.Module
    host: AdaptedHost
    summary: RunSummary
    run_dir: Path
    task: Literal["classification", "other"]

    @property
    def metric(self) -> tuple[str, float]:
        """The figure that fits the task: ("val_accuracy", a) for a classification, else ("val_loss", l)."""
        if self.task == "classification":
            return "val_accuracy", self.summary.final_val_accuracy
        return "val_loss", self.summary.final_val_loss

    def export(self, out_dir: str | Path) -> Path:
        """Write the grown model to `out_dir` as plain weights (`esper.portable.load` reads it back)."""
        self.host.eval()
        return export_model(self.host, Path(out_dir), model_card(self.run_dir, self.host, self.summary.steps))


def _policy(policy: str | Path) -> tuple[str, dict[str, Any]]:
    """The policy name and Tamiyo overrides: a name, or a GNN checkpoint file."""
    if isinstance(policy, str) and policy in POLICIES:
        return policy, {}
    path = Path(policy)
    if not path.is_file():
        raise ConfigurationError(
            f"policy {str(policy)!r} is neither one of {', '.join(POLICIES)} nor a policy checkpoint file"
        )
    return "gnn", {"policy_checkpoint": path}


def api_command(entry: str) -> str:
    """The command status.json names for a run started from Python."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return shlex.join([script, entry])


def run_config(
    task_name: str,
    *,
    policy: str | Path,
    run_dir: str | Path | None,
    settings: Mapping[str, Mapping[str, Any]] | None,
    tolaria: Mapping[str, Any],
) -> tuple[RunSettings, RunConfig]:
    """Settings and configuration of a run of a user's model (`tolaria` entries that are None keep the
    default); refuses a bad setting, an unknown policy, a non-empty run directory or a data directory
    that cannot be written, before anything is created."""
    policy_name, tamiyo = _policy(policy)
    extra = {k: dict(v) for k, v in (settings or {}).items()}
    unknown = set(extra) - {"esper", "tolaria", "kasmina", "tamiyo", "oona", "nissa"}
    if unknown:
        raise ConfigurationError(f"settings for unknown subsystems: {sorted(unknown)}")
    given = {k: v for k, v in tolaria.items() if v is not None}
    run_settings = RunSettings.resolve(
        esper=extra.get("esper"),
        tolaria={**extra.get("tolaria", {}), **given},
        kasmina=extra.get("kasmina"),
        tamiyo={**extra.get("tamiyo", {}), **tamiyo},
        oona=extra.get("oona"),
        nissa=extra.get("nissa"),
    )
    data = DataLayout(run_settings.esper.data_dir)
    run_id = new_training_run_id()
    config = RunConfig(
        task=task_name,
        host=USER_HOST,
        policy=policy_name,
        difficulty=0.0,
        run_dir=Path(run_dir) if run_dir is not None else data.runs / run_id,
        catalogue_path=data.catalogue,
        training_run_id=run_id,
        tolaria=run_settings.tolaria,
        kasmina=run_settings.kasmina,
    )
    if config.run_dir.exists() and any(config.run_dir.iterdir()):
        raise ConfigurationError(f"run directory {config.run_dir} is not empty: give a new one")
    require_writable(run_settings.esper.data_dir, "ESPER_DATA_DIR")
    require_writable(config.run_dir, "run_dir")
    return run_settings, config


def grow(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    epochs: int = 10,
    max_params: int | None = None,
    policy: str | Path = "heuristic",
    run_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    decision_interval: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    name: str | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> GrowthResult:
    """Train `model` on `train_data` and let Esper grow it; returns the grown model and the run.

    `train_data`, `val_data`: DataLoaders (any collate yielding `(inputs, targets)` or a mapping with
    `x`/`inputs` and `y`/`targets`) or `(inputs, targets)` tensors. `loss_fn(output, targets)`: any
    loss returning the batch's mean (cross-entropy by default); accuracy is reported only for a
    classification (scores [N, C], integer labels [N]). `max_params`: the growth budget (0 or None:
    none). `policy`: "heuristic", "gnn" or a GNN policy checkpoint. `run_dir`: default
    `ESPER_DATA_DIR/runs/<run id>`. `batch_size`: default the loader's. `settings`: further overrides
    per subsystem, e.g. `{"tolaria": {"weight_decay": 1e-4}}`. `device`: only the CPU for now.

    Raises, before anything is created or trained: `NoGrowthPoints` / `GrowthPointError` (the model
    cannot grow), `GrowInputError` (data, model and loss do not fit together), `ConfigurationError`
    (a bad setting or policy).
    """
    if device not in (None, "cpu"):
        raise ConfigurationError(f"device {device!r}: esper.grow trains on the CPU only for now")
    loss = loss_fn if loss_fn is not None else default_loss()
    train = read_split(train_data, "train_data")
    val = read_split(val_data, "val_data")
    batch = batch_size or train.batch_size or 64
    classification = check_split(model, loss, train, "train_data", batch)
    check_split(model, loss, val, "val_data", batch)
    task_name = name or f"{type(model).__name__} (esper.grow)"
    dataset = to_dataset(task_name, train, val, classification=classification)
    run_settings, config = run_config(
        task_name,
        policy=policy,
        run_dir=run_dir,
        settings=settings,
        tolaria={
            "epochs": epochs,
            "batch_size": batch,
            "max_params": max_params or 0,
            "decision_interval": decision_interval,
            "lr": lr,
            "seed": seed,
        },
    )
    # The model is adapted last: every refusal above leaves it as it was.
    host = adapt_model(model, train.x[:batch])
    secret = resolve_signing_secret(run_settings.esper)
    with RunAssembly(
        run_settings,
        config,
        secret=secret,
        inputs=RunInputs(dataset, host=host, loss=loss),
        command=api_command("esper.grow"),
    ) as run:
        summary = run.train()
    result = GrowthResult(
        model=host.model,
        host=host,
        summary=summary,
        run_dir=config.run_dir,
        task="classification" if classification else "other",
    )
    save_final_model(result)
    return result


def save_final_model(result: GrowthResult) -> None:
    """Export the grown model into its run directory, for `esper export RUN_DIR`. A model that cannot be
    exported is announced (a warning) and the run stands; `esper export` then says it has no model."""
    try:
        result.export(result.run_dir / GROWN_MODEL_DIR)
    except ExportError as exc:
        logger.warning("the grown model could not be saved in the run directory: %s", exc)
        warnings.warn(f"the grown model could not be exported: {exc}", stacklevel=3)


__all__ = ["GrowInputError", "GrowthResult", "grow", "run_config", "save_final_model"]
