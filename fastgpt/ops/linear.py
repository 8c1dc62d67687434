"""fastgpt.ops.linear: a linear layer over a few rows with the residual add, LayerNorm and GELU
around it fused in (a decode step's matrix-vector products, one launch each; see kernels/linear.py).

Not one of the public ops of DESIGN.md: GPT.decode uses it, on the triton backend, for batches of
up to MAX_ROWS rows. Backends: triton, and torch (plain PyTorch, unfused).
"""

from __future__ import annotations

import math

import torch

from fastgpt import _backends, reference
from fastgpt.ops import _checks, _dispatch

MAX_ROWS = 64  # kernels/linear.py's MAX_ROWS, repeated so that this module imports no Triton
COUNTER_COLUMNS = 16  # output columns a split counter serves at least (kernels/linear.py's narrowest program)
ACTIVATIONS = (None, "gelu_tanh")


def linear(x, weight, bias=None, *, ln=None, residual=None, activation=None, kv_cache=None, kv_pos=None,
           x_rows=None, residual_rows=None, counters=None, backend: str = "auto"):  # fmt: skip
    """activation(LN(x + residual) @ weight.T + bias), fused.

    x: (..., K) fp16, bf16 or fp32; weight: (N, K), x's dtype; bias: (N,) float or None.
    ln: None, or (ln_weight, ln_bias, eps) with ln_weight / ln_bias (K,) float or None:
    LayerNorm the rows first (fp32 statistics; its output rounded to x's dtype, as the unfused
    ops do). residual: like x, or None; needs ln; added first. activation: None or "gelu_tanh"
    (GPT-2's gelu_new). kv_cache, kv_pos: GPT's q|k|v projection writing its k and v straight
    into a layer's cache: kv_cache (2, B, H, S, D) in x's dtype with N == 3 H D and the M rows of
    x T tokens for each of its B rows (M = B T, row-major: a decode step's T = 1, a token and its
    drafts), kv_pos (M,) int64 on x's device; out's columns [H D, 2 H D) (k) and [2 H D, 3 H D)
    (v), head-major, also go to kv_cache[0 or 1, m // T, :, kv_pos[m]]. Slots are not read on the
    host: a slot outside [0, S) is not written; the T slots of a cache row must differ (the kernel
    writes them at once). x_rows: None, or (M,) int64 ids: x is then a table (R, K)
    (an embedding) and the input's row m is x[x_rows[m]], an id outside [0, R) reading zeros;
    residual_rows likewise makes residual a table (R', K) read at those ids. counters: None, or
    int32 zeros (cdiv(N, COUNTER_COLUMNS),) or longer on x's device, which the caller keeps for
    its calls (GPT's KV cache does): with them the triton kernel may split a long K over more
    programs, the last to finish of each column block adding the parts up; it leaves them zero.
    Calls sharing counters must run one at a time (one stream). Returns
    (out (..., N), h) with h = x + residual (the input's shape: (M, K) when gathered), or None
    without a residual. On the triton backend the input may hold at most MAX_ROWS rows (auto
    takes torch beyond that, and off CUDA).
    """
    shape, device, (ln_weight, ln_bias, eps) = _check_args(x, weight, bias, ln, residual, activation, kv_cache,
                                                           kv_pos, x_rows, residual_rows, counters)  # fmt: skip
    N, K = weight.shape
    M = math.prod(shape[:-1])  # rows
    name = _backends.resolve("linear", backend, device, _limits(M, N, K, x), preference=("triton",))
    lead = shape[:-1]
    x2 = x if x_rows is not None else x.reshape(M, K)
    r2 = None if residual is None else residual if residual_rows is not None else residual.reshape(M, K)
    if name == "torch" or M == 0 or N == 0 or K == 0:
        out, h = reference.linear(x2, weight, bias, ln=None if ln is None else (ln_weight, ln_bias, float(eps)),
                                  residual=r2, gelu_tanh=activation == "gelu_tanh", kv_cache=kv_cache,
                                  kv_pos=kv_pos, x_rows=x_rows, residual_rows=residual_rows)  # fmt: skip
        return out.view(*lead, N), None if h is None else h.view(shape)
    x2 = _checks.last_dim_contiguous(x2)
    r2 = None if r2 is None else _checks.last_dim_contiguous(r2)
    # The kernel reads bias and the LayerNorm's weight and bias with a unit stride: a strided or
    # expanded view (stride 0: one element in memory) would be read past its elements.
    bias, ln_weight, ln_bias = (None if p is None else p.contiguous() for p in (bias, ln_weight, ln_bias))
    args = (x2, weight, bias, r2, ln_weight, ln_bias, float(eps), ln is not None, activation == "gelu_tanh", kv_cache,
            kv_pos, x_rows, residual_rows, counters, name)  # fmt: skip
    out, h = _dispatch.call(_linear_op, _linear, *args)
    return out.view(*lead, N), None if residual is None else h.view(shape)


def _check_args(x, weight, bias, ln, residual, activation, kv_cache, kv_pos, x_rows, residual_rows, counters) -> tuple:
    """linear's arguments, checked: (the input's shape (..., K), the device, (ln_weight, ln_bias, eps))."""
    _checks.tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the input features), got a scalar")
    K = x.shape[-1]
    _checks.tensor("weight", weight, ndim=2)
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, K) with K = x.shape[-1] = {K}, got {tuple(weight.shape)}")
    _checks.same_dtype(x=x, weight=weight)
    N = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (N,), "(N,), N = weight.shape[0]")
    ln_weight, ln_bias, eps = _check_ln(ln, K)
    if x_rows is not None:
        _check_rows("x", x, x_rows, K)
    shape = tuple(x.shape) if x_rows is None else (x_rows.shape[0], K)  # the input's
    _check_residual(residual, residual_rows, x, shape, ln is not None)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_kv(kv_cache, kv_pos, x, math.prod(shape[:-1]), N)
    if counters is not None:
        _checks.tensor("counters", counters, ndim=1, dtypes=(torch.int32,))
        if counters.numel() < -(-N // COUNTER_COLUMNS) or not counters.is_contiguous():
            raise ValueError(f"counters must be contiguous with at least cdiv(N, {COUNTER_COLUMNS}) = "
                             f"{-(-N // COUNTER_COLUMNS)} elements, got shape {tuple(counters.shape)}")  # fmt: skip
        _checks.writable("counters", counters)
    device = _checks.same_device(x=x, weight=weight, bias=bias, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                                 kv_cache=kv_cache, kv_pos=kv_pos, x_rows=x_rows, residual_rows=residual_rows,
                                 counters=counters)  # fmt: skip
    return shape, device, (ln_weight, ln_bias, eps)


def _limits(M: int, N: int, K: int, x: torch.Tensor):
    """Why a backend cannot run an (M, K) x (K, N) linear on x's dtype and device, or None (for
    _backends.resolve)."""

    def unsupported(name: str) -> str | None:
        if name == "cuda":
            return "the CUDA extension has no linear kernel (GPT's fused decode matmuls are Triton's): use 'triton'"
        if name != "triton":
            return None
        if M > MAX_ROWS:
            return f"the triton kernel takes at most {MAX_ROWS} rows, got {M}"
        return _checks.interpreter_dtype(x) or _checks.triton_length("N and K", max(N, K))

    return unsupported


def _check_ln(ln, K: int) -> tuple:
    """(ln_weight, ln_bias, eps) from ln, checked; (None, None, 0.0) without a LayerNorm."""
    if ln is None:
        return None, None, 0.0
    if not isinstance(ln, tuple) or len(ln) != 3:
        raise TypeError(f"ln must be None or a tuple (ln_weight, ln_bias, eps), got {type(ln).__name__}")
    ln_weight, ln_bias, eps = ln
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is not None:
            _checks.tensor(name, p, ndim=1)
            _checks.shape(name, p, (K,), "(K,), K = x.shape[-1]")
    return ln_weight, ln_bias, _checks.eps("ln's eps", eps)


def _check_residual(residual, residual_rows, x, shape: tuple, has_ln: bool) -> None:
    """residual: None, like the input (`shape`), or a table read at residual_rows."""
    if residual is None:
        if residual_rows is not None:
            raise ValueError("residual_rows needs a residual table to read")
        return
    if not has_ln:
        raise ValueError("residual needs ln: the sum x + residual is what gets normalised")
    _checks.tensor("residual", residual)
    if residual_rows is None:
        _checks.shape("residual", residual, shape, "the input's shape (x.shape, or (M, K) with x_rows)")
    else:
        _check_rows("residual", residual, residual_rows, x.shape[-1])
        _checks.shape("residual_rows", residual_rows, (math.prod(shape[:-1]),), "(M,), M = the input's rows")
    _checks.same_dtype(x=x, residual=residual)


def _check_rows(name: str, table, rows, K: int) -> None:
    """A table (R, K) read at int64 ids rows (M,)."""
    if table.dim() != 2 or table.shape[1] != K:
        raise ValueError(f"{name} must be a table (R, K) when {name}_rows is given, K = x.shape[-1] = {K}, "
                         f"got shape {tuple(table.shape)}")  # fmt: skip
    _checks.tensor(f"{name}_rows", rows, ndim=1, dtypes=(torch.int64,))


def _check_kv(kv_cache, kv_pos, x, M: int, N: int) -> None:
    if (kv_cache is None) != (kv_pos is None):
        raise ValueError("kv_cache and kv_pos go together: pass both or neither")
    if kv_cache is None:
        return
    _checks.tensor("kv_cache", kv_cache, ndim=5)
    _checks.same_dtype(x=x, kv_cache=kv_cache)
    two, B, H, _, D = kv_cache.shape
    if two != 2 or (M % B if B else M) != 0 or 3 * H * D != N:
        raise ValueError(f"kv_cache must have shape (2, B, H, S, D) with B dividing the M = {M} rows of x (T = M / B "
                         f"tokens a cache row) and 3 H D = N = {N}, got {tuple(kv_cache.shape)}")  # fmt: skip
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache must have a unit stride in its last dim, got strides {kv_cache.stride()}")
    _checks.writable("kv_cache", kv_cache)
    _checks.tensor("kv_pos", kv_pos, ndim=1, dtypes=(torch.int64,))
    _checks.shape("kv_pos", kv_pos, (M,), "(M,), M = the rows of x")


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float, ln: bool, gelu_tanh: bool,
    kv_cache: torch.Tensor | None, kv_pos: torch.Tensor | None, x_rows: torch.Tensor | None,
    residual_rows: torch.Tensor | None, counters: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    norm = (ln_weight, ln_bias, eps) if ln else None
    kwargs = dict(ln=norm, residual=residual, gelu_tanh=gelu_tanh, kv_cache=kv_cache, kv_pos=kv_pos, x_rows=x_rows,
                  residual_rows=residual_rows)  # fmt: skip
    if backend == "torch":
        out, h = reference.linear(x, weight, bias, **kwargs)
    else:
        out, h = _backends.launchers(backend, "linear").linear(x, weight, bias, **kwargs, counters=counters)
    return out, x.new_empty(0) if h is None else h  # a custom op returns tensors, not None


# counters are not declared mutated: the kernel leaves them as it found them (zero), and a
# declared mutation would make torch.compile copy them around every call.
_linear_op = torch.library.custom_op("fastgpt::linear", _linear, mutates_args=("kv_cache",))


@_linear_op.register_fake
def _(x, weight, bias, residual, ln_weight, ln_bias, eps, ln, gelu_tanh, kv_cache, kv_pos, x_rows, residual_rows,
      counters, backend):  # fmt: skip
    M = x.shape[0] if x_rows is None else x_rows.shape[0]
    h = x.new_empty(0) if residual is None else x.new_empty(M, x.shape[1])
    return x.new_empty(M, weight.shape[0]), h
