// IEEE binary16 for the SIMT emulator (simt.h): storage as in CUDA and torch (2 bytes, the bits
// in __x) and exact round-to-nearest-even conversions from float.
#pragma once

#include <bit>
#include <cstdint>

struct __half {
    unsigned short __x;
};

struct alignas(4) __half2 {
    __half x, y;  // x in the low 16 bits
};

static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4);

inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, exponent = (h.__x >> 10) & 0x1Fu, mantissa = h.__x & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1F) {  // inf, NaN (payload kept)
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {  // normal: rebias 15 -> 127
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    return std::bit_cast<float>(bits);
}

// Rounds `value` >> shift to nearest, ties to even (shift >= 1).
inline uint32_t __simt_shift_rne(uint32_t value, int shift) {
    const uint32_t kept = value >> shift, rest = value & ((1u << shift) - 1), half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1)));
}

inline __half __float2half_rn(float f) {
    const uint32_t bits = std::bit_cast<uint32_t>(f);
    const unsigned short sign = (bits >> 16) & 0x8000u;
    const uint32_t a = bits & 0x7FFFFFFFu;
    uint32_t h;
    if (a > 0x7F800000u) {
        h = 0x7FFFu;  // NaN: CUDA's canonical NaN
    } else if (a >= 0x477FF000u) {
        h = 0x7C00u;  // >= 65520 (halfway past the largest half, 65504) and inf: inf
    } else if (a >= 0x38800000u) {
        h = __simt_shift_rne(a - 0x38000000u, 13);  // normal: rebias 127 -> 15; a carry bumps the exponent
    } else if (a > 0x33000000u) {
        // subnormal: (1.m * 2^(e - 127)) / 2^-24 = mantissa24 >> (126 - e), 14 <= shift <= 24
        const uint32_t e = a >> 23;
        h = __simt_shift_rne((a & 0x7FFFFFu) | 0x800000u, int(126 - e));
    } else {
        h = 0;  // <= 2^-25: zero (2^-25 itself is the tie between 0 and 2^-24: even)
    }
    return __half{static_cast<unsigned short>(sign | h)};
}

inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
