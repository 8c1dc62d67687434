"""One program per row (_sample_kernel): the top-k and top-p thresholds found by pivot searches
over the whole row, NUM_PIVOTS keys tested per pass, a data-dependent number of passes. Also the
candidate path's fallback for the rows its list does not cover (_sample_row)."""

from __future__ import annotations

import triton
import triton.language as tl

from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sampling.common import (KEY_NEG_INF, _gumbel_argmax, _key, _load_scores, _min_p, _row_max,
                                             _store_mask, _temperature, _tie_weight, _top)  # fmt: skip


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    """NUM_PIVOTS nondecreasing int64 keys spread over (lo, hi]."""
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    return lo + 1 + ((hi - lo - 1) * (j + 1)) // (NUM_PIVOTS + 1)


@triton.jit
def _narrow(lo, hi, c_lo, c_hi, piv, good, cnt):
    """Shrink [lo, hi] to the pivots around the answer, the largest T with good(T).

    piv is nondecreasing and good(piv) true on a prefix, so the last good pivot is the largest
    good one and the first bad pivot the smallest bad one. cnt[j] = count(key >= piv[j]) is
    nonincreasing; c_lo and c_hi track count(key >= lo) and count(key >= hi + 1).
    """
    new_lo = tl.max(tl.where(good, piv, lo), axis=0)
    new_hi = tl.min(tl.where(good, hi + 1, piv), axis=0) - 1
    new_c_lo = tl.min(tl.where(good, cnt, c_lo), axis=0)
    new_c_hi = tl.max(tl.where(good, c_hi, cnt), axis=0)
    return new_lo, new_hi, new_c_lo, new_c_hi


@triton.jit
def _topk_threshold(row_ptr, t, ties_only, xmax, k, lo, hi,
                    V: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):  # fmt: skip
    """The k-th largest key (ties counted), searched in [lo, hi]: the largest T with
    count(key >= T) >= k. Invariant: count(key >= lo) >= k > count(key >= hi + 1).

    Stops early once {key >= lo} is the answer's set: count(key >= lo) == k, or [lo, hi] holds
    a single key. lo == hi on entry returns lo (the search is off).
    """
    c_lo = lo * 0 + V
    c_hi = lo * 0
    while (lo < hi) & (c_lo != k) & (c_lo - c_hi > 1):
        piv = _pivots(lo, hi, NUM_PIVOTS)
        piv32 = piv.to(tl.int32)
        cnt = tl.zeros([NUM_PIVOTS], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            _, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
            cnt += tl.sum((key[:, None] >= piv32[None, :]).to(tl.int32), axis=0)
        cnt = cnt.to(tl.int64)
        lo, hi, c_lo, c_hi = _narrow(lo, hi, c_lo, c_hi, piv, cnt >= k, cnt)
    return lo


@triton.jit
def _survivor_mass(row_ptr, t, ties_only, xmax, m, t_k, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Z = sum of exp(s - m) over the top-k survivors (key >= t_k)."""
    t_k = t_k.to(tl.int32)
    z = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
        z += tl.where(key >= t_k, tl.exp(s - m), 0.0)
    return tl.sum(z, axis=0)


@triton.jit
def _topp_threshold(row_ptr, t, ties_only, xmax, m, t_k, budget, lo, hi,
                    V: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):  # fmt: skip
    """The largest key T in [lo, hi] with mass(key < T) <= budget, mass summing exp(s - m) over
    the top-k survivors (key >= t_k). Tokens with key < T are removed by top-p.

    lo = t_k on entry (nothing below it carries mass); hi = the top key, so the top token always
    stays. Stops once [lo, hi] holds a single key; lo == hi on entry returns lo. Also returns a
    bound on count(key == T): at most 1 means no tie group there for top-p to split.
    """
    t_k = t_k.to(tl.int32)
    c_lo = lo * 0 + V  # an upper bound of count(key >= lo) is enough for the stopping rule
    c_hi = lo * 0
    while (lo < hi) & (c_lo - c_hi > 1):
        piv = _pivots(lo, hi, NUM_PIVOTS)
        piv32 = piv.to(tl.int32)
        cnt = tl.zeros([NUM_PIVOTS], dtype=tl.int32)
        mass = tl.zeros([NUM_PIVOTS], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            s, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
            e = tl.where(key >= t_k, tl.exp(s - m), 0.0)
            above = key[:, None] >= piv32[None, :]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, 0.0, e[:, None]), axis=0)
        cnt = cnt.to(tl.int64)
        lo, hi, c_lo, c_hi = _narrow(lo, hi, c_lo, c_hi, piv, mass <= budget, cnt)
    return lo, c_lo - c_hi


@triton.jit
def _tie_masses(row_ptr, t, ties_only, xmax, m, t_k, t_p, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """(mass(t_k <= key < t_p), mass(key == t_p)) of exp(s - m): what _tie_weight takes."""
    t_k, t_p = t_k.to(tl.int32), t_p.to(tl.int32)
    below = tl.zeros([BLOCK_V], dtype=tl.float32)
    group = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
        e = tl.where(key >= t_k, tl.exp(s - m), 0.0)
        below += tl.where(key < t_p, e, 0.0)
        group += tl.where(key == t_p, e, 0.0)
    return tl.sum(below, axis=0), tl.sum(group, axis=0)


# Per row b: x = clean(logits[b]). Greedy (t <= 0): token = first argmax of x. Otherwise
#   s = x / t;  keep s >= (k-th largest s);  keep key(s) >= T_p, HF's top-p on the survivors
#   (the tie group at T_p weighted by the share HF keeps of it: w);  keep exp(s - max s) >= min_p;
#   token = argmax over the kept set of s + log(w at T_p) - log(-log(u)).
@triton.jit
def _sample_row(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, out_ptr, row,
                stride_logits_b, V: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
                NUM_PIVOTS: tl.constexpr):  # fmt: skip
    """Row `row`'s token (or kept set), by searches over the whole row in one program."""
    row_ptr = logits_ptr + row * stride_logits_b
    t, sampling = _temperature(temperature_ptr, row)
    xmax, imax = _row_max(row_ptr, 0, V, V, BLOCK_V)
    m, ties_only = _top(xmax, t)
    drawable = sampling & (m > float("-inf"))
    top = _key(m).to(tl.int64)
    lo = top * 0 + KEY_NEG_INF

    k = tl.load(top_k_ptr + row)
    topk_on = drawable & (k > 0) & (k < V)
    t_k = _topk_threshold(row_ptr, t, ties_only, xmax, k, lo, tl.where(topk_on, top, lo),
                          V, BLOCK_V, NUM_PIVOTS)  # fmt: skip

    top_p = tl.load(top_p_ptr + row)
    topp_on = drawable & (top_p < 1.0)
    budget = t * 0.0
    if topp_on:
        z = _survivor_mass(row_ptr, t, ties_only, xmax, m, t_k, V, BLOCK_V)
        budget = (1.0 - top_p).to(tl.float32) * z  # HF: 1 - top_p in fp64, rounded to fp32
    t_p, at_most = _topp_threshold(row_ptr, t, ties_only, xmax, m, t_k, budget, t_k,
                                   tl.where(topp_on, top, t_k), V, BLOCK_V, NUM_PIVOTS)  # fmt: skip
    t_p = t_p.to(tl.int32)  # t_p >= t_k: one key threshold for both filters

    min_p = _min_p(min_p_ptr, row)
    if WRITE_MASK:
        _store_mask(out_ptr, row_ptr, 0, V, row, t, ties_only, xmax, m, t_p, min_p, sampling, drawable,
                    imax, V, BLOCK_V)  # fmt: skip
    else:
        token = tl.where(sampling, 0, imax)  # a row with nothing to draw returns 0
        if drawable:
            tie_weight = t * 0.0
            # A pass more where a tie group may straddle the cut (a ties-only row's draw is uniform anyway)
            if topp_on & ~ties_only & (at_most > 1):
                below, group = _tie_masses(row_ptr, t, ties_only, xmax, m, t_k, t_p, V, BLOCK_V)
                tie_weight = _tie_weight(t_p, m, budget, below, group)
            seed = tl.load(seed_ptr)
            token = _gumbel_argmax(row_ptr, 0, V, seed, row, t, ties_only, xmax, m, t_p, tie_weight, min_p,
                                   V, BLOCK_V)[1]  # fmt: skip
        tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))


@triton.jit
def _sample_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32; <= 0 (or NaN) means greedy
    top_k_ptr,  # (B,) int64; <= 0 or >= V means off
    top_p_ptr,  # (B,) fp64; >= 1 (or NaN) means off, <= 0 keeps only the top token(s)
    min_p_ptr,  # (B,) fp32; <= 0 (or NaN) means off
    seed_ptr,  # (1,) int64
    out_ptr,  # (B,) int64 token ids, or (B, V) bool kept set when WRITE_MASK
    stride_logits_b,
    V: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    _sample_row(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, out_ptr,
                tl.program_id(0).to(tl.int64), stride_logits_b, V, WRITE_MASK, BLOCK_V, NUM_PIVOTS)  # fmt: skip
