"""Simic's actors: episodes drawn from (actor id, index) alone, durable progress, an episode in progress
resumed as the same run, and `esper serve --actors N` supervising one service per actor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.assembly.actor import (
    Actor,
    ActorState,
    ActorStateError,
    EpisodePlan,
    EpisodeResult,
    plan_episode,
)
from esper.cli import app
from esper.leyline import ConfigurationError, EsperSettings, load_settings
from esper.simic.actor_settings import FAMILIES, ActorSettings
from esper.weatherlight import WeatherlightSettings

SECRET = b"actor-test-secret-0123456789abcdef"


def actor_settings(**overrides: object) -> ActorSettings:
    return load_settings(ActorSettings, environ={}, **overrides)


def test_an_episode_is_drawn_from_the_actor_id_and_index_alone(tmp_path: Path) -> None:
    settings = actor_settings()

    def draw(actor_id: str, index: int) -> tuple[object, ...]:
        plan = plan_episode(settings, actor_id, index, tmp_path)
        return (plan.family, plan.task, plan.host, plan.difficulty, plan.seed, plan.budget, plan.policy)

    assert draw("actor-0", 3) == draw("actor-0", 3)
    plans = [draw(actor, index) for actor in ("actor-0", "actor-1") for index in range(40)]
    assert len({p[4] for p in plans}) == len(plans)  # every episode its own data seed
    assert {p[0] for p in plans} == set(FAMILIES)
    for family, task, host, difficulty, _seed, budget, policy in plans:
        assert FAMILIES[str(family)] == (task, host)
        assert 0.2 <= float(difficulty) <= 0.8 and 1.5 <= float(budget) <= 4.0 and policy == "gnn"
    first = plan_episode(settings, "actor-0", 0, tmp_path)
    assert first.training_run_id != plan_episode(settings, "actor-0", 0, tmp_path).training_run_id
    assert Path(first.run_dir) == tmp_path / first.training_run_id


def test_heuristic_share_and_families_shape_the_draw(tmp_path: Path) -> None:
    settings = actor_settings(families="signals", heuristic_share=1.0, budget_min=0.0, budget_max=0.0)
    plan = plan_episode(settings, "actor-0", 0, tmp_path)
    assert (plan.family, plan.host, plan.policy, plan.budget) == ("signals", "conv1d", "heuristic", 0.0)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"families": "generated,images"}, "images"),
        ({"difficulty_min": 0.9, "difficulty_max": 0.1}, "ACTOR_DIFFICULTY_MAX"),
        ({"budget_min": 0.5}, "ACTOR_BUDGET_MIN"),
        ({"budget_min": 0.0}, "ACTOR_BUDGET_MIN"),
        ({"policy": "random"}, "ACTOR_POLICY"),
    ],
)
def test_bad_actor_settings_are_named(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        actor_settings(**overrides)


def test_the_state_round_trips_and_refuses_another_actors_or_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "actor.json"
    plan = plan_episode(actor_settings(), "actor-0", 2, tmp_path)
    ActorState("actor-0", completed=2, current=plan).save(path)
    assert ActorState.load(path, "actor-0") == ActorState("actor-0", completed=2, current=plan)
    with pytest.raises(ActorStateError, match="belongs to actor 'actor-0'"):
        ActorState.load(path, "actor-1")
    path.write_text("{not json")
    with pytest.raises(ActorStateError, match="is not an actor's state"):
        ActorState.load(path, "actor-0")
    assert ActorState.load(tmp_path / "absent.json", "actor-3") == ActorState("actor-3")


@pytest.mark.parametrize("actor_id", ["", "a/b", ".."])
def test_an_actor_id_that_cannot_name_a_directory_is_refused(tmp_path: Path, actor_id: str) -> None:
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path)
    with pytest.raises(ActorStateError, match="cannot name a directory"):
        Actor(actor_id, actor_settings(), esper, SECRET)


def test_an_episode_in_progress_resumes_as_the_same_run(tmp_path: Path) -> None:
    """An actor that stopped with an episode in progress (its run begun) continues that run on restart:
    no second run for the episode, and its progress moves on once the run is done."""
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path, bus_url="")
    settings = actor_settings(epochs=1, decision_interval=10, families="generated", policy="heuristic")
    actor = Actor("actor-0", settings, esper, SECRET)
    results = []
    assert actor.run(max_episodes=1, on_episode=results.append) == 1
    assert not results[0].resumed and actor.state() == ActorState("actor-0", completed=1)
    plan: EpisodePlan = results[0].plan
    ActorState("actor-0", completed=0, current=plan).save(actor.state_path)  # as if killed at its end

    assert actor.run(max_episodes=1, on_episode=results.append) == 1
    assert results[1].resumed and results[1].plan == plan
    assert [p.name for p in actor.runs_dir.iterdir()] == [plan.training_run_id]
    assert json.loads((Path(plan.run_dir) / "summary.json").read_text())["run_id"] == plan.training_run_id
    assert actor.run(max_episodes=1) == 0  # done: nothing more to run


def test_a_diverged_episode_ends_alone_and_the_actor_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An episode whose training diverges is an outcome, not an emergency: no HALT for every process on
    the bus, and the actor counts it and goes on to its next episode."""
    from esper.oona import EmbeddedBus, OonaSettings, Streams
    from esper.tolaria.trainer import Trainer

    def explode(self: Trainer) -> None:
        raise self._diverged("loss is nan (scripted)")

    monkeypatch.setattr(Trainer, "train_step", explode)
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path, bus_url="")
    settings = actor_settings(epochs=1, families="generated", policy="heuristic")
    actor = Actor("actor-0", settings, esper, SECRET)
    results: list[EpisodeResult] = []
    assert actor.run(max_episodes=2, on_episode=results.append) == 2
    assert [r.status for r in results] == ["diverged", "diverged"] and "scripted" in results[0].reason
    assert actor.state() == ActorState("actor-0", completed=2)
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    try:
        assert Streams.EMERGENCY not in {s.stream for s in bus.stats() if s.length}
    finally:
        bus.close()


def test_serve_adds_one_service_per_actor() -> None:
    settings = load_settings(WeatherlightSettings, environ={}, actors=3)
    specs = settings.service_specs()
    assert [s.name for s in specs] == ["simic", "actor-0", "actor-1", "actor-2"]
    assert specs[2].argv[-4:] == ("simic", "actor", "--actor-id", "actor-1")


def test_actor_help_documents_its_options() -> None:
    result = CliRunner().invoke(app, ["simic", "actor", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--actor-id", "--max-episodes", "--epochs", "--decision-interval", "--family", "--json"):
        assert option in result.stdout
