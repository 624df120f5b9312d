"""gguf-py's side of tests/surgeon.rs.

    surgeon.py write OUT.gguf VARIANT   a llama-like model written by gguf-py
    surgeon.py read FILE.gguf           what gguf-py reads in a file, as JSON

Variants of `write`: `a` and `b` (same architecture, names, shapes and
types, different values), `shape` (a with blk.0.attn_q.weight [64, 32]),
`arch` (a with general.architecture "qwen2"), `q2k` (a plus a Q2_K tensor,
a type evod has no codec for), `nan` (a with one NaN in the F32
output_norm.weight), `vocab` (a's metadata, no tensors).

The tensors cover F32, F16, Q8_0, Q4_0, Q4_K and Q6_K. gguf-py quantizes
F16/Q8_0/Q4_0 itself; it cannot quantize the K-quants, so their blocks are
built byte by byte: random quants and sub-block scales under a small f16
super-block scale (valid blocks of finite values).
"""
import hashlib
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

N_EMBD = 64
N_VOCAB = 16
N_TOKENS = 300


def kquant_blocks(rng, ttype, rows, cols):
    """`rows` rows of `cols` values (a multiple of 256) of a K-quant type,
    as gguf-py's byte shape (rows, bytes per row)."""
    nb = rows * cols // 256
    if ttype == Q.Q4_K:  # d, dmin (f16), scales[12], qs[128]
        blocks = rng.integers(0, 256, size=(nb, 144), dtype=np.uint8)
        blocks[:, 0:2] = np.full(nb, 0.002, np.float16).view(np.uint8).reshape(nb, 2)
        blocks[:, 2:4] = np.full(nb, 0.001, np.float16).view(np.uint8).reshape(nb, 2)
        size = 144
    elif ttype == Q.Q6_K:  # ql[128], qh[64], scales[16] (i8), d (f16)
        blocks = rng.integers(0, 256, size=(nb, 210), dtype=np.uint8)
        blocks[:, 192:208] = rng.integers(-20, 21, size=(nb, 16)).astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = np.full(nb, 0.003, np.float16).view(np.uint8).reshape(nb, 2)
        size = 210
    elif ttype == Q.Q2_K:  # scales[16], qs[64], d, dmin (f16)
        blocks = rng.integers(0, 256, size=(nb, 84), dtype=np.uint8)
        blocks[:, 80:82] = np.full(nb, 0.01, np.float16).view(np.uint8).reshape(nb, 2)
        blocks[:, 82:84] = np.full(nb, 0.005, np.float16).view(np.uint8).reshape(nb, 2)
        size = 84
    else:
        raise ValueError(ttype)
    return blocks.reshape(rows, cols // 256 * size)


def write(path, variant):
    rng = np.random.default_rng(11 if variant == "b" else 7)
    arch = "qwen2" if variant == "arch" else "llama"
    w = GGUFWriter(path, arch)
    w.add_name("surgeon-test")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(N_TOKENS)])
    w.add_token_scores([float(-i) for i in range(N_TOKENS)])
    w.add_token_types([1] * N_TOKENS)

    def add(name, ttype, rows, cols):
        """A tensor of ggml dims [cols, rows] (numpy shape (rows, cols))."""
        if ttype in (Q.Q4_K, Q.Q6_K, Q.Q2_K):
            q = kquant_blocks(rng, ttype, rows, cols)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=ttype)
            return
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        if variant == "nan" and name == "output_norm.weight":
            data[0, 3] = np.nan
        if ttype == Q.F32:
            w.add_tensor(name, data.reshape(-1) if rows == 1 else data)
        elif ttype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = quantize(data, ttype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=ttype)

    if variant == "vocab":  # metadata only, like llama.cpp's ggml-vocab-*.gguf
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return
    add("token_embd.weight", Q.Q4_K, N_VOCAB, 256)
    for b in range(2):
        add(f"blk.{b}.attn_norm.weight", Q.F32, 1, N_EMBD)
        q_rows = 32 if (variant == "shape" and b == 0) else N_EMBD
        add(f"blk.{b}.attn_q.weight", Q.Q8_0, q_rows, N_EMBD)
        add(f"blk.{b}.attn_k.weight", Q.Q4_0, N_EMBD, N_EMBD)
        add(f"blk.{b}.ffn_up.weight", Q.F16, 32, N_EMBD)
        add(f"blk.{b}.ffn_down.weight", Q.Q6_K, 8, 256)
    if variant == "q2k":
        add("blk.1.ffn_gate.weight", Q.Q2_K, 4, 256)
    add("output_norm.weight", Q.F32, 1, N_EMBD)
    add("output.weight", Q.Q4_K, 8, 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v


def read(path):
    r = GGUFReader(path)
    metadata = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        metadata.append(
            {"key": f.name, "types": [int(t) for t in f.types], "value": jsonable(f.contents())}
        )
    tensors = []
    for t in r.tensors:
        raw = np.asarray(t.data).tobytes()
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(-1)
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "dims": [int(d) for d in t.shape],
                "sha256": hashlib.sha256(raw).hexdigest(),
                "values_f32_bits": values.view(np.uint32).tolist(),
            }
        )
    # Where the key-value section ends (the tensor infos start).
    kv_end = max(
        int(f.offset) + sum(int(np.asarray(p).nbytes) for p in f.parts)
        for f in r.fields.values()
    )
    json.dump({"metadata": metadata, "tensors": tensors, "kv_end": kv_end}, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "read":
        read(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
