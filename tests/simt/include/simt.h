// SIMT emulator: csrc/'s CUDA kernels compiled by g++ for the host and run on the CPU, for tests
// (what TRITON_INTERPRET is to the Triton kernels). tests/simt/build.py builds the host module.
//
// Execution model
//   - A launch runs synchronously on the calling OS thread. Its blocks run one after another, in
//     an order set by FASTGPT_SIMT_SCHEDULE (below): forward, x fastest, then y, then z;
//     reverse, the last block first; random:<seed>, a permutation of the blocks drawn from the
//     seed (affine: i -> (a i + c) mod n). Deterministic for a given schedule.
//   - Within a block every CUDA thread is a fiber (its own 256 KB stack, a cooperative context
//     switch; runtime/fiber.cpp) on that same OS thread. A fiber runs until it waits: at
//     __syncthreads, at a warp collective, or by returning. The scheduler then resumes the next
//     ready fiber, sweeping them in an order set by FASTGPT_SIMT_SCHEDULE:
//       forward (default): thread 0, 1, ...;  reverse: the last thread first;
//       random:<seed>: a fresh permutation each sweep, from the seed and the block index.
//     Running one kernel under two orders and comparing is how a test finds a data race
//     between two barriers, or a result that depends on which block runs first or last (a
//     grid's last block to finish merging the others' work, float atomics): the race becomes
//     a difference in the results.
//   - __syncthreads waits for every thread of the block that has not returned (exited threads
//     no longer count, as on the GPU). Warp collectives (shuffles, votes, __match_any_sync,
//     __syncwarp, ldmatrix, mma) wait for all 32 lanes of the warp, which must name the full
//     mask and meet at the same kind of operation; then one function computes every lane's
//     result from all 32 inputs at once.
//   - __shared__ variables are thread_local statics (one copy per OS thread: the block running
//     there). Dynamic shared memory is one 227 KB thread_local array (csrc's smem_raw); it is
//     filled with 0xFF bytes (NaN in fp32/fp16/bf16) before each block, so a read of shared
//     memory that was never written shows. cp.async is asynchronous: its destination holds
//     0xFF bytes from the issue until the wait_group that retires its commit group, where the
//     copy lands (simt_ptx_ops.h), so a tile read before its wait, or refilled while other
//     threads still read it, shows as NaNs.
//     Uninitialised locals (registers) start as 0xFE bytes (build.py's -ftrivial-auto-var-init).
//   - mma.sync adds the exact fp32 products to C one k at a time, in fp32 (the tensor cores'
//     internal order and width differ: results agree to fp32 rounding, not bit for bit).
//   - A fault (a collective with a partial mask, lanes meeting at different operations, a lane
//     that returns while its warp waits for it, a misaligned cp.async or ldmatrix, a deadlock:
//     no fiber can run but some have not returned) ends the launch: the message goes to stderr
//     and the launch returns cudaErrorLaunchFailure (cudaErrorMisalignedAddress for alignment),
//     whose cudaGetErrorString then carries the message. A fault is not sticky, unlike on a GPU.
//
// Limits
//   - Races show up only as order dependence: nothing records which thread touched what.
//   - Memory is checked only in the memcheck build (build.py's sanitize=True, AddressSanitizer;
//     README.md). There, a global access past the end (or before the start) of a tensor that
//     lands in its allocation's redzone is reported, and so is an access to dynamic shared
//     memory past the launch's dynamicSmemBytes (the rest of smem_raw is poisoned). Not caught:
//     an access that jumps the redzone into another live allocation, one past the valid part of
//     a tensor but inside it, and overruns of static __shared__ arrays (thread_locals, which ASan
//     gives no redzones). In the default build, out-of-bounds global accesses read or corrupt
//     host memory (or segfault); shared memory is bounds-checked only for cp.async and ldmatrix
//     into the dynamic window. Static __shared__ variables keep their contents from the block
//     before.
//   - Warp collectives are matched by kind, not by call site: divergent lanes that reach two
//     different __shfl_xor_sync calls are not told apart. Only full masks (0xffffffff) and warps
//     of 32 threads are supported.
//   - No preemption: a thread that spins waiting for another thread's write hangs the launch.
//   - Blocks never overlap, so ordering between them is not tested: __threadfence does nothing and
//     __ldcg is a plain load. A grid's "last block to finish" pattern is checked for its logic
//     (under the block orders above), not for its fences; that takes a GPU.
//   - Math functions are the host's (glibc expf, logf, ...), correctly rounded or nearly, where
//     CUDA's have up to 2 ulp error; rsqrtf is 1 / sqrtf. Conversions to fp16/bf16 are exact.
//   - __launch_bounds__ is ignored, so a block larger than a kernel's bound still runs; register
//     and static shared memory limits are unknown. cudaOccupancyMaxActiveBlocksPerMultiprocessor
//     is an estimate (cuda_runtime_api.h).
//   - Stream handles are ignored; launches are synchronous; programmatic dependent launch
//     attributes are accepted and do nothing. Device 0 only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace simt {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The largest dynamic shared memory a block may ask for (sm_90: 227 KB).
constexpr int kMaxDynamicSmem = 227 * 1024;

// Ends the running launch with `error` (a cudaError_t value) and a printf-style message naming
// the block and thread. Called from a kernel's thread; never returns.
[[noreturn]] void fault(int error, const char* format, ...) __attribute__((format(printf, 2, 3)));

// __syncthreads / __syncthreads_or for the running thread; returns the OR of the predicates.
int sync_block(int predicate, const char* op);

// One lane's input or output of a warp collective.
struct Slot {
    alignas(16) unsigned char bytes[48];
};
// Computes all 32 lanes' outputs from all 32 inputs, once every lane has arrived.
using Combine = void (*)(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]);
// The running thread's part in a warp collective named `op`: waits for its warp's 32 lanes.
void warp_exchange(const char* op, unsigned mask, Combine combine, const Slot& in, Slot& out);

template <typename T>
T from_slot(const Slot& s) {
    static_assert(sizeof(T) <= sizeof(Slot::bytes) && std::is_trivially_copyable_v<T>);
    T value;
    std::memcpy(&value, s.bytes, sizeof(T));
    return value;
}

template <typename T>
void to_slot(Slot& s, const T& value) {
    static_assert(sizeof(T) <= sizeof(Slot::bytes) && std::is_trivially_copyable_v<T>);
    std::memcpy(s.bytes, &value, sizeof(T));
}

// A collective whose lanes each give an In and get an Out.
template <typename Out, typename In>
Out collective(const char* op, unsigned mask, const In& in, Combine combine) {
    Slot slot_in, slot_out;
    to_slot(slot_in, in);
    warp_exchange(op, mask, combine, slot_in, slot_out);
    return from_slot<Out>(slot_out);
}

// Faults unless [p, p + bytes) lies inside the launch's dynamic shared memory when it starts
// there (addresses elsewhere are taken to be static __shared__ variables).
void check_shared(const void* p, size_t bytes, const char* op);

}  // namespace simt
