// Prefill attention, FlashAttention-2 style, for sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async).
//
// One block of 4 warps owns BLOCK_M = 64 x M_TILES query rows of one (batch, head); each warp
// owns M_TILES tiles of 16 of them (2 at D64, FlashAttention-2's 32 rows a warp: each K and V
// fragment read from shared memory feeds two MMAs; 1 at D128, whose accumulators fill the
// registers) and keeps their output accumulator and softmax state in registers. The block walks
// the visible key blocks of BLOCK_N = 64 keys. K and V tiles are fetched with cp.async so that each
// load overlaps compute: V_j streams in while S = Q K_j^T and the softmax run, K_{j+1} while
// O += P V_j runs. Rows past the end of a sequence are zero-filled by cp.async and masked.
//
// With a boolean mask (transformers' padding masks) every key block is masked, and a key the mask
// hides from a row is one it does not see; a row that sees no key gets zeros, as everywhere.
//
// mma.sync fragment layouts used below (g = lane / 4, t = lane % 4; from the PTX ISA):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 8+2t..), a3 (g+8, 8+2t..)
//   B 16x8 "col":      b0 (k = 2t..2t+1, n = g), b1 (k = 8+2t.., n = g)
//   C 16x8 fp32:       c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
#include "common.cuh"

namespace fastgpt {

namespace {

constexpr int BLOCK_N = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory row stride in elements: one 16-byte pad per row puts the 8 rows that an ldmatrix
// reads in 8 different 16-byte bank groups.
template <int D>
constexpr int SMEM_STRIDE = D + 8;

// 16-row tiles of queries a warp owns, and the block's rows. At D64 two tiles take 237-255
// registers (no spills), 2 blocks an SM where one tile's 168 fit 3, and the loop issues 755
// instructions for 128 MMAs where one tile's issued 465 for 64 (sm_90a). Not measured on a GPU:
// M_TILES 1 at D64 is the form the H200 measured (2026-11-30).
template <int D>
constexpr int M_TILES = D == 64 ? 2 : 1;
template <int D>
constexpr int BLOCK_M = 16 * kWarps * M_TILES<D>;

template <int D>
constexpr int smem_bytes() {
    return (BLOCK_M<D> + 2 * BLOCK_N) * SMEM_STRIDE<D> * 2;  // Q, K, V tiles of 16-bit elements
}

// Copies rows [row0, row0 + ROWS) of a (rows, D) matrix with row stride `stride` into shared
// memory; rows >= rows are zero-filled (never read from global memory).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int row0, int rows) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * CHUNKS) % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / kThreads; ++i) {
        const int id = i * kThreads + threadIdx.x, r = id / CHUNKS, c = id % CHUNKS;
        const bool valid = row0 + r < rows;
        const T* src = valid ? gmem + (row0 + r) * stride + c * 8 : gmem;
        cp_async_16(smem + r * SMEM_STRIDE<D> + c * 8, src, valid ? 16 : 0);
    }
}

// S (16 x BLOCK_N per tile of the warp) = Q_w K^T, Q_w held as A fragments, K (BLOCK_N, D) in
// shared memory: each K fragment serves every tile.
template <typename T, int D, int MT>
__device__ __forceinline__ void compute_scores(float (&s)[MT][BLOCK_N / 8][4], const uint32_t (&qf)[MT][D / 16][4],
                                               const T* sK, int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < BLOCK_N / 16; ++np) {
            // matrices: (keys +0..7, d +0..7), (keys +0..7, d +8..15), (keys +8..15, d +0..7), (+8.., +8..)
            uint32_t r[4];
            const int key = np * 16 + (lane & 7) + (lane >> 4) * 8, col = kk * 16 + ((lane >> 3) & 1) * 8;
            ldmatrix_x4(r, sK + key * SMEM_STRIDE<D> + col);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(s[mt][2 * np], qf[mt][kk], b0);
                mma_16816<T>(s[mt][2 * np + 1], qf[mt][kk], b1);
            }
        }
    }
}

// O (16 x D per tile of the warp) += P V, P from the score registers (rounded to T), V (BLOCK_N, D)
// in shared memory read transposed by ldmatrix: each V fragment serves every tile.
template <typename T, int D, int MT>
__device__ __forceinline__ void accumulate_pv(float (&o)[MT][D / 8][4], const float (&p)[MT][BLOCK_N / 8][4],
                                              const T* sV, int lane) {
#pragma unroll
    for (int ks = 0; ks < BLOCK_N / 16; ++ks) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2<T>(p[mt][2 * ks][0], p[mt][2 * ks][1]);
            a[mt][1] = pack2<T>(p[mt][2 * ks][2], p[mt][2 * ks][3]);
            a[mt][2] = pack2<T>(p[mt][2 * ks + 1][0], p[mt][2 * ks + 1][1]);
            a[mt][3] = pack2<T>(p[mt][2 * ks + 1][2], p[mt][2 * ks + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            // matrices (transposed): (keys +0..7, d +0..7), (keys +8..15, d +0..7), (+0..7, d +8..15), (+8.., +8..)
            uint32_t r[4];
            const int key = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = dp * 16 + (lane >> 4) * 8;
            ldmatrix_x4_trans(r, sV + key * SMEM_STRIDE<D> + col);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(o[mt][2 * dp], a[mt], b0);
                mma_16816<T>(o[mt][2 * dp + 1], a[mt], b1);
            }
        }
    }
}

// Online softmax over one key block for the thread's two rows (g and g + 8 of its warp):
//   s <- s * scale * log2(e), masked to -inf where (BOUNDS) key >= Sk or (causal) key > row + Sk - Sq,
//        or (MASKED) the row's mask hides the key (mask_rows: the two rows' masks, null past Sq);
//   m' = max(m, max_j s_j); o <- o * 2^(m - m'); l <- l * 2^(m - m') + sum_j 2^(s_j - m'); s <- 2^(s - m').
// A block without masks (most of them) takes the max of the raw scores and scales it (scale_log2
// >= 0), so that each score's scale and shift are one FMA; a masked one scales first (-inf times
// a zero scale is NaN). While a row has seen no key, m' = -inf and the reference point 0 is used
// instead (no NaN). l holds this thread's partial row sum; the four threads of a row add theirs
// at the end.
template <int D, bool MASKED, bool BOUNDS>
__device__ __forceinline__ void softmax_update(float (&s)[BLOCK_N / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                               float (&l)[2], float scale_log2, int row0, int key0, int seqlen_k,
                                               int causal_offset, bool causal, const uint8_t* const (&mask_rows)[2]) {
    constexpr bool kRaw = !MASKED && !BOUNDS;
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // row g, then row g + 8
        const int row = row0 + half * 8;
        const int last_key = causal ? min(row + causal_offset, seqlen_k - 1) : seqlen_k - 1;  // (BOUNDS)
        float row_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& x = s[nt][half * 2 + e];
                if constexpr (!kRaw) {
                    x *= scale_log2;
                    const int key = key0 + nt * 8 + 2 * t + e;
                    if (BOUNDS && key > last_key) x = -INFINITY;
                    if (MASKED && (mask_rows[half] == nullptr || (key < seqlen_k && mask_rows[half][key] == 0)))
                        x = -INFINITY;
                }
                row_max = fmaxf(row_max, x);
            }
        }
        row_max = fmaxf(row_max, __shfl_xor_sync(FULL_MASK, row_max, 1));
        row_max = fmaxf(row_max, __shfl_xor_sync(FULL_MASK, row_max, 2));
        const float scale = kRaw ? scale_log2 : 1.0f;  // what is left to apply to the scores
        const float m_new = fmaxf(m[half], row_max * scale);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m[half] - m_use);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& x = s[nt][half * 2 + e];
                x = exp2f(x * scale - m_use);
                sum += x;
            }
        }
        l[half] = l[half] * alpha + sum;
        m[half] = m_new;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][half * 2] *= alpha;
            o[dt][half * 2 + 1] *= alpha;
        }
    }
}

// The softmax sums of the thread's two rows: each of the 4 threads of a row holds a part of it.
__device__ __forceinline__ void row_sums(const float (&l)[2], float (&total)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        total[half] = l[half];
        total[half] += __shfl_xor_sync(FULL_MASK, total[half], 1);
        total[half] += __shfl_xor_sync(FULL_MASK, total[half], 2);
    }
}

// Writes 16-row tile `tile` of the block's O / l (0 where l == 0; l the row_sums), one of the
// calling warp's: staged through the same rows of the Q tile (free once Q is in registers) so that
// global stores are 16 bytes wide.
template <typename T, int D>
__device__ __forceinline__ void store_output(const float (&o)[D / 8][4], const float (&l)[2], T* sQ, T* out,
                                             int64_t stride_o, int row_base, int seqlen_q, int tile, int lane) {
    const int g = lane >> 2, t = lane & 3;
    // A row that saw no key is 0, even where a zero weight met a NaN in v (0 * NaN); a NaN l stays NaN.
    const bool seen[2] = {l[0] != 0.0f, l[1] != 0.0f};
    const float inv[2] = {seen[0] ? 1.0f / l[0] : 0.0f, seen[1] ? 1.0f / l[1] : 0.0f};
    T* stage = sQ + tile * 16 * SMEM_STRIDE<D>;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float x0 = seen[half] ? o[dt][half * 2] * inv[half] : 0.0f;
            const float x1 = seen[half] ? o[dt][half * 2 + 1] * inv[half] : 0.0f;
            const uint32_t packed = pack2<T>(x0, x1);
            *reinterpret_cast<uint32_t*>(stage + (g + half * 8) * SMEM_STRIDE<D> + dt * 8 + 2 * t) = packed;
        }
    }
    __syncwarp();
    constexpr int CHUNKS = D / 8;
#pragma unroll
    for (int i = lane; i < 16 * CHUNKS; i += 32) {
        const int r = i / CHUNKS, c = i % CHUNKS, row = row_base + tile * 16 + r;
        if (row < seqlen_q) store_vec<T, 8>(out + row * stride_o + c * 8, load_vec<T, 8>(stage + r * SMEM_STRIDE<D> + c * 8));
    }
}

// Writes the log-sum-exp of the thread's two rows, ln sum_j exp(s_j) = (m + log2 l) ln 2 in the
// scores' log2 units (l the row_sums), -inf for a row that saw no key; lse points at this
// (batch, head)'s (Sq,).
__device__ __forceinline__ void store_lse(const float (&m)[2], const float (&l)[2], float* lse, int row0,
                                          int seqlen_q) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + half * 8;
        if ((threadIdx.x & 3) == 0 && row < seqlen_q)
            lse[row] = l[half] != 0.0f ? (m[half] + log2f(l[half])) * kLn2 : -INFINITY;  // NaN stays NaN
    }
}

}  // namespace

// O = softmax(Q K^T * scale + mask) V for one (query block, head, batch), mask = -inf where key
// >= Sk or, when causal, key > query + Sk - Sq (bottom-right alignment), or (MASKED) p.mask hides
// the key; GQA: query head h reads kv head h / (Hq / Hkv). Rows that see no key get O = 0. With
// p.lse, each row's log-sum-exp too.
template <typename T, int D, bool MASKED>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttentionParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);                      // (BLOCK_M, D + 8)
    T* sK = sQ + BLOCK_M<D> * SMEM_STRIDE<D>;                   // (BLOCK_N, D + 8)
    T* sV = sK + BLOCK_N * SMEM_STRIDE<D>;                      // (BLOCK_N, D + 8)

    wait_for_previous_grid();  // a programmatic dependent (common.cuh's launch_kernel) waits here
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Causal blocks near the end of the sequence have the most keys: start them first.
    const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (p.heads_q / p.heads_kv);
    constexpr int MT = M_TILES<D>;
    const int m0 = m_block * BLOCK_M<D>;
    const int causal_offset = p.seqlen_k - p.seqlen_q;

    const T* q = static_cast<const T*>(p.q) + b * p.stride_q_b + h * p.stride_q_h;      // (Sq, D)
    const T* k = static_cast<const T*>(p.k) + b * p.stride_k_b + kvh * p.stride_k_h;    // (Sk, D)
    const T* v = static_cast<const T*>(p.v) + b * p.stride_v_b + kvh * p.stride_v_h;    // (Sk, D)
    T* out = static_cast<T*>(p.o) + b * p.stride_o_b + h * p.stride_o_h;                // (Sq, D)

    // Keys [0, n_end) are visible to at least one row of this block.
    const int last_row = min(m0 + BLOCK_M<D>, p.seqlen_q) - 1;
    const int n_end = p.causal ? min(p.seqlen_k, last_row + causal_offset + 1) : p.seqlen_k;
    const int n_blocks = n_end > 0 ? ceil_div(n_end, BLOCK_N) : 0;

    // Tile mt of the warp: block rows (warp * MT + mt) * 16 + [0, 16).
    float o[MT][D / 8][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[mt][dt][i] = 0.0f;
    }
    uint32_t qf[MT][D / 16][4];

    load_tile<T, D, BLOCK_M<D>>(sQ, q, p.stride_q_s, m0, p.seqlen_q);
    if (n_blocks > 0) load_tile<T, D, BLOCK_N>(sK, k, p.stride_k_s, 0, p.seqlen_k);
    cp_async_commit();

    // Q K^T * scale = (-Q) K^T * -scale, exactly: softmax_update's unmasked blocks need a scale >= 0,
    // so a negative one flips the sign bits of Q's fragments (bit 15 of each 16-bit half).
    const uint32_t q_sign = p.scale < 0.0f ? 0x80008000u : 0u;
    const float scale_log2 = fabsf(p.scale) * kLog2e;
    int row0[MT];  // the thread's first row of each tile; the second is row0 + 8
    const uint8_t* mask_rows[MT][2];  // rows past Sq have none (and are never stored)
    const uint8_t* mask = MASKED ? p.mask + b * p.stride_mask_b + h * p.stride_mask_h : nullptr;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        row0[mt] = m0 + (warp * MT + mt) * 16 + (lane >> 2);
        for (int half = 0; half < 2; ++half) {
            const int row = row0[mt] + half * 8;
            mask_rows[mt][half] = MASKED && row < p.seqlen_q ? mask + int64_t(row) * p.stride_mask_s : nullptr;
        }
    }
    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = j * BLOCK_N;
        cp_async_wait<0>();  // K_j (and Q) have landed
        __syncthreads();     // ... for every thread; and everyone is done with V_{j-1}
        load_tile<T, D, BLOCK_N>(sV, v, p.stride_v_s, n0, p.seqlen_k);
        cp_async_commit();
        if (j == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const int r = (warp * MT + mt) * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4(qf[mt][kk], sQ + r * SMEM_STRIDE<D> + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int i = 0; i < 4; ++i) qf[mt][kk][i] ^= q_sign;
                }
        }
        // A warp whose rows see none of this block's keys (causal: the block's second half of rows
        // sees more of the diagonal than its first) skips it: all -inf scores would leave its state as
        // it is. The condition is the warp's, so its MMAs' lanes stay together.
        const bool warp_sees = !p.causal || n0 <= m0 + (warp + 1) * MT * 16 - 1 + causal_offset;
        float s[MT][BLOCK_N / 8][4];
        if (warp_sees) {
            compute_scores<T, D, MT>(s, qf, sK, lane);
            // Blocks past the end of the keys or crossing the causal diagonal mask their scores.
            const bool bounds = n0 + BLOCK_N > p.seqlen_k || (p.causal && n0 + BLOCK_N - 1 > m0 + causal_offset);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (bounds)
                    softmax_update<D, MASKED, true>(s[mt], o[mt], m[mt], l[mt], scale_log2, row0[mt], n0, p.seqlen_k,
                                                    causal_offset, p.causal, mask_rows[mt]);
                else
                    softmax_update<D, MASKED, false>(s[mt], o[mt], m[mt], l[mt], scale_log2, row0[mt], n0,
                                                     p.seqlen_k, causal_offset, p.causal, mask_rows[mt]);
            }
        }
        cp_async_wait<0>();  // V_j has landed
        __syncthreads();     // ... for every thread; and everyone is done with K_j
        if (j + 1 < n_blocks) load_tile<T, D, BLOCK_N>(sK, k, p.stride_k_s, n0 + BLOCK_N, p.seqlen_k);
        cp_async_commit();
        if (warp_sees) accumulate_pv<T, D, MT>(o, s, sV, lane);
    }
    cp_async_wait<0>();  // with no visible key, the Q tile was still in flight
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float total[2];
        row_sums(l[mt], total);
        store_output<T, D>(o[mt], total, sQ, out, p.stride_o_s, m0, p.seqlen_q, warp * MT + mt, lane);
        if (p.lse != nullptr)
            store_lse(m[mt], total, p.lse + (int64_t(b) * p.heads_q + h) * p.seqlen_q, row0[mt], p.seqlen_q);
    }
}

// ----------------------------------------------------------------------------- host dispatch

namespace {

template <typename T, int D, bool MASKED>
cudaError_t launch_masked(const AttentionParams& p, cudaStream_t stream) {
    constexpr int bytes = smem_bytes<D>();
    const auto kernel = attention_kernel<T, D, MASKED>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(ceil_div(p.seqlen_q, BLOCK_M<D>), p.heads_q, p.batch);
    return launch_kernel(kernel, grid, kThreads, bytes, stream, p.pdl, p);
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
    return p.mask != nullptr ? launch_masked<T, D, true>(p, stream) : launch_masked<T, D, false>(p, stream);
}

template <typename T>
cudaError_t launch_dim(const AttentionParams& p, cudaStream_t stream) {
    switch (p.head_dim) {
        case 64: return launch<T, 64>(p, stream);
        case 128: return launch<T, 128>(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case DType::kFloat16: return launch_dim<__half>(p, stream);
        case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace fastgpt
