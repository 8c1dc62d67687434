"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import torch
from torch import nn

from fastgpt.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm on fastgpt's fused kernel, with an optional residual input.

    forward(x) -> y = LN(x); forward(x, residual) -> (y, h) with h = x + residual and y = LN(h).
    Parameters, state-dict keys and defaults are nn.LayerNorm's, so it loads the same weights.
    The normalized shape must be one dimension (the hidden size).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dimension, got {self.normalized_shape}")
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., N) fp16/bf16/fp32; residual like x or None -> y, or (y, h = x + residual)."""
        # The op checks x against the weights; without them (elementwise_affine=False) only this does.
        if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]):
            raise ValueError(f"x must have shape (..., {self.normalized_shape[0]}) (normalized_shape), "
                             f"got {tuple(x.shape)}")
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, backend: str = "auto") -> "LayerNorm":
        """A copy of `module` (weights shared, not copied) that runs on fastgpt's kernel."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None,
                  device=module.weight.device if module.weight is not None else None,
                  dtype=module.weight.dtype if module.weight is not None else None, backend=backend)
        new.weight, new.bias = module.weight, module.bias
        return new
