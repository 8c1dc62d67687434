"""A decode step's bookkeeping after the sampler, in one Triton launch (fastgpt/decoder.py's
Decoder.emit): what is otherwise 4 small PyTorch kernels (8 with eos ids), each a launch of a
few microseconds in a step that is launch-bound at small batches.

Per row b, with nxt the sampled tokens and s = step[0]:
    nxt_b = pad if finished_b else nxt_b          (with eos ids)
    finished_b |= nxt_b in eos                    (with eos ids)
    out[b, s] = nxt_b;  tok_b = nxt_b;  pos_b += 1;  seqlens_b = pos_b + 1 (int32: the next step's)
and step[0] = s + 1 once every row has read s.

One program; each row is owned by one thread (blocks of at least 32 rows on one warp, so no
element is replicated across threads and no read-modify-write races with another thread's).

greedy_advance does the same for an all-greedy step straight from the logits, in one launch
instead of three (NaN-cleaning, argmax, then the above): programs over (vocabulary block, row
block) pairs each fold their blocks' maxima into best (B,) by atomic max over packed int64 entries
(the samplers' order-preserving key of the logit << 32 | V - 1 - col: the first index wins
ties, as argmax's),
and the last program to finish (a counter, acquire-release) reads them, resets best and the
counter for the next call, and does the bookkeeping. The first argmax of the logits with NaN as
-inf: reference.greedy's token, whatever order the programs run in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt._backends import launch_pdl
from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sampling.common import _key
from fastgpt.kernels.sizes import cdiv, next_power_of_2

MIN_BLOCK = 32  # rows per step: one warp, one row per thread at least
GREEDY_BLOCK_V = 1024  # greedy_advance: logits per row a program takes
GREEDY_BLOCK_R = 4  # ... and rows
GREEDY_WARPS = 4  # (its bookkeeping takes blocks of at least one row a thread, as advance's)
NO_ENTRY = tl.constexpr(-(2**63))  # best's value between calls, the smallest int64: below every packed entry


@triton.jit
def _bookkeeping(nxt, rows, ok, out_ptr, step, tok_ptr, pos_ptr, seqlens_ptr, finished_ptr, pad_ptr, eos_ptr, E,
                 stride_out, HAS_EOS: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """One block of rows: pad for finished rows, the eos flags, out's column step, tok, pos and seqlens."""
    if HAS_EOS:
        done = tl.load(finished_ptr + rows, mask=ok, other=0) != 0
        nxt = tl.where(done, tl.load(pad_ptr), nxt)
        eos = tl.load(eos_ptr + tl.arange(0, BLOCK_E), mask=tl.arange(0, BLOCK_E) < E, other=-1)
        hit = tl.max((nxt[:, None] == eos[None, :]).to(tl.int32), axis=1) != 0
        tl.store(finished_ptr + rows, (done | hit).to(tl.uint8), mask=ok)
    tl.store(out_ptr + rows.to(tl.int64) * stride_out + step, nxt, mask=ok)
    tl.store(tok_ptr + rows, nxt, mask=ok)
    pos = tl.load(pos_ptr + rows, mask=ok, other=0) + 1
    tl.store(pos_ptr + rows, pos, mask=ok)
    tl.store(seqlens_ptr + rows, (pos + 1).to(tl.int32), mask=ok)


@triton.jit
def _advance_kernel(
    nxt_ptr,  # (B,) int64 sampled tokens
    out_ptr,  # (B, W) int64, row stride stride_out
    step_ptr,  # (1,) int64: the column of out to write, then advanced
    tok_ptr,  # (B,) int64: the next step's input
    pos_ptr,  # (B,) int64: positions, advanced
    seqlens_ptr,  # (B,) int32: the next decode step's cache lengths, pos + 1
    finished_ptr,  # (B,) bool (as uint8): rows that emitted an eos; read and written when HAS_EOS
    pad_ptr,  # (1,) int64: what finished rows emit, when HAS_EOS
    eos_ptr,  # (E,) int64 eos ids (-1 in unused slots), when HAS_EOS
    B, E, stride_out,
    HAS_EOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _wait_for_previous_grid(PDL)
    step = tl.load(step_ptr)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        nxt = tl.load(nxt_ptr + rows, mask=ok, other=0)
        _bookkeeping(nxt, rows, ok, out_ptr, step, tok_ptr, pos_ptr, seqlens_ptr, finished_ptr, pad_ptr, eos_ptr, E,
                     stride_out, HAS_EOS, BLOCK_E)  # fmt: skip
    tl.debug_barrier()  # every thread has read step before it moves on
    tl.store(step_ptr, step + 1)


@triton.jit
def _greedy_advance_kernel(
    logits_ptr,  # (B, V) fp32/bf16/fp16, row stride stride_logits, unit column stride
    best_ptr,  # (B,) int64: NO_ENTRY between calls; the packed maxima during one
    count_ptr,  # (1,) int32: 0 between calls; the programs done during one
    out_ptr, step_ptr, tok_ptr, pos_ptr, seqlens_ptr, finished_ptr, pad_ptr, eos_ptr,  # as _advance_kernel's
    B, V, E, stride_logits, stride_out,
    HAS_EOS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _wait_for_previous_grid(PDL)
    blocks_v = tl.cdiv(V, BLOCK_V)  # program p: vocabulary block p % blocks_v of row block p // blocks_v
    cols = tl.program_id(0) % blocks_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mine = tl.program_id(0) // blocks_v * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's rows
    inside = (mine < B)[:, None] & (cols < V)[None, :]
    x = tl.load(logits_ptr + mine.to(tl.int64)[:, None] * stride_logits + cols[None, :], mask=inside,
                other=float("-inf")).to(tl.float32)  # fmt: skip
    key = _key(tl.where(x != x, float("-inf"), x))  # ordered as the floats; -0.0 ties with 0.0
    packed = tl.where(inside, (key.to(tl.int64) << 32) | (V - 1 - cols).to(tl.int64)[None, :], NO_ENTRY)
    tl.atomic_max(best_ptr + mine, tl.max(packed, axis=1), mask=mine < B)
    tl.debug_barrier()  # every thread's maxima are in before the count says so (release)
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        step = tl.load(step_ptr)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            ok = rows < B
            nxt = V - 1 - (tl.atomic_xchg(best_ptr + rows, NO_ENTRY, mask=ok) & 0xFFFFFFFF)
            _bookkeeping(nxt, rows, ok, out_ptr, step, tok_ptr, pos_ptr, seqlens_ptr, finished_ptr, pad_ptr, eos_ptr,
                         E, stride_out, HAS_EOS, BLOCK_E)  # fmt: skip
        tl.atomic_xchg(count_ptr, 0)
        tl.debug_barrier()  # every thread has read step before it moves on
        tl.store(step_ptr, step + 1)


def _row_block(B: int, num_warps: int = 1) -> int:
    """Rows per step of the bookkeeping: at least one a thread (no element held by two threads)."""
    return max(MIN_BLOCK * num_warps, min(1024, next_power_of_2(B)))


def advance(nxt, out, step, tok, pos, seqlens, finished, pad, eos, *, has_eos: bool) -> None:
    """Decoder.emit's bookkeeping in one launch (see the module docstring). All tensors on one
    device: nxt, tok, pos (B,) int64 contiguous; seqlens (B,) int32 contiguous; out (B, W) int64
    with unit column stride; step, pad (1,) int64; finished (B,) bool contiguous; eos (E,) int64."""
    B, E = nxt.shape[0], eos.shape[0]
    pdl = launch_pdl(nxt.device)
    _advance_kernel[(1,)](
        nxt, out, step, tok, pos, seqlens, finished.view(torch.uint8), pad, eos, B, E, out.stride(0), HAS_EOS=has_eos,
        BLOCK_B=_row_block(B), BLOCK_E=max(1, next_power_of_2(E)), PDL=pdl, num_warps=1, launch_pdl=pdl,
    )  # fmt: skip


def greedy_advance(logits, best, count, out, step, tok, pos, seqlens, finished, pad, eos, *, has_eos: bool) -> None:
    """advance(first argmax of logits with NaN as -inf, ...) in one launch. logits (B, V) with a
    unit column stride; best (B,) int64 filled with NO_ENTRY and count (1,) int32 zero: the
    caller's, kept for its next calls (each call leaves them so), used by one stream at a time.
    The rest as for advance."""
    B, V = logits.shape
    E = eos.shape[0]
    grid = (cdiv(V, GREEDY_BLOCK_V) * cdiv(B, GREEDY_BLOCK_R),)  # one axis: a second stops at 65535 blocks
    pdl = launch_pdl(logits.device)
    _greedy_advance_kernel[grid](
        logits, best, count, out, step, tok, pos, seqlens, finished.view(torch.uint8), pad, eos, B, V, E,
        logits.stride(0), out.stride(0), HAS_EOS=has_eos, BLOCK_V=GREEDY_BLOCK_V, BLOCK_R=GREEDY_BLOCK_R,
        BLOCK_B=_row_block(B, GREEDY_WARPS), BLOCK_E=max(1, next_power_of_2(E)), PDL=pdl,
        num_warps=GREEDY_WARPS, launch_pdl=pdl,
    )  # fmt: skip
