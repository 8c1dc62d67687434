"""Sampling: fastgpt.sample vs HF's processor chain + multinomial, softmax + multinomial, argmax,
flashinfer.

A draw is random, so the check is membership: over several draws, every id must lie in the
set that fastgpt.reference.filter_logits keeps (HF's semantics exactly). References with other
semantics are checked against their own: plain softmax + multinomial may draw any finite
logit, argmax must equal the reference's greedy id, flashinfer's top-p boundary rule differs
from HF's in the last token, so its draws are checked against the top-k set.
Bytes: the (B, V) logits read once (formulas.sampling_bytes).
"""

from __future__ import annotations

import torch

from fastgpt.bench import checks, formulas
from fastgpt.bench.cases import describe, fastgpt_candidates, generator, randn, sweep_of
from fastgpt.bench.core import REFERENCE, Candidate, Case, Unavailable
from fastgpt.bench.env import dist_version, optional_module

KEYS = {"B": 32, "V": 50257, "T": 0.8, "K": 50, "P": 0.9, "MINP": 0.0}
POSITIVE = ("B", "V")  # sizes of at least 1 (parse_spec); K 0 keeps every token
DEFAULT_DTYPE = torch.float32
LOGIT_SCALE = 3.0  # spread of the random logits: a few dozen tokens survive top-k 50 / top-p 0.9


def shapes(quick: bool):
    """(params, sweep, x key): GPT-2's vocabulary at B 1..256 (the targets), then more."""
    def shape(B, V=50257, **kw):
        return dict(KEYS, B=B, V=V, **kw)

    sweep = "V50257 t0.8 k50 p0.9"
    if quick:
        return [(shape(B), sweep, "B") for B in (1, 32, 256)] + [(shape(32, T=0.0), None, None)]
    plan = [(shape(B), sweep, "B") for B in (1, 8, 32, 128, 256, 1024)]
    plan += [(shape(B, V=128256), "V128256 t0.8 k50 p0.9", "B") for B in (1, 32, 256)]
    plan += [(shape(B, T=0.0), "V50257 greedy", "B") for B in (1, 32, 256)]
    plan += [(shape(32, K=0, P=1.0, MINP=0.05), None, None)]
    return plan


def make_case(p: dict, device: torch.device, dtype: torch.dtype, sweep=None, x_key=None) -> Case:
    """One case: logits (B, V) in `dtype` with the same parameters on every row."""
    B, V = p["B"], p["V"]

    def make_inputs(seed):
        return {"logits": randn((B, V), gen=generator(device, seed), device=device, dtype=dtype, scale=LOGIT_SCALE)}

    sw, x, x_label = sweep_of(p, sweep, x_key)
    greedy = p["T"] == 0
    nbytes = formulas.sampling_bytes(B, V, dtype)
    settings = "greedy" if greedy else f"t{p['T']:g} k{p['K']} p{p['P']:g}" + (f" minp{p['MINP']:g}" if p["MINP"] else "")
    return Case(op="sampling", name=f"{describe(p, ('B', 'V'))} {settings}", params=p, dtype=dtype,
                make_inputs=make_inputs, reference=lambda inp: reference_sets(inp["logits"], p),
                candidates=candidates(device, p), metric="GB/s", work=nbytes, ceiling="read_gbps", set_bytes=nbytes,
                sweep=sw, x=x, x_label=x_label, check=check_greedy if greedy else check_draws)


def reference_sets(logits: torch.Tensor, p: dict) -> dict:
    """What each check needs, from fastgpt.reference: kept sets (B, V) bool and greedy ids (B,)."""
    from fastgpt import reference as ref

    B = logits.shape[0]
    clean = ref.clean_logits(logits)

    def row(value, dtype):
        return torch.full((B,), value, dtype=dtype, device=logits.device)

    t = row(p["T"] if p["T"] > 0 else 1.0, torch.float32)
    # draw_scores: filter_logits' set, with a tie group that top-p splits whole, as sample draws
    kept = ref.draw_scores(clean, t, row(p["K"], torch.int64), row(p["P"], torch.float64), row(p["MINP"], torch.float32))
    top_k = ref.filter_logits(clean, t, row(p["K"], torch.int64), row(1.0, torch.float64), row(0.0, torch.float32))
    return {"kept": torch.isfinite(kept), "kept_top_k": torch.isfinite(top_k),
            "finite": torch.isfinite(clean), "greedy": clean.argmax(dim=-1)}


def _draws(B: int) -> int:
    """Draws per check: enough rows in total that a sampler ignoring a filter gets caught."""
    return max(2, min(32, 512 // B))


def check_draws(run, inputs, expected, kept="kept") -> str | None:
    """Every id of several draws lies in the reference's kept set."""
    for _ in range(_draws(expected[kept].shape[0])):
        reason = checks.ids_in_kept_set(run(), expected[kept])
        if reason:
            return reason
    return None


def check_greedy(run, inputs, expected) -> str | None:
    """The ids equal the reference's argmax (first index on ties)."""
    return checks.ids_equal(run(), expected["greedy"])


def candidates(device, p: dict) -> list[Candidate]:
    T, K, P, MINP = p["T"], p["K"], p["P"], p["MINP"]

    def fastgpt_fn(backend):
        import fastgpt

        return lambda inp: fastgpt.sample(inp["logits"], temperature=T, top_k=K, top_p=P, min_p=MINP, backend=backend)

    out = fastgpt_candidates(device, fastgpt_fn)
    for cand in out:
        if cand.backend == "triton":
            cand.details = lambda: triton_path(p["B"], p["V"], p["K"], device)
    argmax = Candidate("torch.argmax", REFERENCE, lambda: lambda inp: inp["logits"].argmax(dim=-1),
                       note="greedy" if T == 0 else "greedy: a lower bound, not sampling", check=check_greedy,
                       lower_bound=T != 0)
    if T == 0:
        return out + [argmax]
    out.append(Candidate("HF processors + multinomial", REFERENCE, lambda: hf_chain_fn(p),
                         note=dist_version("transformers")))
    out.append(Candidate("softmax + multinomial", REFERENCE, lambda: lambda inp: torch.multinomial(
        torch.softmax(inp["logits"].float() / T, dim=-1), 1).squeeze(1), note="no filtering: a lower bound",
        check=lambda run, inputs, expected: check_draws(run, inputs, expected, kept="finite"), lower_bound=True))
    out.append(argmax)
    out.append(Candidate("flashinfer top_k_top_p_sampling_from_logits", REFERENCE, lambda: flashinfer_fn(p),
                         note=dist_version("flashinfer-python", "flashinfer"),
                         check=lambda run, inputs, expected: check_draws(run, inputs, expected, kept="kept_top_k")))
    return out


def triton_path(B: int, V: int, K: int, device: torch.device) -> str:
    """Which of the Triton sampler's paths these shapes and this top_k take on this GPU."""
    from fastgpt import _backends
    from fastgpt.kernels.sampling import split_chunks

    if _backends.sample_candidate_k(K):
        return f"candidate path: lists of {_backends.sample_candidate_k(K)}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    chunks = split_chunks(B, V, _backends.sm_count(index))
    return "one program per row" if chunks == 1 else f"split path: {chunks} vocabulary chunks per row"


def hf_chain_fn(p: dict):
    """What HF generate does per step when sampling: the warpers, softmax, multinomial."""
    processors, reason = optional_module("transformers.generation.logits_process")
    if processors is None:
        raise Unavailable(reason)
    chain = processors.LogitsProcessorList()
    if p["T"] != 1.0:
        chain.append(processors.TemperatureLogitsWarper(p["T"]))
    if p["K"] > 0:
        chain.append(processors.TopKLogitsWarper(p["K"]))
    if p["P"] < 1.0:
        chain.append(processors.TopPLogitsWarper(p["P"]))
    if p["MINP"] > 0:
        chain.append(processors.MinPLogitsWarper(p["MINP"]))
    input_ids = {}

    def fn(inp):
        logits = inp["logits"]
        if logits.shape[0] not in input_ids:  # the warpers take input_ids but these ignore them
            input_ids[logits.shape[0]] = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)
        scores = chain(input_ids[logits.shape[0]], logits)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return fn


def flashinfer_fn(p: dict):
    """flashinfer's fused top-k + top-p sampling from logits (temperature applied first)."""
    sampling, reason = optional_module("flashinfer.sampling")
    if sampling is None:
        raise Unavailable(reason)
    if p["MINP"] > 0:
        raise Unavailable("flashinfer's top_k_top_p sampler has no min-p")
    T, K, P = p["T"], p["K"], p["P"]
    return lambda inp: sampling.top_k_top_p_sampling_from_logits(inp["logits"] / T, K, P).long()
