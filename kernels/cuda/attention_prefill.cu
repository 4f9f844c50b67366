// Prefill attention, FlashAttention-2 style, over the paged KV cache.
//
// One block = 64 query rows of one sequence × one query head; 4 warps of 16 rows each. The
// keys the tile may see (causal, optionally a sliding window) stream through shared memory BN
// at a time, gathered from their cache blocks with cp.async; S = Q·Kᵀ and O += P·V run on
// tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate) with the online softmax kept in
// registers, so neither S nor P ever leaves the SM. GQA: head h reads KV head h / GROUP.
//
// Compile-time constants (NVRTC -D, the model's shape): HEAD_DIM (a multiple of 16, at most
// 256).

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head dim>"
#endif

#define BM 64            // query rows per block
#define DP (HEAD_DIM + 8) // padded smem row (bf16): rows 16-byte aligned, ldmatrix conflict-free
// Keys per tile: 64, or 32 where two 64-key K/V tiles would pass the 48 KB of static shared
// memory (HEAD_DIM ≥ 192). The smaller tile also keeps S and P small enough that the Q and O
// fragments of HEAD_DIM 240 and 256 fit in 255 registers without spilling.
#define BN (2 * 64 * DP * 2 <= 48 * 1024 ? 64 : 32)
static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "HEAD_DIM: a multiple of 16, at most 256");
static_assert(2 * BN * DP * 2 <= 48 * 1024, "the K and V tiles fit static shared memory");
static_assert(BM <= 2 * BN, "the Q tile is staged in the rows of ks and vs");
#define NT_D (HEAD_DIM / 8)
#define KT_D (HEAD_DIM / 16)

// Stages keys kb .. kb+BN-1 of KV head g into smem rows (zero outside [lo, hi]).
__device__ __forceinline__ void load_kv_tile(bf16 (*dst)[DP], const bf16* __restrict__ cache,
                                             const u32* __restrict__ table, int kb, int lo, int hi,
                                             int block_size, int kv_heads, int g) {
    constexpr int chunks = HEAD_DIM / 8;
    for (int i = threadIdx.x; i < BN * chunks; i += blockDim.x) {
        const int row = i / chunks, c = (i % chunks) * 8;
        const int kpos = kb + row;
        const bool ok = kpos >= lo && kpos <= hi;
        const bf16* src = cache;
        if (ok) {
            const u64 slot = (u64)table[kpos / block_size] * block_size + kpos % block_size;
            src = cache + (slot * kv_heads + g) * HEAD_DIM + c;
        }
        cp_async16(&dst[row][c], src, ok ? 16 : 0);
    }
}

// Per tile t: the sequence it belongs to and its first row within the sequence. Per sequence
// s: its first row in the step, its row count, the position of that first row and where its
// block table starts in `tables`. `window` 0 means no sliding window.
extern "C" __global__ void __launch_bounds__(128)
attention_prefill(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                  const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                  const u32* __restrict__ tile_seq, const u32* __restrict__ tile_row,
                  const u32* __restrict__ seq_row, const u32* __restrict__ seq_len,
                  const u32* __restrict__ seq_pos, const u32* __restrict__ seq_table,
                  const u32* __restrict__ tables, int heads, int kv_heads, int block_size,
                  int window, float scale_log2) {
    __shared__ __align__(16) bf16 ks[BN][DP];
    __shared__ __align__(16) bf16 vs[BN][DP];
    // The Q tile passes through ks, then vs where ks has fewer rows than BM.
    auto q_row = [&](int r) -> bf16* { return r < BN ? ks[r] : vs[r - BN]; };

    const int s = tile_seq[blockIdx.x], i0 = tile_row[blockIdx.x], h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int len = seq_len[s], pos0 = seq_pos[s] + i0;
    const int rows = min(BM, len - i0);
    const u64 row0 = seq_row[s] + i0;
    const int q_cols = heads * HEAD_DIM;
    const u32* table = tables + seq_table[s];
    const int hi = pos0 + rows - 1;                            // last key any row may see
    const int lo = window > 0 ? max(0, pos0 - window + 1) : 0; // first key any row may see

    // Q tile → smem → registers as mma A fragments.
    for (int i = threadIdx.x; i < BM * NT_D; i += blockDim.x) {
        const int r = i / NT_D, c = (i % NT_D) * 8;
        const bf16* src = q + (row0 + min(r, rows - 1)) * q_cols + h * HEAD_DIM + c;
        cp_async16(q_row(r) + c, src, r < rows ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    u32 qf[KT_D][4];
#pragma unroll
    for (int kk = 0; kk < KT_D; kk++)
        ldmatrix_x4(qf[kk], q_row(warp * 16 + lane % 16) + kk * 16 + (lane / 16) * 8);
    __syncthreads();

    float o[NT_D][4];
#pragma unroll
    for (int n = 0; n < NT_D; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // This thread's two rows: r_a = lane/4 and r_a + 8 within the warp's 16.
    const int qpos_a = pos0 + warp * 16 + lane / 4, qpos_b = qpos_a + 8;
    const bool valid_a = warp * 16 + lane / 4 < rows, valid_b = warp * 16 + lane / 4 + 8 < rows;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.0f, l_b = 0.0f;

    for (int kb = lo / BN * BN; kb <= hi; kb += BN) {
        load_kv_tile(ks, k_cache, table, kb, lo, hi, block_size, kv_heads, g);
        cp_async_commit();
        load_kv_tile(vs, v_cache, table, kb, lo, hi, block_size, kv_heads, g);
        cp_async_commit();
        cp_async_wait_1();  // K has landed; V may still be in flight during Q·Kᵀ
        __syncthreads();

        float sc[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KT_D; kk++) {
                u32 b[2];
                ldmatrix_x2(b, &ks[n * 8 + lane % 8][kk * 16 + ((lane / 8) % 2) * 8]);
                mma_bf16(sc[n], qf[kk], b);
            }
        }

        // Mask, then the online softmax update for both rows.
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int kpos = kb + n * 8 + (lane % 4) * 2 + e;
                const bool see_a = valid_a && kpos <= qpos_a && (window <= 0 || kpos > qpos_a - window);
                const bool see_b = valid_b && kpos <= qpos_b && (window <= 0 || kpos > qpos_b - window);
                sc[n][e] = see_a ? sc[n][e] * scale_log2 : NEG_INF;
                sc[n][2 + e] = see_b ? sc[n][2 + e] * scale_log2 : NEG_INF;
                mx_a = fmaxf(mx_a, sc[n][e]);
                mx_b = fmaxf(mx_b, sc[n][2 + e]);
            }
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        // A row that has seen nothing yet keeps m = -inf; subtract 0 then (exp2(-inf) = 0).
        const float base_a = mn_a == NEG_INF ? 0.0f : mn_a, base_b = mn_b == NEG_INF ? 0.0f : mn_b;
        const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.0f, sum_b = 0.0f;
        u32 pf[BN / 16][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            const float p0 = exp2f(sc[n][0] - base_a), p1 = exp2f(sc[n][1] - base_a);
            const float p2 = exp2f(sc[n][2] - base_b), p3 = exp2f(sc[n][3] - base_b);
            sum_a += p0 + p1;
            sum_b += p2 + p3;
            // The C fragment of two adjacent n-tiles is the A fragment of one k16 step.
            pf[n / 2][(n % 2) * 2 + 0] = pack_bf2(p0, p1);
            pf[n / 2][(n % 2) * 2 + 1] = pack_bf2(p2, p3);
        }
        l_a = l_a * corr_a + sum_a;  // per-lane partial sums; reduced across the quad at the end
        l_b = l_b * corr_b + sum_b;
#pragma unroll
        for (int n = 0; n < NT_D; n++) {
            o[n][0] *= corr_a;
            o[n][1] *= corr_a;
            o[n][2] *= corr_b;
            o[n][3] *= corr_b;
        }

        cp_async_wait_all();
        __syncthreads();
#pragma unroll
        for (int kt = 0; kt < BN / 16; kt++) {
#pragma unroll
            for (int n = 0; n < NT_D; n++) {
                u32 b[2];
                ldmatrix_x2_trans(b, &vs[kt * 16 + lane % 16][n * 8]);
                mma_bf16(o[n], pf[kt], b);
            }
        }
        __syncthreads();  // before the next tile overwrites ks / vs
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    const int ra = warp * 16 + lane / 4;
#pragma unroll
    for (int n = 0; n < NT_D; n++) {
        const int c = h * HEAD_DIM + n * 8 + (lane % 4) * 2;
        if (valid_a)
            *(u32*)(out + (row0 + ra) * q_cols + c) = pack_bf2(o[n][0] * inv_a, o[n][1] * inv_a);
        if (valid_b)
            *(u32*)(out + (row0 + ra + 8) * q_cols + c) = pack_bf2(o[n][2] * inv_b, o[n][3] * inv_b);
    }
}
