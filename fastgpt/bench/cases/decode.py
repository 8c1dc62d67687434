"""Decode attention: Q new query tokens per row (1: a decode step; a few: speculative decoding's
drafts) over a static KV cache.

fastgpt.decode_attention vs SDPA (each backend forced) on the same cache, and flashinfer's
batch decode (Q = 1) if installed. Every row is full (cache_seqlens = L = Smax), so SDPA's
attention over the whole cache (unmasked at Q = 1, causal aligned bottom-right above) computes
the same thing.

Bytes: q, the K and V cache over the valid lengths, cache_seqlens and the output, each once
(formulas.decode_bytes).
"""

from __future__ import annotations

import torch

from fastgpt.bench import formulas
from fastgpt.bench.cases import describe, fastgpt_candidates, generator, randn, sweep_of
from fastgpt.bench.cases.attention import sdpa_candidates, sdpa_fn
from fastgpt.bench.core import REFERENCE, Candidate, Case, Unavailable
from fastgpt.bench.env import dist_version, optional_module

KEYS = {"B": 64, "H": 12, "HKV": 0, "L": 4096, "D": 64, "Q": 1}  # HKV 0: same as H; Q: queries a row
POSITIVE = ("B", "H", "L", "D", "Q")  # sizes of at least 1 (parse_spec)
DEFAULT_DTYPE = torch.bfloat16


def shapes(quick: bool):
    """(params, sweep, x key): the 64 MB-cache target, GPT-2's batch-1 step, an L sweep; the full
    run adds a GQA model's verification of 4 and 8 drafted tokens."""
    def shape(B, H, L, D, HKV=0, Q=1):
        return dict(KEYS, B=B, H=H, L=L, D=D, HKV=HKV, Q=Q)

    if quick:
        return [(shape(64, 12, 1024, 64), "B64 H12 D64", "L"),
                (shape(64, 12, 4096, 64), "B64 H12 D64", "L"),
                (shape(1, 12, 1024, 64), "B1 H12 D64", "L")]
    plan = [(shape(64, 12, L, 64), "B64 H12 D64", "L") for L in (512, 1024, 2048, 4096, 8192, 16384)]
    plan += [(shape(1, 12, L, 64), "B1 H12 D64", "L") for L in (256, 1024, 4096, 16384, 32768)]
    plan += [(shape(16, 32, L, 128, HKV=8), "B16 H32/8 D128 (GQA)", "L") for L in (1024, 4096, 16384)]
    plan += [(shape(B, 32, L, 128, HKV=8, Q=Q), f"B{B} H32/8 D128 Q{Q} (drafts)", "L")
             for B, Q in ((1, 4), (1, 8), (16, 4)) for L in (4096, 32768)]
    return plan


def make_case(p: dict, device: torch.device, dtype: torch.dtype, sweep=None, x_key=None) -> Case:
    """One decode case: q (B, H, Q, D), k/v cache (B, HKV, L, D), every row of length L."""
    p = dict(p, HKV=p["HKV"] or p["H"])
    B, H, Hkv, L, D, Q = (p[k] for k in ("B", "H", "HKV", "L", "D", "Q"))
    scale = D**-0.5

    def make_inputs(seed):
        g = generator(device, seed)
        return {"q": randn((B, H, Q, D), gen=g, device=device, dtype=dtype),
                "k_cache": randn((B, Hkv, L, D), gen=g, device=device, dtype=dtype),
                "v_cache": randn((B, Hkv, L, D), gen=g, device=device, dtype=dtype),
                "cache_seqlens": torch.full((B,), L, dtype=torch.int32, device=device)}

    def reference(inp):
        from fastgpt import reference as ref

        return ref.decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"], scale=scale)

    nbytes = formulas.decode_bytes(B, H, Hkv, D, B * L, dtype, Q)
    sw, x, x_label = sweep_of(p, sweep, x_key)
    name = describe(p, ("B", "H") + (("HKV",) if Hkv != H else ()) + ("L", "D") + (("Q",) if Q > 1 else ()))
    return Case(op="decode", name=name, params=p, dtype=dtype, make_inputs=make_inputs, reference=reference,
                candidates=candidates(device, scale, Hkv != H, p), metric="GB/s", work=nbytes, ceiling="read_gbps",
                set_bytes=nbytes, sweep=sw, x=x, x_label=x_label)


def candidates(device, scale: float, gqa: bool, p: dict) -> list[Candidate]:
    def fastgpt_fn(backend):
        import fastgpt

        return lambda inp: fastgpt.decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                                    scale=scale, backend=backend)

    out = fastgpt_candidates(device, fastgpt_fn)
    Q = p["Q"]
    out += sdpa_candidates(lambda name: _on_cache(sdpa_fn(name, Q > 1, scale, gqa, Q, p["L"])), note=", full cache")
    out.append(Candidate("flashinfer batch decode", REFERENCE, lambda: flashinfer_fn(device, scale, p),
                         note=dist_version("flashinfer-python", "flashinfer")))
    return out


def _on_cache(attn):
    """An attention fn over (q, k, v) applied to the decode inputs (the whole cache)."""
    return lambda inp: attn({"q": inp["q"], "k": inp["k_cache"], "v": inp["v_cache"]})


def flashinfer_fn(device, scale: float, p: dict):
    """flashinfer's paged batch decode, the static cache seen as one page per row.

    k_cache (B, HKV, L, D) is exactly flashinfer's "HND" paged layout (pages, heads, page_size,
    D) with page_size = L: row b owns page b. The plan is made once, outside the timing.
    """
    flashinfer, reason = optional_module("flashinfer")
    if flashinfer is None:
        raise Unavailable(reason)
    B, H, Hkv, L, D = (p[k] for k in ("B", "H", "HKV", "L", "D"))
    if p["Q"] != 1:
        raise Unavailable("flashinfer's batch decode takes one query a row")
    i32 = dict(dtype=torch.int32, device=device)
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    indptr, indices = torch.arange(B + 1, **i32), torch.arange(B, **i32)
    last_page_len = torch.full((B,), L, **i32)
    planned = {}

    def fn(inp):
        dtype = inp["q"].dtype
        if dtype not in planned:
            wrapper.plan(indptr, indices, last_page_len, H, Hkv, D, L, q_data_type=dtype,
                         kv_data_type=dtype, sm_scale=scale)
            planned[dtype] = True
        out = wrapper.run(inp["q"][:, :, 0, :], (inp["k_cache"], inp["v_cache"]))  # (B, H, D)
        return out.unsqueeze(2)

    return fn

