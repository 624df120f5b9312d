"""evod from Python: talk to a running daemon, operate on GGUF models, and
run evod's exact MLP.

- :class:`Bridge` -- a running daemon's control socket (stats, execute,
  rollback, stop); reconnects after a daemon restart.
- :mod:`evod.gguf` -- open, mutate, cross over and publish GGUF files
  through evod's own validating reader and atomic writer.
- :class:`Policy` -- the evod forward pass, bit for bit, for acting in an
  environment.

Every error the package raises is a subclass of :class:`Error`.
``evod.serve(fitness)`` (a Python fitness function as an evod worker) is
coming in a later release.
"""

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
]
