"""pytest-benchmark suites over the cases of `fastgpt bench`.

    pytest benchmarks/ --benchmark-json out.json        # quick shapes
    FASTGPT_BENCH_FULL=1 pytest benchmarks/ ...         # the full sweeps
    FASTGPT_BENCH_MODEL=tiny pytest benchmarks/bench_generate.py   # a tiny model (smoke test)

Files named bench_*.py are collected here (pytest's default is test_*.py). Kernel suites need a
CUDA GPU and skip without one; the generate suite runs on the CPU too. A candidate that gives a
wrong result fails its test, as does a fastgpt candidate that raises; one that cannot run here
(or a reference that raises) is skipped with the reason.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself, whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def ceilings(device):
    """Copy and read GB/s and matmul TFLOP/s, measured once per session before any case."""
    from fastgpt.bench import ceilings as measure

    values, _ = measure.measure(device, quick=True)
    return values


@pytest.fixture(scope="session")
def generate_models(device):
    """(hf model, fp32 oracle, device, dtype, config name) shared by the generate benchmarks."""
    from fastgpt.bench.cases import generate as gen
    from fastgpt.bench.core import Unavailable

    config = os.environ.get("FASTGPT_BENCH_MODEL", "gpt2")
    dtype = gen.default_dtype(device)
    try:
        hf = gen.build_hf(config, device, dtype)
    except Unavailable as exc:
        pytest.skip(str(exc))
    return hf, gen.hf_variant(hf, "eager", torch.float32), device, dtype, config

