"""The benchmark cases of each kernel op, and what they share.

Each op module (attention, decode, layer_norm, sampling) defines:
- KEYS: the shape keys a `--shapes` spec may set, with their defaults;
- DEFAULT_DTYPE;
- shapes(quick) -> list of (params, sweep name or None, x key or None);
- make_case(params, device, dtype, sweep, x_key) -> core.Case.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from fastgpt.bench.core import FASTGPT, Candidate, Case, Unavailable

KERNEL_OPS = ("attention", "decode", "layernorm", "sampling")
_MODULES = {"attention": "attention", "decode": "decode", "layernorm": "layer_norm", "sampling": "sampling"}
BACKENDS = ("cuda", "triton", "torch")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def op_module(op: str):
    """The module holding `op`'s cases."""
    return importlib.import_module(f"fastgpt.bench.cases.{_MODULES[op]}")


def parse_spec(spec: str, keys: dict, positive: tuple[str, ...] = ()) -> dict:
    """"B=16,H=12,S=1024" -> params: `keys`' defaults updated by the spec (keys case-insensitive).

    Values are ints, floats, or booleans (1/0, true/false for boolean keys). Integers are never
    negative, and the sizes named in `positive` (a module's POSITIVE) are at least 1.
    """
    params = dict(keys)
    canonical = {k.lower(): k for k in keys}
    for item in filter(None, (s.strip() for s in spec.replace(" ", ",").split(","))):
        name, sep, value = item.partition("=")
        key = canonical.get(name.strip().lower())
        if not sep or key is None:
            raise ValueError(f"bad shape item {item!r}: expected KEY=VALUE with KEY in {', '.join(keys)}")
        params[key] = _parse_value(value.strip(), keys[key], item)
        least = 1 if key in positive else 0
        if type(params[key]) is int and params[key] < least:
            raise ValueError(f"bad value in shape item {item!r}: {key} must be >= {least}")
    return params


def _parse_value(value: str, default, item: str):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false"):
                raise ValueError
            return value.lower() in ("1", "true")
        if isinstance(default, int):
            return int(value)
        return float(value)
    except ValueError:
        raise ValueError(f"bad value in shape item {item!r}") from None


def build_cases(op: str, device: torch.device, dtype: torch.dtype | None, quick: bool,
                specs: list[str] | None = None) -> list[Case]:
    """The cases of `op`: its default shapes (quick or full), or the `specs` given."""
    module = op_module(op)
    dtype = dtype or module.DEFAULT_DTYPE
    if specs:
        plan = [(parse_spec(spec, module.KEYS, module.POSITIVE), None, None) for spec in specs]
    else:
        plan = module.shapes(quick)
    return [module.make_case(params, device, dtype, sweep, x_key) for params, sweep, x_key in plan]


def fastgpt_candidates(device: torch.device, make_fn: Callable[[str], Callable]) -> list[Candidate]:
    """fastgpt's backends as candidates; make_fn(backend) returns fn(inputs) -> output.

    Availability comes from fastgpt._backends.why_not. Triton's CPU interpreter is a
    correctness tool, so it is never benchmarked.
    """
    from fastgpt import _backends

    def build(backend):
        reason = _backends.why_not(backend, device)
        if reason is None and backend == "triton" and device.type != "cuda":
            reason = "Triton's interpreter (TRITON_INTERPRET=1) is for correctness tests, not benchmarks"
        if reason:
            raise Unavailable(reason)
        return make_fn(backend)

    return [Candidate(f"fastgpt[{b}]", FASTGPT, lambda b=b: build(b), backend=b) for b in BACKENDS]


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device`, so every input set is fresh but reproducible."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, *, gen, device, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Normal random data (never zeros: zeros hide unwritten outputs and run unrealistically fast)."""
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (x * scale + shift).to(dtype)


def sweep_of(params: dict, sweep: str | None, x_key: str | None):
    """(sweep, x, x_label) for a case."""
    if sweep is None or x_key is None:
        return None, None, None
    return sweep, params[x_key], x_key


def describe(params: dict, order: tuple[str, ...]) -> str:
    """A compact case name: "B16 H12 S1024 D64"."""
    return " ".join(f"{k}{params[k]}" for k in order)
