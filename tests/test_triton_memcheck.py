"""kernels/ stay within the memory they are given: tests/test_cuda_memcheck.py's check, for Triton.

Triton's interpreter (TRITON_INTERPRET=1) performs tl.load and tl.store through memcpy in
libtriton, which AddressSanitizer intercepts: in a child process with libasan preloaded, where
every CPU tensor is a malloc'd block with a redzone right after it, a kernel reading or writing
past a tensor is reported (masked-off lanes are not accessed, so a right mask gives no report).
No sanitized build is needed, only the preload. The second test proves the checker sees such a
read, through a kernel launched with a length one larger than its tensor.
"""

import os
import re
import subprocess

import pytest


@pytest.fixture(scope="module")
def interpreter_asan_env():
    """The environment of a child that runs the Triton kernels in the interpreter under ASan."""
    from tests.simt import build

    runtime = build.asan_runtime()
    if runtime is None:
        pytest.skip(f"no AddressSanitizer runtime: {build.CXX} is missing or has no libasan.so")
    return build.asan_env(None, runtime, {**os.environ, "TRITON_INTERPRET": "1"})


def _cases(env, *args: str) -> subprocess.CompletedProcess:
    from tests.simt import build

    return build.run_memcheck_cases(env, "--backend", "triton", *args)


# The ops in groups of under a minute each in the interpreter on this project's 2-core machine,
# so that pytest-xdist's workers share them instead of one worker running all of them (about two
# minutes), the suite's longest test, at its end.
GROUPS = {
    "sample": ("sample",),
    "attention": ("attention",),
    "decode": ("decode",),
    "several-queries": ("multi_query_decode", "masked_attention"),
    "decode-step": ("linear", "layer_norm", "advance", "lookup"),
}


def test_the_groups_cover_every_op():
    from tests.simt.memcheck_cases import TRITON_CASES

    grouped = [op for ops in GROUPS.values() for op in ops]
    assert sorted(grouped) == sorted(TRITON_CASES)


@pytest.mark.parametrize("ops", GROUPS.values(), ids=GROUPS.keys())
def test_every_triton_kernel_stays_within_its_tensors(interpreter_asan_env, ops):
    result = _cases(interpreter_asan_env, *(arg for op in ops for arg in ("--only", op)))
    assert "AddressSanitizer" not in result.stderr, result.stderr[-20000:]
    assert result.returncode == 0, result.stderr[-20000:]
    assert re.search(r"\d+ cases in", result.stdout), result.stdout


@pytest.mark.parametrize("op, nbytes", [("layer_norm", 3 * 768 * 4), ("sample", 2 * 1000 * 4)])
def test_the_checker_reports_a_triton_read_past_a_tensor(interpreter_asan_env, op, nbytes):
    """memcheck_cases --backend triton --oob: the kernel itself is launched with one row (one
    vocabulary entry) more than the fp32 input holds, and its first load past it is reported, as
    a 4-byte read at the input's end."""
    result = _cases(interpreter_asan_env, "--oob", op)
    assert result.returncode != 0, result.stderr[-20000:]
    report = result.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-20000:]
    access = report[report.index("READ of size 4") : report.index(" is located")]  # its stack
    assert "init_triton_interpreter" in access, report  # the interpreter's load, through memcpy
    assert re.search(rf"located 0 bytes (to the right of|after) {nbytes}-byte region", report), report
    assert "the out-of-bounds call returned" not in report
