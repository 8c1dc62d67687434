"""csrc/'s kernels stay within the memory they are given: a host-side "compute-sanitizer memcheck".

tests/simt's emulator built under AddressSanitizer (build.build(sanitize=True)) runs every CUDA op
through the public API over boundary cases (tests/simt/memcheck_cases.py) in a child process with
libasan preloaded, where every CPU tensor is a malloc'd block with a redzone right after it: a
kernel reading or writing past a tensor, or past the dynamic shared memory it was launched with,
gets a report on stderr and the child exits 1. The second test proves the checker sees such a
read, through the raw binding told a shape larger than its tensor.
"""

import re
import shutil
import subprocess

import pytest


@pytest.fixture(scope="module")
def memcheck_env():
    """The environment of a child process that runs the memcheck build (built once, then cached)."""
    from tests.simt import build

    if shutil.which(build.CXX) is None:
        pytest.skip(f"the memcheck build needs a C++ compiler ({build.CXX} is not on the PATH)")
    runtime = build.asan_runtime()
    if runtime is None:
        pytest.skip(f"{build.CXX} has no AddressSanitizer runtime (libasan.so)")
    return build.asan_env(build.build(sanitize=True), runtime)


def _cases(env, *args: str) -> subprocess.CompletedProcess:
    from tests.simt import build

    return build.run_memcheck_cases(env, *args)


def test_every_kernel_stays_within_its_tensors(memcheck_env):
    result = _cases(memcheck_env)
    assert "AddressSanitizer" not in result.stderr, result.stderr[-20000:]
    assert result.returncode == 0, result.stderr[-20000:]
    assert re.search(r"\d+ cases in", result.stdout), result.stdout


@pytest.mark.parametrize(
    "op, kernel, nbytes",
    [("layer_norm", "layer_norm_kernel", 3 * 768 * 4), ("sample", "sample_kernel", 2 * 1000 * 4)],
)
def test_the_checker_reports_a_read_past_a_tensor(memcheck_env, op, kernel, nbytes):
    """memcheck_cases --oob: the raw binding is told one row (one vocabulary entry) more than the
    fp32 input holds, and the kernel's first read past it is reported, at the input's end."""
    result = _cases(memcheck_env, "--oob", op)
    assert result.returncode != 0, result.stderr[-20000:]
    report = result.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-20000:]
    access = report[report.index("READ of size") : report.index(" is located")]  # its stack
    assert kernel in access, report
    assert re.search(rf"located 0 bytes (to the right of|after) {nbytes}-byte region", report), report
    assert "the out-of-bounds call returned" not in report
