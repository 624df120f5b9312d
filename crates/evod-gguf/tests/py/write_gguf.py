"""Writes a GGUF file with gguf-py covering every scalar type, arrays
(including string arrays), F32/F16/BF16/Q8_0/Q4_0 tensors and alignment 64,
plus a JSON sidecar with the values gguf-py wrote (tensors dequantized by
gguf-py itself).

Usage: write_gguf.py OUT.gguf OUT.json
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType as V, GGUFWriter
from gguf.quants import dequantize, quantize


def main():
    path, sidecar = sys.argv[1], sys.argv[2]
    w = GGUFWriter(path, "evodtest")
    w.add_custom_alignment(64)
    scalars = [
        ("t.u8", V.UINT8, 200),
        ("t.i8", V.INT8, -100),
        ("t.u16", V.UINT16, 60000),
        ("t.i16", V.INT16, -30000),
        ("t.u32", V.UINT32, 4000000000),
        ("t.i32", V.INT32, -2000000000),
        ("t.f32", V.FLOAT32, 0.5),
        ("t.bool", V.BOOL, True),
        ("t.string", V.STRING, "héllo wörld"),
        ("t.u64", V.UINT64, 18000000000000000000),
        ("t.i64", V.INT64, -9000000000000000000),
        ("t.f64", V.FLOAT64, 3.141592653589793),
    ]
    for key, vtype, val in scalars:
        w.add_key_value(key, val, vtype)
    arrays = [
        ("t.arr.i32", V.INT32, [1, -2, 3]),
        ("t.arr.f32", V.FLOAT32, [0.25, -1.5]),
        ("t.arr.u8", V.UINT8, [0, 1, 255]),
        ("t.arr.string", V.STRING, ["a", "bc", "", "ünï"]),
        ("t.arr.bool", V.BOOL, [True, False]),
    ]
    for key, sub, val in arrays:
        w.add_key_value(key, val, V.ARRAY, sub_type=sub)

    rng = np.random.default_rng(7)
    tensors = []

    def add(name, ttype, data):
        # data: float32 array in numpy (row-major) shape.
        if ttype == Q.F32:
            w.add_tensor(name, data.astype(np.float32))
            stored = data.astype(np.float32)
        elif ttype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
            stored = data.astype(np.float16).astype(np.float32)
        else:
            q = quantize(data.astype(np.float32), ttype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=ttype)
            stored = dequantize(q, ttype).astype(np.float32)
        tensors.append(
            {
                "name": name,
                "type": ttype.name,
                "dims": list(reversed(data.shape)),
                "values": [float(x) for x in stored.reshape(-1)],
            }
        )

    add("t.f32", Q.F32, rng.standard_normal((3, 5)))
    add("t.f16", Q.F16, rng.standard_normal((2, 7)))
    add("t.bf16", Q.BF16, rng.standard_normal((4, 3)))
    add("t.q8_0", Q.Q8_0, rng.standard_normal((2, 64)))
    add("t.q4_0", Q.Q4_0, rng.standard_normal((3, 32)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta = [["general.architecture", "string", "evodtest"], ["general.alignment", "uint32", 64]]
    for key, vtype, val in scalars:
        meta.append([key, vtype.name.lower(), val])
    for key, sub, val in arrays:
        meta.append([key, "array", {"elem_type": sub.name.lower(), "values": val}])
    with open(sidecar, "w") as f:
        json.dump({"alignment": 64, "metadata": meta, "tensors": tensors}, f)


main()
