// Device-side CUDA for the SIMT emulator (simt.h): the keywords, the built-in variables, barriers,
// warp intrinsics, atomics and the math that csrc/ uses, as host C++.
#pragma once

#include <math.h>

#include <bit>
#include <cstdint>

#include "cuda_runtime_api.h"
#include "simt.h"

// ----------------------------------------------------------------------------- keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-scope thread_local is static (one copy shared by the fibers of the block running on this
// OS thread), and `extern __shared__ T x[]` stays valid C++: it names a thread_local array
// defined in the runtime (csrc's smem_raw, runtime/launch.cpp).
#define __shared__ thread_local

// ----------------------------------------------------------------------------- built-in variables

// Set by the scheduler before it resumes a thread (threadIdx) or starts a block (the others).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = simt::kWarpSize;

// ----------------------------------------------------------------------------- barriers

inline void __syncthreads() { simt::sync_block(0, "__syncthreads"); }
inline int __syncthreads_or(int predicate) { return simt::sync_block(predicate, "__syncthreads_or"); }

// ----------------------------------------------------------------------------- warp collectives

namespace simt {

// Lane `lane`'s source under a shuffle of `kind` with operand `arg` and segment `width`, or -1
// for "its own value" (CUDA's rules for a source outside the lane's segment).
enum class Shuffle { kIdx, kUp, kDown, kXor };
inline int shuffle_source(Shuffle kind, int lane, int arg, int width) {
    const int first = lane & ~(width - 1), offset = lane - first;
    switch (kind) {
        case Shuffle::kIdx: return first + (arg & (width - 1));
        case Shuffle::kUp: return offset >= arg ? lane - arg : -1;
        case Shuffle::kDown: return offset + arg < width ? lane + arg : -1;
        case Shuffle::kXor: {
            const int source = lane ^ arg;
            return source < first + width ? source : -1;  // later segments are out of reach
        }
    }
    return -1;
}

template <typename T>
struct ShuffleIn {
    T value;
    int arg, width;
};

template <typename T, Shuffle KIND>
void shuffle_combine(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const auto mine = from_slot<ShuffleIn<T>>(in[lane]);
        const int source = shuffle_source(KIND, lane, mine.arg, mine.width);
        to_slot(out[lane], source < 0 ? mine.value : from_slot<ShuffleIn<T>>(in[source]).value);
    }
}

template <Shuffle KIND, typename T>
T shuffle(const char* op, unsigned mask, T value, int arg, int width) {
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
        fault(cudaErrorLaunchFailure, "%s: width %d is not a power of two in [1, 32]", op, width);
    return collective<T>(op, mask, ShuffleIn<T>{value, arg, width}, shuffle_combine<T, KIND>);
}

template <typename T>
void match_any_combine(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
        unsigned peers = 0;
        for (int other = 0; other < kWarpSize; ++other)
            if (from_slot<T>(in[other]) == from_slot<T>(in[lane])) peers |= 1u << other;
        to_slot(out[lane], peers);
    }
}

inline void ballot_combine(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]) {
    unsigned ballot = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) ballot |= unsigned(from_slot<int>(in[lane]) != 0) << lane;
    for (int lane = 0; lane < kWarpSize; ++lane) to_slot(out[lane], ballot);
}

inline void nothing_combine(const Slot (&)[kWarpSize], Slot (&)[kWarpSize]) {}

}  // namespace simt

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return simt::shuffle<simt::Shuffle::kIdx>("__shfl_sync", mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return simt::shuffle<simt::Shuffle::kUp>("__shfl_up_sync", mask, var, int(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return simt::shuffle<simt::Shuffle::kDown>("__shfl_down_sync", mask, var, int(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return simt::shuffle<simt::Shuffle::kXor>("__shfl_xor_sync", mask, var, lane_mask, width);
}

template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
    return simt::collective<unsigned>("__match_any_sync", mask, value, simt::match_any_combine<T>);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return simt::collective<unsigned>("__ballot_sync", mask, predicate, simt::ballot_combine);
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

inline void __syncwarp(unsigned mask = simt::kFullMask) {
    simt::Slot out;
    simt::warp_exchange("__syncwarp", mask, simt::nothing_combine, simt::Slot{}, out);
}

// ----------------------------------------------------------------------------- atomics

// Fibers switch only at barriers and collectives, so a plain read-modify-write is atomic.
template <typename T>
T simt_atomic_add(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}
inline int atomicAdd(int* address, int value) { return simt_atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return simt_atomic_add(address, value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return simt_atomic_add(address, value);
}
inline float atomicAdd(float* address, float value) { return simt_atomic_add(address, value); }

// One launch's memory is host memory, coherent for every fiber: fences order nothing more, and
// a load through L2 only (.cg) is a load.
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* address) {
    return *address;
}

// ----------------------------------------------------------------------------- integer and bit intrinsics

inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }

// cvt.rni.u64.f32: nearest, ties to even; NaN and negatives give 0, too large saturates.
inline unsigned long long __float2ull_rn(float x) {
    if (!(x > 0.0f)) return 0;
    if (x >= 18446744073709551616.0f) return ~0ull;
    return static_cast<unsigned long long>(nearbyintf(x));  // the default rounding mode: to nearest even
}

// An address in the shared window; the emulator's shared memory is host memory: the address itself.
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// ----------------------------------------------------------------------------- math

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// div.approx.f32, within 2 ulp on the GPU (0 where |b| > 2^126); the rounded quotient here.
inline float __fdividef(float a, float b) { return a / b; }

// CUDA's global min/max overloads (device code calls them unqualified).
#define SIMT_MIN_MAX(T)                                   \
    inline T min(T a, T b) { return b < a ? b : a; }     \
    inline T max(T a, T b) { return a < b ? b : a; }
SIMT_MIN_MAX(int)
SIMT_MIN_MAX(unsigned)
SIMT_MIN_MAX(long)
SIMT_MIN_MAX(unsigned long)
SIMT_MIN_MAX(long long)
SIMT_MIN_MAX(unsigned long long)
#undef SIMT_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
