"""Reference CartPole-v1 trajectories from gymnasium, for evod's exactness test.

Usage: cartpole_reference.py SPEC.json

SPEC.json: {"layers": [4, 16, 2], "activation": "tanh", "params_bits": [u32...],
            "seed": S, "episodes": N}
params_bits are the f32 parameters' bit patterns (evod's flat layout: per
block, weight row-major [out][in], then bias).

Prints JSON: {"returns": [...], "episodes": [{"obs": [[u32 x4], ...],
"states": [[u64 x4], ...], "actions": [...]}]} where obs[k] is the k-th
observation the policy saw (bits of the f32 values), states[k] the float64
state after step k (bits), actions[k] the action taken.

The policy is evod's forward pass written with numpy float32 element-wise
operations in evod's exact order (see crates/evod-runtime/src/mlp.rs):
acc = bias; acc = acc + W[:, i] * x[i] for each input i; then the activation.
"""

import json
import sys

import gymnasium as gym
import numpy as np

F = np.float32
CLAMP = F(7.905311107635498)
A = [F(v) for v in (0.00489352455891786, 0.000637261928875436, 1.48572235717979e-05,
                    5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                    -2.76076847742355e-16)]
B = [F(v) for v in (0.00489352518554385, 0.002268434632439, 0.000118534705686654,
                    1.19825839466702e-06)]


def tanh(x):
    x = np.clip(x, -CLAMP, CLAMP)
    x2 = x * x
    p = x2 * A[6] + A[5]
    for a in (A[4], A[3], A[2], A[1], A[0]):
        p = x2 * p + a
    p = p * x
    q = x2 * B[3] + B[2]
    for b in (B[1], B[0]):
        q = x2 * q + b
    return p / q


def activate(name, x):
    if name == "tanh":
        return tanh(x)
    if name == "relu":
        return np.where(x > F(0), x, F(0)).astype(F)
    if name == "sigmoid":
        return F(0.5) * tanh(F(0.5) * x) + F(0.5)
    if name == "identity":
        return x
    raise SystemExit(f"unknown activation {name}")


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    layers = spec["layers"]
    act = spec["activation"]
    params = np.array(spec["params_bits"], dtype=np.uint32).view(F)
    blocks = []
    at = 0
    for n_in, n_out in zip(layers, layers[1:]):
        w = params[at:at + n_in * n_out].reshape(n_out, n_in)
        at += n_in * n_out
        b = params[at:at + n_out]
        at += n_out
        blocks.append((w, b))
    assert at == len(params), "parameter count does not match the layers"

    def policy(obs):
        x = obs.astype(F)
        for k, (w, b) in enumerate(blocks):
            acc = b.copy()
            for i in range(w.shape[1]):
                acc = acc + w[:, i] * x[i]
            x = acc if k == len(blocks) - 1 else activate(act, acc)
        if len(x) == 1:
            return int(x[0] > F(0))
        return int(np.argmax(x))

    env = gym.make("CartPole-v1")
    returns = []
    episodes = []
    for i in range(spec["episodes"]):
        obs, _ = env.reset(seed=spec["seed"] + i)
        total = 0.0
        rec = {"obs": [], "states": [], "actions": []}
        while True:
            action = policy(obs)
            rec["obs"].append(obs.view(np.uint32).tolist())
            rec["actions"].append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rec["states"].append(np.asarray(env.unwrapped.state, dtype=np.float64).view(np.uint64).tolist())
            total += reward
            if terminated or truncated:
                break
        returns.append(total)
        episodes.append(rec)
    json.dump({"returns": returns, "episodes": episodes}, sys.stdout)


if __name__ == "__main__":
    main()
