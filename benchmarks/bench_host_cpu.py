"""Host time of one eager fastgpt call on the CPU: the checks and the launch setup, no kernel.

The kernels are replaced by no-ops: for backend="cuda" a stand-in for the compiled extension
(under FASTGPT_CUDA_EMULATOR, so that CPU tensors pass for device ones), for backend="triton"
no-op kernels under Triton's interpreter (TRITON_INTERPRET=1). What is left is everything fastgpt
does in Python before a launch (argument checks, backend resolution, output allocation, grid
sizing), which is what an eager call of a small op costs on a GPU machine too, besides the launch
itself (Triton's launcher, not timed here, adds its own). Tiny shapes: B1 H12 L1024 D64 decode,
B1 H4 S16 D64 attention, 1 x 768 LayerNorm, 1 x 1000 sampling. Each case is timed in blocks of
`--calls` calls, `--repeats` blocks; the best block is reported (the machine's noise only adds).

    python benchmarks/bench_host_cpu.py [--backend cuda,triton] [--repeats 12] [--calls 2000]

To compare two checkouts, run it in each, alternately, and keep each side's best.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import types


def _stub_extension():
    """A module with the extension's functions, each doing nothing (decode splits: 4)."""

    def noop(*args):
        return None

    return types.SimpleNamespace(attention=noop, decode_attention=noop, layer_norm=noop, sample=noop, archs="stub",
                                 decode_blocks_per_sm=lambda *a: 4, decode_num_splits=lambda *a: 4,
                                 sample_workspace_bytes=lambda *a: 1024)  # fmt: skip


class _NoopKernel:
    """kernel[grid](...) that launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_triton_kernels():
    for name in ("decode", "layer_norm", "attention", "linear", "sampling"):
        module = importlib.import_module(f"fastgpt.kernels.{name}")
        for attr, value in list(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(value, "run"):
                setattr(module, attr, _NoopKernel())


def cases(backend: str) -> dict:
    import torch

    import fastgpt

    dtype = torch.bfloat16 if backend == "cuda" else torch.float16  # the interpreter has no bf16 arithmetic
    q, k = torch.randn(1, 12, 1, 64, dtype=dtype), torch.randn(1, 12, 1024, 64, dtype=dtype)
    lengths = torch.full((1,), 1024, dtype=torch.int32)
    qa, ka = torch.randn(1, 4, 16, 64, dtype=dtype), torch.randn(1, 4, 16, 64, dtype=dtype)
    x, w, b = torch.randn(1, 768, dtype=dtype), torch.randn(768, dtype=dtype), torch.randn(768, dtype=dtype)
    logits = torch.randn(1, 1000)
    return {
        "decode_attention B1 H12 L1024": lambda: fastgpt.decode_attention(q, k, k, lengths, backend=backend),
        "attention B1 H4 S16 causal": lambda: fastgpt.attention(qa, ka, ka, causal=True, backend=backend),
        "layer_norm 1 x 768": lambda: fastgpt.layer_norm(x, w, b, backend=backend),
        "sample 1 x 1000 t0.8 k50 p0.9": lambda: fastgpt.sample(logits, temperature=0.8, top_k=50, top_p=0.9,
                                                                 backend=backend),
    }  # fmt: skip


def best_us(fn, calls: int, repeats: int) -> float:
    for _ in range(calls):  # warm-up: caches, first-call imports
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda,triton", help="comma-separated: cuda, triton")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    backends = args.backend.split(",")
    if len(backends) > 1:  # one process a backend: the stubs and environment of one must not reach the other
        import subprocess

        for backend in backends:
            subprocess.run([sys.executable, __file__, "--backend", backend, "--repeats", str(args.repeats),
                            "--calls", str(args.calls)], check=True)  # fmt: skip
        return
    backend = backends[0]
    if backend == "cuda":
        os.environ["FASTGPT_CUDA_EMULATOR"] = "stub"
        from fastgpt import _backends

        stub = _stub_extension()
        _backends._import_cuda_extension = lambda emulator: (stub, None)
    elif backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
        _stub_triton_kernels()
    else:
        parser.error(f"--backend takes cuda and triton, got {backend!r}")
    import torch

    with torch.inference_mode():
        for name, fn in cases(backend).items():
            print(f"{backend:7s} {name:32s} {best_us(fn, args.calls, args.repeats):7.1f} us a call")


if __name__ == "__main__":
    main()
