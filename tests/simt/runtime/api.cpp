// The CUDA runtime API calls of the SIMT emulator (cuda_runtime_api.h) other than the launch:
// errors, the one device, kernel attributes, occupancy.
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "runtime.h"

namespace {

constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kSmThreads = 2048, kSmBlocks = 32, kSmSharedBytes = 228 * 1024;  // sm_90, for the estimate

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaError_t t_fault_error = cudaSuccess;  // the latest launch failure and its description
thread_local std::string t_fault_text;

// Kernel attributes are process-wide, as on the GPU.
std::mutex g_attributes_mutex;
std::map<const void*, int> g_max_dynamic_smem;

}  // namespace

namespace simt {

cudaError_t record_error(cudaError_t error) {
    if (error != cudaSuccess) t_last_error = error;
    return error;
}

cudaError_t report(cudaError_t error, const std::string& message) {
    std::fprintf(stderr, "SIMT emulator: %s\n", message.c_str());
    t_fault_error = cudaSuccess;  // cudaGetErrorString's own text, not the previous fault's
    t_fault_text = std::string(cudaGetErrorString(error)) + " [SIMT emulator: " + message + "]";
    t_fault_error = error;
    return record_error(error);
}

int max_dynamic_smem(const void* kernel) {
    std::lock_guard<std::mutex> lock(g_attributes_mutex);
    const auto it = g_max_dynamic_smem.find(kernel);
    return it == g_max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
}

std::string kernel_name(const void* kernel) {
    Dl_info info;
    if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr) {
        int status = 0;
        char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
        std::string s = status == 0 && name != nullptr ? name : info.dli_sname;
        std::free(name);
        return s;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, "kernel %p", kernel);
    return buf;
}

}  // namespace simt

// ----------------------------------------------------------------------------- errors

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
        case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
        case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorNotSupported: return "cudaErrorNotSupported";
    }
    return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
    if (error == t_fault_error && !t_fault_text.empty()) return t_fault_text.c_str();
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDeviceFunction: return "invalid device function";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
        case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
        case cudaErrorMisalignedAddress: return "misaligned address";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
        case cudaErrorNotSupported: return "operation not supported";
    }
    return "unrecognized error code";
}

cudaError_t cudaGetLastError() {
    const cudaError_t error = t_last_error;
    t_last_error = cudaSuccess;
    return error;
}

cudaError_t cudaPeekAtLastError() { return t_last_error; }

// ----------------------------------------------------------------------------- the device

cudaError_t cudaGetDevice(int* device) {
    if (device == nullptr) return simt::record_error(cudaErrorInvalidValue);
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return simt::record_error(device == 0 ? cudaSuccess : cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceCount(int* count) {
    if (count == nullptr) return simt::record_error(cudaErrorInvalidValue);
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ----------------------------------------------------------------------------- kernels

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
    if (func == nullptr) return simt::record_error(cudaErrorInvalidDeviceFunction);
    switch (attr) {
        case cudaFuncAttributeMaxDynamicSharedMemorySize: {
            if (value < 0 || value > simt::kMaxDynamicSmem) return simt::record_error(cudaErrorInvalidValue);
            std::lock_guard<std::mutex> lock(g_attributes_mutex);
            g_max_dynamic_smem[func] = value;
            return cudaSuccess;
        }
        case cudaFuncAttributePreferredSharedMemoryCarveout:
            return simt::record_error(value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue);
    }
    return simt::record_error(cudaErrorInvalidValue);
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
    if (attr == nullptr) return simt::record_error(cudaErrorInvalidValue);
    if (func == nullptr) return simt::record_error(cudaErrorInvalidDeviceFunction);
    *attr = cudaFuncAttributes{};
    attr->maxThreadsPerBlock = 1024;
    attr->ptxVersion = 90;
    attr->binaryVersion = 90;
    attr->maxDynamicSharedSizeBytes = simt::max_dynamic_smem(func);
    attr->preferredShmemCarveout = -1;
    return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, const void* func, int blockSize,
                                                          size_t dynamicSMemSize) {
    if (numBlocks == nullptr || blockSize < 1 || blockSize > 1024) return simt::record_error(cudaErrorInvalidValue);
    if (func == nullptr) return simt::record_error(cudaErrorInvalidDeviceFunction);
    int blocks = std::min(kSmThreads / blockSize, kSmBlocks);
    if (dynamicSMemSize > 0) blocks = std::min<int>(blocks, int(kSmSharedBytes / dynamicSMemSize));
    *numBlocks = blocks;
    return cudaSuccess;
}
