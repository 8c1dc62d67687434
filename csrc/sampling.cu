// Sampling without sorting: temperature -> top-k -> top-p -> min-p -> draw, one block per row.
//
// Every filter keeps the tokens whose score is >= a threshold, so the kernel finds thresholds,
// never orders the vocabulary:
//   - top-k: the k-th largest score, by a radix select over the scores' order-preserving 32-bit
//     keys (4 passes of 8 bits, histograms in shared memory); ties with it are kept (as HF);
//   - top-p: the smallest score v whose cumulative probability mass of scores <= v exceeds
//     1 - top_p, by the same radix select with each token weighing exp(s - max) in 2^-40 fixed
//     point (integer sums: the result does not depend on the order of the atomics). HF removes
//     sorted tokens whose cumulative mass is <= 1 - top_p; tokens tied at the boundary value are
//     all kept here (a sort would keep an arbitrary subset of them);
//   - min-p: exp(s - max) >= min_p (prob >= min_p * max prob), no pass needed.
// The draw is Gumbel-max: argmax over kept tokens of s + G, G = -log(-log(u)), u from Philox4x32-10
// keyed by the device seed, counter (token / 4, row). Greedy rows (temperature <= 0) take the
// first index of the largest cleaned logit. Built without fast math: the division by the
// temperature and the logs must round as torch does.
//
// The candidate path (SampleParams::cand_k > 0: the caller bounds every row's top_k below it):
// a row's kept set then lies among its cand_k best scores, which two kernels find by bitonic
// sorts instead of passes over the row. candidates_kernel sorts each kCandBlock-wide chunk of a
// row in shared memory and keeps its best cand_k entries, packed as (key << 32 | V - 1 - index)
// (distinct; ties rank the lower index first); candidate_draw_kernel merges a row's chunks into
// its best cand_k, in order, and runs the filters and the draw on that list alone, with the same
// fixed-point weights and the same Philox counters: the same tokens as one block per row. Rows
// the list does not cover (top-k off, or at or above cand_k, a tie group running past the list,
// +inf scores) run the one-block-per-row code in the same block.
// Every kernel waits for the previous grid before touching memory, so that on sm_90 and later they
// launch as programmatic dependents (common.cuh's launch_kernel) inside a decode step.
#include "common.cuh"

namespace fastgpt {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;
constexpr float kFixedOne = 1099511627776.0f;  // 2^40: the weight of the largest score

// --------------------------------------------------------------------------- Philox4x32-10

struct Philox4 {
    uint32_t x[4];
};

// Random123's Philox4x32 with 10 rounds: each round multiplies two counter words by fixed odd
// constants, mixes the high/low halves with the other words and the key, and bumps the key by
// the Weyl constants.
__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                 uint32_t k1) {
    constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
        const uint32_t hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += W0;
        k1 += W1;
    }
    return {{c0, c1, c2, c3}};
}

// The top 23 bits of r as a float strictly inside (0, 1): (r / 2^9 + 0.5) / 2^23, exact in fp32.
// With 24 bits the largest value, 2^24 - 0.5, rounds to 2^24 and gives u = 1.0: the Gumbel noise
// -log(-log(1)) is then +inf and that token wins whatever its probability (as reference.unit_float).
__device__ __forceinline__ float uniform_from_bits(uint32_t r) { return (float(r >> 9) + 0.5f) * (1.0f / 8388608.0f); }

// --------------------------------------------------------------------------- scores and keys

// Monotone map from floats (no NaN) to uint32: a < b as floats <=> key(a) < key(b) as integers.
// -0.0 is folded into +0.0 first so that equal floats get equal keys.
__device__ __forceinline__ uint32_t order_key(float s) {
    if (s == 0.0f) s = 0.0f;
    const uint32_t bits = __float_as_uint(s);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One row of logits with reference.clean_logits applied and divided by the temperature:
// NaN -> -inf. On a row whose top score is +inf (ties_only: it holds +inf logits, or its largest
// x / t overflows), the entries equal to its largest logit max_x -> 0 and everything else -inf:
// softmax's limit, exact under an overflow (reference.top_ties_if_overflow).
template <typename T>
struct Row {
    const T* logits;  // (V,)
    int vocab;
    bool ties_only;
    float max_x;
    float temperature;

    __device__ __forceinline__ float clean(int i) const {
        float x = to_float(logits[i]);
        if (x != x) return -INFINITY;
        if (ties_only) return x == max_x ? 0.0f : -INFINITY;
        return x;
    }
    __device__ __forceinline__ float score(int i) const {
        const float s = clean(i) / temperature;
        return s != s ? -INFINITY : s;
    }
};

// --------------------------------------------------------------------------- block reductions

struct Shared {
    unsigned long long hist[kBins];
    unsigned long long warp_totals[kWarps];
    float best_value[kWarps];
    int best_index[kWarps];
    int select_bin;
    unsigned long long select_below;
};

// (value, index) with the larger value winning, the smaller index on ties.
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ void block_argmax(float& v, int& i, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        better(v, i, __shfl_xor_sync(FULL_MASK, v, offset), __shfl_xor_sync(FULL_MASK, i, offset));
    if (lane == 0) {
        sh.best_value[warp] = v;
        sh.best_index[warp] = i;
    }
    __syncthreads();
    v = sh.best_value[0];
    i = sh.best_index[0];
    for (int w = 1; w < kWarps; ++w) better(v, i, sh.best_value[w], sh.best_index[w]);
    __syncthreads();
}

// --------------------------------------------------------------------------- radix select

// Finds the bin where the running sum of sh.hist, taken in scan order (bins 255 -> 0 when
// descending, 0 -> 255 otherwise), first exceeds `target`; sets sh.select_bin and
// sh.select_below (the sum of the bins before it in scan order). Threads 0..255 scan one bin each.
__device__ void find_bin(unsigned long long target, bool descending, Shared& sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int bin = descending ? kBins - 1 - tid : tid;
    unsigned long long own = tid < kBins ? sh.hist[bin] : 0, incl = own;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned long long up = __shfl_up_sync(FULL_MASK, incl, offset);
        if (lane >= offset) incl += up;
    }
    if (lane == 31) sh.warp_totals[warp] = incl;
    if (tid == 0) {
        sh.select_bin = descending ? 0 : kBins - 1;  // not reached when target < the total
        sh.select_below = 0;
    }
    __syncthreads();
    for (int w = 0; w < warp; ++w) incl += sh.warp_totals[w];
    if (tid < kBins && incl > target && incl - own <= target) {
        sh.select_bin = bin;
        sh.select_below = incl - own;
    }
    __syncthreads();
}

// Radix select over the 32-bit keys of the eligible tokens of a row. `element(i, key, weight)`
// returns whether token i is eligible and sets its key and weight (weight 1 when !WEIGHTED).
// Returns the key K where the weight accumulated in scan order first exceeds `target`:
//   descending: the largest K with weight(keys >= K) > target (target = k - 1: the k-th largest);
//   ascending:  the smallest K with weight(keys <= K) > target.
// Requires target < the total eligible weight.
template <bool WEIGHTED, typename Element>
__device__ uint32_t radix_select(int vocab, const Element& element, unsigned long long target, bool descending,
                                 Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const uint32_t high_mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
        __syncthreads();
        // Warp-uniform loop so that the warp-wide intrinsics below see all 32 lanes.
        for (int base = warp * 32; base < vocab; base += kThreads) {
            const int i = base + lane;
            uint32_t key = 0;
            unsigned long long weight = 0;
            const bool valid = i < vocab && element(i, key, weight) && (key & high_mask) == prefix;
            const int bin = valid ? int((key >> shift) & 0xFFu) : kBins;
            const unsigned peers = __match_any_sync(FULL_MASK, bin);  // lanes sharing this bin
            if (!WEIGHTED) {
                if (bin < kBins && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], (unsigned long long)__popc(peers));
            } else if (peers == FULL_MASK) {  // same for every lane: the whole warp in one bin
                weight = warp_sum(weight);
                if (bin < kBins && lane == 0) atomicAdd(&sh.hist[bin], weight);
            } else if (bin < kBins && weight != 0) {
                atomicAdd(&sh.hist[bin], weight);
            }
        }
        __syncthreads();
        find_bin(target, descending, sh);
        prefix |= uint32_t(sh.select_bin) << shift;
        target -= sh.select_below;
    }
    return prefix;
}

// Row-wide facts from one pass: the first index of the largest logit (NaN as -inf) and whether
// the row holds +inf.
template <typename T>
__device__ void row_max(const T* logits, int vocab, float& max_value, int& max_index, bool& has_pos_inf, Shared& sh) {
    float v = -INFINITY;
    int idx = vocab;
    int pos_inf = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = to_float(logits[i]);
        if (x != x) x = -INFINITY;
        pos_inf |= x == INFINITY;
        better(v, idx, x, i);
    }
    has_pos_inf = __syncthreads_or(pos_inf) != 0;
    block_argmax(v, idx, sh);
    max_value = v;
    max_index = min(idx, vocab - 1);
}

}  // namespace

// Row b, by the whole block: out[b] = greedy ? argmax(clean(logits)) : Gumbel-max draw over the
// tokens that survive top-k, top-p and min-p (see the file comment); 0 when nothing can be drawn.
template <typename T>
__device__ void sample_row(const SampleParams& p, int b, Shared& sh) {
    const int V = p.vocab;
    const T* logits = static_cast<const T*>(p.logits) + b * p.stride_logits;  // (V,)

    float max_x;
    int argmax;
    bool has_pos_inf;
    row_max(logits, V, max_x, argmax, has_pos_inf, sh);
    const float temperature = p.temperature[b];
    const bool ties_only = has_pos_inf || max_x / temperature == INFINITY;
    const Row<T> row{logits, V, ties_only, max_x, temperature};
    const float m = ties_only ? 0.0f : max_x / temperature;  // the largest score
    // Greedy (temperature <= 0 or NaN), or nothing finite to draw from -> the argmax (0 for an
    // all -inf row).
    if (!(temperature > 0.0f) || !(m > -INFINITY)) {
        if (threadIdx.x == 0) p.out[b] = argmax;  // the first index, 0, for an all -inf row
        return;
    }

    // top-k, clamped: <= 0 or >= V means off.
    const int64_t top_k = p.top_k[b];
    uint32_t threshold = 0;  // keep tokens whose key >= threshold
    if (top_k > 0 && top_k < V) {
        auto all = [&](int i, uint32_t& key, unsigned long long& weight) {
            key = order_key(row.score(i));
            weight = 1;
            return true;
        };
        threshold = radix_select<false>(V, all, (unsigned long long)(top_k - 1), true, sh);
    }

    // top-p, clamped to (0, 1]: 1 (or NaN) means off; <= 0 keeps only the largest scores.
    const double top_p = p.top_p[b];
    if (top_p < 1.0) {
        const float cut = float(1.0 - (top_p > 0.0 ? top_p : 0.0));  // HF: 1 - top_p rounded to fp32
        auto kept = [&](int i, uint32_t& key, unsigned long long& weight) {
            const float s = row.score(i);
            key = order_key(s);
            weight = __float2ull_rn(expf(s - m) * kFixedOne);
            return key >= threshold;
        };
        unsigned long long total = 0;
        for (int i = threadIdx.x; i < V; i += kThreads) {
            uint32_t key;
            unsigned long long weight;
            if (kept(i, key, weight)) total += weight;
        }
        total = block_sum(total, sh.warp_totals);  // >= 2^40: the largest score weighs 2^40
        const double cut_mass = floor(double(cut) * double(total));
        const unsigned long long target = cut_mass >= double(total - 1) ? total - 1 : (unsigned long long)cut_mass;
        threshold = radix_select<true>(V, kept, target, false, sh);
    }

    // min-p, clamped to [0, 1] (NaN means off).
    const float min_p = fminf(fmaxf(p.min_p[b], 0.0f), 1.0f);

    // Gumbel-max draw; each thread takes groups of 4 consecutive tokens (one Philox call).
    const uint64_t seed = static_cast<uint64_t>(p.seed[0]);
    float best = -INFINITY;
    int best_index = V;
    for (int group = threadIdx.x; group * 4 < V; group += kThreads) {
        const Philox4 r = philox4x32_10(uint32_t(group), uint32_t(b), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = group * 4 + j;
            if (i >= V) break;
            const float s = row.score(i);
            if (order_key(s) < threshold || s == -INFINITY) continue;
            if (min_p > 0.0f && expf(s - m) < min_p) continue;
            const float gumbel = -logf(-logf(uniform_from_bits(r.x[j])));
            better(best, best_index, s + gumbel, i);
        }
    }
    block_argmax(best, best_index, sh);
    if (threadIdx.x == 0) p.out[b] = best_index < V ? best_index : 0;
}

// Gumbel noise of token i of row b: the draw's counter (i / 4, b), word i % 4.
__device__ __forceinline__ float gumbel_noise(uint64_t seed, int i, int b) {
    const Philox4 r = philox4x32_10(uint32_t(i / 4), uint32_t(b), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
    return -logf(-logf(uniform_from_bits(r.x[i % 4])));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleParams p) {
    __shared__ Shared sh;
    wait_for_previous_grid();
    sample_row<T>(p, blockIdx.x, sh);
}

// --------------------------------------------------------------------------- the candidate path

constexpr int kCandThreads = 256;
constexpr int kCandBlock = 1024;   // vocabulary entries per block of candidates_kernel (>= 4 x cand_k)
constexpr int kMergeBlock = 2048;  // entries per sort of candidate_draw_kernel: its best so far, then new ones

__device__ __forceinline__ uint64_t pack(uint32_t key, int i, int vocab) {
    return (uint64_t(key) << 32) | uint32_t(vocab - 1 - i);
}
__device__ __forceinline__ uint32_t packed_key(uint64_t e) { return uint32_t(e >> 32); }
__device__ __forceinline__ int packed_index(uint64_t e, int vocab) { return vocab - 1 - int(uint32_t(e)); }
// The score whose order_key is `key` (order_key is a bijection on floats other than -0.0 and NaN).
__device__ __forceinline__ float key_score(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// Sorts a[0, n) in descending order, n a power of two, by the whole block (bitonic network).
__device__ void bitonic_sort_descending(uint64_t* a, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
                const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;  // t with a 0 bit at `stride`
                const bool descending = (lo & size) == 0;  // the last merge (size == n): all descending
                const uint64_t x = a[lo], y = a[hi];
                if ((x < y) == descending) {
                    a[lo] = y;
                    a[hi] = x;
                }
            }
        }
    }
    __syncthreads();
}

// Block (b, c) of a grid of B * chunks: the best cand_k packed entries of chunk c of row b, in
// descending order, to cand[(b * chunks + c) * cand_k, ...); 0 pads past the end of the row.
template <typename T>
__global__ void __launch_bounds__(kCandThreads) candidates_kernel(SampleParams p, int chunks) {
    __shared__ uint64_t entries[kCandBlock];
    wait_for_previous_grid();
    const int b = blockIdx.x / chunks, c = blockIdx.x % chunks, V = p.vocab;
    const T* logits = static_cast<const T*>(p.logits) + b * p.stride_logits;
    const float t = p.temperature[b];
    const float temperature = t > 0.0f ? t : 1.0f;  // greedy rows: the scores are the logits
    for (int j = threadIdx.x; j < kCandBlock; j += kCandThreads) {
        const int i = c * kCandBlock + j;
        uint64_t e = 0;
        if (i < V) {
            float x = to_float(logits[i]);
            if (x != x) x = -INFINITY;
            float s = x / temperature;
            if (s != s) s = -INFINITY;
            e = pack(order_key(s), i, V);
        }
        entries[j] = e;
    }
    bitonic_sort_descending(entries, kCandBlock);
    uint64_t* out = p.candidates + (int64_t(b) * chunks + c) * p.cand_k;
    for (int j = threadIdx.x; j < p.cand_k; j += kCandThreads) out[j] = entries[j];
}

// Row b: its best cand_k entries from its chunks' lists, then the filters and the draw on them.
template <typename T>
__global__ void __launch_bounds__(kThreads) candidate_draw_kernel(SampleParams p, int chunks) {
    __shared__ uint64_t best[kMergeBlock];  // [0, K): the best so far, in order; then the next candidates
    __shared__ Shared sh;
    wait_for_previous_grid();
    const int b = blockIdx.x, V = p.vocab, K = p.cand_k, tid = threadIdx.x;
    const int64_t num = int64_t(chunks) * K;
    const uint64_t* cand = p.candidates + b * num;
    for (int j = tid; j < K; j += kThreads) best[j] = 0;
    for (int64_t start = 0; start < num; start += kMergeBlock - K) {
        for (int j = tid; j < kMergeBlock - K; j += kThreads) best[K + j] = start + j < num ? cand[start + j] : 0;
        bitonic_sort_descending(best, kMergeBlock);  // barriers before and after
    }
    const int top_index = packed_index(best[0], V);
    const float m = key_score(packed_key(best[0]));  // the largest score
    const float temperature = p.temperature[b];
    if (!(temperature > 0.0f)) {  // greedy: the first index of the largest logit (0 when all are -inf)
        if (tid == 0) p.out[b] = top_index;
        return;
    }
    const int64_t top_k = p.top_k[b];
    uint32_t threshold = 0;  // keep keys >= threshold
    bool covered;
    if (top_k > 0 && top_k < V) {
        covered = top_k < K;
        if (covered) {
            threshold = packed_key(best[top_k - 1]);  // the k-th largest key, ties counted
            covered = packed_key(best[K - 1]) < threshold || threshold == order_key(-INFINITY);
        }
    } else {
        covered = V <= K;  // top-k off: the list must hold the whole row
    }
    // +inf logits, scores overflowing to +inf, or none finite: the one-block code decides.
    if (!covered || !(m > -INFINITY && m < INFINITY)) {
        sample_row<T>(p, b, sh);
        return;
    }

    // Entry tid of the list (threads past it hold nothing): key, score, and whether it survives top-k.
    const uint64_t e = tid < K ? best[tid] : 0;
    const uint32_t key = packed_key(e);
    const float s = e != 0 ? key_score(key) : -INFINITY;
    const bool survivor = e != 0 && key >= threshold;
    const double top_p = p.top_p[b];
    if (top_p < 1.0) {  // as sample_row: exact fixed-point weights, so the same threshold
        const float cut = float(1.0 - (top_p > 0.0 ? top_p : 0.0));
        const unsigned long long weight = survivor ? __float2ull_rn(expf(s - m) * kFixedOne) : 0;
        const unsigned long long total = block_sum(weight, sh.warp_totals);
        const double cut_mass = floor(double(cut) * double(total));
        const unsigned long long target = cut_mass >= double(total - 1) ? total - 1 : (unsigned long long)cut_mass;
        // The smallest key whose weight of keys <= it exceeds target: the list's last entry whose
        // weight from it to the end does (scanning bins 255 -> 0 sums from the end; K <= kBins).
        if (tid < kBins) sh.hist[tid] = weight;
        __syncthreads();
        find_bin(target, true, sh);
        threshold = packed_key(best[sh.select_bin]);
    }
    const float min_p = fminf(fmaxf(p.min_p[b], 0.0f), 1.0f);
    float z = -INFINITY;
    int index = V;
    if (e != 0 && key >= threshold && s != -INFINITY && !(min_p > 0.0f && expf(s - m) < min_p)) {
        index = packed_index(e, V);
        z = s + gumbel_noise(static_cast<uint64_t>(p.seed[0]), index, b);
    }
    block_argmax(z, index, sh);
    if (tid == 0) p.out[b] = index < V ? index : 0;
}

int sample_candidate_chunks(int vocab) { return (vocab + kCandBlock - 1) / kCandBlock; }

// ----------------------------------------------------------------------------- host dispatch

template <typename T>
cudaError_t sample_launch(const SampleParams& p, cudaStream_t stream) {
    const dim3 rows(p.batch);
    if (p.cand_k == 0) return launch_kernel(sample_kernel<T>, rows, kThreads, 0, stream, p.pdl, p);
    const int chunks = sample_candidate_chunks(p.vocab);
    const dim3 row_chunks(p.batch * chunks);
    const cudaError_t err = launch_kernel(candidates_kernel<T>, row_chunks, kCandThreads, 0, stream, p.pdl, p, chunks);
    if (err != cudaSuccess) return err;
    return launch_kernel(candidate_draw_kernel<T>, rows, kThreads, 0, stream, p.pdl, p, chunks);
}

cudaError_t sample_forward(const SampleParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case DType::kFloat32: return sample_launch<float>(p, stream);
        case DType::kFloat16: return sample_launch<__half>(p, stream);
        case DType::kBFloat16: return sample_launch<__nv_bfloat16>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace fastgpt
