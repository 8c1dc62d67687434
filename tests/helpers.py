"""Test helpers shared by every test module: the tolerance table, poisoning, comparison."""

import torch

# (atol, rtol) per dtype, for comparing a kernel against fastgpt.reference computed in fp32.
TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` with NaN (floats) or a sentinel (ints) so unwritten elements fail a comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)

def assert_close(actual, expected, dtype=None):
    """Compare against the reference with the tolerance of `dtype` (default: actual's dtype)."""
    atol, rtol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
