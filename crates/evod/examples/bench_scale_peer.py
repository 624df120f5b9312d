"""Peer of `cargo xtask bench scale`: a numpy OpenAI-ES on gymnasium's
CartPole-v1 with the same network, population and episodes as evod, timed
end to end (noise, candidates, episodes, update) on one process.

Usage: python bench_scale_peer.py LAYERS POPULATION EPISODES MIN_SECONDS SEED
  LAYERS      comma-separated layer widths, e.g. 4,1000,1000,2 (tanh hidden
              layers, linear output, argmax action: evod's CartPole policy)
  POPULATION  candidates per generation (antithetic pairs: POPULATION/2)
  EPISODES    episodes per candidate
  MIN_SECONDS run whole generations until at least this much wall time
              (and at least one generation) has passed
Prints one JSON object: {"n_params", "generations", "evals", "steps",
"wall_s", "evals_per_s", "steps_per_s", "noise_s", "episodes_s",
"update_s"} ("steps": environment steps of every episode, which is also
the sum of the returns: CartPole pays 1 per step).

The noise of each antithetic pair comes from its own seeded generator and is
kept in one (pairs × n) float32 matrix for the update, which is then one
BLAS matrix-vector product (what a numpy user writes; 0.96 GB at 10^7
parameters, which fits). An earlier version regenerated each pair's noise
for the update, a handicap evod's recipes do not have in the same form.
numpy's own BLAS threads are left as the user would have them.
"""

import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402


def unpack(p, layers):
    """evod's flat layout: per layer W as [out][in] (row-major), then b."""
    out, at = [], 0
    for i, o in zip(layers, layers[1:]):
        w = p[at : at + i * o].reshape(o, i)
        at += i * o
        b = p[at : at + o]
        at += o
        out.append((w, b))
    return out


def episode(env, net, seed):
    obs, _ = env.reset(seed=int(seed))
    total = 0.0
    while True:
        h = obs.astype(np.float32)
        for k, (w, b) in enumerate(net):
            h = w @ h + b
            if k + 1 < len(net):
                h = np.tanh(h)
        obs, r, term, trunc, _ = env.step(int(np.argmax(h)))
        total += r
        if term or trunc:
            return total


def main():
    layers = [int(x) for x in sys.argv[1].split(",")]
    population = int(sys.argv[2])
    episodes = int(sys.argv[3])
    min_seconds = float(sys.argv[4])
    seed = int(sys.argv[5])
    n = sum(a * b + b for a, b in zip(layers, layers[1:]))
    pairs = max(1, population // 2)
    sigma, lr, wd = np.float32(0.02), 0.01, 0.005
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    scale = []
    for i, o in zip(layers, layers[1:]):
        scale += [np.full(i * o, 1.0 / np.sqrt(i), np.float32), np.zeros(o, np.float32)]
    theta = (rng.standard_normal(n, dtype=np.float32) * np.concatenate(scale)).astype(np.float32)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    noise_s = episodes_s = update_s = 0.0
    evals = 0
    steps = 0.0
    g = 0
    noise = np.empty((pairs, n), np.float32)
    t0 = time.perf_counter()
    while g == 0 or time.perf_counter() - t0 < min_seconds:
        train_seed = 10_000 * seed + g
        fs = np.empty(2 * pairs)
        for p in range(pairs):
            a = time.perf_counter()
            eps = noise[p]
            np.random.default_rng((seed, g, p)).standard_normal(dtype=np.float32, out=eps)
            plus = theta + sigma * eps
            minus = theta - sigma * eps
            b = time.perf_counter()
            for j, cand in enumerate((plus, minus)):
                net = unpack(cand, layers)
                fs[2 * p + j] = sum(episode(env, net, train_seed + e) for e in range(episodes)) / episodes
            noise_s += b - a
            episodes_s += time.perf_counter() - b
            evals += 2
            steps += episodes * (fs[2 * p] + fs[2 * p + 1])
        a = time.perf_counter()
        ranks = np.empty(len(fs))
        ranks[np.argsort(fs, kind="stable")] = np.arange(len(fs))
        ranks = ranks / max(1, len(fs) - 1) - 0.5
        w = (ranks[0::2] - ranks[1::2]).astype(np.float32)
        grad = (w @ noise) / np.float32(2 * pairs * sigma) - np.float32(wd) * theta
        t = g + 1
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        theta = (theta + lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)).astype(np.float32)
        update_s += time.perf_counter() - a
        g += 1
    wall = time.perf_counter() - t0
    print(json.dumps({
        "n_params": n,
        "generations": g,
        "evals": evals,
        "wall_s": wall,
        "evals_per_s": evals / wall,
        "steps": steps,
        "steps_per_s": steps / wall,
        "noise_s": noise_s,
        "episodes_s": episodes_s,
        "update_s": update_s,
    }))


if __name__ == "__main__":
    main()
