"""`GrowthEnv`: a training run as a Gymnasium environment, the agent in Tamiyo's place.

Each episode is one run, built by `esper.assembly.RunAssembly` like any other (the same Tolaria, Kasmina
and Tamiyo; a normal run directory): `reset(seed=...)` picks a task from the family and starts the run,
which trains until its first decision. The policy Tamiyo runs is the agent: at every decision the run
waits for `step(action)`, Tamiyo's risk gates judge the action, Kasmina applies the signed command, and
the run trains until the next decision (or its end, which ends the episode).

- action: `MultiDiscrete([6, max_slots, max_blueprints])` = (what, slot, blueprint). What: 0 wait,
  1 germinate (the slot's seed, with the blueprint at that index of the packet's offer), 2 widen and
  3 deepen (the layer before the slot), 4 fossilise and 5 cull (the `slot`-th live seed or growth, in
  the packet's order). An action naming nothing that exists is a wait (`info["invalid_action"]`).
- observation: a flat `Box` view for standard agents (`FLAT_FEATURES` global features, then
  `SLOT_FEATURES` per slot position). The graph the GNN sees is `info["graph"]` (a `TamiyoGraph`, one
  tensor per node type): its node and edge sets vary in size and type, which no Gymnasium space holds.
- reward: Simic's reward (`esper.simic.reward`) of every field report that closed since the last step;
  a decision's window closes some decisions after it, so its reward arrives then, as Simic sees it.
- info: the field reports that closed (`info["field_reports"]`), the command that was applied, the
  task, the step.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from numpy.typing import NDArray

from esper.assembly import RunAssembly, RunInputs, RunSettings, RunSummary
from esper.leyline import CleanupFailed, CleanupStack, EsperError, load_settings, pb, resolve_signing_secret
from esper.nissa.layout import DataLayout
from esper.simic.reward import UnmeasuredOutcome, reward_of
from esper.simic.settings import SimicSettings
from esper.tamiyo import GraphBuilder, Proposal
from esper.tolaria.run import RunConfig, load_task, new_training_run_id, resolve_host

_log = logging.getLogger("esper.envs")

if TYPE_CHECKING:
    from torch import Tensor

    from esper.tamiyo import TamiyoGraph

TASKS = ("generated", "signals", "digits")
ACTIONS = ("wait", "germinate", "widen", "deepen", "fossilise", "cull")
FLAT_FEATURES = 8
SLOT_FEATURES = 6
_LIVE = {
    pb.SEED_STAGE_GERMINATED,
    pb.SEED_STAGE_TRAINING,
    pb.SEED_STAGE_BLENDING,
    pb.SEED_STAGE_SHADOWING,
    pb.SEED_STAGE_PROBATIONARY,
}
_STAGES = max(pb.SeedLifecycleStage.values())
_WIDEN_FRACTION = 0.25
_DECISION_BUDGET_MS = 60_000.0  # the agent's time to answer, within Tamiyo's largest allowed budget


class EnvError(EsperError):
    """The environment cannot do what it was asked (which call, and why)."""


@dataclass
class _Decision:
    packet: pb.SystemStatePacket
    reports: list[pb.FieldReport]


@dataclass
class _End:
    summary: RunSummary | None
    reports: list[pb.FieldReport]
    error: BaseException | None = None


@dataclass
class _Episode:
    """One run on its own thread, handing decisions to the agent and actions back."""

    task: str
    run_dir: Path
    to_agent: queue.Queue[_Decision | _End] = field(default_factory=queue.Queue)
    to_run: queue.Queue[Proposal | None] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    seen_reports: set[str] = field(default_factory=set)
    abandoned: bool = False


class _AgentPolicy:
    """A Tamiyo policy whose proposals come from the agent (through the episode's queues)."""

    def __init__(self, episode: _Episode, new_reports: Any) -> None:
        self._episode = episode
        self._new_reports = new_reports

    @property
    def version(self) -> str:
        return "gym-agent"

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        episode = self._episode
        if episode.abandoned:
            return Proposal(action=pb.POLICY_ACTION_WAIT, reason="the episode was abandoned")
        episode.to_agent.put(_Decision(packet, self._new_reports()))
        proposal = episode.to_run.get()
        if proposal is None:  # abandoned while waiting: the run finishes with waits
            return Proposal(action=pb.POLICY_ACTION_WAIT, reason="the episode was abandoned")
        return proposal

    def warm_up(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        del state


class GrowthEnv(gym.Env[NDArray[np.float32], NDArray[np.int64]]):
    """A run of Esper as a Gymnasium environment (see the module doc for spaces, reward and info).

    `tasks`: the family `reset` draws from (any of "generated", "signals", "digits"); `epochs`,
    `decision_interval`, `batch_size`, `max_params` shape each run; `max_slots` and `max_blueprints`
    size the action and observation spaces; `runs_dir` holds the episodes' run directories (default
    `ESPER_DATA_DIR/runs`); `graph=False` leaves the GNN's graph out of `info`.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012  (gymnasium's own attribute)

    def __init__(
        self,
        *,
        tasks: tuple[str, ...] = TASKS,
        difficulty: float = 0.5,
        epochs: int = 3,
        decision_interval: int = 10,
        batch_size: int = 64,
        max_params: int = 0,
        max_slots: int = 4,
        max_blueprints: int = 8,
        runs_dir: str | Path | None = None,
        graph: bool = True,
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown:
            raise EnvError(f"tasks must be some of {TASKS}, got {list(tasks)}")
        self.tasks = tuple(tasks)
        self.difficulty = difficulty
        self.max_slots = max_slots
        self.max_blueprints = max_blueprints
        self.graph = graph
        extra = dict(settings or {})
        self._settings = RunSettings.resolve(
            esper=extra.get("esper"),
            tolaria={
                **extra.get("tolaria", {}),
                "epochs": epochs,
                "decision_interval": decision_interval,
                "batch_size": batch_size,
                "max_params": max_params,
                "decision_lag_steps": 0,  # the agent's answer applies at the step it decided on
                "anticipation_steps": 0,
            },
            kasmina=extra.get("kasmina"),
            tamiyo={**extra.get("tamiyo", {}), "step_timeout_ms": _DECISION_BUDGET_MS},
            oona=extra.get("oona"),
            nissa=extra.get("nissa"),
        )
        self._simic = load_settings(SimicSettings, **extra.get("simic", {}))
        data = DataLayout(self._settings.esper.data_dir)
        self._data = data
        self._runs_dir = Path(runs_dir) if runs_dir is not None else data.runs
        self._secret: bytes | None = None
        # The graph's builder, with the catalogue's blueprint descriptors as Tamiyo's own builder has them:
        # opened at the first reset (no file is touched before), closed by `close()`.
        self._builder: GraphBuilder | None = None
        self._catalogue = CleanupStack(_log_cleanup_failure)
        self.action_space = spaces.MultiDiscrete([len(ACTIONS), max_slots, max_blueprints])
        size = FLAT_FEATURES + SLOT_FEATURES * max_slots
        self.observation_space = spaces.Box(-1e6, 1e6, shape=(size,), dtype=np.float32)
        self._episode: _Episode | None = None
        self._packet: pb.SystemStatePacket | None = None
        self._episodes = 0

    # -- the episode ------------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed)
        self._abandon()
        if self.graph and self._builder is None:
            self._builder = self._open_builder()
        task = str(options.get("task")) if options and "task" in options else None
        if task is None:
            task = self.tasks[int(self.np_random.integers(len(self.tasks)))]
        elif task not in TASKS:
            raise EnvError(f"reset: task must be one of {TASKS}, got {task!r}")
        run_seed = int(self.np_random.integers(2**31 - 1))
        self._episodes += 1
        run_id = new_training_run_id()
        episode = _Episode(task=task, run_dir=self._runs_dir / f"gym-{run_id}")
        self._episode = episode
        episode.thread = threading.Thread(
            target=self._run, args=(episode, run_id, run_seed), name=f"esper-env-{run_id}", daemon=True
        )
        episode.thread.start()
        item = episode.to_agent.get()
        if isinstance(item, _End):
            self._finish(episode, item)
            raise EnvError(f"reset: the run of {task} ended before its first decision")
        self._packet = item.packet
        return self._observe(item.packet), self._info(item.packet, [], None)

    def step(
        self, action: NDArray[np.int64]
    ) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        episode, packet = self._episode, self._packet
        if episode is None or packet is None:
            raise EnvError("step: call reset() first (the episode ended or never began)")
        what, slot, blueprint = (int(a) for a in np.asarray(action).reshape(-1)[:3])
        proposal = self._proposal(packet, what, slot, blueprint)
        episode.to_run.put(proposal or Proposal(action=pb.POLICY_ACTION_WAIT, reason="invalid action"))
        item = episode.to_agent.get()
        reward, reports = self._reward(item.reports)
        extra = {"invalid_action": proposal is None, "action": ACTIONS[what] if what < len(ACTIONS) else "?"}
        if isinstance(item, _End):
            info = self._info(packet, reports, item.summary) | extra
            self._finish(episode, item)
            return self._observe(packet), reward, True, False, info
        self._packet = item.packet
        return (
            self._observe(item.packet),
            reward,
            False,
            False,
            self._info(item.packet, reports, None) | extra,
        )

    def close(self) -> None:
        try:
            self._abandon()
        finally:
            self._builder = None
            failures = self._catalogue.close()
        if failures:
            raise CleanupFailed(failures)
        super().close()

    def _open_builder(self) -> GraphBuilder:
        """A graph builder with the blueprint catalogue's descriptors (the data directory's catalogue, as
        every run of this env uses it), warmed once; its catalogue and cache close with the env."""
        from esper.assembly.tamiyo import metadata_cache, open_catalogue

        catalogue = open_catalogue(self._data.catalogue, None, self._catalogue)
        metadata = metadata_cache(catalogue, self._settings.tamiyo, None, self._catalogue)
        return GraphBuilder(self._settings.tamiyo, blueprint_metadata=metadata)

    def _run(self, episode: _Episode, run_id: str, seed: int) -> None:
        """The episode's run, on its own thread: ends by putting `_End` (with the error, if it failed)."""
        reports: list[pb.FieldReport] = []
        try:
            settings = self._settings
            # A seeded episode steps the same way twice (Gymnasium's contract): its packets name the
            # device without measuring its free memory, which differs from run to run.
            tolaria = settings.tolaria.model_copy(update={"seed": seed, "hardware_context": False})
            host, _ = resolve_host(episode.task, "auto")
            config = RunConfig(
                task=episode.task,
                host=host,
                policy="gym-agent",
                difficulty=self.difficulty,
                run_dir=episode.run_dir,
                catalogue_path=self._data.catalogue,
                training_run_id=run_id,
                tolaria=tolaria,
                kasmina=settings.kasmina,
            )
            dataset = load_task(episode.task, host, seed=seed, difficulty=self.difficulty)
            if self._secret is None:
                self._secret = resolve_signing_secret(settings.esper)
            holder: dict[str, RunAssembly] = {}

            def new_reports() -> list[pb.FieldReport]:
                run = holder.get("run")
                if run is None or run.store is None:
                    return []
                fresh = []
                for stored in run.store.field_reports(training_run_id=run_id):
                    if stored.report.report_id not in episode.seen_reports:
                        episode.seen_reports.add(stored.report.report_id)
                        fresh.append(stored.report)
                return fresh

            policy = _AgentPolicy(episode, new_reports)
            with RunAssembly(
                settings,
                config,
                secret=self._secret,
                inputs=RunInputs(dataset),
                policy=policy,  # type: ignore[arg-type]  # a Policy by protocol
                command=f"esper.envs.GrowthEnv ({episode.task})",
            ) as run:
                holder["run"] = run
                summary = run.train()
                reports = new_reports()
            episode.to_agent.put(_End(summary, reports))
        except Exception as exc:  # noqa: BLE001 - handed to the agent's thread, which raises it
            episode.to_agent.put(_End(None, reports, exc))

    def _finish(self, episode: _Episode, end: _End) -> None:
        if episode.thread is not None:
            episode.thread.join()
        self._episode = None
        self._packet = None
        if end.error is not None:
            raise EnvError(f"the run of {episode.task} failed: {end.error}") from end.error

    def _abandon(self) -> None:
        """End an episode left before its end: the run finishes its training with waits."""
        episode = self._episode
        if episode is None:
            return
        episode.abandoned = True
        episode.to_run.put(None)
        while True:
            item = episode.to_agent.get()
            if isinstance(item, _End):
                break
            episode.to_run.put(None)
        self._finish(episode, item)  # a run that failed meanwhile says so here

    # -- the agent's view -------------------------------------------------------------------------------

    def _proposal(  # noqa: PLR0911 (one return per kind of action the agent may name)
        self, packet: pb.SystemStatePacket, what: int, slot: int, blueprint: int
    ) -> Proposal | None:
        """The agent's action as Tamiyo's proposal, or None when it names nothing that exists."""
        if what == 0:
            return Proposal(action=pb.POLICY_ACTION_WAIT, reason="agent: wait")
        slots = list(packet.topology.slots)
        if what in (1, 2, 3):
            if slot >= len(slots):
                return None
            target = slots[slot]
            if what == 1:
                offer = list(packet.blueprint_ids)
                if blueprint >= len(offer):
                    return None
                return Proposal(
                    action=pb.POLICY_ACTION_GERMINATE,
                    slot_id=target.slot_id,
                    blueprint_id=offer[blueprint],
                    reason="agent: germinate",
                )
            widths = {layer.layer_id: layer.width for layer in packet.topology.layers}
            if what == 2:
                units = max(1, round(_WIDEN_FRACTION * widths.get(target.layer_id, 1)))
                return Proposal(
                    action=pb.POLICY_ACTION_WIDEN,
                    layer_id=target.layer_id,
                    units=units,
                    reason="agent: widen",
                )
            return Proposal(action=pb.POLICY_ACTION_DEEPEN, layer_id=target.layer_id, reason="agent: deepen")
        if what in (4, 5):
            live = [s for s in [*packet.seed_states, *packet.growth_states] if s.stage in _LIVE]
            if slot >= len(live):
                return None
            action = pb.POLICY_ACTION_FOSSILIZE if what == 4 else pb.POLICY_ACTION_CULL
            return Proposal(action=action, slot_id=live[slot].slot_id, reason=f"agent: {ACTIONS[what]}")
        return None

    def _observe(self, packet: pb.SystemStatePacket) -> NDArray[np.float32]:
        metrics = packet.training_metrics
        params = float(metrics.get("param_count", 0.0))
        live = [s for s in [*packet.seed_states, *packet.growth_states] if s.stage in _LIVE]
        headroom = 1.0 if not packet.max_parameters else 1.0 - params / packet.max_parameters
        values = [
            packet.validation_loss,
            packet.validation_accuracy,
            packet.training_loss,
            float(metrics.get("progress", 0.0)),
            math.log1p(params),
            float(metrics.get("seed_param_count", 0.0)) / max(1.0, params),
            headroom,
            len(live) / self.max_slots,
        ]
        states = {s.slot_id: s for s in packet.seed_states}
        widths = {layer.layer_id: layer.width for layer in packet.topology.layers}
        for index in range(self.max_slots):
            if index >= len(packet.topology.slots):
                values.extend([0.0] * SLOT_FEATURES)
                continue
            slot = packet.topology.slots[index]
            state = states.get(slot.slot_id)
            seed_metrics = state.metrics if state is not None else {}
            values.extend(
                [
                    1.0,
                    (state.stage if state is not None else 0) / _STAGES,
                    float(seed_metrics.get("alpha", 0.0)),
                    float(seed_metrics.get("contribution_accuracy", 0.0)),
                    float(seed_metrics.get("contribution_loss", 0.0)),
                    math.log1p(widths.get(slot.layer_id, slot.width)),
                ]
            )
        flat = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
        return np.clip(flat, -1e6, 1e6).astype(np.float32)

    def _reward(self, reports: list[pb.FieldReport]) -> tuple[float, list[dict[str, Any]]]:
        total = 0.0
        described: list[dict[str, Any]] = []
        for report in reports:
            entry: dict[str, Any] = {  # no ids: they are random, and `check_env` wants equal infos
                "outcome": pb.FieldReportOutcome.Name(report.outcome),
                "metrics": dict(report.metrics),
            }
            try:
                reward = reward_of(report, self._simic)
            except UnmeasuredOutcome:
                entry["reward"] = None  # unmeasured is not zero: it pays nothing
            else:
                entry["reward"] = reward.total
                total += reward.total
            described.append(entry)
        return total, described

    def _info(
        self, packet: pb.SystemStatePacket, reports: list[dict[str, Any]], summary: RunSummary | None
    ) -> dict[str, Any]:
        episode = self._episode
        info: dict[str, Any] = {
            "task": episode.task if episode is not None else None,
            "step": int(packet.global_step),
            "validation_accuracy": float(packet.validation_accuracy),
            "field_reports": reports,
        }
        if self._builder is not None and summary is None:
            info["graph"] = _graph_view(self._builder.build(packet, update_stats=False))
        if summary is not None:
            info["summary"] = summary
        return info

    @property
    def run_dir(self) -> Path | None:
        """The current episode's run directory (a normal one: `esper report` renders it)."""
        return None if self._episode is None else self._episode.run_dir


def _graph_view(graph: TamiyoGraph) -> dict[str, Any]:
    """The GNN's graph as plain arrays: features, presence masks and edges per node and edge type, and
    the action masks; ids of the slots, seeds and blueprints its nodes stand for."""

    def arrays(tensors: Mapping[Any, Tensor]) -> dict[Any, NDArray[Any]]:
        return {key: tensor.detach().cpu().numpy().copy() for key, tensor in tensors.items()}

    return {
        "x": arrays(graph.x),
        "mask": arrays(graph.mask),
        "edge_index": arrays(graph.edge_index),
        "edge_attr": arrays(graph.edge_attr),
        "action_mask": graph.action_mask.detach().cpu().numpy().copy(),
        "slot_action_mask": graph.slot_action_mask.detach().cpu().numpy().copy(),
        "slot_ids": list(graph.slot_ids),
        "seed_ids": list(graph.seed_ids),
        "blueprint_ids": list(graph.blueprint_ids),
    }


__all__ = ["ACTIONS", "FLAT_FEATURES", "SLOT_FEATURES", "TASKS", "EnvError", "GrowthEnv"]


def _log_cleanup_failure(name: str, exc: Exception) -> None:
    _log.error("clean-up step %r failed: %s: %s", name, type(exc).__name__, exc)
