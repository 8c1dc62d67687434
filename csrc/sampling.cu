// Sampling without sorting: temperature -> top-k -> top-p -> min-p -> draw, one block per row.
//
// Every filter keeps the tokens whose score is >= a threshold, so the kernel finds thresholds,
// never orders the vocabulary:
//   - top-k: the k-th largest score, by a radix select over the scores' order-preserving 32-bit
//     keys (4 passes of 8 bits, histograms in shared memory); ties with it are kept (as HF);
//   - top-p: the smallest score v whose cumulative probability mass of scores <= v exceeds
//     1 - top_p, by the same radix select with each token weighing exp(s - max) in 2^-40 fixed
//     point (integer sums: the result does not depend on the order of the atomics). HF removes
//     sorted tokens whose cumulative mass is <= 1 - top_p, so of a group of tokens tied at v it
//     removes a fixed number, but which ones depends on its sort: here the whole group stays
//     drawable at the mass HF keeps of it, each member's score plus the log of the share kept
//     (tie_log_share, reference.draw_scores); every other token's probability is HF's;
//   - min-p: exp(s - max) >= min_p (prob >= min_p * max prob), no pass needed.
// The draw is Gumbel-max: argmax over kept tokens of s + G (s plus the tie group's log share
// first, for the group at the top-p cut), G = -log(-log(u)), u from 32 bits of Philox4x32-10
// keyed by the device seed, counter (token / 4, row), fine near 0 and 1 (gumbel_from_bits).
// Greedy rows (temperature <= 0) take the first index of the largest cleaned logit. Built without
// fast math: the division by the temperature and the logs must round as torch does.
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
// Bounded (SampleParams::bounded), two kernels first bound each row's k-th best key from below:
// group_max_kernel takes each kCandGroup entries' largest key, key_bound_kernel the k-th largest
// of a row's group maxima (its top_k = k; the k groups at or above it hold k entries at or above
// it, so the row's best k and every tie of the k-th are too). A chunk with at most cand_k entries
// at or above the bound then stores just those (no sort) and appends them to the row's list (at
// a count key_bound_kernel zeroed), and candidate_draw_kernel sorts that list once instead of
// merging every chunk's; a chunk with more sorts as before and marks the list incomplete (its
// count passes kCandList), as does a list that overflows.
// Every kernel waits for the previous grid before touching memory, so that on sm_90 and later they
// launch as programmatic dependents (common.cuh's launch_kernel) inside a decode step.
#include "sampling_parts.cuh"

namespace fastgpt {

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
    const auto load = [&](int i) { return to_float(logits[i]); };
    const float m = ties_only ? 0.0f : max_x / temperature;  // the largest score
    // Greedy (temperature <= 0 or NaN): the argmax (the first index, 0, for an all -inf row).
    // Nothing finite to draw from (every score x / t is -inf: an all -inf row, or finite logits
    // underflowing at a tiny temperature): 0, the reference's answer.
    if (!(temperature > 0.0f) || !(m > -INFINITY)) {
        if (threadIdx.x == 0) p.out[b] = temperature > 0.0f ? 0 : argmax;
        return;
    }

    // top-k, clamped: <= 0 or >= V means off.
    const int64_t top_k = p.top_k[b];
    uint32_t threshold = 0;  // keep tokens whose key >= threshold
    if (top_k > 0 && top_k < V) {
        auto all = [&](float x, uint32_t& key, unsigned long long& weight) {
            key = order_key(row.score_of(x));
            weight = 1;
            return true;
        };
        threshold = radix_select<false>(V, load, all, (unsigned long long)(top_k - 1), true, sh).key;
    }

    // top-p, clamped to (0, 1]: 1 (or NaN) means off; <= 0 keeps only the largest scores.
    const double top_p = p.top_p[b];
    float tie_log = 0.0f;  // added to the scores at the threshold: a tie group that top-p splits
    if (top_p < 1.0) {
        const float cut = float(1.0 - (top_p > 0.0 ? top_p : 0.0));  // HF: 1 - top_p rounded to fp32
        auto kept = [&](float x, uint32_t& key, unsigned long long& weight) {
            const float s = row.score_of(x);
            key = order_key(s);
            weight = fixed_weight(s, m);
            return key >= threshold;
        };
        unsigned long long total = 0;
        for (int base = threadIdx.x; base < V; base += kThreads * kRadixTokens) {  // loads first, as radix_select's
            float x[kRadixTokens];
#pragma unroll
            for (int u = 0; u < kRadixTokens; ++u) x[u] = load(min(base + u * kThreads, V - 1));
#pragma unroll
            for (int u = 0; u < kRadixTokens; ++u) {
                uint32_t key;
                unsigned long long weight;
                if (base + u * kThreads < V && kept(x[u], key, weight)) total += weight;
            }
        }
        total = block_sum(total, sh.warp_totals);  // >= 2^40: the largest score weighs 2^40
        const double cut_mass = floor(double(cut) * double(total));
        const unsigned long long target = cut_mass >= double(total - 1) ? total - 1 : (unsigned long long)cut_mass;
        const Selected cut_at = radix_select<true>(V, load, kept, target, false, sh);
        threshold = cut_at.key;
        // A ties_only row's drawable tokens are all one group (scores 0, the rest -inf): a share
        // would shift them all alike, so none is applied.
        const unsigned long long one = fixed_weight(key_score(threshold), m);  // a token's at the threshold
        if (!ties_only) tie_log = tie_log_share(target, cut_at.before, cut_at.at, one);
    }

    // min-p, clamped to [0, 1] (NaN means off).
    const float min_p = fminf(fmaxf(p.min_p[b], 0.0f), 1.0f);

    // Gumbel-max draw; each thread takes groups of 4 consecutive tokens (one Philox call).
    const uint64_t seed = static_cast<uint64_t>(p.seed[0]);
    float best = -INFINITY;
    int best_index = V;
    for (int group = threadIdx.x; group * 4 < V; group += kThreads) {
        float x[4];  // loaded before the Philox rounds, which then hide their latency
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = load(min(group * 4 + j, V - 1));
        const Philox4 r = philox4x32_10(uint32_t(group), uint32_t(b), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int i = group * 4 + j;
            if (i >= V) break;
            const float s = row.score_of(x[j]);
            const uint32_t key = order_key(s);
            if (key < threshold || s == -INFINITY) continue;
            if (min_p > 0.0f && expf(s - m) < min_p) continue;
            better(best, best_index, (key == threshold ? s + tie_log : s) + gumbel_from_bits(r.x[j]), i);
        }
    }
    block_argmax(best, best_index, sh);
    if (threadIdx.x == 0) p.out[b] = best_index < V ? best_index : 0;
}

// One block an SM at least, said: without it ptxas held the fp32 instance on sm_80 to 40 registers
// and spilled (60 with it; 512 threads at 60 still fit two blocks an SM).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleParams p) {
    __shared__ Shared sh;
    wait_for_previous_grid();
    sample_row<T>(p, blockIdx.x, sh);
}

// --------------------------------------------------------------------------- the candidate path

constexpr int kCandThreads = 256;
constexpr int kCandBlock = 1024;   // vocabulary entries per block of candidates_kernel (>= 4 x cand_k)
constexpr int kMergeBlock = 2048;  // entries per sort of candidate_draw_kernel: its best so far, then new ones
constexpr int kCandGroup = 64;     // entries per group maximum (a row of 50257 has 786 groups)
constexpr int kGroupsPerChunk = kCandBlock / kCandGroup;
constexpr int kCandList = 512;  // a row's entries at or above its bound, sorted once when they fit (>= cand_k)
static_assert(kCandList >= 256 && kCandList <= kMergeBlock && (kCandList & (kCandList - 1)) == 0,
              "the list holds a row's best cand_k (<= 256) and sorts in the merge buffer");

// The candidate path's workspace (SampleParams::workspace), carved by carve_workspace.
struct CandidateSpace {
    uint64_t* candidates;  // (B, chunks, cand_k): each chunk's best, or its entries at or above the bound
    uint64_t* list;        // (B, kCandList): a row's entries at or above its bound, in no order
    uint32_t* group_max;   // (B, chunks * kGroupsPerChunk): each group's largest key, 0 past the row
    uint32_t* bound;       // (B,): a key at or below the row's k-th best, 0 for none
    int* count;            // (B,): entries appended to the row's list; past kCandList, incomplete
};

__device__ __forceinline__ uint64_t pack(uint32_t key, int i, int vocab) {
    return (uint64_t(key) << 32) | uint32_t(vocab - 1 - i);
}
__device__ __forceinline__ uint32_t packed_key(uint64_t e) { return uint32_t(e >> 32); }
__device__ __forceinline__ int packed_index(uint64_t e, int vocab) { return vocab - 1 - int(uint32_t(e)); }

// The packed entry of token i of a row on the candidate path, x its logit (0 past the row: below
// every real entry, since no score's key is 0): its score is the cleaned logit over the
// temperature, which on greedy rows is 1, so that their scores are their logits.
__device__ __forceinline__ uint64_t candidate_entry(float x, int i, int vocab, float temperature) {
    if (i >= vocab) return 0;
    if (x != x) x = -INFINITY;
    float s = x / (temperature > 0.0f ? temperature : 1.0f);
    if (s != s) s = -INFINITY;
    return pack(order_key(s), i, vocab);
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

// Block (b, c) of a grid of B * chunks: the largest key of each kCandGroup entries of chunk c of
// row b, 16 lanes a group (4 entries a lane, adjacent lanes on adjacent entries).
template <typename T>
__global__ void __launch_bounds__(kCandThreads) group_max_kernel(SampleParams p, CandidateSpace w, int chunks) {
    constexpr int kLanes = kCandThreads / kGroupsPerChunk;
    static_assert(kLanes == 16 && kCandGroup % kLanes == 0, "a group's lanes share a half warp");
    wait_for_previous_grid();
    const int b = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const int group = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    const T* logits = static_cast<const T*>(p.logits) + b * p.stride_logits;
    const float temperature = p.temperature[b];
    constexpr int kPerLane = kCandGroup / kLanes;
    const int first = c * kCandBlock + group * kCandGroup + lane;  // then every kLanes-th
    float x[kPerLane];  // all loads first, then the keys: one trip to memory
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) x[j] = to_float(logits[min(first + j * kLanes, p.vocab - 1)]);
    uint32_t key = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
        key = max(key, packed_key(candidate_entry(x[j], first + j * kLanes, p.vocab, temperature)));
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(FULL_MASK, key, offset));
    if (lane == 0) w.group_max[(int64_t(b) * chunks + c) * kGroupsPerChunk + group] = key;
}

// Row b: bound[b] = the k-th largest of its group maxima (k its top_k; 0, no bound, where the
// draw kernel will not take the list anyway: top-k off or >= cand_k, or more than the groups),
// and count[b] = 0 for candidates_kernel's appends.
__global__ void __launch_bounds__(kThreads) key_bound_kernel(SampleParams p, CandidateSpace w, int chunks) {
    __shared__ Shared sh;
    wait_for_previous_grid();
    const int b = blockIdx.x, groups = chunks * kGroupsPerChunk;
    const uint32_t* group_max = w.group_max + int64_t(b) * groups;
    const int64_t k = p.top_k[b];
    uint32_t bound = 0;
    if (k > 0 && k < p.cand_k && k <= groups) {
        auto load = [&](int i) { return group_max[i]; };
        auto all = [&](uint32_t value, uint32_t& key, unsigned long long& weight) {
            key = value;
            weight = 1;
            return true;
        };
        bound = radix_select<false>(groups, load, all, (unsigned long long)(k - 1), true, sh).key;
    }
    if (threadIdx.x == 0) {
        w.bound[b] = bound;
        w.count[b] = 0;
    }
}

// Block (b, c) of a grid of B * chunks: the best cand_k packed entries of chunk c of row b, in
// descending order, to candidates[b, c] (0 pads past the end of the row). Bounded, where at most
// cand_k entries of the chunk are at or above the row's bound: those, in no order (0 pads the
// rest), also appended to the row's list.
template <typename T>
__global__ void __launch_bounds__(kCandThreads) candidates_kernel(SampleParams p, CandidateSpace w, int chunks) {
    __shared__ uint64_t entries[kCandBlock];
    __shared__ int above, next_slot, list_base;
    wait_for_previous_grid();
    const int b = blockIdx.x / chunks, c = blockIdx.x % chunks, K = p.cand_k;
    const T* logits = static_cast<const T*>(p.logits) + b * p.stride_logits;
    const float temperature = p.temperature[b];
    const uint32_t bound = p.bounded ? w.bound[b] : 0;
    if (threadIdx.x == 0) above = next_slot = 0;
    constexpr int kPerThread = kCandBlock / kCandThreads;
    const int first = c * kCandBlock + threadIdx.x;  // then every kCandThreads-th
    float x[kPerThread];  // all loads first, then the entries: one trip to memory
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) x[j] = to_float(logits[min(first + j * kCandThreads, p.vocab - 1)]);
    int mine = 0;  // this thread's entries at or above the bound
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
        const uint64_t e = candidate_entry(x[j], first + j * kCandThreads, p.vocab, temperature);
        entries[threadIdx.x + j * kCandThreads] = e;
        mine += e != 0 && packed_key(e) >= bound;
    }
    __syncthreads();
    if (p.bounded) atomicAdd(&above, mine);
    __syncthreads();
    uint64_t* out = w.candidates + (int64_t(b) * chunks + c) * K;
    if (p.bounded && above <= K) {
        if (threadIdx.x == 0) list_base = atomicAdd(w.count + b, above);
        __syncthreads();
        uint64_t* list = w.list + int64_t(b) * kCandList;
        for (int j = threadIdx.x; j < kCandBlock; j += kCandThreads) {
            const uint64_t e = entries[j];
            if (e != 0 && packed_key(e) >= bound) {
                const int slot = atomicAdd(&next_slot, 1);
                out[slot] = e;
                if (list_base + slot < kCandList) list[list_base + slot] = e;
            }
        }
        for (int j = above + threadIdx.x; j < K; j += kCandThreads) out[j] = 0;
        return;
    }
    bitonic_sort_descending(entries, kCandBlock);
    for (int j = threadIdx.x; j < K; j += kCandThreads) out[j] = entries[j];
    if (p.bounded && threadIdx.x == 0) atomicAdd(w.count + b, kCandList + 1);  // the row's list is incomplete
}

// Row b: its best cand_k entries from its chunks' lists, then the filters and the draw on them.
template <typename T>
__global__ void __launch_bounds__(kThreads) candidate_draw_kernel(SampleParams p, CandidateSpace w, int chunks) {
    __shared__ uint64_t best[kMergeBlock];  // [0, K): the best so far, in order; then the next candidates
    __shared__ Shared sh;
    wait_for_previous_grid();
    const int b = blockIdx.x, V = p.vocab, K = p.cand_k, tid = threadIdx.x;
    const int listed = p.bounded ? w.count[b] : kCandList + 1;
    if (listed <= kCandList) {  // every entry of the row at or above its bound: one sort
        const uint64_t* list = w.list + int64_t(b) * kCandList;
        for (int j = tid; j < kCandList; j += kThreads) best[j] = j < listed ? list[j] : 0;
        bitonic_sort_descending(best, kCandList);  // barriers before and after
    } else {
        const int64_t num = int64_t(chunks) * K;
        const uint64_t* cand = w.candidates + b * num;
        for (int j = tid; j < K; j += kThreads) best[j] = 0;
        for (int64_t start = 0; start < num; start += kMergeBlock - K) {
            for (int j = tid; j < kMergeBlock - K; j += kThreads) best[K + j] = start + j < num ? cand[start + j] : 0;
            bitonic_sort_descending(best, kMergeBlock);
        }
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
    float tie_log = 0.0f;  // as sample_row's
    if (top_p < 1.0) {  // as sample_row: exact fixed-point weights, so the same threshold and tie share
        const float cut = float(1.0 - (top_p > 0.0 ? top_p : 0.0));
        const unsigned long long weight = survivor ? fixed_weight(s, m) : 0;
        const unsigned long long total = block_sum(weight, sh.warp_totals);
        const double cut_mass = floor(double(cut) * double(total));
        const unsigned long long target = cut_mass >= double(total - 1) ? total - 1 : (unsigned long long)cut_mass;
        // The smallest key whose weight of keys <= it exceeds target: the list's last entry whose
        // weight from it to the end does (scanning bins 255 -> 0 sums from the end; K <= kBins).
        if (tid < kBins) sh.hist[tid] = weight;
        __syncthreads();
        find_bin(target, true, sh);
        threshold = packed_key(best[sh.select_bin]);
        // find_bin's sums end at an entry, and its ties lie on both sides of it in the list: the
        // weights below the threshold's group and of the group take two more sums (covered: the
        // group ends inside the list).
        const unsigned long long below = block_sum(key < threshold ? weight : 0ull, sh.warp_totals);
        const unsigned long long at = block_sum(key == threshold ? weight : 0ull, sh.warp_totals);
        tie_log = tie_log_share(target, below, at, fixed_weight(key_score(threshold), m));
    }
    const float min_p = fminf(fmaxf(p.min_p[b], 0.0f), 1.0f);
    float z = -INFINITY;
    int index = V;
    if (e != 0 && key >= threshold && s != -INFINITY && !(min_p > 0.0f && expf(s - m) < min_p)) {
        index = packed_index(e, V);
        z = (key == threshold ? s + tie_log : s) + gumbel_noise(static_cast<uint64_t>(p.seed[0]), index, b);
    }
    block_argmax(z, index, sh);
    if (tid == 0) p.out[b] = index < V ? index : 0;
}

int sample_candidate_chunks(int vocab) { return (vocab + kCandBlock - 1) / kCandBlock; }

namespace {

// The workspace's parts, in CandidateSpace's order, each at a 16-byte boundary; their end.
struct WorkspaceLayout {
    size_t list, group_max, bound, count, total;
};

WorkspaceLayout workspace_layout(int batch, int vocab, int cand_k) {
    const size_t rows = size_t(batch), chunks = size_t(sample_candidate_chunks(vocab));
    const auto up = [](size_t bytes) { return (bytes + 15) / 16 * 16; };
    WorkspaceLayout l;
    l.list = up(rows * chunks * cand_k * sizeof(uint64_t));
    l.group_max = l.list + up(rows * kCandList * sizeof(uint64_t));
    l.bound = l.group_max + up(rows * chunks * kGroupsPerChunk * sizeof(uint32_t));
    l.count = l.bound + up(rows * sizeof(uint32_t));
    l.total = l.count + up(rows * sizeof(int));
    return l;
}

CandidateSpace carve_workspace(const SampleParams& p) {
    const WorkspaceLayout l = workspace_layout(p.batch, p.vocab, p.cand_k);
    char* base = static_cast<char*>(p.workspace);
    return {reinterpret_cast<uint64_t*>(base), reinterpret_cast<uint64_t*>(base + l.list),
            reinterpret_cast<uint32_t*>(base + l.group_max), reinterpret_cast<uint32_t*>(base + l.bound),
            reinterpret_cast<int*>(base + l.count)};
}

}  // namespace

size_t sample_workspace_bytes(int batch, int vocab, int cand_k) {
    return cand_k > 0 ? workspace_layout(batch, vocab, cand_k).total : 0;
}

// ----------------------------------------------------------------------------- host dispatch

template <typename T>
cudaError_t sample_launch(const SampleParams& p, cudaStream_t stream) {
    const dim3 rows(p.batch);
    if (p.cand_k == 0) return launch_kernel(sample_kernel<T>, rows, kThreads, 0, stream, p.pdl, p);
    const int chunks = sample_candidate_chunks(p.vocab);
    const dim3 row_chunks(p.batch * chunks);
    const CandidateSpace w = carve_workspace(p);
    cudaError_t err;
    if (p.bounded) {
        err = launch_kernel(group_max_kernel<T>, row_chunks, kCandThreads, 0, stream, p.pdl, p, w, chunks);
        if (err != cudaSuccess) return err;
        err = launch_kernel(key_bound_kernel, rows, kThreads, 0, stream, p.pdl, p, w, chunks);
        if (err != cudaSuccess) return err;
    }
    err = launch_kernel(candidates_kernel<T>, row_chunks, kCandThreads, 0, stream, p.pdl, p, w, chunks);
    if (err != cudaSuccess) return err;
    return launch_kernel(candidate_draw_kernel<T>, rows, kThreads, 0, stream, p.pdl, p, w, chunks);
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
