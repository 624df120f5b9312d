"""A tiny llama-architecture GGUF for the llm tests, written with gguf-py.

    python llm_fixture.py OUT.gguf [--seed N] [--n-embd N] [--layers N]

F32 weights drawn from a seeded numpy generator, a character-level
SentencePiece-style vocabulary (<unk>, <s>, </s>, the 256 byte-fallback
tokens, then printable ASCII with U+2581 for the space), so llama.cpp's
`llama` tokenizer maps any UTF-8 text to tokens. Small enough that a
perplexity evaluation of a few thousand tokens takes milliseconds.
"""

import argparse
import string

import gguf
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n-embd", type=int, default=32)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--omit", action="append", default=[], help="leave out this tensor")
    a = ap.parse_args()

    rng = np.random.default_rng(a.seed)
    n_embd, n_layer, n_head, n_ff = a.n_embd, a.layers, a.heads, a.ff
    head_dim = n_embd // n_head

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    chars = [c for c in string.printable if c not in " \t\n\r\x0b\x0c"] + ["\u2581"]
    for c in chars:
        tokens.append(c)
        types.append(gguf.TokenType.NORMAL)
    n_vocab = len(tokens)
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(chars))]

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("evod tiny llama")
    w.add_context_length(a.ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    add = w.add_tensor

    def put(name, value):
        if name not in a.omit:
            add(name, value)

    w.add_tensor = put

    def t(*shape, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", t(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", t(n_embd, n_embd))
        w.add_tensor(p + "attn_v.weight", t(n_embd, n_embd))
        w.add_tensor(p + "attn_output.weight", t(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", t(n_vocab, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
