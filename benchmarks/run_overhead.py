"""What does Esper's loop cost over plain PyTorch? `esper run`'s training against a plain loop, taking turns.

For each case (task:host) and repetition, in one process:
- `esper`: Tolaria's trainer with Kasmina's seeds and Tamiyo's service, as `esper run` builds them (heuristic
  controller, default settings, the run directory written to a scratch folder), timed around `fit()`;
- `wait`: the same under the WAIT-only control (no growth, so the plain twin trains the same model);
- `plain`: a 20-line PyTorch loop training the esper run's *final* architecture (a copy of the grown host,
  its weights re-initialised): same data, batch size, Adam, weight decay and order of batches, and a
  validation pass every `decision_interval` steps, as the trainer evaluates.
Ratios are esper / plain (and wait / plain-of-the-initial-host) per repetition; the median is reported.
Then one instrumented run of each shows where the time goes, per step: forward, backward, optimizer,
Kasmina (observe_backward, advance, events, parameter changes), evaluation, decision, checkpoint, records,
and the rest of the trainer's Python, with how often each was entered (checkpoints taken, decisions).
Instrumentation adds its own cost; the ratios come from the uninstrumented runs. The controller is
Tamiyo's service with its decisions pipelined (submit, then collect `TOLARIA_DECISION_LAG_STEPS` later), as
`esper run` binds it. The load average (1, 5, 15 min) is recorded before and after each case: the ratios
mean something only on a machine where this is the one busy process.

    .venv/bin/python benchmarks/run_overhead.py [--repeats 3] [--epochs 20]
        [--cases digits:mlp digits:cnn generated:mlp] [--device cpu|cuda|cuda:N|auto]

`--device`: where both sides train (the data is put there first, as `esper run` does); CUDA work is
synchronised before each clock is read.

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_support import bound_controller, build_trainer, reinitialised
from esper.leyline import load_settings
from esper.tamiyo import HeuristicPolicy
from esper.tamiyo.model.heuristic import WaitOnlyPolicy
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController, Controller
from esper.tolaria.data import Dataset
from esper.tolaria.device import resolve_device
from esper.tolaria.hosts import build_host
from esper.tolaria.run import load_task
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue

CASES = ("digits:mlp", "digits:cnn", "generated:mlp")
TARGET = 1.15


class PhaseClock:
    """Exclusive time per phase: time spent in a nested phase counts for the inner one only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[tuple[str, float]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.calls[name] += 1
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((name, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            inner, since = self._stack.pop()
            self.seconds[inner] += end - since
            if self._stack:
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, end)


@contextmanager
def timed_backward(clock: PhaseClock) -> Iterator[None]:
    original = torch.Tensor.backward
    torch.Tensor.backward = clock.wrap("backward", original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


def controller(policy: str) -> BoundController:
    """Tamiyo's service with the heuristic or WAIT-only policy, at the default budget of `esper run`, bound
    as `esper run` binds it: decisions submitted, then collected `decision_lag_steps` later."""
    settings = load_settings(TamiyoSettings, environ={})
    chosen = HeuristicPolicy(settings) if policy == "heuristic" else WaitOnlyPolicy()
    return bound_controller(chosen, pipelined=True)


class TimedController:
    """A controller whose calls count as the `decision` phase."""

    def __init__(self, inner: Controller, clock: PhaseClock) -> None:
        self.prepare = clock.wrap("decision", inner.prepare)
        self.anticipate = clock.wrap("decision", inner.anticipate)
        self.evaluate_step = clock.wrap("decision", inner.evaluate_step)
        self.submit = clock.wrap("decision", inner.submit)
        self.collect = clock.wrap("decision", inner.collect)
        self.export_state = inner.export_state
        self.restore_state = inner.restore_state
        self.checkpointed = inner.checkpointed
        self.rewound = inner.rewound


def esper_trainer(
    dataset: Dataset,
    *,
    kind: str,
    policy: str,
    settings: TolariaSettings,
    catalogue: BlueprintCatalogue,
    work: Path,
) -> Trainer:
    torch.manual_seed(settings.seed)
    host = build_host(kind, dataset.input_shape, dataset.num_classes).to(dataset.x_train.device)
    return build_trainer(
        dataset=dataset,
        host=host,
        controller=controller(policy),
        settings=settings,
        catalogue=catalogue,
        work=work,
        run_id=f"overhead-{kind}-{policy}-{time.monotonic_ns()}",
    )


def instrument(trainer: Trainer, clock: PhaseClock) -> None:
    """Wrap the trainer's parts so that `clock` sees each phase (exclusive times)."""
    manager = trainer.manager
    for name in ("observe_backward", "advance", "arm_gradient_probes"):
        setattr(manager, name, clock.wrap("kasmina", getattr(manager, name)))
    trainer._flush_events = clock.wrap("kasmina", trainer._flush_events)  # type: ignore[method-assign]
    trainer._apply_parameter_changes = clock.wrap(  # type: ignore[method-assign]
        "kasmina", trainer._apply_parameter_changes
    )
    trainer._evaluate = clock.wrap("evaluation", trainer._evaluate)  # type: ignore[method-assign]
    trainer.save_checkpoint = clock.wrap("checkpoint", trainer.save_checkpoint)  # type: ignore[method-assign]
    trainer.train_step = clock.wrap("trainer_python", trainer.train_step)  # type: ignore[method-assign]
    trainer.decide = clock.wrap("decision_python", trainer.decide)  # type: ignore[method-assign]
    trainer.controller = TimedController(trainer.controller, clock)
    for log in trainer.run_dir.logs().values():
        log.append = clock.wrap("records", log.append)  # type: ignore[method-assign]
    trainer.host.forward = clock.wrap("forward", trainer.host.forward)  # type: ignore[method-assign]
    optimizer_step = trainer.optimizer.step

    def step() -> None:
        with clock.phase("optimizer"):
            optimizer_step()

    trainer.optimizer.step = step  # type: ignore[method-assign]


def plain_loop(
    model: nn.Module, dataset: Dataset, settings: TolariaSettings, clock: PhaseClock | None
) -> float:
    """Train `model` as a user would in plain PyTorch; returns wall seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    forward = model.forward
    if clock is not None:
        model.forward = clock.wrap("forward", forward)  # type: ignore[method-assign]
    n = len(dataset.x_train)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    started = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch))
        for index in range(steps_per_epoch):
            batch = order[index * settings.batch_size : (index + 1) * settings.batch_size]
            model.train()
            loss = nn.functional.cross_entropy(model(dataset.x_train[batch]), dataset.y_train[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if clock is None:
                optimizer.step()
            else:
                with clock.phase("optimizer"):
                    optimizer.step()
            step += 1
            if step % settings.decision_interval == 0:
                with clock.phase("evaluation") if clock is not None else _nothing():
                    _validate(model, dataset, settings.eval_batch_size)
    _synchronise(dataset.x_train.device)
    return time.perf_counter() - started


def _synchronise(device: torch.device) -> None:
    """Wait for the queued device work, so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _validate(model: nn.Module, dataset: Dataset, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset.x_val), batch_size):
            xb, yb = dataset.x_val[start : start + batch_size], dataset.y_val[start : start + batch_size]
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(1, len(dataset.x_val))
    return loss_sum / n, correct / n


def timed_fit(trainer: Trainer) -> float:
    started = time.perf_counter()
    trainer.fit()
    _synchronise(trainer.device)
    return time.perf_counter() - started


def per_step(clock: PhaseClock, steps: int) -> dict[str, float]:
    return {name: 1e6 * seconds / steps for name, seconds in sorted(clock.seconds.items())}


def load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes."""
    return [round(value, 2) for value in os.getloadavg()]


def run_case(
    case: str, repeats: int, epochs: int, catalogue: BlueprintCatalogue, work: Path, *, device: str = "cpu"
) -> dict[str, Any]:
    task, kind = case.split(":")
    load_before = load_average()
    settings = load_settings(TolariaSettings, environ={}, epochs=epochs, device=device)
    torch.set_num_threads(settings.threads)
    dataset = load_task(task, kind, seed=settings.seed, difficulty=0.5).to(resolve_device(device))
    rows: dict[str, list[float]] = defaultdict(list)
    final_params: list[int] = []
    for _ in range(repeats):
        grown = esper_trainer(
            dataset, kind=kind, policy="heuristic", settings=settings, catalogue=catalogue, work=work
        )
        rows["esper_s"].append(timed_fit(grown))
        final_params.append(grown.host.parameter_count())
        rows["plain_final_s"].append(plain_loop(reinitialised(grown.host), dataset, settings, None))
        waiting = esper_trainer(
            dataset, kind=kind, policy="wait", settings=settings, catalogue=catalogue, work=work
        )
        rows["wait_s"].append(timed_fit(waiting))
        rows["plain_initial_s"].append(plain_loop(reinitialised(waiting.host), dataset, settings, None))
    esper_ratios = [e / p for e, p in zip(rows["esper_s"], rows["plain_final_s"], strict=True)]
    wait_ratios = [w / p for w, p in zip(rows["wait_s"], rows["plain_initial_s"], strict=True)]
    # Where the time goes: one instrumented run of each side.
    breakdown: dict[str, dict[str, float]] = {}
    for policy in ("heuristic", "wait"):
        clock = PhaseClock()
        trainer = esper_trainer(
            dataset, kind=kind, policy=policy, settings=settings, catalogue=catalogue, work=work
        )
        instrument(trainer, clock)
        with timed_backward(clock):
            trainer.fit()
        breakdown[f"esper_{policy}_us_per_step"] = per_step(clock, trainer.total_steps)
        breakdown[f"esper_{policy}_calls"] = dict(sorted(clock.calls.items()))
        plain_clock = PhaseClock()
        with timed_backward(plain_clock), plain_clock.phase("loop_python"):
            plain_loop(reinitialised(trainer.host), dataset, settings, plain_clock)
        breakdown[f"plain_{policy}_us_per_step"] = per_step(plain_clock, trainer.total_steps)
    steps = epochs * max(1, math.ceil(len(dataset.x_train) / settings.batch_size))
    return {
        "case": case,
        "steps": steps,
        "final_params": final_params,
        **{name: values for name, values in rows.items()},
        "esper_vs_plain": esper_ratios,
        "esper_vs_plain_median": statistics.median(esper_ratios),
        "wait_vs_plain": wait_ratios,
        "wait_vs_plain_median": statistics.median(wait_ratios),
        "meets_target": statistics.median(esper_ratios) <= TARGET,
        "wait_meets_target": statistics.median(wait_ratios) <= TARGET,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **breakdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu).")
    args = parser.parse_args()
    device = resolve_device(args.device)  # a device this machine lacks stops here, before any work
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        with BlueprintCatalogue.open_default(work / "urza.sqlite3") as catalogue:
            for case in args.cases:
                result = run_case(case, args.repeats, args.epochs, catalogue, work, device=args.device)
                results.append(result)
                print(
                    f"{case:14s} esper/plain {result['esper_vs_plain_median']:.2f}x "
                    f"(wait/plain {result['wait_vs_plain_median']:.2f}x), "
                    f"{result['steps']} steps, final params {result['final_params']}, "
                    f"load {result['load_average_before']} -> {result['load_average_after']}"
                )
                for side in ("esper_heuristic", "plain_heuristic", "esper_wait"):
                    parts = ", ".join(f"{k} {v:.0f}" for k, v in result[f"{side}_us_per_step"].items())
                    print(f"    {side} us/step: {parts}")
    summary = {
        "benchmark": "run_overhead",
        "target": TARGET,
        "repeats": args.repeats,
        "epochs": args.epochs,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "cases": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
