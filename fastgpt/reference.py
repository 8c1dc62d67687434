"""Plain-PyTorch implementation of every op: the oracle the kernels are tested against, and the
CPU path.

Each function computes in fp32 (or fp64 when given fp64) and returns the input's dtype. Inputs
are assumed valid: `fastgpt.ops` checks them first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- attention


def masked_attention(q, k, v, visible, scale, *, return_lse: bool = False):
    """softmax(q k^T * scale, keys where `visible`) v, with q's heads grouped over k/v's heads.

    q (B, Hq, Sq, D); k/v (B, Hkv, Sk, D); visible bool, broadcastable to (B, 1, 1, Sq, Sk).
    GQA by broadcasting q as (B, Hkv, group, Sq, D) against k/v as (B, Hkv, 1, Sk, D): no copies
    of k/v. A query with no visible key gets zeros. With return_lse, (out, lse): lse (B, Hq, Sq)
    fp32, ln sum_j exp(q k_j^T * scale) over the visible keys, -inf where there is none.
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute).view(B, Hkv, Hq // Hkv, Sq, D)
    kf, vf = k.to(compute)[:, :, None], v.to(compute)[:, :, None]  # (B, Hkv, 1, Sk, D)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hkv, group, Sq, Sk)
    scores = scores.masked_fill(~visible, float("-inf"))
    # No visible key, or only scores of -inf (past the float range): 0, not the softmax's NaN, as in
    # FlashAttention and every kernel here. Only there: a NaN or +inf score stays NaN, as in SDPA.
    blind = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(blind, 0.0)
    out = (probs @ vf).masked_fill(blind, 0.0).view(B, Hq, Sq, D).to(q.dtype)  # 0, even past a 0 * NaN in v
    if not return_lse:
        return out
    # Where the softmax is NaN (a NaN score, or +inf ones) the lse is NaN too, as the kernels' m + log l.
    lse = torch.logsumexp(scores, dim=-1).masked_fill(probs.isnan().any(dim=-1), float("nan"))
    return out, lse.view(B, Hq, Sq).float()


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * scale [+ causal mask]) v, with GQA and bottom-right causal alignment.

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq % Hkv == 0. Query i sees keys j <= i + Sk - Sq when
    causal; a query that sees no key (Sq > Sk) gets a zero output, as in FlashAttention.
    Returns (B, Hq, Sq, D) in q's dtype; with return_lse, (out, lse) as masked_attention.
    """
    Sq, D = q.shape[2], q.shape[3]
    Sk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    visible = j <= i + (Sk - Sq) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    return masked_attention(q, k, v, visible, scale, return_lse=return_lse)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float | None = None, return_lse: bool = False):
    """Sq new query tokens per row over a KV cache, causal: with len_b = clamp(cache_seqlens[b], 0, Smax),
    query i of row b stands at position len_b - Sq + i and sees cache positions [0, len_b - Sq + i].

    q (B, Hq, Sq, D); k_cache/v_cache (B, Hkv, Smax, D); cache_seqlens int (B,). A query that sees
    no position (a row of length 0, or len_b < Sq - i) gets a zero output. Returns (B, Hq, Sq, D);
    with return_lse, (out, lse) as masked_attention (lse (B, Hq, Sq), -inf where nothing is seen).
    """
    B, Sq, D = q.shape[0], q.shape[2], q.shape[3]
    Smax = k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    lengths = cache_seqlens.to(device=q.device, dtype=torch.int64).clamp(0, Smax)
    positions = torch.arange(Smax, device=q.device)
    # Slots past a row's length may hold anything (an uninitialised cache): a zero weight times a
    # NaN there would still poison the output, so they are zeroed, as the kernels never load them.
    v_cache = v_cache.masked_fill((positions[None, :] >= lengths[:, None]).view(B, 1, Smax, 1), 0)
    last_seen = lengths[:, None] - Sq + torch.arange(Sq, device=q.device)[None, :]  # (B, Sq), < len_b
    visible = positions[None, None, :] <= last_seen[:, :, None]  # (B, Sq, Smax)
    return masked_attention(q, k_cache, v_cache, visible.view(B, 1, 1, Sq, Smax), scale, return_lse=return_lse)


# ----------------------------------------------------------------------------- layer norm


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None):
    """LayerNorm over the last dim with fp32 statistics; the fused residual form when given.

    x (..., N); weight/bias (N,) or None; residual like x. Returns y, or (y, h) with
    h = x + residual (in x's dtype) and y = LN(h).
    """
    h = x if residual is None else x + residual
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    y = F.layer_norm(h.to(compute), (x.shape[-1],), w, b, eps).to(x.dtype)
    return y if residual is None else (y, h)


def gather_rows(table, rows):
    """table[rows] for a table (R, K) and int64 ids (M,), an id outside [0, R) reading zeros."""
    if table.shape[0] == 0:
        return table.new_zeros(rows.shape[0], table.shape[1])
    valid = (rows >= 0) & (rows < table.shape[0])
    return torch.where(valid[:, None], table[rows.clamp(0, table.shape[0] - 1)], 0)


def linear(x, weight, bias, *, ln=None, residual=None, gelu_tanh: bool = False, kv_cache=None, kv_pos=None,
           x_rows=None, residual_rows=None):  # fmt: skip
    """act(LN(x + residual) @ weight.T + bias), the unfused way: each step in x's dtype as
    separate torch ops would round it (the matmul accumulates in fp32 or better).

    x (M, K); weight (N, K); bias (N,) or None; ln None or (ln_weight, ln_bias, eps); residual
    (M, K) or None (with ln). kv_cache (2, B, H, S, D) with N == 3 H D, M = B T, and kv_pos (M,)
    int64: out's k|v columns [H D, 3 H D) also go to kv_cache[:, m // T, :, kv_pos[m]] (the T
    rows of a cache row in turn), rows whose slot is outside [0, S) left as they are. x_rows (M,)
    int64: x is a table and the input is gather_rows(x, x_rows); residual_rows likewise. Returns
    (out (M, N), h = x + residual or None).
    """
    if x_rows is not None:
        x = gather_rows(x, x_rows)
    if residual_rows is not None:
        residual = gather_rows(residual, residual_rows)
    h = None
    if ln is not None:
        y = layer_norm(x, *ln, residual=residual)
        x, h = y if residual is not None else (y, None)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = F.linear(x.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    if gelu_tanh:
        out = F.gelu(out, approximate="tanh")
    out = out.to(x.dtype)
    if kv_cache is not None and kv_cache.shape[1] * kv_cache.shape[3] > 0:  # no rows or no slots: nothing to write
        _, B, H, S, D = kv_cache.shape
        kv = out[:, H * D:].view(B, -1, 2, H, 1, D)  # (B, T, 2, H, 1, D)
        pos = kv_pos.view(B, -1)
        for t in range(kv.shape[1]):  # a scatter per token t: each writes one slot a cache row, no two collide
            slot = pos[:, t].clamp(0, S - 1).view(1, B, 1, 1, 1).expand(2, B, H, 1, D)
            valid = ((pos[:, t] >= 0) & (pos[:, t] < S)).view(1, B, 1, 1, 1)
            new = kv[:, t].transpose(0, 1)  # (2, B, H, 1, D)
            kv_cache.scatter_(3, slot, torch.where(valid, new, kv_cache.gather(3, slot)))  # no host sync
    return out, h


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits, temperature, top_k, top_p, min_p):
    """Hugging Face's TemperatureLogitsWarper -> TopK -> TopP -> MinP, per row, exactly.

    logits (B, V) float; temperature (B,) fp32 (> 0); top_k (B,) int64 (0 = off); top_p (B,)
    fp64 (1.0 = off); min_p (B,) fp32 (0.0 = off). Removed entries become -inf. Each warper runs
    only on the rows that enable it, as HF adds a warper only when its parameter is set.
    """
    scores = _top_k(_temperature(logits, temperature), top_k)
    return _min_p(scores.masked_fill(_top_p(scores, top_p)[0], float("-inf")), min_p)


# Data-dependent branches would sync the host, so every warper runs and is masked per row.
def _temperature(logits, temperature):
    """HF divides and multiplies by Python floats, which half-precision tensors apply in fp32."""
    return (logits.float() / temperature[:, None]).to(logits.dtype)


def _top_k(scores, top_k):
    V = scores.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(1, V)
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return scores.masked_fill((scores < kth) & (k < V)[:, None], float("-inf"))


def _top_p(scores, top_p):
    """HF's top-p: (removed (B, V) bool, sorted scores (B, V) ascending, removed in that order)."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # HF compares against the Python double (1 - top_p) rounded to the scores' dtype.
    remove_sorted = (cumulative <= (1.0 - top_p)[:, None].to(scores.dtype)) & (top_p < 1.0)[:, None]
    remove_sorted[:, -1] = False
    return remove_sorted.scatter(1, sorted_idx, remove_sorted), sorted_scores, remove_sorted


def _min_p(scores, min_p):
    probs = torch.softmax(scores, dim=-1)
    remove = probs < (min_p[:, None] * probs.amax(dim=-1, keepdim=True).float()).to(probs.dtype)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove & (min_p > 0.0)[:, None], float("-inf"))


def draw_scores(logits, temperature, top_k, top_p, min_p):
    """The scores whose softmax `sample` draws from: filter_logits', except where a group of tied
    scores straddles the top-p boundary (arguments as filter_logits').

    Hugging Face removes the top-p tail in its ascending sort's order, so of such a group of G
    tokens it removes the first r, those whose cumulative mass is <= 1 - top_p: r is fixed by the
    masses, but which r depends on how its sort orders the ties. Here the group is kept whole at
    the mass HF keeps of it: each member's score gains log((G - r) / G). The draw is then HF's,
    averaged over the orders of the tie, and the same on every backend; every other token's
    probability is softmax(filter_logits(...))'s exactly.
    """
    scores = _top_k(_temperature(logits, temperature), top_k)
    removed, sorted_scores, removed_sorted = _top_p(scores, top_p)
    hf = _min_p(scores.masked_fill(removed, float("-inf")), min_p)
    f = removed_sorted.sum(dim=-1, keepdim=True)  # HF removes a prefix of the sorted scores
    tie = sorted_scores.gather(-1, f.clamp(max=scores.shape[-1] - 1))  # the first kept score
    before = sorted_scores.gather(-1, (f - 1).clamp(min=0))
    group = (scores == tie) & ((f > 0) & (before == tie))  # the tie group top-p splits, if one
    size = group.sum(dim=-1, keepdim=True)
    kept = size - (removed_sorted & (sorted_scores == tie)).sum(dim=-1, keepdim=True)
    # A member's min-p verdict is that of the members HF kept (the same score).
    group &= (group & (hf > float("-inf"))).any(dim=-1, keepdim=True)
    weight = torch.log(kept.clamp(min=1).double() / size.clamp(min=1).double()).to(scores.dtype)
    return torch.where(group, scores + weight, hf)


def clean_logits(logits):
    """The sampler's rule for non-finite logits, shared by every backend.

    NaN counts as -inf (never drawn). If a row holds +inf, only its +inf entries stay, as equal
    logits (the limit of softmax): they become 0 and everything else -inf.
    """
    x = torch.where(torch.isnan(logits), float("-inf"), logits.float())
    has_pos_inf = torch.isposinf(x).any(dim=-1, keepdim=True)
    only_inf = torch.where(torch.isposinf(x), 0.0, float("-inf"))
    return torch.where(has_pos_inf, only_inf, x)


def top_ties_if_overflow(x, temperature):
    """Rows of clean logits x (B, V) whose largest score x / t overflows to +inf: only the entries
    equal to the row's maximum stay, as equal logits (0; the rest -inf), so the draw is uniform
    among them, as for +inf logits. That is softmax(x / t) exactly, not a convention: an x below
    the maximum is at least one ulp, max * 2^-25, below it, so once max / t overflows, (max - x) /
    t >= 2^-25 * 3.4e38 and exp of its negative is 0. Other rows are returned as they are."""
    top = x.amax(dim=-1, keepdim=True)
    overflow = top / temperature[:, None] == float("inf")
    ties = torch.where(x == top, 0.0, float("-inf"))
    return torch.where(overflow, ties, x)


_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply) on int64 tensors holding values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel(seed, shape, device):
    """Counter-based Gumbel noise (fp32) from a device-resident seed: no host sync, no state.

    seed: int64 tensor (1,). Element n (row-major index) gets the 32 bits
    hash(hash(n_lo ^ seed_lo ^ 0x9E3779B9) ^ n_hi ^ seed_hi), made noise by `gumbel_of_bits`.
    (The constant: hash(0) is 0, and would give element n = seed, under a seed below 2^32, the
    all-zero bits, the largest noise.)
    """
    n = torch.arange(int(torch.Size(shape).numel()), device=device, dtype=torch.int64).view(shape)
    s = seed.to(device=device, dtype=torch.int64).reshape(())
    h = _mix32(_mix32((n & _MASK32) ^ (s & _MASK32) ^ 0x9E3779B9) ^ (n >> 32) ^ ((s >> 32) & _MASK32))
    return gumbel_of_bits(h)


def gumbel_of_bits(bits):
    """Gumbel noise -log(E), E = -log(u) exponential, from 32 random bits (int64 tensors holding
    values in [0, 2^32)); every backend's mapping, each with its own bits (the kernels' Philox).

    u is uniform on (0, 1) and fine at both ends: the low 31 bits give x = (m + 1/2) / 2^32 in
    (0, 1/2], and the top bit says whether u is 1 - x (E = -log1p(-x)) or x (E = -log(x)). So
    the noise spans [-3.13, 22.87], each tail cut where a true Gumbel's probability is e^-22.9,
    1.2e-10: a token up to 26 nats below the row's best can still be drawn. (23-bit uniforms,
    u = (k + 1/2) / 2^23, would stop at 16.64 above and -2.81 below: nothing 19.45 nats down.)
    In fp32, as the kernels compute it (their logs may differ from torch's in the last bits).
    """
    x = ((bits & 0x7FFFFFFF).float() + 0.5) * 2.0**-32
    return -torch.log(torch.where(bits >= 2**31, -torch.log(x), -torch.log1p(-x)))


def greedy(logits):
    """argmax of the cleaned logits (first index on ties): `sample` for temperature 0, with no sort.

    The argmax of clean_logits(logits) without building it: NaN as -inf; a row holding +inf
    takes its first +inf entry (the maximum) either way, and a row with nothing drawable (all
    -inf) index 0. Two kernels on a GPU. logits (B, V). Returns int64 (B,).
    """
    inf = float("inf")
    return torch.argmax(torch.nan_to_num(logits, nan=-inf, posinf=inf, neginf=-inf), dim=-1)


def sample(logits, temperature, top_k, top_p, min_p, seed):
    """Draw one token per row: greedy where temperature == 0, else from softmax(draw_scores).

    logits (B, V); per-row parameters as in `filter_logits` (temperature may be 0, and a value
    the ops layer could not check, on a GPU or under torch.compile, <= 0 or NaN is greedy, as in
    the kernels); seed int64 (1,). Non-finite logits follow `clean_logits`. The draw is Gumbel-max
    with `gumbel` noise; a row with nothing left to draw returns 0. Returns int64 (B,).
    """
    x = clean_logits(logits)
    is_greedy = ~(temperature > 0)  # NaN too
    safe_t = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    scores = draw_scores(top_ties_if_overflow(x, safe_t), safe_t, top_k, top_p, min_p)
    drawn = torch.argmax(scores + gumbel(seed, scores.shape, scores.device), dim=-1)
    return torch.where(is_greedy, torch.argmax(x, dim=-1), drawn)
