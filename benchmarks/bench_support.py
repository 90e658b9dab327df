"""What the training benchmarks share: one way to build a trainer as `esper run` does (the run
assembly), the controller bound to it, a fresh copy of a final model, and the mean with its 95% t-interval.

Imported by the benchmark scripts beside it (`growth_baselines.py`, `growth_vs_static.py`,
`run_overhead.py`); not a benchmark itself.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import statistics
from pathlib import Path

from torch import nn

from esper.assembly import RunAssembly, RunInputs, RunSettings
from esper.assembly.tamiyo import pipelined_controller
from esper.kasmina import KasminaSettings
from esper.leyline import load_settings
from esper.tamiyo import HeuristicPolicy, TamiyoService
from esper.tamiyo.model.heuristic import WaitOnlyPolicy
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController
from esper.tolaria.data import Dataset
from esper.tolaria.hosts import Host
from esper.tolaria.run import RunConfig
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue

SECRET = b"esper-benchmark-signing-secret"
# The runs `build_trainer` opened (their logs), closed when the benchmark process ends.
_OPEN_RUNS = contextlib.ExitStack()
atexit.register(_OPEN_RUNS.close)
# Two-sided 95% Student t quantiles by degrees of freedom (a normal quantile beyond the table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def bound_controller(
    policy: HeuristicPolicy | WaitOnlyPolicy,
    *,
    step_timeout_ms: float | None = None,
    pipelined: bool = False,
) -> BoundController:
    """Tamiyo's service with `policy`, bound for Tolaria: decisions taken at submit (as a BoundController
    without start/finish does), or, `pipelined`, submitted and collected `decision_lag_steps` later as
    `esper run` binds it. `step_timeout_ms` overrides the budget where a benchmark measures growth, not
    latency, on a shared machine."""
    overrides = {} if step_timeout_ms is None else {"step_timeout_ms": step_timeout_ms}
    settings = load_settings(TamiyoSettings, environ={}, **overrides)
    service = TamiyoService(settings, policy, SECRET)
    if not pipelined:
        return BoundController(decide=service.evaluate_step, save=policy.state, load=policy.restore)
    return pipelined_controller(service)


def build_trainer(
    *,
    dataset: Dataset,
    host: Host,
    controller: BoundController,
    settings: TolariaSettings,
    catalogue: BlueprintCatalogue,
    work: Path,
    run_id: str,
    kasmina: KasminaSettings | None = None,
) -> Trainer:
    """Tolaria's trainer over `host` with Kasmina's seed manager (growth included), as the run assembly
    builds it for `esper run`, writing its run directory under `work`; Kasmina's defaults unless
    `kasmina` is given.

    The run is isolated (no bus, no Tamiyo store) and borrows the caller's catalogue and controller; the
    benchmark drives `fit` itself, and the run's logs stay open until the process ends."""
    config = RunConfig(
        task=dataset.name,
        host=host.slot_kind,
        policy="benchmark",
        difficulty=0.0,
        run_dir=work / run_id,
        catalogue_path=work / "urza.sqlite3",
        training_run_id=run_id,
        tolaria=settings,
        kasmina=kasmina or load_settings(KasminaSettings, environ={}),
    )
    run = RunAssembly(
        RunSettings.resolve(environ={}),
        config,
        secret=SECRET,
        inputs=RunInputs(dataset, host),
        controller=controller,
        catalogue=catalogue,
        deployment=False,
    )
    return _OPEN_RUNS.enter_context(run).prepare()


def reinitialised(model: nn.Module) -> nn.Module:
    """A copy of `model`'s architecture with every parameter initialised afresh."""
    fresh = copy.deepcopy(model)
    # An instrumented host carries its timed `forward` on the instance; the copy would share that closure
    # and run the original's forward (training the original, leaving its own parameters without grads).
    fresh.__dict__.pop("forward", None)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def mean_ci95(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the half-width of the 95% t-interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": 0.0, "ci95": float("nan")}
    std = statistics.stdev(values)
    return {"mean": mean, "std": std, "ci95": T95.get(len(values) - 1, 1.96) * std / len(values) ** 0.5}
