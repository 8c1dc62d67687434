"""Test helpers shared by every test module: the tolerance table, poisoning, comparison."""

import torch

from fastgpt.bench.checks import TOLERANCE

# (atol, rtol) per dtype for comparing a kernel with fastgpt.reference: the project's one table,
# which the benchmark harness's correctness check uses too.
TOL = {dtype: (t.atol, t.rtol) for dtype, t in TOLERANCE.items()}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN (floats) or a sentinel (ints) so unwritten elements fail a comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)

def assert_close(actual, expected, dtype=None):
    """Compare against the reference with the tolerance of `dtype` (default: actual's dtype)."""
    atol, rtol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
