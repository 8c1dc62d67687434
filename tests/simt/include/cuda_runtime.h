// cuda_runtime.h for the SIMT emulator (simt.h): the runtime API, device-side CUDA, and the PTX
// operations behind csrc/common.cuh's wrappers (simt_ptx.h).
#pragma once

#include "cuda_runtime_api.h"
#include "simt_device.h"
#include "simt_ptx_ops.h"
