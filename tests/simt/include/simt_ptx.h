// csrc/common.cuh's sm_80 primitives under the SIMT emulator: included by common.cuh, inside
// namespace fastgpt, in place of the inline-asm versions (same names and signatures). Includes
// nothing itself: cuda_runtime.h brought simt_ptx_ops.h in at global scope.

// 16-byte asynchronous global -> shared copy; src_bytes == 0 zero-fills the destination without
// reading global memory. The emulated copy lands at the wait that retires its group
// (simt_ptx_ops.h); until then its destination holds NaNs.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    ::simt::ptx::cp_async_16(smem, gmem, src_bytes);
}

__device__ __forceinline__ void cp_async_commit() { ::simt::ptx::cp_async_commit(); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    ::simt::ptx::cp_async_wait(N);
}

// Four 8x8 matrices of 16-bit elements from shared memory; lane l gives the address of row l % 8
// of matrix l / 8 and receives one 32-bit register (two elements) of each matrix.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    ::simt::ptx::ldmatrix_x4(r, smem, false);
}

// The same with each 8x8 matrix transposed on the way into registers.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    ::simt::ptx::ldmatrix_x4(r, smem, true);
}

// D (16x8 fp32) += A (16x16, row-major) * B (16x8, column-major), 16-bit inputs of type T.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ::simt::ptx::mma_m16n8k16(::simt::ptx::MmaType::kF16, d, a, b);
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
    ::simt::ptx::mma_m16n8k16(::simt::ptx::MmaType::kBF16, d, a, b);
}
