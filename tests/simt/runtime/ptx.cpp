// The PTX behind csrc/common.cuh's wrappers, emulated per the PTX ISA (declared and documented in
// simt_ptx_ops.h): cp.async, ldmatrix (.x4, .trans) and mma.sync m16n8k16 with fp32 accumulators.
#include <array>
#include <cstring>
#include <utility>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "runtime.h"

namespace simt::ptx {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ----------------------------------------------------------------------------- ldmatrix

// The 16-bit element at (row, col) of matrix m, whose rows lanes 8m..8m+7 point at.
uint16_t element(const Slot (&in)[kWarpSize], int m, int row, int col) {
    const auto* p = from_slot<const unsigned char*>(in[8 * m + row]);
    uint16_t e;
    std::memcpy(&e, p + 2 * col, 2);
    return e;
}

template <bool TRANS>
void ldmatrix_combine(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const void* row = from_slot<const void*>(in[lane]);
        if (!aligned16(row))
            fault(cudaErrorMisalignedAddress, "ldmatrix: lane %d's row address %p is not 16-byte aligned", lane, row);
        check_shared(row, 16, "ldmatrix");
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const int g = lane / 4, t = lane % 4;
        uint32_t r[4];
        for (int m = 0; m < 4; ++m) {
            const uint16_t lo = TRANS ? element(in, m, 2 * t, g) : element(in, m, g, 2 * t);
            const uint16_t hi = TRANS ? element(in, m, 2 * t + 1, g) : element(in, m, g, 2 * t + 1);
            r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
        to_slot(out[lane], r);
    }
}

// ----------------------------------------------------------------------------- mma

struct MmaIn {
    uint32_t a[4], b[2];
    float c[4];
};

float lo_half(uint32_t r, MmaType type) {
    const uint16_t bits = uint16_t(r & 0xFFFFu);
    return type == MmaType::kF16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

float hi_half(uint32_t r, MmaType type) { return lo_half(r >> 16, type); }

// Unpacks every lane's fragments into A (16x16), B (16x8, [k][n]) and C (16x8).
void gather(const Slot (&in)[kWarpSize], MmaType type, float (&A)[16][16], float (&B)[16][8], float (&C)[16][8]) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const MmaIn f = from_slot<MmaIn>(in[lane]);
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {  // a[i]: rows g (i even) or g + 8 (i odd), columns 2t.. (+8 for i >= 2)
            const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
            A[row][col] = lo_half(f.a[i], type);
            A[row][col + 1] = hi_half(f.a[i], type);
        }
        for (int i = 0; i < 2; ++i) {  // b[i]: k = 2t.. (+8 for i = 1), n = g
            B[2 * t + 8 * i][g] = lo_half(f.b[i], type);
            B[2 * t + 8 * i + 1][g] = hi_half(f.b[i], type);
        }
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = f.c[i];
    }
}

template <MmaType TYPE>
void mma_combine(const Slot (&in)[kWarpSize], Slot (&out)[kWarpSize]) {
    float A[16][16], B[16][8], C[16][8];
    gather(in, TYPE, A, B, C);
    for (int lane = 0; lane < kWarpSize; ++lane) {
        const int g = lane / 4, t = lane % 4;
        float d[4];
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            float acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // exact product, fp32 sum
            d[i] = acc;
        }
        to_slot(out[lane], d);
    }
}

}  // namespace

void check_unwritten(const AsyncCopy& copy) {
    for (int i = 0; i < 16; ++i)
        if (copy.smem[i] != 0xFF)
            fault(cudaErrorLaunchFailure, "shared memory at %p was written while a cp.async to it was in flight "
                  "(it may land before or after that write)", static_cast<void*>(copy.smem));
}

void check_landed(const AsyncCopies& copies) {
    for (const AsyncCopy& copy : copies.open) check_unwritten(copy);
    for (const auto& group : copies.groups)
        for (const AsyncCopy& copy : group) check_unwritten(copy);
}

void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16)
        fault(cudaErrorLaunchFailure, "cp.async: src-size %d outside [0, 16]", src_bytes);
    if (!aligned16(smem) || !aligned16(gmem))
        fault(cudaErrorMisalignedAddress, "cp.async of 16 bytes from %p to %p: both must be 16-byte aligned", gmem,
              smem);
    check_shared(smem, 16, "cp.async");
    AsyncCopy copy{static_cast<unsigned char*>(smem), {}};
    std::memcpy(copy.bytes, gmem, size_t(src_bytes));  // the rest stays zero
    std::memset(smem, 0xFF, 16);  // in flight: NaN to a read before the wait, or to one of the old contents after
    async_copies().open.push_back(copy);
}

void cp_async_commit() {
    AsyncCopies& copies = async_copies();
    copies.groups.push_back(std::move(copies.open));  // a commit with no copies makes an empty group
    copies.open.clear();
}

void cp_async_wait(int newest_pending) {
    AsyncCopies& copies = async_copies();
    while (int(copies.groups.size()) > newest_pending) {
        for (const AsyncCopy& copy : copies.groups.front()) {
            check_unwritten(copy);
            std::memcpy(copy.smem, copy.bytes, 16);
        }
        copies.groups.pop_front();
    }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
    using Words = std::array<uint32_t, 4>;
    const Words words = trans ? collective<Words>("ldmatrix.x4.trans", kFullMask, smem, ldmatrix_combine<true>)
                              : collective<Words>("ldmatrix.x4", kFullMask, smem, ldmatrix_combine<false>);
    for (int i = 0; i < 4; ++i) r[i] = words[i];
}

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {d[0], d[1], d[2], d[3]}};
    using Floats = std::array<float, 4>;
    const Floats out = type == MmaType::kF16
                           ? collective<Floats>("mma.m16n8k16.f16", kFullMask, in, mma_combine<MmaType::kF16>)
                           : collective<Floats>("mma.m16n8k16.bf16", kFullMask, in, mma_combine<MmaType::kBF16>);
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace simt::ptx
