// Shared device helpers for the fastgpt CUDA kernels: element types and conversions, 16-byte
// vectors, warp/block reductions, cp.async and mma.sync wrappers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "launchers.h"

namespace fastgpt {

constexpr unsigned FULL_MASK = 0xffffffffu;

// ----------------------------------------------------------------------------- conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Reads element i of a parameter vector whose dtype is only known at run time (LayerNorm's
// weight and bias may be any float dtype). The branch is uniform across the block.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
    switch (dtype) {
        case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
        case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        default: return static_cast<const float*>(p)[i];
    }
}

// ----------------------------------------------------------------------------- 16-byte vectors

// N elements of T packed into one aligned load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
    *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// ----------------------------------------------------------------------------- reductions

// T: float, or unsigned long long (exact fixed-point sums, the same in any order).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(FULL_MASK, x, offset);
    return x;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one entry per warp and
// may be reused right after the call returns (the trailing barrier protects it).
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < num_warps ? scratch[lane] : T(0);
    x = warp_sum(x);
    __syncthreads();
    return x;
}

// ----------------------------------------------------------------------------- sm_80 primitives

#if defined(FASTGPT_SIMT)
#include "simt_ptx.h"  // tests/simt: the host emulator's versions of the same functions
#else
// 16-byte asynchronous global -> shared copy; src_bytes == 0 zero-fills the destination without
// reading global memory (used for rows past the end of a sequence). The three cp.async wrappers
// clobber "memory", so the compiler moves no load or store of the shared memory they fill across
// them: a kernel whose threads read back only their own copies (decode.cu) has no barrier to
// order them otherwise.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 matrices of 16-bit elements from shared memory; lane l gives the address of row l % 8
// of matrix l / 8 and receives one 32-bit register (two elements) of each matrix.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The same with each 8x8 matrix transposed on the way into registers.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D (16x8 fp32) += A (16x16, row-major) * B (16x8, column-major), 16-bit inputs of type T.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // FASTGPT_SIMT

// Two floats rounded to T and packed into one 32-bit register (low half = first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Ceiling division for non-negative integers.
template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) {
    return (a + b - 1) / b;
}

// ----------------------------------------------------------------------------- programmatic dependent launch

// A kernel launched as a programmatic dependent (launch_kernel with pdl) may start while the
// kernel before it in the stream still runs, so it calls this before its first global load or
// store: wait until that kernel has completed and its writes are visible, then let the next one
// launch (kernels/pdl.py has the whole scheme). Compiled in for sm_90 and later only.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether the code that runs for `kernel` on the current device has wait_for_previous_grid's
// wait compiled in: its PTX targets sm_90 or later (code JIT-compiled from older PTX does not).
template <typename... Params>
bool waits_for_previous_grid(void (*kernel)(Params...)) {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
        (void)cudaGetLastError();  // not sticky: clear it, and launch plainly
        return false;
    }
    return attributes.ptxVersion >= 90;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent when pdl asks and
// the kernel's code waits (a dependent launch of code without the wait would race).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                          Args&&... args) {
    cudaLaunchAttribute dependent[1];
    dependent[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    dependent[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = dependent;
    config.numAttrs = pdl && waits_for_previous_grid(kernel) ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace fastgpt
