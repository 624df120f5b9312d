"""Type stubs of the native module `evod._evod` (crates/evod-py).

Users import these names from `evod` and `evod.gguf`; the functions without
a public name here (`publish`, `add_noise`, `cross`, `_GgufFile`) are the
Rust halves of `evod.gguf`'s functions.
"""

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

class Error(Exception):
    """Base class of every error the evod package raises."""

class DaemonNotRunning(Error):
    """No evod daemon answers on the control socket."""

class DaemonError(Error):
    """The daemon answered the request with an error (its message is the text)."""

class BridgeError(Error):
    """The connection to the daemon broke, timed out, or carried a malformed answer."""

class GgufError(Error):
    """A GGUF file could not be read or written (the Rust reader's or writer's message)."""

class ModelError(Error):
    """A network or model that evod's runtime refuses."""

class ShapeError(Error):
    """An array of the wrong shape, or tensors that do not match."""

class InputError(Error):
    """A bad input value: a dtype that is not accepted, a non-finite number, an unknown name."""

_PathLike = Union[str, os.PathLike[str]]
_ArrayLike = npt.ArrayLike

class Bridge:
    """A client of a running daemon's control socket.

    Connects at construction (``DaemonNotRunning`` when nothing answers);
    each call then opens its own connection, waiting up to
    ``reconnect_timeout`` seconds for a daemon that is restarting.
    """

    def __init__(
        self,
        dir: Optional[_PathLike] = None,
        *,
        socket: Optional[_PathLike] = None,
        timeout: float = 10.0,
        reconnect_timeout: float = 10.0,
    ) -> None: ...
    @property
    def socket(self) -> Path:
        """The control socket's path."""
    def get_stats(self) -> dict[str, Any]:
        """The daemon's state: the same facts as ``evod status --json``."""
    def execute(self, inputs: _ArrayLike) -> npt.NDArray[np.float32]:
        """The live model's outputs (1-D in, 1-D out; 2-D batch in, 2-D out)."""
    def rollback(self, to: Optional[int] = None) -> int:
        """Restores a generation (the previous one by default); returns it."""
    def stop(self) -> None:
        """Asks the daemon to stop gracefully."""

class Policy:
    """evod's MLP forward pass, bit for bit (the worker's ``NEURAL_EXEC``)."""

    def __init__(
        self,
        model_or_arch: Union[_PathLike, Sequence[int]],
        params: Optional[Any] = None,
        *,
        activation: str = "tanh",
    ) -> None: ...
    @property
    def layers(self) -> list[int]: ...
    @property
    def activation(self) -> str: ...
    @property
    def n_inputs(self) -> int: ...
    @property
    def n_outputs(self) -> int: ...
    @property
    def params(self) -> npt.NDArray[np.float32]:
        """A copy of the flat parameter vector."""
    def __call__(self, obs: _ArrayLike) -> npt.NDArray[np.float32]:
        """Outputs for a 1-D observation or a 2-D batch."""
    def act(self, obs: _ArrayLike) -> int:
        """numpy's argmax of the outputs for a 1-D observation."""

class _GgufFile:
    def __init__(self, path: _PathLike) -> None: ...
    @property
    def path(self) -> Path: ...
    @property
    def version(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def checksum(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def types(self) -> dict[str, str]: ...
    @property
    def tensor_names(self) -> list[str]: ...
    def tensor_info(self, name: str) -> tuple[str, list[int]]: ...
    def tensor(self, name: str) -> npt.NDArray[np.float32]: ...
    def raw(self, name: str) -> npt.NDArray[np.uint8]: ...

def publish(
    path: str,
    metadata: list[tuple[str, str, Any]],
    tensors: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
    alignment: int = 32,
) -> tuple[int, int]: ...
def add_noise(x: npt.NDArray[np.float32], sigma: float, seed: int, name: str) -> npt.NDArray[np.float32]: ...
def cross(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], seed: int, name: str, kind: str
) -> npt.NDArray[np.float32]: ...

def serve(fitness: Any, batch: bool, episodes: bool, argv: list[str]) -> None:
    """The native serve loop behind :func:`evod.serve` (use that)."""
