// Mixture-of-experts routing around the expert GEMMs: the fused router, the sort of the
// (token, slot) assignments by expert, and the combine of the experts' outputs back into the
// residual stream.

#define MAX_EXPERTS 256
#define MAX_TOP_K 8

// Per token: logits = x · gateᵀ (f32 accumulate), softmax in f32, top-k by logit (ties to the
// lower expert id: `Backend::router_topk`'s rule, which the CPU backend follows too), weights
// renormalised over the chosen k. One block per token;
// warps take experts round-robin.
extern "C" __global__ void __launch_bounds__(128)
moe_router(const bf16* __restrict__ x, const bf16* __restrict__ gate, u32* __restrict__ experts,
           float* __restrict__ weights, int hidden, int num_experts, int top_k) {
    __shared__ float logits[MAX_EXPERTS];
    const int t = blockIdx.x, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const bf16* xr = x + (u64)t * hidden;
    for (int e = warp; e < num_experts; e += blockDim.x / WARP) {
        const bf16* wr = gate + (u64)e * hidden;
        float acc = 0.0f;
        for (int c = lane * 8; c < hidden; c += WARP * 8) {  // hidden % 8 == 0 (host check)
            const uint4 a = *(const uint4*)(xr + c), b = *(const uint4*)(wr + c);
            const u32 aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++) acc += lo_bf(aw[i]) * lo_bf(bw[i]) + hi_bf(aw[i]) * hi_bf(bw[i]);
        }
        acc = warp_sum(acc);
        if (lane == 0) logits[e] = acc;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    // A handful of experts: one thread is the simplest exact choice.
    float mx = NEG_INF;
    for (int e = 0; e < num_experts; e++) mx = fmaxf(mx, logits[e]);
    float total = 0.0f;
    for (int e = 0; e < num_experts; e++) total += __expf(logits[e] - mx);
    // Chosen experts live in shared memory: a register array indexed in a loop would spill
    // to local memory.
    __shared__ int chosen[MAX_TOP_K];
    __shared__ bool taken[MAX_EXPERTS];
    for (int e = 0; e < num_experts; e++) taken[e] = false;
    float kept = 0.0f;
    for (int j = 0; j < top_k; j++) {
        int best = -1;
        // Ascending ids and a strict comparison: the lower id wins a tie.
        for (int e = 0; e < num_experts; e++)
            if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;
        chosen[j] = best;
        taken[best] = true;
        kept += __expf(logits[best] - mx) / total;
    }
    for (int j = 0; j < top_k; j++) {
        experts[t * top_k + j] = chosen[j];
        weights[t * top_k + j] = __expf(logits[chosen[j]] - mx) / total / kept;
    }
}

// Groups the assignments a = t·top_k + j by local expert, with no host round trip:
//   offsets[e] .. offsets[e+1]   the sorted rows of local expert e,
//   tiles[e] .. tiles[e+1]       its row tiles of `tile_rows` (the tensor-core path's grid),
//   sorted_token / sorted_weight the token and routing weight of each sorted row,
//   pos_of[a]                    the sorted row of assignment a, or -1 (expert not held here).
// local_of[expert] is the local index of an expert held here, -1 otherwise. The order within
// one expert is the assignment order (stable), so results match the host reference exactly.
// One block: counts with shared atomics, a serial scan over (few) experts, then one warp
// scatters in assignment order, ranking equal experts with __match_any_sync.
extern "C" __global__ void __launch_bounds__(1024)
moe_sort(const u32* __restrict__ experts, const float* __restrict__ weights,
         const int* __restrict__ local_of, int n_assign, int top_k, int n_local, int tile_rows,
         u32* __restrict__ offsets, u32* __restrict__ tiles, u32* __restrict__ sorted_token,
         float* __restrict__ sorted_weight, int* __restrict__ pos_of) {
    __shared__ u32 count[MAX_EXPERTS];
    __shared__ u32 cursor[MAX_EXPERTS];
    for (int e = threadIdx.x; e < n_local; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < n_assign; a += blockDim.x) {
        const int e = local_of[experts[a]];
        if (e >= 0) atomicAdd(&count[e], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 row = 0, tile = 0;
        for (int e = 0; e < n_local; e++) {
            offsets[e] = row;
            tiles[e] = tile;
            cursor[e] = row;
            row += count[e];
            tile += (count[e] + tile_rows - 1) / tile_rows;
        }
        offsets[n_local] = row;
        tiles[n_local] = tile;
    }
    __syncthreads();
    if (threadIdx.x >= WARP) return;
    const int lane = threadIdx.x;
    for (int base = 0; base < n_assign; base += WARP) {
        const int a = base + lane;
        const int e = a < n_assign ? local_of[experts[a]] : -2;
        const u32 peers = __match_any_sync(0xffffffffu, e);
        const u32 rank = __popc(peers & ((1u << lane) - 1u));
        if (e >= 0) {
            const u32 p = cursor[e] + rank;
            sorted_token[p] = a / top_k;
            sorted_weight[p] = weights[a];
            pos_of[a] = (int)p;
        } else if (e == -1) {
            pos_of[a] = -1;
        }
        __syncwarp();
        if (e >= 0 && rank == 0) cursor[e] += __popc(peers);
        __syncwarp();
    }
}

// residual[t, :] += Σ_j y[pos_of[t·top_k + j], :] (the routing weight is already in y).
// Summing in slot order per token keeps the result deterministic (no atomics).
extern "C" __global__ void moe_combine(const float* __restrict__ y, const int* __restrict__ pos_of,
                                       float* __restrict__ residual, int hidden, int top_k) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < top_k; j++) {
            const int p = pos_of[t * top_k + j];
            if (p >= 0) acc += y[(u64)p * hidden + c];
        }
        residual[(u64)t * hidden + c] += acc;
    }
}
