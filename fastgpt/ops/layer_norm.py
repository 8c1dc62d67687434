"""fastgpt.layer_norm: LayerNorm with fp32 statistics, optionally fused with the residual add."""

from __future__ import annotations

import torch

from fastgpt import _backends, reference
from fastgpt.ops import _checks, _cuda, _dispatch


def layer_norm(x, weight, bias, eps: float = 1e-5, *, residual=None, backend: str = "auto"):
    """LayerNorm over the last dimension, statistics in fp32.

    x: (..., N) fp16, bf16 or fp32; weight, bias: (N,) float or None; residual: like x, or None.
    residual None -> returns y = LN(x). Otherwise returns (y, h) with h = x + residual (in x's
    dtype) and y = LN(h), computed in one pass that reads x and residual once. y and h have x's
    shape and dtype.
    """
    _checks.tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized one), got a scalar")
    N = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _checks.tensor(name, p, ndim=1)
            _checks.shape(name, p, (N,), "(N,), N = x.shape[-1]")
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, tuple(x.shape), "x.shape")
        _checks.same_dtype(x=x, residual=residual)
    device = _checks.same_device(x=x, weight=weight, bias=bias, residual=residual)
    eps = _checks.eps("eps", eps)
    def unsupported(name: str) -> str | None:
        if name == "triton":
            return _checks.triton_length("rows of N", N)
        rows = x.numel() // N if N else 0
        if name == "cuda" and max(rows, N) > _cuda.MAX_INT32:
            return f"the cuda kernel takes fewer than 2^31 rows and columns, got {rows} x {N}"
        return None

    name = _backends.resolve("layer_norm", backend, device, unsupported, preference=_backends.TRITON_FIRST)
    if x.numel() == 0:
        y = torch.empty_like(x)
        return y if residual is None else (y, torch.empty_like(x))

    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        return reference.layer_norm(x, weight, bias, float(eps), residual=residual)
    x2 = _checks.last_dim_contiguous(x.reshape(-1, N))
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if residual is None:
        return _dispatch.call(_layer_norm_op, _layer_norm, x2, weight, bias, float(eps), name).view(x.shape)
    r2 = _checks.last_dim_contiguous(residual.reshape(-1, N))
    y, h = _dispatch.call(_add_layer_norm_op, _add_layer_norm, x2, r2, weight, bias, float(eps), name)
    return y.view(x.shape), h.view(x.shape)


def _run(x, residual, weight, bias, eps, backend):
    if backend == "torch":
        out = reference.layer_norm(x, weight, bias, eps, residual=residual)
        return (out, None) if residual is None else out
    return _backends.launchers(backend, "layer_norm").layer_norm(x, weight, bias, eps=eps, residual=residual)


def _layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, backend: str
) -> torch.Tensor:
    return _run(x, None, weight, bias, eps, backend)[0]


_layer_norm_op = torch.library.custom_op("fastgpt::layer_norm", _layer_norm, mutates_args=())


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _run(x, residual, weight, bias, eps, backend)
    return y, h


_add_layer_norm_op = torch.library.custom_op("fastgpt::add_layer_norm", _add_layer_norm, mutates_args=())


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, backend):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)
