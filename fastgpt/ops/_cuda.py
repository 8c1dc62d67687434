"""Launchers of the CUDA backend: same names and signatures as the Triton launchers.

Each allocates its outputs and calls the compiled extension `fastgpt._C` with raw data pointers,
shapes, strides (in elements), a dtype code and the current CUDA stream, so the extension needs
no libtorch. No launcher reads a device value on the host: all are CUDA-graph capturable.

Supported inputs (fastgpt/ops checks them first; the launchers check again and raise
ValueError/TypeError otherwise):
- attention, decode_attention: head dim 64 or 128, fp16 or bf16; batch and query heads <= 65535;
  an optional bool mask (expanded views read as they are).
- layer_norm: fp16, bf16 or fp32, any N; weight/bias of any float dtype (fp64 is cast to fp32).
- sample: logits fp16, bf16 or fp32 with V < 2^24.
Tensors the kernels read 16 bytes at a time (q, k, v, the caches) must be 16-byte aligned with
strides in multiples of 8 elements; other layouts are copied to contiguous ones first.
"""

from __future__ import annotations

import functools
import math

import torch

from fastgpt import _backends
from fastgpt._backends import AttentionOutput, LayerNormOutput
from fastgpt.ops import _checks

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HEAD_DIMS = (64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535
MAX_INT32 = 2**31 - 1  # bindings.cpp's limit on rows and columns (LayerNorm) and rows (the sampler)
MAX_VOCAB = 1 << 24  # the sampler's fixed-point probability sums need V < 2^24
MAX_SEQLEN = 1 << 30  # bindings.cpp kMaxSeqlen: tile counts stay within 32-bit ints
DECODE_ROW_TILE = 8  # decode.cu kMaxGroup: (query head, query) pairs a decode block takes
# From this many rows the sampler's candidate path first bounds each row's k-th best key from
# below (sampling.cu: two launches more, then no sort of a chunk with few entries above the
# bound and one sort of a row's list instead of a merge of every chunk's), as the Triton path
# does at every B (16 against 37 us at B1 there on the H200); not measured in CUDA. Past B: the
# sorted form only (tests, gpu-probe).
SAMPLE_BOUND_MIN_ROWS = 1


# ----------------------------------------------------------------------------- helpers


def _extension(op: str, **tensors: torch.Tensor | None):
    """The extension module that launches `op` (fastgpt._C; its host build under the emulator,
    FASTGPT_CUDA_EMULATOR), once every tensor is found on one CUDA device (on the CPU under the
    emulator): the kernels dereference all pointers on the first one's. Each launch asks, so
    this reads only cheap attributes (is_cuda, is_cpu, the device) until something is wrong."""
    emulated = _backends.emulating_cuda()
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not (t.is_cpu if emulated else t.is_cuda):
            raise ValueError(f"{op} (cuda backend): {name} must be a {'CPU' if emulated else 'CUDA'} tensor, "
                             f"got {t.device}")  # fmt: skip
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{op} (cuda backend): {name} is on {t.device} but {first[0]} is on {first[1]}")
    return _backends.cuda_extension()


def _require_shape(op: str, name: str, t: torch.Tensor | None, expected: tuple, dtype=None) -> None:
    """The extension gets bare pointers and trusts the shapes it is told: check them here."""
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op} (cuda backend): {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
    if t is not None and dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op} (cuda backend): {name} must be {dtype}, got {t.dtype}")


def _dtype_code(op: str, name: str, t: torch.Tensor, allowed=tuple(DTYPE_CODES)) -> int:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op} (cuda backend): {name} must be {names}, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _head_dim_supported(op: str, t: torch.Tensor) -> None:
    _dtype_code(op, "q", t, ATTENTION_DTYPES)
    if t.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{op} (cuda backend): head dim must be one of {HEAD_DIMS}, got {t.shape[-1]}")


def _grid_fits(op: str, B: int, Hq: int) -> None:
    """The attention kernels put batch and heads on the grid's y and z dimensions."""
    if B > MAX_GRID_YZ or Hq > MAX_GRID_YZ:
        raise ValueError(f"{op} (cuda backend): batch and heads must be <= {MAX_GRID_YZ}, got {B}, {Hq}")


def _strides(t: torch.Tensor, dims) -> tuple[int, ...]:
    """t's strides over `dims`, with 0 for size-1 dims (their stride never multiplies an index > 0)."""
    shape, strides = t.shape, t.stride()
    return tuple([strides[d] if shape[d] > 1 else 0 for d in dims])


def _vector_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it in 16-byte vectors (last dim contiguous, data
    16-byte aligned, other strides multiples of 16 bytes), else a contiguous copy."""
    per_vector = 16 // t.element_size()
    *strides, last = t.stride()
    if last != 1 or t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    if math.gcd(*strides) % per_vector == 0:  # every stride a multiple: one C call, for the usual case
        return t
    ok = all(n <= 1 or s % per_vector == 0 for n, s in zip(t.shape, strides))  # a size-0/1 dim's stride is unused
    return t if ok else t.clone(memory_format=torch.contiguous_format)


try:  # the current stream's raw handle, without making a torch.cuda.Stream (Triton's launcher reads it so too)
    from torch._C import _cuda_getCurrentRawStream as _current_stream
except ImportError:  # a CPU build of torch: only the emulator's CPU tensors launch
    def _current_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def _launch_target(t: torch.Tensor) -> tuple[int, int]:
    """(device index, the handle of its current stream) that a launch on t's device takes; (0, 0)
    for the emulator's CPU tensors."""
    if not t.is_cuda:
        return 0, 0
    index = t.get_device()
    return index, _current_stream(index)


def _index(device: torch.device) -> int:
    """The device the extension launches on; 0 for the emulator's CPU tensors."""
    return device.index if device.type == "cuda" else 0


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _mask(op: str, mask: torch.Tensor | None, shape: tuple) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """A bool mask of `shape` (expanded views welcome: stride 0 broadcasts) as the kernels read it:
    bytes with a unit-stride last dim (copied where it has none), and its other dims' strides."""
    if mask is None:
        return None, (0,) * (len(shape) - 1)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op} (cuda backend): mask must be torch.bool, got {mask.dtype}")
    _require_shape(op, "mask", mask, shape)
    mask = _checks.last_dim_contiguous(mask).view(torch.uint8)
    return mask, _strides(mask, range(len(shape) - 1))


# ----------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              return_lse: bool = False, mask: torch.Tensor | None = None):  # fmt: skip
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), fp16/bf16, D in (64, 128) -> o (B, Hq, Sq, D), or
    with return_lse AttentionOutput(o, lse (B, Hq, Sq) fp32: natural log, -inf where no key is seen).
    mask: None, or bool (B, Hq, Sq, Sk), False hiding key j from query i too (an expanded view is fine)."""
    ext = _extension("attention", q=q, k=k, v=v, mask=mask)
    if q.dim() != 4:
        raise ValueError(f"attention (cuda backend): q must have shape (B, Hq, Sq, D), got {tuple(q.shape)}")
    _head_dim_supported("attention", q)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    _require_shape("attention", "k", k, (B, Hkv, Sk, D), q.dtype)
    _require_shape("attention", "v", v, (B, Hkv, Sk, D), q.dtype)
    _grid_fits("attention", B, Hq)
    mask, mask_strides = _mask("attention", mask, (B, Hq, Sq, Sk))
    q, k, v = _vector_ready(q), _vector_ready(k), _vector_ready(v)
    o = torch.empty(B, Hq, Sq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32) if return_lse else None
    ext.attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), _ptr(lse), _ptr(mask), mask_strides,
        B, Hq, Hkv, Sq, Sk, D,
        _strides(q, (0, 1, 2)), _strides(k, (0, 1, 2)), _strides(v, (0, 1, 2)), _strides(o, (0, 1, 2)),
        bool(causal), float(scale), DTYPE_CODES[q.dtype], *_launch_target(q),
        _backends.launch_pdl(q.device),
    )  # fmt: skip
    return AttentionOutput(o, lse) if return_lse else o


# ----------------------------------------------------------------------------- decode


@functools.cache
def _decode_blocks_per_sm(dtype: int, D: int, group: int, masked: bool, device: torch.device, Sq: int = 1) -> int:
    """The split kernel's blocks an SM holds at once (CUDA's occupancy), once per configuration."""
    return _backends.cuda_extension().decode_blocks_per_sm(dtype, D, group, 1, Sq, masked, _index(device))


def _sm_count(device: torch.device) -> int:
    return _backends.sm_count(device.index) if device.type == "cuda" else _backends.EMULATOR_SMS


@functools.lru_cache(maxsize=1024)  # every launch asks: a hit costs a tenth of the question
def decode_num_splits(B: int, Hq: int, Hkv: int, Smax: int, D: int, dtype: torch.dtype, device: torch.device,
                      masked: bool = False, Sq: int = 1) -> int:  # fmt: skip
    """The KV splits decode_attention takes for these shapes (Sq queries a row, with a mask or
    without) on `device` (one with its index)."""
    blocks_per_sm = _decode_blocks_per_sm(DTYPE_CODES[dtype], D, Hq // Hkv, masked, device, min(Sq, 8))
    return _backends.cuda_extension().decode_num_splits(B, Hq, Hkv, Sq, Smax, _sm_count(device), blocks_per_sm)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale: float, causal: bool = True, mask=None,
                     counters=None, return_lse: bool = False):  # fmt: skip
    """q (B, Hq, Sq, D), caches (B, Hkv, Smax, D), cache_seqlens int32 (B,) -> (B, Hq, Sq, D)
    contiguous, or with return_lse AttentionOutput(o, lse (B, Hq, Sq) fp32: natural log, -inf for a
    query that sees no position). Query i of row b stands at position len_b - Sq + i (len_b the
    clamped length): causal, it sees the positions j <= len_b - Sq + i, else every j < len_b.
    mask: None, or bool (B, Hq, Sq, Smax) (an expanded view is read in place), False hiding a
    position from a (head, query) too. counters: None, or int32 zeros (N,), N >= B * Hq * Sq,
    contiguous on q's device, used by one stream at a time: the last split of each (row, tile of
    (head, query) pairs) merges the splits (no second launch) and leaves its counter zero."""
    op = "decode_attention"
    ext = _extension(op, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, mask=mask,
                     counters=counters)  # fmt: skip
    _head_dim_supported(op, q)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{op} (cuda backend): cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if q.dim() != 4 or q.shape[2] < 1:
        raise ValueError(f"{op} (cuda backend): q must have shape (B, Hq, Sq, D) with Sq >= 1, got {tuple(q.shape)}")
    B, Hq, Sq, D = q.shape
    Hkv, Smax = k_cache.shape[1], k_cache.shape[2]
    _require_shape(op, "k_cache", k_cache, (B, Hkv, Smax, D), q.dtype)
    _require_shape(op, "v_cache", v_cache, (B, Hkv, Smax, D), q.dtype)
    _require_shape(op, "cache_seqlens", cache_seqlens, (B,))
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < B * Hq * Sq
                                 or not counters.is_contiguous()):
        raise ValueError(f"{op} (cuda backend): counters must be contiguous int32 on {q.device} "
                         f"with at least B * Hq * Sq = {B * Hq * Sq} elements")  # fmt: skip
    _grid_fits(op, B, Hq)
    mask, mask_strides = _mask(op, mask, (B, Hq, Sq, Smax))
    q, k_cache, v_cache = _vector_ready(q), _vector_ready(k_cache), _vector_ready(v_cache)
    seqlens = cache_seqlens.contiguous()
    num_splits = decode_num_splits(B, Hq, Hkv, Smax, D, q.dtype, q.device, masked=mask is not None, Sq=Sq)
    o = torch.empty(B, Hq, Sq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32) if return_lse else None
    o_partial = lse_partial = None
    if num_splits > 1:  # fp32 workspaces for the per-split outputs and log-sum-exps
        o_partial = torch.empty(B, Hq, Sq, num_splits, D, device=q.device, dtype=torch.float32)
        lse_partial = torch.empty(B, Hq, Sq, num_splits, device=q.device, dtype=torch.float32)
    ext.decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), seqlens.data_ptr(), o.data_ptr(),
        _ptr(o_partial), _ptr(lse_partial), _ptr(counters), 0 if counters is None else counters.numel(), _ptr(lse),
        _ptr(mask), mask_strides, B, Hq, Hkv, Sq, Smax, D, num_splits,
        _strides(q, (0, 1, 2)), _strides(k_cache, (0, 1, 2)), _strides(v_cache, (0, 1, 2)), bool(causal),
        float(scale), DTYPE_CODES[q.dtype], *_launch_target(q), _backends.launch_pdl(q.device),
    )  # fmt: skip
    return AttentionOutput(o, lse) if return_lse else o


# ----------------------------------------------------------------------------- layer norm


def _param(op: str, name: str, p: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return None
    if not p.is_floating_point():
        raise TypeError(f"{op} (cuda backend): {name} must be a float tensor, got {p.dtype}")
    return (p if p.dtype in DTYPE_CODES else p.float()).contiguous()


def layer_norm(x, weight, bias, *, eps: float, residual=None) -> LayerNormOutput:
    """x (M, N) fp16/bf16/fp32, weight/bias (N,) or None, residual (M, N) or None ->
    LayerNormOutput(y (M, N), h (M, N) or None), both contiguous in x's dtype."""
    ext = _extension("layer_norm", x=x, weight=weight, bias=bias, residual=residual)
    code = _dtype_code("layer_norm", "x", x)
    if x.dim() != 2:
        raise ValueError(f"layer_norm (cuda backend): x must be 2-D (M, N), got {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm (cuda backend): residual must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")  # fmt: skip
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"layer_norm (cuda backend): residual must have x's dtype {x.dtype}, got {residual.dtype}")
    M, N = x.shape
    x = _checks.last_dim_contiguous(x)
    residual = None if residual is None else _checks.last_dim_contiguous(residual)
    weight, bias = _param("layer_norm", "weight", weight), _param("layer_norm", "bias", bias)
    _require_shape("layer_norm", "weight", weight, (N,))
    _require_shape("layer_norm", "bias", bias, (N,))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    h = None if residual is None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    ext.layer_norm(
        x.data_ptr(), _ptr(residual), _ptr(weight), _ptr(bias), y.data_ptr(), _ptr(h), M, N,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), 0 if h is None else h.stride(0),
        float(eps), code, DTYPE_CODES[weight.dtype] if weight is not None else 0,
        DTYPE_CODES[bias.dtype] if bias is not None else 0, *_launch_target(x),
        _backends.launch_pdl(x.device),
    )  # fmt: skip
    return LayerNormOutput(y, h)


# ----------------------------------------------------------------------------- sampling


def sample(logits, temperature, top_k, top_p, min_p, seed, *, top_k_bound=0) -> torch.Tensor:
    """logits (B, V); temperature fp32, top_k int64, top_p fp64, min_p fp32, all (B,); seed int64
    (1,) on the device -> int64 (B,) token ids in [0, V). top_k_bound: every row's top_k is in
    [1, top_k_bound] as far as the caller knows (0: unknown); a small one takes the candidate
    path (csrc/sampling.cu), with the same tokens."""
    ext = _extension("sample", logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     seed=seed)  # fmt: skip
    code = _dtype_code("sample", "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"sample (cuda backend): logits must be 2-D (B, V), got {tuple(logits.shape)}")
    B, V = logits.shape
    if V >= MAX_VOCAB:
        raise ValueError(f"sample (cuda backend): vocab size must be < 2^24, got {V}")
    logits = _checks.last_dim_contiguous(logits)
    temperature = temperature.to(torch.float32).contiguous()
    top_k = top_k.to(torch.int64).contiguous()
    top_p = top_p.to(torch.float64).contiguous()
    min_p = min_p.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        _require_shape("sample", name, t, (B,))
    if seed.numel() < 1:
        raise ValueError("sample (cuda backend): seed must hold one int64 value")
    out = torch.empty(B, device=logits.device, dtype=torch.int64)
    cand_k = _backends.sample_candidate_k(top_k_bound)
    workspace = None  # the candidate path's, where it runs
    if cand_k:
        words = -(-ext.sample_workspace_bytes(B, V, cand_k) // 8)
        workspace = torch.empty(words, device=logits.device, dtype=torch.int64)
    ext.sample(
        logits.data_ptr(), temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(), min_p.data_ptr(),
        seed.data_ptr(), out.data_ptr(), 0 if workspace is None else workspace.data_ptr(), cand_k,
        B >= SAMPLE_BOUND_MIN_ROWS, B, V, logits.stride(0), code, *_launch_target(logits),
        _backends.launch_pdl(logits.device),
    )  # fmt: skip
    return out
