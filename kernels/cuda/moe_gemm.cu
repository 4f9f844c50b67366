// Grouped expert GEMMs over the rows sorted by expert (see moe_sort in moe.cu).
//
//   gate/up:  act[p, :] = bf16( silu(x[tok[p]] · gateᵀ) ⊙ (x[tok[p]] · upᵀ) )   [rows, inter]
//   down:     y[p, :]   = w[p] · (act[p] · downᵀ)                                 [rows, hidden] f32
//
// SiLU·mul is fused into the gate/up epilogue and the routing weight into the down epilogue, so
// neither the gate nor the up projection is ever written out. Two paths, chosen on the host from
// the most rows any expert got:
//   * GEMV (few rows per expert, decode): bandwidth-bound. A warp owns two weight rows and
//     streams them once with 16-byte loads while applying them to up to GEMV_ROWS token rows.
//   * MMA (many rows): a 64×64 output tile per block over BK = 32 slices double-buffered with
//     cp.async, mma.sync m16n8k16 bf16 → f32. Blocks map to (expert, row tile) through the
//     tile offsets the sort produced, so the grid needs no per-expert counts from the host.
// Expert weights are separate allocations: the kernels take tables of their device addresses.

#define GEMV_ROWS 8      // token rows per pass of the GEMV path
#define GEMV_WROWS 2     // weight rows per warp
#define GEMV_WARPS 4

__device__ __forceinline__ void fma8(float& acc, const uint4& a, const uint4& b) {
    acc += lo_bf(a.x) * lo_bf(b.x) + hi_bf(a.x) * hi_bf(b.x) + lo_bf(a.y) * lo_bf(b.y) +
           hi_bf(a.y) * hi_bf(b.y) + lo_bf(a.z) * lo_bf(b.z) + hi_bf(a.z) * hi_bf(b.z) +
           lo_bf(a.w) * lo_bf(b.w) + hi_bf(a.w) * hi_bf(b.w);
}

// ---- GEMV path ----------------------------------------------------------------------------
// grid (ceil(n_out / (GEMV_WARPS·GEMV_WROWS)), n_local). GATED: x rows gathered through
// sorted_token, two weight matrices (gate, up), bf16 SiLU·mul out. Otherwise: rows of `a` in
// sorted order, one weight matrix, f32 out scaled by the routing weight.
template <bool GATED>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ a, const u64* __restrict__ w0s,
                                          const u64* __restrict__ w1s, const u32* __restrict__ offsets,
                                          const u32* __restrict__ sorted_token,
                                          const float* __restrict__ sorted_weight, void* __restrict__ out,
                                          int k, int n_out) {
    const int e = blockIdx.y, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int n0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_WROWS;
    const u32 first = offsets[e], last = offsets[e + 1];
    if (first == last || n0 >= n_out) return;
    const bf16* w0 = (const bf16*)w0s[e];
    const bf16* w1 = GATED ? (const bf16*)w1s[e] : nullptr;
    for (u32 r0 = first; r0 < last; r0 += GEMV_ROWS) {
        float acc0[GEMV_ROWS][GEMV_WROWS], acc1[GEMV_ROWS][GEMV_WROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
            for (int j = 0; j < GEMV_WROWS; j++) acc0[r][j] = acc1[r][j] = 0.0f;
        for (int c = lane * 8; c < k; c += WARP * 8) {
            uint4 wa[GEMV_WROWS], wb[GEMV_WROWS];
#pragma unroll
            for (int j = 0; j < GEMV_WROWS; j++) {
                const int n = min(n0 + j, n_out - 1);
                wa[j] = *(const uint4*)(w0 + (u64)n * k + c);
                if (GATED) wb[j] = *(const uint4*)(w1 + (u64)n * k + c);
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r0 + r < last) {
                    const u64 src = GATED ? sorted_token[r0 + r] : r0 + r;
                    const uint4 xv = *(const uint4*)(a + src * k + c);
#pragma unroll
                    for (int j = 0; j < GEMV_WROWS; j++) {
                        fma8(acc0[r][j], xv, wa[j]);
                        if (GATED) fma8(acc1[r][j], xv, wb[j]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
#pragma unroll
            for (int j = 0; j < GEMV_WROWS; j++) {
                const float g = warp_sum(acc0[r][j]);
                const float u = GATED ? warp_sum(acc1[r][j]) : 0.0f;
                if (lane == 0 && r0 + r < last && n0 + j < n_out) {
                    const u64 at = (u64)(r0 + r) * n_out + n0 + j;
                    if (GATED) ((bf16*)out)[at] = f2bf(silu(g) * u);
                    else ((float*)out)[at] = g * sorted_weight[r0 + r];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP)
moe_gate_up_gemv(const bf16* x, const u64* gate, const u64* up, const u32* offsets,
                 const u32* sorted_token, bf16* act, int hidden, int inter) {
    gemv_body<true>(x, gate, up, offsets, sorted_token, nullptr, act, hidden, inter);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP)
moe_down_gemv(const bf16* act, const u64* down, const u32* offsets, const float* sorted_weight,
              float* y, int inter, int hidden) {
    gemv_body<false>(act, down, nullptr, offsets, nullptr, sorted_weight, y, inter, hidden);
}

// ---- tensor-core path ---------------------------------------------------------------------
#define TM 64
#define TN 64
#define TK 32
#define TKP (TK + 8)  // padded smem row: 80 bytes, 16-byte aligned, ldmatrix conflict-free

// Stages the A rows (gathered) and the B rows (weights, [n][k]) of one TK slice.
template <bool GATED>
__device__ __forceinline__ void load_slice(bf16 (*as)[TKP], bf16 (*b0s)[TKP], bf16 (*b1s)[TKP],
                                           const bf16* __restrict__ a, const bf16* __restrict__ w0,
                                           const bf16* __restrict__ w1,
                                           const u32* __restrict__ sorted_token, u32 m0, u32 m_end,
                                           int n0, int n_out, int k, int k0) {
    for (int i = threadIdx.x; i < TM * (TK / 8); i += blockDim.x) {
        const int r = i / (TK / 8), c = (i % (TK / 8)) * 8;
        const bool ok_k = k0 + c < k;
        const bool ok_a = ok_k && m0 + r < m_end;
        const u64 src_row = ok_a ? (GATED ? sorted_token[m0 + r] : m0 + r) : 0;
        cp_async16(&as[r][c], a + src_row * k + (ok_a ? k0 + c : 0), ok_a ? 16 : 0);
        const bool ok_b = ok_k && n0 + r < n_out;
        const u64 off = ok_b ? (u64)(n0 + r) * k + k0 + c : 0;
        cp_async16(&b0s[r][c], w0 + off, ok_b ? 16 : 0);
        if (GATED) cp_async16(&b1s[r][c], w1 + off, ok_b ? 16 : 0);
    }
}

template <bool GATED>
__device__ __forceinline__ void mma_body(const bf16* __restrict__ a, const u64* __restrict__ w0s,
                                         const u64* __restrict__ w1s, const u32* __restrict__ offsets,
                                         const u32* __restrict__ tiles, const u32* __restrict__ sorted_token,
                                         const float* __restrict__ sorted_weight, void* __restrict__ out,
                                         int k, int n_out, int n_local) {
    __shared__ __align__(16) bf16 as[2][TM][TKP];
    __shared__ __align__(16) bf16 b0s[2][TN][TKP];
    __shared__ __align__(16) bf16 b1s[GATED ? 2 : 1][GATED ? TN : 1][TKP];

    // Which expert and row tile this block is (tiles[] is a prefix sum over experts).
    const u32 t = blockIdx.y;
    int e = -1;
    for (int i = 0; i < n_local; i++)
        if (t >= tiles[i] && t < tiles[i + 1]) e = i;
    if (e < 0) return;
    const u32 m0 = offsets[e] + (t - tiles[e]) * TM, m_end = offsets[e + 1];
    const int n0 = blockIdx.x * TN;
    const bf16* w0 = (const bf16*)w0s[e];
    const bf16* w1 = GATED ? (const bf16*)w1s[e] : nullptr;

    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32×32 quarter
    float c0[2][4][4], c1[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) c0[i][j][q] = c1[i][j][q] = 0.0f;

    const int slices = (k + TK - 1) / TK;
    load_slice<GATED>(as[0], b0s[0], GATED ? b1s[0] : nullptr, a, w0, w1, sorted_token, m0, m_end, n0,
                      n_out, k, 0);
    cp_async_commit();
    for (int sl = 0; sl < slices; sl++) {
        const int buf = sl % 2;
        if (sl + 1 < slices)
            load_slice<GATED>(as[buf ^ 1], b0s[buf ^ 1], GATED ? b1s[buf ^ 1] : nullptr, a, w0, w1,
                              sorted_token, m0, m_end, n0, n_out, k, (sl + 1) * TK);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK / 16; kk++) {
            u32 af[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++)
                ldmatrix_x4(af[i], &as[buf][wm + i * 16 + lane % 16][kk * 16 + (lane / 16) * 8]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                u32 bf[2];
                ldmatrix_x2(bf, &b0s[buf][wn + j * 8 + lane % 8][kk * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
                for (int i = 0; i < 2; i++) mma_bf16(c0[i][j], af[i], bf);
                if (GATED) {
                    ldmatrix_x2(bf, &b1s[buf][wn + j * 8 + lane % 8][kk * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
                    for (int i = 0; i < 2; i++) mma_bf16(c1[i][j], af[i], bf);
                }
            }
        }
        __syncthreads();  // before the next iteration's load overwrites this buffer
    }

#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const u32 row = m0 + wm + i * 16 + lane / 4 + half * 8;
            if (row >= m_end) continue;
            const float scale = GATED ? 1.0f : sorted_weight[row];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int col = n0 + wn + j * 8 + (lane % 4) * 2;
                if (col >= n_out) continue;  // n_out % 8 == 0: both columns in or both out
                const float v0 = c0[i][j][half * 2], v1 = c0[i][j][half * 2 + 1];
                const u64 at = (u64)row * n_out + col;
                if (GATED) {
                    const float u0 = c1[i][j][half * 2], u1 = c1[i][j][half * 2 + 1];
                    *(u32*)((bf16*)out + at) = pack_bf2(silu(v0) * u0, silu(v1) * u1);
                } else {
                    *(float2*)((float*)out + at) = make_float2(v0 * scale, v1 * scale);
                }
            }
        }
    }
}

// grid (ceil(inter / TN), max row tiles), 128 threads.
extern "C" __global__ void __launch_bounds__(128)
moe_gate_up_mma(const bf16* x, const u64* gate, const u64* up, const u32* offsets, const u32* tiles,
                const u32* sorted_token, bf16* act, int hidden, int inter, int n_local) {
    mma_body<true>(x, gate, up, offsets, tiles, sorted_token, nullptr, act, hidden, inter, n_local);
}

// grid (ceil(hidden / TN), max row tiles), 128 threads.
extern "C" __global__ void __launch_bounds__(128)
moe_down_mma(const bf16* act, const u64* down, const u32* offsets, const u32* tiles,
             const float* sorted_weight, float* y, int inter, int hidden, int n_local) {
    mma_body<false>(act, down, nullptr, offsets, tiles, nullptr, sorted_weight, y, inter, hidden, n_local);
}
