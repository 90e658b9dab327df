"""Does Simic's learned policy beat the heuristic? Baselines side by side on held-out generated tasks.

Recipe (DESIGN §10: "baselines run side by side"):

1. Record: the heuristic controls runs on `--train-tasks` generated tasks; Tamiyo's store and outbox put
   its decisions and field reports on an embedded bus.
2. Imitation: Simic pre-trains the GNN on those decisions (the imitation-only policy).
3. PPO: for `--iterations` rounds, the current GNN (sampling) controls runs on the training tasks, and
   Simic trains a PPO round on everything the GNN decided so far; a candidate that fails validation is
   not taken (the round says why).
4. Evaluate on held-out tasks (other seeds), same seeds for every policy: WAIT-only (no growth), the
   heuristic, the imitation-only GNN and the learned GNN (both sampling, as Tamiyo deploys them by
   default). Final validation accuracy, final parameter count and accuracy per thousand parameters; mean
   and a 95% confidence half-width over seeds. Accuracy per parameter on its own favours never growing
   (the WAIT-only control sets that bar): read it next to accuracy.

The GNN uses narrow layers (hidden 64) to fit the time budget; the architecture is Tamiyo's own. Figures
are noisy on a shared 2-core machine. The last line is one JSON object with every figure.

    .venv/bin/python benchmarks/policy_quality.py [--train-tasks 4] [--eval-seeds 4] [--iterations 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import SignatureVerifier, load_settings, pb
from esper.oona import EmbeddedBus, OonaSettings
from esper.simic.settings import SimicSettings
from esper.simic.trainer import RoundResult, SimicTrainer, offline_records
from esper.simic.transitions import RecordCollector
from esper.tamiyo.model.gnn import TamiyoGNNConfig
from esper.tamiyo.model.heuristic import HeuristicPolicy
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import Policy, Proposal
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.controller import BoundController
from esper.tolaria.data import make_task
from esper.tolaria.hosts import build_host
from esper.tolaria.records import RunDirectory
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue

SECRET = b"policy-quality-benchmark-secret-0123"
Row = dict[str, float]
CONFIG = TamiyoGNNConfig.sized("default", TAMIYO_SCHEMA)  # the policy a run decides with by default


class WaitOnly:
    """The no-growth control: always WAIT."""

    version = "wait-only"

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        del packet
        return Proposal(action=pb.POLICY_ACTION_WAIT, reason="wait-only control")

    def warm_up(self) -> None:
        """Nothing to warm up."""

    def state(self) -> dict[str, Any]:
        """No state."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def run_task(
    work: Path,
    name: str,
    policy: Policy,
    tamiyo: TamiyoSettings,
    *,
    task_seed: int,
    difficulty: float,
    epochs: int,
    bus: EmbeddedBus | None,
) -> Row:
    """One training run of a generated task under `policy`; decisions recorded on `bus` when given."""
    run_dir = work / name
    tolaria = load_settings(TolariaSettings, environ={}, epochs=epochs, decision_interval=10, seed=task_seed)
    kasmina = load_settings(
        KasminaSettings,
        environ={},
        min_training_steps=10,
        improvement_window=2,
        min_shadowing_steps=5,
        probation_steps=10,
        embargo_steps=15,
    )
    torch.manual_seed(task_seed)
    dataset = make_task(difficulty, task_seed)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes)
    store = TamiyoStore(run_dir / "tamiyo.sqlite3") if bus is not None else None
    service = TamiyoService(tamiyo, policy, SECRET, store=store, bus=bus)
    catalogue = BlueprintCatalogue.open_default(work / "urza.sqlite3")
    try:
        manager = SeedManager(
            host.slots(),
            catalogue,
            SignatureVerifier(SECRET, freshness_s=kasmina.command_freshness_s),
            kasmina,
            training_run_id=name,
        )
        trainer = Trainer(
            settings=tolaria,
            dataset=dataset,
            host=host,
            manager=manager,
            controller=BoundController(decide=service.evaluate_step, save=dict, load=lambda _state: None),
            blueprint_ids=catalogue.ids_for("mlp"),
            run_dir=RunDirectory(run_dir),
            training_run_id=name,
        )
        outcome = trainer.fit()
    finally:
        service.close()
        catalogue.close()
        if store is not None:
            store.close()
    params = float(outcome.parameters)
    return {
        "accuracy": outcome.evaluation.accuracy,
        "params": params,
        "acc_per_kparam": outcome.evaluation.accuracy / (params / 1000.0),
    }


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and 95% half-width (normal approximation) of every figure."""
    summary: dict[str, float] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        summary[f"{key}_mean"] = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else math.nan
        summary[f"{key}_ci95"] = 1.96 * spread / math.sqrt(len(values))
    return summary


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured (one seed has no spread) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def gnn(tamiyo: TamiyoSettings, payload: bytes | None) -> GNNPolicy:
    policy = GNNPolicy(tamiyo, config=CONFIG)
    if payload is not None:
        policy.load_state_bytes(payload)
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-tasks", type=int, default=4)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--difficulty", type=float, default=0.6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    sampling = TamiyoSettings(step_timeout_ms=10_000.0, gnn_greedy=False)
    # A short imitation keeps some entropy, so the GNN's own runs still explore for PPO to learn from.
    simic = SimicSettings(min_transitions=16, imitation_epochs=5)
    train_seeds = list(range(args.train_tasks))
    eval_seeds = [1000 + index for index in range(args.eval_seeds)]
    rounds: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="esper-policy-quality-") as tmp:
        work = Path(tmp)

        def one_run(
            name: str, policy: Policy, tamiyo: TamiyoSettings, seed: int, bus: EmbeddedBus | None
        ) -> Row:
            return run_task(
                work,
                name,
                policy,
                tamiyo,
                task_seed=seed,
                difficulty=args.difficulty,
                epochs=args.epochs,
                bus=bus,
            )

        def record(tag: str, make_policy: Callable[[], Policy]) -> RecordCollector:
            bus = EmbeddedBus(work / f"bus-{tag}.sqlite3", OonaSettings())
            try:
                for seed in train_seeds:
                    one_run(f"{tag}-{seed}", make_policy(), sampling, seed, bus)
                return offline_records(bus)
            finally:
                bus.close()

        def log_round(tag: str, result: RoundResult) -> None:
            rounds.append({"round": tag, **result.to_json()})
            verdict = "published" if result.published else f"refused: {'; '.join(result.reasons)}"
            elapsed = time.monotonic() - started
            print(f"[{elapsed:6.1f}s] {tag}: {result.mode} on {result.samples} samples, {verdict}")

        # 1-2. Heuristic decisions, then the imitation bootstrap.
        heuristic_records = record("heuristic", lambda: HeuristicPolicy(sampling))
        learner = SimicTrainer(simic, sampling, gnn(sampling, None), SECRET)
        log_round("imitation", learner.run_round(heuristic_records.transitions(simic), mode="imitation"))
        imitation_payload = learner.policy.state_bytes()

        # 3. PPO rounds on the GNN's own decisions (sampling from the current policy).
        gnn_records = RecordCollector()
        for iteration in range(args.iterations):
            current = learner.policy.state_bytes()

            def current_gnn(weights: bytes = current) -> Policy:
                return gnn(sampling, weights)

            gnn_records.extend(record(f"gnn{iteration}", current_gnn).messages())
            log_round(f"ppo{iteration}", learner.run_round(gnn_records.transitions(simic), mode="ppo"))
        learned_payload = learner.policy.state_bytes()

        # 4. Held-out tasks, every policy on the same seeds.
        contenders: dict[str, Callable[[], Policy]] = {
            "wait_only": WaitOnly,
            "heuristic": lambda: HeuristicPolicy(sampling),
            "imitation_gnn": lambda: gnn(sampling, imitation_payload),
            "learned_gnn": lambda: gnn(sampling, learned_payload),
        }
        results: dict[str, dict[str, float]] = {}
        for name, make_policy in contenders.items():
            rows = [
                one_run(f"eval-{name}-{seed}", make_policy(), sampling, seed, None) for seed in eval_seeds
            ]
            figures = results[name] = summarise(rows)
            print(
                f"[{time.monotonic() - started:6.1f}s] {name:14s} accuracy {figures['accuracy_mean']:.4f} "
                f"± {figures['accuracy_ci95']:.4f}  params {figures['params_mean']:9.0f}  "
                f"acc/kparam {figures['acc_per_kparam_mean']:.5f}"
            )

    heuristic, learned = results["heuristic"], results["learned_gnn"]
    wait, imitation = results["wait_only"], results["imitation_gnn"]
    summary = {
        "benchmark": "policy_quality",
        "train_tasks": args.train_tasks,
        "eval_seeds": eval_seeds,
        "epochs": args.epochs,
        "difficulty": args.difficulty,
        "gnn_hidden_dim": CONFIG.hidden_dim,
        "gnn_dims": CONFIG.dims(),
        "results": results,
        "learned_vs_heuristic_acc_per_kparam_ratio": learned["acc_per_kparam_mean"]
        / heuristic["acc_per_kparam_mean"],
        "learned_vs_heuristic_accuracy_delta": learned["accuracy_mean"] - heuristic["accuracy_mean"],
        "learned_beats_heuristic_on_acc_per_param": learned["acc_per_kparam_mean"]
        > heuristic["acc_per_kparam_mean"],
        # Accuracy per parameter alone is maximal for never growing: these say whether a policy grows
        # and whether its growth pays against the WAIT-only control and against its own starting point.
        "learned_vs_wait_accuracy_delta": learned["accuracy_mean"] - wait["accuracy_mean"],
        "imitation_vs_wait_accuracy_delta": imitation["accuracy_mean"] - wait["accuracy_mean"],
        "learned_vs_imitation_accuracy_delta": learned["accuracy_mean"] - imitation["accuracy_mean"],
        "learned_grows": learned["params_mean"] > wait["params_mean"],
        "ppo_rounds_published": sum(1 for r in rounds if r["mode"] == "ppo" and r["published"]),
        "rounds": rounds,
        "wall_seconds": time.monotonic() - started,
    }
    print(json.dumps(_finite_or_null(summary)))


if __name__ == "__main__":
    main()
