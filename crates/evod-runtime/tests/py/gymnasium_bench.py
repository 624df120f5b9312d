"""Peer benchmark: gymnasium CartPole-v1 stepped by a numpy MLP policy.

Usage: gymnasium_bench.py WEIGHTS.json SECONDS REPEATS
WEIGHTS.json: {"layers": [4, 16, 2], "params": [...]} in evod's flat layout.
The policy is the plain numpy MLP one would write (float32 matmul, np.tanh,
argmax). Prints JSON {"steps_per_s": [one figure per repeat]}.
"""

import json
import sys
import time

import gymnasium as gym
import numpy as np


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    seconds = float(sys.argv[2])
    repeats = int(sys.argv[3])
    layers = spec["layers"]
    params = np.array(spec["params"], dtype=np.float32)
    blocks = []
    at = 0
    for n_in, n_out in zip(layers, layers[1:]):
        w = params[at:at + n_in * n_out].reshape(n_out, n_in)
        at += n_in * n_out
        blocks.append((w, params[at:at + n_out]))
        at += n_out

    def policy(obs):
        x = obs
        for k, (w, b) in enumerate(blocks):
            x = w @ x + b
            if k != len(blocks) - 1:
                x = np.tanh(x)
        return int(np.argmax(x))

    env = gym.make("CartPole-v1")
    figures = []
    seed = 0
    for _ in range(repeats):
        steps = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            obs, _ = env.reset(seed=seed)
            seed += 1
            while True:
                obs, _, terminated, truncated, _ = env.step(policy(obs))
                steps += 1
                if terminated or truncated:
                    break
        figures.append(steps / (time.perf_counter() - start))
    json.dump({"steps_per_s": figures}, sys.stdout)


if __name__ == "__main__":
    main()
