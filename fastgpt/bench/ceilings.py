"""The ceilings every rate is compared with, measured first in the same run.

- copy: a large device-to-device copy, GB/s counting bytes read plus bytes written;
- read: a large sum (bytes read, one value written), GB/s: the ceiling of what only reads
  (decode attention's cache, the sampler's logits; a copy's half writes, which cost a GPU more,
  so a read-only kernel can pass it: 4,300 GB/s against a 4,182 GB/s copy on an H200);
- matmul: a large bf16 matrix product (fp32 on CPU), TFLOP/s.

Datasheet numbers are not used: the measured ones include this card's clocks and state.
"""

from __future__ import annotations

import torch

from fastgpt.bench import formulas, timing
from fastgpt.bench.core import empty_record

# (copy elements per buffer, matmul size) per (device type, quick)
SIZES = {
    ("cuda", False): (2**29, 8192),  # 1 GiB of bf16 per buffer
    ("cuda", True): (2**28, 8192),
    ("cpu", False): (2**26, 2048),
    ("cpu", True): (2**24, 1024),
}


def _runs(device: torch.device, quick: bool) -> int:
    return 5 if device.type != "cuda" else (10 if quick else 30)


def _time(call, device: torch.device, runs: int) -> timing.Stats:
    timing.estimate_ms(call, device, warmup=2, runs=1)
    if device.type == "cuda":
        return timing.summarize(timing.time_events(call, runs), "cuda-events")
    return timing.summarize(timing.time_host(call, runs, device, warmup=0), "host-clock")


def copy_gbps(device: torch.device, quick: bool) -> tuple[float, timing.Stats, int]:
    """Median copy bandwidth in GB/s (read + write), its timing, and the bytes per copy.

    Buffers are many times the L2 cache, so no flush is needed; the source is random data.
    """
    numel = SIZES[(device.type, quick)][0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(numel, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    stats = _time(lambda i: dst.copy_(src), device, runs=_runs(device, quick))
    nbytes = formulas.copy_bytes(numel, dtype)
    return nbytes / (stats.median * 1e-3) / 1e9, stats, nbytes


def read_gbps(device: torch.device, quick: bool) -> tuple[float, timing.Stats, int]:
    """Median read bandwidth in GB/s (a sum over a buffer as large as copy's), its timing, and
    the bytes read per sum."""
    numel = SIZES[(device.type, quick)][0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(numel, device=device, dtype=torch.float32).to(dtype)
    out = torch.empty((), device=device, dtype=torch.float32)
    stats = _time(lambda i: torch.sum(src, dim=0, dtype=torch.float32, out=out), device, runs=_runs(device, quick))
    nbytes = numel * src.element_size()
    return nbytes / (stats.median * 1e-3) / 1e9, stats, nbytes


def matmul_tflops(device: torch.device, quick: bool) -> tuple[float, timing.Stats, int, str]:
    """Median TFLOP/s of an n x n x n product (bf16 on the GPU, fp32 on the CPU) on random data."""
    n = SIZES[(device.type, quick)][1]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = _time(lambda i: torch.matmul(a, b, out=out), device, runs=_runs(device, quick))
    flops = formulas.matmul_flops(n, n, n)
    return flops / (stats.median * 1e-3) / 1e12, stats, flops, str(dtype).replace("torch.", "")


def measure(device: torch.device, quick: bool) -> tuple[dict, list[dict]]:
    """The ceilings: ({"copy_gbps", "read_gbps", "matmul_tflops"}, one record each for the report)."""
    gbps, copy_stats, nbytes = copy_gbps(device, quick)
    read, read_stats, read_bytes = read_gbps(device, quick)
    tflops, mm_stats, flops, mm_dtype = matmul_tflops(device, quick)
    n = SIZES[(device.type, quick)][1]
    records = [
        _record("copy", f"{nbytes / 2**30 / 2:.2f} GiB buffer", copy_stats, "GB/s", gbps, bytes_=nbytes),
        _record("read", f"sum of a {read_bytes / 2**30:.2f} GiB buffer", read_stats, "GB/s", read, bytes_=read_bytes),
        _record("matmul", f"{n}x{n}x{n} {mm_dtype}", mm_stats, "TFLOP/s", tflops, flops=flops),
    ]
    return {"copy_gbps": gbps, "read_gbps": read, "matmul_tflops": tflops}, records


def _record(name, case, stats, metric, value, flops=None, bytes_=None) -> dict:
    return empty_record(op="ceiling", case=case, params={}, implementation=name, kind="ceiling", note="",
                        status="ok", method=stats.method, ms=stats.median, ms_p20=stats.p20, ms_p80=stats.p80,
                        runs=stats.runs, flops=flops, bytes=bytes_, metric=metric, value=value)
