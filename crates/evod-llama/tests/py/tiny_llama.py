"""The Python side of crates/evod-llama/tests: a tiny llama-architecture
GGUF written with gguf-py, and a numpy reference forward pass over it.

    tiny_llama.py write OUT.gguf [--n-embd N] [--n-ff N] [--layers N] [--type F32|Q8_0]
    tiny_llama.py nll MODEL.gguf WINDOW TOKENS.json [CVEC.f32] [--kv-f16]
        prints {"sum": .., "count": ..}: the next-token NLL of the tokens,
        scored as evod_llama::BaseModel::nll does (non-overlapping windows,
        every token but each window's first), with the control vector
        (raw little-endian float32, layer-major from layer 1, n_embd * (n_layer - 1)) added
        to each layer's output as llama.cpp does (layers 1..n_layer-1).

The vocabulary is a SentencePiece ("llama") one llama.cpp accepts:
<unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then "▁", the
letters and a few merged pieces.

The forward pass is llama.cpp's `llama` graph in float64: RMSNorm (eps
from the file), q/k/v projections, RoPE in ggml's NORM mode (adjacent
pairs), causal softmax attention with grouped K/V heads, output
projection, residual, RMSNorm, SwiGLU feed-forward, residual, control
vector; final RMSNorm and the output projection. With --kv-f16, K
(after RoPE), V and Q are rounded to float16 as llama.cpp's default F16
KV cache does before the attention products.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

N_HEAD = 4
N_HEAD_KV = 2
EPS = 1e-5
ROPE_BASE = 10000.0
CTX = 256


def vocab():
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [".", ",", "\u2581t", "\u2581a", "th", "he", "\u2581the", "in", "er", "an"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i) if len(p) == 1 else 10.0 - i * 0.1)
    return tokens, scores, types


def write(path, n_embd, n_ff, n_layer, ttype):
    rng = np.random.default_rng(2024)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    hd = n_embd // N_HEAD
    w = GGUFWriter(path, "llama")
    w.add_name("evod-llama-tiny")
    w.add_block_count(n_layer)
    w.add_context_length(CTX)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0 if ttype == "F32" else 7)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def add(name, shape, scale, quantizable=True):
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if ttype == "Q8_0" and quantizable and len(shape) == 2:
            w.add_tensor(name, quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (n_vocab, n_embd), 1.0)
    add("output_norm.weight", (n_embd,), 1.0)
    add("output.weight", (n_vocab, n_embd), 1.0 / np.sqrt(n_embd) * 3)
    for b in range(n_layer):
        add(f"blk.{b}.attn_norm.weight", (n_embd,), 1.0)
        add(f"blk.{b}.attn_q.weight", (N_HEAD * hd, n_embd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.attn_k.weight", (N_HEAD_KV * hd, n_embd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.attn_v.weight", (N_HEAD_KV * hd, n_embd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.attn_output.weight", (n_embd, N_HEAD * hd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.ffn_norm.weight", (n_embd,), 1.0)
        add(f"blk.{b}.ffn_gate.weight", (n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.ffn_up.weight", (n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        add(f"blk.{b}.ffn_down.weight", (n_embd, n_ff), 1.0 / np.sqrt(n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load(path):
    r = GGUFReader(path)
    t = {}
    for x in r.tensors:
        shape = tuple(int(d) for d in reversed(x.shape.tolist()))
        if x.tensor_type == Q.F32:
            v = np.asarray(x.data, dtype=np.float32)
        else:
            v = dequantize(np.asarray(x.data), x.tensor_type).astype(np.float32)
        t[x.name] = v.reshape(shape).astype(np.float64)

    def field(key):
        f = r.fields[key]
        return f.parts[f.data[0]][0]

    hp = {
        "n_layer": int(field("llama.block_count")),
        "n_embd": int(field("llama.embedding_length")),
        "n_head": int(field("llama.attention.head_count")),
        "n_head_kv": int(field("llama.attention.head_count_kv")),
        "eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "base": float(field("llama.rope.freq_base")),
    }
    return t, hp


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, base):
    # x: (T, heads, hd); ggml NORM mode rotates adjacent pairs.
    T, _, hd = x.shape
    pos = np.arange(T, dtype=np.float64)[:, None]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos * inv[None, :]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def f16(x):
    return x.astype(np.float16).astype(np.float64)


def logits(t, hp, toks, cvec, kv_f16):
    n_embd, n_head, n_kv = hp["n_embd"], hp["n_head"], hp["n_head_kv"]
    hd = n_embd // n_head
    T = len(toks)
    x = t["token_embd.weight"][toks]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for il in range(hp["n_layer"]):
        p = f"blk.{il}."
        h = rms(x, t[p + "attn_norm.weight"], hp["eps"])
        q = (h @ t[p + "attn_q.weight"].T).reshape(T, n_head, hd)
        k = (h @ t[p + "attn_k.weight"].T).reshape(T, n_kv, hd)
        v = (h @ t[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        q = rope(q, hp["base"])
        k = rope(k, hp["base"])
        if kv_f16:
            q, k, v = f16(q), f16(k), f16(v)
        out = np.empty((T, n_head, hd))
        for hh in range(n_head):
            kh = hh // (n_head // n_kv)
            s = q[:, hh, :] @ k[:, kh, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            if kv_f16:
                s = f16(s)
            out[:, hh, :] = s @ v[:, kh, :]
        x = x + out.reshape(T, n_head * hd) @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"], hp["eps"])
        g = h @ t[p + "ffn_gate.weight"].T
        u = h @ t[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "ffn_down.weight"].T
        if cvec is not None and il >= 1:
            x = x + cvec[(il - 1) * n_embd:il * n_embd]
    x = rms(x, t["output_norm.weight"], hp["eps"])
    return x @ t["output.weight"].T


def nll(path, window, tokens, cvec, kv_f16):
    t, hp = load(path)
    total, count = 0.0, 0
    for start in range(0, len(tokens), window):
        w = tokens[start:start + window]
        if len(w) < 2:
            continue
        lg = logits(t, hp, np.asarray(w), cvec, kv_f16)
        for j in range(len(w) - 1):
            row = lg[j]
            m = row.max()
            total += np.log(np.exp(row - m).sum()) + m - row[w[j + 1]]
            count += 1
    return {"sum": float(total), "count": count}


def main(argv):
    if argv[0] == "write":
        opts = {"--n-embd": "32", "--n-ff": "64", "--layers": "3", "--type": "F32"}
        rest = argv[2:]
        for i in range(0, len(rest), 2):
            opts[rest[i]] = rest[i + 1]
        write(argv[1], int(opts["--n-embd"]), int(opts["--n-ff"]), int(opts["--layers"]), opts["--type"])
    elif argv[0] == "nll":
        args = [a for a in argv[1:] if not a.startswith("--")]
        kv_f16 = "--kv-f16" in argv
        with open(args[2]) as f:
            tokens = json.load(f)
        cvec = np.fromfile(args[3], dtype="<f4").astype(np.float64) if len(args) > 3 else None
        print(json.dumps(nll(args[0], int(args[1]), tokens, cvec, kv_f16)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
