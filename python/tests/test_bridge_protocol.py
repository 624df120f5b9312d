"""evod.Bridge's handling of a daemon that breaks the connection, against a
scripted server on a real Unix socket (the control protocol: one JSON line
each way per connection)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

import pytest

import evod

# Each handler gets the request and returns the response line, or None to
# close the connection without answering.
Handler = Callable[[dict], Optional[dict]]


class FakeDaemon:
    def __init__(self, dir: Path, handlers: list[Handler]) -> None:
        runtime = dir / ".evod"
        runtime.mkdir(mode=0o700)
        self.path = runtime / "control.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen()
        self.handlers = handlers
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for handler in self.handlers:
            conn, _ = self.server.accept()
            with conn:
                line = conn.makefile("r").readline()
                request = json.loads(line)
                self.requests.append(request)
                response = handler(request)
                if response is not None:
                    conn.sendall((json.dumps(response) + "\n").encode())
        self.close()

    def close(self) -> None:
        # The daemon is gone: its socket file too.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server.close()


def status(stopping: bool = False) -> Handler:
    return lambda _req: {"ok": True, "result": {"pid": 1, "stopping": stopping, "healthy": True}}


def vanish(_req: dict) -> None:
    return None


def test_a_stop_whose_answer_is_lost_succeeds_once_the_daemon_is_gone(tmp_path):
    fake = FakeDaemon(tmp_path, [status(), vanish])
    bridge = evod.Bridge(tmp_path, timeout=5)
    bridge.stop()
    fake.thread.join(timeout=10)
    assert [r["op"] for r in fake.requests] == ["status", "stop"]


def test_a_stop_whose_answer_is_lost_succeeds_if_the_daemon_says_it_is_stopping(tmp_path):
    fake = FakeDaemon(tmp_path, [status(), vanish, status(stopping=True)])
    evod.Bridge(tmp_path, timeout=5).stop()
    fake.thread.join(timeout=10)
    assert [r["op"] for r in fake.requests] == ["status", "stop", "status"]


def test_a_lost_stop_answer_from_a_daemon_that_runs_on_is_an_error(tmp_path):
    fake = FakeDaemon(tmp_path, [status(), vanish, status(stopping=False)])
    with pytest.raises(evod.BridgeError, match="closed the connection without answering"):
        evod.Bridge(tmp_path, timeout=5).stop()
    fake.thread.join(timeout=10)
    # Stop was not sent twice.
    assert [r["op"] for r in fake.requests] == ["status", "stop", "status"]


def test_status_and_exec_are_retried_after_a_broken_connection_rollback_is_not(tmp_path):
    outputs = {"ok": True, "result": {"outputs": [0.5, -1.0], "worker": 0}}
    fake = FakeDaemon(
        tmp_path,
        [status(), vanish, lambda _r: outputs, vanish, status()],
    )
    bridge = evod.Bridge(tmp_path, timeout=5)
    assert bridge.execute([1.0, 2.0]).tolist() == [0.5, -1.0]
    with pytest.raises(evod.BridgeError):
        bridge.rollback(to=3)
    assert bridge.get_stats()["pid"] == 1
    fake.thread.join(timeout=10)
    assert [r["op"] for r in fake.requests] == ["status", "exec", "exec", "rollback", "status"]
    assert fake.requests[3] == {"op": "rollback", "to": 3}


def test_daemon_errors_are_daemon_error(tmp_path):
    FakeDaemon(tmp_path, [status(), lambda _r: {"ok": False, "error": "no worker is running"}])
    with pytest.raises(evod.DaemonError, match="no worker is running"):
        evod.Bridge(tmp_path).execute([1.0])
