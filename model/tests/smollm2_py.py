"""The reference for model/tests/smollm2.rs: gguf-py reads tensors of a llama GGUF file,
dequantizes them, and puts the Q/K rows back in Hugging Face order with transformers' own
permutation (convert_llama_weights_to_hf.py's `permute`, which turns the interleaved layout of
Meta's and llama.cpp's files into the half-split one).

`smollm2_py.py FILE.gguf OUT_DIR NAME...`: writes OUT_DIR/NAME.f32 (little-endian f32, row-major).
"""
import sys

import numpy as np
import gguf


def hf_permute(w, n_heads):
    dim1, dim2 = w.shape
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def main(path, out, names):
    r = gguf.GGUFReader(path)
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv_heads = int(r.fields["llama.attention.head_count_kv"].contents())
    tensors = {t.name: t for t in r.tensors}
    for name in names:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if name.endswith("attn_q.weight"):
            w = hf_permute(w, heads)
        elif name.endswith("attn_k.weight"):
            w = hf_permute(w, kv_heads)
        np.ascontiguousarray(w, dtype="<f4").tofile(f"{out}/{name}.f32")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
