// Decode attention: Sq query tokens per (row, head) over a static KV cache, split-KV. Sq is 1 in
// a decode step; more for speculative decoding's drafts or a prompt's chunk, the row's last Sq
// positions: query i of row b stands at position len - Sq + i and, causal, sees positions
// j <= len - Sq + i (all j < len otherwise).
//
// The "rows" of a kv head are its (query head, query) pairs, flattened p = g * Sq + i over the
// group_size * Sq pairs, whose flat (b, h, i) indices are consecutive. decode_split_kernel: block
// (split, kv head and row tile, batch row) attends its GROUP rows (sharing one read of the kv
// head: GQA, and the queries of a head) to its share of the row's valid positions [0, len). With
// one split it writes the output directly; otherwise it writes a normalised partial output and
// its log-sum-exp, and the splits are merged: given the caller's counters, by the last block of
// each (batch row, tile) to finish (one launch), else by decode_combine_kernel. Given p.lse, each
// query's log-sum-exp is stored beside its output (natural log). Given p.mask (transformers'
// padded decode steps), a position it hides from a (head, query) is one that query does not see.
// A query that sees no position gets zeros and an lse of -inf.
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
// No split shorter than this: the Triton kernel's rule (two 64-key blocks), with which it took
// 4.6 us at B1 H12 L1024 on an H200 (8 splits, 96 programs) where this kernel took 7.9-12.7 with
// 256 (4 splits, 48 blocks); 128 keys are this kernel's cp.async steps in flight (4 of 32 keys at
// D 64), one round trip a split. Not measured on a GPU.
constexpr int kMinKeysPerSplit = 128;
// decode_split_kernel's steps of keys in shared memory (cp.async): 32 KB a block (4 KB a step of
// k and v), 24 with a tile of 8 rows, whose partial states take 16 KB more at D 128 (static
// shared memory stops at 48 KB).
template <int GROUP>
constexpr int kStages = GROUP >= 8 ? 3 : 4;
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

// Merges the warp's GROUP running states over its key groups (merge_key_groups) and stores them
// as warp `warp`'s states in shared memory for write_rows: key group 0's lanes store acc, each its
// 8 elements from d0, and its first lane m and l.
template <int D, int GROUP, int LANES_PER_KEY>
__device__ __forceinline__ void store_warp_states(float (&m)[GROUP], float (&l)[GROUP], float (&acc)[GROUP][8],
                                                  int warp, int key_in_warp, int d0, float (&s_m)[kWarps][GROUP],
                                                  float (&s_l)[kWarps][GROUP], float (&s_acc)[kWarps][GROUP][D]) {
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
}

// Element d of flat row `row` = (b * Hq + h) * Sq + i merged from its splits' partial outputs,
// and the row's log-sum-exp over them (log2 domain):
//   o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),  lse = M + log2 sum_s 2^(lse_s - M),  M = max_s lse_s
// o = 0 and lse = -inf where every split was empty (M = -inf), NaN where a split's is (M is then
// NaN). The loads go to L2 (.cg): other blocks, on other SMs, may have written the partials in
// this same launch.
struct Merged {
    float o, lse;
};

__device__ __forceinline__ Merged merged_split_output(const DecodeParams& p, int64_t row, int d) {
    const float* lse = p.lse_partial + row * p.num_splits;                  // (num_splits,)
    const float* o = p.o_partial + row * p.num_splits * p.head_dim + d;  // (num_splits,) at stride D
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

// Writes element d of flat row `row` merged from its splits, and with p.lse its log-sum-exp
// (natural log) once (d == 0).
template <typename T>
__device__ __forceinline__ void write_merged(const DecodeParams& p, int64_t row, int d) {
    const Merged merged = merged_split_output(p, row, d);
    static_cast<T*>(p.o)[row * p.head_dim + d] = from_float<T>(merged.o);
    if (p.lse != nullptr && d == 0) p.lse[row] = merged.lse * kLn2;
}

// Merges the kWarps states of each of the tile's `rows` rows from flat row row0 (one thread per
// (row, d)) and writes its output, or with several splits its partial output and log-sum-exp.
template <typename T, int D, int GROUP>
__device__ __forceinline__ void write_rows(const DecodeParams& p, const float (&s_m)[kWarps][GROUP],
                                           const float (&s_l)[kWarps][GROUP], const float (&s_acc)[kWarps][GROUP][D],
                                           int64_t row0, int rows, int split) {
    for (int i = threadIdx.x; i < rows * D; i += kThreads) {
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
        const int64_t row = row0 + g;
        if (p.num_splits == 1) {
            static_cast<T*>(p.o)[row * D + d] = from_float<T>(o);
            if (p.lse != nullptr && d == 0) p.lse[row] = lse * kLn2;
        } else {
            const int64_t at = row * p.num_splits + split;
            p.o_partial[at * D + d] = o;
            if (d == 0) p.lse_partial[at] = lse;
        }
    }
}

// With the caller's counters (zero between launches; a tile counts at its first flat row, row0):
// the block whose split finishes last among its tile's splits merges them into o for the tile's
// `rows` rows from row0, and zeroes the counter again for the next launch.
template <typename T>
__device__ void merge_splits_if_last(const DecodeParams& p, int64_t row0, int rows) {
    __threadfence();  // this thread's partials are visible device-wide before the count says so
    __syncthreads();
    int last = 0;
    if (threadIdx.x == 0) {
        last = atomicAdd(p.counters + row0, 1) == p.num_splits - 1;
        if (last) p.counters[row0] = 0;  // every other split of the tile has counted already
    }
    if (!__syncthreads_or(last)) return;
    __threadfence();  // and the other blocks' partials are seen after it
    for (int i = threadIdx.x; i < rows * p.head_dim; i += blockDim.x)
        write_merged<T>(p, row0 + i / p.head_dim, i % p.head_dim);
}

}  // namespace

// For row r (one of GROUP (query head, query) pairs sharing kv head kvh) and positions j in
// [start, end) that it sees:
//   s_j = (q_r . k_j) * scale * log2(e),   o_r = sum_j 2^(s_j - m) v_j / sum_j 2^(s_j - m)
// with m = max_j s_j, accumulated online. Thread layout: D / 8 lanes ("a key group") split one
// key's head dim into 16-byte chunks; the block's 4 * 32 / (D / 8) key groups take interleaved
// keys, and their running (m, l, acc) states are merged by shuffles, then across warps in
// shared memory.
// MASKED reads each position's mask byte of every row beside its key. MULTI (Sq > 1) keeps each
// row's own limit (causal) and runs the keys to the tile's largest; without it (a decode step)
// every row sees [start, end) and the code is the one-query kernel's.
//
// The keys stream through shared memory, STAGES steps of UNROLL keys a thread deep: each thread
// copies (cp.async, 16 bytes) the chunks of k and v it will score and reads back only those, so
// its own cp.async groups order the two and no barrier is needed; while it scores one step, the
// next STAGES - 1 are in flight (each block's bytes in flight are what the memory system sees;
// loads of a step straight into registers left none in flight while it was scored). One query
// head a block (MHA, Sq == 1): 64 registers on sm_90a (the bound of 5 blocks an SM dates from the
// registers' 96 then) and 34 KB of shared memory, 6 blocks an SM on an H200. Not measured on a
// GPU against the register version (gpu-probe's decode_batch and the benchmark's cuda rows).
template <typename T, int D, int GROUP, bool MASKED, bool MULTI>
__global__ void __launch_bounds__(kThreads, GROUP == 1 && !MASKED ? 5 : 1) decode_split_kernel(DecodeParams p) {
    constexpr int LANES_PER_KEY = D / 8;
    constexpr int KEYS_PER_WARP = 32 / LANES_PER_KEY;
    constexpr int KEYS_PER_STEP = kWarps * KEYS_PER_WARP;  // keys the block covers per unrolled slot
    constexpr int UNROLL = 2;                              // keys per thread a step
    constexpr int STAGES = kStages<GROUP>;

    __shared__ float s_m[kWarps][GROUP], s_l[kWarps][GROUP];
    __shared__ float s_acc[kWarps][GROUP][D];
    __shared__ Vec<T, 8> s_kv[STAGES][2][UNROLL][kThreads];  // a thread's chunks of k (0) and v (1) a step

    wait_for_previous_grid();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int key_in_warp = lane / LANES_PER_KEY, d0 = (lane % LANES_PER_KEY) * 8;
    const int split = blockIdx.x, b = blockIdx.z;
    const int group_size = p.heads_q / p.heads_kv, sq = MULTI ? p.seqlen_q : 1;
    const int tiles = ceil_div(group_size * sq, GROUP);
    const int kvh = blockIdx.y / tiles;
    // The tile's first row within the batch row, h * Sq + i: its rows are consecutive ones there.
    const int first = kvh * group_size * sq + (blockIdx.y % tiles) * GROUP;
    const int rows = min(GROUP, (kvh + 1) * group_size * sq - first);  // valid rows in this tile

    const int len = min(max(p.seqlens[b], 0), p.max_seqlen);
    const int per_split = ceil_div(len, p.num_splits);
    const int start = split * per_split, split_end = min(len, start + per_split);

    const T* k = static_cast<const T*>(p.k_cache) + b * p.stride_k_b + kvh * p.stride_k_h + d0;  // (Smax, D)
    const T* v = static_cast<const T*>(p.v_cache) + b * p.stride_v_b + kvh * p.stride_v_h + d0;  // (Smax, D)

    float q[GROUP][8], m[GROUP], l[GROUP], acc[GROUP][8];
    // MASKED: row g's mask over the positions; with one query, row 0's only (row g's is g heads on).
    [[maybe_unused]] const uint8_t* mask[GROUP];
    if constexpr (MASKED && !MULTI) mask[0] = p.mask + b * p.stride_mask_b + first * p.stride_mask_h;
    [[maybe_unused]] int limit[GROUP];            // MULTI: row g sees the positions before limit[g]
    int end = MULTI ? start : split_end;          // the keys loaded: up to the tile's largest limit
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const int row = first + min(g, rows - 1);  // padding rows repeat the last one, unwritten
        const int h = row / sq, i = row % sq;
        Vec<T, 8> qv = load_vec<T, 8>(static_cast<const T*>(p.q) + b * p.stride_q_b + h * p.stride_q_h +
                                      i * p.stride_q_s + d0);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[g][j] = to_float(qv.v[j]) * p.scale * kLog2e;
        if constexpr (MASKED && MULTI)
            mask[g] = p.mask + b * p.stride_mask_b + h * p.stride_mask_h + i * p.stride_mask_s;
        if constexpr (MULTI) {
            limit[g] = min(split_end, p.causal ? len - sq + 1 + i : len);
            end = max(end, limit[g]);
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    }

    // Step i covers keys base_i + u * KEYS_PER_STEP + key_in_warp (u < UNROLL), base_i = first + i * STEP;
    // its chunks go to stage i % STAGES, as one cp.async group (empty past end).
    constexpr int STEP = UNROLL * KEYS_PER_STEP;
    const int first_base = start + warp * KEYS_PER_WARP;
    auto fetch = [&](int base, int stage) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int key = base + u * KEYS_PER_STEP + key_in_warp;
            if (key < end) {
                cp_async_16(&s_kv[stage][0][u][threadIdx.x], k + key * p.stride_k_s, 16);
                cp_async_16(&s_kv[stage][1][u][threadIdx.x], v + key * p.stride_v_s, 16);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) fetch(first_base + i * STEP, i);

    // The loop bound depends only on the warp, so shuffles below see the whole warp.
    for (int base = first_base, i = 0; base < end; base += STEP, ++i) {
        fetch(base + (STAGES - 1) * STEP, (i + STAGES - 1) % STAGES);
        cp_async_wait<STAGES - 1>();  // every group but the newest STAGES - 1: step i's is in
        Vec<T, 8> kv[UNROLL], vv[UNROLL];
        [[maybe_unused]] bool hidden[GROUP][UNROLL];  // MASKED: the position is past row g's limit or hidden from it
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int key = base + u * KEYS_PER_STEP + key_in_warp;
            if (key < end) {
                kv[u] = s_kv[i % STAGES][0][u][threadIdx.x];
                vv[u] = s_kv[i % STAGES][1][u][threadIdx.x];
            } else {  // not fetched: zeros (its score is -inf, and 0 times a stale NaN would be NaN)
#pragma unroll
                for (int j = 0; j < 8; ++j) kv[u].v[j] = vv[u].v[j] = from_float<T>(0.0f);
            }
            if constexpr (MASKED) {
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    const uint8_t* row = MULTI ? mask[g] : mask[0] + min(g, rows - 1) * p.stride_mask_h;
                    hidden[g][u] = key >= (MULTI ? limit[g] : end) || row[key] == 0;
                }
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
                bool unseen = base + u * KEYS_PER_STEP + key_in_warp >= (MULTI ? limit[g] : end);
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
    cp_async_wait<0>();  // the steps fetched past the end copied nothing, but are groups still open

    store_warp_states<D, GROUP, LANES_PER_KEY>(m, l, acc, warp, key_in_warp, d0, s_m, s_l, s_acc);
    __syncthreads();

    // Taken from values live here: blockIdx.y kept to this point spilled the MHA kernel at 96
    // registers, and so did row0 taken before the loop.
    const int64_t row0 = int64_t(b) * p.heads_q * sq + first;
    write_rows<T, D, GROUP>(p, s_m, s_l, s_acc, row0, rows, split);
    if (p.num_splits > 1 && p.counters != nullptr) merge_splits_if_last<T>(p, row0, rows);
}

// Merges the splits of each flat (row, query head, query) row: one block a row, a thread per element.
template <typename T>
__global__ void decode_combine_kernel(DecodeParams p) {
    wait_for_previous_grid();
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) write_merged<T>(p, blockIdx.x, d);
}

// ----------------------------------------------------------------------------- host dispatch

namespace {

// Rows a block takes: a kv head's (query head, query) pairs, up to kMaxGroup, a power of two.
int group_tile(int64_t pairs) {
    int g = 1;
    while (g < pairs && g < kMaxGroup) g *= 2;
    return g;
}

// The split kernel for a tile of `tile` rows; with several queries (MULTI) a tile is never 1 row.
template <typename T, int D, bool MASKED, bool MULTI>
auto split_kernel(int tile) {
    switch (tile) {
        case 1: return decode_split_kernel<T, D, MULTI ? 2 : 1, MASKED, MULTI>;
        case 2: return decode_split_kernel<T, D, 2, MASKED, MULTI>;
        case 4: return decode_split_kernel<T, D, 4, MASKED, MULTI>;
        default: return decode_split_kernel<T, D, 8, MASKED, MULTI>;
    }
}

template <typename T, int D>
auto split_kernel(int tile, bool masked, bool multi) {
    if (multi) return masked ? split_kernel<T, D, true, true>(tile) : split_kernel<T, D, false, true>(tile);
    return masked ? split_kernel<T, D, true, false>(tile) : split_kernel<T, D, false, false>(tile);
}

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
    const int pairs = p.heads_q / p.heads_kv * p.seqlen_q, tile = group_tile(pairs);
    const dim3 grid(p.num_splits, p.heads_kv * ceil_div(pairs, tile), p.batch);
    const auto kernel = split_kernel<T, D>(tile, p.mask != nullptr, p.seqlen_q > 1);
    cudaError_t err = launch_kernel(kernel, grid, kThreads, 0, stream, p.pdl, p);
    if (err != cudaSuccess || p.num_splits == 1 || p.counters != nullptr) return err;
    const dim3 rows(p.batch * p.heads_q * p.seqlen_q), threads(std::min(p.head_dim, 128));
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
cudaError_t resident_blocks(int tile, bool masked, bool multi, int* blocks) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, split_kernel<T, D>(tile, masked, multi), kThreads, 0);
}

}  // namespace

int64_t decode_tiles(int heads_q, int heads_kv, int seqlen_q) {
    const int64_t pairs = int64_t(heads_q / heads_kv) * seqlen_q;
    return heads_kv * ceil_div<int64_t>(pairs, group_tile(pairs));
}

// The fewest splits whose grid fills its last wave over the GPU (sm_count * blocks_per_sm blocks
// run at a time) to kWaveFill or more; where no split count gets there (a grid short of one
// wave even at the most splits), the split count with the fullest wave. No split is shorter than
// kMinKeysPerSplit positions of the cache, and there are at most kMaxSplits. A grid of 1.45
// waves (B64 H12 in one split on an H200: 768 blocks, 4 an SM) leaves a third of the second
// wave's slots idle while its blocks stream their whole rows. Depends on shapes and the GPU only
// (the lengths live on the device), so a CUDA graph captured once stays valid.
int decode_num_splits(int batch, int heads_q, int heads_kv, int seqlen_q, int max_seqlen, int sm_count,
                      int blocks_per_sm) {
    const int64_t blocks = batch * decode_tiles(heads_q, heads_kv, seqlen_q);
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

cudaError_t decode_blocks_per_sm(DType dtype, int head_dim, int heads_q, int heads_kv, int seqlen_q, bool masked,
                                 int* blocks) {
    const int tile = group_tile(int64_t(heads_q / heads_kv) * seqlen_q);
    const bool multi = seqlen_q > 1;
    *blocks = 0;
    switch (dtype) {
        case DType::kFloat16:
            return head_dim == 64 ? resident_blocks<__half, 64>(tile, masked, multi, blocks)
                                  : resident_blocks<__half, 128>(tile, masked, multi, blocks);
        case DType::kBFloat16:
            return head_dim == 64 ? resident_blocks<__nv_bfloat16, 64>(tile, masked, multi, blocks)
                                  : resident_blocks<__nv_bfloat16, 128>(tile, masked, multi, blocks);
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
