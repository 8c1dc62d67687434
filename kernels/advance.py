"""A decode step's bookkeeping after the sampler, in one Triton launch (fastgpt/generate.py's
Decoder.emit): what is otherwise 4 small PyTorch kernels (8 with eos ids), each a launch of a
few microseconds in a step that is launch-bound at small batches.

Per row b, with nxt the sampled tokens and s = step[0]:
    nxt_b = pad if finished_b else nxt_b          (with eos ids)
    finished_b |= nxt_b in eos                    (with eos ids)
    out[b, s] = nxt_b;  tok_b = nxt_b;  pos_b += 1
and step[0] = s + 1 once every row has read s.

One program; each row is owned by one thread (blocks of at least 32 rows on one warp, so no
element is replicated across threads and no read-modify-write races with another thread's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_BLOCK = 32  # rows per step: one warp, one row per thread at least


@triton.jit
def _advance_kernel(
    nxt_ptr,  # (B,) int64 sampled tokens
    out_ptr,  # (B, W) int64, row stride stride_out
    step_ptr,  # (1,) int64: the column of out to write, then advanced
    tok_ptr,  # (B,) int64: the next step's input
    pos_ptr,  # (B,) int64: positions, advanced
    finished_ptr,  # (B,) bool (as uint8): rows that emitted an eos; read and written when HAS_EOS
    pad_ptr,  # (1,) int64: what finished rows emit, when HAS_EOS
    eos_ptr,  # (E,) int64 eos ids (-1 in unused slots), when HAS_EOS
    B, E, stride_out,
    HAS_EOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    step = tl.load(step_ptr)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        nxt = tl.load(nxt_ptr + rows, mask=ok, other=0)
        if HAS_EOS:
            done = tl.load(finished_ptr + rows, mask=ok, other=0) != 0
            nxt = tl.where(done, tl.load(pad_ptr), nxt)
            eos = tl.load(eos_ptr + tl.arange(0, BLOCK_E), mask=tl.arange(0, BLOCK_E) < E, other=-1)
            hit = tl.max((nxt[:, None] == eos[None, :]).to(tl.int32), axis=1) != 0
            tl.store(finished_ptr + rows, (done | hit).to(tl.uint8), mask=ok)
        tl.store(out_ptr + rows.to(tl.int64) * stride_out + step, nxt, mask=ok)
        tl.store(tok_ptr + rows, nxt, mask=ok)
        tl.store(pos_ptr + rows, tl.load(pos_ptr + rows, mask=ok, other=0) + 1, mask=ok)
    tl.debug_barrier()  # every thread has read step before it moves on
    tl.store(step_ptr, step + 1)


def advance(nxt, out, step, tok, pos, finished, pad, eos, *, has_eos: bool) -> None:
    """Decoder.emit's bookkeeping in one launch (see the module docstring). All tensors on one
    device: nxt, tok, pos (B,) int64 contiguous; out (B, W) int64 with unit column stride; step,
    pad (1,) int64; finished (B,) bool contiguous; eos (E,) int64."""
    B, E = nxt.shape[0], eos.shape[0]
    _advance_kernel[(1,)](
        nxt, out, step, tok, pos, finished.view(torch.uint8), pad, eos, B, E, out.stride(0), HAS_EOS=has_eos,
        BLOCK_B=max(MIN_BLOCK, min(1024, triton.next_power_of_2(B))), BLOCK_E=max(1, triton.next_power_of_2(E)),
        num_warps=1,
    )  # fmt: skip
