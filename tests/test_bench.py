"""The benchmark harness itself: formulas, statistics, the refusal to time a wrong candidate,
the record schema, the plots, and `fastgpt bench` end to end on the CPU.

GPU-only pieces (CUDA events, graph replay) have `gpu` tests that skip without CUDA.
"""

import csv
import io
import json
import time

import numpy as np
import pytest
import torch

from fastgpt.bench import formulas, report, timing
from fastgpt.bench.cases import build_cases, parse_spec
from fastgpt.bench.core import (ERROR, FAILED, FASTGPT, OK, ORACLE_FAILED, RECORD_FIELDS, REFERENCE, SKIPPED,
                                UNAVAILABLE, Candidate, Case, Settings, Unavailable, empty_record, is_fastgpt_failure,
                                run_case)
from fastgpt.bench.env import ENV_FIELDS, dist_version, environment, package_version

CPU = torch.device("cpu")
FAST = Settings(budget_ms=5, min_runs=3, max_runs=5)

# ----------------------------------------------------------------------------- formulas


def test_attention_flops_halved_when_causal():
    assert formulas.attention_flops(16, 12, 1024, 1024, 64, causal=False) == 4 * 16 * 12 * 1024 * 1024 * 64
    assert formulas.attention_flops(16, 12, 1024, 1024, 64, causal=True) == 2 * 16 * 12 * 1024 * 1024 * 64
    assert formulas.attention_flops(1, 1, 3, 5, 2, causal=False) == 4 * 3 * 5 * 2
    # Sq != Sk, bottom-right: 1024 queries after 3072 cached keys see 87.5% of the pairs, not half;
    # 4096 queries over 1024 keys: the last 1024 see a triangle, the rest nothing.
    assert formulas.attention_flops(1, 1, 1024, 4096, 64, causal=True) == 4 * (1024 * 4096 - 1024 * 1024 // 2) * 64
    assert formulas.attention_flops(1, 1, 4096, 1024, 64, causal=True) == 4 * (1024 * 1024 // 2) * 64


def test_decode_bytes_read_once_write_once():
    B, Hq, Hkv, D, L = 64, 12, 12, 64, 4096
    cache = 2 * B * Hkv * L * D * 2  # K and V, bf16
    q_and_out = 2 * B * Hq * D * 2
    assert formulas.decode_bytes(B, Hq, Hkv, D, B * L, torch.bfloat16) == cache + q_and_out + 4 * B
    # GQA reads each KV head once, whatever the number of query heads sharing it.
    assert formulas.decode_bytes(2, 32, 8, 128, 100, torch.float16) == 2 * (2 * 2 * 32 * 128 + 2 * 8 * 128 * 100) + 8
    # Q queries a row: q and the output Q times over, the cache still once.
    assert formulas.decode_bytes(B, Hq, Hkv, D, B * L, torch.bfloat16, 4) == cache + 4 * q_and_out + 4 * B


def test_layer_norm_bytes():
    M, N = 65536, 1024
    assert formulas.layer_norm_bytes(M, N, torch.bfloat16, residual=True) == 2 * 4 * M * N + 2 * N * 2
    assert formulas.layer_norm_bytes(M, N, torch.float32, residual=False) == 4 * 2 * M * N + 2 * N * 4
    assert formulas.layer_norm_bytes(M, N, torch.bfloat16, residual=False, affine=False) == 2 * 2 * M * N


def test_sampling_copy_matmul_counts():
    assert formulas.sampling_bytes(32, 50257, torch.float32) == 32 * 50257 * 4
    assert formulas.copy_bytes(1000, torch.bfloat16) == 4000
    assert formulas.matmul_flops(2, 3, 4) == 48


def test_weight_bytes_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "ln": torch.nn.LayerNorm(4)})
    assert formulas.weight_bytes(model) == (40 + 8) * 4


def test_generate_rates():
    assert formulas.tokens_per_second(32, 256, 2.0) == 32 * 256 / 2.0
    # GPT-2 124M in bf16 (249 MB) at 16,000 steps/s needs ~4 TB/s: 100% of a 3.98 TB/s copy.
    util = formulas.weight_bandwidth_utilisation(16000.0, 1, 248_879_616, 3982.07)
    assert util == pytest.approx(1.0, rel=1e-3)
    assert formulas.weight_bandwidth_utilisation(32 * 1000.0, 32, 10**9, 1000.0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
def test_quantile_matches_numpy(n):
    values = list(np.random.default_rng(n).exponential(size=n))
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert timing.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_summarize_and_errors():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "m")
    assert (stats.median, stats.p20, stats.p80, stats.runs, stats.method) == (3.0, 1.8, 4.2, 5, "m")
    with pytest.raises(ValueError):
        timing.quantile([], 0.5)
    with pytest.raises(ValueError):
        timing.quantile([1.0], 1.5)


def test_flush_l2_reads_and_leaves_the_buffer_as_it_was():
    """The flush reads its buffer (clean lines in L2 after it); a memset would have dirtied them."""
    buffer = torch.randint(-128, 128, (4096,), dtype=torch.int8)
    before = buffer.clone()
    timing.flush_l2(buffer)
    assert torch.equal(buffer, before)


def test_plan_runs_clamps():
    assert timing.plan_runs(1.0, 100.0, 10, 1000) == 100
    assert timing.plan_runs(50.0, 100.0, 10, 1000) == 10
    assert timing.plan_runs(0.001, 100.0, 10, 1000) == 1000
    assert timing.plan_runs(0.0, 100.0, 10, 50) == 50


def test_time_host_measures_each_call():
    calls = []
    times = timing.time_host(lambda i: (calls.append(i), time.sleep(0.002)), 4, CPU, warmup=2)
    assert len(times) == 4 and all(t >= 1.5 for t in times)
    assert calls == [0, 1, 0, 1, 2, 3]


# ----------------------------------------------------------------------------- check before timing


def _toy_case(candidates):
    """y = 2x on CPU tensors; 'work' counts 8 bytes per element."""
    def make_inputs(seed):
        return {"x": torch.randn(64, generator=torch.Generator().manual_seed(seed))}

    return Case(op="toy", name="x64", params={"n": 64}, dtype=torch.float32, make_inputs=make_inputs,
                reference=lambda inp: inp["x"] * 2, candidates=candidates, metric="GB/s", work=64 * 8, set_bytes=256)


def test_candidate_details_join_the_note():
    """What a candidate chose (details(), asked after its warm-up) is added to its note."""
    double = lambda inp: inp["x"] * 2  # noqa: E731
    cands = [Candidate("tuned", FASTGPT, lambda: double, note="base", details=lambda: "tuned: BLOCK 64"),
             Candidate("silent", FASTGPT, lambda: double, details=lambda: "")]
    by = {r["implementation"]: r for r in run_case(_toy_case(cands), CPU, FAST)}
    assert by["tuned"]["note"] == "base; tuned: BLOCK 64" and by["silent"]["note"] == ""


def test_wrong_candidate_is_failed_and_never_timed():
    calls = {"right": 0, "wrong": 0}

    def right(inp):
        calls["right"] += 1
        return inp["x"] + inp["x"]

    def wrong(inp):
        calls["wrong"] += 1
        out = inp["x"] * 2
        out[-1] += 1.0  # one wrong element among 64
        return out

    def missing():
        raise Unavailable("not installed here")

    def crash(inp):
        raise RuntimeError("kernel exploded\nsecond line")

    records = run_case(_toy_case([
        Candidate("good", FASTGPT, lambda: right),
        Candidate("bad", FASTGPT, lambda: wrong),
        Candidate("ref", REFERENCE, lambda: lambda inp: inp["x"] * 2),
        Candidate("absent", REFERENCE, missing),
        Candidate("crashes", REFERENCE, lambda: crash),
    ]), CPU, FAST)
    by = {r["implementation"]: r for r in records}
    assert by["bad"]["status"] == FAILED and "1 elements out of tolerance" in by["bad"]["reason"]
    assert calls["wrong"] == 1  # the check only: no warm-up, no timing
    assert all(by["bad"][k] is None for k in ("ms", "ms_p20", "ms_p80", "runs", "value", "speedup_vs"))
    assert by["good"]["status"] == OK and calls["right"] > 1
    assert by["good"]["ms"] > 0 and by["good"]["ms_p20"] <= by["good"]["ms"] <= by["good"]["ms_p80"]
    assert by["good"]["value"] == pytest.approx(64 * 8 / (by["good"]["ms"] * 1e-3) / 1e9)
    assert by["good"]["speedup_vs"] == {"ref": pytest.approx(by["ref"]["ms"] / by["good"]["ms"])}
    assert by["good"]["best_ref"] == "ref"
    assert by["absent"]["status"] == "unavailable" and by["absent"]["reason"] == "not installed here"
    assert by["crashes"]["status"] == "error" and by["crashes"]["reason"] == "RuntimeError: kernel exploded"


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that the suites use; runs the target once."""

    def __init__(self):
        self.group, self.extra_info, self.stats, self.calls = None, {}, None, 0

    def pedantic(self, target, rounds, warmup_rounds):
        self.calls += 1
        target()


def test_suite_checks_then_times_one_candidate():
    """benchmarks/ go through the same check-then-time steps as run_case."""
    from fastgpt.bench import suite

    def wrong(inp):
        return inp["x"] * 3

    case = _toy_case([Candidate("good", FASTGPT, lambda: lambda inp: inp["x"] * 2),
                      Candidate("bad", REFERENCE, lambda: wrong)])
    bench = FakeBenchmark()
    suite.run_kernel(bench, case, "good", {"copy_gbps": 100.0}, device=CPU)
    assert bench.calls == 1 and bench.group == "toy x64"
    assert bench.extra_info["ms"] > 0 and bench.extra_info["method"] == "host-clock"
    assert bench.extra_info["pct_of_ceiling"] == pytest.approx(bench.extra_info["value"])
    with pytest.raises(pytest.fail.Exception, match="bad is wrong on x64"):
        suite.run_kernel(FakeBenchmark(), case, "bad", {}, device=CPU)


def _crashes_after(calls: int):
    """A y = 2x candidate whose call number `calls` + 1 (and later) raises: 0 crashes in the check,
    1 in the warm-up."""
    count = {"n": 0}

    def fn(inp):
        count["n"] += 1
        if count["n"] > calls:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return inp["x"] * 2

    return fn


def test_out_of_memory_is_unavailable_not_a_failure():
    """A candidate that does not fit (the unfused torch backend at long S) is reported, not failed."""

    def too_big(inp):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")

    records = run_case(_toy_case([Candidate("fastgpt[torch]", FASTGPT, lambda: too_big),
                                  Candidate("fastgpt good", FASTGPT, lambda: lambda inp: inp["x"] * 2)]), CPU, FAST)
    assert records[0]["status"] == "unavailable" and "does not fit in memory" in records[0]["reason"]
    assert not is_fastgpt_failure(records[0]) and records[1]["status"] == OK


def test_fastgpt_crash_is_a_failure():
    """A fastgpt candidate that raises is ERROR and fails the run; a reference that raises does not."""
    records = run_case(_toy_case([
        Candidate("fastgpt crashes in check", FASTGPT, lambda: _crashes_after(0)),
        Candidate("fastgpt crashes in warm-up", FASTGPT, lambda: _crashes_after(1)),
        Candidate("fastgpt build raises", FASTGPT, lambda: 1 / 0),
        Candidate("ref crashes", REFERENCE, lambda: _crashes_after(0)),
        Candidate("fastgpt good", FASTGPT, lambda: lambda inp: inp["x"] * 2),
    ]), CPU, FAST)
    by = {r["implementation"]: r for r in records}
    assert by["fastgpt crashes in check"]["reason"] == \
        "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert by["fastgpt crashes in warm-up"]["reason"].startswith("warm-up failed: RuntimeError")
    assert by["fastgpt build raises"]["reason"].startswith("ZeroDivisionError")
    assert [r["status"] for r in records] == [ERROR, ERROR, ERROR, ERROR, OK]
    assert [is_fastgpt_failure(r) for r in records] == [True, True, True, False, False]
    failed_column = report.summary_rows(records)[0][-1]
    assert failed_column == ("fastgpt crashes in check (error), fastgpt crashes in warm-up (error), "
                             "fastgpt build raises (error)")


def test_suite_fails_on_fastgpt_crash_skips_on_reference_crash():
    from fastgpt.bench import suite

    case = _toy_case([Candidate("fastgpt[x]", FASTGPT, lambda: _crashes_after(1)),
                      Candidate("ref", REFERENCE, lambda: _crashes_after(0))])
    with pytest.raises(pytest.fail.Exception, match=r"fastgpt\[x\] crashed on x64: warm-up failed: RuntimeError"):
        suite.run_kernel(FakeBenchmark(), case, "fastgpt[x]", {}, device=CPU)
    with pytest.raises(pytest.skip.Exception, match="ref: error: RuntimeError"):
        suite.run_kernel(FakeBenchmark(), case, "ref", {}, device=CPU)


def test_fastgpt_bench_exits_1_when_fastgpt_crashes(monkeypatch, capsys):
    """`fastgpt bench` end to end (generate, tiny model, CPU) with fastgpt's generate raising."""
    from fastgpt.bench import main
    from fastgpt.bench.cases import generate as gen

    def crashing_fastgpt_fn(hf, backend, N):
        def fn(inp):
            raise RuntimeError("kernel crashed")
        return fn

    monkeypatch.setattr(gen, "fastgpt_fn", crashing_fastgpt_fn)
    rc = main(["generate", "--quick", "--model-config", "tiny", "--budget", "0.01", "--device", "cpu",
               "--impl", r"fastgpt\[torch\]|HF generate \(sdpa\)"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "ERROR: fastgpt[torch] on generate tiny B1 prompt 32 new 16: RuntimeError: kernel crashed" in out


def _oom(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")


def test_oracle_failure_is_reported_not_blamed_and_the_run_goes_on():
    """A reference that runs out of memory: every candidate ERROR with an oracle reason, none a
    fastgpt failure, nothing built; the next case runs as usual."""
    built = []
    cands = [Candidate("fastgpt[x]", FASTGPT, lambda: built.append(1)),
             Candidate("ref", REFERENCE, lambda: built.append(2)),
             Candidate("other", REFERENCE, lambda: built.append(3))]
    case = _toy_case(cands)
    case.reference = _oom
    settings = Settings(budget_ms=5, min_runs=3, max_runs=5, impl_filter=lambda label: label != "other")
    records = run_case(case, CPU, settings)
    assert [r["status"] for r in records] == [ERROR, ERROR, SKIPPED] and built == []
    assert records[0]["reason"] == (f"{ORACLE_FAILED}: the reference raised "
                                    "OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB")
    assert not any(is_fastgpt_failure(r) for r in records)
    assert report.summary_rows(records)[0][-1] == ""
    ok = run_case(_toy_case([Candidate("fastgpt[x]", FASTGPT, lambda: lambda inp: inp["x"] * 2)]), CPU, FAST)
    assert ok[0]["status"] == OK

    from fastgpt.bench import suite

    with pytest.raises(pytest.skip.Exception, match=ORACLE_FAILED):
        suite.run_kernel(FakeBenchmark(), case, "fastgpt[x]", {}, device=CPU)


def test_generate_candidates_on_a_gpu_put_the_comparisons_first():
    """On a GPU, fastgpt's backends (and at up to 8 rows its persistent step), then the gpt-fast
    recipe and transformers' generate, then the other forms: a case cut by its share of
    --time-limit keeps the comparisons the targets are stated against. (Building the list runs
    nothing.)"""
    from fastgpt.bench.cases import generate as gen

    def labels(B):
        return [c.label for c in gen.candidates(None, torch.device("cuda"), {"B": B, "N": 4})]

    assert labels(1)[:5] == ["fastgpt[cuda]", "fastgpt[triton]", "fastgpt[auto], persistent step",
                             "static-KV GPT-2, compiled (gpt-fast recipe)", "HF generate (sdpa)"]  # fmt: skip
    assert labels(32)[:4] == ["fastgpt[cuda]", "fastgpt[triton]", "static-KV GPT-2, compiled (gpt-fast recipe)",
                              "HF generate (sdpa)"]  # fmt: skip
    assert labels(32)[-2:] == ["HF generate (eager)", "fastgpt[torch]"]


def test_generate_oracle_failure_is_not_the_candidates():
    from fastgpt.bench.cases import generate as gen

    hf = gen.build_hf("tiny", CPU, torch.float32)

    class BrokenOracle:
        config, device = hf.config, CPU
        __call__ = _oom

    case = gen.make_case(dict(B=1, T=4, N=3), hf, BrokenOracle(), CPU, torch.float32, "tiny")
    out_of_range = lambda inp: torch.cat([inp["idx"], torch.full((1, 3), 10**6)], dim=1)  # noqa: E731
    case.candidates = [Candidate("fastgpt[torch]", FASTGPT, lambda: gen.fastgpt_fn(hf, "torch", 3)),
                       Candidate("bad ids", FASTGPT, lambda: out_of_range)]
    rec, bad = gen.run_case(case, CPU, FAST, formulas.weight_bytes(hf), quick=True)
    assert rec["status"] == ERROR and rec["reason"].startswith(f"{ORACLE_FAILED}: the fp32 oracle model raised Out")
    assert not is_fastgpt_failure(rec)
    # Ids the oracle cannot take are the candidate's fault, found before the oracle runs.
    assert bad["status"] == FAILED and bad["reason"] == f"token ids outside [0, {hf.config.vocab_size})"


def test_chunked_attention_reference_matches_whole():
    from fastgpt import reference as ref
    from fastgpt.bench.cases.attention import chunked_reference

    g = torch.Generator().manual_seed(0)
    for Hkv, Sq, Sk, causal in ((4, 13, 13, True), (2, 7, 19, True), (4, 19, 7, True), (1, 11, 5, False)):
        q = torch.randn(2, 4, Sq, 8, generator=g)
        k, v = torch.randn(2, 2, Hkv, Sk, 8, generator=g).unbind(0)
        whole = ref.attention(q, k, v, causal=causal, scale=0.3)
        if causal and Sq > Sk:  # the first Sq - Sk rows see no key: whole chunks of zeros
            assert bool((whole[:, :, : Sq - Sk] == 0).all())
        for rows in (1, 3, 4):
            chunked = chunked_reference(q, k, v, causal, 0.3, score_bytes=rows * 2 * 4 * Sk * 4)
            torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6, msg=f"{Hkv} {Sq} {Sk} {causal} {rows}")


def test_non_finite_and_shape_are_caught():
    nan = lambda inp: torch.full_like(inp["x"], float("nan"))  # noqa: E731
    short = lambda inp: inp["x"][:-1] * 2  # noqa: E731
    records = run_case(_toy_case([Candidate("nan", FASTGPT, lambda: nan), Candidate("short", FASTGPT, lambda: short)]),
                       CPU, FAST)
    assert [r["status"] for r in records] == [FAILED, FAILED]
    assert "non-finite" in records[0]["reason"] and "shape" in records[1]["reason"]


def test_tolerance_table_bounds():
    """One table: an fp32 error of 1e-3 (TF32-level) fails; each dtype's own rounding passes."""
    from fastgpt.bench.checks import TOLERANCE, compare

    assert set(TOLERANCE) == {torch.float32, torch.float16, torch.bfloat16}
    e = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert compare(e * (1 + 1e-3), e) is not None
    assert compare(e * (1 + 1e-6), e) is None
    for dtype in (torch.float16, torch.bfloat16):
        half_ulp = (e * (1 + torch.finfo(dtype).eps / 2)).to(dtype)
        assert compare(half_ulp, e.to(dtype)) is None, dtype
        assert compare(e.to(dtype) * 1.05, e.to(dtype)) is not None, dtype


def test_sampler_ignoring_top_k_is_failed():
    """A sampler drawing from the whole softmax is caught by the kept-set check."""
    case = build_cases("sampling", CPU, torch.float32, True, ["B=2,V=500,K=5,P=1.0"])[0]

    def unfiltered(inp):
        return torch.multinomial(torch.softmax(inp["logits"] / 0.8, dim=-1), 1).squeeze(1)

    case.candidates = [Candidate("unfiltered", FASTGPT, lambda: unfiltered)] + \
        [c for c in case.candidates if c.label in ("fastgpt[torch]", "HF processors + multinomial")]
    by = {r["implementation"]: r for r in run_case(case, CPU, FAST)}
    assert by["unfiltered"]["status"] == FAILED and "outside the kept set" in by["unfiltered"]["reason"]
    assert by["HF processors + multinomial"]["status"] == OK
    assert by["fastgpt[torch]"]["status"] == OK
    assert by["fastgpt[torch]"]["best_ref"] == "HF processors + multinomial"


@pytest.mark.parametrize("op,spec", [
    ("attention", "B=1,H=4,HKV=2,S=24,SK=40,D=32"),
    ("decode", "B=2,H=4,HKV=2,L=50,D=32"),
    ("decode", "B=2,H=4,HKV=2,L=50,D=32,Q=3"),
    ("layernorm", "M=7,N=96"),
])
def test_kernel_cases_check_references_on_cpu(op, spec):
    """The case machinery on CPU tensors: the torch backend and PyTorch references pass the check."""
    settings = Settings(budget_ms=5, min_runs=2, max_runs=3, impl_filter=lambda label: "compile" not in label)
    case = build_cases(op, CPU, torch.float32, True, [spec])[0]
    by = {r["implementation"]: r for r in run_case(case, CPU, settings)}
    assert by["fastgpt[torch]"]["status"] == OK
    assert FAILED not in {r["status"] for r in by.values()}, {k: r["reason"] for k, r in by.items()}
    expected_ok = {"attention": "eager matmul-softmax-matmul", "decode": "sdpa[math]",
                   "layernorm": "eager add + F.layer_norm"}[op]
    assert by[expected_ok]["status"] == OK
    if op != "layernorm":  # SDPA under its backend (the candidate's setting): cuDNN has no CPU kernel, math has
        assert by["sdpa[math]"]["status"] == OK and by["sdpa[cudnn]"]["status"] == UNAVAILABLE


def test_padded_attention_case():
    """A padded batch (PAD): every candidate takes the mask; one that ignores the padding is FAILED."""
    import fastgpt

    settings = Settings(budget_ms=5, min_runs=2, max_runs=3)
    case = build_cases("attention", CPU, torch.float32, True, ["B=3,H=4,HKV=2,S=24,D=32,PAD=10"])[0]
    assert case.name == "B3 H4 HKV2 S24 D32 causal pad10"
    inputs = case.make_inputs(0)
    assert inputs["mask"].shape == (3, 1, 24, 24) and not inputs["mask"][2, 0, :, :10].any()
    from fastgpt.bench.cases.attention import chunked_reference
    from fastgpt.ops.attention import masked_attention

    q, k, v, mask = (inputs[n] for n in ("q", "k", "v", "mask"))
    whole = masked_attention(q, k, v, mask, scale=32**-0.5, backend="torch")
    torch.testing.assert_close(chunked_reference(q, k, v, True, 32**-0.5, score_bytes=5 * 12 * 24 * 4, mask=mask), whole)

    def no_padding(inp):
        return fastgpt.attention(inp["q"], inp["k"], inp["v"], causal=True)

    def nan_where_no_key(inp):  # what some SDPA kernels give rows that see no key
        out = masked_attention(inp["q"], inp["k"], inp["v"], inp["mask"], scale=32**-0.5, backend="torch")
        return out.masked_fill(~inp["mask"].any(dim=-1, keepdim=True), float("nan"))

    keep = ("fastgpt[torch]", "sdpa[math] + mask", "eager matmul-softmax-matmul + mask")
    case.candidates = [c for c in case.candidates if c.label in keep]
    case.candidates += [Candidate("no padding", FASTGPT, lambda: no_padding),
                        Candidate("NaN rows", REFERENCE, lambda: nan_where_no_key)]
    by = {r["implementation"]: r for r in run_case(case, CPU, settings)}
    assert [by[label]["status"] for label in keep] == [OK, OK, OK]
    assert by["NaN rows"]["status"] == OK  # rows that see no key are not compared
    assert by["no padding"]["status"] == FAILED


def test_generate_check_fails_random_tokens():
    from fastgpt.bench.cases import generate as gen

    hf = gen.build_hf("tiny", CPU, torch.float32)
    case = gen.make_case(dict(B=2, T=8, N=6), hf, hf, CPU, torch.float32, "tiny")
    vocab = hf.config.vocab_size

    def random_tokens(inp):
        new = torch.randint(0, vocab, (inp["idx"].shape[0], 6), generator=torch.Generator().manual_seed(0))
        return torch.cat([inp["idx"], new], dim=1)

    case.candidates = [Candidate("random", FASTGPT, lambda: random_tokens),
                       Candidate("HF eager", REFERENCE, lambda: gen.hf_fn(hf, "eager", 6))]
    by = {r["implementation"]: r for r in gen.run_case(case, CPU, FAST, formulas.weight_bytes(hf), quick=True)}
    assert by["random"]["status"] == FAILED and "not the greedy choice" in by["random"]["reason"]
    assert by["HF eager"]["status"] == OK and by["HF eager"]["value"] > 0


@pytest.mark.parametrize("B", [1, 2])
def test_generate_with_prompt_lookup_on_both_sides(B):
    """K > 0: fastgpt's and transformers' prompt lookup, checked against the oracle and timed;
    transformers' takes one row (unavailable at B=2, with the reason)."""
    from fastgpt.bench.cases import generate as gen

    hf = gen.build_hf("tiny", CPU, torch.float32)
    case = gen.make_case(dict(gen.KEYS, B=B, T=8, N=6, K=3), hf, hf, CPU, torch.float32, "tiny")
    assert case.name == f"tiny B{B} prompt 8 new 6 lookup 3"
    by = {r["implementation"]: r for r in gen.run_case(case, CPU, FAST, formulas.weight_bytes(hf), quick=True)}
    assert set(by) == {"fastgpt[cuda] + prompt lookup", "fastgpt[triton] + prompt lookup",
                       "fastgpt[torch] + prompt lookup", "HF generate (sdpa) + prompt lookup"}
    assert by["fastgpt[torch] + prompt lookup"]["status"] == OK
    hf_rec = by["HF generate (sdpa) + prompt lookup"]
    if B == 1:
        assert hf_rec["status"] == OK
    else:
        assert hf_rec["status"] == UNAVAILABLE and "one row" in hf_rec["reason"]


# ----------------------------------------------------------------------------- specs and options


def test_parse_spec():
    keys = {"B": 16, "S": 1024, "causal": True, "T": 0.8}
    assert parse_spec("b=2, S=8,causal=0,t=0.5", keys) == {"B": 2, "S": 8, "causal": False, "T": 0.5}
    assert parse_spec("", keys) == keys
    assert parse_spec("B=0,S=0", keys)["B"] == 0 and parse_spec("T=-1", keys, ("B",))["T"] == -1  # floats: the op's
    for bad in ("X=1", "B", "B=two", "causal=maybe", "S=-1"):
        with pytest.raises(ValueError):
            parse_spec(bad, keys)
    with pytest.raises(ValueError, match="B must be >= 1"):
        parse_spec("B=0", keys, positive=("B",))


def test_bad_options_exit_2(capsys):
    from fastgpt.bench import main

    assert main(["nonsense"]) == 2
    assert main(["attention", "decode", "--shapes", "B=1"]) == 2
    assert main(["generate", "--impl", "("]) == 2


@pytest.mark.parametrize("argv, message", [
    (["[/red]"], "unknown op(s) ['[/red]']"),  # rich read the message as markup and raised MarkupError
    (["attention", "--shapes", "B=x"], "--shapes: bad value in shape item 'B=x'"),  # unchecked without a GPU
    (["generate", "--shapes", "Q=1"], "--shapes: bad shape item 'Q=1'"),
    (["generate", "--shapes", "B=2;N=-1"], "--shapes: bad value in shape item 'N=-1': N must be >= 1"),
    (["attention", "--shapes", "B=0"], "--shapes: bad value in shape item 'B=0': B must be >= 1"),
    (["decode", "--shapes", "HKV=-2"], "--shapes: bad value in shape item 'HKV=-2': HKV must be >= 0"),
    (["sampling", "--shapes", "V=0,K=0"], "--shapes: bad value in shape item 'V=0': V must be >= 1"),
    (["layernorm", "--shapes", "N=-8"], "--shapes: bad value in shape item 'N=-8': N must be >= 1"),
    (["generate", "--model-config", "tiny", "--shapes", "T=600"], "T + N = 856 is past the tiny model's context"),
    (["generate", "--shapes", ";"], "--shapes ';' holds no spec"),
    (["generate", "--csv", "{tmp}"], "--csv {tmp} is a directory: expected a file"),
    (["generate", "--json", "{tmp}/file/b.json"], "--json {tmp}/file/b.json: {tmp}/file is a file, not a directory"),
    (["generate", "--plot", "{tmp}/file"], "--plot {tmp}/file is a file: expected a directory"),
])
def test_bad_options_exit_2_before_measuring(tmp_path, monkeypatch, capsys, argv, message):
    """Reported in one line before the ceilings are measured (the shapes were parsed after them,
    or never without a GPU; a bad value of generate's ran and was blamed on fastgpt; an output path
    failed after the measurements)."""
    from fastgpt.bench import ceilings, main
    from fastgpt.bench.session import Session

    measured = []
    monkeypatch.setattr(ceilings, "measure", lambda *args: measured.append(args))
    monkeypatch.setattr(Session, "run_kernels", _must_not_run)
    monkeypatch.setattr(Session, "run_generate", _must_not_run)
    (tmp_path / "file").write_text("")
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv] + ["--device", "cpu"]) == 2
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("fastgpt bench: error: ") and message.replace("{tmp}", str(tmp_path)) in line
    assert measured == []


def test_a_time_limit_shares_the_kernel_time_between_the_ops(monkeypatch):
    """With --time-limit each kernel op starts with an even share of the kernel time left, what an
    op leaves unused going to the next: a slow first op no longer takes the others' cases (the
    H200 run's sampling measured B1 only)."""
    import types

    from rich.console import Console

    from fastgpt.bench import session as session_module

    clock = [0.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: clock[0])
    cost = {"attention": 30.0, "decode": 1.0, "sampling": 1.0}  # seconds a case takes
    cases = [types.SimpleNamespace(op=op, name=f"{op} {i}") for op in cost for i in range(3)]
    monkeypatch.setattr(session_module, "build_cases", lambda op, *args: [c for c in cases if c.op == op])
    ran = []

    def run_case(case, device, settings, on_step):
        ran.append((case.name, settings.deadline))
        clock[0] += cost[case.op]
        return []

    monkeypatch.setattr(session_module, "run_case", run_case)
    monkeypatch.setattr(session_module, "_free", lambda device: None)
    run = object.__new__(session_module.Session)
    run.console, run.device, run.ops, run.specs = Console(file=io.StringIO()), torch.device("cuda"), list(cost), None
    run.quick = True
    run.args = types.SimpleNamespace(dtype=None)
    run.records, run.env, run.kernel_deadline = [], {}, 90.0
    run.settings = Settings(deadline=90.0)
    run.save = lambda: None
    run.run_kernels()
    # attention: 30 s of its 30 s share, two cases started; decode then has (90 - 60) / 2 = 15 s
    # (all three cases), sampling what is left (27 s: all three).
    assert [name for name, _ in ran] == ["attention 0", "attention 1", "decode 0", "decode 1", "decode 2",
                                         "sampling 0", "sampling 1", "sampling 2"]
    assert [d for _, d in ran][:3] == [30.0, 30.0, 75.0]
    assert [r["case"] for r in run.records if r["status"] == SKIPPED] == ["attention 2"]


def test_a_time_limit_shares_the_generate_time_between_its_cases(monkeypatch):
    """Each generate case (B1, then B32) starts with an even share of the time left: the first no
    longer takes the second's (the H200 run's B32 measured two of its candidates)."""
    import types

    from rich.console import Console

    from fastgpt.bench import formulas
    from fastgpt.bench import session as session_module
    from fastgpt.bench.cases import generate as gen

    clock = [0.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(gen, "shapes", lambda quick, device: [{"B": 1}, {"B": 32}, {"B": 64}])
    monkeypatch.setattr(gen, "build_hf", lambda *args: None)
    monkeypatch.setattr(gen, "hf_variant", lambda *args: None)
    monkeypatch.setattr(formulas, "weight_bytes", lambda hf: 0)
    monkeypatch.setattr(gen, "make_case", lambda p, *args: p["B"])
    ran, saved = [], []

    def run_case(case, device, settings, weight_nbytes, quick, on_step, on_record):
        ran.append((case, settings.deadline))
        clock[0] += 50.0 if case == 1 else 5.0
        on_record([{"case": case}])  # a candidate's record, saved before the case ends
        return [{"case": case}]

    monkeypatch.setattr(gen, "run_case", run_case)
    monkeypatch.setattr(session_module, "_free", lambda device: None)
    run = object.__new__(session_module.Session)
    run.console, run.device, run.specs = Console(file=io.StringIO()), torch.device("cuda"), None
    run.quick = True
    run.args = types.SimpleNamespace(dtype=None, model_config="gpt2")
    run.records, run.env, run.deadline = [], {}, 90.0
    run.settings = Settings(deadline=45.0)  # the kernel cases' (their half of the limit)
    run.save = lambda pending=(): saved.append([r["case"] for r in [*run.records, *pending]])
    run.run_generate()
    # B1 starts with 90 / 3 = 30 s and takes 50; B32 then has (90 - 50) / 2 = 20, B64 the 35 left.
    assert ran == [(1, 30.0), (32, 70.0), (64, 90.0)]
    # Saved after each candidate (a run killed mid-case keeps them) and after each case.
    assert saved == [[1], [1], [1, 32], [1, 32], [1, 32, 64], [1, 32, 64], [1, 32, 64]]


def _must_not_run(*args):
    raise AssertionError("a bad option was not refused before the run")


@pytest.mark.parametrize("option", ["--budget", "--time-limit"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_seconds_must_be_positive(monkeypatch, capsys, option, value):
    """A negative --time-limit skipped every case and exited 0; a NaN one, or any --budget, was taken."""
    from fastgpt.bench import main
    from fastgpt.bench.session import Session

    monkeypatch.setattr(Session, "start", _must_not_run)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: expected a number of seconds > 0, got '{value}'" in capsys.readouterr().err


def test_python_m_fastgpt_bench_reports_errors_as_the_cli_does(monkeypatch, capsys):
    """`python -m fastgpt.bench` (fastgpt.bench.main) printed a traceback where `fastgpt bench`
    printed one line and exited 2: an OSError or ValueError raised during the run."""
    from fastgpt.bench import main
    from fastgpt.bench.session import Session

    def full_disk(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(Session, "start", full_disk)
    assert main(["generate", "--device", "cpu"]) == 2
    assert "fastgpt bench: error: No space left on device" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs


def _records():
    env = environment(CPU)
    out = []
    for impl, kind, ys in (("fastgpt[cuda]", FASTGPT, (10.0, 20.0, 30.0)), ("sdpa[flash]", REFERENCE, (5.0, 9.0, 12.0))):
        for x, y in zip((512, 1024, 2048), ys):
            out.append({**empty_record(op="attention", case=f"S{x}", sweep="causal D64", x=x, x_label="S",
                                       params={"S": x}, dtype="bfloat16", implementation=impl, kind=kind,
                                       status=OK, ms=1.0, ms_p20=0.9, ms_p80=1.1, runs=10, metric="TFLOP/s",
                                       value=y, speedup_vs={"sdpa[flash]": 2.0} if kind == FASTGPT else None),
                        **env})
    out.append({**empty_record(op="sampling", case="B1", implementation="bad", kind=FASTGPT, status=FAILED,
                               reason="wrong"), **env})
    return env, out


def test_json_and_csv_schema(tmp_path):
    env, records = _records()
    report.write_json(tmp_path / "b.json", env, {"copy_gbps": 1.0, "matmul_tflops": 2.0}, records)
    report.write_csv(tmp_path / "b.csv", records)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["schema"] == report.SCHEMA and set(data) == {"schema", "run", "env", "ceilings", "records"}
    assert set(data["env"]) == set(ENV_FIELDS)
    for rec in data["records"]:
        assert set(rec) == set(RECORD_FIELDS) | set(ENV_FIELDS)
        assert rec["git_sha"] and rec["date"] and rec["gpu"] and rec["torch"]
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert list(rows[0]) == list(report.CSV_FIELDS) and len(rows) == len(records)
    assert json.loads(rows[0]["params"]) == {"S": 512}
    assert rows[-1]["status"] == FAILED and rows[-1]["ms"] == ""


def test_plots_written(tmp_path):
    env, records = _records()
    [single] = report.plot(records, tmp_path / "all.png", env)
    files = report.plot(records, tmp_path / "plots", env)
    assert [f.name for f in files] == ["attention_causal_d64.png"]
    for path in (single, files[0]):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert report.plot(records[-1:], tmp_path / "none", env) == []


def test_summary_uses_best_fastgpt_and_reference():
    env, records = _records()
    rows = report.summary_rows(records)
    assert rows[0][2] == "fastgpt[cuda]" and rows[0][5] == "sdpa[flash]"
    assert rows[-1][-1] == "bad"
    markdown = report.summary_markdown(records, env, {"quick": True}).splitlines()
    assert "--quick" in markdown[0] and markdown[2].startswith("| op |") and len(markdown) == 4 + len(rows)
    # A speedup over a reference timed another way (its graph capture failed) says so.
    assert rows[0][7] == "1.00x"
    for rec in records[:6]:
        rec["method"] = "cuda-graph" if rec["kind"] == FASTGPT else "cuda-events+l2flush (graph capture failed: X)"
    assert report.summary_rows(records)[0][7] == "1.00x (cuda-graph vs cuda-events+l2flush)"


def test_package_version():
    import importlib.metadata

    assert package_version("torch") == importlib.metadata.version("torch")
    assert package_version("no-such-distribution-fastgpt") is None
    assert dist_version("no-such-distribution-fastgpt", "torch") == f"torch {importlib.metadata.version('torch')}"
    assert dist_version("no-such-distribution-fastgpt") == "not installed"


# ----------------------------------------------------------------------------- end to end on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine has a GPU")
def test_fastgpt_bench_cpu_end_to_end(tmp_path, capsys):
    from fastgpt.bench import main

    start = time.perf_counter()
    rc = main(["all", "--quick", "--model-config", "tiny", "--budget", "0.05", "--json", str(tmp_path / "b.json"),
               "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "plots")])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0, out
    assert elapsed < 60
    assert "need one and were skipped" in out and "summary" in out
    data = json.loads((tmp_path / "b.json").read_text())
    by = {(r["op"], r["implementation"]): r for r in data["records"]}
    assert {("ceiling", "copy"), ("ceiling", "matmul")} <= set(by)
    for op in ("attention", "decode", "layernorm", "sampling"):
        assert by[(op, f"{op} (all)")]["reason"] == "needs a CUDA GPU"
    assert by[("generate", "fastgpt[torch]")]["status"] == OK
    assert by[("generate", "HF generate (sdpa)")]["status"] == OK
    assert by[("generate", "fastgpt[torch]")]["value"] > 0
    assert by[("generate", "fastgpt[torch]")]["pct_of_ceiling"] is not None
    assert (tmp_path / "b.csv").exists() and list((tmp_path / "plots").glob("*.png"))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_timers_agree():
    x = torch.randn(2**24, device="cuda")
    sets = [x, x.clone()]
    call = lambda i: sets[i % 2].mul(2.0)  # noqa: E731
    flush = timing.l2_flush_buffer(torch.device("cuda"))
    events = timing.summarize(timing.time_events(call, 20, flush), "e")
    graph = timing.summarize(timing.time_graph(call, 10, 10), "g")
    # 128 MB read + written: well above launch overhead, so the two methods agree.
    assert 0.5 < events.median / graph.median < 2.0


@pytest.mark.gpu
def test_gpu_layernorm_case_runs():
    settings = Settings(budget_ms=20, min_runs=5, max_runs=20, ceilings={"copy_gbps": 1000.0},
                        impl_filter=lambda label: "compile" not in label)
    case = build_cases("layernorm", torch.device("cuda"), torch.bfloat16, True, ["M=4096,N=1024"])[0]
    by = {r["implementation"]: r for r in run_case(case, torch.device("cuda"), settings)}
    assert by["eager add + F.layer_norm"]["status"] == OK
    assert by["eager add + F.layer_norm"]["pct_of_ceiling"] > 0
    # Timed with events, the device time under graph replay comes beside the per-call time, at most
    # it plus noise (the host's share is what it leaves out); timed by graph replay, it is the same.
    for rec in by.values():
        if rec["status"] == OK and rec["method"].startswith("cuda-graph"):
            assert rec["device_ms"] == rec["ms"]
        elif rec["status"] == OK:
            assert rec["method"].startswith("cuda-events") and 0 < rec["device_ms"] < 1.5 * rec["ms"], rec


def test_gptfast_baseline_takes_gpt_fasts_decode_settings():
    """The compiled baseline's steps run under gpt-fast's settings (Inductor's coordinate-descent
    tuning; SDPA's math backend, for Inductor to fuse), put back after each step; uncompiled, none."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastgpt.bench.gptfast import Generator, StaticGPT2

    hf = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    inductor = torch._inductor.config
    for compiled in (True, False):
        with Generator(StaticGPT2.from_hf(hf), compile=compiled)._recipe():
            assert inductor.coordinate_descent_tuning == compiled
            assert torch.backends.cuda.flash_sdp_enabled() != compiled and torch.backends.cuda.math_sdp_enabled()
    assert not inductor.coordinate_descent_tuning and torch.backends.cuda.flash_sdp_enabled()


def test_timing_mode_follows_device_time(monkeypatch):
    """A candidate whose eager estimate is its host's time (60 us) while its kernels take 5 us on
    the GPU makes a tiny case, timed by graph replay (its estimate alone kept such cases, decode
    at B1, on events); a large call is not replayed for its estimate; one that cannot be captured
    keeps its estimate."""
    from fastgpt.bench import core

    cuda, settings = torch.device("cuda"), core.Settings()
    monkeypatch.setattr(core, "device_ms", lambda fn, sets, est, settings: 0.005)
    small = core.Checked(cand=None, rec={}, fn=lambda inputs: None, est=0.06)
    assert core.device_estimate(small, [{}], cuda, settings) == small.device == 0.005
    assert core.timing_mode(cuda, [0.005, 0.5], settings) == "graph"
    assert core.timing_mode(cuda, [small.est], settings) == "events"
    large = core.Checked(cand=None, rec={}, fn=lambda inputs: None, est=10.0)
    assert core.device_estimate(large, [{}], cuda, settings) == 10.0 and large.device is None
    monkeypatch.setattr(core, "device_ms", lambda fn, sets, est, settings: None)
    uncaptured = core.Checked(cand=None, rec={}, fn=lambda inputs: None, est=0.06)
    assert core.device_estimate(uncaptured, [{}], cuda, settings) == 0.06
    on_cpu = core.Checked(cand=None, rec={}, fn=lambda inputs: None, est=0.06)
    assert core.device_estimate(on_cpu, [{}], CPU, settings) == 0.06 and on_cpu.device is None


def test_read_only_cases_take_the_read_ceiling():
    """Decode attention and sampling (their bytes all read) are rated against the read ceiling, a
    LayerNorm (half written) against the copy's; each record says which."""
    from fastgpt.bench.core import fill_timing

    settings = Settings(ceilings={"copy_gbps": 100.0, "read_gbps": 200.0, "matmul_tflops": 1.0})
    stats = timing.summarize([1.0, 1.0, 1.0], "host-clock")
    for op, shape, ceiling in [("decode", "B=1,H=2,L=64,D=16", "read_gbps"), ("sampling", "B=2,V=500", "read_gbps"),
                               ("layernorm", "M=8,N=32", "copy_gbps")]:
        case = build_cases(op, CPU, torch.float32, True, [shape])[0]
        rec = {}
        fill_timing(rec, stats, case, settings)
        assert rec["ceiling"] == ceiling and rec["pct_of_ceiling"] == pytest.approx(
            100 * case.work / 1e-3 / 1e9 / settings.ceilings[ceiling]), op


def test_device_time_only_on_a_gpu():
    """On the CPU there is no device time: the field is there, empty, in every record."""
    case = build_cases("layernorm", CPU, torch.float32, True, ["M=8,N=32"])[0]
    records = run_case(case, CPU, FAST)
    assert all("device_ms" in r and r["device_ms"] is None for r in records)
    assert any(r["status"] == OK for r in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's path")
def test_bench_runs_in_a_fresh_process_on_a_cpu_machine(tmp_path):
    """`fastgpt bench` outside the test session (whose conftest answers the extension's question
    of a GPU's compute capability): with fastgpt._C built and a CPU build of torch, asking the
    cuda backend about a CUDA device raised torch's "not compiled with CUDA" from the report's
    header, before any case ran."""
    import subprocess
    import sys

    code = ("from fastgpt.cli import main; raise SystemExit(main(['bench', 'generate', '--quick', '--model-config', "
            f"'tiny', '--shapes', 'B=1,T=4,N=2', '--json', {str(tmp_path / 'out.json')!r}]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "out.json").read_text())
    assert records


# ----------------------------------------------------------------------------- scripts/gpu-probe.py
def _probe(tmp_path, *args, interpret=True):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1" if interpret else "0", PYTHONPATH=path)
    env.pop("FASTGPT_CUDA_EMULATOR", None)  # the smoke run is the Triton kernels' (the emulator's cuda has no D=16)
    script = root / "scripts" / "gpu-probe.py"
    # The script as __main__, in the interpreter with tests/interpreter.py's shortcuts.
    run = ("import runpy, sys; from tests import interpreter; interpreter.install(); "
           "sys.argv[0] = sys.argv.pop(1); runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    return subprocess.run([sys.executable, "-c", run, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU refusal is for machines without one")
def test_gpu_probe_runs_every_section_on_tiny_shapes(tmp_path):
    """--smoke: every section's code path (knob patching included) on the CPU through Triton's
    interpreter; each measurement lands in probe.json without an error."""
    proc = _probe(tmp_path, "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "probe.json").read_text())
    sections = ["attention", "overhead", "tiles", "few_queries", "decode_batch", "decode_tiles", "layer_norm_rows",
                "sample_batch", "sample_top_p", "sample_blocks", "sample_cand", "linear", "decode_step",
                "step_kernels", "lookup_step", "generate_parts"]
    assert [s for s in sections if not results.get(s)] == []
    errors = [row for s in sections for row in results[s] if "error" in row]
    assert errors == []
    assert all(row["device_us"] > 0 for row in results["tiles"])
    assert "function calls" in results["profile"]
    refused = _probe(tmp_path, interpret=False)
    assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr
    limited = _probe(tmp_path, "--smoke", "--sections", "tiles", "--time-limit", "0")  # spent before the first
    assert limited.returncode == 0 and all(r.get("skipped") == "time limit"
                                           for r in json.loads((tmp_path / "probe.json").read_text())["tiles"])


def test_gpu_probe_goes_on_in_a_fresh_process_after_a_lost_cuda_context(tmp_path, monkeypatch):
    """A section whose kernels leave the CUDA context unusable costs only itself: main saves what
    it has with the loss noted and runs the sections after it in a fresh process (--merge, the
    time left), which adds its results to the saved ones."""
    import importlib.util
    import types
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu-probe.py"
    spec = importlib.util.spec_from_file_location("gpu_probe_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran, calls = [], []

    def section(name):
        return lambda p: ran.append(name) or p.add(name, {"x": len(ran)})

    monkeypatch.setattr(module, "SECTIONS", {name: section(name) for name in ("a", "b", "c")})
    monkeypatch.setattr(module.Probe, "cuda_lost", lambda self: "RuntimeError('illegal memory access')" if ran == ["a"]
                        else None)  # fmt: skip
    monkeypatch.setattr(module.subprocess, "run", lambda command, env: calls.append((command, env))
                        or types.SimpleNamespace(returncode=3))  # fmt: skip
    monkeypatch.setenv("OUT", str(tmp_path))
    assert module.main(["--sections", "a,b,c", "--time-limit", "100", "--smoke"]) == 3  # the fresh process's status
    (command, env), = calls
    assert command[1:6] == [str(path), "--sections", "b,c", "--merge", "--time-limit"] and env["OUT"] == str(tmp_path)
    assert 0 < float(command[6]) <= 100 and ran == ["a"]
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved == {"a": [{"x": 1}], "a_cuda_lost": "RuntimeError('illegal memory access')"}
    assert module.main(command[2:] + ["--smoke"]) == 0  # as the fresh process would
    assert ran == ["a", "b", "c"] and len(calls) == 1
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["a"] == [{"x": 1}] and saved["b"] == [{"x": 2}] and saved["c"] == [{"x": 3}]


def test_step_table_splits_a_traced_step_by_kernel():
    """gpu-probe's step_kernels table from two steps' device events: each kernel's calls and time a
    step, the step's span against its kernels' sum (the gap), and the names shortened; a trace
    missing events, or holding none, is refused rather than tabled."""
    from types import SimpleNamespace

    from fastgpt.bench.probe import kernel_name, step_table

    def event(name, start, end):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, time_range=span)

    # Two steps of three kernels: 10 us of work in a 14 us span, then 10 in 12.
    events = [event("_gemv_kernel", 0, 3), event("void fastgpt::decode_split_kernel<float>(params)", 4, 8),
              event("_gemv_kernel", 11, 14), event("_gemv_kernel", 100, 103),
              event("void fastgpt::decode_split_kernel<float>(params)", 103, 107), event("_gemv_kernel", 109, 112)]
    summary, rows = step_table(events, 2)
    assert summary == {"span_us": 13.0, "kernels_us": 10.0, "gap_us": 3.0, "launches": 3}
    assert rows == [{"kernel": "_gemv_kernel", "calls_per_step": 2.0, "us_per_call": 3.0, "us_per_step": 6.0},
                    {"kernel": "fastgpt::decode_split_kernel<float>", "calls_per_step": 1.0, "us_per_call": 4.0,
                     "us_per_step": 4.0}]  # fmt: skip
    assert kernel_name("_attn_fwd_0d1d2de3de") == "_attn_fwd" and kernel_name("Memset (Device)") == "Memset (Device)"
    assert len(kernel_name("k" * 200)) == 80
    with pytest.raises(RuntimeError, match="5 events over 2 steps"):
        step_table(events[:5], 2)
    with pytest.raises(RuntimeError, match="no events"):
        step_table([], 2)


# ----------------------------------------------------------------------------- benchmarks/bench_host_cpu.py
def test_host_time_script_runs_every_case():
    """The host-time script's stubs still stand in for the kernels: each case of each backend runs
    and prints a time."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_host_cpu.py"
    proc = subprocess.run([sys.executable, str(script), "--repeats", "1", "--calls", "3"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert sorted({row[0] for row in rows}) == ["cuda", "triton"] and len(rows) == 8
    assert all(row[-3:] == ["us", "a", "call"] and float(row[-4]) > 0 for row in rows)


@pytest.mark.parametrize("step_tests", ["passed", "failed"])
def test_gpu_check_script_runs_its_steps_in_order(tmp_path, step_tests):
    """scripts/gpu-check.sh, whose one run on a lent GPU is scarce, in a copy of its tree with
    python, nvidia-smi and fastgpt stood in for (each call recorded): the steps in order, the
    persistent step's GPU tests in a run of their own first, and the benchmark leaving the step
    out unless those passed (read from their JUnit XML by the real python)."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "gpu-check.sh", tmp_path / "scripts")
    (tmp_path / "scripts" / "memcheck.sh").write_text("exit 2\n")
    (tmp_path / "tests").mkdir()
    for name in ("test_a.py", "test_step.py", "test_attention.py"):
        (tmp_path / "tests" / name).write_text("")
    outcome = "" if step_tests == "passed" else "<failure message='boom'/>"
    junit = (f"<testsuites><testsuite><testcase classname='tests.test_step' name='t'>{outcome}</testcase>"
             "</testsuite></testsuites>")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "python": f"""echo "python $*" >>{calls}
case "$*" in
  -\\ *) exec {sys.executable} "$@";;
  *"-m pytest"*test_step.py*)
      for a in "$@"; do case "$a" in --junitxml=*) printf '%s' "{junit}" >"${{a#--junitxml=}}";; esac; done;;
  *"get_device_capability"*) echo 90a;;
esac
exit 0""",
        "nvidia-smi": "echo 'name, H200'",
        "fastgpt": f'echo "fastgpt $*" >>{calls}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "TOTAL_S": "200"}
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu-check.sh")], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert "line " not in result.stderr, result.stderr  # no bash error
    steps = [re.sub(r" [(\[].*", "", line) for line in result.stdout.splitlines()
             if re.fullmatch(r"== .* \[\d+ s\]", line)]  # fmt: skip
    assert steps == ["== environment", "== build", "== GPU tests", "== benchmarks", "== memcheck", "== probe",
                     "== summary"]  # fmt: skip
    log = calls.read_text().splitlines()
    tests = [line for line in log if "-m pytest" in line]
    assert len(tests) == 2 and tests[0].endswith("tests/test_step.py") and "test_step.py" not in tests[1]
    (bench,) = [line for line in log if line.startswith("fastgpt bench")]
    assert ("persistent step" in bench) == (step_tests == "failed")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"env.txt", "build.log", "gpu-tests.log", "extras.tar.gz"}
