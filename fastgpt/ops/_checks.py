"""Argument checks shared by the ops: each raises a clear TypeError/ValueError naming the argument.

They run before any kernel, on shapes, dtypes and devices only (never on tensor values that
live on a GPU, which would need a host sync).
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that `t` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dense(name, t)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def dense(name: str, t: torch.Tensor) -> None:
    """Kernels read data pointers and strides, which sparse, nested and other layouts do not have,
    and read the memory as it is: a view carrying a lazy negation (is_neg(), e.g. the imaginary
    part of a conjugate) would be read without it."""
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if not torch.compiler.is_compiling() and t.is_neg():  # a bool torch.compile cannot trace
        raise ValueError(f"{name} is a view with a lazy negation (is_neg()): pass {name}.resolve_neg()")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given tensors live on one device; return it."""
    return _shared("device", tensors, ValueError, "is on {value} but {first_name} is on {first}; move them to one device")


def same_dtype(**tensors: torch.Tensor | None) -> None:
    _shared("dtype", tensors, TypeError, "has dtype {value} but {first_name} has {first}; they must match")


def _shared(attr: str, tensors: dict, error: type[Exception], message: str):
    """The `attr` (device, dtype) of the given tensors (None ones skipped), which must all have the
    first one's; else `error` naming the first that differs (`message` after its name)."""
    first_name = first = None
    for name, t in tensors.items():
        if t is None:
            continue
        value = getattr(t, attr)
        if first is None:
            first_name, first = name, value
        elif value != first:
            raise error(f"{name} " + message.format(value=value, first_name=first_name, first=first))
    return first


def shape(name: str, t: torch.Tensor, expected: tuple, description: str) -> None:
    """Check t.shape == expected, describing the expected layout in the error (e.g. "(B, Hkv, Sk, D)")."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {description} = {tuple(expected)}, got {tuple(t.shape)}")


# The Triton kernels walk sequences, rows and the vocabulary in blocks whose index is a 32-bit
# loop counter (a constexpr or scalar argument below 2^31 is int32): a length within a block of
# 2^31 wraps the last step to a negative index, which passes the `< length` masks (an endless
# loop, and loads and stores before the tensor). Lengths up to 2^30 leave every such sum in range.
TRITON_MAX_LEN = 2**30


def triton_length(what: str, n: int) -> str | None:
    """Why the Triton kernels cannot take `what` (e.g. "sequence lengths") of n, or None."""
    return f"the triton kernels support {what} <= 2^30, got {n}" if n > TRITON_MAX_LEN else None


# The kernels scale scores by scale * log2(e) in fp32: it must be finite there, and one below fp32's
# smallest normal number is 0 to them (flushed on a GPU; a float64 in Triton's interpreter).
_LOG2E = 1.4426950408889634
_FP32_MAX = 3.4028234663852886e38
_FP32_TINY = 1.1754943508222875e-38


def scale(value, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(D) when None, else a finite float of magnitude at most
    fp32's max / log2(e) (~2.36e38); one so small that scale * log2(e) is below fp32's smallest
    normal number (~1.2e-38) is taken as 0 (the scores differ from 0 by less than fp32 resolves)."""
    if value is None:
        return head_dim**-0.5
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    value = _float("scale", value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {value}")
    if abs(value) * _LOG2E > _FP32_MAX:
        raise ValueError(f"scale must be at most {_FP32_MAX / _LOG2E:.3g} in magnitude (scale * log2(e) a finite "
                         f"fp32), got {value}")  # fmt: skip
    return 0.0 if abs(value) * _LOG2E < _FP32_TINY else value


def interpreter_dtype(x: torch.Tensor) -> str | None:
    """Why Triton's interpreter (CPU tensors) cannot run a kernel with tensor-core dots (tl.dot) on
    x's dtype, or None: it has no bf16 arithmetic, and its bf16 dots come out wrong."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "Triton's interpreter (CPU tensors) has no bf16 arithmetic (its bf16 dots are wrong): use fp16 or fp32"
    return None


def flag(name: str, value) -> bool:
    """A keyword that switches behaviour (causal, return_lse): a Python bool, not a truthy value."""
    if not isinstance(value, bool):
        kind = type(value)  # qualified: numpy's bool is also named "bool"
        raise TypeError(f"{name} must be a Python bool, got {value!r} of type {kind.__module__}.{kind.__qualname__}")
    return value


def eps(name: str, value) -> float:
    """LayerNorm's epsilon: a real number >= 0 (0 is F.layer_norm's too: a constant row is then NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0:  # NaN too
        raise ValueError(f"{name} must be a non-negative float, got {value!r}")
    return _float(name, value)


def _float(name: str, value: numbers.Real) -> float:
    """float(value), where an int or Fraction beyond float64 is an error naming the argument."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number beyond float64's range") from None


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; copy only the rare views that break that."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def writable(name: str, t: torch.Tensor) -> None:
    """An output a kernel writes: no stride-0 dims (an expanded view), whose elements share an
    address and whose writes would race."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(f"{name} must not overlap itself (an expanded view, strides {t.stride()}): pass a real tensor")
