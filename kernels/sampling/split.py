"""The split path: every pass runs over a (B, C) grid, program (b, c) on chunk c of row b, so one
row spreads over the GPU. Its thresholds are radix selects: keys are searched one byte (8 bits)
at a time, most significant first, as unsigned numbers (key + 2^31): a prefix is the least key
with the bytes found so far, KEY_MIN before any."""

from __future__ import annotations

import triton
import triton.language as tl

from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sampling.common import (KEY_MIN, KEY_NEG_INF, _gumbel_argmax, _key, _load_scores, _min_p,
                                             _row_max, _store_mask, _temperature, _tie_weight, _top)  # fmt: skip


@triton.jit
def _reduce_chunks(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS: tl.constexpr):
    """A row's maximum and its first index from the per-chunk ones (B, num_chunks): the index
    held by the first chunk reaching the maximum, so the same as one pass over the row."""
    offs_c = tl.arange(0, MAX_CHUNKS)
    ok = offs_c < num_chunks
    part_max = tl.load(part_max_ptr + row * num_chunks + offs_c, mask=ok, other=float("-inf"))
    best = tl.max(part_max, axis=0)
    first = tl.min(tl.where(ok & (part_max == best), offs_c, MAX_CHUNKS), axis=0)
    return best, tl.load(part_idx_ptr + row * num_chunks + first)


@triton.jit
def _byte(key, prefix, DIGIT: tl.constexpr):
    """Byte DIGIT (0 = most significant) of each key + 2^31 (the sign bit flipped orders keys as
    unsigned numbers), and whether the key's bytes above it are the prefix's."""
    d = (key >> (24 - 8 * DIGIT)) & 255
    if DIGIT == 0:
        d = d ^ 128
        same = key >= KEY_MIN
    else:
        same = (key >> (32 - 8 * DIGIT)) == (prefix.to(tl.int32) >> (32 - 8 * DIGIT))
    return d, same


@triton.jit
def _sum_chunks(hist_ptr, row, num_chunks, MAX_CHUNKS: tl.constexpr):
    """A row's 256 bins summed over its chunks' (B, num_chunks, 256) partials. Every program of
    the row runs the same code on the same data, so all get the same bits."""
    offs_c = tl.arange(0, MAX_CHUNKS)
    bins = tl.arange(0, 256)
    ptrs = hist_ptr + (row * num_chunks + offs_c[:, None]) * 256 + bins[None, :]
    return tl.sum(tl.load(ptrs, mask=offs_c[:, None] < num_chunks, other=0.0), axis=0)


@triton.jit
def _count_select(cnt, k, prefix, above, DIGIT: tl.constexpr):
    """The k-th largest key's byte DIGIT: the largest d with count(key >= prefix.d.0) >= k, where
    that count is `above` (keys past the prefix's range) plus the counts cnt[>= d] of the keys in
    it. fp32 counts are exact: integers up to V <= 2^24. Returns the new prefix and `above`."""
    bins = tl.arange(0, 256)
    at_least = above + tl.cumsum(cnt, axis=0, reverse=True)
    d = tl.max(tl.where(at_least >= k.to(tl.float32), bins, 0), axis=0)
    above = above + tl.sum(tl.where(bins > d, cnt, 0.0), axis=0)
    return prefix + (d.to(tl.int64) << (24 - 8 * DIGIT)), above


@triton.jit
def _mass_select(mass, budget, prefix, below, DIGIT: tl.constexpr):
    """Top-p's byte DIGIT: the largest d with mass(key < prefix.d.0) <= budget, that mass being
    `below` (survivors under the prefix's range) plus mass[< d]. d = 0 always qualifies (the
    previous byte's choice). Returns the new prefix and `below`."""
    bins = tl.arange(0, 256)
    under = below + tl.cumsum(mass, axis=0)  # mass(key < prefix.(bin + 1).0)
    d = tl.max(tl.where((under <= budget) & (bins < 255), bins + 1, 0), axis=0)
    below = tl.max(tl.where(bins + 1 == d, under, below), axis=0)
    return prefix + (d.to(tl.int64) << (24 - 8 * DIGIT)), below


@triton.jit
def _count_hist(row_ptr, begin, end, t, prefix, DIGIT: tl.constexpr, V: tl.constexpr,
                BLOCK_V: tl.constexpr):  # fmt: skip
    """Counts, by byte DIGIT, of the keys in [begin, end) whose top DIGIT bytes are the prefix's.
    tl.histogram counts with integer shared-memory atomics: the same counts in any order."""
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        _, key = _load_scores(row_ptr, cols, t, False, 0.0, V)
        d, same = _byte(key, prefix, DIGIT)
        hist += tl.histogram(d, 256, mask=(cols < end) & same)
    return hist


@triton.jit
def _mass_hist(row_ptr, begin, end, t, m, t_k, prefix, DIGIT: tl.constexpr, V: tl.constexpr,
               BLOCK_V: tl.constexpr):  # fmt: skip
    """Sums of exp(s - m), by byte DIGIT, over the top-k survivors (key >= t_k) in [begin, end)
    whose top DIGIT bytes are the prefix's. There is no weighted histogram in Triton and float
    atomics would make the sums depend on timing, so the 256 bins are a 16 x 16 (high nibble, low
    nibble) one-hot product in fp32 FMAs, not TF32 (input_precision="ieee": the products are exact,
    the sums round as fp32 sums do), skipping blocks with no such survivor (most of them under a
    small top-k). Without top-k that is ~256 FMAs per entry per stage: the likely hot spot."""
    nib = tl.arange(0, 16)
    hist = tl.zeros([16, 16], dtype=tl.float32)
    t_k = t_k.to(tl.int32)
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, False, 0.0, V)
        d, same = _byte(key, prefix, DIGIT)
        ok = (cols < end) & (key >= t_k) & same
        if tl.max(ok.to(tl.int32), axis=0) > 0:
            hi = tl.where((d >> 4)[:, None] == nib[None, :], tl.where(ok, tl.exp(s - m), 0.0)[:, None], 0.0)
            lo = ((d & 15)[:, None] == nib[None, :]).to(tl.float32)
            hist += tl.dot(tl.trans(hi), lo, input_precision="ieee")
    return tl.reshape(hist, [256])


@triton.jit
def _store_state(state_ptr, row, SLOT: tl.constexpr, prefix, aux, below, budget):
    """state[row, SLOT] = (prefix, aux, below, budget), all exact in fp64."""
    ptr = state_ptr + (row * 8 + SLOT) * 4
    tl.store(ptr, prefix.to(tl.float64))
    tl.store(ptr + 1, aux.to(tl.float64))
    tl.store(ptr + 2, below.to(tl.float64))
    tl.store(ptr + 3, budget.to(tl.float64))


@triton.jit
def _load_state(state_ptr, row, SLOT: tl.constexpr):
    """state[row, SLOT] as (prefix int64, aux fp64, below fp32, budget fp32)."""
    ptr = state_ptr + (row * 8 + SLOT) * 4
    return (tl.load(ptr).to(tl.int64), tl.load(ptr + 1), tl.load(ptr + 2).to(tl.float32),
            tl.load(ptr + 3).to(tl.float32))  # fmt: skip


# Split path, launch STAGE = 0..7 over a (B, C) grid: program (b, c) holds the chunk
# [c * chunk, (c + 1) * chunk) of row b. Radix select, one byte of the key per launch, most
# significant first: a launch sums the chunks' byte histograms of the launch before and picks a
# byte, then histograms its chunk's keys in the prefix found so far by their next byte.
# Stages 0-3 count keys: the k-th largest key t_k = max{T : count(key >= T) >= k} by
#   d = max{d : above + count(prefix.d <= key, in the prefix) >= k},  above += count(byte > d).
# Stages 4-7 sum survivors' exp(s - m): top-p's T = max{T : mass(key < T) <= budget} by
#   d = max{d : below + mass(key < prefix.d, in the prefix) <= budget},  below += that mass,
# budget = (1 - top_p) * Z, Z the total of stage 4's masses. Stage 0 also writes the chunk's
# max and first argmax of x; stage 4 picks t_k's last byte; the draw kernel picks T's.
@triton.jit
def _chunk_of_row(logits_ptr, stride_logits_b, chunk, V: tl.constexpr):
    """Program (row, c) of a split-path grid: (row, c, the row's pointer, [begin, end) of chunk c)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    begin = c * chunk
    return row, c, logits_ptr + row * stride_logits_b, begin, tl.minimum(begin + chunk, V)


@triton.jit
def _split_search_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32
    top_k_ptr,  # (B,) int64
    top_p_ptr,  # (B,) fp64
    part_max_ptr,  # (B, C) fp32: the chunk's max of clean(x), written at stage 0
    part_idx_ptr,  # (B, C) int32: its first index
    hist_in_ptr,  # (B, C, 256) fp32: stage STAGE - 1's counts or masses (unread at stage 0)
    hist_out_ptr,  # (B, C, 256) fp32: this stage's
    state_ptr,  # (B, 8, 4) fp64: [b, j] = (prefix, above or t_k, below, budget) after stage j
    stride_logits_b,
    chunk,
    num_chunks,
    V: tl.constexpr,
    STAGE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row, c, row_ptr, begin, end = _chunk_of_row(logits_ptr, stride_logits_b, chunk, V)
    if STAGE == 0:
        best, best_i = _row_max(row_ptr, begin, end, V, BLOCK_V)
        tl.store(part_max_ptr + row * num_chunks + c, best)
        tl.store(part_idx_ptr + row * num_chunks + c, best_i)
    t, sampling = _temperature(temperature_ptr, row)
    k = tl.load(top_k_ptr + row)
    topk = sampling & (k > 0) & (k < V)  # +inf rows and rows with nothing to draw: sorted out later
    zero = (k * 0).to(tl.float32)  # not t * 0: t may be +inf
    prefix, aux, below, budget = k * 0 + KEY_MIN, zero, zero, zero
    if STAGE > 0:
        prefix, aux, below, budget = _load_state(state_ptr, row, STAGE - 1)
    if STAGE < 4:
        aux = aux.to(tl.float32)  # the count above the prefix's range
        if STAGE > 0:  # noqa: SIM102 (decided at compile time, unlike the run-time if below)
            if topk:
                cnt = _sum_chunks(hist_in_ptr, row, num_chunks, MAX_CHUNKS)
                prefix, aux = _count_select(cnt, k, prefix, aux, STAGE - 1)
        on = topk
    else:
        xmax = _reduce_chunks(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS)[0]
        m, ties_only = _top(xmax, t)
        top_p = tl.load(top_p_ptr + row)
        on = sampling & (m > float("-inf")) & ~ties_only & (top_p < 1.0)
        if STAGE == 4:
            t_k = k * 0 + KEY_NEG_INF  # top-k off
            if topk:
                cnt = _sum_chunks(hist_in_ptr, row, num_chunks, MAX_CHUNKS)
                t_k = _count_select(cnt, k, prefix, aux.to(tl.float32), 3)[0]
            prefix, aux, below = k * 0 + KEY_MIN, t_k, zero
        else:
            aux = aux.to(tl.int64)  # t_k
            if on:
                mass = _sum_chunks(hist_in_ptr, row, num_chunks, MAX_CHUNKS)
                if STAGE == 5:  # HF: 1 - top_p in fp64, rounded to fp32
                    budget = (1.0 - top_p).to(tl.float32) * tl.sum(mass, axis=0)
                prefix, below = _mass_select(mass, budget, prefix, below, STAGE - 5)
    if c == 0:
        _store_state(state_ptr, row, STAGE, prefix, aux, below, budget)
    if on:
        if STAGE < 4:
            hist = _count_hist(row_ptr, begin, end, t, prefix, STAGE, V, BLOCK_V).to(tl.float32)
        else:
            hist = _mass_hist(row_ptr, begin, end, t, m, aux, prefix, STAGE - 4, V, BLOCK_V)
        tl.store(hist_out_ptr + (row * num_chunks + c) * 256 + tl.arange(0, 256), hist)


# Split path, the draw, over the same grid. Top-p's last byte gives t_p = min(T, key(m)) (t_k
# when top-p is off; key(0) on a +inf row, whose kept set is its +inf entries), then per chunk
#   part_z[b, c] = max of s - log(-log(u)) over the chunk's kept set,  part_zi[b, c] = its first
# index, u as in _sample_kernel (Philox at row * V + col); or the chunk's kept set (WRITE_MASK).
@triton.jit
def _split_draw_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32
    top_p_ptr,  # (B,) fp64
    min_p_ptr,  # (B,) fp32
    seed_ptr,  # (1,) int64 (unread when WRITE_MASK)
    part_max_ptr,  # (B, C) fp32 from _split_search_kernel
    part_idx_ptr,  # (B, C) int32 from _split_search_kernel
    hist_in_ptr,  # (B, C, 256) fp32: top-p's last masses
    state_ptr,  # (B, 8, 4) fp64 from _split_search_kernel
    out_ptr,  # (B, V) bool kept set when WRITE_MASK, else unused
    part_z_ptr,  # (B, C) fp32: the chunk's max of s + g, on rows with something to draw
    part_zi_ptr,  # (B, C) int32: its first index
    stride_logits_b,
    chunk,
    num_chunks,
    V: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row, c, row_ptr, begin, end = _chunk_of_row(logits_ptr, stride_logits_b, chunk, V)
    t, sampling = _temperature(temperature_ptr, row)
    xmax, imax = _reduce_chunks(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS)
    m, ties_only = _top(xmax, t)
    drawable = sampling & (m > float("-inf"))
    top_p = tl.load(top_p_ptr + row)
    prefix, t_p, below, budget = _load_state(state_ptr, row, 7)
    t_p = t_p.to(tl.int64)  # t_k
    tie_weight = t * 0.0
    if drawable & ~ties_only & (top_p < 1.0):
        mass = _sum_chunks(hist_in_ptr, row, num_chunks, MAX_CHUNKS)
        t_p, below = _mass_select(mass, budget, prefix, below, 3)
        group = tl.sum(tl.where(tl.arange(0, 256) == (t_p & 255), mass, 0.0), axis=0)  # mass(key == t_p)
        top = _key(m).to(tl.int64)
        if t_p <= top:  # else every score under the top one is removed: only the top ties are drawn
            tie_weight = _tie_weight(t_p.to(tl.int32), m, budget, below, group)
        t_p = tl.minimum(t_p, top)  # the top token always stays
    t_p = tl.where(ties_only, 0, t_p).to(tl.int32)
    min_p = _min_p(min_p_ptr, row)
    if WRITE_MASK:
        _store_mask(out_ptr, row_ptr, begin, end, row, t, ties_only, xmax, m, t_p, min_p, sampling,
                    drawable, imax, V, BLOCK_V)  # fmt: skip
    elif drawable:
        best, best_i = _gumbel_argmax(row_ptr, begin, end, tl.load(seed_ptr), row, t, ties_only, xmax,
                                      m, t_p, tie_weight, min_p, V, BLOCK_V)  # fmt: skip
        tl.store(part_z_ptr + row * num_chunks + c, best)
        tl.store(part_zi_ptr + row * num_chunks + c, best_i)


# Split path, the token, one program per row: the index held by the first chunk with the largest
# part_z (the first argmax of s + g over the row, as _sample_kernel finds it); a greedy row's
# first argmax of x; 0 on a row with nothing to draw.
@triton.jit
def _split_token_kernel(
    temperature_ptr,  # (B,) fp32
    part_max_ptr,  # (B, C) fp32 from _split_search_kernel
    part_idx_ptr,  # (B, C) int32 from _split_search_kernel
    part_z_ptr,  # (B, C) fp32 from _split_draw_kernel, read on rows with something to draw
    part_zi_ptr,  # (B, C) int32 from _split_draw_kernel
    out_ptr,  # (B,) int64 token ids
    num_chunks,
    V: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_previous_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    t, sampling = _temperature(temperature_ptr, row)
    xmax, imax = _reduce_chunks(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS)
    m = _top(xmax, t)[0]
    token = tl.where(sampling, 0, imax)
    if sampling & (m > float("-inf")):
        token = _reduce_chunks(part_z_ptr, part_zi_ptr, row, num_chunks, MAX_CHUNKS)[1]
    tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))
