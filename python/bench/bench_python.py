"""`cargo xtask bench python`: what a Python fitness costs under evod, and
evod against pycma on gymnasium's Acrobot-v1. Writes the JSON file named
by the first argument.

- ``overhead_per_candidate_us``: a trivial fitness (a constant) served by
  ``evod.serve`` under ``evod run --workers 1`` (release build), per
  candidate evaluation in steady state (the slope of ``wall_s`` over
  ``evaluations`` in the run's progress.csv, past the first generations, so
  start-up is not counted), minus the same function called in a plain
  Python loop on the same arrays. It holds everything evod adds per
  candidate: the evolver's mutation and bookkeeping, the ring round trip,
  the numpy array, the call.
- ``acrobot_solve_wall_s_median``: ``evod run --workers 2 --until-solved
  --solve-threshold -100`` with ``examples/python/acrobot.py``, wall time
  from start to exit, median over seeds 1..5.
- ``pycma_acrobot_solve_wall_s_median``: pycma's CMA-ES on the same fitness
  (same function, same 6-32-3 network, same initial weights), its
  population evaluated on 2 processes (the same 2 cores), with the same
  gate: a generation's best candidate whose training return reaches -100 is
  run on 100 fresh episodes (in one process, as evod's gate is one request
  to one worker), and solved when their mean reaches -100. Wall time from start (the pool's 2
  processes started, as evod's run starts its workers) to solved, median over seeds
  1..5 (a run that does not solve within the time limit counts as the
  limit, and is reported in ``pycma_unsolved``).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EVOD = os.environ.get("EVOD_BIN", str(ROOT / "target" / "release" / "evod"))
ACROBOT = ROOT / "examples" / "python" / "acrobot.py"
SEEDS = [1, 2, 3, 4, 5]
LIMIT_S = 300.0

TRIVIAL = """
import evod
def fitness(params, seed):
    return 0.0
evod.serve(fitness)
"""


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("EVOD_")}
    e["NO_COLOR"] = "1"
    return e


def evod(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([EVOD, *args], check=True, capture_output=True, text=True, env=env(), **kw)


def overhead() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        evod("init", "--task", "external", "--layers", "6,32,3", "-o", str(d / "vectorland.gguf"))
        (d / "fit.py").write_text(TRIVIAL)
        generations = 400
        evod(
            "run", "--dir", str(d), "--workers", "1", "--generations", str(generations),
            "--worker-cmd", shlex.join([sys.executable, str(d / "fit.py")]),
            timeout=600,
        )
        rows = list(csv.DictReader(open(d / "state" / "progress.csv")))
        first, last = rows[len(rows) // 4], rows[-1]
        evals = int(last["evaluations"]) - int(first["evaluations"])
        served_us = (float(last["wall_s"]) - float(first["wall_s"])) / evals * 1e6
    # The same function in a plain loop, on fresh float32 arrays of the
    # same size (evod hands the function one per candidate).
    def fitness(params, seed):
        return 0.0
    n = 200_000
    params = [np.zeros(323, np.float32) for _ in range(64)]
    t = time.perf_counter()
    for i in range(n):
        fitness(params[i % 64].copy(), i)
    plain_us = (time.perf_counter() - t) / n * 1e6
    return {
        "overhead_per_candidate_us": served_us - plain_us,
        "overhead_served_per_candidate_us": served_us,
        "overhead_plain_loop_per_call_us": plain_us,
        "overhead_evaluations": evals,
    }


def evod_acrobot(seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        evod("init", "--task", "external", "--layers", "6,32,3", "-o", str(d / "vectorland.gguf"))
        t = time.perf_counter()
        evod(
            "run", "--dir", str(d), "--workers", "2", "--seed", str(seed),
            "--until-solved", "--solve-threshold=-100",
            "--worker-cmd", shlex.join([sys.executable, str(ACROBOT)]),
            timeout=LIMIT_S,
        )
        return time.perf_counter() - t


_fitness = None


def _init() -> None:
    global _fitness
    sys.path.insert(0, str(ACROBOT.parent))
    import acrobot

    _fitness = acrobot.fitness


def _eval(job):
    params, seed, episodes = job
    return _fitness(np.asarray(params, np.float32), seed, episodes)


def pycma_acrobot(seed: int, model: Path) -> tuple[float, bool]:
    """Wall time of a pycma run as a command, from its start (a new Python
    process importing numpy, cma and the environment, its pool of 2
    processes) to its exit after solving: what evod's wall time covers."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--pycma", str(seed), str(model)],
        check=True, capture_output=True, text=True, timeout=LIMIT_S + 60,
    )
    wall = time.perf_counter() - t
    return wall, json.loads(out.stdout.strip().splitlines()[-1])["solved"]


def pycma_main(seed: int, model: Path) -> None:
    import cma

    import evod as evod_py

    x0 = evod_py.Policy(str(model)).params
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2, initializer=_init) as pool:
        _, solved = _pycma_loop(seed, x0, pool, t, cma)
    print(json.dumps({"solved": solved}))


def _pycma_loop(seed, x0, pool, t, cma) -> tuple[float, bool]:
    es = cma.CMAEvolutionStrategy(x0.astype(np.float64), 0.1, {"seed": seed, "verbose": -9})
    generation = 0
    while time.perf_counter() - t < LIMIT_S:
        xs = es.ask()
        train_seed = seed * 1_000_003 + generation
        fits = pool.map(_eval, [(x, train_seed, 1) for x in xs])
        es.tell(xs, [-f for f in fits])
        best = xs[int(np.argmax(fits))]
        if max(fits) >= -100:
            gate_seed = 10**9 + seed * 1_000_003 + generation
            # 100 fresh episodes in one process, as evod's gate is one
            # request to one worker.
            if pool.apply(_eval, ((best, gate_seed, 100),)) >= -100:
                return time.perf_counter() - t, True
        generation += 1
    return LIMIT_S, False


def main() -> None:
    out = Path(sys.argv[1])
    result = dict(overhead())
    print(json.dumps(result, indent=2), flush=True)
    evod_walls = [evod_acrobot(s) for s in SEEDS]
    result["acrobot_solve_wall_s"] = evod_walls
    result["acrobot_solve_wall_s_median"] = statistics.median(evod_walls)
    print(f"evod acrobot: {evod_walls}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.gguf"
        evod("init", "--task", "external", "--layers", "6,32,3", "-o", str(model))
        runs = [pycma_acrobot(s, model) for s in SEEDS]
    result["pycma_acrobot_solve_wall_s"] = [w for w, _ in runs]
    result["pycma_acrobot_solve_wall_s_median"] = statistics.median(w for w, _ in runs)
    result["pycma_unsolved"] = sum(1 for _, ok in runs if not ok)
    result["acrobot_speedup_vs_pycma"] = (
        result["pycma_acrobot_solve_wall_s_median"] / result["acrobot_solve_wall_s_median"]
    )
    result["cpus"] = os.cpu_count()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "--pycma":
        pycma_main(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
