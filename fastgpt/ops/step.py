"""fastgpt.ops.step: GPT-2's whole decode step as one launch (a persistent kernel; kernels/step.py).

Not one of the public ops of DESIGN.md: GPT.decode uses it where GPT.persistent_decode is on.
Triton only: it is the fused step (fastgpt.ops.linear and decode attention) in one launch, and
those are its reference.
"""

from __future__ import annotations

import torch

from fastgpt import _backends
from fastgpt.ops import _checks, _dispatch

MAX_ROWS = 8  # kernels/step.py's MAX_ROWS, repeated so that this module imports no Triton
GAVE_UP = 33  # sync[GAVE_UP]: set by a wait that gave up (kernels/step.py's), which nothing zeroes


def sync_entries(n_layer: int, n_head: int) -> int:
    """The int32 entries of decode_step's sync for a model of n_layer layers of n_head heads
    (kernels/step.py's: two 128-byte lines, a line per stage of each layer, one entry per
    (row, head) of MAX_ROWS)."""
    return 64 + 32 * 5 * n_layer + MAX_ROWS * n_head


LAYER_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")  # fmt: skip  (the order of kernels/step.py's table)


def step_weights(layers: list[tuple], head: torch.Tensor):
    """What decode_step takes of a model's weights: `layers` each the 12 tensors named in
    LAYER_WEIGHTS (a GPT-2 block's, as nn.Linear holds them: (out, in)), head lm_head's weight
    (V, C). Checked here, once: shapes, one dtype and device. Returns None where the kernel
    cannot read them (a kind of weight laid out differently in different layers, a tensor not
    16-byte aligned, a strided vector): the caller keeps the step it has. Builds a table of their
    addresses on the device (a copy from the host: make it before a CUDA graph's capture)."""
    from fastgpt.kernels import step as kernel

    _checks.tensor("head", head, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("layers must be a list holding at least one layer's weights")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (list, tuple)) or len(layer) != len(LAYER_WEIGHTS):
            raise ValueError(f"layers[{i}] must be the 12 tensors of LAYER_WEIGHTS, got {type(layer).__name__}"
                             f"{f' of {len(layer)}' if isinstance(layer, (list, tuple)) else ''}")  # fmt: skip
    C = head.shape[1]
    F = _checks.tensor("layers[0] mlp.c_fc.weight", layers[0][8], ndim=2, dtypes=(head.dtype,)).shape[0]
    shapes = ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (F, C), (F,), (C, F), (C,))
    for i, layer in enumerate(layers):
        for name, t, shape in zip(LAYER_WEIGHTS, layer, shapes):
            where = f"layers[{i}] {name}"
            _checks.tensor(where, t, ndim=len(shape), dtypes=(head.dtype,))
            _checks.shape(where, t, shape, f"{shape} for n_embd {C}, MLP width {F}")
            _checks.same_device(**{where: t, "head": head})
    return kernel.step_weights(layers, head)


def still_valid(weights, layers: list[tuple], head: torch.Tensor) -> bool:
    """Whether step_weights' table `weights` still points where `layers` and head are (no
    parameter replaced or moved since)."""
    from fastgpt.kernels import step as kernel

    return kernel.still_valid(weights, layers, head)


def decode_step(tok, pos, seqlens, kv, weights, wte, wpe, ln_f, eps: float, sync) -> torch.Tensor:
    """GPT-2's decode step, M rows of one token each, in one launch: logits (M, V).

    tok (M,) int64: the tokens, 1 <= M <= MAX_ROWS; pos (M,) int64: their positions, which are
    wpe's rows and the cache slots their k and v go to (an id or slot outside the table or the
    cache reads zeros or is not written); seqlens (M,) int32: row m attends to cache positions
    [0, seqlens[m]) (pos + 1), clamped to the cache. kv (n_layer, 2, B, H, S, D), B >= M, unit
    last stride, D a power of two, H D = n_embd: row m's cache is kv[:, :, m]. weights:
    step_weights' (n_layer layers). wte (vocab, C), wpe (positions, C), ln_f (weight, bias) (C,)
    each, eps every LayerNorm's. The MLP's activation is GELU's tanh form (GPT-2's gelu_new).
    sync: int32 zeros (sync_entries(n_layer, H),) on kv's device that the caller keeps and the
    kernel leaves zero; steps sharing them run one at a time (one stream). sync[GAVE_UP] is set
    where one of the kernel's waits gave up, after over a second: never in a correct step (its
    output is then wrong), and left set, so that the waits of every later step over this sync
    give up at once (their outputs wrong too) until the caller reads and zeroes it, as
    fastgpt.generate does after each call. All tensors on one device, in one dtype (fp16, bf16,
    fp32; on a CPU, the interpreter's fp16 and fp32).
    """
    from fastgpt.kernels.step import StepWeights

    _checks.tensor("kv", kv, ndim=6, dtypes=_checks.FLOAT_DTYPES)
    device, dtype = kv.device, kv.dtype
    n_layer, pair, B, H, S, D = kv.shape
    if pair != 2:
        raise ValueError(f"kv must hold k and v side by side, (n_layer, 2, B, H, S, D), got shape {tuple(kv.shape)}")
    if kv.stride(-1) != 1:
        raise ValueError(f"kv must have a unit stride in its last dim, got strides {kv.stride()}")
    _checks.writable("kv", kv)
    if not isinstance(weights, StepWeights) or weights.table.shape[0] != n_layer:
        raise ValueError(f"weights must be step_weights' table of the model's {n_layer} layers (kv.shape[0])")
    if not (isinstance(ln_f, (tuple, list)) and len(ln_f) == 2):
        raise TypeError(f"ln_f must be ln_f's (weight, bias), got {type(ln_f).__name__}")
    head = weights.tensors[-1]
    C = head.shape[1]
    if D & (D - 1) or H * D != C:
        raise ValueError(f"kv's heads (H {H} x D {D}) must have D a power of two and H D = n_embd ({C})")
    M = tok.shape[0] if tok.dim() == 1 else -1
    for name, t, dt in (("tok", tok, torch.int64), ("pos", pos, torch.int64), ("seqlens", seqlens, torch.int32)):
        _checks.tensor(name, t, ndim=1, dtypes=(dt,))
        _checks.same_device(**{name: t, "kv": kv})
    if not 1 <= M <= min(MAX_ROWS, B):
        raise ValueError(f"tok must hold 1 to {min(MAX_ROWS, B)} rows (MAX_ROWS, and kv's batch {B}), got {M}")
    _checks.shape("pos", pos, (M,), "(M,), as tok")
    _checks.shape("seqlens", seqlens, (M,), "(M,), as tok")
    for name, t, ndim in (("wte", wte, 2), ("wpe", wpe, 2), ("ln_f weight", ln_f[0], 1), ("ln_f bias", ln_f[1], 1)):
        _checks.tensor(name, t, ndim=ndim, dtypes=(dtype,))
        shape = (t.shape[0], C) if ndim == 2 else (C,)
        _checks.shape(name, t, shape, f"{'(rows, n_embd)' if ndim == 2 else '(n_embd,)'}")
        _checks.same_device(**{name: t, "kv": kv})
        if ndim == 2 and (C - 1) * t.stride(1) >= 2**31:  # the kernel's offsets within a row are 32-bit
            raise ValueError(f"{name} must have (n_embd - 1) x its column stride below 2^31, got strides {t.stride()}")
    if head.dtype != dtype or head.device != device:
        raise ValueError(f"weights must be in kv's dtype ({dtype}) on its device ({device})")
    _checks.tensor("sync", sync, ndim=1, dtypes=(torch.int32,))
    _checks.same_device(**{"sync": sync, "kv": kv})
    if sync.numel() < sync_entries(n_layer, H) or not sync.is_contiguous():
        raise ValueError(f"sync must be contiguous int32 zeros of at least {sync_entries(n_layer, H)} elements")
    eps = _checks.eps("eps", eps)
    # Raises, saying why, where Triton cannot run (or its interpreter cannot, bf16 on a CPU).
    _backends.resolve("decode_step", "triton", device,
                      lambda name: _checks.interpreter_dtype(kv) or _checks.triton_length("cache lengths", S))
    ln_w, ln_b = (p.contiguous() for p in ln_f)
    args = (tok.contiguous(), pos.contiguous(), seqlens.contiguous(), kv, weights.table, list(weights.tensors),
            list(weights.strides), wte, wpe, ln_w, ln_b, float(eps), sync)  # fmt: skip
    return _dispatch.call(_decode_step_op, _decode_step, *args)


def _decode_step(
    tok: torch.Tensor, pos: torch.Tensor, seqlens: torch.Tensor, kv: torch.Tensor, table: torch.Tensor,
    tensors: list[torch.Tensor], strides: list[int], wte: torch.Tensor, wpe: torch.Tensor, ln_w: torch.Tensor,
    ln_b: torch.Tensor, eps: float, sync: torch.Tensor,
) -> torch.Tensor:
    from fastgpt.kernels import step as kernel

    weights = kernel.StepWeights(table, tuple(strides), tuple(tensors), ())
    return kernel.decode_step(tok, pos, seqlens, kv, weights, wte, wpe, (ln_w, ln_b), eps, sync)


# sync is declared mutated: the kernel leaves its counters zero, but sets GAVE_UP where a wait gave up.
_decode_step_op = torch.library.custom_op("fastgpt::decode_step", _decode_step, mutates_args=("kv", "sync"))


@_decode_step_op.register_fake
def _(tok, pos, seqlens, kv, table, tensors, strides, wte, wpe, ln_w, ln_b, eps, sync):
    return kv.new_empty(tok.shape[0], tensors[-1].shape[0])
