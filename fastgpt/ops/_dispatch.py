"""Calling fastgpt's custom ops: through torch's dispatcher only where something needs to see them.

Every kernel-backed op is a `torch.library.custom_op`, so that torch.compile traces it (with its
fake impl), autograd refuses it clearly, and tensor subclasses and dispatch modes see it. In
plain eager inference none of that applies, and the dispatcher costs ~30 us of host time per call
(measured on a 2-core CPU: 87 against 56 us for a small attention), more than many of the kernels
take on a GPU. So an eager call on plain tensors (or module Parameters) runs the op's
implementation directly: the same function, the same result, no CUDA sync either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter dispatches as a plain tensor (weights, LayerNorm's)


def _needs_dispatcher(args) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return True  # a subclass (FakeTensor, ...) or autograd: the registered op decides
    return False


def call(op, impl: Callable, *args):
    """op(*args) where compile tracing, autograd, a tensor subclass or a dispatch mode needs the
    registered op; else impl(*args), the function registered as op."""
    return op(*args) if _needs_dispatcher(args) else impl(*args)
