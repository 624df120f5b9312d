"""evod.Policy acting in gymnasium's CartPole-v1 scores what `evod eval`
scores: the forward pass (and numpy's argmax) are evod's, bit for bit."""

from __future__ import annotations

import json

import gymnasium as gym

import evod
from conftest import run_evod


def test_policy_in_gymnasium_matches_evod_eval(tmp_path):
    model = tmp_path / "cp.gguf"
    run_evod("init", "--task", "cartpole", "--layers", "4,16,2", "--seed", "3", "-o", model)
    policy = evod.Policy(model)
    env = gym.make("CartPole-v1")
    returns = []
    for episode in range(4):
        obs, _ = env.reset(seed=11 + episode)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    # evod seeds episode i of an evaluation with seed + i.
    report = json.loads(run_evod("eval", model, "--episodes", "4", "--seed", "11", "--json").stdout)
    assert report["returns"] == returns
