"""Fused residual-add + LayerNorm over the last dim, in Triton.

    h = x + residual                     (rounded to x's dtype, as torch computes it)
    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias

Statistics are fp32: the mean first, then the variance of the centred values (never
E[h^2] - E[h]^2, which cancels badly when |mean| >> std). The mean sums h - h0, h0 the row's
first element: a constant row's mean is then exactly its value and its variance 0, as torch's
(sum(h) / N rounds: 7.77 x 768 gave y = +-1 at eps 1e-12, not 0). x and residual are read once,
h and y written once. Rows of up to MAX_FUSED_N elements sit in registers (several rows per
program when they are short); longer rows stream through in chunks.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from fastgpt._backends import LayerNormOutput
from fastgpt.kernels.sizes import cdiv, next_power_of_2

MAX_FUSED_N = 16384  # longest row normalised from registers; longer rows take the chunked kernel
CHUNK_N = 4096  # chunk of the chunked kernel
TILE = 2048  # elements per program for short rows: BLOCK_M = TILE // BLOCK_N rows
# Up to this many rows (a decode step's batch), one row a program, on a warp per 128 elements up
# to SPREAD_WARPS: torch.compile's persistent reduction's form (8 warps, 4 elements a thread at
# GPT-2's 768), which took 2.09 us against this kernel's 2.32 (two rows a program, 4 warps) at
# 32 x 768 on an H200 (bf16, 2026-11-30). A grid this small is all latency: more programs and
# threads put more of the rows' loads in flight at once. Not yet measured on a GPU in this form
# (gpu-probe's layer_norm_rows section; 0 turns it off).
SPREAD_MAX_ROWS = 128
SPREAD_WARPS = 8


@triton.jit
def _affine(w_ptr, b_ptr, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm's weight and bias on cols as fp32 (1, BLOCK_N) rows; 0 where absent (unused)."""
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] if HAS_WEIGHT else 0.0
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
    return w, b


@triton.jit
def _first(x_ptr, r_ptr, rows, row_ok, stride_x_m, stride_r_m, HAS_RESIDUAL: tl.constexpr):
    """Each of rows' first element of h = x (+ r, rounded to x's dtype as h is), fp32 (0 where
    not row_ok): the shift of the statistics' sums."""
    h0 = tl.load(x_ptr + rows * stride_x_m, mask=row_ok, other=0.0)
    if HAS_RESIDUAL:
        h0 += tl.load(r_ptr + rows * stride_r_m, mask=row_ok, other=0.0)
    return h0.to(tl.float32)


# Rows [pid * BLOCK_M, pid * BLOCK_M + BLOCK_M), each whole in registers (BLOCK_N >= N):
#   h = x + r;  mean = h0 + sum(h - h0) / N;  d = h - mean;  var = sum(d * d) / N
#   y = d * rsqrt(var + eps) * w + b
@triton.jit
def _layer_norm_fused_kernel(
    x_ptr,  # (M, N) row stride stride_x_m, unit column stride
    r_ptr,  # (M, N) row stride stride_r_m, x's dtype; read only when HAS_RESIDUAL
    w_ptr,  # (N,) any float dtype; read only when HAS_WEIGHT
    b_ptr,  # (N,) any float dtype; read only when HAS_BIAS
    y_ptr,  # (M, N) contiguous, x's dtype
    h_ptr,  # (M, N) contiguous, x's dtype; written only when HAS_RESIDUAL
    M,
    N,
    stride_x_m,
    stride_r_m,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 64-bit rows: M * N may exceed 2^31, and so may the first row's index pid * BLOCK_M (M >= 2^31
    # rows of a few elements), which in 32 bits would wrap to a negative row that passes rows < M.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    h0 = _first(x_ptr, r_ptr, rows, rows < M, stride_x_m, stride_r_m, HAS_RESIDUAL)  # (BLOCK_M,)
    rows = rows[:, None]
    # Rows up to 4096 load weight and bias first: after the statistics' reductions (barriers) they
    # are a second round trip to memory, most of a short row's time. Longer rows load them last:
    # held from the start they spill (ptxas: ~130 bytes at 16384 on 16 warps).
    WEIGHTS_FIRST: tl.constexpr = BLOCK_N <= 4096
    if WEIGHTS_FIRST:
        w, b = _affine(w_ptr, b_ptr, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
    h = tl.load(x_ptr + rows * stride_x_m + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + rows * stride_r_m + cols[None, :], mask=mask, other=0.0)
        tl.store(h_ptr + rows * N + cols[None, :], h, mask=mask)
    h = h.to(tl.float32)
    mean = tl.sum(tl.where(mask, h - h0[:, None], 0.0), axis=1) / N + h0
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
    y = d * rstd[:, None]
    if not WEIGHTS_FIRST:
        w, b = _affine(w_ptr, b_ptr, cols, col_ok, HAS_WEIGHT, HAS_BIAS)
    if HAS_WEIGHT:
        y *= w
    if HAS_BIAS:
        y += b
    tl.store(y_ptr + rows * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# One row per program, in chunks of BLOCK_N. Pass 1 writes h and merges each chunk's
# (count n_b, mean m_b, centred sum of squares M2_b) of g = h - h0 into the running
# (n_a, m_a, M2_a), as in Chan et al.:  n = n_a + n_b,  delta = m_b - m_a,
#   m = m_a + delta * n_b / n,   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
# Pass 2 re-reads h (the row just written, or x without a residual) and writes
# y = (h - (h0 + m)) * rstd.
@triton.jit
def _layer_norm_chunked_kernel(
    x_ptr,  # (M, N) row stride stride_x_m, unit column stride
    r_ptr,  # (M, N) row stride stride_r_m, x's dtype; read only when HAS_RESIDUAL
    w_ptr,  # (N,) any float dtype; read only when HAS_WEIGHT
    b_ptr,  # (N,) any float dtype; read only when HAS_BIAS
    y_ptr,  # (M, N) contiguous, x's dtype
    h_ptr,  # (M, N) contiguous, x's dtype; written only when HAS_RESIDUAL
    stride_x_m,
    stride_r_m,
    eps,
    N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h0 = _first(x_ptr, r_ptr, row + tl.arange(0, 1), row >= 0, stride_x_m, stride_r_m, HAS_RESIDUAL)  # (1,)
    x_ptr += row * stride_x_m
    h_ptr += row * N
    y_ptr += row * N
    mean = tl.zeros([1], dtype=tl.float32)  # of h - h0
    m2 = tl.zeros([1], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(x_ptr + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h += tl.load(r_ptr + row * stride_r_m + cols, mask=mask, other=0.0)
            tl.store(h_ptr + cols, h, mask=mask)
        g = tl.where(mask, h.to(tl.float32) - h0, 0.0)
        n_a = start * 1.0
        n_b = tl.sum(mask.to(tl.float32), axis=0)
        mean_b = tl.sum(g, axis=0) / n_b
        d = tl.where(mask, g - mean_b, 0.0)
        delta = mean_b - mean
        mean += delta * (n_b / (n_a + n_b))
        m2 += tl.sum(d * d, axis=0) + delta * delta * (n_a * n_b / (n_a + n_b))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    mean += h0  # of h
    if HAS_RESIDUAL:
        x_ptr = h_ptr
        tl.debug_barrier()  # make this block's writes of h visible to all of its threads
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        y = (tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _num_warps(elements: int) -> int:
    """About 4 elements of 4 bytes (or 8 of 2 bytes) per thread and load: 16-byte accesses."""
    return max(1, min(16, elements // 512))


def fused_tile(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the fused kernel for M rows of N <= MAX_FUSED_N: TILE
    elements a program, or one row a program up to SPREAD_MAX_ROWS rows."""
    block_n = next_power_of_2(N)
    if M <= SPREAD_MAX_ROWS:
        return 1, block_n, max(_num_warps(block_n), min(SPREAD_WARPS, block_n // 128))
    block_m = min(max(1, TILE // block_n), next_power_of_2(M))
    return block_m, block_n, _num_warps(block_m * block_n)


def layer_norm(x, weight, bias, *, eps: float, residual=None) -> LayerNormOutput:
    """Residual-add + LayerNorm of each row of x.

    x: (M, N) fp32/fp16/bf16 with x.stride(1) == 1 (any row stride). weight, bias: (N,)
    contiguous, any float dtype, or None. residual: (M, N) in x's dtype with stride(1) == 1, or
    None. Returns LayerNormOutput(y, h): y = LN(x + residual) (M, N) contiguous in x's dtype;
    h = x + residual (M, N) contiguous in x's dtype, or None when residual is None.
    """
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    flags = dict(
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None
    )
    # Absent tensors are never read: x stands in for their pointers.
    pointers = (
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        y if h is None else h,
    )
    stride_r_m = 0 if residual is None else residual.stride(0)
    if N <= MAX_FUSED_N:
        block_m, block_n, num_warps = fused_tile(M, N)
        _layer_norm_fused_kernel[(cdiv(M, block_m),)](
            *pointers, M, N, x.stride(0), stride_r_m, eps,
            **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    else:
        _layer_norm_chunked_kernel[(M,)](
            *pointers, x.stride(0), stride_r_m, eps,
            N=N, **flags, BLOCK_N=CHUNK_N, num_warps=_num_warps(CHUNK_N),
        )  # fmt: skip
    return LayerNormOutput(y, h)
