"""Peers of `cargo xtask bench evolve`: pycma's CMA-ES and a numpy OpenAI-ES
solving gymnasium's CartPole-v1 with the same 4-16-2 tanh network, judged by
the same gate as evod (mean return over 100 fresh seeded episodes >= 475),
and a cross-check of evod's solutions in gymnasium.

Usage: python bench_evolve_peers.py SEEDS EVOD_PARAMS.json OUT.json
  SEEDS          comma-separated run seeds (e.g. 0,1,2,3,4)
  EVOD_PARAMS    JSON list of evod's solving parameter vectors (may be [])
Protocol (identical to evod's loop): each candidate is scored on 1 episode,
all candidates of a generation on the same episode seed; when a generation's
best reaches 475 it is gated on 100 fresh episodes; solved = gate >= 475.
Wall time counts everything from the first sample to the passed gate.
"""

import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import cma  # noqa: E402
import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

LAYERS = (4, 16, 2)
N_PARAMS = sum(a * b + b for a, b in zip(LAYERS, LAYERS[1:]))
THRESHOLD = 475.0
GATE_EPISODES = 100
MAX_GENERATIONS = 300

ENV = gym.make("CartPole-v1")


def unpack(params):
    """evod's flat layout: per layer W as [out][in] (row-major), then b."""
    p = np.asarray(params, dtype=np.float32)
    out, at = [], 0
    for i, o in zip(LAYERS, LAYERS[1:]):
        w = p[at : at + i * o].reshape(o, i)
        at += i * o
        b = p[at : at + o]
        at += o
        out.append((w, b))
    return out


def episode(net, seed):
    obs, _ = ENV.reset(seed=int(seed))
    total = 0.0
    (w0, b0), (w1, b1) = net
    while True:
        h = np.tanh(w0 @ obs + b0)
        y = w1 @ h + b1
        obs, r, term, trunc, _ = ENV.step(int(np.argmax(y)))
        total += r
        if term or trunc:
            return total


def mean_return(params, seed, episodes):
    net = unpack(params)
    return sum(episode(net, seed + i) for i in range(episodes)) / episodes


def gate(params, run_seed, generation):
    return mean_return(params, 1_000_000 + 1000 * run_seed + 100_000 * generation, GATE_EPISODES)


def run_cma(seed):
    t0 = time.perf_counter()
    episodes = 0
    es = cma.CMAEvolutionStrategy(np.zeros(N_PARAMS), 0.5, {"seed": seed + 1, "verbose": -9})
    for g in range(MAX_GENERATIONS):
        xs = es.ask()
        train_seed = 10_000 * seed + g
        fs = [mean_return(x, train_seed, 1) for x in xs]
        episodes += len(xs)
        es.tell(xs, [-f for f in fs])
        best = int(np.argmax(fs))
        if fs[best] >= THRESHOLD:
            episodes += GATE_EPISODES
            if gate(xs[best], seed, g) >= THRESHOLD:
                return {"solved": True, "wall_s": time.perf_counter() - t0, "episodes": episodes, "generations": g + 1}
    return {"solved": False, "wall_s": time.perf_counter() - t0, "episodes": episodes, "generations": MAX_GENERATIONS}


def run_numpy_es(seed, pairs=16, sigma=0.1, lr=0.05, wd=0.005):
    """OpenAI-ES: antithetic pairs, centered ranks, Adam, L2 weight decay."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 0.1, N_PARAMS).astype(np.float32)
    m = np.zeros(N_PARAMS)
    v = np.zeros(N_PARAMS)
    episodes = 0
    for g in range(MAX_GENERATIONS):
        train_seed = 10_000 * seed + g
        eps = rng.standard_normal((pairs, N_PARAMS)).astype(np.float32)
        cands = [theta] + [theta + sigma * e for e in eps] + [theta - sigma * e for e in eps]
        fs = np.array([mean_return(c, train_seed, 1) for c in cands])
        episodes += len(cands)
        best = int(np.argmax(fs))
        if fs[best] >= THRESHOLD:
            episodes += GATE_EPISODES
            if gate(cands[best], seed, g) >= THRESHOLD:
                return {"solved": True, "wall_s": time.perf_counter() - t0, "episodes": episodes, "generations": g + 1}
        pert = fs[1:]
        ranks = np.empty(len(pert))
        ranks[np.argsort(pert, kind="stable")] = np.arange(len(pert))
        ranks = ranks / (len(pert) - 1) - 0.5
        w = ranks[:pairs] - ranks[pairs:]
        grad = (w @ eps) / (2 * pairs * sigma) - wd * theta
        t = g + 1
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        theta = (theta + lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)).astype(np.float32)
    return {"solved": False, "wall_s": time.perf_counter() - t0, "episodes": episodes, "generations": MAX_GENERATIONS}


def main():
    seeds = [int(s) for s in sys.argv[1].split(",")]
    with open(sys.argv[2]) as f:
        evod_params = json.load(f)
    out = {
        "pycma": [run_cma(s) for s in seeds],
        "numpy_es": [run_numpy_es(s) for s in seeds],
        # evod's solutions re-judged by gymnasium on 100 episodes seeded 0..99.
        "evod_gymnasium_gate": [mean_return(p, 0, GATE_EPISODES) for p in evod_params],
    }
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
