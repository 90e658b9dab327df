"""`esper/Growth-v0`: a run as a Gymnasium environment, built by the run assembly."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import esper.envs
from esper.envs import EnvError, GrowthEnv


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def quick_env(**overrides: object) -> GrowthEnv:
    env = gym.make(esper.envs.ENV_ID, tasks=("generated",), epochs=2, decision_interval=10, **overrides)
    assert isinstance(env.unwrapped, GrowthEnv)
    return env.unwrapped


def test_the_env_passes_gymnasiums_checker() -> None:
    env = quick_env()
    try:
        check_env(env, skip_render_check=True)
    finally:
        env.close()


def test_an_episode_trains_a_run_to_its_end_and_pays_simics_reward() -> None:
    env = quick_env()
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert set(info["graph"]["x"]) >= {"slot"}  # the GNN's graph, as plain arrays
    run_dir = env.run_dir
    assert run_dir is not None
    germinate = np.array([1, 0, 0])
    steps, rewards, reports = 0, 0.0, 0
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(germinate if steps == 0 else np.array([0, 0, 0]))
        assert not truncated
        steps += 1
        rewards += reward
        reports += len(info["field_reports"])
    summary = info["summary"]
    assert summary.status == "completed"
    assert summary.seeds_germinated == 1  # the agent's one germination, through Tamiyo's gates
    assert reports >= 1
    assert rewards != 0.0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    with pytest.raises(EnvError, match="call reset"):
        env.step(germinate)
    env.close()


def test_an_action_naming_nothing_is_a_wait() -> None:
    env = quick_env()
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([4, 3, 0]))  # fossilise the 4th live seed: there is none
    assert info["invalid_action"] is True
    env.close()


def test_reset_during_an_episode_abandons_it_and_starts_another() -> None:
    env = quick_env()
    env.reset(seed=0)
    first = env.run_dir
    env.reset(seed=1)
    assert env.run_dir != first
    assert first is not None
    assert json.loads((first / "status.json").read_text())["status"] == "completed"
    env.close()


def test_an_unknown_task_family_is_refused() -> None:
    with pytest.raises(EnvError, match="tasks must be some of"):
        GrowthEnv(tasks=("imagenet",))


def test_a_run_that_fails_is_an_error_of_reset_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.envs import growth

    def broken(*args: object, **kwargs: object) -> object:
        raise OSError("the task's data cannot be read")

    monkeypatch.setattr(growth, "load_task", broken)
    env = quick_env()
    with pytest.raises(EnvError, match="cannot be read"):
        env.reset(seed=0)
    env.close()


def test_the_graph_observation_carries_the_catalogues_blueprint_descriptors() -> None:
    env = quick_env()
    try:
        _, info = env.reset(seed=5)
        graph = info["graph"]
        assert graph["blueprint_ids"], "the catalogue offers blueprints"
        # The descriptor columns (risk, tier, quarantine, host kinds) are present, as in Tamiyo's own graph.
        assert graph["mask"]["blueprint"].all(), graph["mask"]["blueprint"]
    finally:
        env.close()
