"""The GGUF surgeon: open, mutate, cross over and publish GGUF files with
evod's own reader (validating, memory-mapped) and atomic writer.

Shapes follow numpy and the ``gguf`` package: an array's shape is the GGUF
dims reversed (a ``blk.0.weight`` with GGUF dims ``[in, out]`` is an
``(out, in)`` array). Metadata keeps its GGUF types through a round trip:
``GgufFile.metadata`` is a :class:`Metadata` dict that remembers them, and
:func:`publish` writes them back; keys without a known type are inferred
(see :func:`publish`).

Randomness is a pure function of ``(seed, tensor name, element index)``:
the same call gives the same bytes on any machine, whatever the order or
the other contents of the dict. That is what a fitness function needs for
an exact resume: derive every seed from evod's, never from the clock.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from . import _evod
from ._evod import GgufError, InputError, ShapeError

__all__ = [
    "GgufError",
    "GgufFile",
    "Metadata",
    "PublishReport",
    "RawTensor",
    "TensorMap",
    "crossover",
    "mutate",
    "open",
    "publish",
]


class RawTensor(NamedTuple):
    """A tensor's stored bytes and type, written back unchanged by
    :func:`publish` (how quantized tensors keep their exact bytes)."""

    type: str
    """The ggml type name (``F32``, ``Q4_K``, ...)."""
    shape: tuple[int, ...]
    """numpy order: the GGUF dims reversed."""
    data: np.ndarray
    """The bytes, a 1-D uint8 array."""


class PublishReport(NamedTuple):
    """What :func:`publish` wrote."""

    bytes: int
    """Size of the file."""
    checksum: int
    """xxh3-64 of the data section: the model's identity as evod logs it."""


class Metadata(dict[str, Any]):
    """A metadata dict that remembers each key's GGUF type (``types``), so
    that :func:`publish` writes a value back with the type it was read
    with. Keys added later have no entry and are inferred."""

    types: dict[str, str]

    def __init__(self, items: Any = (), types: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(items)
        self.types = dict(types or {})


Tensor = Union[np.ndarray, RawTensor]


class TensorMap(Mapping[str, np.ndarray]):
    """A file's tensors by name, read on access: float32 arrays (read-only
    views of the map for F32, dequantized copies for the other types evod
    decodes). A type evod cannot decode raises :class:`evod.GgufError`;
    its bytes are available with :meth:`raw`."""

    def __init__(self, native: _evod._GgufFile) -> None:
        self._native = native
        self._names = list(native.tensor_names)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._native.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def type(self, name: str) -> str:
        """The tensor's ggml type name."""
        return self._native.tensor_info(name)[0]

    def raw(self, name: str) -> RawTensor:
        """The tensor's stored bytes (a read-only view of the map)."""
        ttype, dims = self._native.tensor_info(name)
        return RawTensor(ttype, tuple(reversed(dims)), self._native.raw(name))

    def passthrough(self, name: str) -> Tensor:
        """The tensor as :func:`mutate` and :func:`crossover` pass an
        unselected one on: the F32 view, or the stored bytes of any other
        type, so :func:`publish` writes it back byte for byte."""
        return self[name] if self.type(name) == "F32" else self.raw(name)


class GgufFile:
    """An open, validated GGUF file (see :func:`open`)."""

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self._native = _evod._GgufFile(os.fspath(path))
        self.metadata: Metadata = Metadata(self._native.metadata, self._native.types)
        """Metadata in file order, with its types (a dict you own)."""
        self.tensors: TensorMap = TensorMap(self._native)
        """Tensors by name, in file order."""

    @property
    def path(self) -> str:
        return os.fspath(self._native.path)

    @property
    def version(self) -> int:
        return self._native.version

    @property
    def alignment(self) -> int:
        return self._native.alignment

    @property
    def checksum(self) -> int:
        """xxh3-64 of the data section, as evod logs a model's identity."""
        return self._native.checksum

    @property
    def types(self) -> dict[str, str]:
        """Each metadata key's GGUF type (``u32``, ``string``, ``array[u32]``, ...)."""
        return dict(self._native.types)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"evod.gguf.GgufFile({self.path!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def open(path: Union[str, os.PathLike[str]]) -> GgufFile:  # noqa: A001 - the module's verb
    """Opens and validates a GGUF file (v2 or v3). Raises
    :class:`evod.GgufError` with the reader's message for a malformed file."""
    return GgufFile(path)


_DTYPE_TYPES = {
    "uint8": "u8",
    "int8": "i8",
    "uint16": "u16",
    "int16": "i16",
    "uint32": "u32",
    "int32": "i32",
    "uint64": "u64",
    "int64": "i64",
    "float32": "f32",
    "float64": "f64",
    "bool": "bool",
}

_TENSOR_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
}


def _infer(key: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, np.generic):
        name = _DTYPE_TYPES.get(value.dtype.name)
        if name is None:
            raise InputError(f"metadata key {key!r}: numpy type {value.dtype} has no GGUF type")
        return name
    if isinstance(value, int):
        if key == "general.alignment":
            return "u32"
        return "i64" if -(2**63) <= value < 2**63 else "u64"
    if isinstance(value, float):
        return "f64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InputError(f"metadata key {key!r}: an array value must be 1-D, got shape {value.shape}")
        name = _DTYPE_TYPES.get(value.dtype.name)
        if name is None:
            raise InputError(f"metadata key {key!r}: numpy dtype {value.dtype} has no GGUF type")
        return f"array[{name}]"
    if isinstance(value, (list, tuple)):
        inner = {_infer(key, v) for v in value}
        if not inner:
            return "array[i32]"
        if len(inner) == 1:
            return f"array[{inner.pop()}]"
        if inner <= {"i64", "u64"}:
            return "array[u64]"
        if inner <= {"i64", "u64", "f64"}:
            return "array[f64]"
        raise InputError(f"metadata key {key!r}: a list mixes types {sorted(inner)}")
    raise InputError(f"metadata key {key!r}: {type(value).__name__} has no GGUF type")


def _tensor_entry(name: str, tensor: Any) -> tuple[str, str, list[int], np.ndarray]:
    if isinstance(tensor, RawTensor):
        data = np.ascontiguousarray(tensor.data, dtype=np.uint8).reshape(-1)
        return (name, tensor.type, [int(d) for d in reversed(tensor.shape)], data)
    array = np.asarray(tensor)
    ttype = _TENSOR_DTYPES.get(array.dtype.name)
    if ttype is None:
        raise InputError(
            f"tensor {name!r}: dtype {array.dtype} cannot be written "
            f"(accepted: {', '.join(_TENSOR_DTYPES)}, or a RawTensor)"
        )
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim > 4:
        raise ShapeError(f"tensor {name!r}: GGUF tensors have at most 4 dims, got shape {array.shape}")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return (name, ttype, [int(d) for d in reversed(little.shape)], little.view(np.uint8).reshape(-1))


def publish(
    path: Union[str, os.PathLike[str]],
    metadata: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    types: Optional[Mapping[str, str]] = None,
    alignment: int = 32,
) -> PublishReport:
    """Writes a GGUF v3 file atomically through evod's writer (temporary
    file beside ``path``, fsync, rename, folder fsync): ``path`` is always
    the old or the new complete file.

    ``metadata`` is written in its order. Each key's type is, first, the
    one in ``types``; then the one the dict remembers (a :class:`Metadata`
    from :func:`open`); else inferred: bool -> ``bool``, int -> ``i64``
    (``u64`` past its range; ``general.alignment`` -> ``u32``), float ->
    ``f64``, str -> ``string``, a numpy scalar or 1-D array -> its dtype,
    a list -> ``array[T]`` of its elements' type.

    ``tensors`` maps names to numpy arrays (float32 -> F32, float16 -> F16,
    float64 -> F64, int8/16/32/64 -> I8/I16/I32/I64) or :class:`RawTensor`.
    ``alignment`` applies unless the metadata has ``general.alignment``.
    """
    if isinstance(tensors, GgufFile):
        tensors = tensors.tensors
    known: dict[str, str] = dict(getattr(metadata, "types", {}) or {})
    known.update(types or {})
    entries = [
        (key, known[key] if key in known else _infer(key, value), value)
        for key, value in metadata.items()
    ]
    specs = []
    for name in tensors:
        value = tensors.passthrough(name) if isinstance(tensors, TensorMap) else tensors[name]
        specs.append(_tensor_entry(name, value))
    written, checksum = _evod.publish(os.fspath(path), entries, specs, alignment)
    return PublishReport(written, checksum)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise InputError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def _selected(name: str, only: Union[None, str, Sequence[str]]) -> bool:
    if only is None:
        return True
    patterns = [only] if isinstance(only, str) else list(only)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _tensors_of(tensors: Any) -> Mapping[str, Any]:
    return tensors.tensors if isinstance(tensors, GgufFile) else tensors


def _passthrough(tensors: Mapping[str, Any], name: str) -> Tensor:
    return tensors.passthrough(name) if isinstance(tensors, TensorMap) else tensors[name]


def _float32(name: str, tensor: Any) -> np.ndarray:
    if isinstance(tensor, RawTensor):
        raise InputError(f"tensor {name!r} is a RawTensor of type {tensor.type}: it cannot be changed")
    array = np.asarray(tensor)
    if array.dtype != np.float32:
        raise InputError(f"tensor {name!r} has dtype {array.dtype}: mutate and crossover work on float32")
    return array


def mutate(
    tensors: Union[Mapping[str, Tensor], GgufFile],
    sigma: float,
    seed: int,
    only: Union[None, str, Sequence[str]] = None,
) -> dict[str, Tensor]:
    """Adds Gaussian-like noise (evod's own generator, unit variance) times
    ``sigma`` to every float32 tensor whose name matches ``only`` (an
    ``fnmatch`` glob or a list of them; all tensors when ``None``).

    Returns a new dict; the inputs are not modified. Tensors not selected
    are passed on unchanged (the same objects; from a file, a non-F32
    tensor as its stored bytes), so they publish byte-identical. The same
    ``(tensors, sigma, seed, only)`` gives the same bytes everywhere.
    """
    seed = _check_seed(seed)
    source = _tensors_of(tensors)
    out: dict[str, Tensor] = {}
    for name in source:
        if _selected(name, only):
            out[name] = _evod.add_noise(_float32(name, source[name]), float(sigma), seed, name)
        else:
            out[name] = _passthrough(source, name)
    return out


def crossover(
    a: Union[Mapping[str, Tensor], GgufFile],
    b: Union[Mapping[str, Tensor], GgufFile],
    seed: int,
    kind: str = "uniform",
    only: Union[None, str, Sequence[str]] = None,
) -> dict[str, Tensor]:
    """A child of ``a`` and ``b`` (same tensor names and shapes).

    ``kind="uniform"``: each element from ``a`` or ``b`` with probability
    1/2; ``kind="arithmetic"``: ``alpha * a + (1 - alpha) * b`` with one
    ``alpha`` in [0, 1) per tensor. Tensors not matching ``only`` come
    from ``a`` unchanged. Deterministic in ``seed``, as :func:`mutate`.
    """
    seed = _check_seed(seed)
    if kind not in ("uniform", "arithmetic"):
        raise InputError(f"crossover kind {kind!r}: expected 'uniform' or 'arithmetic'")
    ta, tb = _tensors_of(a), _tensors_of(b)
    names_a, names_b = list(ta), list(tb)
    if set(names_a) != set(names_b):
        only_a = sorted(set(names_a) - set(names_b))
        only_b = sorted(set(names_b) - set(names_a))
        raise ShapeError(f"the parents' tensors differ: only in a {only_a}, only in b {only_b}")
    out: dict[str, Tensor] = {}
    for name in names_a:
        if _selected(name, only):
            out[name] = _evod.cross(_float32(name, ta[name]), _float32(name, tb[name]), seed, name, kind)
        else:
            out[name] = _passthrough(ta, name)
    return out
