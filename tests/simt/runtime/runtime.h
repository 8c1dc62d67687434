// Internal interface between the emulator's runtime files (api.cpp, launch.cpp, ptx.cpp).
#pragma once

#include <deque>
#include <string>
#include <vector>

#include "cuda_runtime_api.h"

namespace simt {

// Records `error` as this OS thread's last error (unless cudaSuccess) and returns it.
cudaError_t record_error(cudaError_t error);

// A launch that failed with `error`: prints the message to stderr, keeps it for
// cudaGetErrorString(error), and records the error.
cudaError_t report(cudaError_t error, const std::string& message);

// The dynamic shared memory bound of `kernel` (cudaFuncSetAttribute; 48 KB by default).
int max_dynamic_smem(const void* kernel);

// The demangled name of a kernel function, or its address when it has no symbol.
std::string kernel_name(const void* kernel);

// A cp.async in flight: the shared memory it writes and the 16 bytes it will write there (read
// from global memory when it was issued).
struct AsyncCopy {
    unsigned char* smem;
    unsigned char bytes[16];
};

// One thread's cp.async copies in flight: those issued since its last commit_group, then its
// committed groups, oldest first (runtime/ptx.cpp completes them at wait_group).
struct AsyncCopies {
    std::vector<AsyncCopy> open;
    std::deque<std::vector<AsyncCopy>> groups;
};

// The running thread's (launch.cpp keeps them with the thread; a block starts with none).
AsyncCopies& async_copies();

namespace ptx {
// Faults unless the shared memory that `copy` will write still holds the 0xFF bytes cp_async_16
// left there: a write to it while the copy was in flight is a race on the GPU.
void check_unwritten(const AsyncCopy& copy);
// check_unwritten for every copy still in flight (at a thread's return: they land after it).
void check_landed(const AsyncCopies& copies);
}  // namespace ptx

}  // namespace simt
