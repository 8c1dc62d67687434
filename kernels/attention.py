"""Prefill attention in Triton: FlashAttention-2-style forward with an online softmax.

softmax(q k^T * scale [+ causal mask]) v for q (B, Hq, Sq, D) and k/v (B, Hkv, Sk, D), with
GQA/MQA (query head h reads KV head h // (Hq // Hkv)), bottom-right causal alignment when
Sq != Sk (query i sees keys j <= i + Sk - Sq; a query that sees no key gets zeros), head dims up
to 256 (padded to a power of two and masked), any sequence lengths and any strides with
stride(-1) == 1. An optional boolean mask (B, Hq, Sq, Sk), broadcast views welcome, hides keys
from queries (transformers' padding and static-cache masks); every key block is then masked.

Precision: fp16/bf16 products run on tensor cores with fp32 accumulation; the softmax is fp32.
fp32 inputs use `input_precision="tf32x3"` (three TF32 products per dot, close to fp32 accuracy
and far faster than FMA); set `_FP32_DOT_PRECISION` to "ieee" for plain fp32 FMA dots.

Block sizes are autotuned on the GPU per (head dim, causal, dtype, sequence-length bucket,
whether Sq fits one query block) when max(Sq, Sk) > 256; shorter problems use a fixed config.
Autotuning times candidate kernels with host syncs, which a CUDA graph capture cannot contain: call
`attention` once with each new key before capturing it. A key first met during a capture is not
tuned there: it runs the fixed config, with a warning. Under Triton's interpreter (CPU tensors)
one small fixed config is used.

Loads on Hopper (sm_90+): tiles can come through TMA (host tensor descriptors over the 4-D
tensors, whose bounds zero-fill past the sequence and the head dim) instead of pointer loads.
For fp16/bf16 the autotuner times the leading configs both ways and keeps the faster (on the
H200 it kept TMA for D128 and for masked calls, 2026-11-28). Warp specialization is not used:
Triton 3.6's Hopper pass (`tl.range(..., warp_specialize=True)` on the unmasked loop, lowered
for sm_90a on 2026-11-30) fails to compile at 4 warps and at 8 leaves the kernel unspecialized
(no setmaxnreg, no producer warps; about the same PTX).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastgpt._backends import AttentionOutput
from fastgpt.kernels.sizes import cdiv, next_power_of_2

_FP32_DOT_PRECISION = "tf32x3"
_INTERPRETER_CONFIG = (16, 16, 4, 1)  # (BLOCK_M, BLOCK_N, warps, stages) on CPU tensors: small and fast
_TUNE_MIN_LEN = 256  # shorter problems are launch-bound: a fixed config, no autotuning
_MAX_BLOCK_N = 128  # the largest BLOCK_N of any config: K/V rows within a block use 32-bit offsets


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero past n_rows (when CHECK_ROWS) and past HEAD_DIM."""
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_kv(desc, base, b, kvh, start_n, offs_n, offs_d, Sk, stride_s, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) key or value tile from row start_n of one (batch, KV head), zero past
    Sk and HEAD_DIM: by TMA (desc over (B, Hkv, Sk, D) at int32 [b, kvh]; its bounds do the zero
    fill) or by pointers from base (that head's row 0)."""
    if USE_TMA:
        tile = desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        # Pointers are rebuilt from the scalar base each step: a (BLOCK_N, BLOCK_D) tensor of
        # 64-bit pointers kept live across the loop would cost more registers than the tile. The
        # block's first row is a 64-bit scalar offset (Sk * stride may pass 2^31); rows within
        # the block stay 32-bit (the launcher keeps BLOCK_N * stride below 2^31).
        row0 = tl.cast(start_n, tl.int64)  # start_n is a Python int in the interpreter
        ptrs = base + row0 * stride_s + offs_n[:, None] * stride_s + offs_d[None, :]
        tile = _load_rows(ptrs, start_n + offs_n, Sk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    return tile


@triton.jit
def _attn_inner(acc, l_i, m_i, q, desc_k, desc_v, b, kvh, k_base, v_base, mask_rows, offs_m, offs_n, offs_d,
                start, end, Sq, Sk, diag, qk_scale, stride_k_s, stride_v_s,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [start, end) into the running (acc, l_i, m_i); m_i is in log2 units.

    MASKED applies the key-length, causal and (HAS_MASK) user masks; the caller only passes
    unmasked ranges that every row of the tile sees in full. qk_scale (scale * log2(e)) >= 0:
    unmasked blocks take each row's max before scaling, so that a score's scale and shift are one
    FMA (the sm_90a loop: 300 instructions instead of 330 at D64, 343 instead of 373 at D128;
    the masked loop 412 and 454).
    mask_rows: (BLOCK_M, 1) pointers to the tile's mask rows. A row may be fully masked in a block
    (or in all of them), or see only scores past fp32's range (-inf): its max stays -inf and
    exponentials are then taken relative to 0, giving 0, never NaN.
    """
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_kv(desc_k, k_base, b, kvh, start_n, offs_n, offs_d, Sk, stride_k_s,
                     HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            if IS_CAUSAL:  # the last key a row sees, then one compare a score (not two and an and)
                keep = cols[None, :] <= tl.minimum(offs_m + diag, Sk - 1)[:, None]
            else:
                keep = cols[None, :] < Sk
            if HAS_MASK:
                in_bounds = (offs_m[:, None] < Sq) & (cols[None, :] < Sk)
                keep = keep & (tl.load(mask_rows + cols[None, :], mask=in_bounds, other=0) != 0)
            s = tl.where(keep, s * qk_scale, float("-inf"))  # scaled first: -inf * a zero scale is NaN
            scale = 1.0
        else:  # the row max of the unscaled scores, then scaled (qk_scale >= 0): one FMA a score, no multiply
            scale = qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s * scale - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(desc_v, v_base, b, kvh, start_n, offs_n, offs_d, Sk, stride_v_s,
                     HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Per program: BLOCK_M query rows of one (batch, q head); loop over the keys it can see.
#   s_ij  = (q_i . k_j) * scale * log2(e)                     base-2 logits
#   m_i   = max(m_i, max_j s_ij)                              running row max
#   l_i   = l_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i)       running denominator
#   acc_i = acc_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i) v_j
#   o_i   = acc_i / l_i (0 when l_i = 0),  lse_i = (m_i + log2 l_i) * ln 2
# Causal, bottom-right: key j is visible to query i iff j <= i + (Sk - Sq). Key blocks that every
# row of the tile sees in full run unmasked; only blocks crossing the diagonal or the end of the
# keys are masked, and blocks past the last visible key are skipped. With a user mask, key j is
# also hidden from query i where mask[b, h, i, j] is 0, and every block is masked.
@triton.jit(do_not_specialize=["seq_bucket", "short_q", "tma"])
def _attn_fwd_kernel(
    q_ptr,  # (B, Hq, Sq, D), stride(-1) == 1
    k_ptr,  # (B, Hkv, Sk, D), stride(-1) == 1
    v_ptr,  # (B, Hkv, Sk, D), stride(-1) == 1
    o_ptr,  # (B, Hq, Sq, D), stride(-1) == 1: the output
    lse_ptr,  # (B, Hq, Sq) fp32 contiguous: written only when WRITE_LSE
    mask_ptr,  # (B, Hq, Sq, Sk) uint8, stride(-1) == 1, 0 = hidden (strides 0 broadcast): read when HAS_MASK
    desc_q, desc_k, desc_v, desc_o,  # TMA descriptors of q, k, v, o (blocks [1, 1, rows, BLOCK_D]) when USE_TMA
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_s,
    stride_mask_b, stride_mask_h, stride_mask_q,
    Hq, Sq, Sk, qk_scale,
    group,  # Hq // Hkv: query head h reads KV head h // group
    seq_bucket,  # unused by the kernel: part of the autotuning key
    short_q,  # unused by the kernel: part of the autotuning key (1 when Sq fits the smallest BLOCK_M)
    tma,  # unused by the kernel: part of the autotuning key (which configs may use TMA)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1D grid, query blocks of one head adjacent (they share its K/V in L2). Under a causal mask
    # the last query blocks see the most keys: launch them first.
    num_m = tl.cdiv(Sq, BLOCK_M)
    bh = tl.program_id(0) // num_m
    start_m = num_m - 1 - tl.program_id(0) % num_m
    b32, h32 = bh // Hq, bh % Hq  # int32 coordinates for TMA
    kvh32 = h32 // group
    b, h, kvh = b32.to(tl.int64), h32.to(tl.int64), kvh32.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]  # Sq * stride may pass 2^31

    if USE_TMA:
        q = desc_q.load([b32, h32, start_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = q_ptr + b * stride_q_b + h * stride_q_h + rows * stride_q_s + offs_d[None, :]
        q = _load_rows(q_ptrs, offs_m, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + b * stride_k_b + kvh * stride_k_h
    v_base = v_ptr + b * stride_v_b + kvh * stride_v_h
    mask_rows = mask_ptr + b * stride_mask_b + h * stride_mask_h + rows * stride_mask_q

    # Keys [0, full_end) are seen by every row of the tile; keys [full_end, hi) need masks.
    diag = Sk - Sq
    if IS_CAUSAL:
        last_row = tl.minimum(start_m * BLOCK_M + BLOCK_M, Sq) - 1
        hi = tl.minimum(tl.maximum(last_row + diag + 1, 0), Sk)
        full_end = tl.minimum(tl.maximum(start_m * BLOCK_M + diag + 1, 0), hi)
    else:
        hi = Sk
        full_end = Sk
    full_end = (full_end // BLOCK_N) * BLOCK_N
    if HAS_MASK:
        full_end = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, desc_k, desc_v, b32, kvh32, k_base, v_base, mask_rows,
                                offs_m, offs_n, offs_d, 0, full_end, Sq, Sk, diag, qk_scale, stride_k_s,
                                stride_v_s, HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, HAS_MASK, USE_TMA,
                                DOT_PRECISION)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, desc_k, desc_v, b32, kvh32, k_base, v_base, mask_rows,
                                offs_m, offs_n, offs_d, full_end, hi, Sq, Sk, diag, qk_scale, stride_k_s,
                                stride_v_s, HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_MASK, USE_TMA,
                                DOT_PRECISION)

    # A row that saw no key is 0, even where a zero weight met a NaN in v (0 * NaN); a NaN l stays NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_safe[:, None])
    out = out.to(o_ptr.dtype.element_ty)
    if USE_TMA:  # the descriptor's bounds clip rows past Sq and columns past HEAD_DIM
        desc_o.store([b32, h32, start_m * BLOCK_M, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        o_ptrs = o_ptr + b * stride_o_b + h * stride_o_h + rows * stride_o_s + offs_d[None, :]
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + (b * Hq + h) * Sq + offs_m, lse, mask=offs_m < Sq)


# ----------------------------------------------------------------------------- launcher

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per padded head dim, checked offline
# (tests/test_attention.py compiles them for sm_80/sm_90). All fit sm_90's shared memory; on
# sm_90 the fp16/bf16 ones for D <= 128 do not spill registers and a few D=256 ones spill a few
# bytes (more with a mask); on sm_80 the D=256 ones (and a few 128x128 tiles) spill a little, and
# fp32's tf32x3 tiles for D >= 128 spill on both (fp32 is not a target dtype). A config too large for a smaller GPU fails to launch and the autotuner skips it.
# fp32 tiles are twice the bytes and tf32x3 dots triple the operands: smaller tiles.
# Ordered by the H200 measurements of scripts/gpu-probe.py (bf16, causal, device time under graph
# replay, 2026-11-28), fastest first, so that the leading _TMA_CANDIDATES are also tried with TMA.
# D64 (B16 H12 S1024 / B4 H12 S4096): (64, 64, 4, 3) 93.5 / 285.5 us with TMA, 95.1 / 292.8
# without; (64, 128, 4, 3) 106.5 / 283.9 with TMA; (128, 64, 4, 3) 101.7 / 310.3 with TMA;
# (128, 64, 8, 2) 190.6 / 583.1 without TMA. D128 (B4 H16 S4096): (64, 64, 4, 3) 577.5 with TMA,
# 712.9 without; (128, 128, 8, 3) 630.2 / 670.3; (128, 64, 8, 3) 676.0 / 760.1; (128, 64, 8, 2)
# 851.3 / 987.3. (SDPA's cuDNN backend: 82.6, 255.4 and 529.6 us on the same shapes.)
_TUNING = {
    64: [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
         (128, 32, 8, 3), (64, 64, 8, 4)],
    128: [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3),
          (64, 128, 8, 2), (128, 64, 8, 2)],
    256: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3)],
}
_TUNING_FP32 = {
    64: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 2)],
    128: [(16, 16, 4, 2), (32, 16, 4, 2), (32, 32, 4, 1), (64, 16, 4, 1)],
    256: [(16, 16, 4, 2), (32, 16, 4, 2)],
}
_TMA_CANDIDATES = 3  # the leading fp16/bf16 table entries also tried with TMA loads on sm_90+
TMA_OFF, TMA_AUTO, TMA_ONLY = 0, 1, 2  # the kernel's `tma` key: which configs may run (see _tma_mode)


def _set_block_shapes(nargs):
    """Config pre-hook: the TMA descriptors' blocks follow the config's tile rows."""
    for name, rows in (("desc_q", "BLOCK_M"), ("desc_o", "BLOCK_M"), ("desc_k", "BLOCK_N"), ("desc_v", "BLOCK_N")):
        nargs[name].block_shape = [1, 1, nargs[rows], nargs["BLOCK_D"]]


def _make_configs():
    """Every tile of the tables three ways: by pointers without descriptors (no hook, so its
    tuning result can be cached on disk), and, for calls that pass descriptors, by pointers or by
    TMA, with the hook that sizes the descriptors' blocks."""
    tiles = sorted({c for tables in (_TUNING, _TUNING_FP32) for t in tables.values() for c in t})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": use_tma}, num_warps=w, num_stages=st, pre_hook=hook)
            for m, n, w, st in tiles
            for use_tma, hook in ((False, None), (False, _set_block_shapes), (True, _set_block_shapes))]


_CONFIGS = _make_configs()


def _table(block_d: int, fp32: bool) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for a padded head dim."""
    return (_TUNING_FP32 if fp32 else _TUNING)[max(64, block_d)]


def _fixed_config(block_d: int, fp32: bool) -> tuple[int, int, int, int]:
    """The first candidate with the smallest BLOCK_M: for short sequences, without autotuning."""
    table = _table(block_d, fp32)
    return next(c for c in table if c[0] == min(m for m, *_ in table))


def _short_q(Sq: int, block_d: int, fp32: bool) -> int:
    """1 when the queries fit one block of the table's smallest BLOCK_M, else 0."""
    return int(Sq <= min(m for m, *_ in _table(block_d, fp32)))


def _prune_configs(configs, named_args, **kwargs):
    """Keep the candidates for this head dim and dtype; for short queries, the smallest BLOCK_M.
    Everything read here is in the autotuning key, so the tuned choice never depends on which
    shape of a key came first."""
    table = _table(kwargs["BLOCK_D"], named_args["q_ptr"].dtype == torch.float32)
    tma = named_args["tma"]

    def wanted(c):
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if tile not in table or (c.pre_hook is None) != (tma == TMA_OFF):
            return False
        if c.kwargs["USE_TMA"]:
            return tma == TMA_ONLY or (tma == TMA_AUTO and tile in table[:_TMA_CANDIDATES])
        return tma != TMA_ONLY

    keep = [c for c in configs if wanted(c)]
    smallest = min(c.kwargs["BLOCK_M"] for c in keep)
    short = [c for c in keep if c.kwargs["BLOCK_M"] == smallest]
    return short if named_args["short_q"] else keep


_attn_fwd_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "seq_bucket", "short_q", "tma"],  # Triton adds the tensor dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd_kernel)
_BEST = {}  # tune key -> the autotuner's choice (BLOCK_M, BLOCK_N, warps, stages, use_tma); later calls launch it
_TMA_FAILED = set()  # the devices (index) where a launch with TMA candidates failed: pointer loads there


def _autotune(key: tuple) -> bool:
    """Whether to launch through the autotuner: yes, unless `key` has not been tuned yet and the
    current stream is being captured into a CUDA graph (timing syncs the host, which a capture
    cannot contain); then the fixed config runs instead, with a warning."""
    if key in _BEST or not torch.cuda.is_current_stream_capturing():
        return True  # the launcher records the choice in _BEST once the tuned launch went through
    warnings.warn(
        f"fastgpt attention: the Triton kernel is not autotuned yet for {key}, and autotuning cannot run "
        "during CUDA graph capture; the capture uses a fixed config. Call attention once with this "
        "shape before capturing for the tuned one.", stacklevel=3)
    return False


def _tma_mode(tma: bool | None, *tensors: torch.Tensor) -> int:
    """Which loads the kernel may use for these tensors: TMA_OFF, TMA_AUTO (the autotuner tries
    both), TMA_ONLY. tma=None: AUTO for fp16/bf16 on an sm_90+ GPU when TMA can address the
    tensors (16-byte aligned base and strides), else OFF. True: ONLY (tests; the Triton
    interpreter runs it on CPU tensors), or a ValueError when TMA cannot address them."""
    q = tensors[0]
    addressable = all(t.data_ptr() % 16 == 0 and all(0 < st * t.element_size() < 2**40 and st * t.element_size() % 16 == 0
                                                      for st in t.stride()[:-1]) for t in tensors)
    if tma is None:
        gpu_ok = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9 and q.device.index not in _TMA_FAILED
        return TMA_AUTO if addressable and gpu_ok and q.dtype != torch.float32 else TMA_OFF
    if tma and not addressable:
        raise ValueError("tma=True needs q, k, v with 16-byte aligned data pointers and strides (in bytes)")
    if tma and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        raise ValueError("tma=True needs an sm_90+ GPU (Hopper or newer)")
    return TMA_ONLY if tma else TMA_OFF


def _descriptors(tma: int, block_d: int, *tensors: torch.Tensor):
    """Host TMA descriptors of (B, H, S, D) tensors, or Nones under TMA_OFF. Their blocks are
    [1, 1, rows, block_d]; rows is set per config (_set_block_shapes)."""
    if tma == TMA_OFF:
        return (None,) * len(tensors)
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d]) for t in tensors)


def attention(q, k, v, *, causal: bool, scale: float, return_lse: bool = False, mask=None, tma: bool | None = None):
    """softmax(q k^T * scale [+ causal mask] [+ mask]) v, the Triton forward.

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D): fp16, bf16 or fp32, one dtype, stride(-1) == 1, any
    other strides, Hq % Hkv == 0, 1 <= D <= 256. Causal masks align bottom-right (query i sees
    keys j <= i + Sk - Sq). mask: None, or bool (B, Hq, Sq, Sk) with stride(-1) == 1 (an expanded
    view is fine), False hiding key j from query i. Returns the output (B, Hq, Sq, D) in q.dtype,
    contiguous; with return_lse, an AttentionOutput(out, lse) with lse (B, Hq, Sq) fp32 (natural log).
    tma: None lets the autotuner try TMA loads where the GPU and the tensors allow (see
    _tma_mode); True forces them, False forbids them. Should an autotuned launch with TMA
    candidates fail on the host while the same call with pointer loads works (TMA has not run on
    a GPU here yet), that GPU keeps to pointer loads for the rest of the process, with a warning.
    (A fault on the device would surface later and leave the CUDA context unusable: no retry.)

    On the GPU, max(Sq, Sk) > 256 autotunes on the first call with each new key (head dim,
    causal, dtype, length bucket): make that call before capturing a CUDA graph. A capture that
    meets an untuned key runs a fixed config and warns.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    # K/V rows within a block are 32-bit offsets (the block's first row is 64-bit): a view whose
    # row stride would overflow them spans > 2^31 elements, and is copied (its stride becomes D).
    k, v = (t.contiguous() if t.stride(2) * min(Sk, _MAX_BLOCK_N) >= 2**31 else t for t in (k, v))
    if scale < 0:  # (-q) k^T * -scale, exactly: the kernel's unmasked blocks need a scale >= 0 (_attn_inner)
        q, scale = -q, -scale
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else out
    _launch(q, k, v, out, lse, mask, bool(causal), scale, return_lse, _tma_mode(tma, q, k, v, out))
    return AttentionOutput(out, lse) if return_lse else out


def _use_autotuner(q: torch.Tensor, Sq: int, Sk: int) -> bool:
    """Long problems on a GPU go through the autotuner; short ones are launch-bound."""
    return q.is_cuda and max(Sq, Sk) > _TUNE_MIN_LEN


def _launch_tuned(grid, args, meta, tma_mode: int, without_tma, device_index) -> bool:
    """Launch through the autotuner; whether that went through. Under TMA_AUTO, a failure on the
    host (a descriptor the driver refuses, a TMA config's launch) that the same call without TMA
    candidates (without_tma()) does not have turns TMA off on that GPU, with a warning; if that
    call fails too, TMA was not the cause and the first error is raised."""
    try:
        _attn_fwd_tuned[grid](*args, **meta)
        return True
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if tma_mode != TMA_AUTO:
            raise
        try:
            without_tma()
        except Exception:
            raise exc from None
        _TMA_FAILED.add(device_index)
        warnings.warn(f"fastgpt attention: launching the Triton kernel with TMA candidates failed on this GPU "
                      f"({type(exc).__name__}: {exc}) while pointer loads work; using those from now on", stacklevel=4)
        return False


class _Call(NamedTuple):
    """One attention call's tensors and settings, as the launches below take them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    return_lse: bool
    block_d: int
    seq_bucket: int
    short_q: int
    tma_mode: int


def _launch(q, k, v, out, lse, mask, causal: bool, scale: float, return_lse: bool, tma_mode: int) -> None:
    """One launch of the kernel: through the autotuner the first time a long problem's key is met
    on a GPU, then straight with the config it chose (the autotuner's key and cache lookups, and
    the TMA descriptors of a config that loads by pointers, cost host time on every call); a
    fixed config for short problems, on CPU tensors, and for a key first met during a capture."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    fp32 = q.dtype == torch.float32
    block_d = max(16, next_power_of_2(D))
    seq_bucket, short_q = min(next_power_of_2(max(Sq, Sk)), 16384), _short_q(Sq, block_d, fp32)
    tune_key = (D, causal, mask is not None, seq_bucket, short_q, tma_mode, q.dtype, return_lse)
    tuned = _use_autotuner(q, Sq, Sk) and _autotune(tune_key)
    call = _Call(q, k, v, out, lse, mask, causal, scale, return_lse, block_d, seq_bucket, short_q, tma_mode)
    if tuned and tune_key not in _BEST:
        grid = lambda cfg: (cdiv(Sq, cfg["BLOCK_M"]) * B * Hq,)  # noqa: E731
        args, meta = _arguments(call, _descriptors(tma_mode, block_d, q, k, v, out))
        without_tma = lambda: _launch(q, k, v, out, lse, mask, causal, scale, return_lse, TMA_OFF)  # noqa: E731
        if _launch_tuned(grid, args, meta, tma_mode, without_tma, q.device.index):
            best = _attn_fwd_tuned.best_config
            _BEST[tune_key] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages,
                               best.kwargs["USE_TMA"])  # fmt: skip
            # The direct launch's kernel (without descriptors where the config loads by pointers)
            # compiles here, where tuning has synchronised anyway: never inside a graph capture.
            _launch_direct(call, _BEST[tune_key])
        return
    if tuned:
        config = _BEST[tune_key]
    else:
        config = (*(_fixed_config(block_d, fp32) if q.is_cuda else _INTERPRETER_CONFIG), tma_mode == TMA_ONLY)
    _launch_direct(call, config)


def _arguments(c: _Call, descs: tuple):
    """The kernel's positional arguments, and its constexpr keywords other than the config's."""
    q, k, v, out = c.q, c.k, c.v, c.out
    Hq, Sq = q.shape[1], q.shape[2]
    Hkv, Sk = k.shape[1], k.shape[2]
    has_mask = c.mask is not None
    mask_u8 = c.mask.view(torch.uint8) if has_mask else out  # unread without a mask
    mask_strides = mask_u8.stride()[:3] if has_mask else (0, 0, 0)
    args = (q, k, v, out, c.lse, mask_u8, *descs, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *mask_strides, Hq, Sq, Sk, c.scale * math.log2(math.e), Hq // Hkv, c.seq_bucket,
            c.short_q, c.tma_mode)  # fmt: skip
    meta = dict(HEAD_DIM=q.shape[3], BLOCK_D=c.block_d, IS_CAUSAL=c.causal, HAS_MASK=has_mask,
                WRITE_LSE=c.return_lse, DOT_PRECISION=_FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32")
    return args, meta


def _launch_direct(c: _Call, config: tuple) -> None:
    """_attn_fwd_kernel under config = (BLOCK_M, BLOCK_N, warps, stages, use_tma), without the
    autotuner; TMA descriptors only for a TMA config."""
    block_m, block_n, warps, stages, use_tma = config
    descs = _descriptors(c.tma_mode if use_tma else TMA_OFF, c.block_d, c.q, c.k, c.v, c.out)
    if use_tma:
        _set_block_shapes(dict(zip(("desc_q", "desc_k", "desc_v", "desc_o"), descs), BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_D=c.block_d))
    args, meta = _arguments(c, descs)
    B, Hq, Sq = c.q.shape[:3]
    _attn_fwd_kernel[(cdiv(Sq, block_m) * B * Hq,)](
        *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma, num_warps=warps, num_stages=stages)
