"""pytest-benchmark: greedy generation, fastgpt vs transformers vs a compiled static-KV GPT-2.

The `fastgpt bench generate` cases: GPT-2 124M architecture (random weights), 32-token prompt;
on a GPU bf16, B 1 and 32, 256 new tokens; on a CPU fp32, B 1, 16 new tokens (FASTGPT_BENCH_FULL=1: B 1 and 4, 64).
"""

import pytest

from fastgpt.bench import suite


@pytest.mark.parametrize("params,label", suite.generate_params())
def test_generate(benchmark, ceilings, generate_models, params, label):
    suite.run_generate(benchmark, generate_models, params, label, ceilings)
