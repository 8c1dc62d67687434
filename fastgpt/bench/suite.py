"""The pytest-benchmark suites (benchmarks/bench_*.py) over the same cases as `fastgpt bench`.

Each test is one (case, candidate). It is checked against the reference first: a wrong result
fails the test, and so does a fastgpt candidate that raises (ERROR); an implementation that
cannot run here, a reference that raises, or an oracle that raises (out of memory) skips it. pytest-benchmark then times
it with the host clock around synchronized calls (so its numbers include launch overhead);
the harness's own CUDA-event (or graph-replay) median, the rate from the formula and the % of
the ceiling go into the benchmark's extra_info, which --benchmark-json records.

Quick shapes by default; FASTGPT_BENCH_FULL=1 selects the full sweeps.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastgpt.bench import core, timing
from fastgpt.bench.cases import build_cases

FULL = os.environ.get("FASTGPT_BENCH_FULL", "0") not in ("", "0")
SETTINGS = dict(budget_ms=200.0, min_runs=10, max_runs=200)


def kernel_params(op: str) -> list:
    """pytest params (case, candidate label) of `op`'s cases, with readable ids (no tensors made)."""
    cases = build_cases(op, torch.device("cuda"), None, quick=not FULL)
    return [pytest.param(case, cand.label, id=f"{case.name}-{cand.label}") for case in cases for cand in case.candidates]


def verdict(rec: dict) -> None:
    """Fail the test for a wrong candidate or a fastgpt one that crashed; skip it when it did not run."""
    if rec["status"] == core.FAILED:
        pytest.fail(f"{rec['implementation']} is wrong on {rec['case']}: {rec['reason']}")
    if core.is_fastgpt_failure(rec):
        pytest.fail(f"{rec['implementation']} crashed on {rec['case']}: {rec['reason']}")
    if rec["status"] != core.OK:
        pytest.skip(f"{rec['implementation']}: {rec['status']}: {rec['reason']}")


def run_kernel(benchmark, case: core.Case, label: str, ceilings: dict, device: torch.device | None = None) -> None:
    """Check, then time one candidate of a kernel case (on CUDA unless `device` says otherwise)
    under pytest-benchmark."""
    device = device or torch.device("cuda")
    settings = core.Settings(**SETTINGS, ceilings=ceilings)
    cand = next(c for c in case.candidates if c.label == label)
    sets = core.make_sets(case, device, settings)
    expected, failure = core.expected_output(case, sets[0], device)
    if failure:
        pytest.skip(f"{label}: {failure}")  # the oracle's failure, not the candidate's
    checked = core.check_and_warm_up(case, cand, sets, expected, device, settings)
    del expected
    verdict(checked.rec)
    mode = core.timing_mode(device, [core.device_estimate(checked, sets, device, settings)], settings)
    core.time_checked(checked, case, sets, device, mode, settings, timing.l2_flush_buffer(device))
    verdict(checked.rec)
    rec, fn = checked.rec, checked.fn
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update({k: rec[k] for k in ("method", "ms", "ms_p20", "ms_p80", "device_ms", "metric", "value",
                                                     "ceiling_value", "pct_of_ceiling", "flops", "bytes")})
    benchmark.pedantic(_rotating(fn, sets, device), rounds=timing.plan_runs(checked.est, 500.0, 10, 200),
                       warmup_rounds=3)


def _rotating(fn, sets: list[dict], device: torch.device):
    """What pytest-benchmark times: one synchronized call of fn, on the next input set each time."""
    state = {"i": 0}

    def target():
        state["i"] += 1
        fn(sets[state["i"] % len(sets)])
        timing.synchronize(device)

    return target


def generate_params() -> list:
    """pytest params (shape, candidate label) of the generate comparison on this machine."""
    from fastgpt.bench.cases import generate as gen

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for p in gen.shapes(quick=not FULL, device=device):
        for cand in gen.candidates(None, device, p):
            out.append(pytest.param(p, cand.label, id=f"{gen.describe_params(p)}-{cand.label}"))
    return out


def run_generate(benchmark, models, params: dict, label: str, ceilings: dict) -> None:
    """Check, then time one generate candidate (whole calls, host clock) under pytest-benchmark."""
    from fastgpt.bench import formulas
    from fastgpt.bench.cases import generate as gen

    hf, oracle, device, dtype, config = models
    case = gen.make_case(params, hf, oracle, device, dtype, config)
    cand = next(c for c in case.candidates if c.label == label)
    sets = gen.make_sets(case)
    checked = gen.check_candidate(case, cand, sets, device, core.Settings(), quick=False)
    verdict(checked.rec)
    benchmark.group = f"generate {case.name}"
    benchmark.pedantic(_rotating(checked.fn, sets, device), rounds=5 if FULL else 3, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the target ran once, nothing was timed
        return
    seconds = benchmark.stats.stats.median
    tok_s = formulas.tokens_per_second(params["B"], params["N"], seconds)
    weight_nbytes = formulas.weight_bytes(hf)
    benchmark.extra_info.update(tok_per_s=tok_s, weight_bytes=weight_nbytes, dtype=str(dtype))
    gbps = ceilings.get("read_gbps") or ceilings.get("copy_gbps")
    if gbps:
        benchmark.extra_info["weight_bw_util"] = formulas.weight_bandwidth_utilisation(tok_s, params["B"],
                                                                                      weight_nbytes, gbps)
