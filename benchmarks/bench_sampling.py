"""pytest-benchmark: sampling, every fastgpt backend and reference over the `fastgpt bench sampling` cases."""

import pytest
import torch

from fastgpt.bench import suite

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")


@pytest.mark.parametrize("case,label", suite.kernel_params("sampling"))
def test_sampling(benchmark, ceilings, case, label):
    suite.run_kernel(benchmark, case, label, ceilings)
