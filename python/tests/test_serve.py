"""evod.serve under a real daemon (`evod run --worker-cmd`): a Python
fitness evolves an `external` model; the same seed gives the same published
tensors; a fitness that raises, aborts, segfaults or hangs is survived
(counted error, respawn, watchdog); the evolver killed mid-run resumes from
its checkpoint; bad --worker-cmd values and a program started by hand are
refused clearly.

Faults are one-shot: the fitness consumes a flag file the test creates
while the run is under way (an atomic rename, so one worker takes it), so
the replacement worker serves normally and the run goes on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import evod
import evod.gguf
from conftest import evod_bin, poll_until, run_evod

LAYERS = "3,4,2"

FIT = """
import ctypes, os, sys, time
from pathlib import Path
import numpy as np
import evod

FLAG = Path(__file__).with_name("fault")

def fault():
    try:
        os.rename(FLAG, f"{FLAG}.taken.{os.getpid()}")
    except FileNotFoundError:
        return None
    return Path(f"{FLAG}.taken.{os.getpid()}").read_text().strip()

def score(params, seed):
    # Deterministic in (params, seed); best at params == 0.5.
    noise = np.random.default_rng(seed).random() * 1e-3
    return -float(np.sum((params.astype(np.float64) - 0.5) ** 2)) + noise

def act(kind):
    if kind == "raise":
        1 / 0
    if kind == "abort":
        os.abort()
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "hang":
        while True:
            time.sleep(60)

def fitness(params, seed):
    kind = fault()
    if kind:
        act(kind)
    return score(params, seed)

def batch_fitness(params, seed):
    assert params.ndim == 2 and params.dtype == np.float32
    return np.array([score(p, seed) for p in params])

if sys.argv[1] == "batch":
    evod.serve(batch_fitness, batch=True)
else:
    evod.serve(fitness)
"""


def package_env() -> dict:
    """The environment of `evod run`: no EVOD_* of the caller, and the evod
    package under test importable by the worker programs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOD_")}
    root = str(Path(os.path.abspath(evod.__file__)).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_COLOR"] = "1"
    return env


class Run:
    """`evod run --worker-cmd "python fit.py MODE"` on an external model."""

    def __init__(self, dir: Path, *args: str, mode: str = "single", workers: int = 1) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        run_evod("init", "--task", "external", "--layers", LAYERS, "--seed", "1", "-o", dir / "vectorland.gguf")
        (dir / "fit.py").write_text(FIT)
        cmd = shlex.join([sys.executable, str(dir / "fit.py"), mode])
        with open(dir / "run.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(evod_bin()), "run", "--dir", str(dir), "--workers", str(workers), "--worker-cmd", cmd, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=package_env(),
            )

    def log(self) -> str:
        try:
            return (self.dir / "run.log").read_text()
        except OSError:
            return ""

    def status(self) -> Optional[dict]:
        out = run_evod("status", "--json", "--dir", self.dir, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def child(self, role: str) -> Optional[dict]:
        s = self.status()
        if s is None:
            return None
        return next(c for c in s["children"] if c["role"] == role)

    def running_worker(self) -> dict:
        def up() -> Optional[dict]:
            assert self.proc.poll() is None, f"evod run exited ({self.proc.returncode}):\n{self.log()}"
            w = self.child("worker")
            return w if w is not None and w["state"] == "running" and w["pid"] else None

        return poll_until("a running worker", up, context=self.log)

    def generation_past(self, g: int, within: float = 30.0) -> int:
        def past() -> Optional[int]:
            assert self.proc.poll() is None, f"evod run exited ({self.proc.returncode}):\n{self.log()}"
            s = self.status()
            # `generation` is null for a moment while the live file is
            # being replaced.
            gen = s and s["generation"]
            return gen if gen is not None and gen > g else None

        return poll_until(f"a generation past {g}", past, within=within, context=self.log)

    def inject(self, kind: str) -> None:
        (self.dir / "fault.tmp").write_text(kind)
        os.rename(self.dir / "fault.tmp", self.dir / "fault")

    def wait_fault_taken(self) -> float:
        poll_until("the fault flag to be taken", lambda: True if not (self.dir / "fault").exists() else None, context=self.log)
        return time.monotonic()

    def wait_exit(self, within: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"evod run did not exit within {within}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for r in started:
        r.stop()


def tensors(path: Path) -> dict[str, bytes]:
    f = evod.gguf.open(path)
    return {name: f.tensors.raw(name).data.tobytes() for name in f.tensors}


def test_python_fitness_improves_the_model_and_same_seed_gives_same_tensors(tmp_path, runs):
    initial = None
    start = None
    finals = []
    for i, mode in enumerate(["single", "single", "batch"]):
        r = Run(tmp_path / f"run{i}", "--generations", "25", "--seed", "7", mode=mode, workers=2)
        runs.append(r)
        if initial is None:
            initial = tensors(r.dir / "vectorland.gguf")
            params = evod.Policy(r.dir / "vectorland.gguf").params.astype(np.float64)
            start = -float(np.sum((params - 0.5) ** 2))
        assert r.wait_exit() == 0, r.log()
        model = evod.gguf.open(r.dir / "vectorland.gguf")
        assert model.metadata["evod.task"] == "external"
        assert model.metadata["evod.generation"] > 0, r.log()
        finals.append((tensors(r.dir / "vectorland.gguf"), model.metadata["evod.fitness"]))
    # The evolver improved the Python fitness (best is 0; the initial
    # network is far from 0.5 everywhere).
    assert finals[0][1] > start + 0.5, (finals[0][1], start)
    # Same seed, same deterministic fitness: byte-identical tensors, on two
    # runs and with the batch form of the same function.
    assert finals[0][0] == finals[1][0]
    assert finals[0][0] == finals[2][0]
    assert finals[0][0] != initial


def test_es_sends_recipes_the_python_worker_regenerates_and_it_improves(tmp_path, runs):
    # ES candidates travel as recipes against a base file
    # (`EVAL_RECIPES`); evod.serve regenerates them and calls the same
    # Python function, one candidate at a time or as a 2-D batch.
    finals = []
    start = None
    for i, mode in enumerate(["single", "batch"]):
        r = Run(tmp_path / f"es{i}", "--strategy", "es", "--generations", "20", "--seed", "5", mode=mode, workers=2)
        runs.append(r)
        if start is None:
            params = evod.Policy(r.dir / "vectorland.gguf").params.astype(np.float64)
            start = -float(np.sum((params - 0.5) ** 2))
        assert r.wait_exit() == 0, r.log()
        assert "unknown opcode" not in r.log(), r.log()
        # The evolver wrote the generation's base for the workers to read.
        assert list((r.dir / "state" / "base").glob("*.gguf")), r.log()
        model = evod.gguf.open(r.dir / "vectorland.gguf")
        assert model.metadata["evod.generation"] > 0, r.log()
        finals.append((tensors(r.dir / "vectorland.gguf"), model.metadata["evod.fitness"]))
    assert finals[0][1] > start + 0.5, (finals[0][1], start)
    # The same candidates were scored: the same published tensors.
    assert finals[0][0] == finals[1][0]


def test_an_exception_is_an_error_reply_and_the_worker_lives_on(tmp_path, runs):
    r = Run(tmp_path / "d")
    runs.append(r)
    before = r.running_worker()
    g = r.generation_past(5)
    r.inject("raise")
    r.wait_fault_taken()
    w = poll_until(
        "the error to be counted",
        lambda: (lambda c: c if c and c["stats"] and c["stats"]["errors"] >= 1 else None)(r.child("worker")),
        context=r.log,
    )
    assert w["pid"] == before["pid"] and w["restarts"] == 0, w
    assert w["stats"]["errors"] == 1, w
    # The evolver logged it with the Python traceback, and evolution goes on.
    poll_until("the traceback in the evolver's log", lambda: True if "ZeroDivisionError" in r.log() and "evaluation failed" in r.log() else None, context=r.log)
    assert "Traceback (most recent call last)" in r.log()
    r.generation_past(g + 5)
    w = r.child("worker")
    assert w["pid"] == before["pid"] and w["restarts"] == 0, w


@pytest.mark.parametrize("kind,signal_name", [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_a_crash_in_the_users_process_is_survived_by_respawn(tmp_path, runs, kind, signal_name):
    r = Run(tmp_path / "d")
    runs.append(r)
    before = r.running_worker()
    g = r.generation_past(5)
    r.inject(kind)
    r.wait_fault_taken()
    w = poll_until(
        "the worker to be replaced",
        lambda: (lambda c: c if c and c["restarts"] >= 1 and c["state"] == "running" else None)(r.child("worker")),
        context=r.log,
    )
    assert w["pid"] != before["pid"]
    assert signal_name in (w["last_exit"] or ""), w
    r.generation_past(g + 5)
    assert r.child("worker")["restarts"] == 1


def test_a_hung_fitness_is_ended_by_the_heartbeat_watchdog(tmp_path, runs):
    timeout = 1.0
    r = Run(tmp_path / "d", "--heartbeat-timeout", f"{int(timeout * 1000)}ms")
    runs.append(r)
    before = r.running_worker()
    g = r.generation_past(5)
    r.inject("hang")
    r.wait_fault_taken()
    # The deadline of the wait is the bound: the watchdog ends the hang
    # after the heartbeat timeout (its tick is 200 ms), not the eval
    # timeout (60 s) nor never.
    w = poll_until(
        "the hung worker to be replaced",
        lambda: (lambda c: c if c and c["restarts"] >= 1 else None)(r.child("worker")),
        within=timeout + 10.0,
        context=r.log,
    )
    assert w["pid"] != before["pid"]
    assert "heartbeat stalled" in (w["last_exit"] or ""), w
    r.generation_past(g + 5)


def test_the_evolver_killed_resumes_from_its_checkpoint(tmp_path, runs):
    r = Run(tmp_path / "d")
    runs.append(r)
    r.running_worker()
    r.generation_past(20)
    poll_until("a checkpoint", lambda: True if (r.dir / "state" / "checkpoint.bin").exists() else None, context=r.log)
    evolver = r.child("evolver")
    os.kill(evolver["pid"], signal.SIGKILL)
    after = poll_until(
        "the evolver to be restarted",
        lambda: (lambda c: c if c and c["restarts"] >= 1 and c["state"] == "running" else None)(r.child("evolver")),
        context=r.log,
    )
    assert after["pid"] != evolver["pid"]
    poll_until("the resume", lambda: True if "resuming from" in r.log() else None, context=r.log)
    g = r.generation_past(0)
    r.generation_past(g + 5)
    # The workers were not disturbed.
    assert r.child("worker")["restarts"] == 0


def test_bad_worker_cmd_is_a_usage_error_naming_the_flag(tmp_path):
    run_evod("init", "--task", "external", "--layers", LAYERS, "-o", tmp_path / "vectorland.gguf")
    out = run_evod("run", "--dir", tmp_path, "--worker-cmd", "no-such-program-evod-test fit.py", check=False)
    assert out.returncode == 2, out.stderr
    assert "--worker-cmd" in out.stderr and "not there" in out.stderr
    out = run_evod("run", "--dir", tmp_path, "--worker-cmd", f"{sys.executable} 'unbalanced", check=False)
    assert out.returncode == 2 and "balanced quotes" in out.stderr, out.stderr
    # The built-in runtime refuses to score an external model.
    out = run_evod("eval", tmp_path / "vectorland.gguf", check=False)
    assert out.returncode != 0
    assert "external task: run the workers with --worker-cmd" in out.stderr


def test_serve_outside_a_daemon_is_a_clear_error(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text("import evod\nevod.serve(lambda p, s: 0.0)\n")
    env = package_env()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "evod.Error" in out.stderr or "Error" in out.stderr
    assert "no ring descriptor" in out.stderr and "--worker-cmd" in out.stderr
    out = subprocess.run([sys.executable, str(script), "--ring-fd", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert "bad ring descriptor" in out.stderr, out.stderr
    # A descriptor that is not a sealed memfd (stdout) is refused, not taken.
    out = subprocess.run([sys.executable, str(script), "--ring-fd", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "descriptor 1" in out.stderr, out.stderr


def test_run_without_worker_cmd_refuses_an_external_model_at_start(tmp_path):
    run_evod("init", "--task", "external", "--layers", LAYERS, "-o", tmp_path / "vectorland.gguf")
    out = run_evod("run", "--dir", tmp_path, "--workers", "1", check=False)
    assert out.returncode == 2, out.stderr
    assert "the model's task is external" in out.stderr and "--worker-cmd" in out.stderr
    # Nothing was started: no runtime folder, no checkpoint.
    assert not (tmp_path / "state").exists()


def test_the_acrobot_example_solves_acrobot(tmp_path):
    import gymnasium as gym
    example = Path(__file__).resolve().parents[2] / "examples" / "python" / "acrobot.py"
    d = tmp_path / "acrobot"
    d.mkdir()
    run_evod("init", "--task", "external", "--layers", "6,32,3", "-o", d / "vectorland.gguf")
    with open(d / "run.log", "ab") as log:
        proc = subprocess.Popen(
            [str(evod_bin()), "run", "--dir", str(d), "--workers", "2", "--seed", "1",
             "--worker-cmd", shlex.join([sys.executable, str(example)]),
             "--until-solved", "--solve-threshold", "-100"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=package_env(),
        )
    try:
        assert proc.wait(timeout=300) == 0, (d / "run.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    model = evod.gguf.open(d / "vectorland.gguf")
    assert model.metadata["evod.task"] == "external"
    # The published policy, run here with the same forward pass on seeds
    # the evolver never used, is a solver too (a margin for 20 episodes).
    policy = evod.Policy(d / "vectorland.gguf")
    env = gym.make("Acrobot-v1")
    returns = []
    for s in range(20):
        obs, _ = env.reset(seed=10**6 + s)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(policy.act(obs))
            total += r
            done = term or trunc
        returns.append(total)
    assert np.mean(returns) >= -130, returns
