"""llama.cpp (through llama-cpp-python, built by scripts/llama-cpp-env.sh) as a reference.

  llama_cpp_reference.py quantize IN.gguf OUT.gguf q8_0|q4_k_m|f32
      llama.cpp's own quantizer (llama_model_quantize), as its `llama-quantize` tool runs it;
      `f32` from a quantized file is llama.cpp's own dequantization of every tensor.

  llama_cpp_reference.py logits --model F.gguf --ids 1,2,3 [--top N]
      One batch over the ids with an f32 KV cache and no flash attention, logits of every
      position. JSON {"ids", "logits": [[vocab floats] per position]}, or with --top N, per
      position the N most likely tokens as [[id, logprob], ...] (log-softmax in float64).

  llama_cpp_reference.py tokenize --model F.gguf --text TEXT
      The token ids llama.cpp's tokenizer makes (with BOS), as JSON.

  llama_cpp_reference.py bench --model F.gguf [--prompt 512] [--decode 32] [--threads 2] [--repeats 3]
      llama.cpp's speed as its users run it (default f16 KV cache): prefill of --prompt tokens
      in one batch and batch-1 decode, tokens/s (medians), and resident memory after loading.
      JSON {"prefill_tps", "decode_tps", "rss_bytes"}.
"""
import argparse
import ctypes
import json
import sys

import llama_cpp
import numpy as np

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
          "f32": llama_cpp.LLAMA_FTYPE_ALL_F32}


def quantize(a):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[a.type]
    params.nthread = 2
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(a.inp.encode(), a.out.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc}")


def load(path, n_ctx=512):
    # f32 K and V (ggml type 0): llama.cpp's default f16 cache rounds every key and value.
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=2, logits_all=True, type_k=0, type_v=0,
                           flash_attn=False, verbose=False)


def logits(a):
    ids = [int(x) for x in a.ids.split(",") if x.strip()]
    llm = load(a.model)
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    if not a.top:
        print(json.dumps({"ids": ids, "logits": scores.astype(np.float32).tolist()}))
        return
    lse = np.log(np.exp(scores - scores.max(axis=1, keepdims=True)).sum(axis=1)) + scores.max(axis=1)
    logp = scores - lse[:, None]
    top = []
    for row in logp:
        idx = np.argsort(-row, kind="stable")[: a.top]
        top.append([[int(i), float(row[i])] for i in idx])
    print(json.dumps({"ids": ids, "top": top}))


def tokenize(a):
    llm = llama_cpp.Llama(model_path=a.model, vocab_only=True, verbose=False)
    print(json.dumps(llm.tokenize(a.text.encode(), add_bos=True)))


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench(a):
    import time
    before = rss()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.prompt + a.decode + 8, n_batch=a.prompt,
                          n_ubatch=a.prompt, n_threads=a.threads, n_threads_batch=a.threads,
                          verbose=False)
    loaded = rss() - before
    vocab = llm.n_vocab()
    prompt = [(i * 7919) % (vocab - 3) + 3 for i in range(a.prompt)]
    prefill, decode = [], []
    for _ in range(a.repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(a.prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        for step in range(a.decode):
            llm.eval([(step * 31 + 5) % (vocab - 3) + 3])
        decode.append(a.decode / (time.perf_counter() - t))
    med = lambda v: sorted(v)[len(v) // 2]
    print(json.dumps({"prefill_tps": med(prefill), "decode_tps": med(decode), "rss_bytes": loaded}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("inp")
    q.add_argument("out")
    q.add_argument("type", choices=sorted(FTYPES))
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--ids", required=True)
    lg.add_argument("--top", type=int, default=0)
    tk = sub.add_parser("tokenize")
    tk.add_argument("--model", required=True)
    tk.add_argument("--text", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--prompt", type=int, default=512)
    b.add_argument("--decode", type=int, default=32)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    {"quantize": quantize, "logits": logits, "tokenize": tokenize, "bench": bench}[a.cmd](a)


if __name__ == "__main__":
    main()
