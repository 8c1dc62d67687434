"""Sort-free fused sampling in Triton: temperature, top-k, top-p, min-p, greedy.

Per row, over the vocabulary in blocks (the row is re-read from L2 on every pass):

1. Clean the logits (fastgpt.reference.clean_logits: NaN is -inf; a row holding +inf keeps only
   its +inf entries, as equal logits). Greedy rows (temperature <= 0, or NaN) return the first
   index of the maximum and stop here.
2. Scores s = x / t, divided with IEEE rounding exactly as torch does, so ties and order match.
3. Top-k: the k-th largest score t_k, searched over the order-preserving int32 keys of the
   scores as the largest key T with count(key >= T) >= k; ties with the k-th value are kept.
4. Top-p: Hugging Face sorts the survivors ascending and removes those whose cumulative
   probability is <= 1 - top_p (always keeping the top token). For distinct scores the removed
   set is {key < T}, T the largest key with mass(key < T) <= (1 - top_p) * Z, searched likewise.
   HF's sort is unstable, so when a tie group straddles the boundary HF keeps an arbitrary part
   of it: this kernel keeps the whole group (a superset of HF's set).
5. Min-p: remove p < min_p * p_max, i.e. exp(s - max) < min_p.
6. Draw by Gumbel-max over the kept set, argmax(s + g) with g = -log(-log(u)), u from Philox
   (tl.randint(seed, row * V + col)), so a draw depends only on the device seed: reproducible,
   no host sync, capturable in a CUDA graph.

Probabilities use fp32 exp, and sums run in a different order than torch's softmax + cumsum: a
token whose cumulative mass sits that close to 1 - top_p (fp32 sums over V terms drift by up to
~1e-4 relative at V ~ 10^5; the GPU tests allow that margin), or whose probability sits within an
ulp of min_p * p_max, may be kept here and removed by the reference, or the reverse.

Three paths, chosen by the launcher from what the host knows: the caller's bound on top_k, B, V
and the SM count (no device value is read, so every choice is capturable):

- The candidate path (2 launches, see its section) when every row's top_k is bounded below
  CAND_MAX_K by the caller (top_k_bound): sorting networks over each chunk's best entries, no
  search over the row. Not yet measured on a GPU.

Otherwise:

- One program per row (_sample_kernel, 1 launch) unless a row would split into at least
  _MIN_SPLIT_CHUNKS chunks (B below ~1/4 of the SM count on 1024-entry chunks), or when
  V <= 1024 or V > 2^24. Its searches test NUM_PIVOTS pivot keys per pass over the row until
  the answer is pinned down: a data-dependent number of passes inside one program.
- Split, for smaller batches: every pass runs over a (B, C) grid, program (b, c) on chunk c of
  row b (C <= MAX_CHUNKS, and as the launcher picks it <= V / 1024 rounded up; the tests'
  num_chunks hook may cut shorter chunks), so one row spreads over the GPU. The
  searches are radix selects, one key byte per launch: 8 launches of _split_search_kernel (4
  count for top-k, 4 sum top-p's masses), then _split_draw_kernel (each chunk's max of s + g and
  its first index) and _split_token_kernel over (B,) (the first chunk holding the row's max):
  10 launches, 9 for kept_mask, fixed by the shapes, so capturable. Bytes, not pivots: 4 fixed
  passes pin a 32-bit key exactly (16 pivots would need 8) and tl.histogram counts 256 bins
  cheaply. Each launch sums the previous one's per-chunk histograms in every program, in one
  fixed order: no grid-wide sync, no float atomics, the same tokens for the same seed run after
  run. Counts are exact (fp32 integers, V <= 2^24); masses are fp32 sums in another order than
  the one-program path's, so at a top-p rounding boundary (as against torch above) the paths
  may keep different sets; wherever the kept sets agree the tokens agree to the bit (same
  scores, noise and first-index tie break). A row holding +inf skips the top-p search and its
  top-k result is ignored: its kept set is its +inf entries whatever k, p and min-p.

Measured on an H200 (fp32 logits, V 50257, t 0.8, top-k 50, top-p 0.9, device time under CUDA-graph
replay, scripts/gpu-probe.py, 2026-11-28): B1 split (32 chunks) 182 us vs one program per row
492 us; B32 split (9 chunks) 586 us vs 717 us; B256 split (2 chunks) 3420 us vs 1062 us. Short
chunks pay; a few long ones do not (each of their passes is a long serial loop per program), so
the split path needs _MIN_SPLIT_CHUNKS chunks a row. Both paths are far from bandwidth-bound
(51 MB of logits at B256 read 10 times is ~0.12 ms at 4.1 TB/s): the searches are the hot spot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt._backends import SAMPLE_CANDIDATE_MAX_K, launch_pdl, sample_candidate_k, sm_count
from fastgpt.kernels.pdl import _wait_for_previous_grid

MAX_BLOCK_V = 1024  # vocabulary block per loop step on the split path
NUM_PIVOTS = 16  # keys tested per search pass: the interval shrinks ~17x per pass
NUM_WARPS = 8
# One program per row: each of its ~15 passes over the row is a serial loop whose steps wait on
# their loads (1024-entry blocks on 8 warps: 492 us at B1 on the H200, ~0.6 us a step). Larger
# blocks keep more loads in flight per step, in fewer steps, as far as the registers allow: by
# ptxas (sm_80 and sm_90), fp32 logits in 4096-entry blocks on 32 warps fit 64 registers (12
# bytes of spills on sm_80 at V 128k, none on sm_90): chosen from that, not yet measured
# (gpu-probe's sample_blocks sweeps it). 16-bit logits spill ~1.2 KB a thread there, and up to
# 124 bytes in 2048-entry blocks on 8 warps: they keep the measured 1024 on 8.
ROW_BLOCK_V = {4: 4096, 2: 1024}  # by the logits' element size
ROW_WARPS = {4: 32, 2: 8}
# The candidate path's tiles: picked by ptxas (no spills on sm_80/sm_90) and instruction counts,
# not yet timed (gpu-probe's sample_cand sweeps them).
CAND_MAX_K = SAMPLE_CANDIDATE_MAX_K  # top_k bounds below this take the candidate path (lists of 16..256)
CAND_BLOCK = 1024  # vocabulary entries per program of its first kernel (at least 4 x cand_k)
CAND_WARPS = 4  # (4 warps: ~3.3k instructions a thread for tl.topk of 64 out of 1024 int64)
MERGE_BLOCK = 2048  # candidates per step of its second kernel's merge
MERGE_WARPS = 8
# From this many rows the candidate path first bounds each row's k-th best score from below
# (by its groups' maxima), so that a chunk keeps the few entries at or above the bound by a
# prefix sum instead of sorting 1024 (tl.topk: ~410 instructions an entry on 4 warps, which
# makes the first kernel compute-bound at large B: ~160 us of issue at B256 on an H200, against
# ~13 us to read the logits). Two launches more (group maxima, per-row bounds), and the bounds
# are one 1024-entry tl.topk a row, a long dependent chain: estimated even with the sorts near
# B 24, hence 32. A prediction from instruction counts, not measured (gpu-probe's sample_batch
# times both).
CAND_BOUND_MIN_ROWS = 32
CAND_GROUP = 64  # entries per group maximum (a row of 50257 has 786 groups)
CAND_LIST = 512  # a row's entries at or above its bound, appended to one list when they fit
MAX_CHUNKS = 32  # most vocabulary chunks per row on the split path (each program sums 32 x 256 partials)
MAX_SPLIT_V = 1 << 24  # the split path's fp32 counts are exact up to here; longer rows take one program
MASS_BLOCK = 256  # the top-p masses' one-hot product stages 2 x 16 x MASS_BLOCK fp32 in shared memory
_MIN_CHUNK = 1024  # fewest vocabulary entries per chunk
_PROGRAMS_PER_SM = 2  # split rows until the grid covers the GPU about this many times
_MIN_SPLIT_CHUNKS = 8  # fewer chunks a row: one program per row (measured: 9 chunks win, 2 lose)
_INTERPRETER_SMS = 4  # a pretend SM count on CPU tensors

KEY_NEG_INF = tl.constexpr(-2139095041)  # _key(-inf): the smallest key of a non-NaN float
KEY_MIN = tl.constexpr(-2147483648)  # the smallest int32: 0 as an unsigned key + 2^31


@triton.jit
def _key(s):
    """Order-preserving int32 key of fp32 values; -0.0 and +0.0 share a key, as they compare equal."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V: tl.constexpr):
    """Scores of one block, fp32: clean(x) / t, and -inf past the end of the row.

    pinf_x: the row holds +inf logits (only they survive, as 0). pinf_s: no +inf logit, but some
    finite x / t overflowed to +inf (the same rule, applied to the scores).
    """
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(pinf_x, tl.where(x == float("inf"), 0.0, float("-inf")), x)
    s = tl.math.div_rn(x, t)
    s = tl.where(s != s, float("-inf"), s)  # -inf / inf
    s = tl.where(pinf_s, tl.where(s == float("inf"), 0.0, float("-inf")), s)
    return s, _key(s)


@triton.jit
def _row_max(row_ptr, begin, end, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """The maximum of the row's logits in [begin, min(end, V)) (NaN as -inf) and its first index
    (begin when all are -inf)."""
    best = float("-inf")
    best_i = begin
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=(cols < end) & (cols < V), other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0, tie_break_left=True) + start
        best_i = tl.where(m > best, i, best_i)  # strict: the earlier block wins ties
        best = tl.maximum(best, m)
    return best, best_i


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
def _topk_threshold(row_ptr, t, pinf_x, pinf_s, k, lo, hi,
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
            _, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
            cnt += tl.sum((key[:, None] >= piv32[None, :]).to(tl.int32), axis=0)
        cnt = cnt.to(tl.int64)
        lo, hi, c_lo, c_hi = _narrow(lo, hi, c_lo, c_hi, piv, cnt >= k, cnt)
    return lo


@triton.jit
def _survivor_mass(row_ptr, t, pinf_x, pinf_s, m, t_k, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Z = sum of exp(s - m) over the top-k survivors (key >= t_k)."""
    t_k = t_k.to(tl.int32)
    z = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
        z += tl.where(key >= t_k, tl.exp(s - m), 0.0)
    return tl.sum(z, axis=0)


@triton.jit
def _topp_threshold(row_ptr, t, pinf_x, pinf_s, m, t_k, budget, lo, hi,
                    V: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):  # fmt: skip
    """The largest key T in [lo, hi] with mass(key < T) <= budget, mass summing exp(s - m) over
    the top-k survivors (key >= t_k). Tokens with key < T are removed by top-p.

    lo = t_k on entry (nothing below it carries mass); hi = the top key, so the top token always
    stays. Stops once [lo, hi] holds a single key; lo == hi on entry returns lo.
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
            s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
            e = tl.where(key >= t_k, tl.exp(s - m), 0.0)
            above = key[:, None] >= piv32[None, :]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, 0.0, e[:, None]), axis=0)
        cnt = cnt.to(tl.int64)
        lo, hi, c_lo, c_hi = _narrow(lo, hi, c_lo, c_hi, piv, mass <= budget, cnt)
    return lo


@triton.jit
def _temperature(temperature_ptr, row):
    """Row's temperature t and whether it samples (t > 0; <= 0 or NaN is greedy). A greedy row's
    t becomes 1: its scores are its logits."""
    t = tl.load(temperature_ptr + row)
    sampling = t > 0.0
    return tl.where(sampling, t, 1.0), sampling


@triton.jit
def _min_p(min_p_ptr, row):
    """Row's min-p clamped to [0, 1]: NaN or <= 0 is off (0), > 1 acts as 1."""
    min_p = tl.load(min_p_ptr + row)
    return tl.where(min_p > 0.0, tl.minimum(min_p, 1.0), 0.0)


@triton.jit
def _kept(s, key, m, t_p, min_p):
    """The kept set of one block: finite, at or above the top-k/top-p key (t_p >= t_k), and
    passing min-p, p / p_max = exp(s - m) >= min_p (min_p already clamped to [0, 1])."""
    return (s > float("-inf")) & (key >= t_p) & (tl.exp(s - m) >= min_p)


@triton.jit
def _gumbel(seed, row, cols, V: tl.constexpr):
    """Gumbel noise -log(-log(u)) of entries (row, cols), every path's: u = (23 random bits + 0.5)
    / 2^23 lies strictly inside (0, 1), the bits from Philox at counter row * V + col."""
    bits = tl.randint(seed, row * V + cols)  # uint32
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_argmax(row_ptr, begin, end, seed, row, t, pinf_x, pinf_s, m, t_p, min_p,
                   V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """max and first argmax over the kept set in [begin, end) of s + g, g the Gumbel noise: over a
    whole row, a draw from softmax(s) restricted to the kept set. (-inf, begin) when nothing
    there is kept."""
    best = float("-inf")
    best_i = begin
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
        z = tl.where(_kept(s, key, m, t_p, min_p) & (cols < end), s + _gumbel(seed, row, cols, V), float("-inf"))
        zmax = tl.max(z, axis=0)
        i = tl.argmax(z, axis=0, tie_break_left=True) + start
        best_i = tl.where(zmax > best, i, best_i)
        best = tl.maximum(best, zmax)
    return best, best_i


@triton.jit
def _store_mask(mask_ptr, row_ptr, begin, end, row, t, pinf_x, pinf_s, m, t_p, min_p, sampling,
                drawable, imax, V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Write a row's kept set in [begin, end): the filter's survivors; the greedy token on a
    greedy row; nothing on a row with nothing to draw."""
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
        keep = tl.where(drawable, _kept(s, key, m, t_p, min_p), False)
        keep = tl.where(sampling, keep, cols == imax)
        tl.store(mask_ptr + row * V + cols, keep, mask=cols < end)


@triton.jit
def _top(xmax, t):
    """The top score m = max(x) / t (x / t is monotone in x) and _load_scores' +inf flags: pinf_x,
    the row holds +inf; pinf_s, some finite x / t overflowed. m is 0 on such rows (their
    survivors score 0)."""
    pinf_x = xmax == float("inf")
    m = tl.math.div_rn(tl.where(pinf_x, 0.0, xmax), t)
    pinf_s = m == float("inf")
    return tl.where(pinf_s, 0.0, m), pinf_x, pinf_s


# Per row b: x = clean(logits[b]). Greedy (t <= 0): token = first argmax of x. Otherwise
#   s = x / t;  keep s >= (k-th largest s);  keep key(s) >= T_p, HF's top-p on the survivors;
#   keep exp(s - max s) >= min_p;  token = argmax over the kept set of s - log(-log(u)).
@triton.jit
def _sample_row(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, out_ptr, row,
                stride_logits_b, V: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
                NUM_PIVOTS: tl.constexpr):  # fmt: skip
    """Row `row`'s token (or kept set), by searches over the whole row in one program."""
    row_ptr = logits_ptr + row * stride_logits_b
    t, sampling = _temperature(temperature_ptr, row)
    xmax, imax = _row_max(row_ptr, 0, V, V, BLOCK_V)
    m, pinf_x, pinf_s = _top(xmax, t)
    drawable = sampling & (m > float("-inf"))
    top = _key(m).to(tl.int64)
    lo = top * 0 + KEY_NEG_INF

    k = tl.load(top_k_ptr + row)
    topk_on = drawable & (k > 0) & (k < V)
    t_k = _topk_threshold(row_ptr, t, pinf_x, pinf_s, k, lo, tl.where(topk_on, top, lo),
                          V, BLOCK_V, NUM_PIVOTS)  # fmt: skip

    top_p = tl.load(top_p_ptr + row)
    topp_on = drawable & (top_p < 1.0)
    budget = t * 0.0
    if topp_on:
        z = _survivor_mass(row_ptr, t, pinf_x, pinf_s, m, t_k, V, BLOCK_V)
        budget = (1.0 - top_p).to(tl.float32) * z  # HF: 1 - top_p in fp64, rounded to fp32
    t_p = _topp_threshold(row_ptr, t, pinf_x, pinf_s, m, t_k, budget, t_k,
                          tl.where(topp_on, top, t_k), V, BLOCK_V, NUM_PIVOTS)  # fmt: skip
    t_p = t_p.to(tl.int32)  # t_p >= t_k: one key threshold for both filters

    min_p = _min_p(min_p_ptr, row)
    if WRITE_MASK:
        _store_mask(out_ptr, row_ptr, 0, V, row, t, pinf_x, pinf_s, m, t_p, min_p, sampling, drawable,
                    imax, V, BLOCK_V)  # fmt: skip
    else:
        token = tl.where(sampling, 0, imax)  # a row with nothing to draw returns 0
        if drawable:
            seed = tl.load(seed_ptr)
            token = _gumbel_argmax(row_ptr, 0, V, seed, row, t, pinf_x, pinf_s, m, t_p, min_p,
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


# ----------------------------------------------------------------------------- the split path
# Keys are searched one byte (8 bits) at a time, most significant first, as unsigned numbers
# (key + 2^31): a prefix is the least key with the bytes found so far, KEY_MIN before any.


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
        _, key = _load_scores(row_ptr, cols, t, False, False, V)
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
        s, key = _load_scores(row_ptr, cols, t, False, False, V)
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
        m, pinf_x, pinf_s = _top(xmax, t)
        top_p = tl.load(top_p_ptr + row)
        on = sampling & (m > float("-inf")) & ~pinf_x & ~pinf_s & (top_p < 1.0)
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
    m, pinf_x, pinf_s = _top(xmax, t)
    drawable = sampling & (m > float("-inf"))
    top_p = tl.load(top_p_ptr + row)
    prefix, t_p, below, budget = _load_state(state_ptr, row, 7)
    t_p = t_p.to(tl.int64)  # t_k
    if drawable & ~pinf_x & ~pinf_s & (top_p < 1.0):
        mass = _sum_chunks(hist_in_ptr, row, num_chunks, MAX_CHUNKS)
        t_p, below = _mass_select(mass, budget, prefix, below, 3)
        t_p = tl.minimum(t_p, _key(m).to(tl.int64))  # the top token always stays
    t_p = tl.where(pinf_x | pinf_s, 0, t_p).to(tl.int32)
    min_p = _min_p(min_p_ptr, row)
    if WRITE_MASK:
        _store_mask(out_ptr, row_ptr, begin, end, row, t, pinf_x, pinf_s, m, t_p, min_p, sampling,
                    drawable, imax, V, BLOCK_V)  # fmt: skip
    elif drawable:
        best, best_i = _gumbel_argmax(row_ptr, begin, end, tl.load(seed_ptr), row, t, pinf_x, pinf_s,
                                      m, t_p, min_p, V, BLOCK_V)  # fmt: skip
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


# ----------------------------------------------------------------------------- the candidate path
# Where the caller can bound every row's top_k below CAND_MAX_K (a bound the host knows: a Python
# number, a list, a CPU tensor), a row's kept set lies among its cand_k best scores, cand_k a
# power of two above the bound, and those are found by sorting networks, not searches:
#   1. _candidates_kernel over (B, C): program (b, c) keeps the cand_k best entries of its
#      block-wide chunk, tl.topk over packed int64 entries (key(s) << 32 | V - 1 - col), which
#      are distinct and rank ties by the lower column first, as the other paths break them.
#   2. _candidate_draw_kernel over (B,): the row's cand_k best of its C * cand_k candidates, in
#      order (the chunks' bests hold the row's best: entries are distinct). t_k is the k-th key,
#      the survivors a prefix of the list; Z, top-p's tail masses (a reversed cumsum, summed from
#      the smallest as HF's ascending cumsum is), min-p and the Gumbel draw (the same Philox
#      counters, so the same tokens as the other paths) run on the list alone.
# The list is complete when top-k's tie group ends inside it (its last key is below t_k). Rows it
# does not cover (top_k off or >= cand_k, a score reaching +inf, a tie group running past the
# list) run _sample_row in the same program: right, and slow. 2 launches, fixed by the shapes.
# From CAND_BOUND_MIN_ROWS rows, two launches first bound each row's k-th best key from below:
#   0a. _group_max_kernel over (B, C): the maximum key of each CAND_GROUP entries.
#   0b. _key_bound_kernel over (B,): the k-th largest of the row's group maxima (k = its top_k;
#       KEY_MIN where the list will not cover the row anyway). The k groups above it hold k
#       distinct entries at or above it, so the row's best k all are: nothing below it is needed.
#   Then in 1. a chunk with at most cand_k entries at or above the bound stores them, in column
#   order, by a prefix sum (the draw kernel's merge ranks them), and one with more sorts as above;
#   the few entries also go to one list per row (CAND_LIST long, appended at an atomic count that
#   0b zeroed), which 2. sorts once instead of merging C chunk lists, unless a chunk sorted or the
#   list overflowed (the count then exceeds it).
# Every tie of the k-th key is at or above the bound (the bound is a key, not an entry), so the
# list's coverage test stays exact.
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
    """Program (row, c) of a (B, C) grid over BLOCK-wide chunks: row, c, the chunk's columns and
    the keys of their scores (a greedy row's t is 1: its scores are its logits; -inf past V)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    t = _temperature(temperature_ptr, row)[0]
    return row, c, cols, _load_scores(logits_ptr + row * stride_logits_b, cols, t, False, False, V)[1]


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
    row, c, cols, key = _chunk_keys(logits_ptr, temperature_ptr, stride_logits_b, V, BLOCK)
    GROUPS: tl.constexpr = BLOCK // GROUP
    gmax = tl.max(tl.reshape(key, [GROUPS, GROUP]), axis=1)
    tl.store(gmax_ptr + (row * tl.num_programs(1) + c) * GROUPS + tl.arange(0, GROUPS), gmax)


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
    row, c, cols, key = _chunk_keys(logits_ptr, temperature_ptr, stride_logits_b, V, BLOCK)
    packed = _pack(key, cols, V)
    out = cand_ptr + (row * tl.num_programs(1) + c) * CAND_K
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
                z = tl.where(kept, s + _gumbel(tl.load(seed_ptr), row, col, V), float("-inf"))
                zmax = tl.max(z, axis=0)
                token = tl.min(tl.where(kept & (z == zmax), col, V), axis=0)
            tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))


# ----------------------------------------------------------------------------- launchers


def split_chunks(B: int, V: int, num_sms: int, min_chunks: int = _MIN_SPLIT_CHUNKS) -> int:
    """Vocabulary chunks per row on the split path: enough that B * chunks programs cover the
    GPU ~_PROGRAMS_PER_SM times, none shorter than _MIN_CHUNK, at most MAX_CHUNKS; 1 means one
    program per row, also when fewer than min_chunks would do. From shapes and the SM count only
    (no host sync: capturable)."""
    if V > MAX_SPLIT_V:
        return 1
    chunks = min(triton.cdiv(_PROGRAMS_PER_SM * num_sms, B), triton.cdiv(V, _MIN_CHUNK), MAX_CHUNKS)
    return chunks if chunks >= min_chunks else 1


def _warps(block: int, most: int = NUM_WARPS) -> int:
    return max(1, min(most, block // 128))


def _launch_split(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, num_chunks):
    """The split path: 8 search launches and 1 draw over a (B, C) grid, then the token kernel
    over (B,) (none for the kept set): a fixed sequence, decided by shapes only."""
    B, V = logits.shape
    chunk = triton.cdiv(triton.cdiv(V, min(num_chunks, MAX_CHUNKS)), 16) * 16  # 16-aligned chunks
    C = triton.cdiv(V, chunk)

    def scratch(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=logits.device)

    part_max, part_idx = scratch(B, C), scratch(B, C, dtype=torch.int32)
    hist = [scratch(B, C, 256), scratch(B, C, 256)]  # stage j writes hist[j % 2], reads the other
    state = scratch(B, 8, 4, dtype=torch.float64)
    draws = (1,) if write_mask else (B, C)  # unused by the kept-set variant
    part_z, part_zi = scratch(*draws), scratch(*draws, dtype=torch.int32)
    block = min(MAX_BLOCK_V, triton.next_power_of_2(chunk))
    warps = max(4, _warps(block))  # 4 warps at least for the (MAX_CHUNKS, 256) sums
    pdl = launch_pdl(logits.device)
    for stage in range(8):  # counts by blocks of `block`, masses by blocks of MASS_BLOCK
        counts = stage < 4
        _split_search_kernel[(B, C)](
            logits, temperature, top_k, top_p, part_max, part_idx, hist[1 - stage % 2], hist[stage % 2],
            state, logits.stride(0), chunk, C, V=V, STAGE=stage, BLOCK_V=block if counts else min(MASS_BLOCK, block),
            MAX_CHUNKS=MAX_CHUNKS, PDL=pdl, num_warps=warps if counts else 4, launch_pdl=pdl)  # fmt: skip
    _split_draw_kernel[(B, C)](
        logits, temperature, top_p, min_p, seed, part_max, part_idx, hist[1], state, out, part_z, part_zi,
        logits.stride(0), chunk, C, V=V, WRITE_MASK=write_mask, BLOCK_V=block, MAX_CHUNKS=MAX_CHUNKS, PDL=pdl,
        num_warps=warps, launch_pdl=pdl)  # fmt: skip
    if not write_mask:
        _split_token_kernel[(B,)](temperature, part_max, part_idx, part_z, part_zi, out, C, V=V,
                                  MAX_CHUNKS=MAX_CHUNKS, PDL=pdl, num_warps=1, launch_pdl=pdl)  # fmt: skip
    return out


def _candidate_block(V: int, cand_k: int) -> int:
    """Vocabulary entries per chunk on the candidate path."""
    return max(4 * cand_k, CAND_GROUP, min(CAND_BLOCK, triton.next_power_of_2(V)))


def key_bounds(logits, temperature, top_k, cand_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32: per row the k-th largest of its CAND_GROUP-entry groups' maximum keys, k its
    top_k, or KEY_MIN where top_k is off, >= cand_k or above the number of groups (2 launches);
    and (B,) int32 zeros, the counts of the rows' lists."""
    B, V = logits.shape
    block = _candidate_block(V, cand_k)
    C = triton.cdiv(V, block)
    groups = C * (block // CAND_GROUP)
    gmax = torch.empty((B, groups), dtype=torch.int32, device=logits.device)
    bound, count = torch.empty((2, B), dtype=torch.int32, device=logits.device)
    pdl = launch_pdl(logits.device)
    _group_max_kernel[(B, C)](logits, temperature, gmax, logits.stride(0), V=V, BLOCK=block, GROUP=CAND_GROUP, PDL=pdl,
                              num_warps=_warps(block, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    block_g = max(cand_k, min(MERGE_BLOCK, triton.next_power_of_2(groups)))
    _key_bound_kernel[(B,)](gmax, top_k, bound, count, groups, CAND_K=cand_k, BLOCK_G=block_g, PDL=pdl,
                            num_warps=_warps(block_g, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    return bound, count


def _launch_candidates(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, cand_k: int):
    """The candidate path: each chunk's best cand_k entries, then per row the draw from their
    best: 2 launches; from CAND_BOUND_MIN_ROWS rows, each row's bound first: 4."""
    B, V = logits.shape
    block = _candidate_block(V, cand_k)
    C = triton.cdiv(V, block)
    cands = torch.empty((B, C, cand_k), dtype=torch.int64, device=logits.device)
    bounded = B >= CAND_BOUND_MIN_ROWS
    list_len = max(cand_k, min(CAND_LIST, triton.next_power_of_2(C * cand_k)))  # no longer than the chunks' lists
    bound = count = row_list = cands  # unread unless bounded
    pdl = launch_pdl(logits.device)
    if bounded:
        bound, count = key_bounds(logits, temperature, top_k, cand_k)
        row_list = torch.empty((B, list_len), dtype=torch.int64, device=logits.device)
    _candidates_kernel[(B, C)](
        logits, temperature, bound, cands, count, row_list, logits.stride(0), V=V, CAND_K=cand_k, BLOCK=block,
        BOUNDED=bounded, LIST=list_len, PDL=pdl, num_warps=_warps(block, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    if write_mask:
        out.zero_()  # the draw kernel marks the kept entries (or, on uncovered rows, writes all)
    merge = max(cand_k, min(MERGE_BLOCK, triton.next_power_of_2(C * cand_k)))
    row_block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _candidate_draw_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, seed, cands, count, row_list, out, logits.stride(0), C * cand_k, V=V,
        WRITE_MASK=write_mask, CAND_K=cand_k, MERGE_BLOCK=merge, BOUNDED=bounded, LIST=list_len, BLOCK_V=row_block,
        NUM_PIVOTS=NUM_PIVOTS, PDL=pdl, num_warps=MERGE_WARPS, launch_pdl=pdl)  # fmt: skip
    return out


def _launch(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, num_chunks, top_k_bound):
    B, V = logits.shape
    cand_k = sample_candidate_k(top_k_bound)
    if num_chunks is None and cand_k:
        return _launch_candidates(logits, temperature, top_k, top_p, min_p, seed, out, write_mask, cand_k)
    if num_chunks is None:
        sms = sm_count(logits.device.index) if logits.is_cuda else _INTERPRETER_SMS
        num_chunks = split_chunks(B, V, sms)
        num_chunks = 0 if num_chunks == 1 else num_chunks
    if num_chunks > 0 and V <= MAX_SPLIT_V:
        return _launch_split(logits, temperature, top_k, top_p, min_p, seed, out, write_mask, num_chunks)
    size = logits.element_size()
    block_v = min(ROW_BLOCK_V[size], triton.next_power_of_2(V))
    pdl = launch_pdl(logits.device)
    _sample_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, seed, out, logits.stride(0), V=V,
        WRITE_MASK=write_mask, BLOCK_V=block_v, NUM_PIVOTS=NUM_PIVOTS, PDL=pdl,
        num_warps=_warps(block_v, ROW_WARPS[size]), launch_pdl=pdl,
    )  # fmt: skip
    return out


def sample(logits, temperature, top_k, top_p, min_p, seed, *, top_k_bound=0, num_chunks=None) -> torch.Tensor:
    """Draw one token per row: greedy where temperature <= 0, else from softmax of the kept set.

    logits: (B, V) fp32/bf16/fp16 with logits.stride(1) == 1. temperature: (B,) fp32. top_k:
    (B,) int64 (0 = off). top_p: (B,) fp64 (1.0 = off). min_p: (B,) fp32 (0 = off). seed: (1,)
    int64, on the device. Returns int64 (B,) token ids, always in [0, V).

    top_k_bound: what the caller knows of top_k without reading the device: every row's top_k is
    in [1, top_k_bound] (0: unknown). A bound below CAND_MAX_K takes the candidate path; rows
    that break it are still drawn right, by a slow path inside it. num_chunks (tests): 0 forces
    one program per row, n >= 1 the split path with n chunks (capped); None decides from the
    bound, the shapes and the SM count.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, False, num_chunks, top_k_bound)


def kept_mask(logits, temperature, top_k, top_p, min_p, *, top_k_bound=0, num_chunks=None) -> torch.Tensor:
    """The set `sample` draws from, for tests: bool (B, V), True where a token may be drawn.

    Same inputs as `sample` (no seed). Equals reference.filter_logits(clean_logits(logits), ...)
    != -inf, up to the documented top-p tie and rounding cases; a greedy row marks its argmax.
    """
    out = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
    seed = torch.zeros(1, dtype=torch.int64, device=logits.device)  # unread
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, True, num_chunks, top_k_bound)
