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
    monkeypatch.setattr(tl.standard, "sort_impl", interpreter.originals().sort_impl)  # the network, not numpy's sort
    fast = _run(x)
    monkeypatch.setattr(triton_interpreter.ReduceOps, "apply_impl", interpreter.originals().reduce)
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

    slow_patch, listed = interpreter.originals().patch_builtin, interpreter.originals().listed
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


@triton.jit
def _store_sorted(ptr, offs, y, widths_ptr, i: tl.constexpr):
    """y's values (wrapped into the output's type, as the test's unsigned views need), and its width."""
    tl.store(ptr + offs, y.to(ptr.dtype.element_ty))
    tl.store(widths_ptr + i, y.dtype.primitive_bitwidth)


@triton.jit
def _sort_kernel(x_ptr, asc_ptr, desc_ptr, top1_ptr, top4_ptr, row_ptr, widths_ptr, M: tl.constexpr,
                 N: tl.constexpr, AS_UNSIGNED: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs)
    row = tl.load(x_ptr + tl.arange(0, N))
    if AS_UNSIGNED:  # the same bits, compared as unsigned
        x = x.to(tl.uint32 if x.dtype.primitive_bitwidth == 32 else tl.uint64, bitcast=True)
        row = row.to(x.dtype, bitcast=True)
    _store_sorted(asc_ptr, offs, tl.sort(x), widths_ptr, 0)
    _store_sorted(desc_ptr, offs, tl.sort(x, descending=True), widths_ptr, 1)
    _store_sorted(top1_ptr, tl.arange(0, M)[:, None], tl.topk(x, 1), widths_ptr, 2)
    _store_sorted(top4_ptr, tl.arange(0, M)[:, None] * 4 + tl.arange(0, 4)[None, :], tl.topk(x, 4), widths_ptr, 3)
    _store_sorted(row_ptr, tl.arange(0, N), tl.topk(row, N), widths_ptr, 4)


def _run_sorts(x, as_unsigned=False):
    M, N = x.shape
    outs = [torch.empty_like(x), torch.empty_like(x), torch.empty(M, 1, dtype=x.dtype),
            torch.empty(M, 4, dtype=x.dtype), torch.empty(N, dtype=x.dtype),
            torch.empty(5, dtype=torch.int32)]  # fmt: skip
    _sort_kernel[(1,)](x, *outs, M=M, N=N, AS_UNSIGNED=as_unsigned)
    return outs


@pytest.mark.parametrize(
    "dtype, as_unsigned, high",
    [(torch.int8, False, 2**7), (torch.int16, False, 2**15), (torch.int32, False, 2**31), (torch.int64, False, 2**62),
     (torch.uint8, False, 2**8), (torch.int32, True, 2**31), (torch.int64, True, 2**62), (torch.int32, False, 3),
     (torch.float32, False, None), (torch.float16, False, None)],
    ids=["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", "int32-ties", "fp32", "fp16"],
)  # fmt: skip
def test_integer_sorts_equal_the_interpreters_own(dtype, as_unsigned, high, monkeypatch):
    """tl.sort (both ways) and tl.topk (k of 1, 4 and the whole row) of every integer width,
    signed and unsigned, with ties: numpy's sort gives the network's bits. Floats (NaN, -0.0,
    inf, ties) are left to the network, so they come out as it leaves them."""
    g = torch.Generator().manual_seed(7)
    if dtype.is_floating_point:
        x = torch.randint(-3, 3, (8, 16), generator=g).to(dtype) / 2
        x[0, :4] = torch.tensor([float("nan"), -0.0, 0.0, float("inf")])
        x[1, 5:9] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")])
    else:
        low = 0 if dtype == torch.uint8 else -high
        x = torch.randint(low, high, (8, 16), generator=g, dtype=torch.int64).to(dtype)
    fast = _run_sorts(x, as_unsigned)
    monkeypatch.setattr(tl.standard, "sort_impl", interpreter.originals().sort_impl)
    slow = _run_sorts(x, as_unsigned)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bit for bit (NaN, -0.0)
    if not dtype.is_floating_point:
        if as_unsigned:  # compared as unsigned: the sign bit flipped (64 bits), or the bits' value (32)
            keys = x ^ torch.iinfo(torch.int64).min if dtype == torch.int64 else x.long() & 0xFFFFFFFF
        else:
            keys = x.long()
        ranked = keys.sort(dim=1).indices
        asc, desc, top1, top4, row, _ = fast
        assert torch.equal(asc, x.gather(1, ranked)) and torch.equal(desc, x.gather(1, ranked.flip(1)))
        assert torch.equal(top1, desc[:, :1]) and torch.equal(top4, desc[:, :4]) and torch.equal(row, desc[0])


def _helpers_kernel_results(x):
    """A kernel whose helpers reach both language modules: tl.topk on floats (standard.py's
    network, in `core`), a helper of this module (`tl`), tl.sort on ints (the numpy shortcut)."""
    M, N = x.shape
    top, sums, ints = torch.empty(M, 4), torch.empty(M), torch.empty(M, N, dtype=torch.int32)
    _helpers_kernel[(2,)](x, top, sums, ints, M=M, N=N)
    return top, sums, ints


@triton.jit
def _row_sums(x):
    return tl.sum(tl.where(x > 0, x, 0.0), axis=1)


@triton.jit
def _helpers_kernel(x_ptr, top_ptr, sums_ptr, ints_ptr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(top_ptr + tl.arange(0, M)[:, None] * 4 + tl.arange(0, 4)[None, :], tl.topk(x, 4))
    tl.store(sums_ptr + tl.arange(0, M), _row_sums(x) + tl.program_id(0))
    tl.store(ints_ptr + offs, tl.sort((x * 8).to(tl.int32), descending=True))


def test_one_language_patch_a_launch_equals_the_interpreters_own(monkeypatch):
    """Two launches of a kernel whose helpers reach triton.language and triton.language.core
    (the second starting from what the first leaves patched): the same results, and the same
    language left patched after each, as Triton's patching at every helper's call gives; and
    Triton's patching runs for a module at most twice a launch (the kernel's, and the first
    helper's call that reaches it), not at every helper's call."""
    from triton.runtime import interpreter as triton_interpreter

    originals = interpreter.originals()
    watched = [(pkg, name, member) for pkg, members in originals.listed.items() for name, member in members]
    watched += [(pkg, name, getattr(pkg, name)) for pkg in (tl, tl.core)
                for name in ("range", "static_range", "reduce", "associative_scan")]  # fmt: skip
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))

    def launches(shortcut):
        with monkeypatch.context() as m:
            for pkg, name, member in watched:  # the unpatched language (Triton leaves helpers' patches)
                m.setattr(pkg, name, member)
            if not shortcut:
                m.setattr(triton_interpreter, "_patch_lang", originals.patch_lang)
                m.setattr(triton_interpreter.GridExecutor, "__call__", originals.grid_call)
            patched, patch_tensor = [], triton_interpreter._patch_lang_tensor  # one call a module patched
            m.setattr(triton_interpreter, "_patch_lang_tensor", lambda *a: patched.append(a) or patch_tensor(*a))
            results, unpatched = [], []
            for _ in range(2):
                results.append(_helpers_kernel_results(x))
                unpatched.append([getattr(pkg, name) is member for pkg, name, member in watched])
        return results, unpatched, len(patched)

    fast, slow = launches(shortcut=True), launches(shortcut=False)
    for fast_results, slow_results in zip(fast[0], slow[0], strict=True):
        for a, b in zip(fast_results, slow_results, strict=True):
            assert torch.equal(a, b)
    assert fast[1] == slow[1]
    assert not all(fast[1][0])  # the helpers' patches outlive the launch
    assert fast[2] <= 2 * 3 < slow[2]  # a launch: its kernel's module, then each module once more at most
