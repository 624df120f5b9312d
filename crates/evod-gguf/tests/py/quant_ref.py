"""gguf-py's codecs as the reference for evod's `quant` module.

Usage:
  quant_ref.py gen DIR       For each type in TYPES: seeded f32 data (mixed
                             scales, ties, constant and zero blocks; NaN,
                             inf and overflow for the float types) quantized
                             and dequantized by gguf-py. Writes DIR/T.x (f32),
                             DIR/T.q (bytes), DIR/T.qd (f32).
  quant_ref.py deq DIR T...  Dequantizes DIR/T.in (bytes of type T, raw
                             name of the type before the first dot) into
                             DIR/T.out (f32).
  quant_ref.py read FILE DIR Reads a GGUF file with GGUFReader; for tensor i
                             writes DIR/i.raw (its bytes) and DIR/i.f32
                             (dequantized); prints [{name, type, dims}] JSON.
All files are raw little-endian arrays.
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader
from gguf.quants import dequantize, quantize

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
FLOAT_TYPES = ["F32", "F16", "BF16"]


def block_data(rng, n_blocks):
    """Finite f32 values, 32 per block, in groups of varied shape."""
    blocks = []
    for i in range(n_blocks):
        kind = i % 8
        scale = 10.0 ** rng.integers(-4, 4)
        if kind == 0:
            b = rng.standard_normal(32) * scale
        elif kind == 1:
            b = rng.uniform(-1, 1, 32) * scale + rng.uniform(-3, 3) * scale
        elif kind == 2:
            b = np.zeros(32)
        elif kind == 3:
            b = np.full(32, rng.standard_normal() * scale)
        elif kind == 4:
            # one outlier
            b = rng.standard_normal(32) * scale * 0.01
            b[rng.integers(32)] = scale * rng.choice([-1, 1])
        elif kind == 5:
            # equal magnitudes of both signs: which one sets the sign
            b = rng.standard_normal(32) * scale * 0.1
            j, k = rng.choice(32, 2, replace=False)
            b[j], b[k] = (scale, -scale) if rng.integers(2) else (-scale, scale)
        elif kind == 6:
            # halves on the rounding grid: q8_0 with amax 127 has id = 1
            b = rng.integers(-127, 127, 32) + 0.5
            b[rng.integers(32)] = 127.0
        else:
            # all positive, all negative
            b = np.abs(rng.standard_normal(32)) * scale * rng.choice([-1, 1])
        blocks.append(b)
    return np.concatenate(blocks).astype(np.float32)


def float_data(rng, n):
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 6, n)).astype(np.float32)
    bits = x.view(np.uint32)
    specials = np.array(
        [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA00000, 0x7FFFFFFF,
         0x80000000, 0x00000000, 0x00000001, 0x477FF000, 0x477FEFFF, 0x477FE000, 0x7F7FFFFF,
         0x33000000, 0x33000001, 0x38800000, 0x387FFFFF, 0x3F808000, 0x3F818000, 0x7F7F8000],
        dtype=np.uint32,
    )
    bits[: len(specials)] = specials
    # random bit patterns, NaNs with random payloads among them
    bits[len(specials): len(specials) + 4096] = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    return bits.view(np.float32)


def gen(out):
    rng = np.random.default_rng(14)
    for name in BLOCK_TYPES + FLOAT_TYPES:
        t = Q[name]
        x = block_data(rng, 4096) if name in BLOCK_TYPES else float_data(rng, 32768)
        with np.errstate(all="ignore"):
            q = quantize(x.reshape(-1, 256), t)
            qd = dequantize(q, t).astype(np.float32, copy=False)
        x.tofile(os.path.join(out, name + ".x"))
        np.ascontiguousarray(q).view(np.uint8).tofile(os.path.join(out, name + ".q"))
        qd.tofile(os.path.join(out, name + ".qd"))


def deq(out, names):
    for name in names:
        t = Q[name.split(".")[0]]
        raw = np.fromfile(os.path.join(out, name + ".in"), dtype=np.uint8)
        with np.errstate(all="ignore"):
            y = dequantize(raw, t).astype(np.float32, copy=False)
        y.tofile(os.path.join(out, name + ".out"))


def read(path, out):
    reader = GGUFReader(path)
    infos = []
    for i, t in enumerate(reader.tensors):
        np.ascontiguousarray(t.data).view(np.uint8).tofile(os.path.join(out, f"{i}.raw"))
        with np.errstate(all="ignore"):
            dequantize(t.data, t.tensor_type).astype(np.float32).tofile(os.path.join(out, f"{i}.f32"))
        infos.append({"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape]})
    json.dump(infos, sys.stdout)


mode = sys.argv[1]
if mode == "gen":
    gen(sys.argv[2])
elif mode == "deq":
    deq(sys.argv[2], sys.argv[3:])
elif mode == "read":
    read(sys.argv[2], sys.argv[3])
else:
    sys.exit(f"unknown mode {mode}")
