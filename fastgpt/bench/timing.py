"""Timing: CUDA events, warm-up, median with p20/p80, L2 flush, rotating inputs, CUDA graphs.

Every timer takes `call(i)`, which runs the candidate once on input set `i % n_sets` (the
caller owns the rotation), and returns a list of per-call times in milliseconds; `summarize`
turns that list into the numbers the report prints.

- `time_events`: one CUDA event pair around each call, with the L2 cache flushed (a large
  buffer read) before each one. Between the events there is only the candidate's own work.
- `time_graph`: for kernels of a few microseconds, where launch gaps would dominate: one pass
  over the input sets captured in a CUDA graph, replayed many times; time per call = replay
  time / calls per replay. The input sets are rotated so their total exceeds the L2 cache.
- `time_host`: wall clock (time.perf_counter) around calls that synchronize the device; for
  CPU work and for whole `generate` calls, where host overhead is part of the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FLUSH_MIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in milliseconds per call."""

    median: float
    p20: float
    p80: float
    runs: int
    method: str


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics.

    Same definition as numpy.quantile's default ("linear"): position q * (n - 1) in the sorted
    values.
    """
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str) -> Stats:
    """Median, 20th and 80th percentiles of per-call times (ms)."""
    return Stats(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms), method)


def plan_runs(estimate_ms: float, budget_ms: float, min_runs: int, max_runs: int) -> int:
    """How many timed runs fit in `budget_ms` at `estimate_ms` each, clamped to [min, max]."""
    if estimate_ms <= 0:
        return max_runs
    return int(max(min_runs, min(max_runs, budget_ms // estimate_ms)))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """A buffer several times the L2 cache; reading it (flush_l2) evicts the inputs of the last run."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return torch.empty(max(FLUSH_MIN_BYTES, 4 * l2), dtype=torch.int8, device=device)


def flush_l2(buffer: torch.Tensor) -> None:
    """Evict L2 by reading `buffer` (l2_flush_buffer's): the lines left are clean. A memset left
    them dirty, and the timed call then paid for writing them back too: on an H200 (2026-11-30)
    the bench's decode attention at B64 L1024 and L4096 took 19 and 14 us more than gpu-probe's
    graph replay over cold copies of its cache, about what writing back an L2 of ~50 MB takes at
    4 TB/s."""
    torch.amax(buffer)


def time_host(call: Callable[[int], object], runs: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall-clock ms of each of `runs` calls, the device synchronized before and after each."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(runs):
        synchronize(device)
        start = time.perf_counter()
        call(i)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_events(call: Callable[[int], object], runs: int, flush: torch.Tensor | None = None) -> list[float]:
    """Device ms of each of `runs` calls, measured with CUDA events on the current stream.

    With `flush`, the buffer is read before each call (flush_l2, outside the events), so every
    call starts with its inputs out of L2; the read also keeps the GPU busy while the host queues
    the next launches, so host launch latency stays out of the measurement of small kernels.
    """
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        if flush is not None:
            flush_l2(flush)
        starts[i].record()
        call(i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def estimate_ms(call: Callable[[int], object], device: torch.device, warmup: int = 3, runs: int = 5) -> float:
    """A rough per-call time after `warmup` calls (compilation, autotuning, handle creation)."""
    for i in range(warmup):
        call(i)
    synchronize(device)
    if device.type == "cuda":
        return quantile(time_events(call, runs), 0.5)
    return quantile(time_host(call, runs, device, warmup=0), 0.5)


def capture_graph(call: Callable[[int], object], calls: int) -> torch.cuda.CUDAGraph:
    """Capture `calls` consecutive calls (input sets 0, 1, ...) into one CUDA graph.

    The calls are first run on a side stream, as capture requires (libraries create their
    handles and workspaces there), then captured.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    return graph


def time_graph(call: Callable[[int], object], calls_per_replay: int, replays: int) -> list[float]:
    """Device ms per call under CUDA-graph replay: each replay runs `calls_per_replay` calls."""
    graph = capture_graph(call, calls_per_replay)
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = time_events(lambda _: graph.replay(), replays)
    return [t / calls_per_replay for t in times]


def rotation_sets(set_bytes: int, device: torch.device, *, memory_budget: int, max_sets: int = 512) -> int:
    """How many input sets to rotate through: enough to exceed twice the L2 cache, at least 2.

    Bounded by `memory_budget` bytes in total (and `max_sets`): large inputs get 2 sets, which
    is already far more than L2; tiny inputs get many.
    """
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    wanted = math.ceil(2 * l2 / max(set_bytes, 1))
    affordable = memory_budget // max(set_bytes, 1)
    return int(max(2, min(wanted, affordable, max_sets)))
