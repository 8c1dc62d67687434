"""Is a candidate right? Checked against fastgpt.reference before it may be timed.

A check returns None when the output is acceptable, else a one-line reason: the candidate is
then reported FAILED and never timed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    """How close an output must be to the fp32 reference: |a - e| <= atol + rtol * |e| for every
    element, and ||a - e|| / ||e|| <= norm over the whole tensor."""

    atol: float
    rtol: float
    norm: float


# The project's one per-dtype tolerance table (DESIGN: Testing): the benchmark checks and the
# tests (tests/helpers.py) both read it. Keyed by the output dtype. fp32 is tight because
# fastgpt's fp32 paths keep fp32 accuracy (Triton's fp32 dots are tf32x3, not TF32; the CUDA
# backend's attention takes no fp32); fp16 and bf16 allow their 10- and 7-bit mantissas.
TOLERANCE = {
    torch.float32: Tolerance(atol=2e-4, rtol=2e-4, norm=2e-4),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, norm=3e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2, norm=1.6e-2),
}


def compare(actual, expected) -> str | None:
    """Elementwise and whole-tensor closeness of an output (or tuple of outputs) to the reference.

    Fails on a shape mismatch, a non-finite value where the reference is finite, an element
    outside atol + rtol * |expected|, or ||actual - expected|| / ||expected|| above the bound.
    The elementwise test catches a few wrong rows that the norm would average away.
    """
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"expected {len(expected)} outputs, got {type(actual).__name__}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            reason = compare(a, e)
            if reason:
                return f"output {i}: {reason}"
        return None
    if not isinstance(actual, torch.Tensor):
        return f"expected a tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    atol, rtol, rel_bound = TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32])
    a, e = actual.detach().double(), expected.detach().double()
    bad_finite = ~torch.isfinite(a) & torch.isfinite(e)
    if bool(bad_finite.any()):
        return f"{int(bad_finite.sum())} non-finite values where the reference is finite"
    err = (a - e).abs()
    outside = err > atol + rtol * e.abs()
    if bool(outside.any()):
        return f"{int(outside.sum())} elements out of tolerance, max abs error {float(err.max()):.3g}"
    rel = float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-30))
    if rel > rel_bound:
        return f"relative error {rel:.3g} > {rel_bound:g}"
    return None


def ids_in_kept_set(ids, kept: torch.Tensor) -> str | None:
    """Sampled ids (B,) or (B, 1): each in [0, V) and allowed by `kept` (B, V) bool."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        return f"expected an integer tensor of ids, got {getattr(ids, 'dtype', type(ids).__name__)}"
    B, V = kept.shape
    ids = ids.reshape(-1).long()
    if ids.numel() != B:
        return f"expected {B} ids, got {ids.numel()}"
    if bool(((ids < 0) | (ids >= V)).any()):
        return f"id outside [0, {V}): {ids.tolist()[:8]}"
    allowed = kept.gather(1, ids[:, None]).squeeze(1)
    if not bool(allowed.all()):
        return f"{int((~allowed).sum())} of {B} ids outside the kept set"
    return None


def ids_equal(ids, expected: torch.Tensor) -> str | None:
    """Exact equality of ids (greedy decoding) with the reference's (B,)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        return f"expected an integer tensor of ids, got {getattr(ids, 'dtype', type(ids).__name__)}"
    ids = ids.reshape(-1).long()
    if ids.shape != expected.shape:
        return f"expected {expected.numel()} ids, got {ids.numel()}"
    wrong = ids != expected
    if bool(wrong.any()):
        return f"{int(wrong.sum())} of {ids.numel()} ids differ from the reference argmax"
    return None
