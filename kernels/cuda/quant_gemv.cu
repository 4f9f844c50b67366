// GEMVs that read weights in GGUF block formats and dequantize in registers, for decode
// (few activation rows): the weights' bytes are what bounds decode, so a Q4_K weight streams a
// quarter of the bytes of bf16. Two block types, as llama.cpp lays them out (and as
// `switchyard_model::quant::dequantize_row` reads them, value for value):
//   Q8_0: 34-byte blocks of 32 values: f16 scale d, 32 × i8;              x = d·q
//   Q4_K: 144-byte blocks of 256 values: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales
//         and mins, 128 bytes of nibbles;                                  x = d·sc·q − dmin·m
// Activations are bf16 (as in the bf16 paths), products and sums f32.
//
//   gemv_q*:               y[r, n] = x[r] · W[n]ᵀ                               (dense projections)
//   moe_gate_up_gemv_q*:   act[p, :] = bf16(silu(x[tok[p]] · gateᵀ) ⊙ (x[tok[p]] · upᵀ))
//   moe_down_gemv_q*:      y[p, :]   = w[p] · (act[p] · downᵀ)
// The MoE kernels have moe_gemm.cu's GEMV layout (grid (ceil(n_out / rows per block),
// experts), rows sorted by expert, tables of the experts' device addresses).
//
// Each lane takes 8 consecutive values of a weight row per step (one 16-byte load of 8 bf16
// activations); 8 divides both block lengths, so the 8 values lie in one block and, in Q4_K,
// in one 32-value sub-block.

#define QG_ROWS 8    // activation rows per pass
#define QG_WROWS 2   // weight rows per warp
#define QG_WARPS 4

#define Q8_0_BYTES 34
#define Q4_K_BYTES 144

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short load_u16(const unsigned char* p) {
    return *(const unsigned short*)p;  // every f16 field of both formats is 2-byte aligned
}

// The 8 weight values at columns c..c+8 of a row, dequantized.
template <int QT>
__device__ __forceinline__ void dequant8(const unsigned char* __restrict__ row, int c, float v[8]);

// Q8_0: block c/32 starts at an even offset, its values at byte 2 + c%32 (even): four u16 loads.
template <>
__device__ __forceinline__ void dequant8<0>(const unsigned char* __restrict__ row, int c, float v[8]) {
    const unsigned char* b = row + (c / 32) * Q8_0_BYTES;
    const float d = h2f(load_u16(b));
    const unsigned char* q = b + 2 + (c % 32);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const unsigned short two = load_u16(q + 2 * i);
        v[2 * i] = d * (float)(signed char)(two & 0xff);
        v[2 * i + 1] = d * (float)(signed char)(two >> 8);
    }
}

// Q4_K sub-block j's 6-bit scale and min (llama.cpp's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const unsigned char* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K: blocks are 144 bytes (16-byte aligned rows of whole blocks); sub-block j's values
// 8t..8t+8 are the low (j even) or high (j odd) nibbles of bytes 16 + 32·(j/2) + 8t: one 8-byte
// load.
template <>
__device__ __forceinline__ void dequant8<1>(const unsigned char* __restrict__ row, int c, float v[8]) {
    const unsigned char* b = row + (c / 256) * Q4_K_BYTES;
    const int within = c % 256, j = within / 32, t = (within % 32) / 8;
    const float d = h2f(load_u16(b)), dmin = h2f(load_u16(b + 2));
    int sc, m;
    scale_min_k4(j, b + 4, sc, m);
    const float scale = d * (float)sc, min = dmin * (float)m;
    const uint2 bytes = *(const uint2*)(b + 16 + 32 * (j / 2) + 8 * t);
    const int shift = (j % 2) * 4;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        v[i] = scale * (float)((bytes.x >> (8 * i + shift)) & 0xF) - min;
        v[4 + i] = scale * (float)((bytes.y >> (8 * i + shift)) & 0xF) - min;
    }
}

__device__ __forceinline__ float dot8(const float w[8], const uint4& x) {
    return w[0] * lo_bf(x.x) + w[1] * hi_bf(x.x) + w[2] * lo_bf(x.y) + w[3] * hi_bf(x.y) +
           w[4] * lo_bf(x.z) + w[5] * hi_bf(x.z) + w[6] * lo_bf(x.w) + w[7] * hi_bf(x.w);
}

template <int QT>
__device__ __forceinline__ u64 row_bytes(int k) {
    return QT == 0 ? (u64)(k / 32) * Q8_0_BYTES : (u64)(k / 256) * Q4_K_BYTES;
}

// One pass over up to QG_ROWS activation rows [r0, last) against QG_WROWS weight rows from n0.
// GATED: two weight matrices (gate, up), rows of `a` gathered through `sorted_token`, bf16
// SiLU·mul out; otherwise one matrix, f32 out scaled by `sorted_weight` (1 when null).
template <int QT, bool GATED>
__device__ __forceinline__ void qgemv_pass(const bf16* __restrict__ a,
                                           const unsigned char* __restrict__ w0,
                                           const unsigned char* __restrict__ w1,
                                           const u32* __restrict__ sorted_token,
                                           const float* __restrict__ sorted_weight,
                                           void* __restrict__ out, u32 r0, u32 last, int n0,
                                           int k, int n_out) {
    const int lane = threadIdx.x % WARP;
    const u64 rb = row_bytes<QT>(k);
    float acc0[QG_ROWS][QG_WROWS], acc1[QG_ROWS][QG_WROWS];
#pragma unroll
    for (int r = 0; r < QG_ROWS; r++)
#pragma unroll
        for (int j = 0; j < QG_WROWS; j++) acc0[r][j] = acc1[r][j] = 0.0f;
    for (int c = lane * 8; c < k; c += WARP * 8) {
        float wa[QG_WROWS][8], wb[QG_WROWS][8];
#pragma unroll
        for (int j = 0; j < QG_WROWS; j++) {
            const u64 n = (u64)min(n0 + j, n_out - 1);
            dequant8<QT>(w0 + n * rb, c, wa[j]);
            if (GATED) dequant8<QT>(w1 + n * rb, c, wb[j]);
        }
#pragma unroll
        for (int r = 0; r < QG_ROWS; r++) {
            if (r0 + r < last) {
                const u64 src = GATED ? sorted_token[r0 + r] : r0 + r;
                const uint4 xv = *(const uint4*)(a + src * k + c);
#pragma unroll
                for (int j = 0; j < QG_WROWS; j++) {
                    acc0[r][j] += dot8(wa[j], xv);
                    if (GATED) acc1[r][j] += dot8(wb[j], xv);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < QG_ROWS; r++) {
#pragma unroll
        for (int j = 0; j < QG_WROWS; j++) {
            const float g = warp_sum(acc0[r][j]);
            const float u = GATED ? warp_sum(acc1[r][j]) : 0.0f;
            if (lane == 0 && r0 + r < last && n0 + j < n_out) {
                const u64 at = (u64)(r0 + r) * n_out + n0 + j;
                if (GATED) ((bf16*)out)[at] = f2bf(silu(g) * u);
                else ((float*)out)[at] = g * (sorted_weight ? sorted_weight[r0 + r] : 1.0f);
            }
        }
    }
}

// Dense: grid (ceil(n_out / (QG_WARPS·QG_WROWS))); x [m, k] bf16, w [n_out] rows of blocks,
// y [m, n_out] f32. k is a multiple of the block length (32 or 256), checked on the host.
template <int QT>
__device__ __forceinline__ void qgemv_dense(const bf16* x, const unsigned char* w, float* y, int m,
                                            int k, int n_out) {
    const int n0 = (blockIdx.x * QG_WARPS + threadIdx.x / WARP) * QG_WROWS;
    if (n0 >= n_out) return;
    for (u32 r0 = 0; r0 < (u32)m; r0 += QG_ROWS)
        qgemv_pass<QT, false>(x, w, nullptr, nullptr, nullptr, y, r0, m, n0, k, n_out);
}

// MoE: grid (ceil(n_out / (QG_WARPS·QG_WROWS)), n_local), as moe_gemm.cu's GEMV path.
template <int QT, bool GATED>
__device__ __forceinline__ void qgemv_moe(const bf16* a, const u64* w0s, const u64* w1s,
                                          const u32* offsets, const u32* sorted_token,
                                          const float* sorted_weight, void* out, int k, int n_out) {
    const int e = blockIdx.y;
    const int n0 = (blockIdx.x * QG_WARPS + threadIdx.x / WARP) * QG_WROWS;
    const u32 first = offsets[e], last = offsets[e + 1];
    if (first == last || n0 >= n_out) return;
    const unsigned char* w0 = (const unsigned char*)w0s[e];
    const unsigned char* w1 = GATED ? (const unsigned char*)w1s[e] : nullptr;
    for (u32 r0 = first; r0 < last; r0 += QG_ROWS)
        qgemv_pass<QT, GATED>(a, w0, w1, sorted_token, sorted_weight, out, r0, last, n0, k, n_out);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
gemv_q8_0(const bf16* x, const unsigned char* w, float* y, int m, int k, int n_out) {
    qgemv_dense<0>(x, w, y, m, k, n_out);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
moe_gate_up_gemv_q8_0(const bf16* x, const u64* gate, const u64* up, const u32* offsets,
                        const u32* sorted_token, bf16* act, int hidden, int inter) {
    qgemv_moe<0, true>(x, gate, up, offsets, sorted_token, nullptr, act, hidden, inter);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
moe_down_gemv_q8_0(const bf16* act, const u64* down, const u32* offsets,
                     const float* sorted_weight, float* y, int inter, int hidden) {
    qgemv_moe<0, false>(act, down, nullptr, offsets, nullptr, sorted_weight, y, inter, hidden);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
gemv_q4_k(const bf16* x, const unsigned char* w, float* y, int m, int k, int n_out) {
    qgemv_dense<1>(x, w, y, m, k, n_out);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
moe_gate_up_gemv_q4_k(const bf16* x, const u64* gate, const u64* up, const u32* offsets,
                        const u32* sorted_token, bf16* act, int hidden, int inter) {
    qgemv_moe<1, true>(x, gate, up, offsets, sorted_token, nullptr, act, hidden, inter);
}

extern "C" __global__ void __launch_bounds__(QG_WARPS * WARP)
moe_down_gemv_q4_k(const bf16* act, const u64* down, const u32* offsets,
                     const float* sorted_weight, float* y, int inter, int hidden) {
    qgemv_moe<1, false>(act, down, nullptr, offsets, nullptr, sorted_weight, y, inter, hidden);
}
