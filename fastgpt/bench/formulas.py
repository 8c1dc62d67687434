"""FLOP and byte counts: the numerators of every rate the harness reports.

Rates are "useful work per second": the FLOPs an attention must do and the fewest bytes an op
must move through device memory (each input read once, each output written once). Extra
passes an implementation makes are its own cost and are not counted.
"""

from __future__ import annotations

import torch


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool) -> int:
    """FLOPs of softmax(q k^T) v: two matmuls of 2*Sq*Sk*D each per (batch, query head).

    H is the number of query heads. Causal attention counts the (query, key) pairs it sees,
    aligned bottom-right (query i sees keys j <= i + Sk - Sq), by the convention that Sq == Sk
    sees half (FlashAttention's, and the one quoted in the targets): Sq Sk - Sq^2 / 2 pairs when
    Sq <= Sk (a chunk of queries after a cached prefix sees most of the keys), Sk^2 / 2 when the
    first Sq - Sk queries see none.
    """
    pairs = Sq * Sk
    if causal:
        pairs = Sq * Sk - Sq * Sq // 2 if Sq <= Sk else Sk * Sk // 2
    return 4 * B * H * pairs * D


def decode_bytes(B: int, Hq: int, Hkv: int, D: int, seqlens_total: int, dtype: torch.dtype, Sq: int = 1) -> int:
    """Bytes of one decode-attention call: q, the valid part of the cache, cache_seqlens, out.

    seqlens_total is sum(cache_seqlens): row b reads K and V over its first len_b positions,
    (Hkv, len_b, D) each. q (B, Hq, Sq, D) is read and the output (B, Hq, Sq, D) written once;
    cache_seqlens is int32 (B,).
    """
    size = element_size(dtype)
    return size * (2 * B * Hq * Sq * D + 2 * Hkv * D * seqlens_total) + 4 * B


def layer_norm_bytes(M: int, N: int, dtype: torch.dtype, *, residual: bool, weight_dtype=None,
                     affine: bool = True) -> int:
    """Bytes of (residual +) LayerNorm over an (M, N) input.

    Reads x (and residual), weight and bias (N,) once; writes y (and h = x + residual).
    """
    size = element_size(dtype)
    tensors = 4 if residual else 2  # x, residual, y, h  or  x, y
    params = 2 * N * element_size(weight_dtype or dtype) if affine else 0
    return size * tensors * M * N + params


def sampling_bytes(B: int, V: int, dtype: torch.dtype) -> int:
    """Bytes of one sampling call: the (B, V) logits read once (the (B,) ids are negligible)."""
    return element_size(dtype) * B * V


def copy_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes a device-to-device copy moves: the source read plus the destination written."""
    return 2 * numel * element_size(dtype)


def matmul_flops(M: int, N: int, K: int) -> int:
    """FLOPs of an (M, K) @ (K, N) product: one multiply and one add per term."""
    return 2 * M * N * K


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's parameters, each distinct tensor once (tied weights count once).

    This is what a decode step must stream from memory at batch 1: GPT-2 124M in bf16 is
    ~249 MB (wte is shared with lm_head).
    """
    seen, total = set(), 0
    for p in module.parameters():
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def tokens_per_second(batch: int, new_tokens: int, seconds: float) -> float:
    """Generated tokens per second: B * new tokens over the wall time (prefill included)."""
    return batch * new_tokens / seconds


def weight_bandwidth_utilisation(tok_per_s: float, batch: int, weight_nbytes: int, gbps: float) -> float:
    """Fraction of the bandwidth `gbps` (the read ceiling's) spent streaming weights: one full
    read per decode step.

    Steps per second = tok/s / B; each step reads every weight once.
    """
    return (tok_per_s / batch) * weight_nbytes / (gbps * 1e9)
