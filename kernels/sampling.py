"""Sort-free fused sampling in Triton: temperature, top-k, top-p, min-p, greedy, one program per row.

Per row, over the vocabulary in blocks of BLOCK_V (the row is re-read from L2 on every pass):

1. Clean the logits (fastgpt.reference.clean_logits: NaN is -inf; a row holding +inf keeps only
   its +inf entries, as equal logits). Greedy rows (temperature <= 0, or NaN) return the first
   index of the maximum and stop here.
2. Scores s = x / t, divided with IEEE rounding exactly as torch does, so ties and order match.
3. Top-k: the k-th largest score, found by searching the order-preserving integer keys of the
   scores. Each pass counts count(key >= pivot) at NUM_PIVOTS pivots inside the current interval
   [lo, hi] and keeps the sub-interval that holds the answer; ties with the k-th value are kept.
4. Top-p: Hugging Face sorts the survivors ascending and removes those whose cumulative
   probability is <= 1 - top_p (always keeping the top token). For distinct scores the removed
   set is {key < T}, T the largest key with mass(key < T) <= (1 - top_p) * Z; the same pivot
   search finds T. HF's sort is unstable, so when a tie group straddles the boundary HF keeps an
   arbitrary part of it: this kernel keeps the whole group (a superset of HF's set).
5. Min-p: remove p < min_p * p_max, i.e. exp(s - max) < min_p.
6. Draw by Gumbel-max over the kept set, argmax(s + g) with g = -log(-log(u)), u from Philox
   (tl.randint(seed, row * V + col)), so a draw depends only on the device seed: reproducible,
   no host sync, capturable in a CUDA graph.

Probabilities use fp32 exp, and sums run in a different order than torch's softmax + cumsum: a
token whose cumulative mass sits within a few ulps of 1 - top_p (or whose probability sits within
an ulp of min_p * p_max) may be kept here and removed by the reference, or the reverse.

One program per row leaves most of the GPU idle when the batch is small, and each pass over the
row is then latency-bound on one SM. So when B < 2 x the SM count, step 1's max (all that a
greedy row needs) runs first as a split pass, one program per (row, vocabulary chunk of >= 2048),
and the row's program reduces the chunks' maxima: the same result, to the bit, for any number of
chunks. The threshold searches and the draw stay one program per row: at B = 1 with top-k/top-p
on a 50k-260k vocabulary they remain many latency-bound passes (not measured: no GPU here;
splitting them needs a grid-wide step between passes).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from fastgpt._backends import sm_count

MAX_BLOCK_V = 1024  # vocabulary block per loop step
NUM_PIVOTS = 16  # keys tested per search pass: the interval shrinks ~17x per pass
NUM_WARPS = 8
MAX_CHUNKS = 256  # most vocabulary chunks of the split max pass
_MIN_CHUNK = 2048  # fewest vocabulary entries per chunk
_PROGRAMS_PER_SM = 2  # split the max pass until the grid covers the GPU about this many times
_INTERPRETER_SMS = 4  # a pretend SM count on CPU tensors

KEY_NEG_INF = tl.constexpr(-2139095041)  # _key(-inf): the smallest key of a non-NaN float


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


# Per program: one row b and one chunk c of its vocabulary, [c * chunk, (c + 1) * chunk):
#   part_max[b, c] = max of the cleaned logits there,  part_idx[b, c] = the first index of it.
@triton.jit
def _max_partial_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    part_max_ptr,  # (B, num_chunks) fp32
    part_idx_ptr,  # (B, num_chunks) int32
    stride_logits_b,
    chunk,  # vocabulary entries per chunk
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    begin = c * chunk
    best, best_i = _row_max(logits_ptr + row * stride_logits_b, begin, begin + chunk, V, BLOCK_V)
    part = row * tl.num_programs(1) + c
    tl.store(part_max_ptr + part, best)
    tl.store(part_idx_ptr + part, best_i)


@triton.jit
def _reduce_max(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS: tl.constexpr):
    """A row's maximum and its first index from the per-chunk ones: the first chunk holding it."""
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
def _kept(s, key, m, t_p, min_p):
    """The kept set of one block: finite, at or above the top-k/top-p key (t_p >= t_k), and
    passing min-p, p / p_max = exp(s - m) >= min_p (min_p already clamped to [0, 1])."""
    return (s > float("-inf")) & (key >= t_p) & (tl.exp(s - m) >= min_p)


@triton.jit
def _gumbel_argmax(row_ptr, seed, row, t, pinf_x, pinf_s, m, t_p, min_p,
                   V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """argmax over the kept set of s + g, g = -log(-log(u)) Gumbel noise: a draw from softmax(s)
    restricted to the kept set. u = (23 random bits + 0.5) / 2^23 lies strictly inside (0, 1)."""
    best = float("-inf")
    best_i = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
        bits = tl.randint(seed, row * V + cols)  # uint32, Philox counter = (row, col)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        z = tl.where(_kept(s, key, m, t_p, min_p), s - tl.log(-tl.log(u)), float("-inf"))
        zmax = tl.max(z, axis=0)
        i = tl.argmax(z, axis=0, tie_break_left=True) + start
        best_i = tl.where(zmax > best, i, best_i)
        best = tl.maximum(best, zmax)
    return best_i


@triton.jit
def _store_mask(mask_ptr, row_ptr, row, t, pinf_x, pinf_s, m, t_p, min_p, sampling, drawable, imax,
                V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Write a row's kept set: the filter's survivors; the greedy token on a greedy row; nothing
    on a row with nothing to draw."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, pinf_x, pinf_s, V)
        keep = tl.where(drawable, _kept(s, key, m, t_p, min_p), False)
        keep = tl.where(sampling, keep, cols == imax)
        tl.store(mask_ptr + row * V + cols, keep, mask=cols < V)


# Per row b: x = clean(logits[b]). Greedy (t <= 0): token = first argmax of x. Otherwise
#   s = x / t;  keep s >= (k-th largest s);  keep key(s) >= T_p, HF's top-p on the survivors;
#   keep exp(s - max s) >= min_p;  token = argmax over the kept set of s - log(-log(u)).
@triton.jit
def _sample_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits_b, unit column stride
    temperature_ptr,  # (B,) fp32; <= 0 (or NaN) means greedy
    top_k_ptr,  # (B,) int64; <= 0 or >= V means off
    top_p_ptr,  # (B,) fp64; >= 1 (or NaN) means off, <= 0 keeps only the top token(s)
    min_p_ptr,  # (B,) fp32; <= 0 (or NaN) means off
    seed_ptr,  # (1,) int64
    out_ptr,  # (B,) int64 token ids, or (B, V) bool kept set when WRITE_MASK
    part_max_ptr,  # (B, num_chunks) fp32 from _max_partial_kernel; read only when SPLIT_MAX
    part_idx_ptr,  # (B, num_chunks) int32 from _max_partial_kernel; read only when SPLIT_MAX
    stride_logits_b,
    num_chunks,
    V: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    SPLIT_MAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_b
    t = tl.load(temperature_ptr + row)
    if SPLIT_MAX:
        xmax, imax = _reduce_max(part_max_ptr, part_idx_ptr, row, num_chunks, MAX_CHUNKS)
    else:
        xmax, imax = _row_max(row_ptr, 0, V, V, BLOCK_V)
    sampling = t > 0.0
    t = tl.where(sampling, t, 1.0)
    pinf_x = xmax == float("inf")
    m = tl.math.div_rn(tl.where(pinf_x, 0.0, xmax), t)  # the top score: x / t is monotone in x
    pinf_s = m == float("inf")
    m = tl.where(pinf_s, 0.0, m)
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

    min_p = tl.load(min_p_ptr + row)
    min_p = tl.where(min_p > 0.0, tl.minimum(min_p, 1.0), 0.0)  # NaN is off, > 1 acts as 1
    if WRITE_MASK:
        _store_mask(out_ptr, row_ptr, row, t, pinf_x, pinf_s, m, t_p, min_p, sampling, drawable,
                    imax, V, BLOCK_V)  # fmt: skip
    else:
        token = tl.where(sampling, 0, imax)  # a row with nothing to draw returns 0
        if drawable:
            seed = tl.load(seed_ptr)
            token = _gumbel_argmax(row_ptr, seed, row, t, pinf_x, pinf_s, m, t_p, min_p,
                                   V, BLOCK_V)  # fmt: skip
        tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))


def max_chunks(B: int, V: int, num_sms: int) -> int:
    """How many vocabulary chunks the max pass takes: enough that B * chunks programs cover the
    GPU ~_PROGRAMS_PER_SM times, none shorter than _MIN_CHUNK; 1 means no split pass. From
    shapes and the SM count only (no host sync: capturable)."""
    return max(1, min(triton.cdiv(_PROGRAMS_PER_SM * num_sms, B), triton.cdiv(V, _MIN_CHUNK), MAX_CHUNKS))


def _launch(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, num_chunks):
    B, V = logits.shape
    if num_chunks is None:
        num_chunks = max_chunks(B, V, sm_count(logits.device.index) if logits.is_cuda else _INTERPRETER_SMS)
    chunk = triton.cdiv(triton.cdiv(V, min(num_chunks, MAX_CHUNKS)), 16) * 16  # 16-aligned chunks
    num_chunks = triton.cdiv(V, chunk)
    part_max = part_idx = logits  # unread without a split pass
    if num_chunks > 1:
        part_max = torch.empty((B, num_chunks), dtype=torch.float32, device=logits.device)
        part_idx = torch.empty((B, num_chunks), dtype=torch.int32, device=logits.device)
        block_c = min(MAX_BLOCK_V, triton.next_power_of_2(chunk))
        _max_partial_kernel[(B, num_chunks)](
            logits, part_max, part_idx, logits.stride(0), chunk, V=V, BLOCK_V=block_c,
            num_warps=max(1, min(NUM_WARPS, block_c // 128)),
        )  # fmt: skip
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _sample_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, seed, out, part_max, part_idx, logits.stride(0),
        num_chunks, V=V, WRITE_MASK=write_mask, SPLIT_MAX=num_chunks > 1, BLOCK_V=block_v,
        NUM_PIVOTS=NUM_PIVOTS, MAX_CHUNKS=MAX_CHUNKS, num_warps=max(1, min(NUM_WARPS, block_v // 128)),
    )  # fmt: skip
    return out


def sample(logits, temperature, top_k, top_p, min_p, seed, *, num_chunks=None) -> torch.Tensor:
    """Draw one token per row: greedy where temperature <= 0, else from softmax of the kept set.

    logits: (B, V) fp32/bf16/fp16 with logits.stride(1) == 1. temperature: (B,) fp32. top_k:
    (B,) int64 (0 = off). top_p: (B,) fp64 (1.0 = off). min_p: (B,) fp32 (0 = off). seed: (1,)
    int64, on the device. Returns int64 (B,) token ids, always in [0, V). num_chunks (tests):
    force the max pass's vocabulary split (1 = none); the tokens do not depend on it.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, False, num_chunks)


def kept_mask(logits, temperature, top_k, top_p, min_p, *, num_chunks=None) -> torch.Tensor:
    """The set `sample` draws from, for tests: bool (B, V), True where a token may be drawn.

    Same inputs as `sample` (no seed). Equals reference.filter_logits(clean_logits(logits), ...)
    != -inf, up to the documented top-p tie and rounding cases; a greedy row marks its argmax.
    """
    out = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
    seed = torch.zeros(1, dtype=torch.int64, device=logits.device)  # unread
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, True, num_chunks)
