"""Shortcuts through Triton's interpreter (Triton 3.6), for the tests' sake: the same results, in
a fraction of the time.

1. Xor reductions. tl.sort and tl.topk are bitonic networks whose every compare-and-swap step
   reduces with `xor_sum`. The interpreter runs a reduction it does not know one element at a
   time in Python. Here xor joins the reductions it hands to numpy (sum, max, argmax):
   `bitwise_xor.reduce` over the same axis, the same integers (xor is associative, commutative
   and exact). A negative axis is left to Triton's own code, which fails on it (compiled Triton
   does not) as it would without the shortcut.
2. Patching the language. Every call of a @triton.jit helper inside a kernel re-patches
   triton.language for the interpreter, which walks each language module's members with
   inspect.getmembers (~1.5 ms a call). Here each module's builtins are listed once, before any
   kernel runs, and a call patches those that are still the originals: the set Triton's walk
   would patch, since a patched member is a wrapper Triton's walk skips too.
3. Patching it again. Within a launch, a helper's call whose language modules (triton.language,
   triton.language.core: those its globals hold) the launch has patched already patches nothing:
   Triton would set each attribute again to a new but identical wrapper (they hold no state but
   the one interpreter builder). A helper reaching a module the launch has not patched yet takes
   Triton's own code. (A quarter of the row sampling kernel's time.)
4. Sorting integers. tl.sort and tl.topk (the sampling kernels' candidate path) over integers
   are numpy's sort: the network's result is the sorted values (or the k largest, descending; the
   k smallest, ascending), and integers equal in value are equal in bits, so which copy lands
   where cannot show; k below the length widens 8- and 16-bit integers to int32, as the
   network's tl.max and tl.min do. Floats (NaN, -0.0), other axes, k or lengths that are not
   powers of two, and bool are left to Triton's network. (With 3., a candidate-path draw in a
   quarter of the time.)

tests/test_interpreter_shortcuts.py checks each against Triton's own code. Nothing outside
tests/ installs them: the kernels and the package are unchanged.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np


def _xor_reduce(ops, input):
    """ReduceOps.apply_impl for xor: `input` a 1-tuple of an integer tensor."""
    (x,) = input
    return ops.to_tensor(np.bitwise_xor.reduce(x.handle.data, axis=ops.axis, keepdims=ops.keep_dims), x.dtype)


def _listed_builtins(packages) -> dict:
    """Each package's (name, builtin) members, where getattr gives the member itself back (so a
    later call can tell an original from a wrapper by identity); packages where it does not are
    left to Triton's walk."""
    import triton.language as tl

    listed = {}
    for pkg in packages:
        members = [(name, m) for name, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
        if all(getattr(pkg, name) is m for name, m in members):
            listed[pkg] = members
    return listed


def _sorted_integers(x, k, dim, descending):
    """tl.standard.sort_impl's result for an integer block, by numpy; None where the shortcut
    leaves the call to Triton's network (floats, bool, another axis, sizes not powers of two)."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    k, dim, descending = (tl.core._unwrap_if_constexpr(v) for v in (k, dim, descending))
    if not isinstance(x, tl.tensor) or not x.type.is_block():
        return None
    if not x.dtype.is_int() or x.dtype.primitive_bitwidth < 8:
        return None
    shape = [int(v) for v in x.shape]
    n = shape[-1]
    k = n if k is None else k
    sizes = (math.prod(shape), n, k)
    if dim not in (None, len(shape) - 1) or k > n or any(triton.next_power_of_2(v) != v for v in sizes):
        return None
    data = np.sort(x.handle.data, axis=-1)
    data = np.ascontiguousarray((data[..., ::-1] if descending else data)[..., :k])
    dtype = x.dtype
    if k < n and dtype.primitive_bitwidth < 32:  # the network's tl.max / tl.min widen to int32
        dtype, data = tl.int32, data.astype(np.int32)
    return tl.tensor(TensorHandle(data, dtype), tl.block_type(dtype, shape[:-1] + [k]))


def install() -> None:
    """Install the shortcuts (once; before any kernel has run, while the language is unpatched).
    A Triton whose interpreter lacks the internals they replace keeps its own code."""
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_fastgpt_shortcuts", False):
        return
    internals = [(interpreter, "ReduceOps"), (interpreter, "_patch_builtin"), (interpreter, "_patch_attr"),
                 (interpreter, "_patch_lang"), (interpreter, "_LangPatchScope"), (interpreter, "GridExecutor"),
                 (interpreter, "TensorHandle"), (tl.standard, "_xor_combine"), (tl.standard, "sort_impl")]  # fmt: skip
    if not all(hasattr(obj, name) for obj, name in internals):
        return

    # 1. Xor reductions in numpy.
    ops = interpreter.ReduceOps
    slow_reduce = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and (self.axis is None or self.axis >= 0):
            return _xor_reduce(self, input)
        return slow_reduce(self, input)

    ops.apply_impl = apply_impl

    # 2. The builtins listed once.
    slow_patch = interpreter._patch_builtin
    listed = _listed_builtins([tl, tl.core, tl.core.tensor, tl.math, tl.core.tensor_descriptor_base])

    def patch_builtin(pkg, builder, scope):
        members = listed.get(pkg)
        if members is None:
            return slow_patch(pkg, builder, scope)
        for name, member in members:
            if getattr(pkg, name) is member:
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtin

    # 3. A launch patches each language module once. Triton patches at the launch (a scope it
    # undoes at the end) and again at each helper's call (scopes it drops, so a module only
    # helpers reach stays patched after the launch, with or without this shortcut).
    slow_patch_lang = interpreter._patch_lang
    slow_grid_call = interpreter.GridExecutor.__call__
    launches = []  # a set a running launch: the language modules patched since it began

    def grid_call(self, *args, **kwargs):
        launches.append(set())
        try:
            return slow_grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_lang(fn):
        langs = {lang for lang in (tl, tl.core) if any(value is lang for value in fn.__globals__.values())}
        if launches and langs and langs <= launches[-1]:
            return interpreter._LangPatchScope()  # nothing to undo, as nothing was changed
        scope = slow_patch_lang(fn)
        if launches:
            launches[-1] |= langs
        return scope

    interpreter.GridExecutor.__call__ = grid_call
    interpreter._patch_lang = patch_lang

    # 4. Integer sorts in numpy.
    slow_sort = tl.standard.sort_impl

    def sort_impl(x, k=None, dim=None, descending=tl.core.CONSTEXPR_0):
        fast = _sorted_integers(x, k, dim, descending)
        return slow_sort(x, k=k, dim=dim, descending=descending) if fast is None else fast

    tl.standard.sort_impl = sort_impl
    interpreter._fastgpt_shortcuts = SimpleNamespace(reduce=slow_reduce, patch_builtin=slow_patch, listed=listed,
                                                     patch_lang=slow_patch_lang, grid_call=slow_grid_call,
                                                     sort_impl=slow_sort)  # fmt: skip


def originals():
    """Triton's own code each shortcut replaces (`reduce`: ReduceOps.apply_impl, `patch_builtin`,
    `patch_lang`, `grid_call`: GridExecutor.__call__, `sort_impl`), and the builtins listed at
    install (`listed`: {package: [(name, builtin)]}), for the tests of the shortcuts; None where
    they are not installed."""
    from triton.runtime import interpreter

    install()
    return getattr(interpreter, "_fastgpt_shortcuts", None)
