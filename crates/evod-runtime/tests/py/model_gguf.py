"""evod model files through gguf-py, for crates/evod-runtime/tests/model_gguf.rs.

Usage:
  model_gguf.py write SPEC.json OUT.gguf OUT.json
      Writes an evod model with gguf-py's GGUFWriter. SPEC.json:
      {"layers", "activation", "task", "generation", "seed", "strategy",
       "fitness" (optional), "params_bits" (f32 bits, evod's flat layout),
       "blk_type": "F32" | "F16" | "BF16", "extras": bool}
      With "extras", the file also holds keys evod does not own (several
      types, before and after evod's keys, general.alignment 64) and tensors
      it does not own (an F16 tensor before the blocks; an F32 "blk.0.scale",
      which is not a blk.N.weight|bias tensor; a Q8_0 tensor last).
      OUT.json: {"params_bits": the block tensors as gguf-py stored them,
      dequantized by gguf-py to f32, in evod's flat order}.
  model_gguf.py dump FILE
      Reads FILE with GGUFReader; prints {"alignment", "metadata": [[key,
      type, value]] in file order (arrays as {"elem_type", "values"}),
      "tensors": [{"name", "type", "dims" (ggml order), "bits" (f32 bits of
      the dequantized values)}]}.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.quants import dequantize, quantize


def write(spec_path, out, sidecar):
    with open(spec_path) as f:
        spec = json.load(f)
    extras = spec.get("extras", False)
    w = GGUFWriter(out, "evod-mlp")
    if extras:
        w.add_custom_alignment(64)
        w.add_key_value("user.note", "kept ✓", V.STRING)
        w.add_key_value("user.count", 250, V.UINT8)
        w.add_key_value("user.offset", -123456789, V.INT32)
    w.add_key_value("general.name", "written by gguf-py", V.STRING)
    w.add_key_value("evod.layers", spec["layers"], V.ARRAY, sub_type=V.UINT32)
    w.add_key_value("evod.activation", spec["activation"], V.STRING)
    w.add_key_value("evod.task", spec["task"], V.STRING)
    w.add_key_value("evod.generation", spec["generation"], V.UINT64)
    if "fitness" in spec:
        w.add_key_value("evod.fitness", spec["fitness"], V.FLOAT64)
    w.add_key_value("evod.seed", spec["seed"], V.UINT64)
    w.add_key_value("evod.strategy", spec["strategy"], V.STRING)
    if extras:
        w.add_key_value("user.flag", True, V.BOOL)
        w.add_key_value("user.scale", 0.75, V.FLOAT32)
        w.add_key_value("user.big", -9000000000000000000, V.INT64)
        w.add_key_value("user.ratio", 2.5e-300, V.FLOAT64)
        w.add_key_value("user.tags", ["a", "", "ünï"], V.ARRAY, sub_type=V.STRING)
        w.add_key_value("user.ids", [3, -1, 7], V.ARRAY, sub_type=V.INT32)
        # Not one of evod's keys even though it is under evod.: kept.
        w.add_key_value("evod.user_comment", "mine", V.STRING)

    rng = np.random.default_rng(11)
    if extras:
        w.add_tensor("token_embd.weight", rng.standard_normal((3, 8)).astype(np.float16))

    params = np.array(spec["params_bits"], dtype=np.uint32).view(np.float32)
    layers = spec["layers"]
    blk_type = Q[spec["blk_type"]]
    stored = []
    at = 0
    for n, (n_in, n_out) in enumerate(zip(layers, layers[1:])):
        wmat = params[at:at + n_in * n_out].reshape(n_out, n_in)
        at += n_in * n_out
        bias = params[at:at + n_out]
        at += n_out
        for name, data in ((f"blk.{n}.weight", wmat), (f"blk.{n}.bias", bias)):
            if blk_type == Q.F32:
                w.add_tensor(name, data.astype(np.float32))
                back = data.astype(np.float32)
            elif blk_type == Q.F16:
                w.add_tensor(name, data.astype(np.float16))
                back = data.astype(np.float16).astype(np.float32)
            else:
                q = quantize(data.astype(np.float32), blk_type)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=blk_type)
                back = dequantize(q, blk_type).astype(np.float32)
            stored.append(back.reshape(-1))
        if extras and n == 0:
            w.add_tensor("blk.0.scale", np.array([1.5, -2.0], dtype=np.float32))
    assert at == len(params), "parameter count does not match the layers"
    if extras:
        q = quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0)
        w.add_tensor("output.q8", q, raw_shape=q.shape, raw_dtype=Q.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    flat = np.concatenate(stored).astype(np.float32)
    with open(sidecar, "w") as f:
        json.dump({"params_bits": flat.view(np.uint32).tolist()}, f)


def field_value(field):
    if field.types[0] == V.ARRAY:
        return {"elem_type": field.types[1].name.lower(), "values": list(field.contents())}
    return field.contents()


def dump(path):
    reader = GGUFReader(path)
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
                "bits": values.view(np.uint32).tolist(),
            }
        )
    json.dump({"alignment": int(reader.alignment), "metadata": meta, "tensors": tensors}, sys.stdout)


def main():
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 5:
        write(*sys.argv[2:])
    elif sys.argv[1:2] == ["dump"] and len(sys.argv) == 3:
        dump(sys.argv[2])
    else:
        raise SystemExit(__doc__)


main()
