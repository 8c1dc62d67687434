"""What every sampling path shares: the scores and their order-preserving keys, the rows'
parameters, the kept set and the Gumbel noise, so that all paths draw the same token from the
same kept set and seed. The math is in the package's docstring (kernels/sampling/__init__.py)."""

from __future__ import annotations

import triton
import triton.language as tl

KEY_NEG_INF = tl.constexpr(-2139095041)  # _key(-inf): the smallest key of a non-NaN float
KEY_MIN = tl.constexpr(-2147483648)  # the smallest int32: 0 as an unsigned key + 2^31


@triton.jit
def _key(s):
    """Order-preserving int32 key of fp32 values; -0.0 and +0.0 share a key, as they compare equal."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _score_of(key):
    """The fp32 value of an order-preserving key (_key's inverse)."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _tie_weight(t_p, m, budget, below, group):
    """log of the share of the tie group at the top-p threshold key t_p that Hugging Face keeps.

    HF removes the ascending sort's prefix whose cumulative mass is <= budget: of the G tokens of
    mass e tied at t_p (group = G e, below = the survivors' mass under t_p) the first r, r =
    floor((budget - below) / e), at most G - 1 (the top token always stays), as far as its sort's
    order of the ties goes. The kernels keep the group whole, each member weighted (G - r) / G =
    max(group - r e, e) / group, the mass HF keeps of it: 0 (weight 1) where no group is split."""
    e = tl.exp(_score_of(t_p) - m)
    split = (e > 0.0) & (group > 0.0)  # else no token at t_p (t_p below the row, e underflowing)
    r = tl.floor(tl.maximum(budget - below, 0.0) / tl.where(split, e, 1.0))
    w = tl.maximum(group - r * e, e) / tl.where(split, group, 1.0)
    return tl.log(tl.where(split & (w < 1.0), w, 1.0))


@triton.jit
def _load_scores(row_ptr, cols, t, ties_only, xmax, V: tl.constexpr):
    """Scores of one block, fp32: clean(x) / t, and -inf past the end of the row.

    ties_only (from _top): the row's top score is +inf, because the row holds +inf logits or its
    largest x / t overflows. Softmax's limit then keeps just the entries equal to the row's
    largest logit xmax, as equal scores (0); the rest get -inf. With an overflow that is exact,
    not a convention: an x < xmax is at least one ulp, xmax * 2^-25, below it, so (xmax - x) / t
    >= 2^-25 * 3.4e38 and its probability exp(-(xmax - x) / t) is 0.
    """
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    s = tl.math.div_rn(x, t)
    s = tl.where(s != s, float("-inf"), s)  # -inf / inf
    s = tl.where(ties_only, tl.where(x == xmax, 0.0, float("-inf")), s)
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
    """Gumbel noise of entries (row, cols), every path's: _gumbel_of_bits of the first word of
    Philox at counter row * V + col."""
    return _gumbel_of_bits(tl.randint(seed, row * V + cols))


@triton.jit
def _gumbel_of_bits(bits):
    """Gumbel noise -log(E), E = -log(u), from 32 random bits (uint32): reference.gumbel_of_bits,
    whose docstring has the why. The low 31 bits give x = (m + 1/2) / 2^32 in (0, 1/2]; the top
    bit picks u = x (E = -log(x)) or u = 1 - x, where E = -log1p(-x) is x * log(w) / (w - 1) for
    w = 1 - x rounded (exact to a few ulps, and x itself where w rounds to 1)."""
    x = (bits & 0x7FFFFFFF).to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # 2^-32, 2^-33
    low = bits < 0x80000000  # u = 1 - x
    w = tl.where(low, 1.0 - x, x)
    log_w = tl.log(w)
    ratio = log_w / tl.where(w == 1.0, -1.0, w - 1.0)
    e = tl.where(low, tl.where(w == 1.0, x, x * ratio), -log_w)
    return -tl.log(e)


@triton.jit
def _gumbel_argmax(row_ptr, begin, end, seed, row, t, ties_only, xmax, m, t_p, tie_weight, min_p,
                   V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """max and first argmax over the kept set in [begin, end) of s + g, g the Gumbel noise, the
    scores at key t_p raised by tie_weight (_tie_weight) first: over a whole row, a draw from
    softmax of those scores restricted to the kept set. (-inf, begin) when nothing there is kept."""
    best = float("-inf")
    best_i = begin
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
        kept = _kept(s, key, m, t_p, min_p) & (cols < end)
        z = tl.where(kept, tl.where(key == t_p, s + tie_weight, s) + _gumbel(seed, row, cols, V), float("-inf"))
        zmax = tl.max(z, axis=0)
        i = tl.argmax(z, axis=0, tie_break_left=True) + start
        best_i = tl.where(zmax > best, i, best_i)
        best = tl.maximum(best, zmax)
    return best, best_i


@triton.jit
def _store_mask(mask_ptr, row_ptr, begin, end, row, t, ties_only, xmax, m, t_p, min_p, sampling,
                drawable, imax, V: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Write a row's kept set in [begin, end): the filter's survivors; the greedy token on a
    greedy row; nothing on a row with nothing to draw."""
    for start in range(begin, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s, key = _load_scores(row_ptr, cols, t, ties_only, xmax, V)
        keep = tl.where(drawable, _kept(s, key, m, t_p, min_p), False)
        keep = tl.where(sampling, keep, cols == imax)
        tl.store(mask_ptr + row * V + cols, keep, mask=cols < end)


@triton.jit
def _top(xmax, t):
    """The top score m = xmax / t (x / t is monotone in x), xmax the row's largest clean logit,
    and whether it is +inf (ties_only: see _load_scores; m is then 0, the score of the entries
    that stay)."""
    m = tl.math.div_rn(xmax, t)
    ties_only = (xmax == float("inf")) | (m == float("inf"))
    return tl.where(ties_only, 0.0, m), ties_only
