// The sampler's parts (sampling.cu has the algorithm): Philox4x32-10 and the Gumbel noise drawn
// from it, order-preserving keys and fixed-point weights of scores, a row of cleaned and tempered
// logits, block reductions, the block-wide radix select over keys and top-p's tie rule.
#pragma once

#include "common.cuh"

namespace fastgpt {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;
constexpr int kRadixTokens = 4;  // tokens a lane reads per step of a radix select pass (see radix_select)
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

// --------------------------------------------------------------------------- scores and keys

// Monotone map from floats (no NaN) to uint32: a < b as floats <=> key(a) < key(b) as integers.
// -0.0 is folded into +0.0 first so that equal floats get equal keys.
__device__ __forceinline__ uint32_t order_key(float s) {
    if (s == 0.0f) s = 0.0f;
    const uint32_t bits = __float_as_uint(s);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The score whose order_key is `key` (order_key is a bijection on floats other than -0.0 and NaN).
__device__ __forceinline__ float key_score(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// A score's weight in top-p's sums, exp(s - m) (m the row's largest score) in 2^-40 fixed point:
// integer sums do not depend on the order the atomics and reductions add them in.
__device__ __forceinline__ unsigned long long fixed_weight(float s, float m) {
    return __float2ull_rn(expf(s - m) * kFixedOne);
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

    __device__ __forceinline__ float clean_of(float x) const {
        if (x != x) return -INFINITY;
        if (ties_only) return x == max_x ? 0.0f : -INFINITY;
        return x;
    }
    // The score of a logit x of this row (score(i): that of logits[i]).
    __device__ __forceinline__ float score_of(float x) const {
        const float s = clean_of(x) / temperature;
        return s != s ? -INFINITY : s;
    }
    __device__ __forceinline__ float score(int i) const { return score_of(to_float(logits[i])); }
};

// --------------------------------------------------------------------------- block reductions

struct Shared {
    unsigned long long hist[kBins];
    unsigned counts[kBins];  // an unweighted pass's bins: 32-bit shared atomics are native, 64-bit ones a CAS loop
    unsigned long long warp_totals[kWarps];
    float best_value[kWarps];
    int best_index[kWarps];
    int select_bin;
    unsigned long long select_below, select_weight;
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
// descending, 0 -> 255 otherwise), first exceeds `target`; sets sh.select_bin, sh.select_below
// (the sum of the bins before it in scan order) and sh.select_weight (its own). Threads 0..255
// scan one bin each.
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
        sh.select_below = sh.select_weight = 0;
    }
    __syncthreads();
    for (int w = 0; w < warp; ++w) incl += sh.warp_totals[w];
    if (tid < kBins && incl > target && incl - own <= target) {
        sh.select_bin = bin;
        sh.select_below = incl - own;
        sh.select_weight = own;  // before the barrier: after it, the next radix_select may clear sh.hist
    }
    __syncthreads();
}

// Adds one token a lane to the histogram, by the whole warp: its weight (1 when !WEIGHTED) in bin
// `bin` (kBins: none). Lanes sharing a bin add once where they can.
template <bool WEIGHTED>
__device__ __forceinline__ void add_to_bin(int bin, unsigned long long weight, int lane, Shared& sh) {
    const unsigned peers = __match_any_sync(FULL_MASK, bin);  // lanes sharing this bin
    if (!WEIGHTED) {
        if (bin < kBins && lane == __ffs(peers) - 1) atomicAdd(&sh.counts[bin], unsigned(__popc(peers)));
    } else if (peers == FULL_MASK) {  // same for every lane: the whole warp in one bin
        weight = warp_sum(weight);
        if (bin < kBins && lane == 0) atomicAdd(&sh.hist[bin], weight);
    } else if (bin < kBins && weight != 0) {
        atomicAdd(&sh.hist[bin], weight);
    }
}

// What radix_select found: a key, and the weight of the eligible tokens before it in scan order
// (keys above it when descending, below it otherwise) and of those at it.
struct Selected {
    uint32_t key;
    unsigned long long before, at;
};

// Radix select over the 32-bit keys of the eligible tokens of a row. `load(i)` reads token i's
// value (a logit); `element(value, key, weight)` returns whether a token of that value is
// eligible and sets its key and weight (weight 1 when !WEIGHTED). Finds the key K where the
// weight accumulated in scan order first exceeds `target`:
//   descending: the largest K with weight(keys >= K) > target (target = k - 1: the k-th largest);
//   ascending:  the smallest K with weight(keys <= K) > target.
// Each pass's bins before the selected one hold keys before K, and the last pass's selected bin
// holds K's tokens alone: the weights before and at K come with it, at no extra pass.
// Requires target < the total eligible weight.
template <bool WEIGHTED, typename Load, typename Element>
__device__ Selected radix_select(int vocab, const Load& load, const Element& element, unsigned long long target,
                                 bool descending, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    Selected found{0, 0, 0};
    for (int shift = 24; shift >= 0; shift -= 8) {
        const uint32_t high_mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = sh.counts[b] = 0;
        __syncthreads();
        // Warp-uniform loop so that the warp-wide intrinsics see all 32 lanes. Each lane loads
        // its kRadixTokens tokens (32 apart: coalesced) before it computes or bins any, so that
        // the loads are in flight together: one token at a time left one load in flight a lane,
        // and each pass waited out the memory's latency V / kThreads times over. The bins' sums
        // are integers: the order tokens arrive in does not change them.
        for (int base = warp * 32 * kRadixTokens; base < vocab; base += kThreads * kRadixTokens) {
            decltype(load(0)) value[kRadixTokens];
#pragma unroll
            for (int u = 0; u < kRadixTokens; ++u) value[u] = load(min(base + u * 32 + lane, vocab - 1));
            uint32_t key[kRadixTokens];
            unsigned long long weight[kRadixTokens];
            bool valid[kRadixTokens];
#pragma unroll
            for (int u = 0; u < kRadixTokens; ++u) {
                key[u] = 0;
                weight[u] = 0;
                valid[u] = base + u * 32 + lane < vocab && element(value[u], key[u], weight[u]) &&
                           (key[u] & high_mask) == found.key;
            }
#pragma unroll
            for (int u = 0; u < kRadixTokens; ++u)
                add_to_bin<WEIGHTED>(valid[u] ? int((key[u] >> shift) & 0xFFu) : kBins, weight[u], lane, sh);
        }
        __syncthreads();
        if (!WEIGHTED) {  // counts are < 2^24: find_bin's 64-bit bins hold them
            for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = sh.counts[b];
            __syncthreads();
        }
        find_bin(target, descending, sh);
        found.key |= uint32_t(sh.select_bin) << shift;
        found.before += sh.select_below;
        found.at = sh.select_weight;
        target -= sh.select_below;
    }
    return found;
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

// --------------------------------------------------------------------------- top-p's tie rule

// The log of the share of a tie group at the top-p cut that Hugging Face keeps (reference.draw_scores).
// HF removes the ascending sorted tokens whose cumulative weight is <= target: after the tokens
// below the group (weighing `below` <= target), the first (target - below) / one of its members
// (weighing `one` each, `at` in all), whichever its sort puts first, but never its top token. The
// whole group stays drawable here, each member's score plus this log, so that the group weighs
// what HF keeps of it. 0 exactly when HF removes none of it: the draw is then the plain one.
__device__ __forceinline__ float tie_log_share(unsigned long long target, unsigned long long below,
                                               unsigned long long at, unsigned long long one) {
    if (one == 0 || target < below) return 0.0f;  // never at a cut: below <= target < below + at
    const unsigned long long removed = (target - below) / one * one;
    const unsigned long long kept = removed + one <= at ? at - removed : one;
    return logf(float(double(kept) / double(at)));  // sampling.cu is built without fast math: the accurate logf
}

// Gumbel noise -log(E), E = -log(u), from 32 random bits: reference.gumbel_of_bits, whose
// docstring has the why. u is fine near 0 and near 1: the low 31 bits give x = (m + 1/2) / 2^32
// in (0, 1/2], and the top bit says whether u is x (E = -log(x)) or 1 - x (E = -log1p(-x)). The
// noise spans [-3.13, 22.87], finite: a token up to 26 nats below the row's best can be drawn.
// One logf for E either way: -log1p(-x) is x * log(w) / (w - 1) for w = 1 - x rounded, exact to a
// few ulps (and x itself where w rounds to 1), as common._gumbel_of_bits computes it in Triton.
__device__ __forceinline__ float gumbel_from_bits(uint32_t r) {
    const float x = fmaf(float(r & 0x7FFFFFFFu), 0x1p-32f, 0x1p-33f);
    const bool low = (r >> 31) == 0u;  // u = 1 - x
    const float w = low ? 1.0f - x : x;
    const float log_w = logf(w);
    const float e = !low ? -log_w : w == 1.0f ? x : x * __fdividef(log_w, w - 1.0f);
    return -logf(e);
}

// Gumbel noise of token i of row b: the draw's counter (i / 4, b), word i % 4.
__device__ __forceinline__ float gumbel_noise(uint64_t seed, int i, int b) {
    const Philox4 r = philox4x32_10(uint32_t(i / 4), uint32_t(b), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
    return gumbel_from_bits(r.x[i % 4]);
}

}  // namespace

}  // namespace fastgpt
