"""Evolve a policy for gymnasium's Acrobot-v1 with evod: a fitness evod
does not know, computed by this program as every runtime worker.

    pip install ./python gymnasium
    evod init --task external --layers 6,32,3 -o acrobot/vectorland.gguf
    evod run --dir acrobot --workers 2 \\
        --worker-cmd "python3 examples/python/acrobot.py" \\
        --until-solved --solve-threshold -100

The network (6 observations in, 3 action scores out) is evod's own MLP,
run here with :class:`evod.Policy` (the Rust forward pass the worker and
``evod exec`` use, bit for bit); the action is the largest score. The
fitness is the mean return over ``episodes`` episodes, episode ``i`` reset
with seed ``seed + i``: a deterministic function of (params, seed), so a
run is reproducible from its ``--seed`` and the evolver's gate (fresh
seeds) measures generalisation, not luck. Acrobot-v1 counts as solved at a
mean return of -100.

Imported instead of run, the module is a plain fitness function
(``fitness(params, seed, episodes)``), e.g. for another optimiser.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

import evod

#: Layer widths and activation: the served model's when run by evod.
LAYERS = [6, 32, 3]
ACTIVATION = "tanh"
#: Episodes per fitness when the evolver leaves it to us (``episodes == 0``).
EPISODES = 3

_env = gym.make("Acrobot-v1")


def fitness(params: np.ndarray, seed: int, episodes: int = 0) -> float:
    """Mean return of the policy ``params`` over ``episodes`` seeded episodes."""
    policy = evod.Policy(LAYERS, params, activation=ACTIVATION)
    n = episodes or EPISODES
    total = 0.0
    for i in range(n):
        obs, _ = _env.reset(seed=(seed + i) % 2**32)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = _env.step(policy.act(obs))
            total += float(reward)
            done = terminated or truncated
    return total / n


if __name__ == "__main__":
    model = os.environ.get("EVOD_MODEL")
    if model:
        served = evod.Policy(model)
        LAYERS, ACTIVATION = served.layers, served.activation
    evod.serve(fitness)
