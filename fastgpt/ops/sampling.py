"""fastgpt.filter_logits and fastgpt.sample: Hugging Face's sampling semantics, fused.

Each parameter is a Python number (one value for every row) or a tensor of shape (B,) (one per
row). Python numbers and CPU tensors are range-checked here, as the fp32 values the kernels take
(a temperature of 1e-50 is 0 in fp32); tensors on a GPU are not (reading them would sync the
host), so the sampling kernels clamp them into range instead (a temperature <= 0 is greedy).
filter_logits, plain PyTorch, computes with such tensors as they are: a temperature of 0 there
divides by 0.
"""

from __future__ import annotations

import numbers
import struct

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastgpt import _backends, reference
from fastgpt.ops import _checks, _cuda, _dispatch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FP32_MAX = torch.finfo(torch.float32).max
_INT64_MAX = 2**63 - 1


def _unsupported(logits):
    def reason(backend):
        if backend == "triton":
            return _checks.triton_length("vocab sizes", logits.shape[1])
        if backend == "cuda" and logits.shape[1] >= _cuda.MAX_VOCAB:
            return f"the cuda sampler supports V < 2^24, got V={logits.shape[1]}"
        if backend == "cuda" and logits.shape[0] > _cuda.MAX_INT32:
            return f"the cuda sampler takes fewer than 2^31 rows, got B={logits.shape[0]}"
        return None

    return reason


def _row_param(name, value, B, device, dtype, valid, expected):
    """A per-row parameter as a (B,) tensor of `dtype` on `device`, range-checked where cheap.

    `valid` maps a float or a float64 tensor to whether each value is in range.
    """
    integral = dtype == torch.int64
    kind = "an int" if integral else "a float"
    if isinstance(value, (list, tuple)):
        listed = [_number(v, integral) for v in value]
        if any(v is None for v in listed):
            raise TypeError(f"{name} must be {kind} or a list of {kind.split()[-1]}s, one a row (or a tensor of shape "
                            f"(B,)), got {value!r}")  # fmt: skip
        value = torch.tensor(listed, dtype=torch.int64 if integral else torch.float64)  # fp64: top_p 0.95 stays exact
    if isinstance(value, torch.Tensor):
        _checks.dense(name, value)
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != B):
            raise ValueError(f"{name} must be a number or a tensor of shape (B,) = ({B},), got {tuple(value.shape)}")
        if integral and value.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if not integral and not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.is_meta:  # no values to copy
            raise ValueError(f"{name} must be on the CPU or the logits' device ({device}), got {value.device}")
        checkable = value.device.type == "cpu" and not torch.compiler.is_compiling()  # values: eager CPU only
        if checkable and value.numel() and not bool(valid(value.double()).all()):
            raise ValueError(f"{name} must be {expected}, got values {value.tolist()}")
        return value.to(device=device, dtype=dtype, non_blocking=True).expand(B).contiguous()
    number = _number(value, integral)
    if number is None:
        raise TypeError(f"{name} must be {kind} or a tensor of shape (B,), got {type(value).__name__}")
    if not valid(float(number)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return _constant_row(number, B, device, dtype)


def _number(value, integral: bool) -> int | float | None:
    """A Python number (numpy scalars and Fractions too) as the int or float torch takes; None
    for anything else, bools included. A top_k beyond int64 is clamped: above, it keeps every
    token, as any top_k >= V does; below, it stays negative, for the range check to refuse."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
        return None
    if integral:
        return max(min(int(value), _INT64_MAX), -_INT64_MAX - 1)
    try:
        return float(value)
    except OverflowError:  # an int beyond float64: out of range, as the checks then say
        return float("inf")


_CONSTANT_ROWS: dict = {}  # (value, B, dtype, device) -> a (B,) tensor of that value, never written
_PARAM_ROWS: dict = {}  # (B, device, allow_greedy, the four numbers and their types) -> row_params' rows
_MAX_CONSTANT_ROWS = 256  # then new values are made per call: nothing cached is ever freed
_PLAIN_NUMBERS = {int, float}


def _cache_key(device) -> tuple | None:
    """The key of `device` in the caches of constant rows, or None where nothing may be cached or
    reused: the meta device, under torch.compile (a cached row would become a constant of the
    graph), under a dispatch mode (FakeTensorMode's rows are fake), or while a CUDA graph is being
    captured (a row made then would be the graph's memory). Rows made under inference_mode are
    inference tensors, which autograd refuses to save: they are kept apart from the others."""
    device = torch.device(device)
    if device.type == "meta" or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    return *_device_key(device), torch.is_inference_mode_enabled()


def _constant_row(value, B: int, device, dtype) -> torch.Tensor:
    """torch.full((B,), value), made once per (value, B, dtype, device) and reused: a sampling
    call with Python numbers then launches no fill kernels (four a call otherwise). Entries are
    never evicted, since a captured CUDA graph may read one (see _cache_key for where none is
    made)."""
    where = _cache_key(device)
    key = None if where is None else (type(value), value, B, dtype, where)
    row = None if key is None else _CONSTANT_ROWS.get(key)
    if row is None:
        row = torch.full((B,), value, device=device, dtype=dtype)
        if key is not None and len(_CONSTANT_ROWS) < _MAX_CONSTANT_ROWS:
            _CONSTANT_ROWS[key] = row
    return row


def row_params(B: int, device, temperature, top_k, top_p, min_p, *, allow_greedy: bool = True):
    """The four sampling parameters as (B,) tensors on `device`, checked: (temperature fp32,
    top_k int64, top_p fp64, min_p fp32). Each is a number, a (B,) tensor or a list of B numbers.
    Four plain Python numbers that passed the checks once are looked up, not checked again: a
    sampling call asks each time."""
    key = None
    if {type(temperature), type(top_k), type(top_p), type(min_p)} <= _PLAIN_NUMBERS:
        where = _cache_key(device)
        if where is not None:
            key = (B, where, allow_greedy, type(temperature), temperature, type(top_k), top_k, type(top_p), top_p,
                   type(min_p), min_p)  # fmt: skip
            rows = _PARAM_ROWS.get(key)
            if rows is not None:
                return rows
    t_ok = (lambda t: t >= 0) if allow_greedy else (lambda t: t > 0)

    def fp32_finite(x):  # for floats and tensors alike; False for NaN. A larger one would become inf
        return abs(x) <= _FP32_MAX

    def in_fp32(x):  # a float (kept a float: nothing for torch.compile to trace) or a tensor as the fp32 the
        if isinstance(x, torch.Tensor):  # kernels take: 1e-50 is 0
            return x.float()
        return struct.unpack("f", struct.pack("f", x))[0] if abs(x) <= _FP32_MAX else x

    rows = (
        _row_param("temperature", temperature, B, device, torch.float32, lambda t: fp32_finite(t) & t_ok(in_fp32(t)),
                   f"{'>= 0' if allow_greedy else '> 0'} and finite in float32 (at most {_FP32_MAX:.4g})"),
        _row_param("top_k", top_k, B, device, torch.int64, lambda k: k >= 0, ">= 0 (0 means off)"),
        _row_param("top_p", top_p, B, device, torch.float64, lambda p: (p > 0) & (p <= 1), "in (0, 1] (1 means off)"),
        _row_param("min_p", min_p, B, device, torch.float32, lambda m: (m >= 0) & (m <= 1), "in [0, 1] (0 means off)"),
    )
    if key is not None and len(_PARAM_ROWS) < _MAX_CONSTANT_ROWS:
        _PARAM_ROWS[key] = rows
    return rows


def _device_key(device: torch.device):
    """(type, index) with a CUDA device's index made explicit: "cuda" means the current one."""
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    return device.type, device.index


def check_generator(generator, device: torch.device) -> None:
    """`generator` must be None or a torch.Generator on `device` (same index, too)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if _device_key(generator.device) != _device_key(device):
        raise ValueError(f"generator is on {generator.device} but the tensors are on {device}")


def _is_zero(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


def _check_logits(logits):
    _checks.tensor("logits", logits, ndim=2)
    if logits.shape[1] == 0:
        raise ValueError("logits must have shape (B, V) with V >= 1, got V = 0")


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Apply temperature -> top-k -> top-p -> min-p exactly as Hugging Face's logits warpers do.

    logits: (B, V) float. Removed entries become -inf; top-k keeps every token tied with the
    k-th value; top_k=0, top_p=1.0 and min_p=0.0 mean off; temperature must be > 0. Returns a
    new (B, V) tensor in logits' dtype. Plain PyTorch (the sampler's kernels fuse this).
    """
    _check_logits(logits)
    params = row_params(logits.shape[0], logits.device, temperature, top_k, top_p, min_p, allow_greedy=False)
    return reference.filter_logits(logits, *params)


def top_k_bound(top_k) -> int:
    """What the host knows of top_k without reading a GPU: the largest value when every row's
    top_k is known here (a number, a list, a CPU tensor outside torch.compile) and > 0; else 0.
    The Triton sampler takes its candidate path under a small bound."""
    if type(top_k) is int:  # the common case, quickly
        return min(top_k, _INT64_MAX) if top_k > 0 else 0
    if isinstance(top_k, torch.Tensor):
        _checks.dense("top_k", top_k)
        if top_k.device.type != "cpu" or torch.compiler.is_compiling():
            return 0
        top_k = top_k.reshape(-1).tolist()
    values = list(top_k) if isinstance(top_k, (list, tuple)) else [top_k]
    if not values or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k > 0 for k in values):
        return 0
    return min(int(max(values)), _INT64_MAX)  # the custom op takes an int64


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None, backend="auto"):
    """Draw one token id per row from softmax(filter_logits(logits, ...)), Hugging Face's filters.

    Where top-p splits a group of tied scores, HF keeps a number of them fixed by the masses, and
    which ones depends on the order its sort gives the ties: the draw keeps the whole group at
    that mass, its members equally likely (fastgpt.reference.draw_scores; the same on every
    backend). Every other token's probability is HF's.

    logits: (B, V) fp16, bf16 or fp32, filtered in fp32 (as transformers' generate casts them;
    filter_logits rounds x / t to the logits' dtype, as its processors do on half tensors, which
    may make or break a tie at a boundary). temperature == 0 means greedy for that row (argmax, first
    index on ties). NaN logits are never drawn; a row with +inf logits draws uniformly among
    them; a row with nothing drawable (all -inf or NaN) returns 0. The randomness is a seed drawn
    on the device from `generator` (a torch.Generator on logits' device, or the default one),
    so there is no host sync and the op can be captured in a CUDA graph.
    When every row is greedy by a plain number (temperature=0) and the backend is the torch one
    or auto's choice, the draw is an argmax (two kernels; the kernels would search the row first),
    and `generator` is not advanced.
    Returns int64 (B,), every id in [0, V).
    """
    return draw(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator,
                backend=backend, top_k_bound=top_k_bound(top_k))


def draw(logits, *, temperature, top_k, top_p, min_p, generator, backend, top_k_bound: int):
    """fastgpt.sample, told top_k_bound (see top_k_bound()) by a caller that knows more than its
    arguments show: the decoder, whose parameters live on the GPU."""
    _check_logits(logits)
    check_generator(generator, logits.device)
    name = _backends.resolve("sample", backend, logits.device, _unsupported(logits),
                             _backends.sample_preference(logits.shape[0], top_k_bound))
    by_auto = backend == "auto" and _backends.default_backend() == "auto"
    greedy = _is_zero(temperature) and (name == "torch" or by_auto)  # every row, known without reading a tensor
    # Checked either way; a greedy draw reads none of them, so they are made on the meta device
    # (no kernel, no memory: a decode step's launch saved).
    params = row_params(logits.shape[0], "meta" if greedy else logits.device, temperature, top_k, top_p, min_p)
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if greedy:
        return reference.greedy(logits)  # an argmax, no search
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), device=logits.device, dtype=torch.int64, generator=generator)
    if name == "torch":  # plain PyTorch: traceable as is, and no custom-op dispatch cost
        return reference.sample(logits, *params, seed)
    logits = _checks.last_dim_contiguous(logits)
    return _dispatch.call(_sample_op, _sample, logits, *params, seed, name, top_k_bound)


def _sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    backend: str,
    top_k_bound: int,
) -> torch.Tensor:
    if backend == "torch":
        return reference.sample(logits, temperature, top_k, top_p, min_p, seed)
    launchers = _backends.launchers(backend, "sampling")
    return launchers.sample(logits, temperature, top_k, top_p, min_p, seed, top_k_bound=top_k_bound)


_sample_op = torch.library.custom_op("fastgpt::sample", _sample, mutates_args=())


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed, backend, top_k_bound):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
