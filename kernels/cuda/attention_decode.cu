// Decode attention (one query row per sequence), split-KV "flash-decoding" over the paged cache.
//
// Pass 1, grid (sequence, kv head, split): a block reads its split's keys of one KV head once
// and scores them against all GROUP query heads that share that KV head, so each KV byte
// leaves HBM once per step. A key's HEAD_DIM/8 16-byte chunks are spread over LPK lanes (the
// largest power of two not above the chunk count, so a key's lanes are an aligned group the
// shuffle reduction stays inside), each lane taking CH = 1 or 2 chunks; each lane group owns
// one key at a time and keeps an online softmax per head. The partial states of the block's
// lane groups are merged in shared memory and written as (max, sum, unnormalised output) per
// (sequence, head, split).
// Pass 2, grid (sequence, head): merges the splits and writes bf16.
//
// Compile-time constants (NVRTC -D): HEAD_DIM (multiple of 16, at most 256), GROUP (query heads
// per KV head, 1 to 8, with GROUP · CH at most 8: `Spec::new` refuses the rest).

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head dim>"
#endif
#ifndef GROUP
#error "compile with -DGROUP=<query heads per kv head>"
#endif

// The largest power of two not above n (n ≥ 1).
constexpr int pow2_at_most(int n, int p = 1) { return 2 * p <= n ? pow2_at_most(n, 2 * p) : p; }

constexpr int NCH = HEAD_DIM / 8;           // 16-byte chunks per key row
constexpr int LPK = pow2_at_most(NCH);      // lanes per key
constexpr int CH = (NCH + LPK - 1) / LPK;   // chunks per lane: lane sl takes sl, sl + LPK
constexpr int KPW = WARP / LPK;             // keys a warp scores at once
constexpr int DEC_WARPS = 4;
constexpr int PARTS = DEC_WARPS * KPW;      // independent softmax states in a block

static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "HEAD_DIM: a multiple of 16, at most 256");
static_assert(WARP % LPK == 0, "a key's lanes are an aligned group within the warp");
static_assert(CH * LPK >= NCH && CH <= 2, "every chunk of a key has a lane");
static_assert(GROUP >= 1 && GROUP * CH <= 8, "GROUP * CH above 8 does not fit the registers");
static_assert(PARTS * GROUP * (HEAD_DIM + 2) * 4 <= 48 * 1024, "static shared memory");

// Per decode sequence s: its row in the step, its position, where its block table starts.
// Partials: [s, head, split] for m and l, [s, head, split, d] for acc.
// An explicit register budget: left alone, ptxas settles on 96 registers and spills at d = 128,
// group = 4 on sm_90. Four blocks per SM allow 128 registers; GROUP · CH of 8 needs two (255).
#define DEC_MIN_BLOCKS (GROUP * CH > 4 ? 2 : 4)
extern "C" __global__ void __launch_bounds__(DEC_WARPS * WARP, DEC_MIN_BLOCKS)
attention_decode(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                 const bf16* __restrict__ v_cache, const u32* __restrict__ dec_row,
                 const u32* __restrict__ dec_pos, const u32* __restrict__ dec_table,
                 const u32* __restrict__ tables, float* __restrict__ part_m,
                 float* __restrict__ part_l, float* __restrict__ part_acc, int heads,
                 int kv_heads, int block_size, int window, int split_len, float scale_log2) {
    __shared__ float sm_m[PARTS][GROUP];
    __shared__ float sm_l[PARTS][GROUP];
    __shared__ float sm_acc[PARTS][GROUP][HEAD_DIM];

    const int s = blockIdx.x, g = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int sub = lane / LPK, sl = lane % LPK;  // key slot within the warp, lane within key
    const int part = warp * KPW + sub;
    const int pos = dec_pos[s];
    const int lo = window > 0 ? max(0, pos - window + 1) : 0;
    const int k_begin = lo + z * split_len, k_end = min(pos + 1, k_begin + split_len);
    const u32* table = tables + dec_table[s];
    const int q_cols = heads * HEAD_DIM;
    // Chunk c of this lane covers dims (sl + c·LPK)·8 .. +8, when that is inside the row.
    bool has[CH];
#pragma unroll
    for (int c = 0; c < CH; c++) has[c] = sl + c * LPK < NCH;

    float qv[GROUP][CH][8], acc[GROUP][CH][8], m[GROUP], l[GROUP];
#pragma unroll
    for (int hh = 0; hh < GROUP; hh++) {
#pragma unroll
        for (int c = 0; c < CH; c++) {
            uint4 raw = make_uint4(0, 0, 0, 0);
            if (has[c])
                raw = *(const uint4*)(q + (u64)dec_row[s] * q_cols + (g * GROUP + hh) * HEAD_DIM +
                                      (sl + c * LPK) * 8);
            const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                qv[hh][c][2 * i] = lo_bf(w[i]) * scale_log2;
                qv[hh][c][2 * i + 1] = hi_bf(w[i]) * scale_log2;
            }
#pragma unroll
            for (int i = 0; i < 8; i++) acc[hh][c][i] = 0.0f;
        }
        m[hh] = NEG_INF;
        l[hh] = 0.0f;
    }

    // Every lane of the warp runs the same number of iterations (the shuffles need all 32).
    for (int kb = k_begin + warp * KPW; kb < k_end; kb += DEC_WARPS * KPW) {
        const int kpos = kb + sub;
        const bool ok = kpos < k_end;
        u32 kw[CH][4], vw[CH][4];
        u64 at = 0;
        if (ok) {
            const u64 slot = (u64)table[kpos / block_size] * block_size + kpos % block_size;
            at = (slot * kv_heads + g) * HEAD_DIM + sl * 8;
        }
#pragma unroll
        for (int c = 0; c < CH; c++) {
            uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
            if (ok && has[c]) {
                kr = *(const uint4*)(k_cache + at + c * LPK * 8);
                vr = *(const uint4*)(v_cache + at + c * LPK * 8);
            }
            kw[c][0] = kr.x, kw[c][1] = kr.y, kw[c][2] = kr.z, kw[c][3] = kr.w;
            vw[c][0] = vr.x, vw[c][1] = vr.y, vw[c][2] = vr.z, vw[c][3] = vr.w;
        }
#pragma unroll
        for (int hh = 0; hh < GROUP; hh++) {
            float d = 0.0f;
#pragma unroll
            for (int c = 0; c < CH; c++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    d += qv[hh][c][2 * i] * lo_bf(kw[c][i]) + qv[hh][c][2 * i + 1] * hi_bf(kw[c][i]);
#pragma unroll
            for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (ok) {
                const float mn = fmaxf(m[hh], d);
                const float corr = exp2f(m[hh] - mn), p = exp2f(d - mn);
                m[hh] = mn;
                l[hh] = l[hh] * corr + p;
#pragma unroll
                for (int c = 0; c < CH; c++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        acc[hh][c][2 * i] = acc[hh][c][2 * i] * corr + p * lo_bf(vw[c][i]);
                        acc[hh][c][2 * i + 1] = acc[hh][c][2 * i + 1] * corr + p * hi_bf(vw[c][i]);
                    }
            }
        }
    }

#pragma unroll
    for (int hh = 0; hh < GROUP; hh++) {
        if (sl == 0) {
            sm_m[part][hh] = m[hh];
            sm_l[part][hh] = l[hh];
        }
#pragma unroll
        for (int c = 0; c < CH; c++)
            if (has[c])
#pragma unroll
                for (int i = 0; i < 8; i++) sm_acc[part][hh][(sl + c * LPK) * 8 + i] = acc[hh][c][i];
    }
    __syncthreads();

    // Merge the block's partial states: one thread per (head, d).
    for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += blockDim.x) {
        const int hh = i / HEAD_DIM, d = i % HEAD_DIM;
        float mx = NEG_INF;
        for (int p = 0; p < PARTS; p++) mx = fmaxf(mx, sm_m[p][hh]);
        float sum = 0.0f, a = 0.0f;
        if (mx != NEG_INF) {
            for (int p = 0; p < PARTS; p++) {
                const float f = exp2f(sm_m[p][hh] - mx);
                sum += sm_l[p][hh] * f;
                a += sm_acc[p][hh][d] * f;
            }
        }
        const u64 at = ((u64)s * heads + g * GROUP + hh) * splits + z;
        part_acc[at * HEAD_DIM + d] = a;
        if (d == 0) {
            part_m[at] = mx;
            part_l[at] = sum;
        }
    }
}

// out[row, head] = Σ_z acc_z · 2^(m_z - M) / Σ_z l_z · 2^(m_z - M). One block per (sequence,
// head), one thread per d.
extern "C" __global__ void attention_decode_reduce(const float* __restrict__ part_m,
                                                   const float* __restrict__ part_l,
                                                   const float* __restrict__ part_acc,
                                                   const u32* __restrict__ dec_row,
                                                   bf16* __restrict__ out, int heads, int splits) {
    const int s = blockIdx.x, h = blockIdx.y;
    const u64 base = ((u64)s * heads + h) * splits;
    float mx = NEG_INF;
    for (int z = 0; z < splits; z++) mx = fmaxf(mx, part_m[base + z]);
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float sum = 0.0f, a = 0.0f;
        if (mx != NEG_INF) {
            for (int z = 0; z < splits; z++) {
                const float f = exp2f(part_m[base + z] - mx);
                sum += part_l[base + z] * f;
                a += part_acc[(base + z) * HEAD_DIM + d] * f;
            }
        }
        out[(u64)dec_row[s] * heads * HEAD_DIM + h * HEAD_DIM + d] = f2bf(sum > 0.0f ? a / sum : 0.0f);
    }
}
