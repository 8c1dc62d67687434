"""GPT-2's decode step in one launch: a persistent kernel working through a queue of items, in Triton.

A decode step of a few rows reads every weight once (249 MB for GPT-2 124M in bf16) and does
little else, yet as GPT's fused step it is ~60 launches (kernels/linear.py, kernels/decode.py),
and at every boundary the SMs idle: the next grid's programs start, wait for the grid before,
and only then ask for their first bytes. Here one grid of a few programs an SM does the whole
step. The step is cut into items, numbered in the order it needs them:

    per layer:  qkv tiles | attention items | attention c_proj tiles | c_fc tiles | MLP c_proj tiles
    then:       lm_head tiles

Each program takes the next ITEMS_PER_CLAIM items from a counter (an atomic add) and for each
loads the item's weights, which nothing in the step writes, then waits until every item of the
stage before has finished (a count per stage, read with acquire; skipped where this program has
seen that stage or a later one complete), does the item and counts it done (release). So the
weights of the items after a boundary stream in while the stage before it ends, and no program
idles between launches. Items are taken in order, a program does its own in order, and an item
waits only for items before it: whatever the grid, and however many of its programs are
resident, the lowest unfinished item has all it needs and a program working on it, so the step
cannot deadlock. A program that takes its next claim early (CLAIM_AHEAD) holds only items after
the ones it is doing, so the lowest unfinished item is still one a program is doing. (Triton's
interpreter runs the programs one after another: the first takes every item.) The last program
to leave zeroes the counters for the next launch.

Not yet measured on a GPU: the knobs below (item bytes, programs an SM, items a claim, the L2
prefetch of the items ahead, off) are set from counting, and gpu-probe's persistent_step section
sweeps them. Per item a program makes
about three dependent round trips (the claim, the count or its weights, the activations from
L2), so each SM keeps several programs and each program's weights in flight. Made for one row
(the B1 step): an item reads its rows' activations one row after another, and at 8 rows an MLP
c_proj item reads 48 KB of them (from L2) beside its 6 KB of weights.

Items, for the M rows (one token each; rows padded to BLOCK_M, a power of two):
  qkv          columns of LN_1(h) @ W.T + b; their k and v also go to the row's cache slot. In
               layer 0 h = wte[tok] + wpe[pos] (ids outside a table read zeros), which its tile 0 stores.
  attention    (row, head, chunk of cache positions): the chunk's softmax-weighted sum of v and
               its log2-sum-exp (fp32), over positions [0, seqlens[row]) of the cache; the last
               chunk of a (row, head) to finish (a count) merges them into y, the heads side by side.
  attn c_proj  columns of y @ W.T + b, added to h in place.
  c_fc         columns of gelu_tanh(LN_2(h) @ W.T + b)
  MLP c_proj   columns of f @ W.T + b, added to h in place.
  lm_head      columns of LN_f(h) @ W.T: the logits.
A matmul item holds the whole weight rows of its columns, (N_*, K rounded up to a power of two),
as fastgpt.ops.linear's matrix-vector kernel does, and every value the fused step's launches
round to the model's dtype (q, k, v, y, h, f, the normalised rows, the logits) is rounded here
too; dot products and the attention are fp32. Activations written within the step are read
with .cg (from L2): another SM wrote them, and this SM's L1 may hold an older copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastgpt._backends import sm_count
from fastgpt.kernels.linear import _epilogue, _gelu_tanh, _ln_params, _normalised_row, _table_rows
from fastgpt.kernels.pdl import _prefetch_l2_once
from fastgpt.kernels.sizes import cdiv, next_power_of_2

MAX_ROWS = 8  # rows of one step (tokens: one a row)
PROGRAMS_PER_SM = 4  # the grid on a GPU: this many programs an SM (they wait more than they work), or as many as fit
TILE_BYTES = 8192  # weights a matmul item holds: whole rows, as many as fit (at least one)
HEAD_TILE_BYTES = 8192  # an lm_head item's (12,565 items for GPT-2's vocabulary in bf16)
ATTN_BLOCK_N = 64  # cache positions a step of an attention item's loop
ATTN_MAX_CHUNKS = 16  # chunks of a row's cache at most (each attention c_proj tile merges them all)
ITEMS_PER_CLAIM = 2  # items a program takes from the queue at once: half the round trips to its counter
NUM_WARPS = 4
MAX_REGISTERS = None  # ptxas's cap a thread (maxnreg) on a GPU; None: its own choice (128 on sm_90, bf16, 1 row)
# With each claim, ask L2 for the weights of the items this many rounds of claims ahead (a round:
# every program's CLAIM items), so that they stream in from memory whatever each program's chain
# of round trips: 0, off (the default: not measured; gpu-probe's persistent_step tries 1 and 2).
# sm_90 and later, weights whose rows lie one after another.
PREFETCH_ROUNDS = 0
# Take the next claim while this one's items run (its round trip to the counter off the path:
# one thread's atomic, whose value the program reads after them), rather than after them: off
# (not measured; gpu-probe's persistent_step tries it). GPU only.
CLAIM_AHEAD = False
_RESIDENT = {}  # (device index, a launch's constexprs and options) -> resident_programs of the kernel compiled
_INTERPRETER_PROGRAMS = 3  # the first takes every item; the others only leave (and the last resets)
_INTERPRETER_SMS = 16  # a pretend SM count on CPU tensors, so that the interpreter's caches come in chunks
_INTERPRETER_BLOCK_N = 16
STAGES = 5  # items of a layer: qkv, attention, attention c_proj, c_fc, MLP c_proj
# sync's int32 entries, in 128-byte lines (LINE entries) where many programs meet: the queue's
# next item (line 0: every claim's atomic add), the programs that have left and GAVE_UP (line 1:
# a wait gave up, never in a correct step, and left set), then from SYNC_HEAD a count of the
# items done per (layer, stage), a line each (the stage's items add to it while the next stage's
# programs poll it), then one per (row, head) of the chunks done in the current layer, packed
# (sync_entries: MAX_ROWS rows).
LINE = 32
EXITS = LINE
GAVE_UP = LINE + 1
SYNC_HEAD = 2 * LINE
_STAGES, _LINE, _SYNC_HEAD = tl.constexpr(STAGES), tl.constexpr(LINE), tl.constexpr(SYNC_HEAD)  # the kernel's
_EXITS, _GAVE_UP = tl.constexpr(EXITS), tl.constexpr(GAVE_UP)
_GPU_MAX_SPINS = tl.constexpr(1 << 20)  # a wait's reads at most: about a second (a read, then 256 ns of sleep)
_INTERPRETER_MAX_SPINS = tl.constexpr(100)  # the interpreter's first program has every item: it never waits
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _wait_until(sync_ptr, index, target, known, BACKOFF: tl.constexpr):
    """Spin until the count of stage `index` (sync_ptr[SYNC_HEAD + LINE index]; stages numbered
    5 layer + stage) reaches target (acquire: what was written before each count is seen), unless
    this program has seen stage `known` or a later one complete: a stage completes only after
    the one before it, so those before are complete too (and this program's acquire of them came
    before). Returns the latest stage known complete. A bound on the spins (a second or more on a
    GPU; a correct step never comes near it) turns a bug that would hang into a wrong result and
    sync_ptr[GAVE_UP] set, which nothing zeroes; once it is set, waits give up at once."""
    if index > known:
        count_ptr = sync_ptr + _SYNC_HEAD + index * _LINE
        max_spins = _GPU_MAX_SPINS if BACKOFF else _INTERPRETER_MAX_SPINS
        seen = tl.atomic_add(count_ptr, 0, sem="acquire")
        spins = 0
        if seen < target:  # (a run-time if: a wait already met reads no more)
            spins = tl.where(tl.atomic_add(sync_ptr + _GAVE_UP, 0, sem="relaxed") != 0, max_spins, 0)
        while (seen < target) & (spins < max_spins):
            if BACKOFF:  # a few hundred cycles off the memory system between reads (sm_70 and later)
                tl.inline_asm_elementwise("nanosleep.u32 256; // $0 $1", "=r,r", [seen], dtype=tl.int32,
                                          is_pure=False, pack=1)  # fmt: skip
            seen = tl.atomic_add(count_ptr, 0, sem="acquire")
            spins += 1
        if seen < target:
            tl.atomic_xchg(sync_ptr + _GAVE_UP, 1)
    return tl.maximum(known, index)


@triton.jit
def _count_done(count_ptr):
    """Count one item of a stage done, after every thread's stores (release)."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release")


@triton.jit
def _at(table_ptr, j: tl.constexpr, DTYPE: tl.constexpr):
    """The j-th address of a layer's table entry as a pointer to DTYPE: a tensor's start, which
    step_weights checks is 16-byte aligned (so its rows load 16 bytes at a time)."""
    return tl.multiple_of(tl.load(table_ptr + j).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _weight_tile(w_ptr, cols, col_ok, ks, k_ok, stride_n, stride_k):
    """The weight rows of columns `cols` (whole rows, K padded to ks' length), (N, K_P)."""
    ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_n + ks[None, :] * stride_k
    return tl.load(ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _set_row(acc, m, dots):
    """acc (BLOCK_M, N) with row m replaced by dots (N,)."""
    return tl.where(tl.arange(0, acc.shape[0])[:, None] == m, dots[None, :], acc)


@triton.jit
def _ln_matmul_rows(h_ptr, ln_w, ln_b, w, ks, M, K, eps, BLOCK_M: tl.constexpr):
    """(BLOCK_M, N) fp32: LN(h[m]) . w[n] for the rows of h (M, K), read from L2."""
    acc = tl.zeros([BLOCK_M, w.shape[0]], tl.float32)
    for m in range(M):
        mask = (ks < K)[None, :]
        a = tl.load(h_ptr + m * K + ks[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        a = _normalised_row(a, ks, mask, K, eps, ln_w, ln_b, True, True)
        acc = _set_row(acc, m, tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1))
    return acc


@triton.jit
def _matmul_rows(x_ptr, w, ks, k_ok, M, K, BLOCK_M: tl.constexpr):
    """(BLOCK_M, N) fp32: x[m] . w[n] for the rows of x (M, K), read from L2."""
    acc = tl.zeros([BLOCK_M, w.shape[0]], tl.float32)
    for m in range(M):
        a = tl.load(x_ptr + m * K + ks, mask=k_ok, other=0.0, cache_modifier=".cg")
        acc = _set_row(acc, m, tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1))
    return acc


@triton.jit
def _add_to_stream(acc, bias, h_ptr, rows, row_ok, cols, col_ok, C):
    """h[rows, cols] += round(acc + bias), rounded again, in place: a residual add."""
    out = (acc + bias[None, :]).to(h_ptr.dtype.element_ty)
    offs = rows[:, None] * C + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(h_ptr + offs, (out.to(tl.float32) + h.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_item(tile, layer, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, wte_ptr, wpe_ptr, tok_ptr, pos_ptr, h_ptr, qkv_ptr,
              kv_ptr, sync_ptr, wait_index, wait_target, known, M, C, vocab_rows, pos_rows, eps, stride_n, stride_k,
              stride_wte_n, stride_wte_k, stride_wpe_n, stride_wpe_k, stride_kv_which, stride_kv_b, stride_kv_h,
              stride_kv_s, kv_len, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, K_C: tl.constexpr,
              N_QKV: tl.constexpr, BACKOFF: tl.constexpr):  # fmt: skip
    cols = tile * N_QKV + tl.arange(0, N_QKV)
    col_ok = cols < 3 * C
    ks = tl.arange(0, K_C)
    k_ok = ks < C
    w = _weight_tile(w_ptr, cols, col_ok, ks, k_ok, stride_n, stride_k)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ln_w, ln_b = _ln_params(ln_w_ptr, ln_b_ptr, ks, k_ok, True, True)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    if layer > 0:
        known = _wait_until(sync_ptr, wait_index, wait_target, known, BACKOFF)
        acc = _ln_matmul_rows(h_ptr, ln_w, ln_b, w, ks, M, C, eps, BLOCK_M)
    else:  # h = wte[tok] + wpe[pos], gathered (nothing to wait for: no item writes the tables)
        acc = tl.zeros([BLOCK_M, N_QKV], tl.float32)
        for m in range(M):
            row = m + tl.arange(0, 1).to(tl.int64)
            row_ok1 = row < M
            mask = row_ok1[:, None] & k_ok[None, :]
            t_row, t_ok = _table_rows(tok_ptr, row, row_ok1, vocab_rows, True)
            p_row, p_ok = _table_rows(pos_ptr, row, row_ok1, pos_rows, True)
            a = tl.load(wte_ptr + t_row[:, None] * stride_wte_n + ks[None, :] * stride_wte_k,
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            a += tl.load(wpe_ptr + p_row[:, None] * stride_wpe_n + ks[None, :] * stride_wpe_k,
                         mask=p_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            if tile == 0:
                tl.store(h_ptr + row[:, None] * C + ks[None, :], a, mask=mask)
            a = _normalised_row(a, ks, mask, C, eps, ln_w, ln_b, True, True)
            acc = _set_row(acc, m, tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1))
    _epilogue(acc, rows, row_ok, cols, col_ok, bias, pos, qkv_ptr, kv_ptr, 3 * C, stride_kv_which, stride_kv_b,
              stride_kv_h, stride_kv_s, kv_len, HEAD_DIM, 1, True, False, True)  # fmt: skip
    return known


@triton.jit
def _attention_item(r, qkv_ptr, kv_ptr, seqlens_ptr, part_o_ptr, part_lse_ptr, y_ptr, merge_ptr, C, n_head, n_chunks,
                    chunk, qk_scale, stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s, kv_len,
                    HEAD_DIM: tl.constexpr, CHUNKS_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Item r = (row m, head, chunk c): positions [c chunk, min((c + 1) chunk, len_m)) in base-2
    units, s_j = q . k_j * scale * log2(e); stores o = sum_j 2^(s_j - mx) v_j / l and lse = mx +
    log2(l), l = sum_j 2^(s_j - mx) (0 and -inf for a chunk past the row's length). The last of
    the row's n_chunks chunks of this head to finish (a count, acquire-release, at merge_ptr[m
    n_head + head], zeroed again by it) merges them all, in chunk order, into y[m, head D : (head
    + 1) D] in y's dtype (0 where no position was seen): the same y whichever chunk is last."""
    m = r // (n_head * n_chunks)
    head = (r // n_chunks) % n_head
    c = r % n_chunks
    d = tl.arange(0, HEAD_DIM)
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + m), 0), kv_len)
    start = c * chunk
    end = tl.minimum(start + chunk, length)
    q = tl.load(qkv_ptr + m * 3 * C + head * HEAD_DIM + d, cache_modifier=".cg").to(tl.float32) * qk_scale
    k_base = kv_ptr + m.to(tl.int64) * stride_kv_b + head.to(tl.int64) * stride_kv_h
    v_base = k_base + stride_kv_which
    mx = tl.full([], float("-inf"), tl.float32)
    l_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        ok = ns < end
        offs = ns.to(tl.int64)[:, None] * stride_kv_s + d[None, :]
        k = tl.load(k_base + offs, mask=ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        new = tl.maximum(mx, tl.max(s, axis=0))  # finite: the block has a position
        alpha = tl.exp2(mx - new)
        p = tl.exp2(s - new)
        v = tl.load(v_base + offs, mask=ok[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        mx = new
    seen = l_sum > 0
    row_head = m * n_head + head
    part = row_head * n_chunks + c
    tl.store(part_o_ptr + part * HEAD_DIM + d, tl.where(seen, acc / tl.where(seen, l_sum, 1.0), 0.0))
    tl.store(part_lse_ptr + part, tl.where(seen, mx + tl.log2(tl.where(seen, l_sum, 1.0)), float("-inf")))
    tl.debug_barrier()  # every thread's partials are stored before the count says so (release)
    if tl.atomic_add(merge_ptr + row_head, 1, sem="acq_rel") == n_chunks - 1:
        cs = tl.arange(0, CHUNKS_P)
        c_ok = cs < n_chunks
        parts = row_head * n_chunks + cs  # .cg: other programs, on other SMs, stored them
        lse = tl.load(part_lse_ptr + parts, mask=c_ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_o_ptr + parts[:, None] * HEAD_DIM + d[None, :], mask=c_ok[:, None], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        top = tl.max(lse, axis=0)
        weight = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))  # (CHUNKS_P,): 0 for an empty chunk
        den = tl.sum(weight, axis=0)
        y = tl.sum(weight[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(y_ptr + m * C + head * HEAD_DIM + d, y.to(y_ptr.dtype.element_ty))
        tl.atomic_xchg(merge_ptr + row_head, 0)  # zero again for the next layer (which waits for this one)


@triton.jit
def _ln_item(tile, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, h_ptr, out_ptr, sync_ptr, wait_index, wait_target, known,
             M, C, N, eps, stride_n, stride_k, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, BLOCK_M: tl.constexpr,
             K_C: tl.constexpr, BLOCK_N: tl.constexpr, BACKOFF: tl.constexpr):  # fmt: skip
    """Columns [tile BLOCK_N, (tile + 1) BLOCK_N) of act(LN(h) @ W.T + b) into out (M, N), once
    stage wait_index has wait_target items done (c_fc with its GELU; lm_head). Like every item
    that waits, takes and returns the latest stage this program knows complete (_wait_until)."""
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, K_C)
    k_ok = ks < C
    w = _weight_tile(w_ptr, cols, col_ok, ks, k_ok, stride_n, stride_k)
    ln_w, ln_b = _ln_params(ln_w_ptr, ln_b_ptr, ks, k_ok, True, True)
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    known = _wait_until(sync_ptr, wait_index, wait_target, known, BACKOFF)
    acc = _ln_matmul_rows(h_ptr, ln_w, ln_b, w, ks, M, C, eps, BLOCK_M) + bias[None, :]
    if GELU_TANH:
        acc = _gelu_tanh(acc)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & col_ok[None, :])  # fmt: skip
    return known


@triton.jit
def _residual_item(tile, w_ptr, bias_ptr, x_ptr, h_ptr, sync_ptr, wait_index, wait_target, known, M, C, K, stride_n,
                   stride_k, BLOCK_M: tl.constexpr, K_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   BACKOFF: tl.constexpr):  # fmt: skip
    """Columns of x @ W.T + b (x (M, K)) added to h (M, C): the attention's c_proj (x = y, the
    heads side by side, K = C) and the MLP's (x = f, K = F)."""
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    ks = tl.arange(0, K_P)
    k_ok = ks < K
    w = _weight_tile(w_ptr, cols, col_ok, ks, k_ok, stride_n, stride_k)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    known = _wait_until(sync_ptr, wait_index, wait_target, known, BACKOFF)
    acc = _matmul_rows(x_ptr, w, ks, k_ok, M, K, BLOCK_M)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    _add_to_stream(acc, bias, h_ptr, rows, rows < M, cols, col_ok, C)
    return known


@triton.jit
def _item_weights(item, per_layer, t_qkv, t_attn, t_proj, t_fc, n_layer, table_ptr, head_ptr, C, F, V,
                  DTYPE: tl.constexpr, N_QKV: tl.constexpr, N_PROJ: tl.constexpr, N_FC: tl.constexpr,
                  N_OUT: tl.constexpr, N_HEAD: tl.constexpr):  # fmt: skip
    """The weights item `item` (< the queue's total) reads, (start, elements): its columns' whole
    rows, one span where the rows lie one after another (unit k stride, n stride K); 0 elements
    for an attention item."""
    layer = item // per_layer
    r = item - layer * per_layer
    weights = table_ptr + tl.minimum(layer, n_layer - 1) * 12
    w = head_ptr  # lm_head, past the last layer
    tile = item - n_layer * per_layer
    n = V
    width = tl.full([], N_HEAD, tl.int32)
    k = C
    if layer < n_layer:
        if r < t_qkv:
            w = _at(weights, 2, DTYPE)
            tile = r
            n = 3 * C
            width = tl.full([], N_QKV, tl.int32)
        elif r < t_qkv + t_attn:
            width = tl.full([], 0, tl.int32)
        elif r < t_qkv + t_attn + t_proj:
            w = _at(weights, 4, DTYPE)
            tile = r - t_qkv - t_attn
            n = C
            width = tl.full([], N_PROJ, tl.int32)
        elif r < t_qkv + t_attn + t_proj + t_fc:
            w = _at(weights, 8, DTYPE)
            tile = r - t_qkv - t_attn - t_proj
            n = F
            width = tl.full([], N_FC, tl.int32)
        else:
            w = _at(weights, 10, DTYPE)
            tile = r - t_qkv - t_attn - t_proj - t_fc
            n = C
            width = tl.full([], N_OUT, tl.int32)
            k = F
    column = tile * width
    columns = tl.maximum(tl.minimum(width, n - column), 0)
    return w + column.to(tl.int64) * k, columns * k


@triton.jit
def _claim_async(sync_ptr, CLAIM: tl.constexpr, THREADS: tl.constexpr):
    """Take the queue's next CLAIM items, without waiting: a (THREADS,) int32 tensor, zero but for
    one element, the claim's first item, which tl.max reads once the atomic is back (a relaxed add,
    from the thread holding element 0, once). A GPU's: Triton's own scalar atomic waits for its
    value at once (it shares it through shared memory behind a barrier)."""
    lane = tl.arange(0, THREADS)
    return tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .b32 tid; mov.u32 tid, %tid.x; setp.eq.u32 first, tid, 0; "
        "setp.eq.and.u32 first, $1, 0, first; mov.u32 $0, 0; "
        "@first atom.global.gpu.relaxed.add.u32 $0, [$2], $3; }",
        "=r,r,l,r", [lane, sync_ptr, tl.full([THREADS], CLAIM, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _step_kernel(
    table_ptr,  # (n_layer, 12) int64: each layer's weight addresses (fastgpt.ops.step.LAYER_WEIGHTS' order)
    wte_ptr,  # (vocab_rows, C) strides (stride_wte_n, stride_wte_k)
    wpe_ptr,  # (pos_rows, C) strides (stride_wpe_n, stride_wpe_k)
    lnf_w_ptr, lnf_b_ptr,  # (C,) each
    head_ptr,  # (V, C) strides (stride_head_n, stride_head_k): lm_head's weight
    tok_ptr, pos_ptr,  # (M,) int64: each row's token and its position (wpe's row and the cache slot)
    seqlens_ptr,  # (M,) int32: row m attends to cache positions [0, seqlens[m]) (clamped to [0, kv_len])
    kv_ptr,  # (n_layer, 2, B >= M, n_head, kv_len, HEAD_DIM), unit last stride
    h_ptr,  # (M, C) scratch: the residual stream
    qkv_ptr,  # (M, 3 C) scratch
    part_o_ptr,  # (M, n_head, n_chunks, HEAD_DIM) fp32 scratch
    part_lse_ptr,  # (M, n_head, n_chunks) fp32 scratch
    y_ptr,  # (M, C) scratch: the attention's output, the heads side by side
    f_ptr,  # (M, F) scratch: the MLP's hidden rows
    logits_ptr,  # (M, V) output
    sync_ptr,  # (sync_len,) int32 zeros (sync_entries); zeros again after, but GAVE_UP
    sync_len, M, C, F, V, n_layer, n_head, vocab_rows, pos_rows, kv_len, n_chunks, chunk, eps, qk_scale,
    stride_kv_layer, stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s,
    stride_attn_n, stride_attn_k, stride_proj_n, stride_proj_k, stride_fc_n, stride_fc_k,
    stride_out_n, stride_out_k, stride_head_n, stride_head_k, stride_wte_n, stride_wte_k, stride_wpe_n, stride_wpe_k,
    DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNKS_P: tl.constexpr, K_C: tl.constexpr,
    K_F: tl.constexpr, N_QKV: tl.constexpr, N_PROJ: tl.constexpr, N_FC: tl.constexpr, N_OUT: tl.constexpr,
    N_HEAD: tl.constexpr, ATTN_BLOCK_N: tl.constexpr, SYNC_P: tl.constexpr, CLAIM: tl.constexpr,
    BACKOFF: tl.constexpr, PREFETCH_ROUNDS: tl.constexpr, CLAIM_AHEAD: tl.constexpr, THREADS: tl.constexpr,
):  # fmt: skip
    t_qkv = tl.cdiv(3 * C, N_QKV)
    t_attn = M * n_head * n_chunks
    t_proj = tl.cdiv(C, N_PROJ)
    t_fc = tl.cdiv(F, N_FC)
    t_out = tl.cdiv(C, N_OUT)
    ends = (t_qkv, t_qkv + t_attn, t_qkv + t_attn + t_proj, t_qkv + t_attn + t_proj + t_fc)
    per_layer = ends[3] + t_out
    total = n_layer * per_layer + tl.cdiv(V, N_HEAD)
    counts = sync_ptr + _SYNC_HEAD  # counts[_LINE (_STAGES layer + stage)]: its items done
    merges = counts + _LINE * _STAGES * n_layer  # merges[m n_head + head]: the chunks of (row, head) done, in a layer

    known = -1  # the latest stage (5 layer + stage) this program has seen complete
    # CLAIM items at a time, in order. Relaxed: an item's inputs are ordered by the stage counts.
    first = tl.atomic_add(sync_ptr, CLAIM, sem="relaxed")
    while first < total:
        if CLAIM_AHEAD:
            claim = _claim_async(sync_ptr, CLAIM, THREADS)
        if PREFETCH_ROUNDS > 0:  # the weights of the items PREFETCH_ROUNDS rounds of claims ahead, into L2
            ahead = first + PREFETCH_ROUNDS * CLAIM * tl.num_programs(0)
            for item in range(ahead, tl.minimum(ahead + CLAIM, total)):
                start, elements = _item_weights(item, per_layer, t_qkv, t_attn, t_proj, t_fc, n_layer, table_ptr,
                                                head_ptr, C, F, V, DTYPE, N_QKV, N_PROJ, N_FC, N_OUT,
                                                N_HEAD)  # fmt: skip
                if elements > 0:
                    _prefetch_l2_once(start, elements * (DTYPE.primitive_bitwidth // 8))
        for item in range(first, tl.minimum(first + CLAIM, total)):
            layer = item // per_layer
            r = item - layer * per_layer
            weights = table_ptr + layer * 12
            if layer >= n_layer:  # lm_head, after the last layer
                known = _ln_item(item - n_layer * per_layer, head_ptr, head_ptr, lnf_w_ptr, lnf_b_ptr, h_ptr,
                                 logits_ptr, sync_ptr, _STAGES * n_layer - 1, t_out, known, M, C, V, eps,
                                 stride_head_n, stride_head_k, False, False, BLOCK_M, K_C, N_HEAD, BACKOFF)  # fmt: skip
            elif r < ends[0]:  # qkv
                known = _qkv_item(r, layer, _at(weights, 2, DTYPE), _at(weights, 3, DTYPE), _at(weights, 0, DTYPE),
                                  _at(weights, 1, DTYPE), wte_ptr, wpe_ptr, tok_ptr, pos_ptr, h_ptr, qkv_ptr,
                                  kv_ptr + layer.to(tl.int64) * stride_kv_layer, sync_ptr, _STAGES * layer - 1,
                                  t_out, known, M, C, vocab_rows, pos_rows, eps, stride_attn_n, stride_attn_k,
                                  stride_wte_n, stride_wte_k, stride_wpe_n, stride_wpe_k, stride_kv_which,
                                  stride_kv_b, stride_kv_h, stride_kv_s, kv_len, BLOCK_M, HEAD_DIM, K_C, N_QKV,
                                  BACKOFF)  # fmt: skip
                _count_done(counts + _LINE * (_STAGES * layer))
            elif r < ends[1]:  # attention
                known = _wait_until(sync_ptr, _STAGES * layer, t_qkv, known, BACKOFF)
                _attention_item(r - ends[0], qkv_ptr, kv_ptr + layer.to(tl.int64) * stride_kv_layer, seqlens_ptr,
                                part_o_ptr, part_lse_ptr, y_ptr, merges, C, n_head, n_chunks, chunk, qk_scale,
                                stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s, kv_len, HEAD_DIM, CHUNKS_P,
                                ATTN_BLOCK_N)  # fmt: skip
                _count_done(counts + _LINE * (_STAGES * layer + 1))
            elif r < ends[2]:  # attention c_proj, added to h
                known = _residual_item(r - ends[1], _at(weights, 4, DTYPE), _at(weights, 5, DTYPE), y_ptr, h_ptr,
                                       sync_ptr, _STAGES * layer + 1, t_attn, known, M, C, C, stride_proj_n,
                                       stride_proj_k, BLOCK_M, K_C, N_PROJ, BACKOFF)  # fmt: skip
                _count_done(counts + _LINE * (_STAGES * layer + 2))
            elif r < ends[3]:  # c_fc + GELU
                known = _ln_item(r - ends[2], _at(weights, 8, DTYPE), _at(weights, 9, DTYPE), _at(weights, 6, DTYPE),
                                 _at(weights, 7, DTYPE), h_ptr, f_ptr, sync_ptr, _STAGES * layer + 2, t_proj, known,
                                 M, C, F, eps, stride_fc_n, stride_fc_k, True, True, BLOCK_M, K_C, N_FC,
                                 BACKOFF)  # fmt: skip
                _count_done(counts + _LINE * (_STAGES * layer + 3))
            else:  # MLP c_proj, added to h
                known = _residual_item(r - ends[3], _at(weights, 10, DTYPE), _at(weights, 11, DTYPE), f_ptr, h_ptr,
                                       sync_ptr, _STAGES * layer + 3, t_fc, known, M, C, F, stride_out_n,
                                       stride_out_k, BLOCK_M, K_F, N_OUT, BACKOFF)  # fmt: skip
                _count_done(counts + _LINE * (_STAGES * layer + 4))
        if CLAIM_AHEAD:
            first = tl.max(claim, axis=0)
        else:
            first = tl.atomic_add(sync_ptr, CLAIM, sem="relaxed")

    # Leave; the last program out zeroes the counters (every other one has read its last), not GAVE_UP.
    if tl.atomic_add(sync_ptr + _EXITS, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        offs = tl.arange(0, SYNC_P)
        tl.store(sync_ptr + offs, tl.zeros([SYNC_P], tl.int32), mask=(offs != _GAVE_UP) & (offs < sync_len))


class StepWeights(NamedTuple):
    """A model's weights as the step kernel reads them (step_weights makes it)."""

    table: torch.Tensor  # (n_layer, 12) int64 on the weights' device: each layer's addresses
    strides: tuple[int, ...]  # (n, k) strides of c_attn, attention c_proj, c_fc, MLP c_proj, lm_head
    tensors: tuple  # what the table points into, kept alive with it
    key: tuple  # the addresses and strides it was made from (still_valid)


def _layer_strides(layers: list[tuple], head: torch.Tensor) -> tuple[int, ...] | None:
    """The weights' (n, k) strides by kind, or None where a kind's differ between layers."""
    strides = []
    for i in (2, 4, 8, 10):
        kind = {layer[i].stride() for layer in layers}
        if len(kind) != 1:
            return None
        strides += kind.pop()
    return (*strides, *head.stride())


def step_weights(layers: list[tuple], head: torch.Tensor) -> StepWeights | None:
    """The table of `layers` (each a block's 12 weights, fastgpt.ops.step.LAYER_WEIGHTS, checked there)
    and head (lm_head's weight); None where the kernel cannot take them: a kind of weight laid
    out differently in different layers (it takes one pair of strides a kind), a tensor not
    16-byte aligned (it loads the rows 16 bytes at a time), a vector with a stride, or a weight
    stored so transposed that a row's offsets pass 2^31."""
    strides = _layer_strides(layers, head)
    tensors = tuple(t for layer in layers for t in layer)
    if strides is None or any(t.data_ptr() % 16 or (t.dim() == 1 and t.stride(0) != 1) for t in tensors):
        return None
    if any((t.shape[1] - 1) * t.stride(1) >= 2**31 for t in (*tensors, head) if t.dim() == 2):
        return None  # offsets within a weight row are 32-bit
    table = torch.tensor([[t.data_ptr() for t in layer] for layer in layers], dtype=torch.int64).to(head.device)
    return StepWeights(table, strides, tensors + (head,), _key(layers, head))


def _key(layers: list[tuple], head: torch.Tensor) -> tuple:
    return tuple(t.data_ptr() for layer in layers for t in layer) + (head.data_ptr(),) + (_layer_strides(layers, head),)


def still_valid(weights: StepWeights, layers: list[tuple], head: torch.Tensor) -> bool:
    """Whether weights' table still points where `layers` and head are (no parameter replaced)."""
    return weights.key == _key(layers, head)




def tile_columns(N: int, K: int, element_size: int, tile_bytes: int) -> int:
    """Columns of an item holding whole weight rows of K (rounded up to a power of two): as many
    as fit tile_bytes, a power of two, at least one and at most N rounded up."""
    row_bytes = next_power_of_2(K) * element_size
    fit = 1 << max(0, (tile_bytes // row_bytes).bit_length() - 1)
    return min(fit, next_power_of_2(N))


def attention_chunks(rows: int, n_head: int, kv_len: int, programs: int, block_n: int) -> tuple[int, int]:
    """(n_chunks, chunk): each row's cache in n_chunks chunks of `chunk` positions (a multiple of
    block_n), about one attention item a program in all, at most ATTN_MAX_CHUNKS a row."""
    want = max(1, min(ATTN_MAX_CHUNKS, cdiv(programs, rows * n_head)))
    chunk = max(block_n, cdiv(cdiv(max(kv_len, 1), want), block_n) * block_n)
    return cdiv(max(kv_len, 1), chunk), chunk


def sync_entries(n_layer: int, n_head: int) -> int:
    """The int32 entries of the kernel's sync buffer for a model of n_layer layers of n_head heads."""
    return SYNC_HEAD + LINE * STAGES * n_layer + MAX_ROWS * n_head


def _can_prefetch(device: torch.device, weights: StepWeights, C: int, F: int, element_size: int) -> bool:
    """Whether the kernel may ask L2 for an item's weights as one span (PREFETCH_ROUNDS): on sm_90
    or later, every weight's rows one after another (c_attn, attention c_proj, c_fc and lm_head K
    = C, MLP c_proj K = F), each row a multiple of 16 bytes (so every span starts aligned)."""
    rows_in_order = weights.strides == (C, 1, C, 1, C, 1, F, 1, C, 1)
    sm_90 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return sm_90 and rows_in_order and (C * element_size) % 16 == 0 == (F * element_size) % 16


def decode_step(tok, pos, seqlens, kv, weights: StepWeights, wte, wpe, ln_f, eps: float, sync) -> torch.Tensor:
    """GPT-2's decode step for M = tok.shape[0] <= MAX_ROWS rows, one token each: logits (M, V).

    tok, pos (M,) int64: the tokens and their positions (wpe's row, and the cache slot their k and
    v go to; neither written nor read outside the table or the cache); seqlens (M,) int32: row m
    attends to cache positions [0, seqlens[m]) (pos + 1 in a decode step). kv (n_layer, 2, B,
    n_head, S, D), B >= M, unit last stride, D a power of two: row m's cache is kv[:, :, m]. The
    weights: `weights` (step_weights), wte (vocab, C) and wpe (positions, C), ln_f its
    (weight, bias); all one dtype with kv. eps: every LayerNorm's. sync: int32 zeros
    (sync_entries(n_layer, n_head),), which the kernel leaves zero but sync[GAVE_UP] (set where a
    wait gave up: a bug). The MLP's activation is GELU's tanh form (GPT-2's), and every LayerNorm
    and matmul but lm_head has a bias.
    """
    M = tok.shape[0]
    n_layer, _, _, n_head, S, D = kv.shape
    C, F, V = n_head * D, weights.tensors[8].shape[0], weights.tensors[-1].shape[0]
    es = kv.element_size()
    on_gpu = kv.is_cuda
    sms = sm_count(kv.device.index) if on_gpu else _INTERPRETER_SMS
    block_n = ATTN_BLOCK_N if on_gpu else _INTERPRETER_BLOCK_N
    # The chunks follow PROGRAMS_PER_SM, not the grid launched, so that every launch of a shape
    # sums its attention in the same order, the first (before _RESIDENT knows the kernel) too.
    n_chunks, chunk = attention_chunks(M, n_head, S, sms * PROGRAMS_PER_SM, block_n)
    empty = lambda *shape, dtype=kv.dtype: torch.empty(shape, dtype=dtype, device=kv.device)  # noqa: E731
    logits = empty(M, V)
    scratch = (empty(M, C), empty(M, 3 * C), empty(M, n_head, n_chunks, D, dtype=torch.float32),
               empty(M, n_head, n_chunks, dtype=torch.float32), empty(M, C), empty(M, F))  # fmt: skip
    qk_scale = math.log2(math.e) / math.sqrt(D)
    columns = dict(
        N_QKV=tile_columns(3 * C, C, es, TILE_BYTES), N_PROJ=tile_columns(C, C, es, TILE_BYTES),
        N_FC=tile_columns(F, C, es, TILE_BYTES), N_OUT=tile_columns(C, F, es, TILE_BYTES),
        N_HEAD=tile_columns(V, C, es, HEAD_TILE_BYTES),
    )  # fmt: skip
    prefetch = PREFETCH_ROUNDS and on_gpu and _can_prefetch(kv.device, weights, C, F, es)  # asked only when on
    form = dict(
        DTYPE=_DTYPES[kv.dtype], BLOCK_M=next_power_of_2(M), HEAD_DIM=D, CHUNKS_P=next_power_of_2(n_chunks),
        K_C=next_power_of_2(C), K_F=next_power_of_2(F), **columns, ATTN_BLOCK_N=block_n,
        SYNC_P=next_power_of_2(sync_entries(n_layer, n_head)), CLAIM=ITEMS_PER_CLAIM, BACKOFF=on_gpu,
        PREFETCH_ROUNDS=PREFETCH_ROUNDS if prefetch else 0,
        CLAIM_AHEAD=CLAIM_AHEAD and on_gpu, THREADS=32 * NUM_WARPS,
        num_warps=NUM_WARPS, num_stages=1, **({"maxnreg": MAX_REGISTERS} if on_gpu and MAX_REGISTERS else {}),
    )  # fmt: skip
    programs = _INTERPRETER_PROGRAMS
    if on_gpu:
        key = (kv.device.index, *((name, str(value)) for name, value in form.items()))  # the compiled kernel's
        programs = sms * min(PROGRAMS_PER_SM, _RESIDENT.get(key, PROGRAMS_PER_SM))
    compiled = _step_kernel[(programs,)](
        weights.table, wte, wpe, *ln_f, weights.tensors[-1], tok, pos, seqlens, kv, *scratch, logits, sync,
        sync_entries(n_layer, n_head), M, C, F, V, n_layer, n_head, wte.shape[0], wpe.shape[0], S, n_chunks, chunk,
        float(eps), qk_scale,
        *kv.stride()[:5], *weights.strides, *wte.stride(), *wpe.stride(), **form,
    )  # fmt: skip
    registers = getattr(compiled, "n_regs", None)  # a launch loads the kernel, which then knows them
    if on_gpu and key not in _RESIDENT and registers:
        _RESIDENT[key] = resident_programs(registers, form["THREADS"])
    return logits


def resident_programs(registers: int, threads: int) -> int:
    """Programs of `threads` threads using `registers` registers each that an SM holds at once, of
    its 65,536 registers (every NVIDIA GPU since sm_50; a warp's are allocated 256 at a time).
    The launches after a kernel's first take at most this many an SM: a grid of more still
    finishes (the programs past those resident start as others leave, find the queue empty and
    leave in turn), but later. At 2 to 8 bf16 rows the kernel takes up to ~152 registers on
    sm_90: 3 programs an SM, not PROGRAMS_PER_SM's 4."""
    per_warp = -(-registers * 32 // 256) * 256
    return max(1, 65536 // (per_warp * max(1, threads // 32)))
