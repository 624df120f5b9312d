"""evod from Python: talk to a running daemon, operate on GGUF models, and
run evod's exact MLP.

- :class:`Bridge` -- a running daemon's control socket (stats, execute,
  rollback, stop); reconnects after a daemon restart.
- :mod:`evod.gguf` -- open, mutate, cross over and publish GGUF files
  through evod's own validating reader and atomic writer.
- :class:`Policy` -- the evod forward pass, bit for bit, for acting in an
  environment.

- :func:`serve` -- this program as an evod runtime worker: a fitness
  function evod does not know, run by ``evod run --worker-cmd``.

Every error the package raises is a subclass of :class:`Error`.
"""

import inspect as _inspect
import sys as _sys

from . import gguf
from ._evod import (
    Bridge,
    BridgeError,
    DaemonError,
    DaemonNotRunning,
    Error,
    GgufError,
    InputError,
    ModelError,
    Policy,
    ShapeError,
    __version__,
)
from ._evod import serve as _serve


def _takes_episodes(fitness):
    """Whether ``fitness`` takes a third positional argument (episodes)."""
    try:
        sig = _inspect.signature(fitness)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    return len(positional) >= 3 or varargs


def serve(fitness, batch=False):
    """Serve as an evod runtime worker until the daemon stops this worker.

    Run by ``evod run --worker-cmd "python3 fit.py"``: the supervisor starts
    the program once per worker slot and passes the ring as ``--ring-fd N``
    (and ``EVOD_RING_FD``), the model as ``--model PATH`` (and
    ``EVOD_MODEL``).

    ``fitness(params, seed)`` gets one candidate's flat parameters (a 1-D
    float32 numpy array, the model's layout; a fresh copy the function may
    keep) and the evolver's seed (an int), and returns a number, higher is
    better. A function with a third parameter also gets ``episodes`` (the
    evolver's ``--episodes``; 0 means "your default"). With ``batch=True``
    the function gets all candidates of a request as a 2-D array (one row
    each) and returns one number per row.

    The heartbeat beats between candidates (and around a batch call): one
    call must finish within ``--heartbeat-timeout``, or the worker is taken
    for hung and killed. An exception answers the request with an error the
    evolver logs (with this traceback) and retries; the worker serves on.
    Returns when the daemon shuts the worker down.
    """
    _serve(fitness, bool(batch), _takes_episodes(fitness), _sys.argv[1:])

__all__ = [
    "Bridge",
    "BridgeError",
    "DaemonError",
    "DaemonNotRunning",
    "Error",
    "GgufError",
    "InputError",
    "ModelError",
    "Policy",
    "ShapeError",
    "__version__",
    "gguf",
    "serve",
]
