"""The harness of scripts/gpu-probe.py (diagnostics for tuning on a GPU): a probe's timers,
deadline and results, the knobs and environment variables its sections flip and put back, and
the tables it makes of a traced step's device events."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable

import torch

from fastgpt import _backends
from fastgpt.bench import timing


@contextlib.contextmanager
def knobs_kept(module, *names: str):
    """Put module.<name> (a knob a section sweeps: a constant, a dict, a function) back as it was
    on the way out, dicts by their contents."""
    saved = {n: getattr(module, n) for n in names}
    copies = {n: dict(v) for n, v in saved.items() if isinstance(v, dict)}
    try:
        yield
    finally:
        for name, value in saved.items():
            if name in copies:
                value.clear()
                value.update(copies[name])
            setattr(module, name, value)


def knob_call(module, name: str, value, fn: Callable) -> Callable:
    """A call of fn() with module.<name> set to value, put back after."""

    def call():
        with knobs_kept(module, name):
            setattr(module, name, value)
            return fn()

    return call


@contextlib.contextmanager
def env_kept(name: str):
    """Put the environment variable `name` (a switch a section flips) back as it was on the way out."""
    saved = os.environ.get(name)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


class Probe:
    """Shapes (real or, with smoke, tiny), the timers, the deadline and the results."""

    def __init__(self, smoke: bool, time_limit: float | None, out: str):
        self.smoke, self.out, self.results = smoke, out, {}
        self.device = "cpu" if smoke else "cuda"
        self.deadline = time.monotonic() + time_limit if time_limit is not None else None
        self.backends = [b for b in ("triton", "cuda") if _backends.why_not(b, torch.device(self.device)) is None]

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def host_us(self, fn: Callable, calls: int = 30) -> float:
        """Host time to issue one call (the device synchronized before the loop only)."""
        calls = 1 if self.smoke else calls
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        self.sync()
        return 1e6 * elapsed / calls

    def device_us(self, fn: Callable, per_replay: int = 10, replays: int = 15) -> float:
        """Device time of one call under CUDA-graph replay (median replay); host time on CPU."""
        if self.smoke:  # one call: the smoke run checks the code path, not its time
            start = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - start)
        times = timing.time_graph(lambda _: fn(), per_replay, replays)
        return 1e3 * sorted(times)[len(times) // 2]

    def cold_device_us(self, calls: list[Callable], replays: int = 15) -> float:
        """Device time of one call under CUDA-graph replay, the calls (the same work on different
        copies of its inputs) run in turn in each replay: with copies past the L2 cache, every
        call reads its inputs from memory, as a decode step's matmuls read their weights (the step
        reads 249 MB for GPT-2 124M, ~5x L2). device_us repeats one call, whose inputs then stay in
        L2. Host time of the first call on CPU."""
        if self.smoke:
            return self.device_us(calls[0])
        times = timing.time_graph(lambda i: calls[i](), len(calls), replays)
        return 1e3 * sorted(times)[len(times) // 2]

    def copies(self, set_bytes: int) -> int:
        """How many copies of an input of set_bytes a cold timing (cold_device_us) rotates through:
        twice the L2 cache's bytes in all (at least 2, at most 64 and 2 GiB); 2 with smoke."""
        if self.smoke:
            return 2
        return timing.rotation_sets(set_bytes, torch.device(self.device), memory_budget=2 * 2**30, max_sets=64)

    def record(self, section: str, row: dict, fn: Callable[[], dict]) -> None:
        """Run fn (returning measurements) into `row`, keep an error instead of raising, print."""
        if self.out_of_time():
            row["skipped"] = "time limit"
        else:
            try:
                row.update(fn())
            except Exception as exc:  # one failing variant must not cost the others
                row["error"] = repr(exc)[:240]
        self.add(section, row)

    def add(self, section: str, row: dict) -> None:
        """Keep and print a row already measured (one of several a single measurement gives)."""
        self.results.setdefault(section, []).append(row)
        print(section, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    def randn(self, *shape, dtype=torch.bfloat16):
        dtype = torch.float16 if self.smoke and dtype == torch.bfloat16 else dtype  # the interpreter has no bf16
        return torch.randn(*shape, device=self.device).to(dtype)

    def save(self) -> None:
        with open(os.path.join(self.out, "probe.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    def load(self) -> None:
        """Take the results an earlier process saved (probe.json), to add to them."""
        with open(os.path.join(self.out, "probe.json")) as f:
            self.results = json.load(f)

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def cuda_lost(self) -> str | None:
        """Why this process can use the GPU no more (a fault in a kernel leaves the CUDA context
        unusable: every later call raises), or None while it can."""
        if self.device != "cuda":
            return None
        try:
            torch.cuda.synchronize()
            torch.ones(1, device=self.device).add_(1).item()
        except RuntimeError as exc:
            return repr(exc)[:240]
        return None


def kernel_name(name: str) -> str:
    """A device event's name, short: a C++ kernel's without `void `, anonymous namespaces and its
    argument list, a Triton kernel's without the signature suffix of Triton before 3.0
    (`_0d1d2de`), at most 80 characters. Others ("Memset (Device)") as they are."""
    if name.startswith("void "):
        name = name.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0]
    name = re.sub(r"_(\d+[cde]+){2,}$", "", name)
    return name if len(name) <= 80 else name[:77] + "..."


def traced_steps(p: Probe, step: Callable, steps: int) -> list:
    """`steps` steps under torch's profiler, their events in start order: on a GPU, the device's
    (kernels, memsets, copies) over replays of the step's CUDA graph; on the CPU, the top-level
    torch ops of calls (host time: there are no kernels)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if p.smoke:
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        return sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    graph = timing.capture_graph(lambda _: step(), 1)  # run first on a side stream, then captured
    for _ in range(3):  # the first replay uploads the graph
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()  # the tracer drops what ends after it stops
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sorted(events, key=lambda e: e.time_range.start)


def step_table(events: list, steps: int) -> tuple[dict, list[dict]]:
    """From `steps` identical steps' events in start order: the step's summary (its span, first
    start to last end, the mean over steps; its events' summed time; the gap, span - sum; events
    a step) and a row per short name, most time a step first."""
    if not events:
        raise RuntimeError("no events in the profile: CUPTI traced none of the graph's kernels")
    if len(events) % steps:
        raise RuntimeError(f"{len(events)} events over {steps} steps: some steps' events are missing")
    n = len(events) // steps
    runs = [events[i:i + n] for i in range(0, len(events), n)]
    span = sum(max(e.time_range.end for e in run) - run[0].time_range.start for run in runs) / steps
    times = {}
    for e in events:
        times.setdefault(kernel_name(e.name), []).append(e.time_range.elapsed_us())
    rows = [{"kernel": name, "calls_per_step": len(t) / steps, "us_per_call": sum(t) / len(t),
             "us_per_step": sum(t) / steps} for name, t in times.items()]
    busy = sum(row["us_per_step"] for row in rows)
    summary = {"span_us": span, "kernels_us": busy, "gap_us": span - busy, "launches": n}
    return summary, sorted(rows, key=lambda row: -row["us_per_step"])
