"""Cases, candidates, and the loop that checks then times each candidate of a case.

A `Case` is one op at one shape: how to make a fresh input set, the reference output, the
FLOP or byte count, and the candidates (fastgpt's backends and the references people use).
`run_case` checks every candidate against the reference first; only the correct ones are
timed. A wrong candidate is reported FAILED with the reason, and never gets a number; one that
raises (while built, checked, warmed up or timed) is reported ERROR. A fastgpt candidate that is
FAILED or ERROR is a failure of the run (`is_fastgpt_failure`); a reference's is not. When the
oracle itself cannot run (the fp32 reference out of memory on a large case), every candidate of
the case is ERROR with a reason starting ORACLE_FAILED, which is no candidate's failure.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgpt.bench import checks, timing

FASTGPT, REFERENCE = "fastgpt", "reference"
OK, FAILED, ERROR, UNAVAILABLE, SKIPPED = "ok", "FAILED", "error", "unavailable", "skipped"


# How the reason of a record starts when the oracle, not the candidate, raised.
ORACLE_FAILED = "oracle failed, nothing checked"


class Unavailable(Exception):
    """A candidate cannot run here (library missing, unsupported shape); the message says why."""


class OracleFailed(Exception):
    """Raised by a check when the oracle it runs (e.g. generate's fp32 model) raised."""


@dataclass
class Candidate:
    """One implementation of a case's op.

    build() prepares it (imports, compilation handles, plans) and returns fn(inputs) -> output;
    it raises Unavailable when the implementation cannot run here. `check`, when given,
    replaces the case's check (for a reference with different semantics, e.g. argmax).
    A `lower_bound` reference does less than the op (argmax instead of sampling): it is timed
    and compared with, but never counted as the best reference. `details`, when given, says
    after the warm-up what the candidate chose for this case (e.g. the autotuned config); it is
    added to the record's note. `setting`, when given, makes a context that is in force around
    the candidate's check, warm-up and timing: what a user sets once rather than at every call
    (SDPA's backend: torch's sdpa_kernel costs ~25 us of host time a call on a 2-core CPU, which
    a call timed by events would count).
    """

    label: str
    kind: str
    build: Callable[[], Callable[[dict], Any]]
    backend: str | None = None
    note: str = ""
    check: Callable | None = None
    lower_bound: bool = False
    details: Callable[[], str] | None = None
    setting: Callable[[], contextlib.AbstractContextManager] | None = None

    def in_setting(self) -> contextlib.AbstractContextManager:
        return self.setting() if self.setting is not None else contextlib.nullcontext()


def is_fastgpt_failure(rec: dict) -> bool:
    """A fastgpt candidate that gave a wrong result (FAILED) or crashed (ERROR): the run fails.
    An ERROR because the oracle failed is not the candidate's failure."""
    if rec["kind"] != FASTGPT:
        return False
    return rec["status"] == FAILED or (rec["status"] == ERROR and not str(rec["reason"]).startswith(ORACLE_FAILED))


def describe(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def default_check(run: Callable[[], Any], inputs: dict, expected: Any) -> str | None:
    """Run once and compare with the reference output (tensor or tuple of tensors)."""
    return checks.compare(run(), expected)


@dataclass
class Case:
    """One op at one shape. make_inputs(seed) returns a fresh random input set on the device."""

    op: str
    name: str
    params: dict
    dtype: torch.dtype
    make_inputs: Callable[[int], dict]
    reference: Callable[[dict], Any]
    candidates: list[Candidate]
    metric: str  # "TFLOP/s" or "GB/s"
    work: int  # FLOPs (TFLOP/s cases) or bytes (GB/s cases) of one call
    set_bytes: int  # bytes of one input set, to size the rotation
    sweep: str | None = None
    x: float | None = None
    x_label: str | None = None
    check: Callable = default_check
    note: str = ""
    ceiling: str = "copy_gbps"  # a GB/s case's: "read_gbps" where its bytes are (almost) all read


@dataclass
class Settings:
    """How hard to time: budgets per candidate, the CUDA-graph threshold, the measured ceilings."""

    budget_ms: float = 1000.0
    min_runs: int = 20
    max_runs: int = 1000
    graph_below_ms: float = 0.05
    graph_replay_ms: float = 2.0
    device_time_below_ms: float = 5.0  # events-timed candidates this fast also get device_ms
    memory_budget: int = 4 * 2**30
    ceilings: dict = field(default_factory=dict)  # {"copy_gbps", "read_gbps", "matmul_tflops"}: float
    impl_filter: Callable[[str], bool] = lambda label: True
    deadline: float | None = None  # time.monotonic() after which nothing new starts (--time-limit)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


RECORD_FIELDS = (
    "op", "case", "sweep", "x", "x_label", "params", "dtype", "implementation", "kind", "backend", "note",
    "status", "reason", "method", "ms", "ms_p20", "ms_p80", "runs", "device_ms", "flops", "bytes", "weight_bytes",
    "metric", "value", "ceiling", "ceiling_value", "pct_of_ceiling", "lower_bound", "best_ref",
    "speedup_vs_best_ref", "speedup_vs",
)


def empty_record(**fields) -> dict:
    """A record with every field of RECORD_FIELDS (None unless given)."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise KeyError(f"unknown record fields {sorted(unknown)}")
    return {**dict.fromkeys(RECORD_FIELDS), **fields}


def base_record(case: Case, cand: Candidate) -> dict:
    """The fields of a record known before running anything."""
    metric_is_flops = case.metric == "TFLOP/s"
    return empty_record(
        op=case.op, case=case.name, sweep=case.sweep, x=case.x, x_label=case.x_label, params=dict(case.params),
        dtype=str(case.dtype).replace("torch.", ""), implementation=cand.label, kind=cand.kind,
        backend=cand.backend, note=cand.note, metric=case.metric, lower_bound=cand.lower_bound,
        flops=case.work if metric_is_flops else None, bytes=case.work if case.metric == "GB/s" else None)


def free_cached_memory(device: torch.device) -> None:
    """Hand what a candidate left in torch's cache back, for the next one (after an out-of-memory
    error, or between candidates that each hold a model)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(case: Case, cand: Candidate, inputs: dict, expected: Any, device: torch.device):
    """Build and check one candidate on `inputs`: (fn, status, reason). Only OK gets an fn."""
    from fastgpt import BackendUnavailableError

    check = cand.check or case.check
    try:
        fn = cand.build()
        reason = check(lambda: fn(inputs), inputs, expected)
        timing.synchronize(device)  # a launch error surfaces here, charged to this candidate
    except (Unavailable, BackendUnavailableError) as exc:
        return None, UNAVAILABLE, str(exc)
    except OracleFailed as exc:
        return None, ERROR, f"{ORACLE_FAILED}: {exc}"
    except torch.cuda.OutOfMemoryError as exc:  # e.g. the unfused torch backend at long S: no crash
        free_cached_memory(device)
        return None, UNAVAILABLE, f"does not fit in memory here ({describe(exc)})"
    except Exception as exc:  # a reference that rejects the shape, a crash: report, go on
        return None, ERROR, describe(exc)
    if reason:
        return None, FAILED, reason
    return fn, OK, None


def _graph_plan(n_sets: int, est: float, settings: Settings) -> tuple[int, int]:
    """(calls per graph, replays): a graph long enough (graph_replay_ms) that one replay's launch
    is noise, a whole number of passes over the input sets."""
    calls = n_sets * max(1, math.ceil(settings.graph_replay_ms / max(est * n_sets, 1e-6)))
    calls = min(calls, max(n_sets, 4096))
    return calls, timing.plan_runs(est * calls, settings.budget_ms, 5, 200)


def _time_graph_or_events(call, n_sets, est, settings, flush):
    """CUDA-graph replay (falling back to events if capture fails): (times, method)."""
    calls, replays = _graph_plan(n_sets, est, settings)
    try:
        return timing.time_graph(call, calls, replays), f"cuda-graph x{calls}"
    except Exception as exc:
        torch.cuda.synchronize()
        runs = timing.plan_runs(est, settings.budget_ms, settings.min_runs, settings.max_runs)
        return timing.time_events(call, runs, flush), f"cuda-events+l2flush (graph capture failed: {type(exc).__name__})"


def measure(fn, sets, device, mode, est, settings, flush) -> timing.Stats:
    """Time fn over the rotating input sets with the case's method."""
    n = len(sets)

    def call(i):
        return fn(sets[i % n])

    if device.type != "cuda":
        runs = timing.plan_runs(est, settings.budget_ms, min(settings.min_runs, 5), settings.max_runs)
        return timing.summarize(timing.time_host(call, runs, device, warmup=0), "host-clock")
    if mode == "graph":
        times, method = _time_graph_or_events(call, n, est, settings, flush)
        return timing.summarize(times, method)
    runs = timing.plan_runs(est, settings.budget_ms, settings.min_runs, settings.max_runs)
    return timing.summarize(timing.time_events(call, runs, flush), "cuda-events+l2flush")


def device_ms(fn, sets, est: float, settings: Settings) -> float | None:
    """Median ms per call under CUDA-graph replay: the GPU's time without the host's (a call
    timed with events also counts the host's time whenever the host is the slower side). None
    when the call cannot be captured."""
    n = len(sets)
    calls, replays = _graph_plan(n, est, settings)
    try:
        times = timing.time_graph(lambda i: fn(sets[i % n]), calls, replays)
    except Exception:
        with contextlib.suppress(Exception):  # a fault the sync re-raises is the events timing's to report
            torch.cuda.synchronize()
        return None
    return timing.summarize(times, "cuda-graph").median


def fill_timing(rec: dict, stats: timing.Stats, case: Case, settings: Settings) -> None:
    """Put ms, the rate from the case's formula and the % of the measured ceiling in a record."""
    seconds = stats.median * 1e-3
    rec.update(ms=stats.median, ms_p20=stats.p20, ms_p80=stats.p80, runs=stats.runs, method=stats.method)
    if case.metric == "TFLOP/s":
        rec["value"] = case.work / seconds / 1e12
        rec["ceiling"], rec["ceiling_value"] = "matmul_tflops", settings.ceilings.get("matmul_tflops")
    else:
        rec["value"] = case.work / seconds / 1e9
        rec["ceiling"], rec["ceiling_value"] = case.ceiling, settings.ceilings.get(case.ceiling)
    if rec["ceiling_value"]:
        rec["pct_of_ceiling"] = 100.0 * rec["value"] / rec["ceiling_value"]


def best_reference(records: list[dict]) -> dict | None:
    """The fastest timed reference that does the op's full work (lower bounds excluded)."""
    refs = [r for r in records if r["kind"] == REFERENCE and r["status"] == OK and not r.get("lower_bound")]
    return min(refs, key=lambda r: r["ms"]) if refs else None


def add_speedups(records: list[dict]) -> None:
    """On each timed fastgpt record: speedup (reference ms / own ms) over every timed reference,
    and over the best one."""
    refs = [r for r in records if r["kind"] == REFERENCE and r["status"] == OK]
    best = best_reference(records)
    for rec in records:
        if rec["kind"] == FASTGPT and rec["status"] == OK and refs:
            rec["speedup_vs"] = {r["implementation"]: r["ms"] / rec["ms"] for r in refs}
            if best is not None:
                rec["best_ref"] = best["implementation"]
                rec["speedup_vs_best_ref"] = best["ms"] / rec["ms"]


def make_sets(case: Case, device: torch.device, settings: Settings) -> list[dict]:
    """Fresh random input sets (distinct seeds) to rotate through while timing."""
    n = timing.rotation_sets(case.set_bytes, device, memory_budget=settings.memory_budget)
    return [case.make_inputs(1234 + i) for i in range(n)]


@dataclass
class Checked:
    """One candidate after its check: its record (status and reason set) and, while it may still
    be timed, its callable, the per-call estimate (ms) from the warm-up and, where that is small
    (settings.device_time_below_ms), its device time under graph replay (None: not measured, or
    the call cannot be captured)."""

    cand: Candidate
    rec: dict
    fn: Callable[[dict], Any] | None = None
    est: float | None = None
    device: float | None = None


def check_candidate(case: Case, cand: Candidate, sets: list[dict], expected: Any, device: torch.device,
                    settings: Settings) -> Checked:
    """Build and check one candidate on sets[0] (unless --impl excludes it). Only OK keeps an fn."""
    out = Checked(cand, base_record(case, cand))
    if not settings.impl_filter(cand.label):
        out.rec.update(status=SKIPPED, reason="excluded by --impl")
        return out
    out.fn, out.rec["status"], out.rec["reason"] = prepare(case, cand, sets[0], expected, device)
    return out


def warm_up(checked: Checked, sets: list[dict], device: torch.device) -> None:
    """Warm a checked candidate up over the rotating sets and estimate its ms per call."""
    if checked.fn is None:
        return
    fn = checked.fn
    try:
        checked.est = timing.estimate_ms(lambda i: fn(sets[i % len(sets)]), device)
        details = checked.cand.details() if checked.cand.details is not None else None
    except Exception as exc:
        checked.fn = None
        checked.rec.update(status=ERROR, reason=f"warm-up failed: {describe(exc)}")
        return
    checked.rec["note"] = "; ".join(filter(None, (checked.rec["note"], details)))


def check_and_warm_up(case: Case, cand: Candidate, sets: list[dict], expected: Any, device: torch.device,
                      settings: Settings) -> Checked:
    """check_candidate, then warm_up when it passed."""
    checked = check_candidate(case, cand, sets, expected, device, settings)
    warm_up(checked, sets, device)
    return checked


def device_estimate(checked: Checked, sets: list[dict], device: torch.device, settings: Settings) -> float:
    """What a warmed-up candidate costs the GPU, for the timing mode: its device time under graph
    replay (kept for its record) where its estimate is small, else the estimate. The estimate of a
    small call is its host's time more than its kernels': back-to-back eager calls of a 5 us
    kernel behind 60 us of Python measure 60 us, which kept tiny cases out of graph timing."""
    if device.type == "cuda" and checked.est <= settings.device_time_below_ms:
        checked.device = device_ms(checked.fn, sets, checked.est, settings)
    return checked.est if checked.device is None else min(checked.est, checked.device)


def timing_mode(device: torch.device, estimates: list[float], settings: Settings) -> str:
    """"graph" when the fastest candidate is a tiny kernel on a GPU (launch gaps would dominate),
    by `estimates` (device_estimate's), else "events". One mode for all candidates of a case, so
    they are timed alike."""
    tiny = device.type == "cuda" and bool(estimates) and min(estimates) < settings.graph_below_ms
    return "graph" if tiny else "events"


def time_checked(checked: Checked, case: Case, sets: list[dict], device: torch.device, mode: str,
                 settings: Settings, flush) -> None:
    """Time a warmed-up candidate and put ms, rate and % of ceiling in its record (ERROR if timing fails)."""
    if checked.fn is None:
        return
    try:
        stats = measure(checked.fn, sets, device, mode, checked.est, settings, flush)
    except Exception as exc:
        checked.rec.update(status=ERROR, reason=f"timing failed: {describe(exc)}")
        return
    fill_timing(checked.rec, stats, case, settings)
    if stats.method.startswith("cuda-graph"):
        checked.rec["device_ms"] = stats.median
    else:
        checked.rec["device_ms"] = checked.device  # device_estimate's (None where it measured none)


def expected_output(case: Case, inputs: dict, device: torch.device) -> tuple[Any, str | None]:
    """(the oracle's output on `inputs`, None), or (None, reason) when the oracle raised (say,
    out of memory on a large case); the reason starts with ORACLE_FAILED."""
    try:
        expected = case.reference(inputs)
        timing.synchronize(device)
    except Exception as exc:
        return None, f"{ORACLE_FAILED}: the reference raised {describe(exc)}"
    return expected, None


def oracle_failed_records(case: Case, settings: Settings, reason: str) -> list[dict]:
    """Every candidate of a case whose oracle failed: ERROR with `reason` (none was run)."""
    records = []
    for cand in case.candidates:
        excluded = not settings.impl_filter(cand.label)
        records.append(dict(base_record(case, cand), status=SKIPPED if excluded else ERROR,
                            reason="excluded by --impl" if excluded else reason))
    return records


def run_case(case: Case, device: torch.device, settings: Settings, on_step=lambda text: None) -> list[dict]:
    """Check every candidate of `case`, then time the correct ones. Returns one record each.

    All are checked (and the reference output freed) before any is timed, so that the timing
    method can be chosen once for the whole case.
    """
    sets = make_sets(case, device, settings)
    on_step(f"{case.op} {case.name}: reference output")
    expected, failure = expected_output(case, sets[0], device)
    if failure:
        return oracle_failed_records(case, settings, failure)
    checked = []
    for cand in case.candidates:
        on_step(f"{case.op} {case.name}: checking {cand.label}")
        with cand.in_setting():
            checked.append(check_and_warm_up(case, cand, sets, expected, device, settings))
    del expected
    ready = [c for c in checked if c.fn is not None]
    estimates = []
    for c in ready:
        with c.cand.in_setting():
            estimates.append(device_estimate(c, sets, device, settings))
    mode = timing_mode(device, estimates, settings)
    flush = timing.l2_flush_buffer(device)
    for c in ready:
        on_step(f"{case.op} {case.name}: timing {c.cand.label}")
        with c.cand.in_setting():
            time_checked(c, case, sets, device, mode, settings, flush)
    records = [c.rec for c in checked]
    add_speedups(records)
    return records
