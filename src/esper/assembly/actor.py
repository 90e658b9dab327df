"""Simic's actors: long-lived processes that run short training runs (episodes) one after another, each
built exactly as `esper run` builds one, so that their decisions and field reports feed the learner.

An episode's task is drawn from the actor's id and the episode's index alone (`plan_episode`): a family
(generated tabular data on the MLP, 1-D signals on the conv1d host, sklearn's digits on the CNN, token
sequences on the Transformer), a difficulty, a data seed, a growth budget (a multiple of the host's
starting parameters) and the policy. The run joins the deployment: Tamiyo's GNN follows the policy
updates Simic publishes, and its decisions and field reports leave through Tamiyo's outbox.

Progress is durable, in `<ESPER_DATA_DIR>/actors/<actor id>/actor.json` (replaced atomically): the
episodes completed and the episode in progress, written before its run is created. An actor killed
mid-episode resumes that episode's run from its last checkpoint when it restarts (the same training run
id: the trajectory stays whole, and what the run decided after its checkpoint is abandoned, never
published), rather than starting another.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from esper.assembly.run import RunAssembly, RunInputs, resolve_config
from esper.assembly.settings import RunSettings
from esper.assembly.start import require_writable
from esper.leyline import EsperError, EsperSettings
from esper.leyline.files import write_atomically
from esper.nissa.layout import DataLayout, RunLayout
from esper.simic.actor_settings import FAMILIES, ActorSettings
from esper.tolaria.run import RunConfig, config_host, load_task, new_training_run_id
from esper.tolaria.trainer import TrainingDiverged


class ActorStateError(EsperError):
    """An actor's state file cannot be read or does not describe an actor's progress."""


@dataclass(frozen=True)
class EpisodePlan:
    """One episode: what is trained, under which policy and budget, and where its run lives."""

    index: int
    family: str
    task: str
    host: str
    difficulty: float
    seed: int
    budget: float  # x the host's starting parameters (0: unbounded)
    policy: str
    training_run_id: str
    run_dir: str

    def describe(self) -> str:
        """`generated/mlp, difficulty 0.41, seed 123, budget x2.3, gnn`."""
        budget = "unbounded" if self.budget == 0 else f"x{self.budget:.2f}"
        return (
            f"{self.task}/{self.host}, difficulty {self.difficulty:.2f}, seed {self.seed}, "
            f"budget {budget}, {self.policy}"
        )


def plan_episode(settings: ActorSettings, actor_id: str, index: int, runs_dir: Path) -> EpisodePlan:
    """Episode `index` of `actor_id`: every draw depends on the seed, the actor id and the index only (the
    run id is fresh: it names this attempt's run)."""
    digest = hashlib.sha256(f"esper-actor/{settings.seed}/{actor_id}/{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    family = settings.families[rng.randrange(len(settings.families))]
    task, host = FAMILIES[family]
    difficulty = round(rng.uniform(settings.difficulty_min, settings.difficulty_max), 4)
    seed = rng.randrange(1_000_000, 2**31 - 1)  # far from the small seeds benchmarks hold out
    budget = round(rng.uniform(settings.budget_min, settings.budget_max), 4)
    policy = "heuristic" if rng.random() < settings.heuristic_share else settings.policy
    run_id = new_training_run_id()
    return EpisodePlan(
        index=index,
        family=family,
        task=task,
        host=host,
        difficulty=difficulty,
        seed=seed,
        budget=budget,
        policy=policy,
        training_run_id=run_id,
        run_dir=str(runs_dir / run_id),
    )


@dataclass
class ActorState:
    """What `actor.json` holds: episodes completed, and the episode in progress (None between two)."""

    actor_id: str
    completed: int = 0
    current: EpisodePlan | None = None

    @classmethod
    def load(cls, path: Path, actor_id: str) -> ActorState:
        """The state at `path`, or a fresh one when there is none. Raises `ActorStateError`."""
        if not path.exists():
            return cls(actor_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            current = data.get("current")
            state = cls(
                actor_id=str(data["actor_id"]),
                completed=int(data["completed"]),
                current=None if current is None else EpisodePlan(**current),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ActorStateError(f"{path} is not an actor's state: {exc}") from exc
        if state.actor_id != actor_id:
            raise ActorStateError(f"{path} belongs to actor {state.actor_id!r}, not {actor_id!r}")
        return state

    def save(self, path: Path) -> None:
        """Replace `path` with this state, atomically and durably."""
        data = {"actor_id": self.actor_id, "completed": self.completed, "current": None}
        if self.current is not None:
            data["current"] = asdict(self.current)
        write_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class EpisodeResult:
    """How an episode ended: completed, halted (by an emergency; it resumes later) or diverged (its
    figures then are not measured: 0 and NaN)."""

    plan: EpisodePlan
    resumed: bool
    status: str
    steps: int
    decisions: int
    final_val_accuracy: float
    params_initial: int
    params_final: int
    max_params: int | None
    wall_seconds: float
    reason: str = ""  # why a diverged episode ended


class EpisodeHalted(EsperError):
    """An emergency HALT stopped the episode's run (checkpointed): the actor stops, and resumes the
    episode when it starts again."""

    def __init__(self, result: EpisodeResult) -> None:
        self.result = result
        super().__init__(
            f"episode {result.plan.index} (run {result.plan.training_run_id}) {result.status} at step "
            f"{result.steps}"
        )


class Actor:
    """Runs episodes until `max_episodes` are completed (across restarts) or `should_stop()`.

    `settings`: the episodes' draw. Every subsystem's settings are resolved for each run from the
    environment, as `esper run` resolves them, with the episode's own epochs, decision interval, seed and
    budget over them. `assembly_options` go to every `RunAssembly` (its log, warnings, clean-up
    reporting).
    """

    def __init__(
        self,
        actor_id: str,
        settings: ActorSettings,
        esper: EsperSettings,
        secret: bytes,
        *,
        assembly_options: dict[str, Any] | None = None,
    ) -> None:
        if not actor_id or "/" in actor_id or actor_id in (".", ".."):
            raise ActorStateError(f"actor id {actor_id!r} cannot name a directory")
        self.actor_id = actor_id
        self.settings = settings
        self.root = DataLayout(esper.data_dir).actors / actor_id
        self.state_path = self.root / "actor.json"
        self.runs_dir = self.root / "runs"
        self._esper = esper
        self._secret = secret
        self._assembly_options = assembly_options or {}

    def state(self) -> ActorState:
        """The actor's durable progress."""
        return ActorState.load(self.state_path, self.actor_id)

    def run(
        self,
        *,
        max_episodes: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_episode: Callable[[EpisodeResult], None] | None = None,
    ) -> int:
        """Run (or resume) episodes; returns how many this call completed."""
        require_writable(self.root, "the actor's directory")
        self.root.mkdir(parents=True, exist_ok=True)
        done = 0
        while not should_stop():
            state = self.state()
            if state.current is None:
                if max_episodes is not None and state.completed >= max_episodes:
                    break
                state.current = plan_episode(self.settings, self.actor_id, state.completed, self.runs_dir)
                state.save(self.state_path)  # before the run exists: a restart finds it
            result = self.run_episode(state.current)
            if result.status == "halted":  # by an emergency: the episode resumes on the next start
                raise EpisodeHalted(result)
            state.completed += 1
            state.current = None
            state.save(self.state_path)
            done += 1
            if on_episode is not None:
                on_episode(result)
        return done

    def run_episode(self, plan: EpisodePlan) -> EpisodeResult:
        """Train `plan`'s run to its end: resumed from its checkpoint when it began already."""
        run_dir = Path(plan.run_dir)
        resume = RunLayout(run_dir).config.exists()
        dataset = load_task(plan.task, plan.host, seed=plan.seed, difficulty=plan.difficulty)
        settings = replace(  # the actor's deployment: its data directory, bus and secret
            RunSettings.resolve(
                tolaria={
                    "epochs": self.settings.epochs,
                    "decision_interval": self.settings.decision_interval,
                    "seed": plan.seed,
                    # A diverged episode is an outcome for the learner, not an emergency for everyone.
                    "halt_on_divergence": False,
                },
            ),
            esper=self._esper,
        )
        config = RunConfig(
            task=plan.task,
            host=plan.host,
            policy=plan.policy,
            difficulty=plan.difficulty,
            run_dir=run_dir,
            catalogue_path=DataLayout(self._esper.data_dir).catalogue,
            training_run_id=plan.training_run_id,
            tolaria=settings.tolaria,
            kasmina=settings.kasmina,
        )
        if plan.budget > 0 and not resume:  # a resumed run keeps the config it began with
            initial = config_host(config, dataset).parameter_count()
            budget = max(initial, int(initial * plan.budget))
            config = replace(config, tolaria=config.tolaria.model_copy(update={"max_params": budget}))
        config = resolve_config(config, resume=resume)
        started = time.monotonic()
        assembly = RunAssembly(
            settings,
            config,
            secret=self._secret,
            inputs=RunInputs(dataset),
            resume=resume,
            command=f"esper simic actor --actor-id {self.actor_id} (episode {plan.index})",
            **self._assembly_options,
        )
        try:
            with assembly:
                summary = assembly.train()
        except TrainingDiverged as exc:  # the run is marked failed; the actor moves on to its next episode
            return EpisodeResult(
                plan=plan,
                resumed=resume,
                status="diverged",
                steps=exc.step,
                decisions=0,
                final_val_accuracy=math.nan,
                params_initial=0,
                params_final=0,
                max_params=config.tolaria.max_params or None,
                wall_seconds=time.monotonic() - started,
                reason=str(exc),
            )
        return EpisodeResult(
            plan=plan,
            resumed=resume,
            status=summary.status,
            steps=summary.steps,
            decisions=summary.decisions,
            final_val_accuracy=summary.final_val_accuracy,
            params_initial=summary.params_initial,
            params_final=summary.params_final,
            max_params=summary.max_params,
            wall_seconds=time.monotonic() - started,
        )
