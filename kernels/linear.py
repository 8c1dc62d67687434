"""A linear layer for a few rows, with GPT-2's neighbours fused in, in Triton.

    h = x + residual                           (optional; rounded to x's dtype, written once)
    a = LN(h) * ln_weight + ln_bias            (optional; fp32 statistics, rounded to x's dtype)
    out = act(a @ weight.T + bias)             (act: none, or GELU's tanh form; fp32 accumulation)

This is a decode step's matrix-vector work (batch 1 to MAX_ROWS rows): it reads every weight
once and is bound by those bytes, and a GPT-2 step on a GPU is bound by its launch count as much,
so each launch here does the work of two or three (add + LayerNorm, matmul, GELU; for GPT's q|k|v
projection also the write of k and v into the cache). Two kernels, one contract:

- _linear_kernel (tiled): every program owns BLOCK_N output columns of all M rows (padded to
  BLOCK_M, a power of two >= 16, for tl.dot) and streams their weight rows through in BLOCK_K
  steps, several in flight (cp.async).
- _gemv_kernel (matrix-vector, up to GEMV_MAX_ROWS rows; gemv_columns): every program loads the
  whole weight rows of a few columns at once and sums their products with each input row.

A narrow matmul over a long K (GPT-2's MLP c_proj: 48 programs of 16 columns over K 3072) leaves
most SMs idle and each program waiting out a dozen K steps, so given the caller's counters the
tiled kernel splits K (k_splits): each split stores its partial sums (fp32) and the last split of
a column block to finish (a counter, acquire-release) adds them up in split order and runs the
epilogue; the counter is zero again after, and the result the same whichever split finishes last.

In both the LayerNorm statistics of the M input rows (a few KB, from L2) are recomputed by each
program rather than stored, and program 0 writes h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt._backends import launch_pdl, sm_count
from fastgpt.kernels.pdl import _prefetch_l2, _wait_for_previous_grid
from fastgpt.kernels.sizes import cdiv, next_power_of_2

MAX_ROWS = 64  # rows of one launch (fastgpt.ops.linear.MAX_ROWS), padded to a power of two >= 16 for tl.dot
BLOCK_N = 16  # output columns per program: N / 16 programs (48 for GPT-2's 768) to spread the weight reads
WIDE_N = 16384  # from here (a vocabulary: lm_head), WIDE_BLOCK_N columns a program
WIDE_BLOCK_N = 64  # up to 32 rows: fewer programs re-reading the rows and their statistics (gpu_tiles)
BLOCK_K = 128  # weight tile (BLOCK_N, BLOCK_K) per step of the main loop, with a LayerNorm fused
NARROW_LN_BLOCK_K = 256  # with a LayerNorm, N < WIDE_N and up to 32 rows (gpu_tiles)
BLOCK_K_FP32 = 32  # fp32 tiles are twice the bytes, and their ieee dots stage more: 64 rows fit 99 KB
TILE_ELEMENTS = 8192  # without a LayerNorm: x tiles of BLOCK_M x (8192 / BLOCK_M), BLOCK_K 512 at 16 rows
STATS_ELEMENTS = 8192  # the LayerNorm statistics' step: M' x (8192 / M'), M' = M rounded up to a power of two
NUM_WARPS = 4
NUM_STAGES = 3  # weight tiles in flight per program
SPLIT_K_MAX = 4  # K splits of the tiled kernel at most (k_splits; 1: never split)
SPLIT_MIN_STEPS = 2  # BLOCK_K steps a split takes at least (a pipeline to keep full)
_INTERPRETER_SMS = 4  # a pretend SM count on CPU tensors, so the interpreter splits small grids too
PREFETCH_WEIGHTS = True  # as a programmatic dependent, ask L2 for the program's weight rows before waiting
_INTERPRETER_BLOCK_K = 32
# The matrix-vector kernel (gemv_columns) for up to GEMV_MAX_ROWS rows (0: never), each program
# holding GEMV_TILE_BYTES of whole weight rows in registers (64 bytes a thread at GEMV_WARPS 4).
# Each program also reads its input rows (from L2): at K 3072 (one column a program) one row is
# as many bytes as the program's weights, so the rows it pays for are few. Not yet measured on a
# GPU against the tiled kernel: gpu-probe's linear section compares the two at 1, 2 and 4 rows
# and over the tile, its decode_step section GPT-2's step with and without it.
GEMV_MAX_ROWS = 1
GEMV_TILE_BYTES = 8192
GEMV_WIDE_TILE_BYTES = 0  # lm_head's tile (0: the tiled kernel's wide programs, measured; the probe tries 16, 32 KB)
GEMV_WARPS = 4


@triton.jit
def _table_rows(idx_ptr, rows, row_ok, table_rows, GATHER: tl.constexpr):
    """The rows of x (or residual) that input rows `rows` read: themselves, or with GATHER the
    table rows idx[rows] (an embedding lookup); and which of them to read (ids outside
    [0, table_rows) read zeros)."""
    if GATHER:
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
        return idx, row_ok & (idx >= 0) & (idx < table_rows)
    return rows, row_ok


@triton.jit
def _input_block(x_ptr, r_ptr, x_rows, x_ok, r_rows, r_ok, cols, col_ok, stride_x, stride_r,
                 HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """x (+ residual) on (rows, cols), in x's dtype (0 where masked)."""
    h = tl.load(x_ptr + x_rows[:, None] * stride_x + cols[None, :], mask=x_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + r_rows[:, None] * stride_r + cols[None, :], mask=r_ok[:, None] & col_ok[None, :],
                     other=0.0)  # fmt: skip
    return h


@triton.jit
def _prefetch_weight_rows(w_ptr, pid, N, K, stride_wn, BLOCK_N: tl.constexpr):
    """Ask L2 for the K weights of each of program pid's BLOCK_N columns (rows of w): a hint, so
    it may come before _wait_for_previous_grid (kernels/pdl.py)."""
    w_row = w_ptr + tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64) * stride_wn
    _prefetch_l2(w_row, tl.full([BLOCK_N], K * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), tl.int32))


@triton.jit
def _ln_params(ln_w_ptr, ln_b_ptr, ks, k_ok, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr):
    """The LayerNorm's weight and bias at columns ks, (1, C) fp32 each (0 where absent: unused)."""
    ln_w = tl.zeros([1, ks.shape[0]], tl.float32)
    ln_b = tl.zeros([1, ks.shape[0]], tl.float32)
    if HAS_LN_WEIGHT:
        ln_w = tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LN_BIAS:
        ln_b = tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return ln_w, ln_b


@triton.jit
def _normalised(a, mean, rstd, ln_w, ln_b, mask, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr):
    """The block a (R, C) normalised, (a - mean) * rstd * ln_w + ln_b with mean and rstd (R,) fp32
    (no multiply or add for an absent weight or bias), rounded to a's dtype as the unfused
    LayerNorm rounds it; 0 where masked."""
    y = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if HAS_LN_WEIGHT:
        y *= ln_w
    if HAS_LN_BIAS:
        y += ln_b
    return tl.where(mask, y, 0.0).to(a.dtype)


@triton.jit
def _normalised_row(a, ks, mask, K, eps, ln_w, ln_b, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr):
    """One row held whole, a (1, C) at columns ks (C >= K), normalised as _normalised does, its
    statistics in one pass relative to its first element (as _ln_stats: a constant row is exact)."""
    hf = a.to(tl.float32)
    h0 = tl.sum(tl.where(ks[None, :] == 0, hf, 0.0), axis=1)  # (1,)
    mean = h0 + tl.sum(tl.where(mask, hf - h0[:, None], 0.0), axis=1) / K
    d = tl.where(mask, hf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
    return _normalised(a, mean, rstd, ln_w, ln_b, mask, HAS_LN_WEIGHT, HAS_LN_BIAS)


# The LayerNorm statistics of the M input rows h = x (+ residual), in one pass over K blocks,
# merging each block's (count n_b, mean m_b, centred sum of squares M2_b) of g = h - h0 (h0 the
# row's first element: a constant row's mean is exactly its value, its variance 0, as torch's)
# into the running (n_a, m_a, M2_a) as Chan et al. (never E[h^2] - E[h]^2):
#   n = n_a + n_b,  delta = m_b - m_a,  m = m_a + delta n_b / n,  M2 = M2_a + M2_b + delta^2 n_a n_b / n
@triton.jit
def _ln_stats(x_ptr, r_ptr, x_idx_ptr, r_idx_ptr, h_ptr, write_h, M, K, stride_x, stride_r, eps, x_table_rows,
              r_table_rows, HAS_RESIDUAL: tl.constexpr, X_GATHER: tl.constexpr, R_GATHER: tl.constexpr,
              STATS_M: tl.constexpr, STATS_BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """(mean, rstd), each (BLOCK_M,) fp32 (rows past M: padding), from (STATS_M, STATS_BLOCK_K) tiles:
    STATS_M is M rounded up to a power of two, not the dot's BLOCK_M, so that one row's statistics
    do not hold 15 padded rows' registers. With write_h, stores h (M, K) too."""
    rows = tl.arange(0, STATS_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    x_rows, x_ok = _table_rows(x_idx_ptr, rows, row_ok, x_table_rows, X_GATHER)
    r_rows, r_ok = _table_rows(r_idx_ptr, rows, row_ok, r_table_rows, R_GATHER)
    first = tl.arange(0, 1)
    h0 = _input_block(x_ptr, r_ptr, x_rows, x_ok, r_rows, r_ok, first, first < K, stride_x, stride_r,
                      HAS_RESIDUAL).to(tl.float32)  # (STATS_M, 1)  # fmt: skip
    mean = tl.zeros([STATS_M], tl.float32)  # of h - h0
    m2 = tl.zeros([STATS_M], tl.float32)
    for k0 in range(0, K, STATS_BLOCK_K):
        ks = k0 + tl.arange(0, STATS_BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        h = _input_block(x_ptr, r_ptr, x_rows, x_ok, r_rows, r_ok, ks, ks < K, stride_x, stride_r, HAS_RESIDUAL)
        if HAS_RESIDUAL:  # noqa: SIM102 (decided at compile time, unlike the run-time if below)
            if write_h:
                tl.store(h_ptr + rows[:, None] * K + ks[None, :], h, mask=mask)
        g = tl.where(mask, h.to(tl.float32) - h0, 0.0)
        n_a = k0 * 1.0
        n_b = tl.minimum(K - k0, STATS_BLOCK_K) * 1.0
        mean_b = tl.sum(g, axis=1) / n_b
        d = tl.where(mask, g - mean_b[:, None], 0.0)
        delta = mean_b - mean
        mean += delta * (n_b / (n_a + n_b))
        m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    mean += tl.sum(h0, axis=1)  # of h
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    if STATS_M < BLOCK_M:  # widen to the dot's rows (a (BLOCK_M, STATS_M) selection, no shuffles)
        widen = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, STATS_M)[None, :]
        mean = tl.sum(tl.where(widen, mean[None, :], 0.0), axis=1)
        rstd = tl.sum(tl.where(widen, rstd[None, :], 0.0), axis=1)
    return mean, rstd


# Program p: columns [p * BLOCK_N, (p + 1) * BLOCK_N) of out, all M rows. With HAS_LN, first the
# rows' statistics (_ln_stats), then per K block a = (h - m) * rsqrt(M2 / K + eps) * ln_weight +
# ln_bias, rounded to x's dtype.
@triton.jit
def _linear_kernel(
    x_ptr,  # (M, K) row stride stride_x, unit column stride; with X_GATHER a table whose rows x_idx picks
    r_ptr,  # (M, K) row stride stride_r, x's dtype: read when HAS_RESIDUAL (which needs HAS_LN); R_GATHER: a table
    x_idx_ptr,  # (M,) int64: row m of the input is x[x_idx[m]] when X_GATHER (zeros outside [0, x_table_rows))
    r_idx_ptr,  # (M,) int64: row m of the residual is residual[r_idx[m]] when R_GATHER
    h_ptr,  # (M, K) contiguous, x's dtype: x + residual, written by program 0 when HAS_RESIDUAL
    ln_w_ptr,  # (K,): read when HAS_LN_WEIGHT
    ln_b_ptr,  # (K,): read when HAS_LN_BIAS
    w_ptr,  # (N, K) strides (stride_wn, stride_wk), x's dtype (stride_wk == 1 on a GPU: the JIT specialises it)
    bias_ptr,  # (N,): read when HAS_BIAS
    out_ptr,  # (M, N) contiguous, x's dtype
    kv_ptr,  # (2, B, H, S, D) x's dtype, unit last stride: out's columns [C, 3C) go here too when KV_CACHE
    kv_pos_ptr,  # (M,) int64: row m's slot in kv's row m // kv_tokens; slots outside [0, S) are not written
    M, N, K, stride_x, stride_r, stride_wn, stride_wk, eps, x_table_rows, r_table_rows,
    stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s, kv_len, head_dim, kv_tokens,
    ws_ptr,  # (num_splits, M, N) fp32: each split's partial sums, when SPLIT
    counters_ptr,  # (cdiv(N, BLOCK_N),) int32, zero between calls: the splits done per column block, when SPLIT
    k_per_split,  # K columns a split takes (a multiple of BLOCK_K): split s takes [s k_per_split, (s + 1) k_per_split)
    num_splits,  # the grid's second dimension: 1 unless SPLIT
    HAS_RESIDUAL: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, KV_CACHE: tl.constexpr, X_GATHER: tl.constexpr, R_GATHER: tl.constexpr,
    GELU_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr, PREFETCH_W: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_M: tl.constexpr,
    STATS_BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    k_start, k_end = 0, K
    if SPLIT:  # this program's part of K
        k_start = tl.program_id(1) * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
    if PREFETCH_W:  # this program's weight rows into L2 while the previous grid finishes (kernels/pdl.py)
        _prefetch_weight_rows(w_ptr + k_start, pid, N, k_end - k_start, stride_wn, BLOCK_N)
    _wait_for_previous_grid(PDL)
    row_ok = tl.arange(0, BLOCK_M) < M
    rows = tl.arange(0, BLOCK_M).to(tl.int64)  # row offsets: rows x a row stride may pass 2^31
    offs_k = tl.arange(0, BLOCK_K)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    x_rows, x_ok = _table_rows(x_idx_ptr, rows, row_ok, x_table_rows, X_GATHER)
    r_rows, r_ok = _table_rows(r_idx_ptr, rows, row_ok, r_table_rows, R_GATHER)

    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LN:
        mean, rstd = _ln_stats(x_ptr, r_ptr, x_idx_ptr, r_idx_ptr, h_ptr, pid == 0, M, K, stride_x, stride_r, eps,
                               x_table_rows, r_table_rows, HAS_RESIDUAL, X_GATHER, R_GATHER, STATS_M, STATS_BLOCK_K,
                               BLOCK_M)  # fmt: skip

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1): N * K may pass 2^31
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_end
        mask = row_ok[:, None] & k_ok[None, :]
        a = _input_block(x_ptr, r_ptr, x_rows, x_ok, r_rows, r_ok, ks, k_ok, stride_x, stride_r, HAS_RESIDUAL)
        if HAS_LN:
            ln_w, ln_b = _ln_params(ln_w_ptr, ln_b_ptr, ks, k_ok, HAS_LN_WEIGHT, HAS_LN_BIAS)
            a = _normalised(a, mean, rstd, ln_w, ln_b, mask, HAS_LN_WEIGHT, HAS_LN_BIAS)
        w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)

    last = True
    if SPLIT:  # the last split of this column block to finish sums the splits' partials, in split order
        out_ok = row_ok[:, None] & col_ok[None, :]
        part = (tl.program_id(1) * M + rows)[:, None] * N + cols[None, :]  # (split, row, column), int64
        tl.store(ws_ptr + part, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partials are stored before the count says so (release)
        last = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel") == num_splits - 1
        if last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for split in range(num_splits):  # .cg: other programs, on other SMs, stored them
                part = (split * M + rows)[:, None] * N + cols[None, :]
                acc += tl.load(ws_ptr + part, mask=out_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counters_ptr + pid, 0)  # zero again for the next call
    if last:
        bias, pos = _epilogue_inputs(bias_ptr, kv_pos_ptr, rows, row_ok, cols, col_ok, HAS_BIAS, KV_CACHE)
        _epilogue(acc, rows, row_ok, cols, col_ok, bias, pos, out_ptr, kv_ptr, N, stride_kv_which, stride_kv_b,
                  stride_kv_h, stride_kv_s, kv_len, head_dim, kv_tokens, HAS_BIAS, GELU_TANH, KV_CACHE)  # fmt: skip


@triton.jit
def _epilogue_inputs(bias_ptr, kv_pos_ptr, rows, row_ok, cols, col_ok, HAS_BIAS: tl.constexpr,
                     KV_CACHE: tl.constexpr):  # fmt: skip
    """What _epilogue reads: the bias of columns `cols` (fp32) and the cache slots of rows `rows`
    (each only where its form has it; zeros and -1 otherwise)."""
    bias = tl.zeros(cols.shape, tl.float32)
    pos = tl.full(rows.shape, -1, tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if KV_CACHE:
        pos = tl.load(kv_pos_ptr + rows, mask=row_ok, other=-1)
    return bias, pos


@triton.jit
def _gelu_tanh(x):
    """GELU's tanh form of fp32 x: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)."""
    z = 1.5957691216057308 * (x + 0.044715 * x * x * x)
    e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow on either side
    return x * tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _epilogue(acc, rows, row_ok, cols, col_ok, bias, pos, out_ptr, kv_ptr, N, stride_kv_which, stride_kv_b,
              stride_kv_h, stride_kv_s, kv_len, head_dim, kv_tokens, HAS_BIAS: tl.constexpr,
              GELU_TANH: tl.constexpr, KV_CACHE: tl.constexpr):  # fmt: skip
    """acc (R, C) fp32, rows `rows` (R,) int64 x columns `cols` (C,) of the output: + bias, GELU,
    stored to out in its dtype, and with KV_CACHE the k and v columns to each row's cache slot
    `pos` (R,) (_epilogue_inputs reads bias and pos)."""
    if HAS_BIAS:
        acc += bias[None, :]
    if GELU_TANH:
        acc = _gelu_tanh(acc)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    if KV_CACHE:  # GPT's fused q|k|v projection: k and v also land in the cache, at each row's slot
        C = N // 3
        kv_col = tl.maximum(cols - C, 0)  # column c of k|v (2C wide): which = c // C, head, d
        which, head, d = kv_col // C, (kv_col % C) // head_dim, kv_col % head_dim
        dst = (kv_ptr + which.to(tl.int64)[None, :] * stride_kv_which + (rows // kv_tokens)[:, None] * stride_kv_b
               + head.to(tl.int64)[None, :] * stride_kv_h + pos[:, None] * stride_kv_s + d[None, :])  # fmt: skip
        slot_ok = row_ok & (pos >= 0) & (pos < kv_len)
        tl.store(dst, out, mask=slot_ok[:, None] & (col_ok & (cols >= C))[None, :])


# The matrix-vector form, for a few rows (M <= GEMV_MAX_ROWS) and rows of at most a tile: program
# p holds the whole weight rows of its BLOCK_N columns, (BLOCK_N, BLOCK_K) with BLOCK_K >= K, and
# asks for all of them in one go, beside the input rows: one round trip to memory (or to L2, where
# the prefetch put them) where the tiled kernel makes one for the statistics and then streams its
# K steps. Each input row in turn: x (+ residual) (1, BLOCK_K), its statistics in one pass (the
# row is in registers), the normalised row rounded to x's dtype, and its BLOCK_N dot products as
# fp32 products summed across the row (no tensor-core tile, so no rows padded to 16 and as few
# columns a program as the tile asks: more programs for GPT-2's narrow matmuls).
@triton.jit
def _gemv_kernel(
    x_ptr, r_ptr, x_idx_ptr, r_idx_ptr, h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, bias_ptr, out_ptr, kv_ptr, kv_pos_ptr,
    M, N, K, stride_x, stride_r, stride_wn, stride_wk, eps, x_table_rows, r_table_rows,
    stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s, kv_len, head_dim, kv_tokens,
    HAS_RESIDUAL: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, KV_CACHE: tl.constexpr, X_GATHER: tl.constexpr, R_GATHER: tl.constexpr,
    GELU_TANH: tl.constexpr, PDL: tl.constexpr, PREFETCH_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """_linear_kernel's arguments (its pointers' comments hold), for M <= GEMV_MAX_ROWS rows (BLOCK_M:
    M rounded up to a power of two) and K <= BLOCK_K."""
    pid = tl.program_id(0)
    if PREFETCH_W:  # this program's weight rows into L2 while the previous grid finishes (kernels/pdl.py)
        _prefetch_weight_rows(w_ptr, pid, N, K, stride_wn, BLOCK_N)
    _wait_for_previous_grid(PDL)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    ln_w, ln_b = _ln_params(ln_w_ptr, ln_b_ptr, ks, k_ok, HAS_LN_WEIGHT, HAS_LN_BIAS)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    bias, pos = _epilogue_inputs(bias_ptr, kv_pos_ptr, rows, rows < M, cols, col_ok, HAS_BIAS, KV_CACHE)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m in tl.static_range(BLOCK_M):
        row = m + tl.arange(0, 1).to(tl.int64)  # (1,): row m, as a one-row tile
        row_ok = row < M
        mask = row_ok[:, None] & k_ok[None, :]
        x_row, x_ok = _table_rows(x_idx_ptr, row, row_ok, x_table_rows, X_GATHER)
        r_row, r_ok = _table_rows(r_idx_ptr, row, row_ok, r_table_rows, R_GATHER)
        a = _input_block(x_ptr, r_ptr, x_row, x_ok, r_row, r_ok, ks, k_ok, stride_x, stride_r, HAS_RESIDUAL)
        if HAS_RESIDUAL:  # noqa: SIM102 (decided at compile time, unlike the run-time if below)
            if pid == 0:
                tl.store(h_ptr + row[:, None] * K + ks[None, :], a, mask=mask)
        if HAS_LN:
            a = _normalised_row(a, ks, mask, K, eps, ln_w, ln_b, HAS_LN_WEIGHT, HAS_LN_BIAS)
        dots = tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1)  # (BLOCK_N,)
        acc = tl.where(tl.arange(0, BLOCK_M)[:, None] == m, dots[None, :], acc)

    _epilogue(acc, rows, rows < M, cols, col_ok, bias, pos, out_ptr, kv_ptr, N, stride_kv_which, stride_kv_b,
              stride_kv_h, stride_kv_s, kv_len, head_dim, kv_tokens, HAS_BIAS, GELU_TANH, KV_CACHE)  # fmt: skip


def gpu_tiles(block_m: int, N: int, K: int, element_size: int, has_ln: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the main loop on the GPU. Without a LayerNorm, 16-bit tiles hold
    TILE_ELEMENTS of x (512 columns at up to 16 rows): GPT-2's narrow matmuls (N = 768: 48
    programs of 16 columns) are each program streaming 16 x K weights, bound by the bytes one
    program keeps in flight (NUM_STAGES - 1 tiles), which a 128-wide step keeps at 8 KB and a
    512-wide one at 32 KB (64 KB of shared memory, 94 registers on sm_90). With a LayerNorm the
    normalised x tile's registers set the step: NARROW_LN_BLOCK_K for up to 32 rows of a form of
    about one wave of programs (c_attn, c_fc), BLOCK_K otherwise. A vocabulary-wide N with a
    LayerNorm (lm_head) takes WIDE_BLOCK_N columns a program up to 32 rows in fp16/bf16. Never
    much wider than K. Measured on an H200 (bf16, K 768, graph replay, gpu-probe's linear of
    2026-11-30), at B 1 / 4 / 16 / 32: ln_1 + c_attn 5.6 / 6.6 / 10.7 / 11.3 us with a 256-wide
    step against 7.8 / 8.3 / 14.6 / 14.8 with 128; ln_2 + c_fc + gelu 5.8 / 6.9 / 10.8 / 11.5
    against 8.1 / 8.6 / 14.7 / 15.0; ln_f + lm_head (N 50257, 3142 programs of 16 columns) 38.8 /
    41.1 / 48.8 / 62.3 with 64 columns against 50.8 / 59.3 / 135.6 / 152.4 with 16, and slower
    with a 256-wide step (58.7 at B1)."""
    wide = N >= WIDE_N
    # 16-bit, with a LayerNorm (the form measured); 64 rows' tiles, or the 512-wide steps of a form
    # without a LayerNorm, would pass an sm_86 block's shared memory.
    block_n = WIDE_BLOCK_N if wide and has_ln and element_size == 2 and block_m <= 32 else BLOCK_N
    if element_size != 2:
        block_k = BLOCK_K_FP32
    elif not has_ln:
        block_k = TILE_ELEMENTS // block_m
    else:
        block_k = NARROW_LN_BLOCK_K if not wide and block_m <= 32 else BLOCK_K
    return block_n, min(block_k, max(16, next_power_of_2(K)))


def gemv_columns(M: int, N: int, K: int, element_size: int) -> int:
    """Columns a program of the matrix-vector kernel (_gemv_kernel) takes, or 0 for the tiled one:
    up to GEMV_MAX_ROWS rows and whole weight rows (K rounded up to a power of two) of which at
    least one fits the tile, GEMV_TILE_BYTES (GEMV_WIDE_TILE_BYTES for a vocabulary-wide N); then
    as many as fit (GPT-2 in bf16: 4 columns a program at K 768, 576 programs for c_attn and 192
    for c_proj; 1 at K 3072, 768 programs for the MLP's c_proj)."""
    tile = GEMV_WIDE_TILE_BYTES if N >= WIDE_N else GEMV_TILE_BYTES
    row_bytes = next_power_of_2(K) * element_size
    if M > GEMV_MAX_ROWS or row_bytes > tile:
        return 0
    fit = 1 << ((tile // row_bytes).bit_length() - 1)  # a power of two (tl.arange), of any tile
    return min(fit, next_power_of_2(N))


def k_splits(programs: int, k_steps: int, sms: int) -> int:
    """How many parts the tiled kernel splits K into for a grid of `programs` column blocks, each
    taking k_steps BLOCK_K steps, on `sms` SMs: up to two programs an SM in all, at most
    SPLIT_K_MAX, each split at least SPLIT_MIN_STEPS steps, and no split empty (GPT-2 in bf16 on
    132 SMs: the MLP's c_proj, 48 column blocks over K 3072, in 4 splits of 3 steps at 32 rows and
    3 of 2 at 16; the attention's c_proj, K 768, in 3 at 64 rows and unsplit below)."""
    splits = min(SPLIT_K_MAX, 2 * sms // max(programs, 1), k_steps // SPLIT_MIN_STEPS)
    if splits <= 1:
        return 1
    return cdiv(k_steps, cdiv(k_steps, splits))


def linear(x, weight, bias=None, *, ln=None, residual=None, gelu_tanh: bool = False, kv_cache=None, kv_pos=None,
           x_rows=None, residual_rows=None, counters=None):  # fmt: skip
    """act(LN(x + residual) @ weight.T + bias) for x (M, K), M <= MAX_ROWS.

    x (M, K), stride(-1) == 1, and weight (N, K), any strides: one dtype (fp16, bf16, fp32); bias
    (N,) or None.
    ln: None, or (ln_weight, ln_bias, eps) to normalise the rows first (ln_weight / ln_bias (K,)
    or None for 1 / 0). residual (M, K), stride(-1) == 1, only with ln: added first. gelu_tanh:
    GELU's tanh form on the output. kv_cache (2, B, H, S, D), x's dtype, stride(-1) == 1, with
    N == 3 H D and B dividing M (T = M / B rows a cache row), and kv_pos (M,) int64: out's columns
    [H D, 3 H D) (k, then v, head-major) are also written to kv_cache[:, m // T, :, kv_pos[m]]
    (nothing for a slot outside [0, S)). x_rows (M,)
    int64: x is a table (R, K) and row m of the input is x[x_rows[m]] (an embedding lookup; an
    id outside [0, R) reads zeros); residual_rows likewise for residual. counters: None, or int32
    zeros (cdiv(N, 16),) or longer on x's device, with which the tiled kernel may split K (left
    zero; one stream at a time). Returns (out (M, N), h (M, K) = x + residual or None), both
    contiguous.
    """
    M, K = (x.shape[0] if x_rows is None else x_rows.shape[0]), x.shape[1]
    N = weight.shape[0]
    ln_weight, ln_bias, eps = ln if ln is not None else (None, None, 0.0)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, K), dtype=x.dtype, device=x.device) if residual is not None else None
    x_idx = out if x_rows is None else x_rows.contiguous()  # unread without a gather
    r_idx = out if residual_rows is None else residual_rows.contiguous()
    if (K - 1) * weight.stride(1) >= 2**31:  # column offsets within a weight row are 32-bit
        weight = weight.contiguous()  # only for a huge weight stored transposed
    gemv = gemv_columns(M, N, K, weight.element_size())
    pdl = launch_pdl(x.device)
    # The weight rows' prefetch takes 16-byte aligned rows of a multiple of 16 bytes (an int32 count).
    row_bytes, row_stride_bytes = K * weight.element_size(), weight.stride(0) * weight.element_size()
    prefetch = (pdl and PREFETCH_WEIGHTS and weight.stride(1) == 1 and row_bytes < 2**31
                and (weight.data_ptr() | row_stride_bytes | row_bytes) % 16 == 0)  # fmt: skip
    has_kv = kv_cache is not None
    kv_strides = kv_cache.stride()[:4] if has_kv else (0, 0, 0, 0)
    kv_len, head_dim = (kv_cache.shape[3], kv_cache.shape[4]) if has_kv else (0, 1)
    kv_tokens = M // kv_cache.shape[1] if has_kv and kv_cache.shape[1] else 1
    args = (
        x, x if residual is None else residual, x_idx, r_idx, out if h is None else h,
        x if ln_weight is None else ln_weight, x if ln_bias is None else ln_bias,
        weight, x if bias is None else bias, out,
        kv_cache if has_kv else out, kv_pos.contiguous() if has_kv else out,
        M, N, K, x.stride(0), 0 if residual is None else residual.stride(0), *weight.stride(), float(eps),
        x.shape[0], 0 if residual is None else residual.shape[0], *kv_strides, kv_len, head_dim, kv_tokens,
    )  # fmt: skip
    form = dict(HAS_RESIDUAL=residual is not None, HAS_LN=ln is not None, HAS_LN_WEIGHT=ln_weight is not None,
                HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=bias is not None, KV_CACHE=has_kv,
                X_GATHER=x_rows is not None, R_GATHER=residual_rows is not None, GELU_TANH=gelu_tanh,
                PREFETCH_W=prefetch)  # fmt: skip
    if gemv:
        _gemv_kernel[(cdiv(N, gemv),)](*args, **form, BLOCK_M=next_power_of_2(M), BLOCK_N=gemv,
                                       BLOCK_K=next_power_of_2(K), PDL=pdl, num_warps=GEMV_WARPS, num_stages=1,
                                       launch_pdl=pdl)  # fmt: skip
        return out, h
    block_m = max(16, next_power_of_2(M))
    block_n, block_k = gpu_tiles(block_m, N, K, x.element_size(), ln is not None)
    stats_m = next_power_of_2(M)  # the statistics' rows: M rounded up, not padded to block_m
    stats_block_k = min(STATS_ELEMENTS // stats_m, max(16, next_power_of_2(K)))
    block_k, stats_block_k = (block_k, stats_block_k) if x.is_cuda else (_INTERPRETER_BLOCK_K,) * 2
    programs, k_steps = cdiv(N, block_n), cdiv(K, block_k)
    splits = 1  # K splits only without a LayerNorm (whose statistics each split would recompute)
    if counters is not None and ln is None:
        splits = k_splits(programs, k_steps, sm_count(x.device.index) if x.is_cuda else _INTERPRETER_SMS)
    k_per_split = cdiv(k_steps, splits) * block_k
    ws = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    _linear_kernel[(programs, splits)](
        *args, ws, counters if splits > 1 else out, k_per_split, splits, **form,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT=splits > 1, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, STATS_M=stats_m, STATS_BLOCK_K=stats_block_k, PDL=pdl,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, launch_pdl=pdl,
    )  # fmt: skip
    return out, h
