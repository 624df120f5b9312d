"""Reads a GGUF file with gguf-py and prints its contents as JSON.

Usage: dump_gguf.py FILE
Output: {"alignment", "metadata": [[key, type, value]...] in file order,
"tensors": [{"name", "type", "dims" (ggml order), "values" (dequantized f32)}]}.
Arrays are {"elem_type", "values"}; non-finite floats are strings.
"""
import json
import math
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize


def scalar(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def field_value(field):
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        elem = field.types[1]
        values = field.contents()
        return {"elem_type": elem.name.lower(), "values": [scalar(x) for x in values]}
    return scalar(field.contents())


def main():
    reader = GGUFReader(sys.argv[1])
    meta = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta.append([name, field.types[0].name.lower(), field_value(field)])
    tensors = []
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "dims": [int(d) for d in t.shape],
                "offset": int(t.data_offset),
                "values": [float(x) for x in values],
            }
        )
    json.dump({"alignment": int(reader.alignment), "metadata": meta, "tensors": tensors}, sys.stdout)


main()
