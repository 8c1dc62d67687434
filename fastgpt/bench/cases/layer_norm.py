"""(Residual add +) LayerNorm: fastgpt vs F.layer_norm, eager add + LN, torch.compile, liger, apex.

With residual=1 every candidate returns (y, h): h = x + residual, y = LN(h). Without, y = LN(x).
Bytes: x (and residual), weight and bias read once; y (and h) written once
(formulas.layer_norm_bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.bench import formulas
from fastgpt.bench.cases import describe, fastgpt_candidates, generator, randn, sweep_of
from fastgpt.bench.core import REFERENCE, Candidate, Case, Unavailable
from fastgpt.bench.env import dist_version, optional_module

KEYS = {"M": 65536, "N": 1024, "residual": True}
POSITIVE = ("M", "N")  # sizes of at least 1 (parse_spec)
DEFAULT_DTYPE = torch.bfloat16
EPS = 1e-5
ELEMENTS = 2**26  # M * N of the hidden-size sweep (64 Mi elements: 128 MB per bf16 tensor)


def shapes(quick: bool):
    """(params, sweep, x key): the two target shapes, GPT-2 widths, a decode-sized call."""
    def shape(M, N, residual=True):
        return dict(KEYS, M=M, N=N, residual=residual)

    sweep = "residual, M*N=64Mi"
    if quick:  # each case compiles torch.compile's reference again: few cases
        return [(shape(65536, 1024), sweep, "N"), (shape(16384, 4096), sweep, "N"), (shape(32, 768), None, None)]
    widths = (768, 1024, 1280, 1600, 2048, 4096, 8192, 16384)
    plan = [(shape(ELEMENTS // N, N), sweep, "N") for N in widths]
    plan += [(shape(ELEMENTS // N, N, residual=False), "plain, M*N=64Mi", "N") for N in widths]
    plan += [(shape(M, 768), "residual N768 (GPT-2)", "M") for M in (1, 32, 256, 2048, 8192)]
    return plan


def make_case(p: dict, device: torch.device, dtype: torch.dtype, sweep=None, x_key=None) -> Case:
    """One case: x, residual (M, N); weight, bias (N,) in x's dtype (as in a bf16 model)."""
    M, N, residual = p["M"], p["N"], p["residual"]

    def make_inputs(seed):
        g = generator(device, seed)
        inp = {"x": randn((M, N), gen=g, device=device, dtype=dtype),
               "weight": randn((N,), gen=g, device=device, dtype=dtype, scale=0.1, shift=1.0),
               "bias": randn((N,), gen=g, device=device, dtype=dtype, scale=0.1)}
        if residual:
            inp["residual"] = randn((M, N), gen=g, device=device, dtype=dtype)
        return inp

    def reference(inp):
        from fastgpt import reference as ref

        return ref.layer_norm(inp["x"], inp["weight"], inp["bias"], EPS, residual=inp.get("residual"))

    nbytes = formulas.layer_norm_bytes(M, N, dtype, residual=residual)
    inputs_nbytes = formulas.element_size(dtype) * ((2 if residual else 1) * M * N + 2 * N)  # x (, residual), w, b
    sw, x, x_label = sweep_of(p, sweep, x_key)
    return Case(op="layernorm", name=describe(p, ("M", "N")) + (" +residual" if residual else ""), params=p,
                dtype=dtype, make_inputs=make_inputs, reference=reference, candidates=candidates(device, residual),
                metric="GB/s", work=nbytes, set_bytes=inputs_nbytes, sweep=sw, x=x, x_label=x_label)


def candidates(device, residual: bool) -> list[Candidate]:
    def fastgpt_fn(backend):
        import fastgpt

        return lambda inp: fastgpt.layer_norm(inp["x"], inp["weight"], inp["bias"], EPS,
                                              residual=inp.get("residual"), backend=backend)

    torch_note = f"torch {torch.__version__}"
    out = fastgpt_candidates(device, fastgpt_fn)
    if residual:
        out.append(Candidate("eager add + F.layer_norm", REFERENCE, lambda: with_add(F.layer_norm), note=torch_note))
        out.append(Candidate("torch.compile(add + layer_norm)", REFERENCE, lambda: compiled(with_add(F.layer_norm)),
                             note=torch_note))
    else:
        out.append(Candidate("F.layer_norm", REFERENCE, lambda: plain(F.layer_norm), note=torch_note))
        out.append(Candidate("torch.compile(layer_norm)", REFERENCE, lambda: compiled(plain(F.layer_norm)),
                             note=torch_note))
    wrap = with_add if residual else plain
    prefix = "eager add + " if residual else ""
    out.append(Candidate(f"{prefix}liger layer_norm", REFERENCE, lambda: wrap(liger_ln()),
                         note=dist_version("liger-kernel", "liger_kernel")))
    out.append(Candidate(f"{prefix}apex fused_layer_norm", REFERENCE, lambda: wrap(apex_ln()),
                         note=dist_version("apex")))
    return out


def plain(ln):
    """fn(inputs) -> y = ln(x, (N,), weight, bias, eps)."""
    return lambda inp: ln(inp["x"], (inp["x"].shape[-1],), inp["weight"], inp["bias"], EPS)


def with_add(ln):
    """fn(inputs) -> (y, h): h = x + residual in x's dtype (an unfused add), y = ln(h)."""
    def fn(inp):
        h = inp["x"] + inp["residual"]
        return ln(h, (h.shape[-1],), inp["weight"], inp["bias"], EPS), h

    return fn


def compiled(fn):
    """torch.compile (inductor, static shapes): it fuses the add into the normalisation.

    Every case compiles the same Python function at a new shape; the reset keeps Dynamo's
    recompile limit from silently sending later shapes to eager.
    """
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def liger_ln():
    """liger-kernel's Triton LayerNorm with the F.layer_norm signature."""
    module, reason = optional_module("liger_kernel.ops.layer_norm")
    if module is None:
        raise Unavailable(reason)
    return lambda x, shape, w, b, eps: module.LigerLayerNormFunction.apply(x, w, b, eps)


def apex_ln():
    """apex's fused CUDA LayerNorm with the F.layer_norm signature."""
    module, reason = optional_module("apex.normalization.fused_layer_norm")
    if module is None:
        raise Unavailable(reason)
    return lambda x, shape, w, b, eps: module.fused_layer_norm_affine(x, w, b, shape, eps)
