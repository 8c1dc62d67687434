"""Every CUDA op through the public API over boundary cases, for the memcheck build of tests/simt
(AddressSanitizer): run in a process with libasan preloaded, any access a kernel makes past a
tensor it was given, or past one the ops layer allocated for it, is reported on stderr and ends
the process with status 1. tests/test_cuda_memcheck.py runs it; by hand:

    FASTGPT_CUDA_EMULATOR=$(python -m tests.simt.build --asan) LD_PRELOAD=$(g++ -print-file-name=libasan.so) \\
        ASAN_OPTIONS=detect_leaks=0 python -m tests.simt.memcheck_cases [-v] [--only attention]

Each input is a tensor of its own, allocated at exactly its size (torch's CPU allocator asks
malloc for those bytes, and ASan's redzone starts right after them), or a strided view whose last
element is the last of its storage. A case also checks that the kernel was handed those tensors
themselves, not copies the ops layer made of them.

`--backend triton` runs the Triton kernels instead, in Triton's interpreter (TRITON_INTERPRET=1,
whose loads and stores are memcpy calls that ASan checks; no sanitized build, only the preload):
fp32 and fp16, more head dims, and the Triton-only ops (fastgpt.ops.linear, kernels/advance.py's
launchers, each sampling path), at lengths the interpreter runs in about two minutes (with
tests/interpreter.py's shortcuts). tests/test_triton_memcheck.py runs that, in groups of ops.

`--oob layer_norm|sample` instead calls the raw binding (fastgpt_simt._C) with a shape larger than
the tensor it points at, which the ops layer would refuse (with --backend triton: launches the
Triton kernel itself so): the kernel reads past the end, and ASan must say so (the test of the
checker itself).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fastgpt
from fastgpt import _backends
from fastgpt.ops.attention import masked_attention
from fastgpt.ops.decode import decode_step_attention
from fastgpt.ops.linear import linear

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, *HALF)
KERNEL_ENTRIES = ("attention", "decode_attention", "layer_norm", "sample")


@dataclass(frozen=True)
class Target:
    """A backend's share of the cases: its dtypes (the interpreter has no bf16 arithmetic) and
    head dims, and, the interpreter being slow, its longer lengths cut short."""

    backend: str
    floats: tuple  # layer_norm's and sample's dtypes; the last one also takes the strided views
    attention_dtypes: tuple
    head_dims: tuple
    decode_max: int  # decode cases of longer caches are left out
    layer_norm_n: tuple
    vocabs: tuple
    dims_per_case: int  # head dims each attention and decode shape takes (in turn)

    def dims(self, i: int) -> tuple:
        """The head dims of the i-th shape."""
        n = len(self.head_dims)
        return tuple(self.head_dims[(i * self.dims_per_case + j) % n] for j in range(self.dims_per_case))


# layer_norm's N: cuda's warp per row up to 128 vectors, block per row up to 4096, then its looped
# kernel; triton's rows in registers up to 16384 (MAX_FUSED_N), then its chunked kernel.
CUDA = Target("cuda", FLOATS, HALF, (64, 128), 1 << 30, (1, 7, 768, 1024, 1025, 5000, 32768, 40000),
              (1, 3, 1023, 1025, 50257), 2)  # fmt: skip
TRITON = Target("triton", (torch.float32, torch.float16), (torch.float32, torch.float16), (16, 40, 80, 256), 700,
                (1, 7, 768, 1025, 16384, 16385, 40000), (1, 3, 1025), 2)  # fmt: skip


def exact(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    """randn in a tensor allocated alone at exactly its size: its last byte borders the redzone."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return torch.empty(*shape, dtype=dtype).copy_(values)


def ending_view(shape, strides, *, offset=0, dtype=torch.float32, seed=0) -> torch.Tensor:
    """randn seen through `shape` and `strides` (elements), starting `offset` elements into storage
    of its own that ends at the view's last element."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    return exact(offset + span, dtype=dtype, seed=seed).as_strided(shape, strides, offset)


class Checker:
    """Runs the cases for one target: records what its kernels are called with (the cuda
    extension's entry points in this process's module, wrapped; or every interpreted Triton
    launch), so that each case can check that its inputs reached a kernel themselves."""

    def __init__(self, target: Target, ext, verbose: bool):
        self.target, self.backend = target, target.backend
        self.args: list[int] = []
        self.count, self.verbose = 0, verbose
        if ext is None:
            self._record_triton_launches()
        for name in KERNEL_ENTRIES if ext is not None else ():
            setattr(ext, name, self._recording(getattr(ext, name)))

    def _recording(self, entry):
        def call(*args):
            self.args += [a for a in args if isinstance(a, int)]
            return entry(*args)

        return call

    def _record_triton_launches(self) -> None:
        """Patches the interpreter's launch (in this process only) to record its tensors' data pointers."""
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def recording_run(fn, *args, **kwargs):
            self.args += [a.data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            return run(fn, *args, **kwargs)

        InterpretedFunction.run = recording_run

    @contextlib.contextmanager
    def case(self, name: str, *inputs: torch.Tensor):
        """One case, whose body calls an op on `inputs`: each of their data pointers must reach a
        kernel (the ops layer made no copy of it, whose bounds would be checked instead)."""
        self.args.clear()
        start = time.perf_counter()
        yield
        missing = [tuple(t.shape) for t in inputs if t.data_ptr() not in self.args]
        assert not missing, f"{name}: the ops layer copied the inputs of shape {missing}"
        self.count += 1
        if self.verbose:
            print(f"{time.perf_counter() - start:7.2f} s  {name}", flush=True)


# ----------------------------------------------------------------------------- cases

ATTENTION_SHAPES = [  # B, Hq, Hkv, Sq, Sk: lengths off the 64-row tiles, Sq != Sk both ways, GQA
    (1, 1, 1, 1, 1),
    (2, 3, 3, 17, 17),
    (1, 2, 1, 65, 129),
    (1, 4, 2, 129, 65),
    (1, 2, 2, 1, 129),
    (2, 2, 1, 65, 1),
]


def attention_cases(check: Checker):
    backend, view_dtype = check.backend, check.target.attention_dtypes[-1]
    for i, (B, Hq, Hkv, Sq, Sk) in enumerate(ATTENTION_SHAPES):
        for dtype, D, causal in itertools.product(check.target.attention_dtypes, check.target.dims(i), (False, True)):
            q = exact(B, Hq, Sq, D, dtype=dtype)
            k, v = exact(B, Hkv, Sk, D, dtype=dtype, seed=1), exact(B, Hkv, Sk, D, dtype=dtype, seed=2)
            with check.case(f"attention B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} {dtype} causal={causal}", q, k, v):
                _finite(fastgpt.attention(q, k, v, causal=causal, backend=backend))
            if not causal and dtype == check.target.attention_dtypes[0]:  # every row sees a key: a finite lse
                with check.case(f"attention lse B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} {dtype}", q, k, v):
                    _finite(*fastgpt.attention(q, k, v, backend=backend, return_lse=True))
    for S, D in ((17, 128), (65, 64)):  # (B, S, 3, H, D) from a fused projection: v ends its storage
        H = 2
        qkv = ending_view((1, S, 3, H, D), (S * 3 * H * D, 3 * H * D, H * D, D, 1), dtype=view_dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        with check.case(f"attention fused-qkv views S{S} D{D}", q, k, v):
            _finite(fastgpt.attention(q, k, v, causal=True, backend=backend))
    q, kv = exact(3, 4, 33, 64, dtype=torch.float16), exact(1, 2, 70, 64, dtype=torch.float16, seed=1)
    k = kv.expand(3, 2, 70, 64)  # batch stride 0: every row reads the one cache
    with check.case("attention k = v expanded over the batch", q, kv):
        _finite(fastgpt.attention(q, k, k, causal=True, backend=backend))


MASKED_SHAPES = [  # B, Hq, Hkv, Sq, Sk, the mask's (B, Hq) (1: broadcast); Sq 1 takes the decode kernels
    (2, 2, 1, 17, 33, 2, 2),
    (1, 4, 2, 65, 17, 1, 4),
    (2, 6, 2, 1, 70, 2, 6),  # GQA groups of 3 in tiles of 4: the padding head reads the last one's mask
    (2, 4, 2, 1, 129, 1, 1),
    (1, 8, 1, 1, 600, 1, 8),  # a GQA tile of 8 heads, each with its own mask, over KV splits
]


def masked_attention_cases(check: Checker):
    """The kernels' boolean mask, per head or broadcast: some rows see no key."""
    for (B, Hq, Hkv, Sq, Sk, mB, mH), dtype in itertools.product(MASKED_SHAPES, check.target.attention_dtypes):
        D = check.target.head_dims[(Sq + Sk) % len(check.target.head_dims)]
        q = exact(B, Hq, Sq, D, dtype=dtype)
        k, v = exact(B, Hkv, Sk, D, dtype=dtype, seed=1), exact(B, Hkv, Sk, D, dtype=dtype, seed=2)
        mask = exact(mB, mH, Sq, Sk, seed=3) > 0
        mask[..., 0, :] = False
        with check.case(f"masked_attention B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} mask {tuple(mask.shape)} {dtype}",
                        q, k, v, mask):  # fmt: skip
            _finite(masked_attention(q, k, v, mask, backend=check.backend))


DECODE_CASES = [  # B, Hq, Hkv, Smax, cache_seqlens: past Smax, negative, 0; split-KV from 257 keys
    (1, 1, 1, 1, [1]),
    (2, 4, 2, 17, [17, 5]),
    (3, 8, 1, 129, [129, 200, -3]),
    (2, 6, 2, 65, [0, 65]),
    (1, 2, 2, 1025, [1025]),
    (2, 2, 1, 600, [700, 300]),
    (1, 8, 1, 700, [699]),
]


def decode_cases(check: Checker):
    backend, target = check.backend, check.target
    cases = [(c, D) for i, c in enumerate(DECODE_CASES) if c[3] <= target.decode_max for D in target.dims(i)]
    for ((B, Hq, Hkv, Smax, lens), D), dtype in itertools.product(cases, target.attention_dtypes):
        q = exact(B, Hq, 1, D, dtype=dtype)
        k, v = exact(B, Hkv, Smax, D, dtype=dtype, seed=1), exact(B, Hkv, Smax, D, dtype=dtype, seed=2)
        seqlens = torch.tensor(lens, dtype=torch.int32)
        with check.case(f"decode B{B} H{Hq}/{Hkv} Smax{Smax} D{D} lens={lens} {dtype}", q, k, v, seqlens):
            _finite(fastgpt.decode_attention(q, k, v, seqlens, backend=backend))
        if dtype == target.attention_dtypes[0]:  # with the log-sum-exp (-inf for the rows of length <= 0)
            with check.case(f"decode lse B{B} H{Hq}/{Hkv} Smax{Smax} D{D} lens={lens} {dtype}", q, k, v, seqlens):
                _finite_lse(*fastgpt.decode_attention(q, k, v, seqlens, backend=backend, return_lse=True))
        # the splits merged in the same launch, by the last one to finish (and their log-sum-exp)
        counters = torch.zeros(B * Hq, dtype=torch.int32)
        with check.case(f"decode step B{B} H{Hq}/{Hkv} Smax{Smax} D{D} lens={lens} {dtype}", q, k, v, seqlens):
            _finite(decode_step_attention(q, k, v, seqlens, counters, backend=backend))
            _finite_lse(*decode_step_attention(q, k, v, seqlens, counters, backend=backend, return_lse=True))
        assert not counters.any(), "the counters were not left zero"
    for B, S, Hkv, D, lens in ((2, 70, 2, 64, [70, 500]), (1, 300, 1, 128, [300])):
        # (B, S, Hkv, D) caches read as (B, Hkv, S, D): the view's last element ends the storage
        k = exact(B, S, Hkv, D, dtype=torch.float16, seed=1).transpose(1, 2)
        v = exact(B, S, Hkv, D, dtype=torch.float16, seed=2).transpose(1, 2)
        q, seqlens = exact(B, 2 * Hkv, 1, D, dtype=torch.float16), torch.tensor(lens, dtype=torch.int32)
        with check.case(f"decode transposed caches B{B} S{S} D{D} lens={lens}", q, k, v, seqlens):
            _finite(fastgpt.decode_attention(q, k, v, seqlens, backend=backend))


MULTI_QUERY_DECODE_CASES = [  # B, Hq, Hkv, Sq, Smax, cache_seqlens: several queries a row (the last positions)
    (1, 2, 2, 2, 1, [1]),               # Sq > Smax: the first query sees nothing
    (2, 4, 2, 3, 17, [17, 2]),          # GQA 2 x 3 queries: 6 rows in a tile of 8; a length below Sq
    (3, 6, 2, 5, 65, [70, -1, 64]),     # GQA 3 x 5: 15 rows in 2 tiles (the second padded); clamped lengths
    (1, 4, 1, 16, 600, [550]),          # MQA, 64 rows in 8 tiles, over KV splits
]


def multi_query_decode_cases(check: Checker):
    """Sq queries a row, causal and not, through the launcher (the mask and causal are its
    arguments): the masks per (head, query) in place, broadcast (stride 0) and over strided queries;
    the splits merged by the last one (counters, B * Hq * Sq of them, left zero); GPT's verify
    step (token-major output)."""
    backend, target = check.backend, check.target
    launch = _backends.launchers(backend, "decode").decode_attention
    cases = [c for c in MULTI_QUERY_DECODE_CASES if c[4] <= target.decode_max]
    for i, ((B, Hq, Hkv, Sq, Smax, lens), dtype) in enumerate(itertools.product(cases, target.attention_dtypes)):
        D = target.head_dims[i % len(target.head_dims)]
        q = exact(B, Hq, Sq, D, dtype=dtype)
        k, v = exact(B, Hkv, Smax, D, dtype=dtype, seed=1), exact(B, Hkv, Smax, D, dtype=dtype, seed=2)
        seqlens = torch.tensor(lens, dtype=torch.int32)
        name = f"decode B{B} H{Hq}/{Hkv} Sq{Sq} Smax{Smax} D{D} lens={lens} {dtype}"
        for causal in (True, False):
            with check.case(f"{name} causal={causal}", q, k, v, seqlens):
                _finite_lse(*launch(q, k, v, seqlens, scale=0.1, causal=causal, return_lse=True))
        counters = torch.zeros(B * Hq * Sq, dtype=torch.int32)
        with check.case(f"{name} step, token-major", q, k, v, seqlens):
            _finite_lse(*decode_step_attention(q, k, v, seqlens, counters, backend=backend, return_lse=True,
                                               token_major=True))  # fmt: skip
        masks = {"per (head, query)": exact(B, Hq, Sq, Smax, seed=3) > 0,
                 "broadcast": (exact(1, 1, 1, Smax, seed=4) > 0).expand(B, Hq, Sq, Smax),
                 "strided queries": (exact(B, Hq, 2 * Sq, Smax, seed=5) > 0)[:, :, 1::2]}  # fmt: skip
        for (kind, mask), causal in zip(masks.items(), (True, False, True)):
            with check.case(f"{name} mask {kind} causal={causal} step", q, k, v, seqlens, mask):
                _finite_lse(*launch(q, k, v, seqlens, scale=0.1, causal=causal, mask=mask, counters=counters,
                                    return_lse=True))  # fmt: skip
        assert not counters.any(), "the counters were not left zero"


def layer_norm_cases(check: Checker):
    backend, floats = check.backend, check.target.floats
    for N in check.target.layer_norm_n:
        M = 2 if N > 5000 else 3
        for i, dtype in enumerate(floats):
            x, r = exact(M, N, dtype=dtype, scale=3.0), exact(M, N, dtype=dtype, seed=1)
            w, b = exact(N, dtype=floats[(i + 1) % len(floats)], seed=2), exact(N, seed=3)
            with check.case(f"layer_norm N{N} {dtype}", x, w, b):
                _finite(fastgpt.layer_norm(x, w, b, backend=backend))
            with check.case(f"layer_norm N{N} {dtype} + residual", x, r, b):
                _finite(*fastgpt.layer_norm(x, None, b, residual=r, backend=backend))
            w, b = exact(N, dtype=dtype, seed=2), exact(N, dtype=dtype, seed=3)  # read as vectors like x (cuda)
            with check.case(f"layer_norm N{N} {dtype} + residual, weight and bias in its dtype", x, r, w, b):
                _finite(*fastgpt.layer_norm(x, w, b, residual=r, backend=backend))
    for N in (7, 768, 1025, 5000):  # rows 3 elements into storage, stride N + 3: the scalar path
        x = ending_view((3, N), (N + 3, 1), offset=3, dtype=floats[-1])
        r = ending_view((3, N), (N + 3, 1), offset=3, dtype=floats[-1], seed=1)
        w = exact(N, dtype=floats[-1], seed=2)
        with check.case(f"layer_norm unaligned rows N{N}", x, r, w):
            _finite(*fastgpt.layer_norm(x, w, None, residual=r, backend=backend))
    x = exact(2, 3, 768, dtype=torch.float16)
    with check.case("layer_norm (2, 3, 768)", x):
        _finite(fastgpt.layer_norm(x, None, None, backend=backend))


def sample_cases(check: Checker):
    backend, floats, vocabs = check.backend, check.target.floats, check.target.vocabs
    launchers = _backends.launchers(backend, "sampling")
    # cuda: the candidate path, or not; triton: also the split path (2 chunks) and one program per row
    paths = [{"top_k_bound": 50}, {"top_k_bound": 0}]
    public = [{"temperature": 0.8, "top_p": 0.9}, {"top_k": 50, "top_p": 0.9, "min_p": 0.01}, {"top_k": 1},
              {"temperature": 0}]  # fmt: skip
    if backend == "triton":
        paths = [{"top_k_bound": 50}, {"num_chunks": 0}, {"num_chunks": 2}]
    # fp16 and bf16 rows are read alike: the largest vocabulary takes one of them only
    vocab_dtypes = [(V, dtype) for V in vocabs for dtype in floats if V < 5000 or dtype != torch.float16]
    for i, (V, dtype) in enumerate(vocab_dtypes):
        B = 2 if V > 5000 else 3
        logits = exact(B, V, dtype=dtype, scale=3.0)
        gen = torch.Generator().manual_seed(i)
        for params in public:
            with check.case(f"sample V{V} {dtype} {params}", logits):
                _ids(fastgpt.sample(logits, generator=gen, backend=backend, **params), V)
        # per-row parameters on each path: rows greedy, top-k off, k > V (past the candidate bound)
        rows = [torch.tensor([0.8, 0.0, 1.5][:B]), torch.tensor([50, 0, V + 7][:B]),
                torch.full((B,), 0.9, dtype=torch.float64), torch.full((B,), 0.01)]  # fmt: skip
        seed = torch.tensor([i], dtype=torch.int64)
        for path in paths:
            with check.case(f"sample V{V} {dtype} per-row {path}", logits, *rows, seed):
                _ids(launchers.sample(logits, *rows, seed, **path), V)
            if backend == "triton" and V > 1000 and dtype == floats[-1]:  # the kept set: a (B, V) mask
                with check.case(f"kept_mask V{V} {dtype} per-row {path}", logits, *rows):
                    assert launchers.kept_mask(logits, *rows, **path).any(dim=1).all(), "a row kept nothing"
    for V, bound in ((1025, 50), (max(vocabs), 0)):  # rows 5 elements into storage, stride V + 5
        logits = ending_view((2, V), (V + 5, 1), offset=5, seed=7)
        with check.case(f"sample strided rows V{V} top_k={bound}", logits):
            _ids(fastgpt.sample(logits, top_k=bound, backend=backend), V)
    V = 3000 if backend == "cuda" else 100
    row = exact(1, V, dtype=floats[-1], seed=8)
    for bound in (50, 0):  # row stride 0
        with check.case(f"sample one row expanded top_k={bound}", row):
            _ids(fastgpt.sample(row.expand(4, V), top_k=bound, backend=backend), V)
    if backend == "triton":  # the candidate path bounds each row first; its sorted form, without bounds
        from fastgpt.kernels import sampling as tri_sampling

        logits = exact(32, 70, scale=3.0, seed=9)
        with check.case("sample B32 V70 top_k=4 (row bounds)", logits):
            _ids(fastgpt.sample(logits, top_k=4, backend=backend), 70)
        bound_from = tri_sampling.CAND_BOUND_MIN_ROWS
        try:
            tri_sampling.CAND_BOUND_MIN_ROWS = 1 << 30
            with check.case("sample B32 V70 top_k=4 (sorted chunks)", logits):
                _ids(fastgpt.sample(logits, top_k=4, backend=backend), 70)
        finally:
            tri_sampling.CAND_BOUND_MIN_ROWS = bound_from


def linear_cases(check: Checker):
    """fastgpt.ops.linear (triton only): bias, LayerNorm, residual, GELU; the k/v cache write at
    slots in and out of [0, S); rows gathered from tables at ids in and out of [0, R)."""
    for dtype, (M, K, H, D) in itertools.product(check.target.floats, ((1, 7, 1, 2), (4, 100, 2, 8), (3, 64, 1, 16))):
        N = 3 * H * D
        x, w, b = exact(M, K, dtype=dtype), exact(N, K, dtype=dtype, seed=1, scale=0.1), exact(N, seed=2)
        ln = (exact(K, seed=3), exact(K, dtype=dtype, seed=4), 1e-5)
        r = exact(M, K, dtype=dtype, seed=5)
        name = f"linear M{M} K{K} N{N} {dtype}"
        with check.case(name, x, w, b):
            _finite(linear(x, w, b, backend="triton")[0])
        with check.case(f"{name} ln residual gelu", x, w, b, r, *ln[:2]):
            _finite(*linear(x, w, b, ln=ln, residual=r, activation="gelu_tanh", backend="triton"))
        S = 5
        kv_cache, kv_pos = exact(2, M, H, S, D, dtype=dtype, seed=6), torch.tensor([4, 5, -1, 0][:M])
        with check.case(f"{name} kv_cache slots {kv_pos.tolist()}", x, w, kv_cache, kv_pos):
            _finite(linear(x, w, None, ln=(None, None, 1e-5), kv_cache=kv_cache, kv_pos=kv_pos, backend="triton")[0])
        table, rtable = exact(6, K, dtype=dtype, seed=7), exact(3, K, dtype=dtype, seed=8)
        ids, rids = torch.tensor([5, 6, -1, 0][:M]), torch.tensor([2, 3, -2, 0][:M])
        with check.case(f"{name} rows {ids.tolist()} / {rids.tolist()}", table, w, rtable, ids, rids):
            _finite(*linear(table, w, b, ln=ln, residual=rtable, x_rows=ids, residual_rows=rids, backend="triton"))


def advance_cases(check: Checker):
    """kernels/advance.py's launchers called directly (no op wraps them): with eos ids or not."""
    from fastgpt.kernels import advance

    for B, V, E in ((1, 1, 1), (3, 1025, 2), (40, 70, 0)):
        logits = exact(B, V, seed=B)
        nxt, tok, pos = (torch.randint(0, V, (B,)) for _ in range(3))
        seqlens, finished = torch.zeros(B, dtype=torch.int32), torch.arange(B) % 2 == 0
        out, step, pad = torch.zeros(B, 3, dtype=torch.int64), torch.tensor([1]), torch.tensor([0])
        eos = torch.arange(E, dtype=torch.int64)
        state = (out, step, tok, pos, seqlens, finished, pad, eos)
        with check.case(f"advance B{B} E{E}", nxt, *state):
            advance.advance(nxt, *state, has_eos=E > 0)
        best, count = torch.full((B,), -(2**63), dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
        with check.case(f"greedy_advance B{B} V{V} E{E}", logits, best, count, *state):
            advance.greedy_advance(logits, best, count, *state, has_eos=E > 0)
        assert step.item() == 3 and not count.item(), "the step and the counter were not advanced and reset"


def lookup_cases(check: Checker):
    """kernels/lookup.py's launchers called directly: a row full to the text's end (its emitted
    tokens past it not written), one-token rows, n-grams and drafts longer than the text."""
    from fastgpt.kernels import lookup

    for B, W, K, ngram in ((1, 1, 3, 2), (3, 9, 4, 12), (5, 40, 8, 3)):
        g = torch.Generator().manual_seed(W)
        text = torch.randint(0, 3, (B, W), generator=g)
        n = torch.randint(1, W + 1, (B,), generator=g)
        n[0] = W
        tok, pos, drafted = torch.zeros(B, K + 1, dtype=torch.int64), torch.zeros_like(n), torch.zeros_like(n)
        seqlens = torch.zeros(B, dtype=torch.int32)
        with check.case(f"draft B{B} W{W} K{K} ngram {ngram}", text, n, tok, pos, drafted, seqlens):
            lookup.draft(text, n, tok, pos, drafted, seqlens, ngram=ngram)
        chosen = tok.roll(-1, dims=1)  # agreeing with every draft: the most tokens emitted
        count, limit = torch.ones_like(n), torch.tensor([W + K])
        finished, eos = torch.zeros(B, dtype=torch.bool), torch.tensor([7, -1])
        with check.case(f"accept B{B} W{W} K{K}", chosen, tok, drafted, text, n, count, limit, finished, eos):
            lookup.accept(chosen, tok, drafted, text, n, count, limit, finished, eos, has_eos=True)
        assert int(n[0]) > W, "the full row emitted nothing"


CASES = {"attention": attention_cases, "decode": decode_cases, "multi_query_decode": multi_query_decode_cases,
         "masked_attention": masked_attention_cases, "layer_norm": layer_norm_cases,
         "sample": sample_cases}  # fmt: skip
TRITON_CASES = {**CASES, "linear": linear_cases, "advance": advance_cases, "lookup": lookup_cases}


def _finite(*outs: torch.Tensor) -> None:
    for out in outs:
        assert torch.isfinite(out).all(), "non-finite output"


def _finite_lse(out: torch.Tensor, lse: torch.Tensor) -> None:
    """An output and its log-sum-exp: -inf where a row sees no position, never NaN or +inf."""
    _finite(out)
    assert not (lse.isnan() | lse.isposinf()).any(), "a NaN or +inf log-sum-exp"


def _ids(ids: torch.Tensor, V: int) -> None:
    assert ((ids >= 0) & (ids < V)).all(), ids


# ----------------------------------------------------------------------------- deliberate overflow


def out_of_bounds(ext, op: str) -> None:
    """Calls the raw binding with one row (layer_norm) or one vocabulary entry (sample) more than
    the tensor holds: the kernel reads the bytes right after it."""
    if op == "layer_norm":
        x, y = exact(3, 768), torch.empty(4, 768)
        ext.layer_norm(x.data_ptr(), 0, 0, 0, y.data_ptr(), 0, 4, 768, 768, 0, 768, 0, 1e-5, 0, 0, 0, 0, 0, False)
    elif op == "sample":
        B, V = 2, 1000
        logits, out = exact(B, V), torch.empty(B, dtype=torch.int64)
        t, k, mp, seed = torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.zeros(B), torch.tensor([1])
        p = torch.ones(B, dtype=torch.float64)
        ext.sample(logits.data_ptr(), t.data_ptr(), k.data_ptr(), p.data_ptr(), mp.data_ptr(), seed.data_ptr(),
                   out.data_ptr(), 0, 0, False, B, V + 1, V, 0, 0, 0, False)  # fmt: skip


def triton_out_of_bounds(op: str) -> None:
    """Launches a Triton kernel itself, told one row (layer_norm) or one vocabulary entry
    (sample) more than the fp32 input holds: the interpreter's first load past it is reported."""
    if op == "layer_norm":
        from fastgpt.kernels.layer_norm import _layer_norm_fused_kernel

        x, y = exact(3, 768), torch.empty(4, 768)
        _layer_norm_fused_kernel[(1,)](x, x, x, x, y, y, 4, 768, 768, 0, 1e-5, HAS_RESIDUAL=False, HAS_WEIGHT=False,
                                       HAS_BIAS=False, BLOCK_M=4, BLOCK_N=1024)  # fmt: skip
    elif op == "sample":
        from fastgpt.kernels.sampling.row import _sample_kernel

        B, V = 2, 1000
        logits, out = exact(B, V), torch.empty(B, dtype=torch.int64)
        t, k, mp, seed = torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.zeros(B), torch.tensor([1])
        p = torch.ones(B, dtype=torch.float64)
        _sample_kernel[(B,)](logits, t, k, p, mp, seed, out, V, V=V + 1, WRITE_MASK=False, BLOCK_V=1024,
                             NUM_PIVOTS=16, PDL=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("cuda", "triton"), default="cuda",
                        help="cuda: the memcheck build of the emulator; triton: Triton's interpreter")  # fmt: skip
    parser.add_argument("--only", choices=sorted(TRITON_CASES), action="append", help="these ops only")
    parser.add_argument("--oob", choices=("layer_norm", "sample"), help="make this op's kernel read out of bounds")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case and its time")
    args = parser.parse_args(argv)
    # Else nothing would be checked.
    if "libasan" not in Path("/proc/self/maps").read_text():
        parser.error("AddressSanitizer is not loaded: LD_PRELOAD=$(g++ -print-file-name=libasan.so)")
    if args.backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":  # compiled kernels on a GPU: ASan sees none of it
            parser.error("the triton cases run in Triton's interpreter: set TRITON_INTERPRET=1")
        from tests import interpreter

        interpreter.install()  # its shortcuts (the same results, faster)
        target, cases, ext = TRITON, TRITON_CASES, None
    else:
        target, cases, ext = CUDA, CASES, _cuda_memcheck_extension(parser)
    if args.oob:
        out_of_bounds(ext, args.oob) if ext is not None else triton_out_of_bounds(args.oob)
        print(f"{args.oob}: the out-of-bounds call returned", file=sys.stderr)
        return 0
    unknown = set(args.only or ()) - set(cases)
    if unknown:
        parser.error(f"no {args.backend} cases for {sorted(unknown)}")
    check = Checker(target, ext, args.verbose)
    start = time.perf_counter()
    for op in args.only or cases:
        cases[op](check)
    print(f"{check.count} cases in {time.perf_counter() - start:.1f} s")
    return 0


def _cuda_memcheck_extension(parser):
    """The emulator's extension, once FASTGPT_CUDA_EMULATOR is checked to be the memcheck build
    (the default build, or none, would check nothing)."""
    if not _backends.emulating_cuda():
        parser.error(f"set {_backends.EMULATOR_ENV_VAR} to the memcheck build: python -m tests.simt.build --asan")
    if b"libasan.so" not in Path(os.environ[_backends.EMULATOR_ENV_VAR]).read_bytes():
        parser.error(f"{_backends.EMULATOR_ENV_VAR} is not the memcheck build: python -m tests.simt.build --asan")
    return _backends.cuda_extension()


if __name__ == "__main__":
    sys.exit(main())
