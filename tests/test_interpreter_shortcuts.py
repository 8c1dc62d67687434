"""tests/interpreter.py's shortcuts through Triton's interpreter give what Triton's own code does."""

import functools
import operator
import os

import pytest
import torch
import triton
import triton.language as tl

from tests import interpreter

if os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="the shortcuts are the interpreter's")
elif interpreter.originals() is None:
    pytestmark = pytest.mark.skip(reason="this Triton's interpreter keeps its own code (tests/interpreter.py)")


@triton.jit
def _xor_kernel(x_ptr, rows_ptr, cols_ptr, all_ptr, top_ptr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(rows_ptr + tl.arange(0, M), tl.xor_sum(x, axis=1))
    tl.store(cols_ptr + tl.arange(0, N)[None, :], tl.xor_sum(x, axis=0, keep_dims=True))
    tl.store(all_ptr, tl.xor_sum(x))
    top = tl.arange(0, M)[:, None] * 4 + tl.arange(0, 4)[None, :]
    tl.store(top_ptr + top, tl.topk(x, 4))  # a bitonic network: xor reductions on a hypercube


def _run(x):
    M, N = x.shape
    rows, cols, total = torch.empty(M, dtype=x.dtype), torch.empty(1, N, dtype=x.dtype), torch.empty(1, dtype=x.dtype)
    top = torch.empty(M, 4, dtype=x.dtype)
    _xor_kernel[(1,)](x, rows, cols, total, top, M=M, N=N)
    return rows, cols, total, top


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_xor_reductions_equal_the_interpreters_own(dtype, monkeypatch):
    """Rows, columns (keep_dims), the whole block, and tl.topk's network: as Triton's own
    reduction gives them, and as Python's xor does."""
    from triton.runtime import interpreter as triton_interpreter

    x = torch.randint(-(2**31), 2**31 - 1, (8, 16), generator=torch.Generator().manual_seed(5)).to(dtype)
    fast = _run(x)
    slow_reduce, _, _ = interpreter.originals()
    monkeypatch.setattr(triton_interpreter.ReduceOps, "apply_impl", slow_reduce)
    slow = _run(x)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    rows, cols, total, top = fast
    assert rows.tolist() == [functools.reduce(operator.xor, r) for r in x.tolist()]
    assert cols[0].tolist() == [functools.reduce(operator.xor, c) for c in x.t().tolist()]
    assert total.item() == functools.reduce(operator.xor, x.flatten().tolist())
    assert torch.equal(top, x.topk(4, dim=1).values)


def test_language_patches_equal_the_interpreters_own(monkeypatch):
    """The shortcut patches the same attributes of the same objects as Triton's walk, from the
    unpatched language (each scope undone after). Triton leaves patched what a kernel's nested
    helpers patched (tl.core's builtins, mostly), so every listed builtin is first put back."""
    from triton.runtime import interpreter as triton_interpreter

    _, slow_patch, listed = interpreter.originals()
    packages = [tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base]
    assert set(listed) == set(packages)
    for pkg, members in listed.items():
        for name, member in members:
            monkeypatch.setattr(pkg, name, member)

    def patched(patch_builtin):
        scope = triton_interpreter._LangPatchScope()
        for pkg in packages:
            patch_builtin(pkg, triton_interpreter.interpreter_builder, scope)
        changes = [(id(obj), name) for obj, name, _ in scope._changes]
        scope.restore()
        return changes

    fast = patched(triton_interpreter._patch_builtin)
    assert len(fast) == sum(len(members) for members in listed.values()) and fast == patched(slow_patch)
    assert len(listed[tl.core]) > 50
