// The PTX that csrc/common.cuh wraps in inline asm, emulated per the PTX ISA (runtime/ptx.cpp):
// cp.async, ldmatrix and mma.sync. simt_ptx.h gives them common.cuh's names.
#pragma once

#include <cstdint>

namespace simt::ptx {

// cp.async.cg.shared.global, 16 bytes: the first src_bytes from global memory, the rest zero.
// Asynchronous as on the GPU, and as late as it may be: the global bytes are read at once, the
// destination is filled with 0xFF bytes (NaN in fp32/fp16/bf16), and the copy lands only when
// the issuing thread's cp_async_wait retires its group. So a read of the tile before its wait
// (and barrier), or a copy issued over a tile other threads still read, gives NaNs.
void cp_async_16(void* smem, const void* gmem, int src_bytes);

// cp.async.commit_group: the running thread's copies issued since its last commit become a group.
void cp_async_commit();

// cp.async.wait_group N: lands the running thread's oldest committed groups until at most
// newest_pending remain in flight (copies not yet committed stay in flight).
void cp_async_wait(int newest_pending);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: a warp collective. Lane l gives the address
// of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned). Lane l receives, of matrix i, in
// r[i]: row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (low half first); with .trans, rows
// 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the matrix transposed).
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);

enum class MmaType { kF16, kBF16 };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C with C = D: a
// warp collective, fragments per the PTX ISA ("Matrix Fragments for mma.m16n8k16"), for lane
// l with g = l / 4, t = l % 4:
//   A (16x16): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 8+2t..), a[3] = (g+8, 8+2t..)
//   B (16x8):  b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 8+2t.., n = g)
//   C, D:      d[0], d[1] = (g, 2t), (g, 2t+1); d[2], d[3] = (g+8, 2t), (g+8, 2t+1)
// Products are exact in fp32; each is added to C in k order, in fp32.
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

}  // namespace simt::ptx
