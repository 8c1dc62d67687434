// Residual add + LayerNorm over the last dimension, fp32 statistics.
//
// Three kernels, picked by the row length N (host code at the bottom):
//   - warp per row (N up to 32 * 4 vectors): the row lives in one warp's registers, shuffles only;
//   - block per row (N up to 1024 * 4 vectors): the row lives in one block's registers;
//   - looped (any N): block per row, three passes over memory (only for very long rows).
// A "vector" is 16 bytes when every pointer, stride and N allow it, else one element. Weight and
// bias are read as vectors too where they have x's dtype and 16-byte alignment (PARAMS), else
// element by element in their own dtype.
// Each kernel waits for the previous grid before touching memory, so that on sm_90 and later it
// may launch as a programmatic dependent (common.cuh's launch_kernel).
#include "common.cuh"

namespace fastgpt {

namespace {

constexpr int kWarpRowsPerBlock = 4;  // warp path: 4 rows (warps) per block
constexpr int kMaxChunks = 4;         // vectors held per thread
constexpr int kMaxThreads = 1024;
// How weight and bias are read (layer_norm_kernel's PARAMS): element by element in their own dtype;
// as vectors of x's dtype when y is written; or as vectors asked for together with x (warp path).
constexpr int kParamsScalar = 0, kParamsVec = 1, kParamsEarly = 2;
// Rows up to which the warp path takes kParamsEarly: its registers (bf16 on sm_90a: 115 against
// 56 with kParamsVec) halve the blocks an SM holds, which only a grid of more than a wave of them
// would feel (1024 rows: 256 blocks, two an SM on an H200).
constexpr int64_t kEarlyParamsMaxRows = 1024;

// Sum over the threads that share a row: one warp, or the whole block.
template <bool WARP_PER_ROW>
__device__ __forceinline__ float row_sum(float x, float* scratch) {
    if constexpr (WARP_PER_ROW) {
        return warp_sum(x);
    } else {
        return block_sum(x, scratch);
    }
}

// Chunk c's weight (or bias) vector, VEC elements of T from column col; ones (zeros) without one.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> param_vec(const void* param, int64_t col, float absent) {
    if (param != nullptr) return load_vec<T, VEC>(static_cast<const T*>(param) + col);
    Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(absent);
    return v;
}

}  // namespace

// The row's first element of h = x (+ r, rounded to T as h is): the statistics sum h - h0, so that
// a constant row's mean is exactly its value and its variance 0, as torch's (sum(h) / N rounds:
// 7.77 x 768 in fp32 gave y = +-1 at eps 1e-12, not 0). Each thread loads it itself (from the line
// of its row's first vector): no broadcast, no barrier.
template <typename T>
__device__ __forceinline__ float first_of_h(const T* x, const T* r) {
    return r == nullptr ? to_float(x[0]) : to_float(from_float<T>(to_float(x[0]) + to_float(r[0])));
}

// h = x + residual (rounded to T, as torch adds in T), y = (h - mean) * rstd * weight + bias with
//   mean = h0 + sum(h - h0) / N,  var = sum((h - mean)^2) / N  (two passes over registers),
//   rstd = 1 / sqrt(var + eps).
// Each thread holds CHUNKS vectors of VEC elements of its row: columns
//   col(c) = (c * ROW_THREADS + t) * VEC, for t the thread's index within the row.
//
// The block path launches up to 1024 threads, so its register budget must stay <= 64 per thread
// (sm_80 gave the fp16/bf16 CHUNKS = 4 kernel 66 without a bound: 'too many resources requested
// for launch' for N in (28672, 32768]); the warp path launches 128. PARAMS: kParamsEarly (warp
// path) asks for the weight and bias vectors together with x, held packed (2 * CHUNKS vectors),
// so that a few rows (a decode step's) make one trip to memory, not a second one after the
// reductions; kParamsVec reads them as vectors when it writes y; kParamsScalar element by element.
template <typename T, int VEC, int CHUNKS, bool WARP_PER_ROW, int PARAMS>
__global__ void __launch_bounds__(WARP_PER_ROW ? 32 * kWarpRowsPerBlock : kMaxThreads) layer_norm_kernel(LayerNormParams p) {
    __shared__ float scratch[32];
    wait_for_previous_grid();
    const int row_threads = WARP_PER_ROW ? 32 : blockDim.x;
    const int t = WARP_PER_ROW ? (threadIdx.x & 31) : threadIdx.x;
    const int64_t row = WARP_PER_ROW ? int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5) : blockIdx.x;
    if (row >= p.rows) return;  // whole warps (warp path) or whole blocks (block path) leave together
    const int64_t N = p.cols;
    const T* x = static_cast<const T*>(p.x) + row * p.stride_x;           // (N,)
    const T* r = static_cast<const T*>(p.residual) + row * p.stride_r;    // (N,) if residual
    T* h = static_cast<T*>(p.h) + row * p.stride_h;                       // (N,) if residual
    T* y = static_cast<T*>(p.y) + row * p.stride_y;                       // (N,)

    constexpr bool kEarlyParams = PARAMS == kParamsEarly;
    static_assert(!kEarlyParams || WARP_PER_ROW, "the block path reads its parameters late (64 registers)");
    // The warp path asks for every chunk's x and r (and parameters) before it adds any: a store to
    // h may alias them as far as the compiler knows, so a load after one waits for it (the SASS
    // made one trip to memory per chunk). The block path loads chunk by chunk: its 64 registers
    // (bounds of 1024 threads) do not hold every chunk at once (bf16 spilled).
    constexpr bool kLoadsFirst = WARP_PER_ROW;
    Vec<T, VEC> xv[CHUNKS], rv[CHUNKS];
    [[maybe_unused]] Vec<T, VEC> wv[kEarlyParams ? CHUNKS : 1], bv[kEarlyParams ? CHUNKS : 1];
    auto load_chunk = [&](int c, int64_t col) {
        if constexpr (kEarlyParams) {
            wv[c] = param_vec<T, VEC>(p.weight, col, 1.0f);
            bv[c] = param_vec<T, VEC>(p.bias, col, 0.0f);
        }
        xv[c] = load_vec<T, VEC>(x + col);
        if (p.residual != nullptr) rv[c] = load_vec<T, VEC>(r + col);
    };
    if constexpr (kLoadsFirst) {
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int64_t col = (int64_t(c) * row_threads + t) * VEC;
            if (col < N) load_chunk(c, col);
        }
    }
    const float h0 = first_of_h(x, p.residual != nullptr ? r : nullptr);
    float v[CHUNKS][VEC];
    float sum = 0.0f;  // of h - h0
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int64_t col = (int64_t(c) * row_threads + t) * VEC;
        if (col < N) {
            if constexpr (!kLoadsFirst) load_chunk(c, col);
            if (p.residual != nullptr) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) xv[c].v[j] = from_float<T>(to_float(xv[c].v[j]) + to_float(rv[c].v[j]));
                store_vec<T, VEC>(h + col, xv[c]);
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                v[c][j] = to_float(xv[c].v[j]);
                sum += v[c][j] - h0;
            }
        }
    }
    const float mean = h0 + row_sum<WARP_PER_ROW>(sum, scratch) / float(N);

    float sq = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int64_t col = (int64_t(c) * row_threads + t) * VEC;
        if (col < N) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) sq += (v[c][j] - mean) * (v[c][j] - mean);
        }
    }
    const float rstd = rsqrtf(row_sum<WARP_PER_ROW>(sq, scratch) / float(N) + p.eps);

#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int64_t col = (int64_t(c) * row_threads + t) * VEC;
        if (col < N) {
            [[maybe_unused]] Vec<T, VEC> w, b;  // the chunk's weight and bias, unless read one by one
            if constexpr (kEarlyParams) {
                w = wv[c], b = bv[c];
            } else if constexpr (PARAMS == kParamsVec) {
                w = param_vec<T, VEC>(p.weight, col, 1.0f), b = param_vec<T, VEC>(p.bias, col, 0.0f);
            }
            Vec<T, VEC> out;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                float o = (v[c][j] - mean) * rstd;
                // No multiply or add where the parameter is absent (-0 + 0 would be +0).
                if constexpr (PARAMS == kParamsScalar) {
                    if (p.weight != nullptr) o *= load_as_float(p.weight, p.weight_dtype, col + j);
                    if (p.bias != nullptr) o += load_as_float(p.bias, p.bias_dtype, col + j);
                } else {
                    if (p.weight != nullptr) o *= to_float(w.v[j]);
                    if (p.bias != nullptr) o += to_float(b.v[j]);
                }
                out.v[j] = from_float<T>(o);
            }
            store_vec<T, VEC>(y + col, out);
        }
    }
}

// The same math for rows too long for registers: pass 1 forms h (written out when there is a
// residual) and sums it, pass 2 re-reads h for the centred sum of squares, pass 3 writes y.
// Each thread re-reads only the elements it wrote itself.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_looped_kernel(LayerNormParams p) {
    __shared__ float scratch[32];
    wait_for_previous_grid();
    const int64_t row = blockIdx.x, N = p.cols;
    const T* x = static_cast<const T*>(p.x) + row * p.stride_x;         // (N,)
    const T* r = static_cast<const T*>(p.residual) + row * p.stride_r;  // (N,) if residual
    T* h = static_cast<T*>(p.h) + row * p.stride_h;                     // (N,) if residual
    T* y = static_cast<T*>(p.y) + row * p.stride_y;                     // (N,)
    const T* hv = p.residual != nullptr ? h : x;                        // where h lives after pass 1

    const float h0 = first_of_h(x, p.residual != nullptr ? r : nullptr);
    float sum = 0.0f;  // of h - h0
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
        T value = x[col];
        if (p.residual != nullptr) {
            value = from_float<T>(to_float(value) + to_float(r[col]));
            h[col] = value;
        }
        sum += to_float(value) - h0;
    }
    const float mean = h0 + block_sum(sum, scratch) / float(N);

    float sq = 0.0f;
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
        const float d = to_float(hv[col]) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / float(N) + p.eps);

    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
        float o = (to_float(hv[col]) - mean) * rstd;
        if (p.weight != nullptr) o *= load_as_float(p.weight, p.weight_dtype, col);
        if (p.bias != nullptr) o += load_as_float(p.bias, p.bias_dtype, col);
        y[col] = from_float<T>(o);
    }
}

// ----------------------------------------------------------------------------- host dispatch

namespace {

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int VEC, int PARAMS>
cudaError_t launch_rows(const LayerNormParams& p, cudaStream_t stream) {
    const int64_t vectors = ceil_div<int64_t>(p.cols, VEC);  // per row
    if (vectors <= 32 * kMaxChunks) {
        const dim3 block(32 * kWarpRowsPerBlock);
        const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.rows, kWarpRowsPerBlock)));
        if (vectors <= 32) {
            return launch_kernel(layer_norm_kernel<T, VEC, 1, true, PARAMS>, grid, block, 0, stream, p.pdl, p);
        } else if (vectors <= 64) {
            return launch_kernel(layer_norm_kernel<T, VEC, 2, true, PARAMS>, grid, block, 0, stream, p.pdl, p);
        } else {
            return launch_kernel(layer_norm_kernel<T, VEC, 4, true, PARAMS>, grid, block, 0, stream, p.pdl, p);
        }
    } else if (vectors <= int64_t(kMaxThreads) * kMaxChunks) {
        const int threads = static_cast<int>(ceil_div<int64_t>(ceil_div<int64_t>(vectors, kMaxChunks), 32) * 32);
        constexpr int kBlockParams = PARAMS == kParamsEarly ? kParamsVec : PARAMS;
        return launch_kernel(layer_norm_kernel<T, VEC, kMaxChunks, false, kBlockParams>,
                             dim3(static_cast<unsigned>(p.rows)), dim3(threads), 0, stream, p.pdl, p);
    } else {
        return launch_kernel(layer_norm_looped_kernel<T>, dim3(static_cast<unsigned>(p.rows)), dim3(kMaxThreads), 0,
                             stream, p.pdl, p);
    }
}

template <typename T>
cudaError_t launch(const LayerNormParams& p, cudaStream_t stream) {
    constexpr int VEC = 16 / sizeof(T);
    const bool vectorisable = aligned16(p.x) && aligned16(p.residual) && aligned16(p.y) && aligned16(p.h) &&
                              p.cols % VEC == 0 && p.stride_x % VEC == 0 &&
                              (p.residual == nullptr || p.stride_r % VEC == 0) && p.stride_y % VEC == 0 &&
                              (p.h == nullptr || p.stride_h % VEC == 0);
    if (!vectorisable) return launch_rows<T, 1, kParamsScalar>(p, stream);
    // Weight and bias (each absent, or in x's dtype and aligned) as vectors too.
    const bool params_vec = (p.weight == nullptr || (p.weight_dtype == p.dtype && aligned16(p.weight))) &&
                            (p.bias == nullptr || (p.bias_dtype == p.dtype && aligned16(p.bias)));
    if (!params_vec) return launch_rows<T, VEC, kParamsScalar>(p, stream);
    return p.rows <= kEarlyParamsMaxRows ? launch_rows<T, VEC, kParamsEarly>(p, stream)
                                         : launch_rows<T, VEC, kParamsVec>(p, stream);
}

}  // namespace

cudaError_t layer_norm_forward(const LayerNormParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case DType::kFloat16: return launch<__half>(p, stream);
        case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
        case DType::kFloat32: return launch<float>(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace fastgpt
