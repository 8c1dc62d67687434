"""pytest-benchmark: decode, every fastgpt backend and reference over the `fastgpt bench decode` cases."""

import pytest
import torch

from fastgpt.bench import suite

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")


@pytest.mark.parametrize("case,label", suite.kernel_params("decode"))
def test_decode(benchmark, ceilings, case, label):
    suite.run_kernel(benchmark, case, label, ceilings)
