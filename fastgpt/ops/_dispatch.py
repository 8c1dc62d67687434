"""Calling fastgpt's custom ops: through torch's dispatcher only where something needs to see them.

Every kernel-backed op is a `torch.library.custom_op`, so that torch.compile traces it (with its
fake impl), autograd refuses it clearly, and tensor subclasses and dispatch modes see it. In
plain eager inference none of that applies, and the dispatcher costs ~30 us of host time per call
(measured on a 2-core CPU: 87 against 56 us for a small attention), more than many of the kernels
take on a GPU. So an eager call on plain tensors (or module Parameters) runs the op's
implementation directly: the same function, the same result, no CUDA sync either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter dispatches as a plain tensor (weights, LayerNorm's)
_SAME_DEVICE = contextlib.nullcontext()


def _needs_dispatcher(args) -> bool:
    """Outside compile tracing (call's first question)."""
    if _get_current_dispatch_mode() is not None:
        return True
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return True  # a subclass (FakeTensor, ...) or autograd: the registered op decides
    return False


def call(op, impl: Callable, *args):
    """op(*args) where compile tracing, autograd, a tensor subclass or a dispatch mode needs the
    registered op; else impl(*args), the function registered as op. Either way, on real tensors
    (not a subclass such as FakeTensor, not under compile tracing), with the GPU of args[0] (every
    op's first argument is a tensor) the current device (on_device): torch's dispatcher sets no
    device for a custom op."""
    if torch.compiler.is_compiling():
        return op(*args)
    with on_device(args[0] if type(args[0]) in _PLAIN else None):
        return op(*args) if _needs_dispatcher(args) else impl(*args)


def on_device(t: torch.Tensor | None):
    """A context in which t's GPU is the current CUDA device: torch.cuda.device(t's) where that is
    another GPU, else (the current GPU, a CPU tensor, None) nothing. Triton launches a kernel on
    the current device's current stream, whichever device its tensors are on: a model on cuda:1
    while cuda:0 is current would run its kernels on cuda:0 over cuda:1's memory. (The CUDA
    extension sets the device itself.)"""
    if t is None or not t.is_cuda:
        return _SAME_DEVICE
    index = t.get_device()
    return _SAME_DEVICE if index == torch.cuda.current_device() else torch.cuda.device(index)
