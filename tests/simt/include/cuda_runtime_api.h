// The CUDA runtime API as far as csrc/ uses it, for the SIMT emulator (simt.h). Error codes and
// attribute ids have the toolkit's values; the functions act on the one emulated device 0.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "simt.h"

#define CUDART_VERSION 13000  // the runtime API these declarations follow

enum cudaError_t : int {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorInvalidDevice = 101,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorMisalignedAddress = 716,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
};
typedef cudaError_t cudaError;

typedef struct CUstream_st* cudaStream_t;

const char* cudaGetErrorName(cudaError_t error);
// The toolkit's description; for the error of the latest emulator fault, that fault's message.
const char* cudaGetErrorString(cudaError_t error);
// The last error of any call on this OS thread, reset to cudaSuccess (cudaPeekAtLastError keeps it).
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);  // 0 only
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceSynchronize();    // launches are synchronous: nothing to wait for

// ----------------------------------------------------------------------------- function attributes

enum cudaFuncAttribute : int {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

struct cudaFuncAttributes {
    size_t sharedSizeBytes;  // static shared memory: unknown to the emulator, 0
    size_t constSizeBytes;
    size_t localSizeBytes;
    int maxThreadsPerBlock;  // 1024: __launch_bounds__ is not seen
    int numRegs;             // 0: unknown
    int ptxVersion;          // 90: the code "waits for the previous grid" (common.cuh)
    int binaryVersion;
    int cacheModeCA;
    int maxDynamicSharedSizeBytes;
    int preferredShmemCarveout;
};

// Per kernel, as on the GPU: the dynamic shared memory bound (default 48 KB, at most 227 KB).
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func);

template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* func) {
    return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(func));
}

// A documented estimate, not CUDA's calculation (registers and static shared memory are unknown
// here): an SM of 2048 threads and at most 32 blocks, and 228 KB of shared memory shared by the
// blocks' dynamic shared memory, i.e. min(2048 / blockSize, 32, 228 KB / dynamicSMemSize).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, const void* func, int blockSize,
                                                          size_t dynamicSMemSize);

template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, F* func, int blockSize,
                                                          size_t dynamicSMemSize) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, reinterpret_cast<const void*>(func), blockSize,
                                                         dynamicSMemSize);
}

// ----------------------------------------------------------------------------- launches

enum cudaLaunchAttributeID : int {
    cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};

union cudaLaunchAttributeValue {
    char pad[64];
    int programmaticStreamSerializationAllowed;
};

struct cudaLaunchAttribute {
    cudaLaunchAttributeID id;
    cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute* attrs;
    unsigned int numAttrs;
};

namespace simt {

// What every thread of a launch runs: run(closure) calls the kernel with its arguments.
struct KernelBody {
    void (*run)(const void* closure);
    const void* closure;
};

// Validates the configuration as CUDA does (cudaErrorInvalidConfiguration: block size outside
// [1, 1024] or a dimension over (1024, 1024, 64), grid x outside [1, 2^31 - 1], y or z outside
// [1, 65535], dynamic shared memory over the kernel's bound), then runs every block of the grid
// before returning. Attributes are accepted and ignored.
cudaError_t launch(const cudaLaunchConfig_t& config, const void* kernel, KernelBody body);

}  // namespace simt

// Each thread calls kernel(args...) with its own copy of the arguments, converted once to the
// kernel's parameter types (as CUDA copies them into the launch).
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
    struct Closure {
        void (*kernel)(Params...);
        std::tuple<std::decay_t<Params>...> params;
    };
    const Closure closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    const auto run = [](const void* c) {
        const Closure& self = *static_cast<const Closure*>(c);
        std::apply(self.kernel, self.params);
    };
    return simt::launch(*config, reinterpret_cast<const void*>(kernel), simt::KernelBody{run, &closure});
}
