"""fastgpt.attention: prefill attention with causal masking and GQA, over three backends; and
masked_attention, its form under an arbitrary boolean mask (what transformers hands over)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgpt import _backends, reference
from fastgpt._backends import AttentionOutput
from fastgpt.ops import _checks, _cuda, _dispatch

TRITON_MAX_HEAD_DIM = 256
# Calls with at most this many queries a row run the split-KV decode kernels (see _few_queries).
SPLIT_KV_MAX_QUERIES = 16


def backend_limits(q: torch.Tensor, seq_len: int) -> Callable[[str], str | None]:
    """Why a compiled backend cannot run attention for q (B, Hq, S, D) over seq_len keys, or None.

    Shared by `attention` and `decode_attention`, whose kernels have the same limits.
    """

    def reason(backend: str) -> str | None:
        D = q.shape[-1]
        if backend == "triton" and D > TRITON_MAX_HEAD_DIM:
            return f"head dim {D} > {TRITON_MAX_HEAD_DIM}"
        if backend == "triton":
            return _checks.interpreter_dtype(q) or _checks.triton_length("sequence lengths", max(q.shape[2], seq_len))
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


def decode_limits(q: torch.Tensor, Hkv: int, seq_len: int) -> Callable[[str], str | None]:
    """backend_limits for the split-KV decode kernels (decode_attention, and attention of a few
    queries): also the CUDA split kernel's grid, Hkv tiles of up to DECODE_ROW_TILE (query head,
    query) pairs each on its y dimension."""
    limits = backend_limits(q, seq_len)

    def reason(backend: str) -> str | None:
        tiles = Hkv * -(-(q.shape[1] // Hkv * q.shape[2]) // _cuda.DECODE_ROW_TILE)
        if backend == "cuda" and tiles > _cuda.MAX_GRID_YZ:
            return (f"the cuda kernel supports Hkv * ceil(Hq / Hkv * Sq / {_cuda.DECODE_ROW_TILE}) <= "
                    f"{_cuda.MAX_GRID_YZ} tiles of (query head, query) pairs, got {tiles}")
        return limits(backend)

    return reason


def _kernel_limits(q: torch.Tensor, k: torch.Tensor) -> Callable[[str], str | None]:
    """The limits of the kernels that run attention of q over k: the split-KV decode kernels for
    a few queries a row (_few_queries), else the prefill kernels."""
    if q.shape[2] <= SPLIT_KV_MAX_QUERIES:
        return decode_limits(q, k.shape[1], k.shape[2])
    return backend_limits(q, k.shape[2])


def check_qkv(q, k, v, *, kv_names=("k", "v"), layout="(B, Hkv, Sk, D)", kv_heads="k/v's") -> torch.device:
    """Check q (B, Hq, Sq, D) and k/v (B, Hkv, Sk, D): one float dtype, one device, Hq % Hkv == 0.
    kv_names, layout and kv_heads name k/v in the errors (the decode op's cache). Returns the device."""
    k_name, v_name = kv_names
    _checks.tensor("q", q, ndim=4)
    _checks.tensor(k_name, k, ndim=4)
    _checks.tensor(v_name, v, ndim=4)
    device = _checks.same_device(**{"q": q, k_name: k, v_name: v})
    _checks.same_dtype(**{"q": q, k_name: k, v_name: v})
    B, Hq, _, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    _checks.shape(k_name, k, (B, Hkv, Sk, D), layout)
    _checks.shape(v_name, v, (B, Hkv, Sk, D), layout)
    if D == 0:  # the default scale is 1/sqrt(D)
        raise ValueError(f"q's head dim D must be >= 1, got shape {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of {kv_heads} ({Hkv})")
    return device


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto",
              return_lse: bool = False):  # fmt: skip
    """Scaled dot-product attention: softmax(q k^T * scale) v, fused.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA); fp16, bf16 or fp32,
    one dtype, one device. `scale` defaults to 1/sqrt(D). With `causal`, query i sees keys
    j <= i + Sk - Sq (bottom-right aligned, as FlashAttention; equal to SDPA's is_causal when
    Sq == Sk); a query that sees no key returns zeros. Returns (B, Hq, Sq, D) in q's dtype.
    A few queries (Sq <= SPLIT_KV_MAX_QUERIES) run the split-KV kernels of fastgpt.decode_attention.
    With return_lse, returns AttentionOutput(out, lse), lse (B, Hq, Sq) fp32: each query's
    ln sum_j exp(q k_j^T * scale) over the keys it sees, -inf where it sees none (what merging
    attention over two sets of keys takes: softmax weights exp(lse_a - lse) and exp(lse_b - lse)).
    """
    device = check_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    _checks.flag("causal", causal)
    _checks.flag("return_lse", return_lse)
    scale = _checks.scale(scale, D)
    if Sq <= SPLIT_KV_MAX_QUERIES:  # the decode kernels run it (_few_queries)
        preference = _backends.decode_preference(Sq, (k.numel() + v.numel()) * k.element_size(), graphed=False)
    else:
        preference = _backends.attention_preference(4 * B * Hq * Sq * Sk * D / (2 if causal else 1))
    name = _backends.resolve("attention", backend, device, _kernel_limits(q, k), preference)
    if q.numel() == 0 or Sk == 0:
        out = q.new_zeros(B, Hq, Sq, D)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=device)
        return AttentionOutput(out, lse) if return_lse else out
    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        result = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        return AttentionOutput(*result) if return_lse else result
    q, k, v = map(_checks.last_dim_contiguous, (q, k, v))
    if return_lse:
        return AttentionOutput(*_dispatch.call(_attention_lse_op, _attention_lse, q, k, v, causal, scale, name))
    return _dispatch.call(_attention_op, _attention, q, k, v, causal, scale, name)


def _few_queries(q, k, v, causal: bool, scale: float, backend: str, mask=None, return_lse: bool = False):
    """A few queries a row (a decode step's one, speculative decoding's drafts): the split-KV
    decode kernels over keys of length Sk, the queries at their end (causal is bottom-right).
    The prefill kernel runs one program per (row, head, block of queries), which leaves most of
    a GPU idle where B * Hq is small and reads k/v once per query head; the decode kernels serve
    a KV head's queries from one read and split the keys until the GPU is full.
    mask (B, Hq, Sq, Sk) bool, or None."""
    lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    launch = _backends.launchers(backend, "decode").decode_attention
    return launch(q, k, v, lengths, scale=scale, causal=causal, mask=mask, return_lse=return_lse)


def _run(q, k, v, causal: bool, scale: float, backend: str, return_lse: bool):
    """The backend's attention: out, or with return_lse (out, lse)."""
    if backend == "torch":
        return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    if q.shape[2] <= SPLIT_KV_MAX_QUERIES:
        return _few_queries(q, k, v, causal, scale, backend, return_lse=return_lse)
    return _backends.launchers(backend, "attention").attention(q, k, v, causal=causal, scale=scale,
                                                               return_lse=return_lse)  # fmt: skip


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
               backend: str) -> torch.Tensor:  # fmt: skip
    return _run(q, k, v, causal, scale, backend, return_lse=False)


_attention_op = torch.library.custom_op("fastgpt::attention", _attention, mutates_args=())


@_attention_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """_attention with each query's log-sum-exp, (out, lse)."""
    return tuple(_run(q, k, v, causal, scale, backend, return_lse=True))


_attention_lse_op = torch.library.custom_op("fastgpt::attention_lse", _attention_lse, mutates_args=())


@_attention_lse_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def masked_attention(q, k, v, mask, *, scale: float | None = None, backend: str = "auto"):
    """Attention under a boolean mask: softmax(q k^T * scale, keys where mask is True) v, fused.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), Hq % Hkv == 0; fp16, bf16 or fp32. mask: bool
    (B or 1, Hq or 1, Sq, Sk), True where query i may attend to key j (transformers' SDPA mask;
    no causal mask is added). A query that may attend to no key returns zeros. On a CUDA device
    auto takes the Triton kernels first (229 against 621 us on an H200 at B16 H12 S1024 D64 with
    512 keys padded), then the CUDA ones. Returns (B, Hq, Sq, D) in q's dtype.
    """
    device = check_qkv(q, k, v)
    _checks.tensor("mask", mask, ndim=4, dtypes=(torch.bool,))
    _checks.same_device(q=q, mask=mask)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    mB, mH, mSq, mSk = mask.shape
    if mB not in (1, B) or mH not in (1, Hq) or (mSq, mSk) != (Sq, Sk):
        raise ValueError(f"mask must have shape (B or 1, Hq or 1, Sq, Sk) = ({B} or 1, {Hq} or 1, {Sq}, {Sk}), "
                         f"got {tuple(mask.shape)}")
    scale = _checks.scale(scale, D)
    name = _backends.resolve("masked_attention", backend, device, _kernel_limits(q, k), preference=("triton", "cuda"))
    if q.numel() == 0 or Sk == 0:
        return q.new_zeros(B, Hq, Sq, D)
    if name == "torch":
        return _masked_reference(q, k, v, mask, scale)
    q, k, v, mask = map(_checks.last_dim_contiguous, (q, k, v, mask))
    return _dispatch.call(_masked_attention_op, _masked_attention, q, k, v, mask, scale, name)


def _masked_reference(q, k, v, mask, scale):
    """The mask's head dim grouped as q's (Hkv, group), for reference.masked_attention."""
    Hkv = k.shape[1]
    grouped = mask[:, :, None] if mask.shape[1] == 1 else mask.unflatten(1, (Hkv, -1))  # (B|1, Hkv|1, g|1, Sq, Sk)
    return reference.masked_attention(q, k, v, grouped, scale)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    if backend == "torch":
        return _masked_reference(q, k, v, mask, scale)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    mask = mask.expand(B, Hq, Sq, Sk)  # broadcast dims get stride 0
    if Sq <= SPLIT_KV_MAX_QUERIES:  # decode steps (transformers' padded batches)
        return _few_queries(q, k, v, False, scale, backend, mask=mask)
    return _backends.launchers(backend, "attention").attention(q, k, v, causal=False, scale=scale, mask=mask)


_masked_attention_op = torch.library.custom_op("fastgpt::masked_attention", _masked_attention, mutates_args=())


@_masked_attention_op.register_fake
def _(q, k, v, mask, scale, backend):
    return q.new_empty(q.shape)
