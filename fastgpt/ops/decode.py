"""fastgpt.decode_attention: one new query token per row over a static KV cache (split-KV)."""

from __future__ import annotations

import torch

from fastgpt import _backends, reference
from fastgpt.ops import _checks, _dispatch
from fastgpt.ops.attention import backend_limits, check_qkv

SEQLEN_DTYPES = (torch.int32,)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float | None = None, backend: str = "auto"):
    """Attention of one query token per row over the first cache_seqlens[b] cache positions.

    q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, Smax, D), Hq % Hkv == 0; fp16, bf16 or fp32.
    cache_seqlens: int32 (B,) on q's device: how many positions of row b are valid (the current
    token already written). Lengths are not read by the host (that would sync): kernels clamp
    them to [0, Smax], and a row of length 0 returns zeros. Returns (B, Hq, 1, D) in q's dtype.
    """
    device = check_qkv(q, k_cache, v_cache, kv_names=("k_cache", "v_cache"), layout="(B, Hkv, Smax, D)",
                       kv_heads="the cache's")
    _checks.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=SEQLEN_DTYPES)
    _checks.same_device(q=q, cache_seqlens=cache_seqlens)
    B, Hq, one, D = q.shape
    if one != 1:
        raise ValueError(f"q must have shape (B, Hq, 1, D): one query token per row, got {tuple(q.shape)}")
    Smax = k_cache.shape[2]
    _checks.shape("cache_seqlens", cache_seqlens, (B,), "(B,)")
    scale = _checks.scale(scale, D)
    name = _backends.resolve("decode_attention", backend, device, backend_limits(q, Smax),
                             _backends.decode_preference(B * k_cache.shape[1]))
    if q.numel() == 0 or Smax == 0:
        return q.new_zeros(B, Hq, 1, D)
    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)
    q, k_cache, v_cache = (_checks.last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    return _dispatch.call(_decode_op, _decode, q, k_cache, v_cache, cache_seqlens, scale, name)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    if backend == "torch":
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)
    return _backends.launchers(backend, "decode").decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)


_decode_op = torch.library.custom_op("fastgpt::decode_attention", _decode, mutates_args=())


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, backend):
    return q.new_empty(q.shape)
