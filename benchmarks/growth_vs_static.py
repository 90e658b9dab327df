"""Does growth pay? A narrow host grown by the heuristic against a static network of its final shape.

For each case (task, host) and each seed, four runs of the same length:
- `grown`: the host starts narrow (`--width`) and Tamiyo's heuristic grows it (WIDEN with gradient-
  informed fan-in, DEEPEN, seeds), through Tolaria's trainer as `esper run` does;
- `no_growth`: the same narrow start under the WAIT-only control;
- `static`: a deep copy of the grown run's final model with every parameter re-initialised
  (`reset_parameters` of every module, as benchmarks/run_overhead.py does), trained from scratch for the
  same epochs by a plain PyTorch loop with the trainer's optimiser, batches and learning rate: exactly the
  grown architecture, without growth;
- `random_init`: the grown run again with new units' fan-in drawn at random (the control for GradMax).

Figures per run: final validation accuracy, final parameter count, training FLOPs, wall seconds, and
`diverged` (the trainer gave up after repeated loss spikes: the run then scores the model as it was).
Training FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (the matmuls and convolutions of
the forward and the backward pass, so attention's products are included and elementwise work is not) on
sampled steps: the first, every step where the parameter count changed, and every decision interval;
between samples each step costs the last sampled FLOPs per example times its batch size. The static run
samples its first step (its size never changes). Wall seconds include, for the Esper runs, everything the
loop does besides training (evaluations with counterfactuals, decisions, checkpoints, records), which the
plain loop of `static` does not do.

Summaries: mean, sample standard deviation and the half-width of the 95% t-interval over seeds; paired
per-seed differences grown minus each control (accuracy) and the grown/static FLOPs ratio.

Seeds 0-4 (the default) are held out; the heuristic's growth settings were chosen on seeds 100-104.

    .venv/bin/python benchmarks/growth_vs_static.py [--seeds 5] [--first-seed 0] [--epochs 40]
        [--cases digits:mlp ...] [--width N]

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.kasmina import KasminaSettings
from esper.leyline import load_settings, pb
from esper.tamiyo import HeuristicPolicy
from esper.tamiyo.model.heuristic import HeuristicSettings, WaitOnlyPolicy
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.data import Dataset
from esper.tolaria.hosts import Host, build_host
from esper.tolaria.run import load_task
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import TrainingDiverged
from esper.urza import BlueprintCatalogue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support import bound_controller, build_trainer, mean_ci95, reinitialised

DECISION_BUDGET_MS = 100.0
# case -> (task, host, difficulty)
CASES: dict[str, tuple[str, str, float]] = {
    "digits:mlp": ("digits", "mlp", 0.5),
    "digits:cnn": ("digits", "cnn", 0.5),
    "generated-0.3:mlp": ("generated", "mlp", 0.3),
    "generated-0.5:mlp": ("generated", "mlp", 0.5),
    "generated-0.7:mlp": ("generated", "mlp", 0.7),
    "signals:conv1d": ("signals", "conv1d", 0.5),
    "signals:mlp": ("signals", "mlp", 0.5),
    "tokens:transformer": ("tokens", "transformer", 0.5),
}
# The narrow start of each host (TOLARIA_HOST_WIDTH): MLP units, first conv channels, feed-forward units.
NARROW = {"mlp": 4, "cnn": 4, "conv1d": 4, "transformer": 4}
RUNS = ("grown", "no_growth", "static", "random_init")


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    steps = max(1, math.ceil(n / batch_size))
    return [min(batch_size, n - i * batch_size) for i in range(steps)]


def _flops(run: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def esper_run(
    case: str,
    seed: int,
    policy_name: str,
    *,
    epochs: int,
    width: int,
    catalogue: BlueprintCatalogue,
    work: Path,
) -> tuple[dict[str, Any], Host]:
    """One run through Tolaria's trainer; its figures and its final host."""
    task, kind, difficulty = CASES[case]
    settings = load_settings(TolariaSettings, environ={}, seed=seed, epochs=epochs, host_width=width)
    torch.manual_seed(seed)
    dataset = load_task(task, kind, seed=seed, difficulty=difficulty)
    host = build_host(
        kind, dataset.input_shape, dataset.num_classes, vocab_size=dataset.vocab_size, width=width
    )
    run_id = f"gvs-{case.replace(':', '-')}-{policy_name}-{seed}"
    policy: HeuristicPolicy | WaitOnlyPolicy
    if policy_name == "no_growth":
        policy = WaitOnlyPolicy()
    else:
        init = pb.GROWTH_INIT_RANDOM if policy_name == "random_init" else pb.GROWTH_INIT_GRADMAX
        # The heuristic as `esper run` configures it (TAMIYO_HEURISTIC_* apply), growth on.
        tamiyo = load_settings(TamiyoSettings)
        policy = HeuristicPolicy(
            replace(HeuristicSettings.from_tamiyo(tamiyo), enable_growth=True, widen_init=init)
        )
    trainer = build_trainer(
        dataset=dataset,
        host=host,
        controller=bound_controller(policy, step_timeout_ms=DECISION_BUDGET_MS),
        settings=settings,
        catalogue=catalogue,
        work=work,
        run_id=run_id,
        kasmina=load_settings(KasminaSettings),  # as `esper run` resolves it (KASMINA_* apply)
    )
    sizes = _batch_sizes(len(dataset.x_train), settings.batch_size)
    train_step = trainer.train_step
    counted = {"flops": 0.0, "per_example": 0.0, "params": -1, "samples": 0}

    def step() -> None:
        params = host.parameter_count()
        size = sizes[trainer.step % len(sizes)]
        if params != counted["params"] or trainer.step % settings.decision_interval == 0:
            counted["per_example"] = _flops(train_step) / size
            counted["params"] = params
            counted["samples"] += 1
        else:
            train_step()
        counted["flops"] += counted["per_example"] * size

    trainer.train_step = step  # type: ignore[method-assign]
    started = time.perf_counter()
    try:
        outcome = trainer.fit()
        accuracy, diverged = outcome.evaluation.accuracy, 0.0
    except TrainingDiverged as exc:
        # Counted, not hidden: the run scores what its model computes where the trainer gave up.
        print(f"{run_id}: {exc}", file=sys.stderr)
        accuracy, diverged = _accuracy(host, dataset), 1.0
    seconds = time.perf_counter() - started
    growth = [
        record
        for record in _decisions(work / run_id)
        if record.get("accepted")
        and any(op in str(record.get("operation", "")) for op in ("WIDEN", "DEEPEN", "GERMINATE"))
    ]
    return {
        "accuracy": accuracy,
        "params": float(host.parameter_count()),
        "flops": counted["flops"],
        "seconds": seconds,
        "growths": float(len(growth)),
        "diverged": diverged,
    }, host


def _decisions(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "decisions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def static_run(grown: Host, case: str, seed: int, *, epochs: int) -> dict[str, Any]:
    """The grown architecture re-initialised and trained from scratch by a plain loop."""
    task, kind, difficulty = CASES[case]
    settings = load_settings(TolariaSettings, environ={}, seed=seed, epochs=epochs)
    dataset = load_task(task, kind, seed=seed, difficulty=difficulty)
    torch.manual_seed(seed)
    model = reinitialised(grown)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(dataset.x_train)
    sizes = _batch_sizes(n, settings.batch_size)
    per_example: float | None = None
    flops = 0.0
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for index, size in enumerate(sizes):
            batch = order[index * settings.batch_size : index * settings.batch_size + size]

            def one_step(batch: torch.Tensor = batch) -> None:
                model.train()
                loss = nn.functional.cross_entropy(model(dataset.x_train[batch]), dataset.y_train[batch])
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()

            if per_example is None:
                per_example = _flops(one_step) / size
            else:
                one_step()
            flops += per_example * size
    seconds = time.perf_counter() - started
    return {
        "accuracy": _accuracy(model, dataset),
        "params": float(sum(p.numel() for p in model.parameters())),
        "flops": flops,
        "seconds": seconds,
        "growths": 0.0,
        "diverged": 0.0,
    }


def _accuracy(model: nn.Module, dataset: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(dataset.x_val[i : i + 1024]).argmax(dim=1) == dataset.y_val[i : i + 1024]).sum())
            for i in range(0, len(dataset.x_val), 1024)
        )
    return correct / max(1, len(dataset.x_val))


def compare(
    case: str, seeds: list[int], *, epochs: int, width: int | None, catalogue: BlueprintCatalogue, work: Path
) -> dict[str, Any]:
    """Every run of one case over `seeds`, summarised."""
    start = NARROW[CASES[case][1]] if width is None else width
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNS}
    for seed in seeds:
        grown, host = esper_run(
            case, seed, "grown", epochs=epochs, width=start, catalogue=catalogue, work=work
        )
        runs["grown"].append(grown)
        runs["static"].append(static_run(host, case, seed, epochs=epochs))
        for name in ("no_growth", "random_init"):
            runs[name].append(
                esper_run(case, seed, name, epochs=epochs, width=start, catalogue=catalogue, work=work)[0]
            )
    result: dict[str, Any] = {"case": case, "width": start}
    for name in RUNS:
        result[name] = {key: mean_ci95([run[key] for run in runs[name]]) for key in runs[name][0]}
        result[name]["per_seed_accuracy"] = [run["accuracy"] for run in runs[name]]
    for name in ("no_growth", "static", "random_init"):
        result[f"grown_minus_{name}"] = mean_ci95(
            [g["accuracy"] - c["accuracy"] for g, c in zip(runs["grown"], runs[name], strict=True)]
        )
    result["flops_grown_over_static"] = mean_ci95(
        [g["flops"] / s["flops"] for g, s in zip(runs["grown"], runs["static"], strict=True)]
    )
    return result


def _row(case: str, name: str, figures: dict[str, Any]) -> str:
    accuracy = figures["accuracy"]
    return (
        f"{case:19s} {name:11s} accuracy {accuracy['mean']:.4f} ± {accuracy['ci95']:.4f}  "
        f"params {figures['params']['mean']:8.0f}  MFLOPs {figures['flops']['mean'] / 1e6:10.1f}  "
        f"seconds {figures['seconds']['mean']:6.1f}  growths {figures['growths']['mean']:.1f}  "
        f"diverged {figures['diverged']['mean'] * len(figures['per_seed_accuracy']):.0f}"
    )


def main() -> None:
    """Run every case and print the table, the last line being one JSON object."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--width", type=int, default=None, help="narrow start of every host (default: per host)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        with BlueprintCatalogue.open_default(work / "urza.sqlite3") as catalogue:
            for case in args.cases:
                result = compare(
                    case, seeds, epochs=args.epochs, width=args.width, catalogue=catalogue, work=work
                )
                results.append(result)
                for name in RUNS:
                    print(_row(case, name, result[name]), flush=True)
                for name in ("no_growth", "static", "random_init"):
                    diff = result[f"grown_minus_{name}"]
                    print(f"{case:19s} grown - {name}: {diff['mean']:+.4f} ± {diff['ci95']:.4f} (paired)")
                ratio = result["flops_grown_over_static"]
                print(
                    f"{case:19s} FLOPs grown / static: {ratio['mean']:.3f} ± {ratio['ci95']:.3f}", flush=True
                )
    print(
        json.dumps(
            {
                "benchmark": "growth_vs_static",
                "seeds": seeds,
                "epochs": args.epochs,
                "wall_seconds": time.monotonic() - started,
                "cases": {result["case"]: result for result in results},
            }
        )
    )


if __name__ == "__main__":
    main()
