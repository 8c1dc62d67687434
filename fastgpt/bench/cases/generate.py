"""End-to-end greedy generation: fastgpt's GPT vs transformers' generate vs a compiled static-KV
GPT-2 (the gpt-fast recipe, fastgpt/bench/gptfast.py), all on the same random weights.

With K > 0 (full runs: B1 K4), both sides decode by prompt lookup (K drafts a step from the
text so far, verified in one forward): fastgpt's generate(prompt_lookup_num_tokens=K) against
transformers' (which takes one row). A random model's greedy text tends to repeat itself, so
drafts may be accepted more often than on real text: compare these rows with each other only.

Reported: tok/s = B * new tokens / wall time of the whole call (prefill included, after
warm-up), and the weight-bandwidth utilisation: each decode step reads every weight once, so
(tok/s / B) * weight bytes / copy GB/s.

A generation is checked before it is timed, against an fp32 copy of the HF model used as the
oracle: the prompt is kept, B x N tokens come out, and every new token is the oracle's argmax
given the tokens before it, up to a tolerance for the candidate's dtype (bf16 candidates may
break near-ties differently, then continue from their own context, which is checked too).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from fastgpt.bench import core, formulas, timing
from fastgpt.bench.cases import fastgpt_candidates, generator
from fastgpt.bench.core import ERROR, FASTGPT, REFERENCE, SKIPPED, Candidate, Case, Checked, OracleFailed, Settings, Unavailable
from fastgpt.bench.env import dist_version, optional_module
from fastgpt.ops.step import MAX_ROWS as STEP_MAX_ROWS

KEYS = {"B": 1, "T": 32, "N": 256, "K": 0}  # K: prompt-lookup drafts a step (0: plain decoding)
POSITIVE = ("B", "T", "N")  # sizes of at least 1 (parse_spec); check_params: within the model's context
MODEL_CONFIGS = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),  # GPT-2 124M
    "tiny": dict(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4),  # for tests
}
# Left out of --quick on a GPU: compiling takes minutes (each batch size again).
QUICK_SKIP = {"HF generate (static cache + compile)": "left out of --quick: its compile takes minutes; run without --quick"}
# Largest allowed gap (in logits) between the oracle's best token and the one generated.
LOGIT_TOL = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.25}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shapes(quick: bool, device: torch.device) -> list[dict]:
    """The targets' shapes on a GPU (B 1 and 32, 256 new tokens); short runs on a CPU (quick: a
    smoke comparison that fits in about a minute on two cores; full: issue 2's B1 T32 N64)."""
    if device.type == "cuda":
        return [dict(KEYS, B=1), dict(KEYS, B=32)] + ([] if quick else [dict(KEYS, B=1, K=4)])
    if quick:
        return [dict(KEYS, B=1, N=16)]
    return [dict(KEYS, B=1, N=64), dict(KEYS, B=4, N=64), dict(KEYS, B=1, N=64, K=4)]


def check_params(params: dict, config_name: str) -> None:
    """A --shapes spec's T + N within the model's context (ValueError); parse_spec saw each >= 1."""
    context = MODEL_CONFIGS[config_name]["n_positions"]
    if params["T"] + params["N"] > context:
        raise ValueError(f"T + N = {params['T'] + params['N']} is past the {config_name} model's context of {context}")


def build_hf(config_name: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """A GPT2LMHeadModel with random weights (seeded, without touching the global RNG)."""
    transformers, reason = optional_module("transformers")
    if transformers is None:
        raise Unavailable(reason)
    config = transformers.GPT2Config(**MODEL_CONFIGS[config_name], bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn, dtype=dtype)
    return _ready(model)


def _ready(model):
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_variant(hf, attn: str, dtype: torch.dtype | None = None):
    """The same HF model with another attention implementation, sharing (or casting) the weights."""
    with torch.device("meta"):
        model = type(hf)._from_config(copy.deepcopy(hf.config), attn_implementation=attn, dtype=dtype or hf.dtype)
    state = hf.state_dict() if dtype is None else {k: v.to(dtype) for k, v in hf.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return _ready(model)


def greedy_check(oracle, T: int, N: int, tol: float):
    """check(run, inputs, expected): each new token is the oracle's argmax within `tol` logits."""
    def check(run, inputs, expected):
        idx, out = inputs["idx"], run()
        B = idx.shape[0]
        if tuple(out.shape) != (B, T + N):
            return f"output shape {tuple(out.shape)} != expected {(B, T + N)}"
        if out.is_floating_point() or not torch.equal(out[:, :T], idx):
            return "the prompt was not kept"
        V = oracle.config.vocab_size
        if bool(((out < 0) | (out >= V)).any()):  # before the oracle, which would raise on them
            return f"token ids outside [0, {V})"
        try:
            with torch.no_grad():
                logits = oracle(out[:, :-1].to(oracle.device)).logits.float()[:, T - 1:]  # (B, N, V)
        except Exception as exc:
            raise OracleFailed(f"the fp32 oracle model raised {core.describe(exc)}") from exc
        chosen = logits.gather(-1, out[:, T:, None].to(logits.device)).squeeze(-1)
        gap = logits.amax(dim=-1) - chosen
        bad = int((gap > tol).sum())
        if bad:
            return f"{bad} of {B * N} tokens are not the greedy choice (logit gap up to {float(gap.max()):.3g} > {tol:g})"
        return None

    return check


def fastgpt_fn(hf, backend: str, N: int, compile: bool = False, fused_decode: bool = True, lookup: int = 0,
               persistent: bool = False):  # fmt: skip
    """fastgpt.GPT on the HF weights, every op on `backend` (CUDA graph: the model's default);
    with `compile`, its decode forward through torch.compile too; fused_decode=False: decode
    steps on nn.Linear + the LayerNorm op instead of fastgpt.ops.linear (see GPT.decode);
    lookup > 0: prompt-lookup decoding with that many drafts a step; persistent: decode steps as
    one persistent kernel (GPT.persistent_decode)."""
    from fastgpt.model import GPT

    model = GPT.from_hf(hf)
    model.backend = backend  # every op of the model (attention, LayerNorm, sampling) honours it
    model.fused_decode = fused_decode
    model.persistent_decode = persistent
    return lambda inp: model.generate(inp["idx"], N, temperature=0.0, compile=compile, prompt_lookup_num_tokens=lookup)


def hf_fn(hf, attn: str, N: int, static: bool = False, lookup: int = 0):
    """transformers' generate, greedy; static=True: static cache, forward auto-compiled by HF;
    lookup > 0: prompt-lookup decoding with that many drafts a step."""
    model = hf_variant(hf, attn)
    extra = {"cache_implementation": "static"} if static else {"disable_compile": True}
    if lookup:
        extra["prompt_lookup_num_tokens"] = lookup

    def fn(inp):
        with torch.no_grad():
            return model.generate(inp["idx"], attention_mask=inp["mask"], max_new_tokens=N, do_sample=False,
                                  **extra)

    return fn


def static_kv_fn(hf, N: int, compile: bool):
    """The gpt-fast recipe (fastgpt/bench/gptfast.py); compiled only on CUDA (reduce-overhead)."""
    from fastgpt.bench.gptfast import Generator, StaticGPT2

    gen = Generator(StaticGPT2.from_hf(hf), compile=compile)
    return lambda inp: gen(inp["idx"], N)


def candidates(hf, device: torch.device, params: dict) -> list[Candidate]:
    N, K = params["N"], params.get("K", 0)
    hf_note = dist_version("transformers")
    if K:
        return lookup_candidates(hf, device, N, K, params["B"], hf_note)
    ours = fastgpt_candidates(device, lambda backend: fastgpt_fn(hf, backend, N))
    hf_sdpa = Candidate("HF generate (sdpa)", REFERENCE, lambda: hf_fn(hf, "sdpa", N), note=hf_note)
    hf_eager = Candidate("HF generate (eager)", REFERENCE, lambda: hf_fn(hf, "eager", N), note=hf_note)
    if device.type != "cuda":
        return [*ours, hf_sdpa, hf_eager,
                Candidate("static-KV GPT-2, eager", REFERENCE, lambda: static_kv_fn(hf, N, compile=False),
                          note="the gpt-fast recipe without its compile (reduce-overhead needs CUDA)")]
    # On a GPU the compiled backends, the recipe they are measured against and transformers'
    # generate first, the slow ones last: a case cut by its share of --time-limit still has the
    # comparisons that matter.
    compiled, plain = [c for c in ours if c.backend != "torch"], [c for c in ours if c.backend == "torch"]
    if params["B"] <= STEP_MAX_ROWS:  # the rows the persistent step takes
        compiled.append(Candidate("fastgpt[auto], persistent step", FASTGPT,
                                  lambda: fastgpt_fn(hf, "auto", N, persistent=True), backend="auto",
                                  note="GPT.persistent_decode = True: a decode step in one launch"))  # fmt: skip
    return [*compiled,
            Candidate("static-KV GPT-2, compiled (gpt-fast recipe)", REFERENCE,
                      lambda: static_kv_fn(hf, N, compile=True), note=f"torch {torch.__version__}"),
            hf_sdpa,
            Candidate("fastgpt[auto] + torch.compile", FASTGPT, lambda: fastgpt_fn(hf, "auto", N, compile=True),
                      backend="auto", note="decode forward compiled, inside the CUDA graph"),
            Candidate("fastgpt[auto], unfused decode", FASTGPT, lambda: fastgpt_fn(hf, "auto", N, fused_decode=False),
                      backend="auto", note="GPT.fused_decode = False: nn.Linear (cuBLAS) + the LayerNorm op"),
            Candidate("HF generate (static cache + compile)", REFERENCE, lambda: hf_fn(hf, "sdpa", N, static=True),
                      note=hf_note),
            hf_eager, *plain]  # fmt: skip


def lookup_candidates(hf, device: torch.device, N: int, K: int, B: int, hf_note: str) -> list[Candidate]:
    """Prompt lookup with K drafts a step, on both sides."""
    def hf_lookup():
        if B != 1:
            raise Unavailable(f"transformers' prompt lookup takes one row, not B={B}")
        return hf_fn(hf, "sdpa", N, lookup=K)

    out = fastgpt_candidates(device, lambda backend: fastgpt_fn(hf, backend, N, lookup=K))
    out = [dataclasses.replace(c, label=f"{c.label} + prompt lookup") for c in out]
    return out + [Candidate("HF generate (sdpa) + prompt lookup", REFERENCE, hf_lookup, note=hf_note)]


def make_case(params: dict, hf, oracle, device: torch.device, dtype: torch.dtype, config_name: str) -> Case:
    """One generate case: B prompts of T random tokens, N new tokens, greedy."""
    B, T, N = params["B"], params["T"], params["N"]
    V = hf.config.vocab_size

    def make_inputs(seed):
        idx = torch.randint(0, V, (B, T), generator=generator(device, seed), device=device)
        return {"idx": idx, "mask": torch.ones_like(idx)}

    name = f"{config_name} {describe_params(params)}"
    return Case(op="generate", name=name, params=dict(params, model=config_name), dtype=dtype,
                make_inputs=make_inputs, reference=lambda inp: None, candidates=candidates(hf, device, params),
                metric="tok/s", work=B * N, set_bytes=0, sweep=f"{config_name} T{T} N{N}", x=B, x_label="B",
                check=greedy_check(oracle, T, N, LOGIT_TOL[dtype]))


def describe_params(p: dict) -> str:
    lookup = f" lookup {p['K']}" if p.get("K") else ""
    return f"B{p['B']} prompt {p['T']} new {p['N']}{lookup}"


def fill_timing(rec: dict, stats: timing.Stats, case: Case, settings: Settings, weight_nbytes: int) -> None:
    """tok/s, and the weight-bandwidth utilisation as the % of the read ceiling (the weights are
    read), or of the copy ceiling where there is no read ceiling."""
    B, N = case.params["B"], case.params["N"]
    tok_s = formulas.tokens_per_second(B, N, stats.median * 1e-3)
    ceiling = "read_gbps" if settings.ceilings.get("read_gbps") else "copy_gbps"
    gbps = settings.ceilings.get(ceiling)
    rec.update(ms=stats.median, ms_p20=stats.p20, ms_p80=stats.p80, runs=stats.runs, method=stats.method,
               value=tok_s, weight_bytes=weight_nbytes, ceiling=ceiling, ceiling_value=gbps)
    if gbps:
        rec["pct_of_ceiling"] = 100.0 * formulas.weight_bandwidth_utilisation(tok_s, B, weight_nbytes, gbps)


def time_candidate(fn, sets, device, settings: Settings, quick: bool) -> timing.Stats:
    """Wall-clock of whole generate calls after warm-up (the check was the first call).

    One more warm-up call is timed as the estimate (a reduce-overhead compile records its graph
    on the second call). Quick runs that already took longer than the budget keep that call as
    the only sample.
    """
    def call(i):
        return fn(sets[i % len(sets)])

    est = timing.time_host(lambda i: call(i + 1), 1, device, warmup=0)[0]
    if quick and est > settings.budget_ms:
        return timing.summarize([est], "host-clock, whole call (1 run)")
    runs = timing.plan_runs(est, settings.budget_ms, 2 if quick else 3, 10)
    times = timing.time_host(lambda i: call(i + 2), runs, device, warmup=0)
    return timing.summarize(times, "host-clock, whole call")


def make_sets(case: Case) -> list[dict]:
    """Three prompt sets to rotate through while timing; the first is the one checked."""
    return [case.make_inputs(100 + i) for i in range(3)]


def check_candidate(case: Case, cand: Candidate, sets: list[dict], device: torch.device, settings: Settings,
                    quick: bool) -> Checked:
    """core.check_candidate (the greedy check against the oracle), unless the candidate is left
    out of --quick or the --time-limit has passed."""
    if quick and cand.label in QUICK_SKIP and device.type == "cuda":
        reason = QUICK_SKIP[cand.label]
    elif settings.out_of_time():
        reason = "not started: --time-limit reached"
    else:
        return core.check_candidate(case, cand, sets, None, device, settings)
    return Checked(cand, dict(core.base_record(case, cand), status=SKIPPED, reason=reason))


def run_case(case: Case, device: torch.device, settings: Settings, weight_nbytes: int, quick: bool,
             on_step=lambda text: None, on_record=lambda records: None) -> list[dict]:
    """Check each candidate, then time it right away (then free it: models hold memory).
    on_record(records) after each candidate's record is done (the speedups come at the end), so
    that a run killed mid-case can keep what it measured."""
    sets = make_sets(case)
    records = []
    for cand in case.candidates:
        on_step(f"generate {case.name}: checking {cand.label}")
        checked = check_candidate(case, cand, sets, device, settings, quick)
        records.append(checked.rec)
        if checked.fn is not None:
            on_step(f"generate {case.name}: timing {cand.label}")
            try:
                stats = time_candidate(checked.fn, sets, device, settings, quick)
                fill_timing(checked.rec, stats, case, settings, weight_nbytes)
            except Exception as exc:
                checked.rec.update(status=ERROR, reason=f"timing failed: {core.describe(exc)}")
            checked.fn = None
            core.free_cached_memory(device)
        on_record(records)
    core.add_speedups(records)
    return records
