"""Fixtures for the evod package's tests: the `evod` binary under test and
real daemons on temporary folders.

The binary is `$EVOD_BIN` (set by `cargo xtask ci`), else
`target/debug/evod` of this checkout. Waits are polls with a deadline on an
observable state (a status answer, a process exit), never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def evod_bin() -> Path:
    path = Path(os.environ.get("EVOD_BIN", ROOT / "target" / "debug" / "evod"))
    if not path.is_file():
        pytest.fail(f"the evod binary {path} does not exist: `cargo build -p evod` or set EVOD_BIN")
    return path


def run_evod(*args: Any, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOD_")}
    env["NO_COLOR"] = "1"
    out = subprocess.run(
        [str(evod_bin()), *map(str, args)], capture_output=True, text=True, env=env, timeout=60
    )
    if check and out.returncode != 0:
        raise AssertionError(f"evod {args} exited {out.returncode}:\n{out.stderr}")
    return out


def poll_until(what: str, cond: Callable[[], Optional[T]], within: float = 30.0, context: Callable[[], str] = lambda: "") -> T:
    """Calls `cond` every 10 ms until it returns something other than None;
    fails with `what` and `context()` past `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}\n{context()}")
        time.sleep(0.01)


class Daemon:
    """`evod run --dir DIR --no-evolver --workers 1`, its log in DIR/run.log."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.proc: Optional[subprocess.Popen] = None

    @property
    def model(self) -> Path:
        return self.dir / "vectorland.gguf"

    def log(self) -> str:
        try:
            return (self.dir / "run.log").read_text()
        except OSError:
            return ""

    def start(self) -> "Daemon":
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOD_")}
        with open(self.dir / "run.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(evod_bin()), "run", "--dir", str(self.dir), "--no-evolver", "--workers", "1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        return self

    def status(self) -> Optional[dict]:
        out = run_evod("status", "--json", "--dir", self.dir, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_healthy(self) -> dict:
        def healthy() -> Optional[dict]:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"evod run exited early ({self.proc.returncode}):\n{self.log()}")
            s = self.status()
            return s if s is not None and s["healthy"] else None

        return poll_until("a healthy daemon", healthy, context=self.log)

    def wait_exit(self, within: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"evod run did not exit within {within}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path).start()
    d.wait_healthy()
    yield d
    d.kill()
