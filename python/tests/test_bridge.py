"""evod.Bridge against a real daemon: stats, execute (1-D and 2-D, equal to
`evod exec` and to evod.Policy), rollback, stop, a daemon restarted under a
long-lived Bridge, and no daemon at all."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import evod
import evod.gguf
from conftest import Daemon, poll_until, run_evod


def test_no_daemon_is_daemon_not_running(tmp_path):
    with pytest.raises(evod.DaemonNotRunning) as e:
        evod.Bridge(tmp_path)
    assert isinstance(e.value, evod.Error)
    assert ".evod/control.sock" in str(e.value)
    assert "no evod daemon is running" in str(e.value)


def test_stats_are_the_status_json(daemon: Daemon):
    bridge = evod.Bridge(daemon.dir)
    stats = bridge.get_stats()
    cli = daemon.status()
    assert stats["pid"] == daemon.proc.pid == cli["pid"]
    assert stats["healthy"] is True
    assert stats["model"] == cli["model"]
    assert [c["role"] for c in stats["children"]] == ["worker"]
    assert set(stats) == set(cli)


def test_execute_equals_evod_exec_and_policy(daemon: Daemon):
    bridge = evod.Bridge(daemon.dir)
    policy = evod.Policy(daemon.model)
    x = np.array([0.1, -0.2, 0.03, 0.4], dtype=np.float32)
    out = bridge.execute(x)
    assert out.dtype == np.float32 and out.shape == (policy.n_outputs,)
    cli = run_evod("exec", "--dir", daemon.dir, "--input", ",".join(str(v) for v in x.tolist()), "--json")
    assert np.array_equal(out, np.array(json.loads(cli.stdout)["outputs"], np.float32))
    # The Rust MLP in this process is the worker's, bit for bit.
    assert np.array_equal(out, policy(x))

    batch = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    outs = bridge.execute(batch)
    assert outs.shape == (5, policy.n_outputs)
    assert np.array_equal(outs, policy(batch))
    assert np.array_equal(outs[2], bridge.execute(batch[2]))
    # A strided view is read in C order, as its contiguous copy.
    wide = np.repeat(batch, 2, axis=1)
    assert np.array_equal(bridge.execute(wide[:, ::2]), outs)
    assert np.array_equal(policy(wide[:, ::2]), outs)
    # Lists convert; bad shapes and values are typed errors.
    assert np.array_equal(bridge.execute(x.tolist()), out)
    with pytest.raises(evod.ShapeError):
        bridge.execute(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(evod.InputError):
        bridge.execute([0.1, float("nan"), 0.0, 0.0])
    with pytest.raises(evod.DaemonError):
        bridge.execute(np.zeros(3, np.float32))  # the model takes 4 inputs


def test_rollback_restores_an_earlier_generation(daemon: Daemon):
    bridge = evod.Bridge(daemon.dir)
    live = evod.gguf.open(daemon.model)
    gen = live.metadata["evod.generation"]
    history = daemon.dir / "history"
    history.mkdir(exist_ok=True)
    shutil.copy(daemon.model, history / f"gen-{gen:08}.gguf")
    # Publish the next generation by hand, through evod.gguf.
    meta = live.metadata
    meta["evod.generation"] = gen + 1
    child = evod.gguf.mutate(live, sigma=0.5, seed=9, only="blk.*")
    evod.gguf.publish(daemon.model, meta, child)
    del live
    def serving(g: int):
        # The live file is generation g and a worker loaded it and answered
        # the supervisor's canary.
        s = bridge.get_stats()
        ok = s["healthy"] and s["generation"] == g and s["good_generation"] == g
        return s if ok else None

    poll_until("the worker to load and verify the new generation", lambda: serving(gen + 1), context=daemon.log)
    x = np.array([0.5, 0.1, -0.3, 0.2], np.float32)
    assert np.array_equal(bridge.execute(x), evod.Policy(daemon.model)(x))

    assert bridge.rollback() == gen
    s = poll_until("the rolled-back generation to be served", lambda: serving(gen), context=daemon.log)
    assert s["generation"] == gen
    old = evod.Policy(history / f"gen-{gen:08}.gguf")
    assert np.array_equal(bridge.execute(x), old(x))
    with pytest.raises(evod.DaemonError):
        bridge.rollback(to=12345)


def test_a_long_lived_bridge_survives_a_daemon_restart(daemon: Daemon):
    bridge = evod.Bridge(daemon.dir, reconnect_timeout=60)
    first = bridge.get_stats()["pid"]
    x = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    before = bridge.execute(x)
    bridge.stop()
    assert daemon.wait_exit() == 0
    with pytest.raises(evod.DaemonNotRunning):
        evod.Bridge(daemon.dir)
    # A new daemon on the same folder; the old Bridge's next call waits for
    # its socket, then works.
    daemon.start()
    stats = bridge.get_stats()
    assert stats["pid"] == daemon.proc.pid != first
    daemon.wait_healthy()
    assert np.array_equal(bridge.execute(x), before)


def test_bad_arguments_are_typed(tmp_path):
    with pytest.raises(evod.InputError):
        evod.Bridge(tmp_path, timeout=-1)
