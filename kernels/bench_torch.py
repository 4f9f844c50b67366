#!/usr/bin/env python3
"""PyTorch's side of kernels/gpu-check-timing: the same shapes our gpu_check timings use, measured
with torch on the same GPU in the same call, and the report that puts both in one table.

  bench_torch.py --out torch.jsonl     measure (needs torch with CUDA)
  bench_torch.py --report DIR          DIR/ours.jsonl + DIR/torch.jsonl + DIR/device.txt -> markdown

Shapes and the "op"/"shape" strings must match worker/tests/gpu_check.rs exactly (that is how
rows are paired). Nothing here is a figure unless it was measured in this run.
"""
import argparse, datetime, json, os, re, sys


def timed(fn, iters=20):
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms


def measure(out_path):
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    rows = []

    def emit(op, shape, ms, **extra):
        rows.append(dict(op=op, shape=shape, ms=ms, **extra))
        print(json.dumps(rows[-1]), flush=True)

    # Machine figures: HBM bandwidth (device copy, read + write) and the bf16 GEMM rate.
    n = 1 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    ms = timed(lambda: b.copy_(a))
    emit("hbm_bandwidth", "copy 1 GiB", ms, bytes_per_s=2 * n / (ms / 1e3))
    del a, b
    x, w = torch.randn(4096, 4096, dtype=bf, device=dev), torch.randn(14336, 4096, dtype=bf, device=dev)
    ms = timed(lambda: x @ w.T)
    emit("bf16_gemm", "4096x4096x14336", ms, flops_per_s=2 * 4096 * 4096 * 14336 / (ms / 1e3))

    # Prefill attention: 4k causal, 32 q / 8 kv heads, d 128, with and without a 4096 window.
    h, kvh, d, L = 32, 8, 128, 4096
    q = torch.randn(1, h, L, d, dtype=bf, device=dev)
    k = torch.randn(1, h, L, d, dtype=bf, device=dev)  # GQA expanded: SDPA's fast paths want it
    v = torch.randn(1, h, L, d, dtype=bf, device=dev)
    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    emit("attention", f"d={d} h={h}/{kvh} window=None seqs=1x(0, {L})", ms)
    i = torch.arange(L, device=dev)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4096)
    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    emit("attention", f"d={d} h={h}/{kvh} window=Some(4096) seqs=1x(0, {L})", ms)
    del q, k, v, mask

    # Decode attention: one query per sequence over ctx keys.
    for batch in (1, 8, 64):
        for ctx in (1024, 8192, 32768):
            if batch * ctx > 64 * 8192:
                continue
            q = torch.randn(batch, h, 1, d, dtype=bf, device=dev)
            k = torch.randn(batch, kvh, ctx, d, dtype=bf, device=dev)
            v = torch.randn(batch, kvh, ctx, d, dtype=bf, device=dev)
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            emit("attention", f"d={d} h={h}/{kvh} window=None seqs={batch}x({ctx - 1}, 1)", ms,
                 kv_bytes=batch * ctx * kvh * d * 2 * 2)
            del q, k, v

    # The MoE layer as a per-expert loop (gather, SwiGLU, scale, index_add).
    for tokens, hid, inter in ((1, 4096, 14336), (64, 4096, 14336), (2048, 4096, 14336)):
        E, topk = 8, 2
        x = torch.randn(tokens, hid, dtype=bf, device=dev)
        ws = [(torch.randn(inter, hid, dtype=bf, device=dev) * 0.02,
               torch.randn(inter, hid, dtype=bf, device=dev) * 0.02,
               torch.randn(hid, inter, dtype=bf, device=dev) * 0.02) for _ in range(E)]
        logits = torch.randn(tokens, E, device=dev)
        wt, ids = torch.topk(torch.softmax(logits, -1), topk)
        wt = (wt / wt.sum(-1, keepdim=True)).to(bf)

        def layer():
            out = torch.zeros_like(x)
            for e in range(E):
                t, j = torch.where(ids == e)
                if t.numel() == 0:
                    continue
                g, u, dn = ws[e]
                y = (F.silu(x[t] @ g.T) * (x[t] @ u.T)) @ dn.T
                out.index_add_(0, t, y * wt[t, j, None])
            return out

        ms = timed(layer, iters=10)
        emit("moe_experts", f"tokens={tokens} h={hid} i={inter} e={E} top{topk} held={E}", ms)
        del ws
    with open(out_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def load(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip()]


def report(d):
    ours, torch_rows = load(os.path.join(d, "ours.jsonl")), load(os.path.join(d, "torch.jsonl"))
    theirs = {(r["op"], r["shape"]): r for r in torch_rows}
    bw = next((r["bytes_per_s"] for r in torch_rows if r["op"] == "hbm_bandwidth"), None)
    gemm = next((r["flops_per_s"] for r in torch_rows if r["op"] == "bf16_gemm"), None)
    device = open(os.path.join(d, "device.txt")).read().strip() if os.path.exists(os.path.join(d, "device.txt")) else "unknown"
    print(f"## CUDA backend on {device} ({datetime.date.today()})\n")
    print("Measured by `kernels/gpu-check-timing` in one call; device and driver as `nvidia-smi` reports them.")
    if bw:
        print(f"Measured HBM bandwidth (1 GiB device copy): {bw / 1e9:.0f} GB/s.", end=" ")
    if gemm:
        print(f"Measured bf16 GEMM (torch, 4096×4096×14336): {gemm / 1e12:.0f} TFLOP/s.")
    print("\n| op | shape | ours (ms) | torch (ms) | torch / ours | % of bandwidth | % of bf16 GEMM rate |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in ours:
        t = theirs.get((r["op"], r["shape"]))
        pct_bw = pct_gemm = ""
        secs = r["ms"] / 1e3
        by = r.get("kv_bytes") or r.get("expert_bytes")
        if bw and by:
            pct_bw = f"{100 * by / secs / bw:.0f}%"
        if gemm and r.get("flops"):
            pct_gemm = f"{100 * r['flops'] / secs / gemm:.0f}%"
        tm = f"{t['ms']:.3f}" if t else ""
        ratio = f"{t['ms'] / r['ms']:.2f}×" if t else ""
        print(f"| {r['op']} | {r['shape']} | {r['ms']:.3f} | {tm} | {ratio} | {pct_bw} | {pct_gemm} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--report")
    a = p.parse_args()
    if a.out:
        measure(a.out)
    elif a.report:
        report(a.report)
    else:
        p.error("--out or --report")
