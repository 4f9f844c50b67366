// Row-wise kernels around the matrix products: embedding gather, RMSNorm, RoPE, the append of
// a step's K/V into the paged cache, and the small conversions between them. All are bound by
// memory bandwidth; each reads its input once with 16-byte accesses where the layout allows.

// out[r, :] = f32(table[ids[r], :]). One block per row. The host checks ids against the
// vocabulary before launching (it holds them anyway).
extern "C" __global__ void embed_gather(const bf16* __restrict__ table, const u32* __restrict__ ids,
                                        float* __restrict__ out, int cols) {
    const int r = blockIdx.x;
    const bf16* src = table + (u64)ids[r] * cols;
    float* dst = out + (u64)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = bf2f(src[c]);
}

// out[r, :] = bf16(x[r, :] · rsqrt(mean(x²) + eps) · w). f32 in (the residual stream), bf16
// out (the operand of the next matrix product). The residual add that precedes a norm in the
// transformer is fused into the op that produces it (the cuBLASLt epilogue with beta = 1, the
// MoE combine), so the norm itself reads the residual exactly once.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const bf16* __restrict__ w,
                                    bf16* __restrict__ out, int cols, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const float* row = x + (u64)r * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += row[c] * row[c];
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[(u64)r * cols + c] = f2bf(row[c] * inv * bf2f(w[c]));
}

// Rotary embedding in the "rotate half" layout of Hugging Face checkpoints: pairs (i, i + d/2)
// of each head turn by pos · θ^(-2i/d). f32 in (the projection's output), bf16 out. The angle
// is formed and reduced to [-π, π] in double precision (at position 32k an f32 angle is already
// off by ~1e-3 rad); the sine and cosine of the reduced angle are then exact enough in f32,
// and the intrinsics avoid the local-memory slow path of full-range sincos.
extern "C" __global__ void rope(const float* __restrict__ x, const u32* __restrict__ positions,
                                bf16* __restrict__ out, int cols, int head_dim, double log_theta) {
    const int r = blockIdx.x;
    const int half = head_dim / 2;
    const double pos = (double)positions[r];
    const double two_pi = 6.283185307179586;
    for (int p = threadIdx.x; p < cols / 2; p += blockDim.x) {
        const int head = p / half, i = p % half;
        double angle = pos * exp(-log_theta * (2.0 * i / head_dim));
        angle -= two_pi * rint(angle / two_pi);
        float s, c;
        __sincosf((float)angle, &s, &c);
        const u64 a = (u64)r * cols + head * head_dim + i;
        const float xa = x[a], xb = x[a + half];
        out[a] = f2bf(xa * c - xb * s);
        out[a + half] = f2bf(xb * c + xa * s);
    }
}

// Writes row r of this step's K and V into cache slot slots[r] (block · block_size + offset,
// computed on the host from the block tables). Cache layout per layer: [slot, kv_head, d].
extern "C" __global__ void kv_append(const bf16* __restrict__ k, const bf16* __restrict__ v,
                                     const u32* __restrict__ slots, bf16* __restrict__ k_cache,
                                     bf16* __restrict__ v_cache, int kv_cols) {
    const int r = blockIdx.x;
    const u64 dst = (u64)slots[r] * kv_cols, src = (u64)r * kv_cols;
    // kv_cols is a multiple of 8 (checked on the host): copy 16 bytes at a time.
    for (int c = threadIdx.x * 8; c < kv_cols; c += blockDim.x * 8) {
        *(uint4*)(k_cache + dst + c) = *(const uint4*)(k + src + c);
        *(uint4*)(v_cache + dst + c) = *(const uint4*)(v + src + c);
    }
}

// bf16 copy of an f32 matrix (a matrix product's operand that arrived in f32).
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ out,
                                         u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2bf(x[i]);
}

// out[i, :] = x[rows[i], :] for an f32 matrix.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const u32* __restrict__ rows,
                                           float* __restrict__ out, int cols) {
    const int i = blockIdx.x;
    const float* src = x + (u64)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(u64)i * cols + c] = src[c];
}

// out[i, :] = x[rows[i], :] for a bf16 matrix.
extern "C" __global__ void gather_rows_bf16(const bf16* __restrict__ x, const u32* __restrict__ rows,
                                            bf16* __restrict__ out, int cols) {
    const int i = blockIdx.x;
    const bf16* src = x + (u64)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(u64)i * cols + c] = src[c];
}

// out = bf16(silu(gate) ⊙ up) for the dense MLP, whose gate and up products come from cuBLASLt
// in f32 (the experts fuse this into their own GEMM epilogue instead).
extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    bf16* __restrict__ out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2bf(silu(gate[i]) * up[i]);
}

// residual += x, both f32: the remote experts' outputs of an exchange into the residual stream.
extern "C" __global__ void add_f32(const float* __restrict__ x, float* __restrict__ residual, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        residual[i] += x[i];
}
