"""The candidate path.

Where the caller can bound every row's top_k below CAND_MAX_K (a bound the host knows: a Python
number, a list, a CPU tensor), a row's kept set lies among its cand_k best scores, cand_k a
power of two above the bound, and those are found by sorting networks, not searches:
  1. _candidates_kernel over B x C programs: program b C + c keeps the cand_k best entries of its
     block-wide chunk, tl.topk over packed int64 entries (key(s) << 32 | V - 1 - col), which
     are distinct and rank ties by the lower column first, as the other paths break them.
  2. _candidate_draw_kernel over (B,): the row's cand_k best of its C * cand_k candidates, in
     order (the chunks' bests hold the row's best: entries are distinct). t_k is the k-th key,
     the survivors a prefix of the list; Z, top-p's tail masses (a reversed cumsum, summed from
     the smallest as HF's ascending cumsum is), min-p and the Gumbel draw (the same Philox
     counters, so the same tokens as the other paths) run on the list alone.
The list is complete when top-k's tie group ends inside it (its last key is below t_k). Rows it
does not cover (top_k off or >= cand_k, a score reaching +inf, a tie group running past the
list) run _sample_row in the same program: right, and slow. 2 launches, fixed by the shapes.
From CAND_BOUND_MIN_ROWS rows, two launches first bound each row's k-th best key from below:
  0a. _group_max_kernel over (B, C): the maximum key of each CAND_GROUP entries.
  0b. _key_bound_kernel over (B,): the k-th largest of the row's group maxima (k = its top_k;
      KEY_MIN where the list will not cover the row anyway). The k groups above it hold k
      distinct entries at or above it, so the row's best k all are: nothing below it is needed.
  Then in 1. a chunk with at most cand_k entries at or above the bound stores them, in column
  order, by a prefix sum (the draw kernel's merge ranks them), and one with more sorts as above;
  the few entries also go to one list per row (CAND_LIST long, appended at an atomic count that
  0b zeroed), which 2. sorts once instead of merging C chunk lists, unless a chunk sorted or the
  list overflowed (the count then exceeds it).
Every tie of the k-th key is at or above the bound (the bound is a key, not an entry), so the
list's coverage test stays exact.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sampling.common import (KEY_MIN, KEY_NEG_INF, _gumbel, _kept, _load_scores, _min_p, _temperature,
                                             _tie_weight)  # fmt: skip
from fastgpt.kernels.sampling.row import _sample_row

PAD = tl.constexpr(-(2**63))  # a packed entry below every real one (key KEY_MIN)


@triton.jit
def _pack(key, cols, V: tl.constexpr):
    """(key << 32) | (V - 1 - col) as int64, ordered by key then by the lower column; PAD past V."""
    packed = (key.to(tl.int64) << 32) | (V - 1 - cols).to(tl.int64)
    return tl.where(cols < V, packed, PAD)


@triton.jit
def _unpack(packed, V: tl.constexpr):
    """Key, column and score of packed entries (the score of PAD is NaN: never kept)."""
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)  # _key is its own inverse
    return key, V - 1 - (packed & 0xFFFFFFFF), bits.to(tl.float32, bitcast=True)


@triton.jit
def _chunk_keys(logits_ptr, temperature_ptr, stride_logits_b, V: tl.constexpr, BLOCK: tl.constexpr):
    """Program row * C + c of a grid over each row's C = cdiv(V, BLOCK) chunks (one axis: a
    second one stops at 65535 chunks or rows): row, that index (chunk c of row `row` among all
    rows' chunks, int64), the chunk's columns and the keys of their scores (a greedy row's t is 1:
    its scores are its logits; -inf past V)."""
    C: tl.constexpr = (V + BLOCK - 1) // BLOCK
    chunk = tl.program_id(0).to(tl.int64)
    row = chunk // C
    cols = (chunk % C).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    t = _temperature(temperature_ptr, row)[0]
    return row, chunk, cols, _load_scores(logits_ptr + row * stride_logits_b, cols, t, False, 0.0, V)[1]


@triton.jit
def _group_max_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32
    gmax_ptr,  # (B, C * BLOCK // GROUP) int32: each group's largest key (KEY_NEG_INF past V)
    stride_logits_b,
    V: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row, chunk, cols, key = _chunk_keys(logits_ptr, temperature_ptr, stride_logits_b, V, BLOCK)
    GROUPS: tl.constexpr = BLOCK // GROUP
    gmax = tl.max(tl.reshape(key, [GROUPS, GROUP]), axis=1)
    tl.store(gmax_ptr + chunk * GROUPS + tl.arange(0, GROUPS), gmax)


@triton.jit
def _key_bound_kernel(
    gmax_ptr,  # (B, num_groups) int32 from _group_max_kernel
    top_k_ptr,  # (B,) int64
    bound_ptr,  # (B,) int32: a key at or below the row's k-th best, KEY_MIN for no bound
    count_ptr,  # (B,) int32: the row's entries in its list so far, set to 0 here for the next kernel
    num_groups,
    CAND_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    best = tl.full([CAND_K], KEY_MIN, tl.int32)  # the CAND_K largest group maxima so far, descending
    for start in range(0, num_groups, BLOCK_G):
        offs = start + tl.arange(0, BLOCK_G)
        gmax = tl.load(gmax_ptr + row * num_groups + offs, mask=offs < num_groups, other=KEY_MIN)
        best = tl.topk(tl.reshape(tl.join(best, tl.topk(gmax, CAND_K)), [2 * CAND_K]), CAND_K)
    k = tl.load(top_k_ptr + row)
    kth = tl.max(tl.where(tl.arange(0, CAND_K) == k - 1, best, KEY_MIN), axis=0)
    # No bound where the draw kernel will not use the list (top_k off or >= CAND_K) or where
    # there are fewer groups than k: every entry is kept, and the chunks sort.
    bound = tl.where((k > 0) & (k < CAND_K) & (k <= num_groups), kth, KEY_MIN)
    tl.store(bound_ptr + row, bound)
    tl.store(count_ptr + row, 0)


@triton.jit
def _candidates_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32
    bound_ptr,  # (B,) int32 from _key_bound_kernel: read when BOUNDED
    cand_ptr,  # (B, C, CAND_K) int64: candidates of each chunk, PAD in unused slots
    count_ptr,  # (B,) int32, zeroed by _key_bound_kernel: entries appended to the row's list (BOUNDED)
    list_ptr,  # (B, LIST) int64: the row's entries at or above its bound, in no order (BOUNDED)
    stride_logits_b,
    V: tl.constexpr,
    CAND_K: tl.constexpr,
    BLOCK: tl.constexpr,
    BOUNDED: tl.constexpr,
    LIST: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row, chunk, cols, key = _chunk_keys(logits_ptr, temperature_ptr, stride_logits_b, V, BLOCK)
    packed = _pack(key, cols, V)
    out = cand_ptr + chunk * CAND_K
    slots = tl.arange(0, CAND_K)
    if BOUNDED:
        above = (key >= tl.load(bound_ptr + row)) & (cols < V)
        n = tl.sum(above.to(tl.int32), axis=0)
        if n <= CAND_K:  # the chunk's entries at or above the bound, in column order, then PAD
            slot = tl.cumsum(above.to(tl.int32), axis=0) - 1
            tl.store(out + slot, packed, mask=above)
            tl.store(out + slots, tl.full([CAND_K], PAD, tl.int64), mask=slots >= n)
            base = tl.atomic_add(count_ptr + row, n, sem="relaxed")  # and appended to the row's list
            tl.store(list_ptr + row * LIST + base + slot, packed, mask=above & (base + slot < LIST))
        else:  # sorted; the row's list is left incomplete, which a count past LIST marks
            tl.store(out + slots, tl.topk(packed, CAND_K))
            tl.atomic_add(count_ptr + row, LIST + 1, sem="relaxed")
    else:
        tl.store(out + slots, tl.topk(packed, CAND_K))


@triton.jit
def _candidate_draw_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16: read by rows the list does not cover
    temperature_ptr,  # (B,) fp32
    top_k_ptr,  # (B,) int64
    top_p_ptr,  # (B,) fp64
    min_p_ptr,  # (B,) fp32
    seed_ptr,  # (1,) int64 (unread when WRITE_MASK)
    cand_ptr,  # (B, num_cands) int64 from _candidates_kernel
    count_ptr,  # (B,) int32 and (B, LIST) int64 from _candidates_kernel: read when BOUNDED
    list_ptr,
    out_ptr,  # (B,) int64 token ids, or (B, V) bool kept set, zeroed by the launcher, when WRITE_MASK
    stride_logits_b,
    num_cands,
    V: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    CAND_K: tl.constexpr,
    MERGE_BLOCK: tl.constexpr,
    BOUNDED: tl.constexpr,
    LIST: tl.constexpr,
    BLOCK_V: tl.constexpr,  # and NUM_PIVOTS: _sample_row's, for rows the list does not cover
    NUM_PIVOTS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(count_ptr + row) if BOUNDED else LIST + 1
    if n <= LIST:  # the row's entries at or above its bound, appended whole: one sort of LIST
        offs = tl.arange(0, LIST)
        best = tl.topk(tl.load(list_ptr + row * LIST + offs, mask=offs < n, other=PAD), CAND_K)
    else:  # the row's best, in descending order, merged from its chunks' lists
        best = tl.full([CAND_K], PAD, tl.int64)
        for start in range(0, num_cands, MERGE_BLOCK):
            offs = start + tl.arange(0, MERGE_BLOCK)
            cand = tl.load(cand_ptr + row * num_cands + offs, mask=offs < num_cands, other=PAD)
            best = tl.topk(tl.reshape(tl.join(best, tl.topk(cand, CAND_K)), [2 * CAND_K]), CAND_K)
    key, col, s = _unpack(best, V)
    i = tl.arange(0, CAND_K)
    sampling = _temperature(temperature_ptr, row)[1]
    m = tl.max(tl.where(i == 0, s, float("-inf")), axis=0)  # the top score (entry 0 is never PAD)
    drawable = sampling & (m > float("-inf"))

    k = tl.load(top_k_ptr + row)
    kth = tl.max(tl.where(i == k - 1, key, KEY_MIN), axis=0)
    t_k = tl.where(k < V, kth, KEY_NEG_INF)  # top_k >= V keeps every finite score
    last = tl.min(key, axis=0)  # the list's last key, KEY_MIN where the row is shorter
    covered = (k > 0) & (k < CAND_K) & (m < float("inf")) & ((last < t_k) | (t_k == KEY_NEG_INF))
    if drawable & ~covered:
        _sample_row(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, out_ptr, row,
                    stride_logits_b, V, WRITE_MASK, BLOCK_V, NUM_PIVOTS)  # fmt: skip
    else:
        # top-p: removed where the mass at or below an entry's key is <= budget. With `first` the
        # first survivor whose tail mass is, the kept keys are those >= the key just before it.
        top_p = tl.load(top_p_ptr + row)
        survivor = (key >= t_k) & (s > float("-inf"))
        e = tl.where(survivor, tl.exp(s - m), 0.0)
        budget = (1.0 - top_p).to(tl.float32) * tl.sum(e, axis=0)  # HF: 1 - top_p in fp64, rounded
        tail = tl.cumsum(e, axis=0, reverse=True)
        first = tl.min(tl.where(survivor & (tail <= budget), i, CAND_K), axis=0)
        t_p = tl.max(tl.where(i == tl.maximum(first - 1, 0), key, KEY_MIN), axis=0)
        t_p = tl.where(top_p < 1.0, tl.maximum(t_p, t_k), t_k)  # none removed: t_k
        kept = _kept(s, key, m, t_p, _min_p(min_p_ptr, row))
        if WRITE_MASK:
            keep = tl.where(sampling, tl.where(drawable, kept, False), i == 0)
            tl.store(out_ptr + row * V + col, keep, mask=keep)
        else:
            token = tl.where(sampling, 0, tl.max(tl.where(i == 0, col, 0), axis=0))
            if drawable:
                below = tl.sum(tl.where(key < t_p, e, 0.0), axis=0)
                tie_weight = _tie_weight(t_p, m, budget, below, tl.sum(tl.where(key == t_p, e, 0.0), axis=0))
                tie_weight = tl.where(top_p < 1.0, tie_weight, 0.0)
                s_w = tl.where(key == t_p, s + tie_weight, s)
                z = tl.where(kept, s_w + _gumbel(tl.load(seed_ptr), row, col, V), float("-inf"))
                zmax = tl.max(z, axis=0)
                token = tl.min(tl.where(kept & (z == zmax), col, V), axis=0)
            tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))
