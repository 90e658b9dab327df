"""Tamiyo decision latency: `TamiyoService.evaluate_step` end to end with the GNN policy, default size and
full size (`TAMIYO_POLICY_SIZE`) side by side.

One decision = packet validation, graph build, GNN inference on the persistent worker (under its deadline),
risk gates, command building and HMAC signing, telemetry. Measured after warm-up, in one process, on three
packet sizes (nodes: global + layers + slots + blueprints):

    small  1 + 8 + 4 + 4      medium  1 + 48 + 16 + 8      large  1 + 128 + 32 + 16

and reported as p50/p95/p99 and the share over the 5 ms step budget, for the default policy and the
full-size one taking turns on the same packets (blocks of decisions, alternating), with their ratio.
The rest uses the default policy (what a run decides with). Also measured:
- cold start: constructing the policy and the service (warm-up included) until the first decision that
  fits the budget;
- the small and medium sizes with 20 training steps between decisions on the same thread, as `esper run`
  decides (the policy's weights are no longer in the CPU caches when a decision starts), with the
  warm-up ahead of each decision a run does (`TOLARIA_ANTICIPATION_STEPS` steps before it) and, taking
  turns with it, without that warm-up, without the traced plan, and (medium) at normal priority;
- the medium size with a training loop running beside it on another thread (DESIGN §10: measure with
  training, not only alone), and the training loop's step time alone before and after torch has run on
  the inference thread (the "second OpenMP team" slowdown);
- baselines in the same process: the heuristic policy through the same service (ratio gnn/heuristic),
  and the GNN's dense inference kernel against PyG message passing on the same graph (ratio).

Decisions are timed with a generous deadline so that a slow one is measured, not cut off; the 5 ms budget
is applied afterwards. The machine is shared: figures are noisy, compare ratios. Last line: one JSON object.

    .venv/bin/python benchmarks/tamiyo_latency.py [--decisions 300] [--warmup 30] [--trainer-threads 1]

With `--device cuda` (or cuda:N) it measures only the policy on that device, at the medium size, in the
modes asked for (`--modes eager compiled cuda_graph`): eager (the traced plan off, the dense path), compiled
(`TAMIYO_ENABLE_COMPILE`, with its warm-up time and fallbacks: P2), and the CUDA graph
(`TAMIYO_ENABLE_CUDA_GRAPH`, with the plan: P7), each with its compile/plan/capture status. Last line:
one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from esper.leyline import pb
from esper.tamiyo import GNNPolicy, HeuristicPolicy, TamiyoService
from esper.tamiyo.model.proposal import Policy
from esper.tamiyo.runtime.worker import DeadlineExceeded, WorkerSaturated
from esper.tamiyo.settings import TamiyoSettings
from esper.tolaria.device import resolve_device
from esper.tolaria.settings import TolariaSettings

SECRET = b"tamiyo-latency-benchmark-secret-0123"
PolicySize = Literal["default", "full"]  # TAMIYO_POLICY_SIZE
BUDGET_MS = 5.0
SIZES: dict[str, tuple[int, int, int]] = {"small": (8, 4, 4), "medium": (48, 16, 8), "large": (128, 32, 16)}
METRIC_KEYS = ("alpha", "alpha_steps", "alpha_total_steps", "blend_allowed", "isolation_violations")


def make_packet(n_layers: int, n_slots: int, n_blueprints: int, step: int) -> pb.SystemStatePacket:
    """A realistic packet: a dormant/active mix of seeds, full metrics, hardware context, catalogue ids."""
    packet = pb.SystemStatePacket(
        version=1,
        packet_id=f"bench-{step}",
        training_run_id="bench-run",
        source_subsystem="benchmark",
        current_epoch=step // 10,
        global_step=step * 20,
        validation_loss=1.0 / (1 + 0.01 * step),
        training_loss=0.9 / (1 + 0.01 * step),
        validation_accuracy=min(0.99, 0.5 + 0.001 * step),
        timestamp_ns=time.time_ns(),
    )
    packet.training_metrics["learning_rate"] = 3e-3
    packet.training_metrics["grad_norm"] = 1.0
    hardware = packet.hardware_context
    hardware.device_type, hardware.device_id = "cpu", "cpu:0"
    hardware.total_memory_gb, hardware.available_memory_gb = 16.0, 8.0
    hardware.utilization_percent, hardware.temperature_celsius = 50.0, 50.0
    for index in range(n_layers):
        packet.topology.layers.add(
            layer_id=f"layer-{index}", kind="linear", width=128, depth=index, parameter_count=16_512
        )
    active_stages = (pb.SEED_STAGE_TRAINING, pb.SEED_STAGE_BLENDING, pb.SEED_STAGE_PROBATIONARY)
    for index in range(n_slots):
        slot_id = f"slot-{index}"
        layer = (index * max(n_layers, 1)) // max(n_slots, 1)
        packet.topology.slots.add(slot_id=slot_id, layer_id=f"layer-{layer}", width=128, kind="mlp")
        stage = active_stages[index % 3] if index % 4 == 3 else pb.SEED_STAGE_DORMANT
        state = packet.seed_states.add(
            seed_id=f"seed-{index}", slot_id=slot_id, stage=stage, learning_rate=3e-3, layer_depth=layer
        )
        if stage != pb.SEED_STAGE_DORMANT:
            state.blueprint_id = f"bp-{index % n_blueprints}"
            state.gradient_norm, state.age_epochs = 0.5, 2
            for key in METRIC_KEYS:
                state.metrics[key] = 0.0
            state.metrics["alpha_total_steps"] = 32.0
    packet.blueprint_ids.extend(f"bp-{index}" for index in range(n_blueprints))
    return packet


def catalogue(n_blueprints: int) -> dict[str, pb.BlueprintDescriptor]:
    """Descriptors for every offered blueprint (so the graph has no missing features)."""
    return {
        f"bp-{index}": pb.BlueprintDescriptor(
            blueprint_id=f"bp-{index}",
            tier=pb.BLUEPRINT_TIER_SAFE,
            risk=0.1,
            stage=1,
            host_kinds=["mlp"],
        )
        for index in range(n_blueprints)
    }


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99/max and the share of samples over the step budget, in ms."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50_ms": round(at(0.50), 3),
        "p95_ms": round(at(0.95), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(ordered[-1], 3),
        "over_budget": round(sum(s > BUDGET_MS for s in ordered) / len(ordered), 4),
        "n": len(ordered),
    }


def time_decisions(service: TamiyoService, packets: list[pb.SystemStatePacket], warmup: int) -> list[float]:
    """Latency of each `evaluate_step` after `warmup` untimed ones (prepared on the first packet's
    topology beforehand, as Tolaria does before a run's first decision)."""
    service.prepare(packets[0])
    for packet in packets[:warmup]:
        service.evaluate_step(packet)
    samples = []
    for packet in packets[warmup:]:
        start = time.perf_counter()
        service.evaluate_step(packet)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_interleaved(
    services: list[TamiyoService],
    packets: list[pb.SystemStatePacket],
    warmup: int,
    trainer: TrainingLoop,
    steps_between: int,
    *,
    anticipation: list[int],
) -> list[list[float]]:
    """`time_decisions` as `esper run` decides: `steps_between` training steps on the same thread before
    each decision, so the policy's weights and the worker have gone cold as they do in a run, and
    `service.anticipate()` that many steps before it (`anticipation`, per service; 0: never), as Tolaria
    does. Several services take turns packet by packet (an A/B in one process under the same machine
    noise)."""
    for service in services:
        service.prepare(packets[0])
    samples: list[list[float]] = [[] for _ in services]
    for index, packet in enumerate(packets):
        for service, timings, lead in zip(services, samples, anticipation, strict=True):
            for step in range(steps_between):
                if lead and step == steps_between - lead:
                    service.anticipate()
                trainer.step()
            start = time.perf_counter()
            service.evaluate_step(packet)
            if index >= warmup:
                timings.append((time.perf_counter() - start) * 1e3)
    return samples


def time_alternating(
    services: list[TamiyoService], packets: list[pb.SystemStatePacket], warmup: int, block: int = 10
) -> list[list[float]]:
    """`time_decisions` for several services taking turns on the same packets, `block` decisions each
    (back to back within a block), so that they share the machine's noise (an A/B in one process)."""
    for service in services:
        service.prepare(packets[0])
        for packet in packets[:warmup]:
            service.evaluate_step(packet)
    samples: list[list[float]] = [[] for _ in services]
    timed = packets[warmup:]
    for first in range(0, len(timed), block):
        for service, timings in zip(services, samples, strict=True):
            for packet in timed[first : first + block]:
                start = time.perf_counter()
                service.evaluate_step(packet)
                timings.append((time.perf_counter() - start) * 1e3)
    return samples


def build_service(
    policy_kind: str,
    n_blueprints: int,
    *,
    plan: bool = True,
    realtime: bool = True,
    policy_size: PolicySize = "default",
) -> tuple[TamiyoService, Policy]:
    """A service with a generous deadline (slow decisions are measured, not cut off); `plan`: whether
    the GNN traces its inference path when prepared on a topology (the default, as in a run);
    `realtime=False`: decisions at the OS's normal priority instead of `TAMIYO_REALTIME_PRIORITY`;
    `policy_size`: the GNN's `TAMIYO_POLICY_SIZE`."""
    settings = TamiyoSettings(
        step_timeout_ms=1000.0,
        max_blueprints=max(16, n_blueprints),
        enable_plan=plan,
        realtime_priority=TamiyoSettings().realtime_priority if realtime else 0,
        policy_size=policy_size,
    )
    lookup = catalogue(n_blueprints).get
    policy: Policy
    if policy_kind == "gnn":
        policy = GNNPolicy(settings, blueprint_metadata=lookup)
    else:
        policy = HeuristicPolicy(settings)
    return TamiyoService(settings, policy, SECRET, blueprint_metadata=lookup), policy


def cold_start(n_blueprints: int, size: tuple[int, int, int], max_attempts: int = 100) -> dict[str, Any]:
    """Construction (warm-up included) and the preparation on the run's topology that Tolaria does before
    the first decision, to the first decision within the budget, in ms (None if none)."""
    start = time.perf_counter()
    settings = TamiyoSettings(step_timeout_ms=BUDGET_MS)
    lookup = catalogue(n_blueprints).get
    policy = GNNPolicy(settings, blueprint_metadata=lookup)
    service = TamiyoService(settings, policy, SECRET, blueprint_metadata=lookup)
    constructed = (time.perf_counter() - start) * 1e3
    realtime = service.telemetry.health().indicators["worker_realtime"] == 1.0
    service.prepare(make_packet(*size, step=0))
    prepared = (time.perf_counter() - start) * 1e3
    first_in_budget: float | None = None
    attempts = misses = 0
    try:
        while first_in_budget is None and attempts < max_attempts:
            attempts += 1
            decision_start = time.perf_counter()
            try:
                service.evaluate_step(make_packet(*size, step=attempts))
            except (DeadlineExceeded, WorkerSaturated):  # what this loop counts
                misses += 1
                continue
            if (time.perf_counter() - decision_start) * 1e3 <= BUDGET_MS:
                first_in_budget = (time.perf_counter() - start) * 1e3
    finally:
        service.close()
    return {
        "construct_ms": round(constructed, 1),
        "prepared_ms": round(prepared, 1),
        "plan_build_ms": round(policy.plan_status.build_ms, 1),
        "first_in_budget_ms": None if first_in_budget is None else round(first_in_budget, 1),
        "decisions_tried": attempts,
        "deadline_misses": misses,
        "realtime_applied": realtime,  # decisions at TAMIYO_REALTIME_PRIORITY (the OS may refuse it)
    }


class TrainingLoop:
    """An MLP training loop (digits-sized) on its own thread, counting steps.

    It fits one fixed batch, so its loss goes to zero; after ~35,000 steps its numbers turn denormal and a
    step takes 5x longer (measured: 1.2 ms, then 6.0 ms; 1.3 with `torch.set_flush_denormal(True)`). The
    model and optimiser start again from the same seed every `RESTART_STEPS` steps so that every phase
    measures against the same trainer."""

    RESTART_STEPS = 5_000

    def __init__(self) -> None:
        self.steps = 0
        self._restart()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _restart(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.uniform_(-0.1, 0.1, generator=generator)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(128, 64, generator=generator)
        self.y = torch.randint(0, 10, (128,), generator=generator)

    def step(self) -> None:
        """One optimiser step."""
        if self.steps and self.steps % self.RESTART_STEPS == 0:
            self._restart()
        self.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1

    def step_ms(self, steps: int = 200) -> float:
        """Median ms per step on the calling thread."""
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def start(self) -> None:
        """Train on a background thread until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="bench-trainer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()

    def stop(self) -> None:
        """Stop and join the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def forward_ratio(policy: GNNPolicy, packet: pb.SystemStatePacket, repeats: int = 50) -> dict[str, float]:
    """Median forward time of the dense inference kernel vs PyG message passing on one graph."""
    graph = policy.builder.build(packet, update_stats=False)
    module = policy.module

    def median_ms(run: Callable[[], object]) -> float:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    module.build_plan(graph)
    with torch.inference_mode():
        planned = median_ms(lambda: module(graph))
        module.drop_plan()
        dense = median_ms(lambda: module(graph))
        message_passing = median_ms(lambda: module.forward_message_passing(graph))
        build = median_ms(lambda: policy.builder.build(packet, update_stats=False))
    return {
        "build_ms": round(build, 3),
        "planned_forward_ms": round(planned, 3),
        "dense_forward_ms": round(dense, 3),
        "message_passing_forward_ms": round(message_passing, 3),
        "planned_vs_dense": round(planned / dense, 3),
        "dense_vs_message_passing": round(dense / message_passing, 3),
    }


def cpu_model() -> str:
    """The CPU's model name (a budget held on one CPU is no guarantee on the next)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the platform's own answer below
    return platform.processor() or platform.machine()


DEVICE_MODES = ("eager", "compiled", "cuda_graph")


def device_modes(device: str, modes: list[str], decisions: int, warmup: int) -> dict[str, Any]:
    """The medium size on `device` (refused by `resolve_device` when absent), one service per mode."""
    resolved = resolve_device(device)
    size = SIZES["medium"]
    packets = [make_packet(*size, step=i) for i in range(warmup + decisions)]
    lookup = catalogue(size[2]).get
    results: dict[str, Any] = {
        "budget_ms": BUDGET_MS,
        "device": str(resolved),
        "device_name": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": "medium",
        "decisions": decisions,
    }
    for mode in modes:
        settings = TamiyoSettings(
            step_timeout_ms=1000.0,
            max_blueprints=max(16, size[2]),
            device=str(resolved),
            enable_plan=mode == "cuda_graph",
            enable_compile=mode == "compiled",
            enable_cuda_graph=mode == "cuda_graph",
        )
        started = time.perf_counter()
        policy = GNNPolicy(settings, blueprint_metadata=lookup)
        try:
            service = TamiyoService(settings, policy, SECRET, blueprint_metadata=lookup)
        except DeadlineExceeded as exc:  # the warm-up (a compile) outlasted TAMIYO_WARMUP_TIMEOUT_MS
            results[mode] = {
                "error": f"{type(exc).__name__}: {exc}",
                "compile": dataclasses.asdict(policy.compile_status),
            }
            print(f"{mode}: {results[mode]}", flush=True)
            continue
        try:
            constructed_ms = (time.perf_counter() - started) * 1e3
            figures: dict[str, Any] = dict(percentiles(time_decisions(service, packets, warmup)))
        finally:
            service.close()
        figures["constructed_ms"] = round(constructed_ms, 1)
        figures["within_budget"] = figures["p99_ms"] <= BUDGET_MS
        figures["compile"] = dataclasses.asdict(policy.compile_status)
        figures["plan"] = dataclasses.asdict(policy.plan_status)  # with the CUDA graph's `capture`
        results[mode] = figures
        print(f"{mode}: {figures}", flush=True)
    return results


def main() -> None:  # noqa: PLR0915 (the benchmark's script: every measurement in the order it prints)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=300, help="Timed decisions per size.")
    parser.add_argument("--warmup", type=int, default=30, help="Untimed decisions before timing.")
    parser.add_argument("--trainer-threads", type=int, default=1, help="torch threads of the training loop.")
    parser.add_argument(
        "--device", default="cpu", help="cpu (the full CPU benchmark) or cuda[:N] (the device modes only)."
    )
    parser.add_argument("--modes", nargs="+", default=list(DEVICE_MODES), choices=DEVICE_MODES)
    args = parser.parse_args()
    torch.set_num_threads(args.trainer_threads)
    if args.device != "cpu":
        print(json.dumps(device_modes(args.device, args.modes, args.decisions, args.warmup), sort_keys=True))
        return
    results: dict[str, Any] = {
        "budget_ms": BUDGET_MS,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "trainer_threads": args.trainer_threads,
        "inference_threads": TamiyoSettings().cpu_threads,
        "realtime_priority": TamiyoSettings().realtime_priority,
    }

    trainer = TrainingLoop()
    trainer_alone_before = trainer.step_ms()
    cold = cold_start(SIZES["medium"][2], SIZES["medium"])
    results["cold_start"] = cold
    print(f"cold start: {cold}")

    total = args.warmup + args.decisions
    for name, size in SIZES.items():
        packets = [make_packet(*size, step=i) for i in range(total)]
        built = {
            policy_size: build_service("gnn", size[2], policy_size=policy_size)
            for policy_size in get_args(PolicySize)
        }
        try:
            turns = time_alternating([service for service, _ in built.values()], packets, args.warmup)
            by_size: dict[str, dict[str, Any]] = {}
            for (policy_size, (_, policy)), samples in zip(built.items(), turns, strict=True):
                assert isinstance(policy, GNNPolicy)
                by_size[policy_size] = percentiles(samples)
                by_size[policy_size]["parameters"] = sum(p.numel() for p in policy.module.parameters())
                by_size[policy_size].update(forward_ratio(policy, packets[0]))
        finally:
            for service, _ in built.values():
                service.close()
        heuristic, _ = build_service("heuristic", size[2])
        try:
            baseline = percentiles(time_decisions(heuristic, packets, args.warmup))
        finally:
            heuristic.close()
        figures: dict[str, Any] = dict(by_size["default"])
        figures["full"] = by_size["full"]
        for quantile in ("p50", "p99"):
            ratio = figures[f"{quantile}_ms"] / by_size["full"][f"{quantile}_ms"]
            figures[f"default_vs_full_{quantile}"] = round(ratio, 3)
        figures["default_vs_full_planned_forward"] = round(
            figures["planned_forward_ms"] / by_size["full"]["planned_forward_ms"], 3
        )
        figures["heuristic_p50_ms"] = baseline["p50_ms"]
        figures["gnn_vs_heuristic_p50"] = round(figures["p50_ms"] / baseline["p50_ms"], 2)
        results[name] = figures
        print(f"{name:>6} {size}: {figures}")

    # Small and medium sizes as a run decides: training steps between decisions, on the same thread,
    # warmed up ahead `lead` steps before each (TOLARIA_ANTICIPATION_STEPS), traced plan; against it, one
    # factor changed at a time, taking turns: not warmed up ahead, the untraced dense path, and (medium)
    # normal priority (the A/B of TAMIYO_REALTIME_PRIORITY; the same where the OS refuses it).
    lead = TolariaSettings().anticipation_steps
    results["anticipation_steps"] = lead
    for name in ("small", "medium"):
        size = SIZES[name]
        packets = [make_packet(*size, step=i) for i in range(total)]
        variants: dict[str, tuple[TamiyoService, int]] = {
            "run": (build_service("gnn", size[2])[0], lead),
            "not_anticipated": (build_service("gnn", size[2])[0], 0),
            "without_plan": (build_service("gnn", size[2], plan=False)[0], lead),
        }
        if name == "medium":
            variants["normal_priority"] = (build_service("gnn", size[2], realtime=False)[0], lead)
        services = [service for service, _ in variants.values()]
        try:
            timed = dict(
                zip(
                    variants,
                    time_interleaved(
                        services,
                        packets,
                        args.warmup,
                        trainer,
                        20,
                        anticipation=[lead for _, lead in variants.values()],
                    ),
                    strict=True,
                )
            )
            warmups = {
                outcome: int(
                    variants["run"][0].telemetry.registry.get_sample_value(
                        "tamiyo_warmups_ahead_total", {"outcome": outcome}
                    )
                    or 0
                )
                for outcome in ("completed", "cut_short", "failed", "skipped")
            }
        finally:
            for service in services:
                service.close()
        interleaved: dict[str, Any] = dict(percentiles(timed["run"]))
        interleaved["warmups_ahead"] = warmups
        for variant, ratio in (
            ("not_anticipated", "anticipated_vs_not"),
            ("without_plan", "plan_vs_without"),
            ("normal_priority", "realtime_vs_normal"),
        ):
            if variant in timed:
                other = percentiles(timed[variant])
                interleaved[variant] = other
                interleaved[f"{ratio}_p50"] = round(interleaved["p50_ms"] / other["p50_ms"], 3)
                interleaved[f"{ratio}_p99"] = round(interleaved["p99_ms"] / other["p99_ms"], 3)
        results[f"{name}_between_training_steps"] = interleaved
        print(f"{name} with 20 training steps between decisions: {interleaved}")

    # Medium size with a training loop beside it, then the loop alone again.
    size = SIZES["medium"]
    packets = [make_packet(*size, step=i) for i in range(total)]
    service, _ = build_service("gnn", size[2])
    trainer.start()
    try:
        steps_before = trainer.steps
        start = time.perf_counter()
        beside = percentiles(time_decisions(service, packets, args.warmup))
        elapsed = time.perf_counter() - start
        beside["trainer_steps_per_s"] = round((trainer.steps - steps_before) / elapsed, 1)
    finally:
        trainer.stop()
        service.close()
    results["medium_with_training"] = beside
    print(f"medium with training beside: {beside}")
    trainer_alone_after = trainer.step_ms()
    results["trainer_step_ms"] = {
        "alone_before_inference": round(trainer_alone_before, 3),
        "alone_after_inference": round(trainer_alone_after, 3),
        "after_vs_before": round(trainer_alone_after / trainer_alone_before, 3),
    }
    print(f"trainer step alone: {results['trainer_step_ms']}")
    results["medium_p99_within_budget_back_to_back"] = results["medium"]["p99_ms"] <= BUDGET_MS
    results["medium_p99_within_budget_back_to_back_full"] = results["medium"]["full"]["p99_ms"] <= BUDGET_MS
    results["medium_p99_within_budget_between_training_steps"] = (
        results["medium_between_training_steps"]["p99_ms"] <= BUDGET_MS
    )
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
