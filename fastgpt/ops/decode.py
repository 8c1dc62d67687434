"""fastgpt.decode_attention: a row's new query tokens (one a decode step) over a static KV cache (split-KV)."""

from __future__ import annotations

import torch

from fastgpt import _backends, reference
from fastgpt._backends import AttentionOutput
from fastgpt.ops import _checks, _dispatch
from fastgpt.ops.attention import check_qkv, decode_limits

SEQLEN_DTYPES = (torch.int32,)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float | None = None, backend: str = "auto",
                     return_lse: bool = False):  # fmt: skip
    """Attention of each row's new query tokens over the first cache_seqlens[b] cache positions.

    q: (B, Hq, Sq, D); k_cache, v_cache: (B, Hkv, Smax, D), Hq % Hkv == 0; fp16, bf16 or fp32.
    cache_seqlens: int32 (B,) on q's device: how many positions of row b are valid (the current
    tokens already written). Lengths are not read by the host (that would sync): kernels clamp
    them to [0, Smax]. Sq is 1 in a decode step; with more (speculative decoding's drafts, a
    prompt's chunk) the queries are the row's last Sq positions and causal: with len_b the
    clamped length, query i sees positions [0, len_b - Sq + i]. A query that sees no position
    (a row of length 0, len_b < Sq - i) returns zeros. Returns (B, Hq, Sq, D) in q's dtype.
    The kernels read a KV head once for each tile of its (query head, query) pairs (16 to 64 in
    Triton by dtype and head dim, 8 in CUDA) and split the cache over the GPU, but do not skip the causal triangle: for
    long chunks, fastgpt.attention on the cache's valid slice does half the work.
    With return_lse, returns AttentionOutput(out, lse), lse (B, Hq, Sq) fp32: each query's
    ln sum_j exp(q k_j^T * scale) over the positions it sees, -inf where none (what merging this
    with attention over other keys takes, as fastgpt.attention's).
    """
    return decode_step_attention(q, k_cache, v_cache, cache_seqlens, None, scale=scale, backend=backend,
                                 return_lse=return_lse)  # fmt: skip


def decode_step_attention(q, k_cache, v_cache, cache_seqlens, counters, *, scale: float | None = None,
                          backend: str = "auto", return_lse: bool = False, token_major: bool = False,
                          graphed: bool = False):  # fmt: skip
    """decode_attention for a caller that keeps a decoder's state (GPT's fused decode step): counters
    None, or an int32 (N,) tensor of zeros on q's device, N >= B * Hq * Sq, used by one stream at a
    time. The Triton and CUDA kernels then merge their KV splits in the same launch (the last
    split of each row's query-head tile to finish does) and leave the counters zero; the torch
    backend does not read them. Counters that are not zero give wrong outputs: nothing can check
    them without a sync.

    token_major: the output (B, Hq, Sq, D) is the transposed view of a contiguous (B, Sq, Hq, D),
    so that out.transpose(1, 2).reshape(B, Sq, Hq * D), a model's output projection's input, is a
    view. The Triton kernels write it so; the other backends copy their output into it (the copy
    the caller would make).

    graphed: the call is part of a step being captured in a CUDA graph (GPT's decode step under
    fastgpt.generate), so "auto" orders the backends by their device time; False: by one eager
    call's time."""
    device = check_qkv(q, k_cache, v_cache, kv_names=("k_cache", "v_cache"), layout="(B, Hkv, Smax, D)",
                       kv_heads="the cache's")
    _checks.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=SEQLEN_DTYPES)
    _checks.same_device(q=q, cache_seqlens=cache_seqlens)
    B, Hq, Sq, D = q.shape
    Smax = k_cache.shape[2]
    _checks.shape("cache_seqlens", cache_seqlens, (B,), "(B,)")
    _checks.flag("return_lse", return_lse)
    _checks.flag("token_major", token_major)
    if counters is not None:
        _checks.tensor("counters", counters, ndim=1, dtypes=(torch.int32,))
        _checks.same_device(q=q, counters=counters)
        if counters.numel() < B * Hq * Sq or not counters.is_contiguous():
            raise ValueError(f"counters must be contiguous with at least B * Hq * Sq = {B * Hq * Sq} elements, "
                             f"got shape {tuple(counters.shape)}")  # fmt: skip
    scale = _checks.scale(scale, D)
    name = _backends.resolve("decode_attention", backend, device, decode_limits(q, k_cache.shape[1], Smax),
                             _backends.decode_preference(Sq, 2 * k_cache.numel() * k_cache.element_size(), graphed))
    if q.numel() == 0 or Smax == 0:
        out = _token_major(q.new_zeros(B, Hq, Sq, D)) if token_major else q.new_zeros(B, Hq, Sq, D)
        return AttentionOutput(out, q.new_full((B, Hq, Sq), float("-inf"), dtype=torch.float32)) if return_lse else out
    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        result = _run(q, k_cache, v_cache, cache_seqlens, counters, scale, name, return_lse, token_major)
        return AttentionOutput(*result) if return_lse else result
    q, k_cache, v_cache = map(_checks.last_dim_contiguous, (q, k_cache, v_cache))
    args = (q, k_cache, v_cache, cache_seqlens, counters, scale, name, token_major)
    if return_lse:
        return AttentionOutput(*_dispatch.call(_decode_lse_op, _decode_lse, *args))
    return _dispatch.call(_decode_op, _decode, *args)


def _token_major(out: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Sq, D) -> the same values as the (B, Hq, Sq, D) view of a contiguous (B, Sq, Hq, D)."""
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)


def _run(q, k_cache, v_cache, cache_seqlens, counters, scale: float, backend: str, return_lse: bool,
         token_major: bool):  # fmt: skip
    """The backend's decode attention: out, or with return_lse (out, lse)."""
    if backend == "triton":
        return _backends.launchers(backend, "decode").decode_attention(
            q, k_cache, v_cache, cache_seqlens, scale=scale, counters=counters, return_lse=return_lse,
            token_major=token_major)  # fmt: skip
    if backend == "torch":
        result = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale, return_lse=return_lse)
    else:
        result = _backends.launchers(backend, "decode").decode_attention(
            q, k_cache, v_cache, cache_seqlens, scale=scale, counters=counters, return_lse=return_lse)  # fmt: skip
    if not token_major:
        return result
    return (_token_major(result[0]), result[1]) if return_lse else _token_major(result)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    counters: torch.Tensor | None, scale: float, backend: str, token_major: bool,
) -> torch.Tensor:  # fmt: skip
    return _run(q, k_cache, v_cache, cache_seqlens, counters, scale, backend, False, token_major)


def _decode_lse(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    counters: torch.Tensor | None, scale: float, backend: str, token_major: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """_decode with each head's log-sum-exp, (out, lse)."""
    return tuple(_run(q, k_cache, v_cache, cache_seqlens, counters, scale, backend, True, token_major))


# counters are not declared mutated: the kernel leaves them as it found them (zero), and a
# functionalised copy of them would cost the launches they save.
_decode_op = torch.library.custom_op("fastgpt::decode_attention", _decode, mutates_args=())


def _fake_out(q, token_major: bool) -> torch.Tensor:
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Sq, Hq, D).transpose(1, 2) if token_major else q.new_empty(q.shape)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, counters, scale, backend, token_major):
    return _fake_out(q, token_major)


_decode_lse_op = torch.library.custom_op("fastgpt::decode_attention_lse", _decode_lse, mutates_args=())


@_decode_lse_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, counters, scale, backend, token_major):
    return _fake_out(q, token_major), q.new_empty(q.shape[:3], dtype=torch.float32)
