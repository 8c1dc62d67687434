// bfloat16 for the SIMT emulator (simt.h): storage as in CUDA and torch (2 bytes, the top half of
// an fp32) and exact round-to-nearest-even conversions from float.
#pragma once

#include <bit>
#include <cstdint>

struct __nv_bfloat16 {
    unsigned short __x;
};

struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;  // x in the low 16 bits
};

static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__nv_bfloat162) == 4);

inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(uint32_t(h.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t bits = std::bit_cast<uint32_t>(f);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{0x7FFFu};  // NaN: CUDA's canonical NaN
    // Adding 0x7FFF plus the lowest kept bit rounds the dropped half to nearest, ties to even;
    // a carry runs into the exponent (up to inf) as it should.
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return __nv_bfloat16{static_cast<unsigned short>(bits >> 16)};
}

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
