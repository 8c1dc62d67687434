"""Two shortcuts through Triton's interpreter (Triton 3.6), for the tests' sake: the same results,
in about a third of the time on the sampling kernels and three quarters elsewhere.

1. Xor reductions. tl.sort and tl.topk (the sampling kernels' candidate path) are bitonic
   networks whose every compare-and-swap step reduces with `xor_sum`. The interpreter runs a
   reduction it does not know one element at a time in Python: ~95% of a candidate-path launch,
   about half a second a program at 1024 entries. Here xor joins the reductions it hands to
   numpy (sum, max, argmax): `bitwise_xor.reduce` over the same axis, the same integers (xor is
   associative, commutative and exact). A negative axis is left to Triton's own code, which
   fails on it (compiled Triton does not) as it would without the shortcut.
2. Patching the language. Every call of a @triton.jit helper inside a kernel re-patches
   triton.language for the interpreter, which walks each language module's members with
   inspect.getmembers (~1.5 ms a call, a quarter of the interpreter's time on GPT's fused
   decode step). Here each module's builtins are listed once, before any kernel runs, and a
   call patches those that are still the originals: the set Triton's walk would patch, since a
   patched member is a wrapper Triton's walk skips too.

tests/test_interpreter_shortcuts.py checks both against Triton's own code. Nothing outside
tests/ installs them: the kernels and the package are unchanged.
"""

from __future__ import annotations

import inspect

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


def install() -> None:
    """Install both shortcuts (once; before any kernel has run, while the language is unpatched).
    A Triton whose interpreter lacks the internals they replace keeps its own code."""
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_fastgpt_shortcuts", False):
        return
    internals = [(interpreter, "ReduceOps"), (interpreter, "_patch_builtin"), (interpreter, "_patch_attr"),
                 (tl.standard, "_xor_combine")]  # fmt: skip
    if not all(hasattr(obj, name) for obj, name in internals):
        return
    ops = interpreter.ReduceOps
    slow_reduce = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and (self.axis is None or self.axis >= 0):
            return _xor_reduce(self, input)
        return slow_reduce(self, input)

    ops.apply_impl = apply_impl

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
    interpreter._fastgpt_shortcuts = (slow_reduce, slow_patch, listed)


def originals():
    """Triton's own (ReduceOps.apply_impl, _patch_builtin), and the builtins listed at install
    ({package: [(name, builtin)]}), for the tests of the shortcuts; None where not installed."""
    from triton.runtime import interpreter

    install()
    return getattr(interpreter, "_fastgpt_shortcuts", None)
