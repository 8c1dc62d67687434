// Decode attention: one query token per (row, head) over a static KV cache, split-KV.
//
// decode_split_kernel: block (split, kv head and query-head tile, row) attends its GROUP query
// heads (sharing one read of the kv head, GQA) to its share of the row's valid positions
// [0, len). With one split it writes the output directly; otherwise it writes a normalised
// partial output and its log-sum-exp, and the splits are merged: given the caller's counters,
// by the last block of each (row, tile) to finish (one launch), else by decode_combine_kernel.
// Given p.lse, each (row, head)'s log-sum-exp is stored beside its output (natural log). Given
// p.mask (transformers' padded decode steps), a position it hides from a query head is one that
// head does not see; a head that sees none gets zeros.
// The lengths are read on the device (clamped to [0, Smax]) so nothing syncs the host.
// Both kernels wait for the previous grid before touching memory, so that on sm_90 and later they
// launch as programmatic dependents (common.cuh's launch_kernel) inside a decode step.
#include "common.cuh"

#include <algorithm>

namespace fastgpt {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;   // query heads per block
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 256;
constexpr int64_t kWaveFill[2] = {9, 10};  // decode_num_splits: a last wave at least 9/10 full
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;  // a base-2 log-sum-exp times this is the natural-log one

// exp2(m - m_new) for an online-softmax rescale, 0 when the running max is still -inf.
__device__ __forceinline__ float rescale(float m, float m_new) {
    return m == -INFINITY ? 0.0f : exp2f(m - m_new);
}

// Merges GROUP running states (m, l, acc) over the lanes of a warp that differ in the key-group
// bits (lane / LANES_PER_KEY): afterwards every key group of the warp holds the warp's state.
template <int GROUP, int LANES_PER_KEY>
__device__ __forceinline__ void merge_key_groups(float (&m)[GROUP], float (&l)[GROUP], float (&acc)[GROUP][8]) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
        for (int offset = LANES_PER_KEY; offset < 32; offset <<= 1) {
            const float m_o = __shfl_xor_sync(FULL_MASK, m[g], offset);
            const float l_o = __shfl_xor_sync(FULL_MASK, l[g], offset);
            const float m_new = fmaxf(m[g], m_o);
            const float a = rescale(m[g], m_new), c = rescale(m_o, m_new);
            l[g] = l[g] * a + l_o * c;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] = acc[g][j] * a + __shfl_xor_sync(FULL_MASK, acc[g][j], offset) * c;
            m[g] = m_new;
        }
    }
}

// Element d of (row, head) `bh` = b * Hq + h merged from its splits' partial outputs, and the
// row's log-sum-exp over them (log2 domain):
//   o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),  lse = M + log2 sum_s 2^(lse_s - M),  M = max_s lse_s
// o = 0 and lse = -inf where every split was empty (M = -inf), NaN where a split's is (M is then
// NaN). The loads go to L2 (.cg): other blocks, on other SMs, may have written the partials in
// this same launch.
struct Merged {
    float o, lse;
};

__device__ __forceinline__ Merged merged_split_output(const DecodeParams& p, int64_t bh, int d) {
    const float* lse = p.lse_partial + bh * p.num_splits;                  // (num_splits,)
    const float* o = p.o_partial + bh * p.num_splits * p.head_dim + d;  // (num_splits,) at stride D
    float m = -INFINITY;
    for (int s = 0; s < p.num_splits; ++s) {
        const float x = __ldcg(lse + s);
        m = x > m || x != x ? x : m;  // fmaxf would drop a NaN
    }
    if (m == -INFINITY) return {0.0f, -INFINITY};
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < p.num_splits; ++s) {
        const float w = exp2f(__ldcg(lse + s) - m);
        num += w * __ldcg(o + int64_t(s) * p.head_dim);
        den += w;
    }
    return {num / den, m + log2f(den)};
}

// Writes element d of (row, head) bh merged from its splits (output at element offset `o_at`),
// and with p.lse its log-sum-exp (natural log) once (d == 0).
template <typename T>
__device__ __forceinline__ void write_merged(const DecodeParams& p, int64_t bh, int d, int64_t o_at) {
    const Merged merged = merged_split_output(p, bh, d);
    static_cast<T*>(p.o)[o_at] = from_float<T>(merged.o);
    if (p.lse != nullptr && d == 0) p.lse[bh] = merged.lse * kLn2;
}

// Merges the kWarps states of each of the tile's `heads` query heads from h0 (one thread per
// (head, d)) and writes its output, or with several splits its partial output and log-sum-exp.
template <typename T, int D, int GROUP>
__device__ __forceinline__ void write_heads(const DecodeParams& p, const float (&s_m)[kWarps][GROUP],
                                            const float (&s_l)[kWarps][GROUP], const float (&s_acc)[kWarps][GROUP][D],
                                            int b, int h0, int heads, int split) {
    for (int i = threadIdx.x; i < heads * D; i += kThreads) {
        const int g = i / D, d = i % D;
        float m_all = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float c = rescale(s_m[w][g], m_all);
            l_all += s_l[w][g] * c;
            o += s_acc[w][g][d] * c;
        }
        o = l_all != 0.0f ? o / l_all : 0.0f;  // a NaN score (a NaN in the cache) gives NaN, as SDPA
        const float lse = l_all != 0.0f ? m_all + log2f(l_all) : -INFINITY;  // log2 domain
        const int h = h0 + g;
        const int64_t bh = int64_t(b) * p.heads_q + h;
        if (p.num_splits == 1) {
            static_cast<T*>(p.o)[b * p.stride_o_b + h * p.stride_o_h + d] = from_float<T>(o);
            if (p.lse != nullptr && d == 0) p.lse[bh] = lse * kLn2;
        } else {
            const int64_t row = bh * p.num_splits + split;
            p.o_partial[row * D + d] = o;
            if (d == 0) p.lse_partial[row] = lse;
        }
    }
}

// With the caller's counters (zero between launches; a tile counts at its first head, b * Hq + h0):
// the block whose split finishes last among its tile's splits merges them into o for the tile's
// `heads` query heads from h0, and zeroes the counter again for the next launch.
template <typename T>
__device__ void merge_splits_if_last(const DecodeParams& p, int b, int h0, int heads, int64_t counter) {
    __threadfence();  // this thread's partials are visible device-wide before the count says so
    __syncthreads();
    int last = 0;
    if (threadIdx.x == 0) {
        last = atomicAdd(p.counters + counter, 1) == p.num_splits - 1;
        if (last) p.counters[counter] = 0;  // every other split of the tile has counted already
    }
    if (!__syncthreads_or(last)) return;
    __threadfence();  // and the other blocks' partials are seen after it
    for (int i = threadIdx.x; i < heads * p.head_dim; i += blockDim.x) {
        const int h = h0 + i / p.head_dim, d = i % p.head_dim;
        write_merged<T>(p, int64_t(b) * p.heads_q + h, d, b * p.stride_o_b + h * p.stride_o_h + d);
    }
}

}  // namespace

// For query head h (one of GROUP sharing kv head kvh) and positions j in [start, end):
//   s_j = (q_h . k_j) * scale * log2(e),   o_h = sum_j 2^(s_j - m) v_j / sum_j 2^(s_j - m)
// with m = max_j s_j, accumulated online. Thread layout: D / 8 lanes ("a key group") split one
// key's head dim into 16-byte chunks; the block's 4 * 32 / (D / 8) key groups take interleaved
// keys, and their running (m, l, acc) states are merged by shuffles, then across warps in
// shared memory.
// One query head a block (MHA) asks for 5 blocks an SM: 96 registers on sm_90a and no spills,
// against 105 (4 blocks) unbounded; each block's loads in flight are what the memory system sees.
// MASKED reads each position's mask byte of every head beside its key.
template <typename T, int D, int GROUP, bool MASKED>
__global__ void __launch_bounds__(kThreads, GROUP == 1 && !MASKED ? 5 : 1) decode_split_kernel(DecodeParams p) {
    constexpr int LANES_PER_KEY = D / 8;
    constexpr int KEYS_PER_WARP = 32 / LANES_PER_KEY;
    constexpr int KEYS_PER_STEP = kWarps * KEYS_PER_WARP;  // keys the block covers per unrolled slot
    constexpr int UNROLL = GROUP >= 4 ? 2 : 4;             // keys per thread in flight

    __shared__ float s_m[kWarps][GROUP], s_l[kWarps][GROUP];
    __shared__ float s_acc[kWarps][GROUP][D];

    wait_for_previous_grid();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int key_in_warp = lane / LANES_PER_KEY, d0 = (lane % LANES_PER_KEY) * 8;
    const int split = blockIdx.x, b = blockIdx.z;
    const int group_size = p.heads_q / p.heads_kv;
    const int tiles = ceil_div(group_size, GROUP);
    const int kvh = blockIdx.y / tiles, h0 = kvh * group_size + (blockIdx.y % tiles) * GROUP;
    const int heads = min(GROUP, kvh * group_size + group_size - h0);  // valid heads in this tile

    const int len = min(max(p.seqlens[b], 0), p.max_seqlen);
    const int per_split = ceil_div(len, p.num_splits);
    const int start = split * per_split, end = min(len, start + per_split);

    const T* k = static_cast<const T*>(p.k_cache) + b * p.stride_k_b + kvh * p.stride_k_h + d0;  // (Smax, D)
    const T* v = static_cast<const T*>(p.v_cache) + b * p.stride_v_b + kvh * p.stride_v_h + d0;  // (Smax, D)

    // The mask of the tile's heads; padding heads read the last one's, as their queries.
    const uint8_t* mask = MASKED ? p.mask + b * p.stride_mask_b + h0 * p.stride_mask_h : nullptr;

    float q[GROUP][8], m[GROUP], l[GROUP], acc[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const int h = min(h0 + g, h0 + heads - 1);  // padding heads repeat the last one, unwritten
        Vec<T, 8> qv = load_vec<T, 8>(static_cast<const T*>(p.q) + b * p.stride_q_b + h * p.stride_q_h + d0);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] = to_float(qv.v[j]) * p.scale * kLog2e;
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    }

    // The loop bound depends only on the warp, so shuffles below see the whole warp.
    for (int base = start + warp * KEYS_PER_WARP; base < end; base += UNROLL * KEYS_PER_STEP) {
        Vec<T, 8> kv[UNROLL], vv[UNROLL];
        [[maybe_unused]] bool hidden[GROUP][UNROLL];  // MASKED: the position is past `end` or hidden from head g
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int key = base + u * KEYS_PER_STEP + key_in_warp;
            if (key < end) {
                kv[u] = load_vec<T, 8>(k + key * p.stride_k_s);
                vv[u] = load_vec<T, 8>(v + key * p.stride_v_s);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) kv[u].v[j] = vv[u].v[j] = from_float<T>(0.0f);
            }
            if constexpr (MASKED) {
#pragma unroll
                for (int g = 0; g < GROUP; ++g)
                    hidden[g][u] = key >= end || mask[min(g, heads - 1) * p.stride_mask_h + key] == 0;
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float s[UNROLL], m_new = m[g];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                s[u] = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) s[u] += q[g][j] * to_float(kv[u].v[j]);
#pragma unroll
                for (int offset = LANES_PER_KEY / 2; offset > 0; offset >>= 1)
                    s[u] += __shfl_xor_sync(FULL_MASK, s[u], offset);
                bool unseen = base + u * KEYS_PER_STEP + key_in_warp >= end;
                if constexpr (MASKED) unseen = hidden[g][u];
                if (unseen) s[u] = -INFINITY;
                m_new = fmaxf(m_new, s[u]);
            }
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = exp2f(m[g] - m_use);
            l[g] *= alpha;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] *= alpha;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const float pr = exp2f(s[u] - m_use);
                l[g] += pr;
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g][j] += pr * to_float(vv[u].v[j]);
            }
            m[g] = m_new;
        }
    }

    merge_key_groups<GROUP, LANES_PER_KEY>(m, l, acc);
    if (key_in_warp == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
            for (int j = 0; j < 8; ++j) s_acc[warp][g][d0 + j] = acc[g][j];
            if (d0 == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    write_heads<T, D, GROUP>(p, s_m, s_l, s_acc, b, h0, heads, split);
    // The counter's index from values live here: blockIdx.y kept to this point spilled at 96 registers.
    if (p.num_splits > 1 && p.counters != nullptr)
        merge_splits_if_last<T>(p, b, h0, heads, int64_t(b) * p.heads_q + h0);
}

// Merges the splits of each (row, query head): one block per (row, head), a thread per element.
template <typename T>
__global__ void decode_combine_kernel(DecodeParams p) {
    wait_for_previous_grid();
    const int b = blockIdx.x / p.heads_q, h = blockIdx.x % p.heads_q;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x)
        write_merged<T>(p, blockIdx.x, d, b * p.stride_o_b + h * p.stride_o_h + d);
}

// ----------------------------------------------------------------------------- host dispatch

namespace {

int group_tile(int group_size) {
    int g = 1;
    while (g < group_size && g < kMaxGroup) g *= 2;
    return g;
}

template <typename T, int D, bool MASKED = false>
auto split_kernel(int tile) {
    switch (tile) {
        case 1: return decode_split_kernel<T, D, 1, MASKED>;
        case 2: return decode_split_kernel<T, D, 2, MASKED>;
        case 4: return decode_split_kernel<T, D, 4, MASKED>;
        default: return decode_split_kernel<T, D, 8, MASKED>;
    }
}

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
    const int group_size = p.heads_q / p.heads_kv, tile = group_tile(group_size);
    const dim3 grid(p.num_splits, p.heads_kv * ceil_div(group_size, tile), p.batch);
    const auto kernel = p.mask != nullptr ? split_kernel<T, D, true>(tile) : split_kernel<T, D>(tile);
    cudaError_t err = launch_kernel(kernel, grid, kThreads, 0, stream, p.pdl, p);
    if (err != cudaSuccess || p.num_splits == 1 || p.counters != nullptr) return err;
    const dim3 rows(p.batch * p.heads_q), threads(std::min(p.head_dim, 128));
    return launch_kernel(decode_combine_kernel<T>, rows, threads, 0, stream, p.pdl, p);
}

template <typename T>
cudaError_t launch_dim(const DecodeParams& p, cudaStream_t stream) {
    switch (p.head_dim) {
        case 64: return launch<T, 64>(p, stream);
        case 128: return launch<T, 128>(p, stream);
    }
    return cudaErrorInvalidValue;
}

// Split-kernel blocks of one configuration that an SM holds at once (registers, shared memory).
template <typename T, int D>
cudaError_t resident_blocks(int tile, bool masked, int* blocks) {
    const auto kernel = masked ? split_kernel<T, D, true>(tile) : split_kernel<T, D>(tile);
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, 0);
}

}  // namespace

// The fewest splits whose grid fills its last wave over the GPU (sm_count * blocks_per_sm blocks
// run at a time) to kWaveFill or more; where no split count gets there (a grid short of one
// wave even at the most splits), the split count with the fullest wave. No split is shorter than
// kMinKeysPerSplit positions of the cache, and there are at most kMaxSplits. A grid of 1.45
// waves (B64 H12 in one split on an H200: 768 blocks, 4 an SM) leaves a third of the second
// wave's slots idle while its blocks stream their whole rows. Depends on shapes and the GPU only
// (the lengths live on the device), so a CUDA graph captured once stays valid.
int decode_num_splits(int batch, int heads_q, int heads_kv, int max_seqlen, int sm_count, int blocks_per_sm) {
    const int group_size = heads_q / heads_kv;
    const int64_t blocks = int64_t(batch) * heads_kv * ceil_div(group_size, group_tile(group_size));
    const int64_t slots = int64_t(sm_count) * std::max(blocks_per_sm, 1);
    const int most = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(max_seqlen, kMinKeysPerSplit), kMaxSplits));
    int best = 1;
    int64_t best_num = 0, best_den = 1;  // the best fill so far, best_num / best_den
    for (int s = 1; s <= most; ++s) {
        const int64_t grid = blocks * s, waves = ceil_div(grid, slots);
        if (kWaveFill[1] * grid >= kWaveFill[0] * waves * slots) return s;
        if (grid * best_den > best_num * waves * slots) best = s, best_num = grid, best_den = waves * slots;
    }
    return best;
}

cudaError_t decode_blocks_per_sm(DType dtype, int head_dim, int heads_q, int heads_kv, bool masked, int* blocks) {
    const int tile = group_tile(heads_q / heads_kv);
    *blocks = 0;
    switch (dtype) {
        case DType::kFloat16:
            return head_dim == 64 ? resident_blocks<__half, 64>(tile, masked, blocks)
                                  : resident_blocks<__half, 128>(tile, masked, blocks);
        case DType::kBFloat16:
            return head_dim == 64 ? resident_blocks<__nv_bfloat16, 64>(tile, masked, blocks)
                                  : resident_blocks<__nv_bfloat16, 128>(tile, masked, blocks);
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t decode_attention_forward(const DecodeParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case DType::kFloat16: return launch_dim<__half>(p, stream);
        case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace fastgpt
