// Sampling on the GPU, one block of SAMPLE_THREADS per row of logits: greedy (argmax, ties to
// the lower id), or temperature with top-k and top-p under a seeded counter-based generator;
// plus the chosen token's logprob and the top-N alternatives, all of the model's own
// distribution (log-softmax of the raw logits, before temperature), as the CPU sampler reports.
//
// Top-k and top-p are applied as value thresholds found by bisection (a few dozen block-wide
// counts over the vocabulary) instead of a full sort; ties at a threshold are all kept. The
// draw walks the kept tokens in id order through a block-wide prefix sum.

#define SAMPLE_THREADS 1024
#define BISECT_STEPS 40

struct Best {
    float v;
    int i;
};

// (v, i) beats (w, j) when v is larger, or equal with a lower id.
__device__ __forceinline__ bool beats(float v, int i, float w, int j) {
    return v > w || (v == w && i < j);
}

// The best (value, id) over the block among entries strictly worse than `below` (the previous
// pick; pass (+inf, -1) for none).
__device__ Best block_best(const float* __restrict__ row, int n, Best below, float* sv, int* si) {
    Best b = {NEG_INF, 0x7fffffff};
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = row[i];
        if (beats(below.v, below.i, v, i) && beats(v, i, b.v, b.i)) b = {v, i};
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, b.v, o);
        const int i = __shfl_xor_sync(0xffffffffu, b.i, o);
        if (beats(v, i, b.v, b.i)) b = {v, i};
    }
    __syncthreads();
    if (threadIdx.x % WARP == 0) {
        sv[threadIdx.x / WARP] = b.v;
        si[threadIdx.x / WARP] = b.i;
    }
    __syncthreads();
    b = {NEG_INF, 0x7fffffff};
    for (int w = 0; w < (int)(blockDim.x / WARP); w++)
        if (beats(sv[w], si[w], b.v, b.i)) b = {sv[w], si[w]};
    return b;
}

// Σ exp((l - max) / T) over logits l >= tau.
__device__ float mass_above(const float* __restrict__ row, int n, float tau, float mx, float inv_t,
                            float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (row[i] >= tau) s += __expf((row[i] - mx) * inv_t);
    return block_sum(s, scratch);
}

__device__ float count_above(const float* __restrict__ row, int n, float tau, float* scratch) {
    float c = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) c += row[i] >= tau ? 1.0f : 0.0f;
    return block_sum(c, scratch);
}

// splitmix64: a uniform double in [0, 1) from (seed, counter, row).
__device__ __forceinline__ double uniform(u64 seed, u64 counter, u64 row) {
    u64 z = seed ^ (counter * 0x9e3779b97f4a7c15ull) ^ (row * 0xbf58476d1ce4e5b9ull);
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

// Per row r: temperature[r] (0 = greedy), top_k[r] (0 = off), top_p[r] (1 = off), seed[r];
// `counter` distinguishes the steps of one sequence. Writes token[r], logprob[r], and the
// n_top best (id, logprob) into top_id / top_lp [r, n_top].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample(const float* __restrict__ logits, int vocab, const float* __restrict__ temperature,
       const u32* __restrict__ top_k, const float* __restrict__ top_p, const u64* __restrict__ seed,
       const u64* __restrict__ counter, u32* __restrict__ token, float* __restrict__ logprob,
       u32* __restrict__ top_id, float* __restrict__ top_lp, int n_top) {
    __shared__ float scratch[32];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float prefix[SAMPLE_THREADS];
    const int r = blockIdx.x;
    const float* row = logits + (u64)r * vocab;

    const Best top = block_best(row, vocab, Best{POS_INF, -1}, sv, si);
    const float mx = top.v;
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += __expf(row[i] - mx);
    const float log_z = mx + logf(block_sum(z, scratch));

    int chosen = top.i;
    const float t = temperature[r];
    if (t > 0.0f) {
        const float inv_t = 1.0f / t;
        // Smallest logit, the lower end of every bisection.
        float mn = POS_INF;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) mn = fminf(mn, row[i]);
        mn = -block_max(-mn, scratch);
        // Top-k: the largest tau that still keeps at least k tokens.
        float tau = mn;
        const int k = top_k[r];
        if (k > 0 && k < vocab) {
            float a = mn, b = mx;  // count(>= a) >= k, count(>= b) may be < k
            for (int s = 0; s < BISECT_STEPS; s++) {
                const float mid = 0.5f * (a + b);
                if (count_above(row, vocab, mid, scratch) >= k) a = mid; else b = mid;
            }
            tau = a;
        }
        // Top-p over what top-k kept: the largest tau whose mass reaches p of the kept mass.
        const float p = top_p[r];
        if (p < 1.0f) {
            const float need = p * mass_above(row, vocab, tau, mx, inv_t, scratch);
            float a = tau, b = mx;
            for (int s = 0; s < BISECT_STEPS; s++) {
                const float mid = 0.5f * (a + b);
                if (mass_above(row, vocab, mid, mx, inv_t, scratch) >= need) a = mid; else b = mid;
            }
            tau = a;
        }
        // Draw: thread j owns a contiguous run of ids; a block prefix sum finds the run.
        const int per = (vocab + blockDim.x - 1) / blockDim.x;
        const int lo = threadIdx.x * per, hi = min(vocab, lo + per);
        float mine = 0.0f;
        for (int i = lo; i < hi; i++)
            if (row[i] >= tau) mine += __expf((row[i] - mx) * inv_t);
        prefix[threadIdx.x] = mine;
        __syncthreads();
        if (threadIdx.x == 0) {  // a serial scan over 1024 partial sums: cheap next to the rest
            float run = 0.0f;
            for (int j = 0; j < (int)blockDim.x; j++) {
                const float v = prefix[j];
                prefix[j] = run;
                run += v;
            }
            scratch[0] = (float)(uniform(seed[r], counter[r], r) * run);
        }
        __syncthreads();
        const float u = scratch[0];
        const float start = prefix[threadIdx.x];
        __shared__ int pick;
        if (threadIdx.x == 0) pick = top.i;
        __syncthreads();
        if (u >= start && u < start + mine) {
            float acc = start;
            for (int i = lo; i < hi; i++) {
                if (row[i] < tau) continue;
                acc += __expf((row[i] - mx) * inv_t);
                if (u < acc) {
                    pick = i;
                    break;
                }
            }
        }
        __syncthreads();
        chosen = pick;
    }

    if (threadIdx.x == 0) {
        token[r] = chosen;
        logprob[r] = row[chosen] - log_z;
    }
    Best prev = {POS_INF, -1};
    for (int j = 0; j < n_top; j++) {
        prev = j == 0 ? top : block_best(row, vocab, prev, sv, si);
        if (threadIdx.x == 0) {
            top_id[r * n_top + j] = prev.i;
            top_lp[r * n_top + j] = prev.v - log_z;
        }
    }
}
