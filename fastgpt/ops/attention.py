"""fastgpt.attention: prefill attention with causal masking and GQA, over three backends."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgpt import _backends, reference
from fastgpt.ops import _checks, _cuda

TRITON_MAX_HEAD_DIM = 256


def backend_limits(q: torch.Tensor, seq_len: int) -> Callable[[str], str | None]:
    """Why a compiled backend cannot run attention for q (B, Hq, S, D) over seq_len keys, or None.

    Shared by `attention` and `decode_attention`, whose kernels have the same limits.
    """

    def reason(backend: str) -> str | None:
        D = q.shape[-1]
        if backend == "triton" and D > TRITON_MAX_HEAD_DIM:
            return f"head dim {D} > {TRITON_MAX_HEAD_DIM}"
        if backend != "cuda":
            return None
        if D not in _cuda.HEAD_DIMS or q.dtype not in _cuda.ATTENTION_DTYPES:
            return f"the cuda kernel supports head dims {_cuda.HEAD_DIMS} in fp16/bf16, got D={D} {q.dtype}"
        if max(q.shape[0], q.shape[1]) > _cuda.MAX_GRID_YZ:
            return f"the cuda kernel supports batch and heads <= {_cuda.MAX_GRID_YZ}, got {tuple(q.shape[:2])}"
        if max(q.shape[2], seq_len) > _cuda.MAX_SEQLEN:
            return f"the cuda kernel supports sequence lengths <= 2^30, got {max(q.shape[2], seq_len)}"
        return None

    return reason


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto"):
    """Scaled dot-product attention: softmax(q k^T * scale) v, fused.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA); fp16, bf16 or fp32,
    one dtype, one device. `scale` defaults to 1/sqrt(D). With `causal`, query i sees keys
    j <= i + Sk - Sq (bottom-right aligned, as FlashAttention; equal to SDPA's is_causal when
    Sq == Sk); a query that sees no key returns zeros. Returns (B, Hq, Sq, D) in q's dtype.
    """
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    device = _checks.same_device(q=q, k=k, v=v)
    _checks.same_dtype(q=q, k=k, v=v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    _checks.shape("k", k, (B, Hkv, Sk, D), "(B, Hkv, Sk, D)")
    _checks.shape("v", v, (B, Hkv, Sk, D), "(B, Hkv, Sk, D)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of k/v's ({Hkv})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = _checks.scale(scale, D)
    name = _backends.resolve("attention", backend, device, backend_limits(q, Sk))
    if q.numel() == 0 or Sk == 0:
        return q.new_zeros(B, Hq, Sq, D)
    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        return reference.attention(q, k, v, causal=causal, scale=scale)
    q, k, v = (_checks.last_dim_contiguous(t) for t in (q, k, v))
    return torch.ops.fastgpt.attention(q, k, v, causal, scale, name)


@torch.library.custom_op("fastgpt::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference.attention(q, k, v, causal=causal, scale=scale)
    return _backends.launchers(backend, "attention").attention(q, k, v, causal=causal, scale=scale)


@_attention_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape)
