"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A GPT-2 decode step at small batch is ~60 dependent launches of a few microseconds each, and
every boundary between two of them costs more than the launch: the next grid's programs are
placed, compute their addresses and only then issue their first loads, while the SMs idle. With
programmatic dependent launch (a launch attribute, `launch_pdl=True` in Triton) the next grid may
start while the previous one still runs, as soon as each of its programs has signalled
(`griddepcontrol.launch_dependents`); it must then wait (`griddepcontrol.wait`: the previous grid
has completed and its writes are visible) before it touches memory that grid writes or reads.

The kernels here do that wait before any load or store of their own, so they see exactly what a
plain launch would: nothing the previous grid writes is read early, nothing it reads is
overwritten, and since each grid waits for the whole of the one before, the order holds along
the chain. Before the wait a program may only ask L2 to prefetch bytes no grid writes during a
step (a matmul's weights): a prefetch is a hint, never a read of a value. So the weights of the
next matmul stream into L2 while the previous kernel finishes.

Each program signals right after its wait, so the grid after it launches once every program of
this one is past its wait: one grid ahead, not a cascade of idle programs holding the SMs.
CUDA graph capture keeps them as programmatic edges (CUDA 12.3 and later; tests/test_pdl.py
replays a captured step on the GPU). Whether a launch goes as a
dependent is fastgpt._backends.launch_pdl's call (sm_90 and later); the kernel's PDL constexpr
must say the same, since the wait is compiled in only with it.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _wait_for_previous_grid(PDL: tl.constexpr):
    """Every program calls this before its first load or store: with PDL, wait until the previous
    grid has completed and its writes are visible, then let the next grid launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs, nbytes):
    """Ask L2 to fetch the nbytes (a multiple of 16) that start at each of ptrs (16-byte aligned):
    a hint that reads no value, so it may run before _wait_for_previous_grid, on bytes no kernel
    writes meanwhile. sm_90 and later."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; // dummy $0",
        "=r,l,r",
        [ptrs, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_l2_once(start, nbytes):
    """Ask L2 for the nbytes (a multiple of 16) from start (16-byte aligned), once a program (from
    its thread 0, where _prefetch_l2 asks from every thread for its own rows): a hint that reads
    no value. sm_90 and later."""
    tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .b32 tid; mov.u32 tid, %tid.x; setp.eq.u32 first, tid, 0; "
        "@first cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [start, nbytes], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip
