"""A standard reinforcement-learning loop over Esper: the `esper/Growth-v0` Gymnasium environment.

Each episode is one training run on a generated task; at every decision the agent picks what to grow
(the flat `Box` observation, a `MultiDiscrete` action: what, which slot, which blueprint), and the
reward is Simic's, paid as each decision's field report closes. The agent here is hand-written (a
rule on the flat view) with a dash of random exploration, so it runs anywhere Esper does.

With Stable-Baselines3 installed (it is not an Esper dependency), a PPO agent trains on the same view:

    import gymnasium as gym
    import esper.envs
    from stable_baselines3 import PPO

    env = gym.make("esper/Growth-v0", tasks=("generated", "signals"), epochs=3)
    PPO("MlpPolicy", env, n_steps=64, batch_size=32).learn(total_timesteps=2_000)

    python examples/gym_agent.py             # a few episodes over the task family
    python examples/gym_agent.py --smoke     # seconds: one short episode
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

import esper.envs
from esper.envs.growth import FLAT_FEATURES, SLOT_FEATURES

WAIT, GERMINATE, FOSSILISE = 0, 1, 4


def hand_written(
    obs: NDArray[np.float32], rng: np.random.Generator, space: gym.spaces.MultiDiscrete
) -> NDArray[np.int64]:
    """Germinate in the first empty slot when nothing grows; fossilise a seed that helps; else wait.
    One decision in ten is random, to see the rest of the action space."""
    if rng.random() < 0.1:
        return np.asarray(space.sample(), dtype=np.int64)
    live = obs[7]  # live seeds and growths, as a fraction of the slots the view holds
    slots = obs[FLAT_FEATURES:].reshape(
        -1, SLOT_FEATURES
    )  # present, stage, alpha, contribution acc/loss, width
    if live == 0:
        empty = [i for i, slot in enumerate(slots) if slot[0] == 1.0 and slot[1] == 0.0]
        if empty:
            return np.array([GERMINATE, empty[0], 0])
    helping = [i for i, slot in enumerate(slots) if slot[3] > 0.0 or slot[4] > 0.0]
    if helping:
        return np.array([FOSSILISE, 0, 0])  # the first live seed or growth
    return np.array([WAIT, 0, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short episode")
    parser.add_argument("--episodes", type=int, default=4)
    args = parser.parse_args()

    if args.smoke:
        env = gym.make(esper.envs.ENV_ID, tasks=("generated",), epochs=1, decision_interval=10)
        episodes = 1
    else:
        env = gym.make(esper.envs.ENV_ID, tasks=("generated", "signals", "digits"), epochs=3)
        episodes = args.episodes
    rng = np.random.default_rng(0)
    space = env.action_space
    assert isinstance(space, gym.spaces.MultiDiscrete)
    for episode in range(episodes):
        obs, info = env.reset(seed=episode)
        task, total, decisions, done = info["task"], 0.0, 0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(hand_written(obs, rng, space))
            total += float(reward)
            decisions += 1
            done = terminated or truncated
        summary = info["summary"]
        print(
            f"episode {episode}: {task}, {decisions} decisions, return {total:+.3f}, "
            f"val accuracy {summary.final_val_accuracy:.3f}, seeds fossilised {summary.seeds_fossilized}"
        )
    env.close()


if __name__ == "__main__":
    main()
