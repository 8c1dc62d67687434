"""Diagnostics for tuning on a GPU, beside `fastgpt bench`: where a call's time goes, and which
knob settings are fastest. Each section answers one question the tables and rules in the code
were set from (or guessed at):

  attention      host us/call (issuing one call, no sync) and device us/call (CUDA-graph replay:
                 no launch gaps, no host) for the benchmark's attention shapes, fastgpt's
                 backends against SDPA; a bench time far above the device time is host-bound.
  overhead       host us/call of every op at tiny shapes, through fastgpt's API and straight into
                 the Triton launcher: what the checks, the dispatch and the launch cost.
  tiles          the Triton attention kernel's fixed tiles (BLOCK_M, BLOCK_N, warps, stages), by
                 pointers and by TMA (kernels/attention.py's _TUNING order).
  decode_batch   Triton against CUDA decode over B (fastgpt/_backends.py's decode_preference).
  decode_tiles   the Triton decode kernel's BLOCK_N / warps / stages and split factor.
  few_queries    attention of 1 to 32 causal queries a row over a long context: each backend's
                 prefill kernel against its split-KV decode kernel (fastgpt/ops/attention.py's
                 SPLIT_KV_MAX_QUERIES), and SDPA.
  layer_norm_rows  residual + LayerNorm at a decode step's rows (1 to 128) and GPT-2's widths: the
                 Triton kernel one row a program and TILE elements a program
                 (kernels/layer_norm.py's SPREAD_MAX_ROWS), and CUDA's.
  sample_batch   the sampler over B: Triton's candidate, split and one-program-per-row paths, CUDA's
                 candidate (sorted and bounded) and one-block-per-row paths
                 (SAMPLE_TRITON_MAX_ROWS, kernels/sampling/__init__.py's _MIN_SPLIT_CHUNKS).
  sample_top_p   the same without a small top-k (top-p alone, top-k 1000): the paths other than the
                 candidate one, which every other sampling section times.
  sample_blocks  the one-program-per-row path's vocabulary block and warps.
  sample_cand    the candidate path's tiles (both kernels' blocks and warps).
  linear         GPT.decode's fused matmuls (fastgpt.ops.linear, kernels/linear.py) against the
                 unfused ops they replace (the LayerNorm op, F.linear, F.gelu), per GPT-2 shape.
  decode_step    GPT-2's whole decode step at B1 and B32, its kernels launched as programmatic
                 dependents (kernels/pdl.py) and not.
  persistent_step  that step as one persistent kernel (GPT.persistent_decode) at B 1, 4, 8, checked
                 against the fused step first, and over its knobs (item bytes, programs an SM,
                 the L2 prefetch of the items ahead, claims taken ahead).
  step_kernels   where that step's time goes: each kernel's device us a call and a step inside the
                 graphed step (torch's profiler), and the step's span against its kernels' sum (the
                 gap: the device idle between kernels, or negative, their overlap under PDL).
  lookup_step    a prompt-lookup step of generate (fastgpt/speculative.py: drafting, verifying k
                 drafts, accepting) against a plain decode step, GPT-2 at B1 and B8: the tokens a
                 step must accept on average to pay.
  generate_parts  a whole generate call's time outside its decode steps (the prefill, replayed from
                 its CUDA graph and eager) and inside them, GPT-2 at B1 and B32.
  profile        cProfile of the Python side of one Triton attention call.

Printed as it goes and written to $OUT/probe.json after each section (the timers, the knob
restoring and the step tables are fastgpt/bench/probe.py's). --time-limit stops
starting new measurements once passed. A section whose kernels fault (the CUDA context is then
unusable) costs only itself: the sections after it run in a fresh process (--merge adds to
probe.json). Read-only: it changes no GPU setting.

    OUT=/tmp/out python scripts/gpu-probe.py [--sections a,b,...] [--time-limit 200]
    TRITON_INTERPRET=1 python scripts/gpu-probe.py --smoke   # CPU: tiny shapes, host clock
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import _backends
from fastgpt.bench import timing
from fastgpt.bench.probe import Probe, env_kept, knob_call, knobs_kept, step_table, traced_steps
from fastgpt.kernels import attention as tri_attn
from fastgpt.kernels import decode as tri_decode
from fastgpt.kernels import sampling as tri_sampling
from fastgpt.ops.decode import decode_step_attention


def attn_shapes(p: Probe):
    return [(1, 2, 40, 16)] if p.smoke else [(16, 12, 1024, 64), (4, 12, 4096, 64), (4, 16, 4096, 128)]


def attention_section(p: Probe):
    for B, H, S, D in attn_shapes(p):
        q, k, v = (p.randn(B, H, S, D) for _ in range(3))
        flops = 4 * B * H * S * S * D / 2
        calls = {f"fastgpt[{b}]": (lambda b=b: fastgpt.attention(q, k, v, causal=True, backend=b)) for b in p.backends}
        calls["kernels.attention (no op)"] = lambda: tri_attn.attention(q, k, v, causal=True, scale=D ** -0.5)
        calls["sdpa (default)"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for name, fn in calls.items():
            def measure(fn=fn):
                d = p.device_us(fn)
                return dict(host_us=p.host_us(fn), device_us=d, tflops=flops / d / 1e6)
            p.record("attention", dict(shape=f"B{B} H{H} S{S} D{D}", impl=name), measure)


def overhead_section(p: Probe):
    """Tiny shapes: the device work is a few us, so host time is the API's and the launch's."""
    q, k = p.randn(1, 4, 16, 64), p.randn(1, 4, 16, 64)
    q1, lens = q[:, :, :1], torch.full((1,), 16, dtype=torch.int32, device=p.device)
    x, logits = p.randn(1, 768), torch.randn(1, 1000, device=p.device)
    seed = torch.zeros(1, dtype=torch.int64, device=p.device)
    params = [torch.full((1,), 0.8, device=p.device), torch.full((1,), 50, dtype=torch.int64, device=p.device),
              torch.full((1,), 0.9, dtype=torch.float64, device=p.device), torch.zeros(1, device=p.device)]
    calls = {}
    for b in (*p.backends, "torch"):
        calls[f"attention[{b}]"] = lambda b=b: fastgpt.attention(q, k, k, causal=True, backend=b)
        calls[f"decode_attention[{b}]"] = lambda b=b: fastgpt.decode_attention(q1, k, k, lens, backend=b)
        calls[f"layer_norm[{b}]"] = lambda b=b: fastgpt.layer_norm(x, None, None, backend=b)
        calls[f"sample[{b}]"] = lambda b=b: fastgpt.sample(logits, temperature=0.8, top_k=50, top_p=0.9, backend=b)
    calls["triton launcher: attention"] = lambda: tri_attn.attention(q, k, k, causal=True, scale=0.125)
    calls["triton launcher: decode"] = lambda: tri_decode.decode_attention(q1, k, k, lens, scale=0.125)
    calls["triton launcher: sample"] = lambda: tri_sampling.sample(logits, *params, seed)
    calls["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True)
    calls["F.layer_norm"] = lambda: F.layer_norm(x, (768,))
    for name, fn in calls.items():
        p.record("overhead", dict(impl=name), lambda fn=fn: dict(host_us=p.host_us(fn, calls=200)))


def layer_norm_rows_section(p: Probe):
    """Residual + LayerNorm of a decode step's few rows: where one row a program stops paying (the
    benchmark times torch.compile's at 32 x 768; compiling it at every shape here would cost more
    than the section)."""
    from fastgpt.kernels import layer_norm as tri_ln

    for N in (64,) if p.smoke else (768, 1600):
        for M in (3,) if p.smoke else (1, 8, 32, 128):
            x, r, w, b = p.randn(M, N), p.randn(M, N), p.randn(N), p.randn(N)
            calls = {f"triton, {form}": knob_call(tri_ln, "SPREAD_MAX_ROWS", rows, lambda: tri_ln.layer_norm(
                         x, w, b, eps=1e-5, residual=r)) for form, rows in (("a row a program", 128), ("tiled", 0))}
            if "cuda" in p.backends:
                calls["cuda"] = lambda: fastgpt.layer_norm(x, w, b, residual=r, backend="cuda")
            for name, fn in calls.items():
                p.record("layer_norm_rows", dict(M=M, N=N, impl=name), lambda fn=fn: dict(device_us=p.device_us(fn)))


TILES = {64: [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4),
              (64, 32, 4, 3), (64, 64, 8, 3)],
         128: [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 4),
               (64, 128, 4, 3), (128, 32, 8, 3)]}


def tiles_section(p: Probe):
    """Each fixed tile of the Triton kernel, by pointers and by TMA, under graph replay."""
    with knobs_kept(tri_attn, "_fixed_config", "_use_autotuner"):
        tri_attn._use_autotuner = lambda *a: False
        for B, H, S, D in attn_shapes(p):
            q, k, v = (p.randn(B, H, S, D) for _ in range(3))
            flops = 4 * B * H * S * S * D / 2
            tiles = [(16, 16, 4, 1)] if p.smoke else TILES[D]
            for tile in tiles:
                for tma in (False, True):
                    def measure(tile=tile, tma=tma):
                        tri_attn._fixed_config = lambda *a: tile
                        d = p.device_us(lambda: tri_attn.attention(q, k, v, causal=True, scale=D ** -0.5, tma=tma),
                                        per_replay=5, replays=9)
                        return dict(device_us=d, tflops=flops / d / 1e6)
                    p.record("tiles", dict(shape=f"B{B} H{H} S{S} D{D}", tile=tile, tma=tma), measure)


def decode_inputs(p: Probe, B, H, L, D) -> tuple[list[tuple], int]:
    """Copies of (q, k_cache, v_cache, cache_seqlens) past twice the L2 cache (Probe.copies), for
    timings that read each call's cache from memory as a decode step does (Probe.cold_device_us;
    before 2026-12 these sections timed one cache, which up to ~50 MB stayed in L2), and the
    bytes of one cache."""
    nbytes = 2 * B * H * L * D * 2
    lens = torch.full((B,), L, dtype=torch.int32, device=p.device)
    sets = [(p.randn(B, H, 1, D), p.randn(B, H, L, D), p.randn(B, H, L, D), lens) for _ in range(p.copies(nbytes))]
    return sets, nbytes


def cold_us(p: Probe, fn: Callable, sets: list[tuple]) -> float:
    """Device us of fn(*inputs) a call, over the input copies `sets` in turn (Probe.cold_device_us)."""
    return p.cold_device_us([lambda inputs=inputs: fn(*inputs) for inputs in sets])


def decode_batch_section(p: Probe):
    """Triton against CUDA over the batch: where does auto's order flip?"""
    H, L, D = (2, 40, 16) if p.smoke else (12, 1024, 64)
    for B in (1, 2) if p.smoke else (1, 2, 4, 8, 11, 16, 32, 64):
        sets, nbytes = decode_inputs(p, B, H, L, D)
        calls = {b: (lambda q, kc, vc, lens, b=b: fastgpt.decode_attention(q, kc, vc, lens, backend=b))
                 for b in p.backends}  # fmt: skip
        counters = torch.zeros(B * H, dtype=torch.int32, device=p.device)  # GPT's decode step: one launch
        for b in p.backends:
            calls[f"{b}, merged in-kernel"] = lambda q, kc, vc, lens, b=b: decode_step_attention(q, kc, vc, lens,
                                                                                                 counters, backend=b)
        calls["sdpa (full cache)"] = lambda q, kc, vc, lens: F.scaled_dot_product_attention(q, kc, vc)
        for name, fn in calls.items():
            def measure(fn=fn):
                d = cold_us(p, fn, sets)
                return dict(device_us=d, gbps=nbytes / d / 1e3)
            p.record("decode_batch", dict(shape=f"B{B} H{H} L{L} D{D}", rows=B * H, impl=name), measure)


def decode_tiles_section(p: Probe):
    """BLOCK_N, warps, stages and the split factor of the Triton decode kernel."""
    # First the caches of `fastgpt bench generate` (GPT-2, 32 + 256 tokens: 288 slots, B1 and B32).
    shapes = [(2, 2, 40, 16)] if p.smoke else [(1, 12, 288, 64), (32, 12, 288, 64), (64, 12, 4096, 64),
                                               (1, 12, 1024, 64), (8, 32, 4096, 128)]  # fmt: skip
    # (BLOCK_N, warps, stages, programs per SM). 0 programs per SM: one split, no combine launch;
    # None: kernels/decode.py's split_plan as shipped (a grid of more than 2 programs an SM takes one split).
    variants = [(32, 4, 3, 16), (32, 4, 3, 0)] if p.smoke else [
        (64, 4, 3, None), (64, 4, 3, 16), (64, 4, 3, 4), (64, 4, 3, 8), (64, 4, 3, 32), (64, 4, 3, 0),
        (64, 4, 2, None), (64, 4, 4, None), (64, 4, 5, None), (32, 4, 4, None), (32, 4, 6, None), (128, 4, 3, None),
        (128, 8, 3, None), (64, 2, 3, None), (64, 8, 3, None), (32, 2, 4, None)]
    tiles_fn = tri_decode.gpu_tiles
    plan = {knob: getattr(tri_decode, knob) for knob in ("_PROGRAMS_PER_SM", "_NO_SPLIT_PROGRAMS_PER_SM")}
    with knobs_kept(tri_decode, "gpu_tiles", *plan):
        for B, H, L, D in shapes:
            sets, nbytes = decode_inputs(p, B, H, L, D)
            for block_n, warps, stages, programs_per_sm in variants:
                def measure(block_n=block_n, warps=warps, stages=stages, programs_per_sm=programs_per_sm):
                    base = tiles_fn(1, D, False)
                    tri_decode.gpu_tiles = lambda *a: base._replace(block_n=block_n, num_warps=warps, num_stages=stages)
                    fill = {} if programs_per_sm is None else {"_PROGRAMS_PER_SM": programs_per_sm,
                                                                   "_NO_SPLIT_PROGRAMS_PER_SM": 1 << 30}
                    for knob, value in {**plan, **fill}.items():
                        setattr(tri_decode, knob, value)
                    d = cold_us(p, lambda q, kc, vc, lens: tri_decode.decode_attention(q, kc, vc, lens, scale=D**-0.5),
                                sets)  # fmt: skip
                    return dict(device_us=d, gbps=nbytes / d / 1e3)
                p.record("decode_tiles", dict(shape=f"B{B} H{H} L{L} D{D}", block_n=block_n, warps=warps,
                                              stages=stages, programs_per_sm=programs_per_sm), measure)
            counters = torch.zeros(B * H, dtype=torch.int32, device=p.device)  # the splits merged in the split kernel

            def merged():  # at the default tiles and splits, not the last variant's
                tri_decode.gpu_tiles = tiles_fn
                for knob, value in plan.items():
                    setattr(tri_decode, knob, value)
                d = cold_us(p, lambda q, kc, vc, lens: tri_decode.decode_attention(q, kc, vc, lens, scale=D**-0.5,
                                                                                      counters=counters), sets)
                return dict(device_us=d, gbps=nbytes / d / 1e3)
            p.record("decode_tiles", dict(shape=f"B{B} H{H} L{L} D{D}", merge="in the split kernel"), merged)


def few_queries_section(p: Probe):
    """Speculative decoding's drafts, chunked prefill: Sq causal queries at the end of L keys, through
    each backend's prefill kernel and its split-KV decode kernel. Where does the split-KV one stop
    winning?"""
    from torch.nn.attention.bias import causal_lower_right

    shapes = [(1, 2, 1, 40, 16)] if p.smoke else [(1, 32, 8, 4096, 128), (1, 32, 8, 32768, 128),
                                                 (8, 32, 8, 8192, 128), (1, 12, 12, 1024, 64), (16, 12, 12, 1024, 64)]
    for B, Hq, Hkv, L, D in shapes:
        caches, nbytes = decode_inputs(p, B, Hkv, L, D)  # (their q: Hkv heads, one query; unused)
        for Sq in (2, 4) if p.smoke else (1, 2, 4, 8, 16, 32):
            q = p.randn(B, Hq, Sq, D)
            sets = [(q, kc, vc, lens) for _, kc, vc, lens in caches]
            calls = {}
            for b in p.backends:
                prefill, split = _backends.launchers(b, "attention"), _backends.launchers(b, "decode")
                calls[f"{b} prefill kernel"] = lambda q, kc, vc, lens, pf=prefill: pf.attention(q, kc, vc, causal=True,
                                                                                                 scale=D**-0.5)
                calls[f"{b} split-KV kernel"] = lambda q, kc, vc, lens, sp=split: sp.decode_attention(q, kc, vc, lens,
                                                                                                      scale=D**-0.5)
            mask = causal_lower_right(Sq, L)
            calls["sdpa (lower-right causal)"] = lambda q, kc, vc, lens: F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, enable_gqa=Hq != Hkv)
            for name, fn in calls.items():
                def measure(fn=fn):
                    d = cold_us(p, fn, sets)
                    return dict(device_us=d, gbps=nbytes / d / 1e3)
                p.record("few_queries", dict(shape=f"B{B} H{Hq}/{Hkv} L{L} D{D}", Sq=Sq, impl=name), measure)


def sample_inputs(p: Probe, B, V, top_k=50):
    logits = torch.randn(B, V, device=p.device) * 3
    params = [torch.full((B,), 0.8, device=p.device), torch.full((B,), top_k, dtype=torch.int64, device=p.device),
              torch.full((B,), 0.9, dtype=torch.float64, device=p.device), torch.zeros(B, device=p.device)]
    return logits, params, torch.zeros(1, dtype=torch.int64, device=p.device)


def search_paths(p: Probe, logits, params, seed, chunks: int) -> dict[str, Callable]:
    """The sampler's paths that search the whole row (no candidate list): Triton's one program per
    row and split path (where `chunks` > 1), CUDA's one block per row."""
    calls = {"triton one program per row": lambda: tri_sampling.sample(logits, *params, seed, num_chunks=0)}
    if chunks > 1:
        calls[f"triton split ({chunks} chunks)"] = lambda: tri_sampling.sample(logits, *params, seed, num_chunks=chunks)
    if "cuda" in p.backends:
        from fastgpt.ops import _cuda

        calls["cuda one block per row"] = lambda: _cuda.sample(logits, *params, seed)
    return calls


def sample_batch_section(p: Probe):
    """The split path (as many chunks as the SM rule asks, no minimum), one program per row, the
    candidate path with its chunks sorted and bounded, in Triton and in CUDA, over B: where
    _MIN_SPLIT_CHUNKS, SAMPLE_TRITON_MAX_ROWS, CAND_BOUND_MIN_ROWS and (ops/_cuda.py's)
    SAMPLE_BOUND_MIN_ROWS should sit."""
    V = 3000 if p.smoke else 50257
    sms = 4 if p.smoke else _backends.sm_count(torch.cuda.current_device())
    for B in (2,) if p.smoke else (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256):
        logits, params, seed = sample_inputs(p, B, V)
        chunks = tri_sampling.split_chunks(B, V, sms, min_chunks=2)
        def candidates(module, knob, min_rows, launcher, logits=logits, params=params, seed=seed):
            return knob_call(module, knob, min_rows, lambda: launcher(logits, *params, seed, top_k_bound=50))

        calls = {"triton candidates (top_k_bound 50), sorted":
                     candidates(tri_sampling, "CAND_BOUND_MIN_ROWS", 1 << 30, tri_sampling.sample),
                 "triton candidates (top_k_bound 50), bounded":
                     candidates(tri_sampling, "CAND_BOUND_MIN_ROWS", 1, tri_sampling.sample)}
        if "cuda" in p.backends:
            from fastgpt.ops import _cuda

            calls["cuda candidates (top_k_bound 50), sorted"] = candidates(_cuda, "SAMPLE_BOUND_MIN_ROWS", 1 << 30,
                                                                           _cuda.sample)
            calls["cuda candidates (top_k_bound 50), bounded"] = candidates(_cuda, "SAMPLE_BOUND_MIN_ROWS", 1,
                                                                            _cuda.sample)
        calls |= search_paths(p, logits, params, seed, chunks)
        for name, fn in calls.items():
            p.record("sample_batch", dict(B=B, V=V, impl=name), lambda fn=fn: dict(device_us=p.device_us(fn)))


def sample_top_p_section(p: Probe):
    """Top-p without a top-k the host can bound (temperature 0.8, top-p 0.9, top-k off, and top-k
    1000): no candidate path, so the split path, one program per row, and CUDA's one block per row
    (gpu-probe's other sampling sections all run top-k 50)."""
    V = 3000 if p.smoke else 50257
    sms = 4 if p.smoke else _backends.sm_count(torch.cuda.current_device())
    for top_k in (0, 1000):
        for B in (2,) if p.smoke else (1, 32, 256):
            logits, params, seed = sample_inputs(p, B, V, top_k=top_k)
            chunks = tri_sampling.split_chunks(B, V, sms, min_chunks=2)
            for name, fn in search_paths(p, logits, params, seed, chunks).items():
                p.record("sample_top_p", dict(B=B, V=V, top_k=top_k, impl=name),
                         lambda fn=fn: dict(device_us=p.device_us(fn)))


def sample_blocks_section(p: Probe):
    """The one-program-per-row path's vocabulary block (x its pivots: registers) and warps."""
    variants = [(1024, 4)] if p.smoke else [(4096, 32), (1024, 8), (2048, 16), (2048, 8), (4096, 16), (8192, 32)]
    with knobs_kept(tri_sampling, "ROW_BLOCK_V", "ROW_WARPS"):
        for B in (2,) if p.smoke else (1, 256):
            logits, params, seed = sample_inputs(p, B, 3000 if p.smoke else 50257)
            for block_v, num_warps in variants:
                def measure(block_v=block_v, num_warps=num_warps):
                    tri_sampling.ROW_BLOCK_V[4], tri_sampling.ROW_WARPS[4] = block_v, num_warps  # fp32 logits
                    return dict(device_us=p.device_us(lambda: tri_sampling.sample(logits, *params, seed,
                                                                                  num_chunks=0)))
                p.record("sample_blocks", dict(B=B, block_v=block_v, warps=num_warps), measure)


def sample_cand_section(p: Probe):
    """The candidate path's tiles: vocabulary block and warps of its first kernel, merge block
    and warps of its second (kernels/sampling/__init__.py's CAND_BLOCK, CAND_WARPS, MERGE_BLOCK, MERGE_WARPS)."""
    names = ("CAND_BLOCK", "CAND_WARPS", "MERGE_BLOCK", "MERGE_WARPS")
    variants = [(1024, 4, 2048, 8)] if p.smoke else [
        (1024, 4, 2048, 8), (2048, 4, 2048, 8), (4096, 8, 2048, 8), (1024, 8, 2048, 8), (1024, 2, 2048, 8),
        (1024, 4, 4096, 8), (1024, 4, 2048, 4), (1024, 4, 1024, 4), (1024, 4, 2048, 16)]  # fmt: skip
    with knobs_kept(tri_sampling, *names):
        for B in (2,) if p.smoke else (1, 32, 256):
            logits, params, seed = sample_inputs(p, B, 3000 if p.smoke else 50257)
            for variant in variants:
                def measure(variant=variant):
                    for name, value in zip(names, variant, strict=True):
                        setattr(tri_sampling, name, value)
                    return dict(device_us=p.device_us(lambda: tri_sampling.sample(logits, *params, seed,
                                                                                  top_k_bound=50)))
                p.record("sample_cand", dict(B=B, **dict(zip(names, variant, strict=True))), measure)


def linear_calls(x, r, w, b, g, beta, ln: bool, gelu: bool, counters) -> dict[str, Callable]:
    """One GPT-2 decode matmul, fused (one launch) and as the ops it replaces. Without a LayerNorm
    (the output projections) the fused call gets counters to split K with, as GPT's step does."""
    from fastgpt.ops.linear import linear

    def fused():
        return linear(x, w, b, ln=(g, beta, 1e-5) if ln else None, residual=r if ln else None,
                      activation="gelu_tanh" if gelu else None, counters=None if ln else counters,
                      backend="triton")  # fmt: skip

    def unfused():
        a = fastgpt.layer_norm(x, g, beta, residual=r)[0] if ln else x
        y = F.linear(a, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    def apart():  # GPT's fused step from model.LN_APART_MIN_ROWS rows
        a = fastgpt.layer_norm(x, g, beta, residual=r)[0]
        return linear(a, w, b, activation="gelu_tanh" if gelu else None, backend="triton")

    calls = {"fused (triton)": fused, "unfused (LN op + F.linear + F.gelu)": unfused}
    if ln:
        calls["LN op + fused (triton)"] = apart
    return calls


def linear_section(p: Probe):
    """Each matmul of a GPT-2 decode step, fused (one launch) against the ops it replaces: device
    time and the weight bytes' GB/s. The first number GPT.fused_decode's default rests on. Each
    call reads its weight from memory, as in a step: the calls rotate through copies of the
    weight past twice the L2 cache (Probe.cold_device_us; the 2026-11-30 run timed one weight
    held in L2, which flattered the forms that keep few bytes in flight). The
    wide forms also with other column counts a program (kernels/linear.py's BLOCK_N, 16, for
    c_fc: 32 and 64; WIDE_BLOCK_N, 64, for lm_head: 16, 32, 128): every program re-reads all B
    input rows (and their LayerNorm statistics) from L2, which at B32 over lm_head's 3142
    programs of 16 columns is ~4x the weight bytes. The forms without a LayerNorm also with
    other K steps (TILE_ELEMENTS / rows; 8192 is the default, 2048 the step before it), those
    with one with their other K step (NARROW_LN_BLOCK_K, 256, for c_attn and c_fc: 128;
    BLOCK_K, 128, for lm_head: 256), all with 2 and 4 weight tiles in flight (NUM_STAGES, 3: the
    bytes a program keeps in flight bound these matmuls) and with LayerNorm
    statistics over 2048- and 4096-value tiles (STATS_ELEMENTS; 8192 is the default: 64 values a
    thread from 8 rows on, which takes the kernel from 72 to 128-168 registers: 3 programs an SM
    instead of 7 at 16 rows, which matters to lm_head's 3142 programs; at B1 the tile is one
    row, 77 registers, either way). Up to 4 rows the narrow forms also as the matrix-vector kernel
    (kernels/linear.py's _gemv_kernel, GPT's default at one row: GEMV_MAX_ROWS) against the tiled
    one, with 4, 8 (the default) and 16 KB of weight rows a program (GEMV_TILE_BYTES; lm_head:
    16 and 32 KB, GEMV_WIDE_TILE_BYTES), at B1 also with 2 and 8 warps (GEMV_WARPS, 4); the tiled
    kernel's knobs are swept at B1 and B32, with the matrix-vector kernel off. From 2 rows the
    forms without a LayerNorm (c_proj) also without K splits (SPLIT_K_MAX 1; the default splits
    the MLP's c_proj in 3-4)."""
    from fastgpt.kernels import linear as tri_linear
    from fastgpt.ops.linear import COUNTER_COLUMNS

    C = 32 if p.smoke else 768
    forms = [("ln_1 + c_attn", C, 3 * C, True, False), ("attn c_proj", C, C, False, False),
             ("ln_2 + c_fc + gelu", C, 4 * C, True, True), ("mlp c_proj", 4 * C, C, False, False),
             ("ln_f + lm_head", C, 96 if p.smoke else 50257, True, False)]
    knobs = ("BLOCK_N", "WIDE_BLOCK_N", "TILE_ELEMENTS", "BLOCK_K", "NARROW_LN_BLOCK_K", "STATS_ELEMENTS", "NUM_STAGES",
             "GEMV_MAX_ROWS", "GEMV_TILE_BYTES", "GEMV_WIDE_TILE_BYTES", "GEMV_WARPS", "SPLIT_K_MAX")  # fmt: skip
    defaults = {knob: getattr(tri_linear, knob) for knob in knobs}
    tiled = {**defaults, "GEMV_MAX_ROWS": 0}
    with knobs_kept(tri_linear, *defaults):
        for B in (1, 2) if p.smoke else (1, 2, 4, 16, 32):
            for name, K, N, ln, gelu in forms:
                inputs = p.randn(B, K), p.randn(B, K)
                params = p.randn(N), p.randn(K), p.randn(K)
                weight_bytes = N * K * 2
                weights = [p.randn(N, K) / K ** 0.5 for _ in range(p.copies(weight_bytes))]
                counters = torch.zeros(-(-N // COUNTER_COLUMNS), dtype=torch.int32, device=p.device)
                copies = [linear_calls(*inputs, w, *params, ln, gelu, counters) for w in weights]  # a weight each
                calls = {impl: [c[impl] for c in copies] for impl in copies[0]}
                fused = calls["fused (triton)"]
                impls = [(impl, fns, defaults) for impl, fns in calls.items()]
                if not ln and B > 1:  # the tiled kernel's K splits (SPLIT_K_MAX, 4) against none
                    impls += [("fused (triton), SPLIT_K_MAX 1", fused, {**defaults, "SPLIT_K_MAX": 1})]
                wide = N >= tri_linear.WIDE_N
                if B <= 4:
                    tile = "GEMV_WIDE_TILE_BYTES" if wide else "GEMV_TILE_BYTES"
                    impls += [("fused (triton), tiled", fused, tiled)]
                    sizes = (8,) if p.smoke else (16, 32) if wide else (4, 8, 16)
                    gemv = {**defaults, "GEMV_MAX_ROWS": 4}
                    impls += [(f"fused (triton), gemv {kb} KB", fused, {**gemv, tile: kb * 1024}) for kb in sizes]
                    if B == 1 and not wide:  # its warps (GEMV_WARPS, 4) at the default tile
                        impls += [(f"fused (triton), gemv {w} warps", fused, {**gemv, "GEMV_WARPS": w})
                                  for w in ((2,) if p.smoke else (2, 8))]
                sweeps = {"BLOCK_N": [32, 64] if N >= 4 * C and not wide else [],
                          "WIDE_BLOCK_N": [16, 32, 128] if wide else [],
                          "TILE_ELEMENTS": [] if ln else [2048, 4096, 16384], "BLOCK_K": [256] if ln and wide else [],
                          "NARROW_LN_BLOCK_K": [128] if ln and not wide else [],
                          "STATS_ELEMENTS": [2048, 4096] if ln else [], "NUM_STAGES": [2, 4]}  # fmt: skip
                # The tiled kernel's knobs (set from this section's sweep at B 1 / 4 / 16 / 32 on
                # 2026-11-30) again at B1 (against the matrix-vector kernel) and B32 only; the
                # smoke run tries each knob once, at B1.
                for knob, values in sweeps.items():
                    values = values[:1] if p.smoke and B == 1 else [] if p.smoke or B not in (1, 32) else values
                    impls += [(f"fused (triton), {knob} {v}", fused, {**tiled, knob: v}) for v in values]
                for impl, fns, knobs in impls:
                    def measure(fns=fns, weight_bytes=weight_bytes, knobs=knobs):
                        for knob, value in knobs.items():
                            setattr(tri_linear, knob, value)
                        d = p.cold_device_us(fns)
                        return {"device_us": d, "weight_gbps": weight_bytes / d / 1e3, "weight_copies": len(fns)}
                    p.record("linear", {"form": name, "B": B, "K": K, "N": N, "impl": impl}, measure)


def probe_gpt(p: Probe):
    """(config, dtype, model): GPT-2 124M with random weights in bf16 on auto's kernels; with
    smoke, a one-layer toy in fp16 on the Triton interpreter's. For the whole-step sections."""
    from fastgpt.model import GPT, GPTConfig

    small = {"vocab_size": 96, "n_positions": 64, "n_embd": 64, "n_layer": 1, "n_head": 2}
    config = GPTConfig(**small) if p.smoke else GPTConfig()
    dtype = torch.float16 if p.smoke else torch.bfloat16
    model = GPT(config).to(p.device, dtype).eval()
    model.backend = "triton" if p.smoke else "auto"  # the interpreter's kernels on the CPU
    return config, dtype, model


def step_inputs(p: Probe, config, dtype, B: int):
    """(cache, tok, pos, seqlens) of a decode step: a KVCache of random values, 288 slots (the
    generate benchmark's 32 + 256; with smoke, 32), B rows, each at position 160 (5/9 of the way)."""
    from fastgpt.decoder import KVCache

    length = 32 if p.smoke else 288
    cache = KVCache(config, B, length, dtype, p.device)
    cache.kv.normal_()
    tok = torch.randint(0, config.vocab_size, (B,), device=p.device)  # (B,)
    pos = torch.full((B,), length * 5 // 9, device=p.device)  # (B,) int64
    return cache, tok, pos, (pos + 1).int()


def decode_step_section(p: Probe):
    """GPT-2 124M's decode step at B1 and B32 (GPT.decode, fused: 61 launches) under graph
    replay, its kernels launched as programmatic dependents whose matmuls prefetch their weights
    into L2 before they wait (the default from sm_90; kernels/pdl.py), as dependents without the
    prefetch (kernels/linear.py's PREFETCH_WEIGHTS), and as plain launches (FASTGPT_PDL=0): what
    the overlap at the ~60 kernel boundaries saves a step. At B1 also with the matmuls on the tiled
    kernel (kernels/linear.py's GEMV_MAX_ROWS 0) rather than the matrix-vector one; at B32, launched
    plainly (as generate's captured B32 step is), also without the output projections' K splits
    (SPLIT_K_MAX 1). And the unfused step (GPT.fused_decode = False: nn.Linear, cuBLAS, and the
    LayerNorm op), launched as generate's step would be, which at B32 was the faster in the
    benchmark (fastgpt[cuda], 41,447 tok/s against the fused step's 36,666 on triton, before the
    fused step's changes). Random weights, bf16, a 288-slot cache (the generate benchmark's 32 +
    256) at position 160."""
    from fastgpt.kernels import linear as tri_linear

    config, dtype, model = probe_gpt(p)
    gemv_rows, splits = tri_linear.GEMV_MAX_ROWS, tri_linear.SPLIT_K_MAX
    with (env_kept(_backends.PDL_ENV_VAR), knobs_kept(tri_linear, "PREFETCH_WEIGHTS", "GEMV_MAX_ROWS", "SPLIT_K_MAX"),
          torch.inference_mode()):  # fmt: skip
        for B in (1,) if p.smoke else (1, 32):  # the generate targets' batches
            cache, tok, pos, seqlens = step_inputs(p, config, dtype, B)
            variants = [(True, True, gemv_rows, splits), (True, False, gemv_rows, splits),
                        (False, False, gemv_rows, splits)]  # fmt: skip
            variants += [(True, True, 0, splits)] if B <= gemv_rows else [(False, False, gemv_rows, 1)]
            for on, prefetch, rows, split in variants[:1] if p.smoke else variants:  # on the CPU all are the same
                def measure(on=on, prefetch=prefetch, rows=rows, split=split, cache=cache, tok=tok, pos=pos,
                            seqlens=seqlens, B=B):  # fmt: skip
                    os.environ[_backends.PDL_ENV_VAR] = "1" if on else "0"
                    tri_linear.PREFETCH_WEIGHTS = prefetch
                    tri_linear.GEMV_MAX_ROWS = rows
                    tri_linear.SPLIT_K_MAX = split
                    d = p.device_us(lambda: model.decode(tok, pos, cache, seqlens), per_replay=5, replays=15)
                    return {"device_us": d, "tok_per_s": B * 1e6 / d}
                row = {"B": B, "pdl": on, "prefetch": prefetch, "gemv_max_rows": rows, "split_k_max": split}
                p.record("decode_step", row, measure)

            def measure_unfused(cache=cache, tok=tok, pos=pos, seqlens=seqlens, B=B):
                os.environ[_backends.PDL_ENV_VAR] = "1"  # the default; generate's capture launches big steps plainly
                model.fused_decode = False
                try:
                    with _backends.plain_launches(B >= _backends.PDL_PLAIN_ROWS):
                        d = p.device_us(lambda: model.decode(tok, pos, cache, seqlens), per_replay=5, replays=15)
                finally:
                    model.fused_decode = True
                return {"device_us": d, "tok_per_s": B * 1e6 / d}

            p.record("decode_step", {"B": B, "fused_decode": False}, measure_unfused)


def persistent_step_section(p: Probe):
    """GPT-2 124M's decode step as one persistent kernel (GPT.persistent_decode, kernels/step.py)
    against the fused step (61 launches, PDL as by default) at B 1, 4 and 8 under graph replay,
    then (a run cut short keeps those) at B1 over the kernel's knobs: the weight bytes an item
    holds (TILE_BYTES, lm_head's HEAD_TILE_BYTES), the programs an SM (PROGRAMS_PER_SM, of which
    the launches after a kernel's first take no more than its registers let an SM hold), the
    items a claim (ITEMS_PER_CLAIM), a register cap (MAX_REGISTERS: 96 for 5 programs an SM),
    the L2 prefetch of the weights 1 and 2 rounds of claims ahead (PREFETCH_ROUNDS; 0, off, by
    default) and the next claim taken while a claim's items run (CLAIM_AHEAD; off by default),
    alone and with the prefetch. Each variant's logits are first compared with the fused step's
    (max_abs_diff) on a copy of the cache, and gave_up (a wait that ran out: a bug) read after;
    a variant that gave up or differs by more than 0.25 is not timed (nor one that gave up while
    timed: gave_up_in_timing; the flag is cleared after each look). Random weights, bf16, a
    288-slot cache at position 160."""
    from fastgpt.kernels import step as tri_step
    from fastgpt.ops.step import GAVE_UP

    config, dtype, model = probe_gpt(p)
    knobs = ("TILE_BYTES", "HEAD_TILE_BYTES", "PROGRAMS_PER_SM", "ITEMS_PER_CLAIM", "MAX_REGISTERS",
             "PREFETCH_ROUNDS", "CLAIM_AHEAD")
    default = tuple(getattr(tri_step, k) for k in knobs)
    batches = (1,) if p.smoke else (1, 4, 8)
    runs = [(B, persistent, default) for B in batches for persistent in (False, True)]  # first: each B's default
    if not p.smoke:  # then the knobs at B1
        runs += [(1, True, values) for values in
                 ((8192, 8192, 4, 2, None, 1, False), (8192, 8192, 4, 2, None, 2, False),
                  (8192, 8192, 4, 2, None, 0, True), (8192, 8192, 4, 2, None, 1, True),
                  (8192, 8192, 4, 1, None, 0, False), (8192, 8192, 4, 4, None, 0, False),
                  (8192, 8192, 5, 2, 96, 0, False), (4096, 4096, 4, 2, None, 0, False),
                  (16384, 16384, 2, 2, None, 0, False), (8192, 16384, 4, 2, None, 0, False),
                  (8192, 8192, 2, 2, None, 0, False), (8192, 8192, 3, 2, None, 0, False))]  # fmt: skip
    inputs = {B: step_inputs(p, config, dtype, B) for B in batches}

    def gave_up(cache) -> int:
        """Whether a wait of the steps since the last look gave up (a bug), and the flag cleared:
        left set, it would make every later step's waits give up at once (fastgpt.ops.step)."""
        flag = int(cache.step_sync[GAVE_UP].item())
        cache.step_sync[GAVE_UP] = 0
        return flag

    with knobs_kept(tri_step, *knobs), torch.inference_mode():
        for B, persistent, values in runs:
            def measure(persistent=persistent, values=values, inputs=inputs[B], B=B):
                cache, tok, pos, seqlens = inputs
                for knob, value in zip(knobs, values):
                    setattr(tri_step, knob, value)
                model.persistent_decode = persistent
                row = {}
                if persistent:
                    kv = cache.kv.clone()
                    model.persistent_decode = False
                    expected = model.decode(tok, pos, cache, seqlens).float()
                    cache.kv.copy_(kv)
                    model.persistent_decode = True
                    got = model.decode(tok, pos, cache, seqlens).float()
                    cache.kv.copy_(kv)
                    row = {"max_abs_diff": (got - expected).abs().max().item(), "gave_up": gave_up(cache)}
                    if row["gave_up"] or not row["max_abs_diff"] <= 0.25:
                        return row | {"device_us": None}
                d = p.device_us(lambda: model.decode(tok, pos, cache, seqlens), per_replay=5, replays=15)
                if persistent and gave_up(cache):  # a wait gave up in a timed step: its time means nothing
                    return row | {"gave_up_in_timing": 1, "device_us": None}
                return row | {"device_us": d, "tok_per_s": B * 1e6 / d}

            row = {"B": B, "step": "persistent" if persistent else "fused", **dict(zip(knobs, values))}
            p.record("persistent_step", row, measure)
        model.persistent_decode = False


def step_kernels_section(p: Probe):
    """Where decode_step's time goes: GPT-2 124M's decode step at B1 and B32 (PDL as by default)
    captured in a CUDA graph, 20 replays traced by torch's profiler (CUPTI). A row per kernel
    name: calls a step, device us a call and a step, most first; then the step's row: its span
    on the device (first kernel's start to last kernel's end), its kernels' sum, the gap between
    (idle: launch latency, the graph's dependencies), launches a step, and untraced_us, the same
    step timed by CUDA events without the tracer (decode_step's device_us), to tell what tracing
    added. Under PDL a dependent kernel starts before its predecessor ends and waits for it:
    its time includes that wait, so the sum can exceed the span (a negative gap: overlap); hence
    B1 also launched plainly (FASTGPT_PDL=0), each kernel's own time.
    With smoke, two calls on the CPU, the top-level torch ops as the kernels (host time), five rows."""
    config, dtype, model = probe_gpt(p)
    steps = 2 if p.smoke else 20
    with env_kept(_backends.PDL_ENV_VAR), torch.inference_mode():
        # (Captured steps of 32 rows launch plainly either way: _backends.PDL_PLAIN_ROWS.)
        for B, pdl in [(1, True)] if p.smoke else [(1, True), (1, False), (32, True)]:
            cache, tok, pos, seqlens = step_inputs(p, config, dtype, B)
            kernels = []

            def measure(cache=cache, tok=tok, pos=pos, seqlens=seqlens, kernels=kernels, pdl=pdl):
                def step():
                    return model.decode(tok, pos, cache, seqlens)

                os.environ[_backends.PDL_ENV_VAR] = "1" if pdl else "0"
                summary, rows = step_table(traced_steps(p, step, steps), steps)
                kernels.extend(rows)
                return {**summary, "untraced_us": p.device_us(step, per_replay=5, replays=15)}

            p.record("step_kernels", {"B": B, "pdl": pdl, "kernel": "(step)"}, measure)
            for row in kernels[:5] if p.smoke else kernels:  # measured already: kept past the time limit
                p.add("step_kernels", {"B": B, "pdl": pdl, **row})


def lookup_step_section(p: Probe):
    """generate's whole step under graph replay, greedy, GPT-2 124M (bf16, random weights): the
    plain decode step against prompt lookup's with k = 1, 2, 4, 8 drafts. A lookup step emits 1 to
    k + 1 tokens; it pays where the accepted drafts a step, plus one, exceed its time over the
    plain step's ("breakeven"). The lookup's state is held still (its row limit reached: nothing
    emitted), so every replay does the same work at the same cache length (160 of 288 slots + k)."""
    from fastgpt.decoder import Decoder
    from fastgpt.generate import EOS_SLOTS, _sampling
    from fastgpt.speculative import PromptLookup

    config, dtype, model = probe_gpt(p)
    length, T = (32, 8) if p.smoke else (288 + 8, 160)
    with torch.inference_mode():
        for B in (1,) if p.smoke else (1, 8):
            decoder = Decoder(model, B, length, EOS_SLOTS)
            decoder.cache.kv.normal_()
            decoder.reset(_sampling(B, p.device, 0.0, 0, 1.0, 0.0), [], 0, all_greedy=True)
            idx = torch.randint(0, config.vocab_size, (B, T), device=p.device)
            lengths = torch.full((B,), T, device=p.device)
            decoder.tok.copy_(idx[:, -1])
            decoder.pos.copy_(lengths - 1)
            decoder.seqlens.copy_(lengths)
            plain = {}

            def measure_plain(decoder=decoder, B=B):
                pos = decoder.pos.clone()

                def step():  # held at one position, as the lookup steps are
                    decoder.decode_step()
                    decoder.pos.copy_(pos)
                    decoder.step.zero_()

                plain["us"] = p.device_us(step, per_replay=5, replays=15)
                return {"device_us": plain["us"], "tok_per_s": B * 1e6 / plain["us"]}

            p.record("lookup_step", {"B": B, "k": 0}, measure_plain)
            for k in (1, 2) if p.smoke else (1, 2, 4, 8):
                def measure(k=k, decoder=decoder, idx=idx, lengths=lengths):
                    lookup = PromptLookup(decoder, k, 2)
                    lookup.reset(idx, lengths, 1)  # the limit of one new token, already emitted
                    us = p.device_us(lookup.step, per_replay=5, replays=15)
                    return {"device_us": us, "breakeven": us / plain["us"] if plain.get("us") else None}

                p.record("lookup_step", {"B": B, "k": k}, measure)


def generate_parts_section(p: Probe):
    """What a whole generate call spends outside its decode steps: GPT-2 124M (bf16, random
    weights, greedy, a 32-token prompt) at B1 and B32, the wall time of a call making one token
    (the checks, the prefill and its first token) with the prefill replayed from its CUDA graph
    (fastgpt.decoder's Decoder.prefill: the third call of a length) and eager (cuda_graph=False),
    and of a call making 256 (the benchmark's): step_us is what each of its 255 decode steps
    adds. Median of a few calls, each synchronized."""
    config, _, model = probe_gpt(p)
    T, steps = (8, 4) if p.smoke else (32, 256)
    calls = 1 if p.smoke else 7

    def wall_us(fn) -> float:  # two warm-ups: the first prefill of a length eager, the second captures it
        times = timing.time_host(lambda i: fn(), calls, torch.device(p.device), warmup=2)
        return 1e3 * timing.summarize(times, "host-clock").median

    for B in (1,) if p.smoke else (1, 32):
        idx = torch.randint(0, config.vocab_size, (B, T), device=p.device)
        one = {}
        for graph in (True, False):
            def measure(graph=graph, idx=idx):
                us = wall_us(lambda: model.generate(idx, 1, cuda_graph=graph and not p.smoke))
                one.setdefault("us", us)
                return {"wall_us": us}

            p.record("generate_parts", {"B": B, "new_tokens": 1, "prefill_graph": graph}, measure)

        def measure_all(idx=idx, B=B):
            us = wall_us(lambda: model.generate(idx, steps, cuda_graph=not p.smoke))
            step = (us - one["us"]) / (steps - 1) if "us" in one else None
            return {"wall_us": us, "tok_per_s": B * steps * 1e6 / us, "step_us": step}

        p.record("generate_parts", {"B": B, "new_tokens": steps, "prefill_graph": True}, measure_all)


def profile_section(p: Probe):
    B, H, S, D = attn_shapes(p)[0]
    q, k, v = (p.randn(B, H, S, D) for _ in range(3))
    fastgpt.attention(q, k, v, causal=True, backend="triton")
    p.sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5 if p.smoke else 50):
        fastgpt.attention(q, k, v, causal=True, backend="triton")
    prof.disable()
    p.sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    p.results["profile"] = text.getvalue()
    print(text.getvalue()[-3500:], flush=True)


SECTIONS = {"attention": attention_section, "overhead": overhead_section, "tiles": tiles_section,
            "few_queries": few_queries_section,
            "decode_batch": decode_batch_section, "decode_tiles": decode_tiles_section,
            "layer_norm_rows": layer_norm_rows_section,
            "sample_batch": sample_batch_section, "sample_top_p": sample_top_p_section,
            "sample_blocks": sample_blocks_section,
            "sample_cand": sample_cand_section,
            "linear": linear_section, "decode_step": decode_step_section,
            "persistent_step": persistent_step_section, "step_kernels": step_kernels_section,
            "lookup_step": lookup_step_section, "generate_parts": generate_parts_section,
            "profile": profile_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in this order")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; later measurements are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--merge", action="store_true", help="add to $OUT/probe.json rather than start it afresh")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on the CPU)")
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    probe = Probe(args.smoke, args.time_limit, out)
    if args.merge:
        probe.load()
    for i, name in enumerate(names):
        start = time.time()
        try:
            SECTIONS[name](probe)
        except Exception as exc:  # a section's setup failing must not cost the others
            probe.results[name + "_error"] = repr(exc)
            print(f"{name}: {exc!r}", flush=True)
        print(f"== {name}: {time.time() - start:.0f} s", flush=True)
        lost = probe.cuda_lost()
        if lost:
            probe.results[name + "_cuda_lost"] = lost
        probe.save()
        if lost and names[i + 1:]:
            return continue_elsewhere(probe, name, lost, names[i + 1:])
    return 0


def continue_elsewhere(probe: Probe, name: str, lost: str, rest: list[str]) -> int:
    """A fault in `name`'s kernels left this process's CUDA context unusable: the sections after it
    run in a fresh process, adding to probe.json, in the time left. Returns its exit status."""
    print(f"== the CUDA context was lost in {name} ({lost}); {','.join(rest)} in a fresh process", flush=True)
    left = probe.seconds_left()
    command = [sys.executable, os.path.abspath(__file__), "--sections", ",".join(rest), "--merge"]
    command += [] if left is None else ["--time-limit", f"{left:.1f}"]
    return subprocess.run(command, env=dict(os.environ, OUT=probe.out)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
