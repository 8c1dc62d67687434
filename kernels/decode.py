"""Decode attention in Triton: Flash-Decoding (split-KV) for a few new query tokens per row.

Row b attends to the first len_b = clamp(cache_seqlens[b], 0, Smax) positions of a static KV
cache; its Sq queries are the row's last Sq positions (query i at len_b - Sq + i) and, causal,
see the positions up to their own (one query per row, a decode step, sees them all). The cache
of each (row, KV head) is cut into `num_splits` chunks; one program reads one chunk of one KV
head once and serves the (query head, query) pairs of the Hq // Hkv heads that share it (GQA;
more pairs than a tile of BLOCK_G rows take several programs), writing a partial output and its
log-sum-exp. Scores and weighted values are tl.dot products over a tile of at least 16 rows,
padded with zero rows where there are fewer pairs (MHA's decode step pads 1 to 16): the padding costs
tensor-core work a decode step has to spare, and a loop of dots is one whose loads Triton
pipelines (cp.async, num_stages - 1 blocks ahead), which a loop of elementwise products and
reductions is not: a bandwidth-bound kernel needs those bytes in flight. A second kernel
merges the splits, or, given counters the caller keeps, the last split of each row to finish
does (one launch). A single split writes the output directly. A row of length 0 gets zeros.
Optionally each (row, head)'s log-sum-exp is stored beside its output (natural log; -inf where no
position is seen): what merging this attention with attention over other keys takes.
An optional boolean mask (B, Hq, Sq, Smax) hides positions per query as well (transformers'
padded decode steps); a query that sees no position gets zeros.

The split count is chosen on the host from shapes and the SM count only (never from
cache_seqlens, which stays on the device), so the op never syncs and can be captured in a CUDA
graph. Block sizes are fixed per head dim (no autotuning, which could not run under capture).
fp32 inputs use `input_precision="tf32x3"` dots (close to fp32 accuracy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastgpt._backends import AttentionOutput, launch_pdl, sm_count
from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sizes import cdiv, next_power_of_2

_FP32_DOT_PRECISION = "tf32x3"
# Split until the grid has this many programs an SM, unless it has more than
# _NO_SPLIT_PROGRAMS_PER_SM already: measured on an H200 (132 SMs; gpu-probe's decode_tiles of
# 2026-11-30, graph replay), B32 H12 L288 D64 (384 programs) in one split 8.4 us against 11.1 in 2
# (4 an SM) and 11.9 in 3 (16 an SM, the rule before); B64 H12 L4096 D64 (768) 187.4 us in 1,
# 188.5 in 2, 189.7 in 3; the grids short of 2 waves as fast with 4 an SM as with 16 (B1 H12 L1024
# D64 4.5 us; B8 H32 L4096 D128, 256 programs, 128.6 in 3 splits against 128.9 in 9, but 156 in
# one). Where between 256 and 384 programs one split starts to win depends on the rows' length:
# the 2 is an estimate.
_PROGRAMS_PER_SM = 4
_NO_SPLIT_PROGRAMS_PER_SM = 2
_MIN_SPLIT_BLOCKS = 2  # ... but no split shorter than this many BLOCK_N blocks
_MAX_SPLITS = 128
_INTERPRETER_SMS = 6  # a pretend SM count on CPU tensors, so the interpreter exercises splits (up to 12 programs)
_INTERPRETER_BLOCK_N = 16
_MAX_BLOCK_N = 64  # the largest block of cache positions: positions within it use 32-bit offsets
_LN2 = tl.constexpr(math.log(2))  # a base-2 log-sum-exp times this is the natural-log one
_MERGE_TILE = 2048  # the split kernel's own merge: (heads, splits, D) values a step, 16 a thread at 4 warps


# ----------------------------------------------------------------------------- kernels


# Per program: one (row b, KV head), one split = cache positions [start, end) of that row, for
# up to BLOCK_G of the group * Sq pairs r = g * Sq + i of query head h = kv_head * group + g and
# query i that read this KV head. Pair r sees positions j < limit_r: limit_r = len_b - Sq + 1 + i
# when CAUSAL, else len_b. In base-2 units:
#   s_rj = (q_r . k_j) * scale * log2(e),  m_r = max_j s_rj,  l_r = sum_j 2^(s_rj - m_r)
#   o_r  = sum_j 2^(s_rj - m_r) v_j / l_r,  lse_r = m_r + log2(l_r)     (online over BLOCK_N blocks)
# A pair that sees no position of its split (start >= limit_r, or every position hidden by the
# mask) writes o = 0 and lse = -inf. With SINGLE_SPLIT the program covers the whole row and
# writes o in the output dtype.
@triton.jit
def _decode_split_kernel(
    q_ptr,  # (B, Hq, Sq, D), stride(-1) == 1
    k_ptr,  # (B, Hkv, Smax, D), stride(-1) == 1
    v_ptr,  # (B, Hkv, Smax, D), stride(-1) == 1
    seqlens_ptr,  # (B,) int32, any stride: valid positions per row, clamped to [0, Smax] here
    o_ptr,  # (B, Hq, Sq, D) output, contiguous (TOKEN_MAJOR: (B, Sq, Hq, D)): written with SINGLE_SPLIT or MERGE_HERE
    o_lse_ptr,  # (B, Hq, Sq) fp32 natural-log log-sum-exps, contiguous: written with STORE_LSE, as o
    o_part_ptr,  # (B, Hq, Sq, num_splits, D) fp32 partial outputs; unused with SINGLE_SPLIT
    lse_ptr,  # (B, Hq, Sq, num_splits) fp32 partial log2-sum-exp; unused with SINGLE_SPLIT
    counters_ptr,  # (programs,) int32, zero between calls: splits done per program row, with MERGE_HERE
    mask_ptr,  # (B, Hq, Sq, Smax) uint8, stride(-1) == 1, 0 = hidden (strides 0 broadcast): read when HAS_MASK
    stride_q_b, stride_q_h, stride_q_s, stride_seqlens_b, stride_mask_b, stride_mask_h, stride_mask_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    Hkv, Smax, chunk, qk_scale,
    group,  # Hq // Hkv: query heads per KV head; their group * Sq pairs are served BLOCK_G at a time
    Sq,  # queries per row
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, MERGE_HERE: tl.constexpr, MERGE_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, STORE_LSE: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    pairs = group * Sq
    num_g = tl.cdiv(pairs, BLOCK_G)
    bkv = tl.program_id(0) // num_g
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    offs_g = (tl.program_id(0) % num_g) * BLOCK_G + tl.arange(0, BLOCK_G)  # pair index within the group
    pair_ok = offs_g < pairs
    length = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b * stride_seqlens_b), 0), Smax)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * group + offs_g // Sq  # (BLOCK_G,) the pairs' query heads and queries
    queries = (offs_g % Sq).to(tl.int64)  # 64-bit: queries * stride_mask_s may pass 2^31
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ptrs = q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + queries[:, None] * stride_q_s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=pair_ok[:, None] & d_ok, other=0.0)
    k_base = k_ptr + b * stride_k_b + kvh * stride_k_h
    v_base = v_ptr + b * stride_v_b + kvh * stride_v_h
    mask_rows = mask_ptr + b * stride_mask_b + heads[:, None] * stride_mask_h + queries[:, None] * stride_mask_s
    limit = length - Sq + 1 + queries  # (BLOCK_G,) CAUSAL: the pairs see positions below their limit

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        keep = (cols[:, None] < end) & d_ok
        # The block's first position is a 64-bit offset (Smax * stride may pass 2^31); positions
        # within the block stay 32-bit (the launcher keeps BLOCK_N * stride below 2^31).
        row0 = tl.cast(start_n, tl.int64)
        k_blk = k_base + row0 * stride_k_s + offs_n[:, None] * stride_k_s
        k = tl.load(k_blk + offs_d[None, :], mask=keep, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = cols[None, :] < end
        if CAUSAL:
            visible = visible & (cols[None, :] < limit[:, None])
        if HAS_MASK:
            seen = tl.load(mask_rows + cols[None, :], mask=pair_ok[:, None] & visible, other=0)
            visible = visible & (seen != 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # m_new is -inf while a head has seen no position (a mask hides them all) or only scores
        # past fp32's range: exponentials are then taken relative to 0, giving 0, never NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_blk = v_base + row0 * stride_v_s + offs_n[:, None] * stride_v_s
        v = tl.load(v_blk + offs_d[None, :], mask=keep, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_safe[:, None])  # none seen: 0, even past a 0 * NaN
    rows = (b * Hkv * group + heads) * Sq + queries  # flat (b, h, i) index
    out_rows = _out_rows(rows, Hkv * group, Sq, TOKEN_MAJOR)
    row_ok = pair_ok[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # base 2
    if SINGLE_SPLIT:
        tl.store(o_ptr + out_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok & d_ok)
        if STORE_LSE:
            tl.store(o_lse_ptr + rows, lse * _LN2, mask=pair_ok)
    else:
        part = rows * num_splits + split  # flat (b, h, i, split) index
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok & d_ok)
        tl.store(lse_ptr + part, lse, mask=pair_ok)
        if MERGE_HERE:  # the last split of this program row to finish merges them all
            tl.debug_barrier()  # every thread's partials are stored before the count says so (release)
            if tl.atomic_add(counters_ptr + tl.program_id(0), 1, sem="acq_rel") == num_splits - 1:
                _merge_splits(o_part_ptr, lse_ptr, o_ptr, o_lse_ptr, rows, out_rows, pair_ok, num_splits,
                              HEAD_DIM, BLOCK_G, MERGE_SPLITS, BLOCK_D, STORE_LSE)  # fmt: skip
                tl.atomic_xchg(counters_ptr + tl.program_id(0), 0)  # zero again for the next call


# The output row of flat (b, h, i) rows: themselves, or with TOKEN_MAJOR the (b, i, h) row, the
# output being (B, Sq, Hq, D) in memory (GPT's output projection reads it as (B Sq, Hq D) rows).
@triton.jit
def _out_rows(rows, Hq, Sq, TOKEN_MAJOR: tl.constexpr):
    if TOKEN_MAJOR:
        return (rows // (Hq * Sq) * Sq + rows % Sq) * Hq + rows // Sq % Hq
    return rows


# o[out_rows] = the splits' partial outputs of the (b, h, i) rows `rows` merged by their log-sum-exps
# (base 2), online over blocks of BLOCK_S splits, and with STORE_LSE the rows' log-sum-exps:
#   M = max_s lse_s,  w_s = 2^(lse_s - M),  o = sum_s w_s o_s / sum_s w_s,  lse = M + log2(sum_s w_s)
# Empty splits have lse = -inf and weight 0; a row whose splits are all empty gets 0 (lse -inf).
# The loads go to L2 (.cg): in the split kernel other programs, on other SMs, wrote the partials.
@triton.jit
def _merge_splits(o_part_ptr, lse_part_ptr, o_ptr, o_lse_ptr, rows, out_rows, row_ok, num_splits,
                  HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  STORE_LSE: tl.constexpr):  # fmt: skip
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    first = rows.to(tl.int64) * num_splits  # (BLOCK_R,) flat (b, h, i, split 0) index
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        part = first[:, None] + (s0 + offs_s)[None, :]  # (BLOCK_R, BLOCK_S)
        ok = row_ok[:, None] & (s0 + offs_s < num_splits)[None, :]
        lse = tl.load(lse_part_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(o_part_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                      mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen yet with a finite lse
        alpha = tl.math.exp2(m - m_ref)
        w = tl.math.exp2(lse - m_ref[:, None])
        w_sum = w_sum * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_s, 1)
        m = m_new
    w_safe = tl.where(w_sum == 0.0, 1.0, w_sum)
    out = acc / w_safe[:, None]
    tl.store(o_ptr + out_rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    if STORE_LSE:
        lse = tl.where(w_sum == 0.0, float("-inf"), m + tl.math.log2(w_safe))
        tl.store(o_lse_ptr + rows, lse * _LN2, mask=row_ok)


# Per program: one (b, h, i) row, its splits merged (_merge_splits).
@triton.jit
def _decode_combine_kernel(
    o_part_ptr,  # (B * Hq * Sq, num_splits, D) fp32 partial outputs
    lse_part_ptr,  # (B * Hq * Sq, num_splits) fp32 partial log2-sum-exps
    o_ptr,  # (B, Hq, Sq, D) output, contiguous (TOKEN_MAJOR: (B, Sq, Hq, D))
    o_lse_ptr,  # (B, Hq, Sq) fp32 natural-log log-sum-exps, contiguous: written with STORE_LSE
    num_splits, Hq, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    rows = tl.program_id(0) + tl.arange(0, 1)
    _merge_splits(o_part_ptr, lse_part_ptr, o_ptr, o_lse_ptr, rows, _out_rows(rows, Hq, Sq, TOKEN_MAJOR), rows >= 0,
                  num_splits, HEAD_DIM, 1, BLOCK_S, BLOCK_D, STORE_LSE)  # fmt: skip


# ----------------------------------------------------------------------------- launcher


def split_plan(programs: int, Smax: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """(num_splits, chunk): cut each cache row into chunks of `chunk` positions (a multiple of
    block_n) so that `programs` (per split) * num_splits programs fill the GPU several times over;
    one split for a grid that does already."""
    wanted = 1 if programs > _NO_SPLIT_PROGRAMS_PER_SM * num_sms else cdiv(_PROGRAMS_PER_SM * num_sms, programs)
    most = min(_MAX_SPLITS, cdiv(Smax, block_n * _MIN_SPLIT_BLOCKS))
    splits = max(1, min(wanted, most))
    chunk = cdiv(cdiv(Smax, splits), block_n) * block_n
    return cdiv(Smax, chunk), chunk


def merge_splits_block(num_splits: int, block_g: int, block_d: int) -> int:
    """Splits a step of the split kernel's own merge takes: all of them, up to a tile of
    _MERGE_TILE values (the merge must not raise the kernel's register count much)."""
    return max(1, min(next_power_of_2(num_splits), _MERGE_TILE // (block_g * block_d)))


class _Tiles(NamedTuple):
    block_g: int  # query heads per program, >= 16 (tl.dot's smallest tile)
    block_d: int
    block_n: int  # cache positions per loop step
    num_warps: int
    num_stages: int


def gpu_tiles(pairs: int, D: int, fp32: bool) -> _Tiles:
    """Tile sizes on the GPU, checked offline (tests/test_decode.py) for shared memory on sm_80 and
    sm_90, and within the 99 KB of an sm_86/sm_89 block (no autotuner here to skip a tile that does
    not fit): fp32 operands double the bytes and tf32x3 dots triple them, so fp32 takes smaller
    tiles, and 256-wide heads take at most 32 rows (bf16) or 16 positions (fp32) a step. `pairs`:
    the (query head, query) pairs that read one KV head, group * Sq."""
    block_d = max(16, next_power_of_2(D))
    widest = 16 if fp32 else 32 if block_d == 256 else 64
    block_g = min(widest, max(16, next_power_of_2(pairs)))
    block_n = 64 if block_d <= 128 and not fp32 else 16 if fp32 and block_d == 256 else 32
    return _Tiles(block_g, block_d, block_n, 8 if block_g >= 64 else 4, 2 if fp32 else 3)


def _plan(device, B: int, Hkv: int, Smax: int, pairs: int, D: int, fp32: bool) -> tuple[_Tiles, int, int, int]:
    """(tiles, programs per split, num_splits, chunk) of a call."""
    tiles = gpu_tiles(pairs, D, fp32)
    num_sms = sm_count(device.index) if device.type == "cuda" else _INTERPRETER_SMS
    if device.type != "cuda":  # Triton's interpreter: short blocks, so small caches take several splits
        tiles = tiles._replace(block_n=_INTERPRETER_BLOCK_N, num_stages=1)
    programs = B * Hkv * cdiv(pairs, tiles.block_g)
    return (tiles, programs, *split_plan(programs, Smax, tiles.block_n, num_sms))


class _Outputs(NamedTuple):
    out: torch.Tensor  # (B, Hq, Sq, D) in q's dtype, contiguous or a view of (B, Sq, Hq, D)
    lse: torch.Tensor  # (B, Hq, Sq) fp32 with return_lse, else `out` (unwritten)
    o_part: torch.Tensor  # (B, Hq, Sq, num_splits, D) fp32 partial outputs, else `out` (unread)
    lse_part: torch.Tensor  # (B, Hq, Sq, num_splits) fp32 partial log2-sum-exps, else `out` (unread)


def _outputs(q, num_splits: int, return_lse: bool, token_major: bool) -> _Outputs:
    """The call's output, and the workspaces of its splits where there are several."""
    B, Hq, Sq, D = q.shape
    if token_major:
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else out
    if num_splits == 1:
        return _Outputs(out, lse, out, out)
    o_part = torch.empty((B, Hq, Sq, num_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Hq, Sq, num_splits), dtype=torch.float32, device=q.device)
    return _Outputs(out, lse, o_part, lse_part)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float, causal: bool = True, mask=None,
                     counters=None, return_lse: bool = False, token_major: bool = False):  # fmt: skip
    """Attention of Sq new query tokens per row over the first cache_seqlens[b] cache positions.

    q (B, Hq, Sq, D); k_cache/v_cache (B, Hkv, Smax, D); fp16, bf16 or fp32, one dtype,
    stride(-1) == 1, any other strides; Hq % Hkv == 0; 1 <= D <= 256. cache_seqlens int32 (B,)
    on the same device (any stride), never read by the host; lengths are clamped to [0, Smax].
    Query i of row b stands at position len_b - Sq + i: causal, it sees positions [0, len_b - Sq + i];
    not causal, all of [0, len_b). mask: None, or bool (B, Hq, Sq, Smax) with stride(-1) == 1 (an
    expanded view is fine), False hiding position j from (head h, query i) too. counters: None, or
    an int32 tensor of at least B * Hq * Sq zeros on q's device (contiguous; checked by
    fastgpt.ops.decode, as the other arguments), the caller's, used by one stream at a time and
    left zero: with it the last split of each program row to finish merges the splits (one launch
    instead of two). Returns (B, Hq, Sq, D) in q.dtype, contiguous, or with token_major the
    (B, Hq, Sq, D) view of a contiguous (B, Sq, Hq, D) (so that out.transpose(1, 2) is a row per
    token); queries that see no position are zeros. With return_lse, AttentionOutput(out, lse):
    lse (B, Hq, Sq) fp32, each query's natural-log sum of exp(scores) over the positions it sees,
    -inf where none.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Smax = k_cache.shape[1], k_cache.shape[2]
    # A cache view whose in-block position offsets would overflow 32 bits spans > 2^31 elements:
    # copied (its position stride becomes D).
    k_cache, v_cache = (t.contiguous() if t.stride(2) * min(Smax, _MAX_BLOCK_N) >= 2**31 else t
                        for t in (k_cache, v_cache))
    group = Hq // Hkv
    fp32 = q.dtype == torch.float32
    tiles, programs, num_splits, chunk = _plan(q.device, B, Hkv, Smax, group * Sq, D, fp32)

    out, lse, o_part, lse_part = _outputs(q, num_splits, return_lse, token_major)
    # With counters the split kernel merges its own splits, unless the merge's (rows, D) tile alone
    # passes _MERGE_TILE (GQA heads of 256: it would spill registers): then the combine kernel does.
    merge_here = num_splits > 1 and counters is not None and tiles.block_g * tiles.block_d <= _MERGE_TILE
    pdl = launch_pdl(q.device)
    has_mask = mask is not None
    mask = mask.view(torch.uint8) if has_mask else out  # unread without a mask
    mask_strides = mask.stride()[:3] if has_mask else (0, 0, 0)
    _decode_split_kernel[(programs, num_splits)](
        q, k_cache, v_cache, cache_seqlens, out, lse, o_part, lse_part, counters if merge_here else out, mask,
        *q.stride()[:3], cache_seqlens.stride(0), *mask_strides, *k_cache.stride()[:3],
        *v_cache.stride()[:3], Hkv, Smax, chunk, scale * math.log2(math.e), group, Sq,
        HEAD_DIM=D, BLOCK_D=tiles.block_d, BLOCK_G=tiles.block_g, BLOCK_N=tiles.block_n,
        SINGLE_SPLIT=num_splits == 1, MERGE_HERE=merge_here,
        MERGE_SPLITS=merge_splits_block(num_splits, tiles.block_g, tiles.block_d) if merge_here else 1,
        CAUSAL=causal and Sq > 1, HAS_MASK=has_mask, STORE_LSE=return_lse, TOKEN_MAJOR=token_major,
        DOT_PRECISION=_FP32_DOT_PRECISION if fp32 else "tf32", PDL=pdl,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    if num_splits > 1 and not merge_here:
        _decode_combine_kernel[(B * Hq * Sq,)](
            o_part, lse_part, out, lse, num_splits, Hq, Sq,
            HEAD_DIM=D, BLOCK_D=tiles.block_d, BLOCK_S=min(32, next_power_of_2(num_splits)),
            STORE_LSE=return_lse, TOKEN_MAJOR=token_major, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return AttentionOutput(out, lse) if return_lse else out
