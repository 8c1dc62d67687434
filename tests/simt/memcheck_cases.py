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

`--oob layer_norm|sample` instead calls the raw binding (fastgpt_simt._C) with a shape larger than
the tensor it points at, which the ops layer would refuse: the kernel reads past the end, and
ASan must say so (the test of the checker itself).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path

import torch

import fastgpt
from fastgpt import _backends
from fastgpt.ops import _cuda

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, *HALF)
KERNEL_ENTRIES = ("attention", "decode_attention", "layer_norm", "sample")


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
    """Runs the cases: wraps the extension's kernel entry points (in this process's module) to
    record the integers they are called with, so that each case can check that its inputs
    reached a kernel themselves."""

    def __init__(self, ext, verbose: bool):
        self.args: list[int] = []
        self.count, self.verbose = 0, verbose
        for name in KERNEL_ENTRIES:
            setattr(ext, name, self._recording(getattr(ext, name)))

    def _recording(self, entry):
        def call(*args):
            self.args += [a for a in args if isinstance(a, int)]
            return entry(*args)

        return call

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
    for B, Hq, Hkv, Sq, Sk in ATTENTION_SHAPES:
        for dtype, D, causal in itertools.product(HALF, (64, 128), (False, True)):
            q = exact(B, Hq, Sq, D, dtype=dtype)
            k, v = exact(B, Hkv, Sk, D, dtype=dtype, seed=1), exact(B, Hkv, Sk, D, dtype=dtype, seed=2)
            with check.case(f"attention B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} {dtype} causal={causal}", q, k, v):
                _finite(fastgpt.attention(q, k, v, causal=causal, backend="cuda"))
    for S, D in ((17, 128), (65, 64)):  # (B, S, 3, H, D) from a fused projection: v ends its storage
        H = 2
        qkv = ending_view((1, S, 3, H, D), (S * 3 * H * D, 3 * H * D, H * D, D, 1), dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        with check.case(f"attention fused-qkv views S{S} D{D}", q, k, v):
            _finite(fastgpt.attention(q, k, v, causal=True, backend="cuda"))
    q, kv = exact(3, 4, 33, 64, dtype=torch.float16), exact(1, 2, 70, 64, dtype=torch.float16, seed=1)
    k = kv.expand(3, 2, 70, 64)  # batch stride 0: every row reads the one cache
    with check.case("attention k = v expanded over the batch", q, kv):
        _finite(fastgpt.attention(q, k, k, causal=True, backend="cuda"))


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
    for (B, Hq, Hkv, Smax, lens), dtype, D in itertools.product(DECODE_CASES, HALF, (64, 128)):
        q = exact(B, Hq, 1, D, dtype=dtype)
        k, v = exact(B, Hkv, Smax, D, dtype=dtype, seed=1), exact(B, Hkv, Smax, D, dtype=dtype, seed=2)
        seqlens = torch.tensor(lens, dtype=torch.int32)
        with check.case(f"decode B{B} H{Hq}/{Hkv} Smax{Smax} D{D} lens={lens} {dtype}", q, k, v, seqlens):
            _finite(fastgpt.decode_attention(q, k, v, seqlens, backend="cuda"))
    for B, S, Hkv, D, lens in ((2, 70, 2, 64, [70, 500]), (1, 300, 1, 128, [300])):
        # (B, S, Hkv, D) caches read as (B, Hkv, S, D): the view's last element ends the storage
        k = exact(B, S, Hkv, D, dtype=torch.float16, seed=1).transpose(1, 2)
        v = exact(B, S, Hkv, D, dtype=torch.float16, seed=2).transpose(1, 2)
        q, seqlens = exact(B, 2 * Hkv, 1, D, dtype=torch.float16), torch.tensor(lens, dtype=torch.int32)
        with check.case(f"decode transposed caches B{B} S{S} D{D} lens={lens}", q, k, v, seqlens):
            _finite(fastgpt.decode_attention(q, k, v, seqlens, backend="cuda"))


# N up to 128 vectors: a warp per row; to 4096: a block per row; beyond: the looped kernel.
LAYER_NORM_N = [1, 7, 768, 1024, 1025, 5000, 32768, 40000]


def layer_norm_cases(check: Checker):
    for N in LAYER_NORM_N:
        M = 2 if N > 5000 else 3
        for i, dtype in enumerate(FLOATS):
            x, r = exact(M, N, dtype=dtype, scale=3.0), exact(M, N, dtype=dtype, seed=1)
            w, b = exact(N, dtype=FLOATS[(i + 1) % 3], seed=2), exact(N, seed=3)
            with check.case(f"layer_norm N{N} {dtype}", x, w, b):
                _finite(fastgpt.layer_norm(x, w, b, backend="cuda"))
            with check.case(f"layer_norm N{N} {dtype} + residual", x, r, b):
                _finite(*fastgpt.layer_norm(x, None, b, residual=r, backend="cuda"))
    for N in (7, 768, 1025, 5000):  # rows 3 elements into storage, stride N + 3: the scalar path
        x = ending_view((3, N), (N + 3, 1), offset=3, dtype=torch.bfloat16)
        r = ending_view((3, N), (N + 3, 1), offset=3, dtype=torch.bfloat16, seed=1)
        w = exact(N, dtype=torch.bfloat16, seed=2)
        with check.case(f"layer_norm unaligned rows N{N}", x, r, w):
            _finite(*fastgpt.layer_norm(x, w, None, residual=r, backend="cuda"))
    x = exact(2, 3, 768, dtype=torch.float16)
    with check.case("layer_norm (2, 3, 768)", x):
        _finite(fastgpt.layer_norm(x, None, None, backend="cuda"))


SAMPLE_VOCABS = [1, 3, 1023, 1025, 50257]


def sample_cases(check: Checker):
    # fp16 and bf16 rows are read alike: the largest vocabulary takes one of them only
    vocab_dtypes = [(V, dtype) for V in SAMPLE_VOCABS for dtype in FLOATS if V < 5000 or dtype != torch.float16]
    for i, (V, dtype) in enumerate(vocab_dtypes):
        B = 2 if V > 5000 else 3
        logits = exact(B, V, dtype=dtype, scale=3.0)
        gen = torch.Generator().manual_seed(i)
        for params in (dict(temperature=0.8, top_p=0.9), dict(top_k=50, top_p=0.9, min_p=0.01), dict(top_k=1),
                       dict(temperature=0)):  # fmt: skip
            with check.case(f"sample V{V} {dtype} {params}", logits):
                _ids(fastgpt.sample(logits, generator=gen, backend="cuda", **params), V)
        # per-row parameters, the candidate path forced (top_k_bound): rows greedy, top-k off, k > V
        rows = [torch.tensor([0.8, 0.0, 1.5][:B]), torch.tensor([50, 0, V + 7][:B]),
                torch.full((B,), 0.9, dtype=torch.float64), torch.full((B,), 0.01)]  # fmt: skip
        seed = torch.tensor([i], dtype=torch.int64)
        for bound in (50, 0):
            with check.case(f"sample V{V} {dtype} per-row top_k_bound={bound}", logits, *rows, seed):
                _ids(_cuda.sample(logits, *rows, seed, top_k_bound=bound), V)
    for V, bound in ((1025, 50), (50257, 0)):  # rows 5 elements into storage, stride V + 5
        logits = ending_view((2, V), (V + 5, 1), offset=5, seed=7)
        with check.case(f"sample strided rows V{V} top_k={bound}", logits):
            _ids(fastgpt.sample(logits, top_k=bound, backend="cuda"), V)
    row = exact(1, 3000, dtype=torch.bfloat16, seed=8)
    for bound in (50, 0):  # row stride 0
        with check.case(f"sample one row expanded top_k={bound}", row):
            _ids(fastgpt.sample(row.expand(4, 3000), top_k=bound, backend="cuda"), 3000)


CASES = {"attention": attention_cases, "decode": decode_cases, "layer_norm": layer_norm_cases,
         "sample": sample_cases}  # fmt: skip


def _finite(*outs: torch.Tensor) -> None:
    for out in outs:
        assert torch.isfinite(out).all(), "non-finite output"


def _ids(ids: torch.Tensor, V: int) -> None:
    assert ((ids >= 0) & (ids < V)).all(), ids


# ----------------------------------------------------------------------------- deliberate overflow


def out_of_bounds(ext, op: str) -> None:
    """Calls the raw binding with one row (layer_norm) or one vocabulary entry (sample) more than
    the tensor holds: the kernel reads the bytes right after it."""
    if op == "layer_norm":
        x, y = exact(3, 768), torch.empty(4, 768)
        ext.layer_norm(x.data_ptr(), 0, 0, 0, y.data_ptr(), 0, 4, 768, 768, 0, 768, 0, 1e-5, 0, 0, 0, 0, 0)
    elif op == "sample":
        B, V = 2, 1000
        logits, out = exact(B, V), torch.empty(B, dtype=torch.int64)
        t, k, mp, seed = torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.zeros(B), torch.tensor([1])
        p = torch.ones(B, dtype=torch.float64)
        ext.sample(logits.data_ptr(), t.data_ptr(), k.data_ptr(), p.data_ptr(), mp.data_ptr(), seed.data_ptr(),
                   out.data_ptr(), 0, 0, B, V + 1, V, 0, 0, 0, False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="these ops only")
    parser.add_argument("--oob", choices=("layer_norm", "sample"), help="make this op's kernel read out of bounds")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case and its time")
    args = parser.parse_args(argv)
    if not _backends.emulating_cuda():
        parser.error(f"set {_backends.EMULATOR_ENV_VAR} to the memcheck build: python -m tests.simt.build --asan")
    # Else nothing would be checked: the default build, or no runtime (which the memcheck build
    # needs to load at all).
    if b"libasan.so" not in Path(os.environ[_backends.EMULATOR_ENV_VAR]).read_bytes():
        parser.error(f"{_backends.EMULATOR_ENV_VAR} is not the memcheck build: python -m tests.simt.build --asan")
    if "libasan" not in Path("/proc/self/maps").read_text():
        parser.error("AddressSanitizer is not loaded: LD_PRELOAD=$(g++ -print-file-name=libasan.so)")
    ext = _backends.cuda_extension()
    if args.oob:
        out_of_bounds(ext, args.oob)
        print(f"{args.oob}: the out-of-bounds call returned", file=sys.stderr)
        return 0
    check = Checker(ext, args.verbose)
    start = time.perf_counter()
    for op in args.only or CASES:
        CASES[op](check)
    print(f"{check.count} cases in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
