"""Shared fixtures: the device, and the skip of `gpu` tests without CUDA.

Without a CUDA device the Triton kernels run in Triton's interpreter, so TRITON_INTERPRET=1 is
set here, before any test module imports a kernel (Triton reads it when a kernel is defined),
and the interpreter gets tests/interpreter.py's shortcuts.
"""

import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter

    interpreter.install()  # the same results from Triton's interpreter, faster (tests/interpreter.py)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _cuda_device_objects(monkeypatch):
    """Without a GPU, tests that resolve backends for a torch.device("cuda") object (no tensors)
    meet the extension's question of which of its code that GPU would run: sm_90's, say."""
    if not HAS_CUDA:
        from fastgpt import _backends

        monkeypatch.setattr(_backends, "_code_arch_of", lambda index: 90)



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Outputs a launcher allocates with torch.empty start poisoned (NaN, or a sentinel for
    integers), so an element it never writes fails the comparison."""
    from tests.helpers import poison

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))


@pytest.fixture(scope="session")
def simt_module():
    """The host build of fastgpt._C on the SIMT emulator (tests/simt/), built once a session
    (and cached under build/ between sessions)."""
    if shutil.which("g++") is None:
        pytest.skip("the SIMT emulator needs g++")
    from tests.simt import build

    return build.build()


@pytest.fixture
def cuda_emulator(simt_module, monkeypatch):
    """backend="cuda" takes CPU tensors in this test: csrc's kernels on the SIMT emulator."""
    from fastgpt import _backends

    monkeypatch.setenv(_backends.EMULATOR_ENV_VAR, str(simt_module))
