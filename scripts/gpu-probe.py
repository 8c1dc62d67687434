"""Diagnostics for tuning on a GPU, beside `fastgpt bench`: where a call's time goes.

For the benchmark's attention and sampling shapes it prints
  - host us/call: the time the host spends issuing one call (no sync), and
  - device us/call: the time on the GPU under CUDA-graph replay (no launch gaps, no host),
so that a benchmark time far above the device time is known to be launch/host-bound; then
  - a sweep of the Triton attention kernel's fixed tiles (BLOCK_M, BLOCK_N, warps, stages,
    TMA or pointer loads) at those shapes, each timed under graph replay,
  - the sampler's one-program-per-row path against its split path at B 1, 32 and 256,
  - a profile of the Python side of one Triton attention call.
Everything is printed and written to $OUT/probe.json. Read-only: it changes no GPU setting.

    OUT=/tmp/out python scripts/gpu-probe.py [--sections attention,tiles,sampling,profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.bench import timing
from fastgpt.kernels import attention as tri_attn
from fastgpt.kernels import sampling as tri_sampling

DEV = "cuda"
ATTN_SHAPES = [(16, 12, 1024, 64), (4, 12, 4096, 64), (4, 16, 4096, 128)]
TILES = {64: [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2)],
         128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 128, 4, 3)]}
RESULTS: dict = {}


def host_us(fn, calls: int = 30) -> float:
    """Host time to issue one call, the device synchronized before the loop only."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def device_us(fn, per_replay: int = 10, replays: int = 15) -> float:
    """Device time of one call under CUDA-graph replay (the median replay)."""
    times = timing.time_graph(lambda _: fn(), per_replay, replays)
    return 1e3 * sorted(times)[len(times) // 2]


def attn_inputs(B, H, S, D):
    return [torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(3)]


def attention_section():
    rows = []
    for B, H, S, D in ATTN_SHAPES:
        q, k, v = attn_inputs(B, H, S, D)
        flops = 4 * B * H * S * S * D / 2
        calls = {
            "fastgpt[triton]": lambda: fastgpt.attention(q, k, v, causal=True, backend="triton"),
            "fastgpt[cuda]": lambda: fastgpt.attention(q, k, v, causal=True, backend="cuda"),
            "kernels.attention (no op)": lambda: tri_attn.attention(q, k, v, causal=True, scale=D ** -0.5),
            "sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        for name, fn in calls.items():
            try:
                h, d = host_us(fn), device_us(fn)
                rows.append(dict(shape=f"B{B} H{H} S{S} D{D}", impl=name, host_us=h, device_us=d,
                                 tflops=flops / d / 1e6))
            except Exception as exc:
                rows.append(dict(shape=f"B{B} H{H} S{S} D{D}", impl=name, error=repr(exc)[:200]))
            print(rows[-1], flush=True)
    RESULTS["attention"] = rows


def tiles_section():
    """Each fixed tile of the Triton kernel, by pointers and by TMA, under graph replay."""
    rows = []
    fixed, use_tuner = tri_attn._fixed_config, tri_attn._use_autotuner
    tri_attn._use_autotuner = lambda *a: False
    try:
        for B, H, S, D in ATTN_SHAPES:
            q, k, v = attn_inputs(B, H, S, D)
            flops = 4 * B * H * S * S * D / 2
            for tile in TILES[D]:
                for tma in (False, True):
                    tri_attn._fixed_config = lambda *a, tile=tile: tile
                    fn = lambda: tri_attn.attention(q, k, v, causal=True, scale=D ** -0.5, tma=tma)  # noqa: E731
                    try:
                        d = device_us(fn, per_replay=5, replays=9)
                        rows.append(dict(shape=f"B{B} H{H} S{S} D{D}", tile=tile, tma=tma, device_us=d,
                                         tflops=flops / d / 1e6))
                    except Exception as exc:
                        rows.append(dict(shape=f"B{B} H{H} S{S} D{D}", tile=tile, tma=tma, error=repr(exc)[:160]))
                    print(rows[-1], flush=True)
    finally:
        tri_attn._fixed_config, tri_attn._use_autotuner = fixed, use_tuner
    RESULTS["tiles"] = rows


def sampling_section():
    rows = []
    for B in (1, 32, 256):
        logits = torch.randn(B, 50257, device=DEV) * 3
        t = torch.full((B,), 0.8, device=DEV)
        k = torch.full((B,), 50, device=DEV, dtype=torch.int64)
        p = torch.full((B,), 0.9, device=DEV, dtype=torch.float64)
        m = torch.zeros(B, device=DEV)
        seed = torch.zeros(1, device=DEV, dtype=torch.int64)
        calls = {
            "triton one program per row": lambda: tri_sampling.sample(logits, t, k, p, m, seed, num_chunks=0),
            "triton split (auto chunks)": lambda: tri_sampling.sample(logits, t, k, p, m, seed),
            "fastgpt.sample[triton]": lambda: fastgpt.sample(logits, temperature=0.8, top_k=50, top_p=0.9,
                                                             backend="triton"),
            "fastgpt.sample[cuda]": lambda: fastgpt.sample(logits, temperature=0.8, top_k=50, top_p=0.9,
                                                           backend="cuda"),
        }
        for name, fn in calls.items():
            try:
                rows.append(dict(B=B, impl=name, host_us=host_us(fn), device_us=device_us(fn)))
            except Exception as exc:
                rows.append(dict(B=B, impl=name, error=repr(exc)[:200]))
            print(rows[-1], flush=True)
    RESULTS["sampling"] = rows


def profile_section():
    q, k, v = attn_inputs(16, 12, 1024, 64)
    fastgpt.attention(q, k, v, causal=True, backend="triton")
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fastgpt.attention(q, k, v, causal=True, backend="triton")
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    RESULTS["profile"] = text.getvalue()
    print(text.getvalue()[-3500:], flush=True)


SECTIONS = {"attention": attention_section, "tiles": tiles_section, "sampling": sampling_section,
            "profile": profile_section}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    for name in args.sections.split(","):
        start = time.time()
        try:
            SECTIONS[name]()
        except Exception as exc:
            RESULTS[name + "_error"] = repr(exc)
            print(f"{name}: {exc!r}", flush=True)
        print(f"== {name}: {time.time() - start:.0f} s", flush=True)
        with open(os.path.join(out, "probe.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
