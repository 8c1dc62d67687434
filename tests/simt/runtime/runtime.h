// Internal interface between the emulator's runtime files (api.cpp, launch.cpp, ptx.cpp).
#pragma once

#include <string>

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

}  // namespace simt
