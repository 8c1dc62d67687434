"""Prefill attention: fastgpt vs SDPA (each backend forced), eager attention, flash-attn.

FLOPs: 4*B*Hq*D per (query, key) pair seen: Sq*Sk pairs, causal Sq*Sk - Sq^2/2 (formulas.attention_flops).

PAD > 0 makes a padded batch as transformers hands it to an attention function: left padding
(row b's first PAD*b/(B-1) keys hidden) in a boolean (B, 1, Sq, Sk) mask that also holds the
causal mask. Candidates then take the mask (fastgpt.ops.attention.masked_attention, SDPA's
attn_mask, eager masked_fill); the FLOP count stays the unpadded one, the same for all.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastgpt.bench import formulas
from fastgpt.bench.cases import describe, fastgpt_candidates, generator, randn, sweep_of
from fastgpt.bench.core import REFERENCE, Candidate, Case, Unavailable
from fastgpt.bench.env import dist_version, optional_module

KEYS = {"B": 16, "H": 12, "HKV": 0, "S": 1024, "SK": 0, "D": 64, "causal": True, "PAD": 0}  # 0: same as H / S
POSITIVE = ("B", "H", "S", "D")  # sizes of at least 1 (parse_spec)
DEFAULT_DTYPE = torch.bfloat16
TOKENS = 16384  # B * S of the sequence-length sweeps: the work per case stays comparable
# Bytes of one fp32 (B, H, rows, Sk) score temporary of the oracle (it makes about four): the
# whole S=16384 score matrix of H16 would be 17 GB, so the oracle runs over query chunks.
ORACLE_SCORE_BYTES = 256 * 2**20


def shapes(quick: bool):
    """(params, sweep, x key): GPT-2's shape and the long-context target shape first."""
    def shape(B, H, S, D, causal=True):
        return dict(KEYS, B=B, H=H, S=S, D=D, causal=causal)

    if quick:
        return [(shape(16, 12, 1024, 64), "causal H12 D64, B*S=16k", "S"),
                (shape(4, 12, 4096, 64), "causal H12 D64, B*S=16k", "S"),
                (shape(4, 16, 4096, 128), "causal H16 D128, B*S=16k", "S"),
                (dict(shape(16, 12, 1024, 64), PAD=512), None, None)]  # a padded GPT-2 batch
    plan = []
    for H, D in ((12, 64), (16, 128)):
        for S in (512, 1024, 2048, 4096, 8192, 16384):
            plan.append((shape(TOKENS // S, H, S, D), f"causal H{H} D{D}, B*S=16k", "S"))
    for S in (1024, 4096, 16384):
        plan.append((shape(TOKENS // S, 16, S, 128, causal=False), "non-causal H16 D128, B*S=16k", "S"))
    plan.append((dict(shape(4, 32, 4096, 128), HKV=8), None, None))  # GQA 32/8
    plan.append((dict(shape(16, 12, 1024, 64), PAD=512), None, None))  # a padded GPT-2 batch
    return plan


def make_case(p: dict, device: torch.device, dtype: torch.dtype, sweep=None, x_key=None) -> Case:
    """One attention case: q (B, H, S, D), k/v (B, HKV, SK, D)."""
    p = dict(p, HKV=p["HKV"] or p["H"], SK=p["SK"] or p["S"])
    B, H, Hkv, Sq, Sk, D, causal, pad = (p[k] for k in ("B", "H", "HKV", "S", "SK", "D", "causal", "PAD"))
    scale = D**-0.5
    masks = {}  # the padded case's one mask, made with its first inputs (a case is defined before
    # any tensor exists: pytest collects the cases on machines without the device)

    def make_inputs(seed):
        g = generator(device, seed)
        inputs = {"q": randn((B, H, Sq, D), gen=g, device=device, dtype=dtype),
                  "k": randn((B, Hkv, Sk, D), gen=g, device=device, dtype=dtype),
                  "v": randn((B, Hkv, Sk, D), gen=g, device=device, dtype=dtype)}
        if pad and "mask" not in masks:
            masks["mask"] = padding_mask(B, Sq, Sk, pad, causal, device)
        return dict(inputs, **masks)

    def reference(inp):
        return chunked_reference(inp["q"], inp["k"], inp["v"], causal, scale, mask=inp.get("mask"))

    sw, x, x_label = sweep_of(p, sweep, x_key)
    name = describe(p, ("B", "H") + (("HKV",) if Hkv != H else ()) + ("S",) + (("SK",) if Sk != Sq else ()) + ("D",))
    name += (" causal" if causal else "") + (f" pad{pad}" if pad else "")
    if pad:
        cands = masked_candidates(device, scale, Hkv != H, Sq, Sk)
    else:
        cands = candidates(device, causal, scale, Hkv != H, Sq, Sk)
    extra = {"check": visible_rows_check} if pad else {}
    return Case(
        op="attention", name=name, params=p, dtype=dtype, **extra,
        make_inputs=make_inputs, reference=reference, candidates=cands,
        metric="TFLOP/s", work=formulas.attention_flops(B, H, Sq, Sk, D, causal),
        set_bytes=formulas.element_size(dtype) * (B * H * Sq * D + 2 * B * Hkv * Sk * D),  # q, k, v
        sweep=sw, x=x, x_label=x_label)


def padding_mask(B: int, Sq: int, Sk: int, pad: int, causal: bool, device) -> torch.Tensor:
    """transformers' mask of a left-padded batch: bool (B, 1, Sq, Sk), True where query i sees
    key j: j past row b's padding (PAD * b // (B - 1) keys), and j <= i + Sk - Sq when causal."""
    i, j = torch.arange(Sq, device=device)[:, None], torch.arange(Sk, device=device)[None, :]
    first = torch.tensor([pad * b // max(B - 1, 1) for b in range(B)], device=device)[:, None, None, None]
    visible = j >= first  # (B, 1, 1, Sk)
    return (visible & (j <= i + Sk - Sq)) if causal else visible.expand(B, 1, Sq, Sk).contiguous()


def visible_rows_check(run, inputs: dict, expected) -> str | None:
    """A padded case's check: the query rows that see a key. A row that sees none (a padding
    query under causal padding) has no defined output: the reference gives zeros, eager
    masked_fill the mean of v, some SDPA kernels NaN; transformers ignores those rows."""
    from fastgpt.bench import checks

    out = run()
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return checks.compare(out, expected)
    seen = inputs["mask"].any(dim=-1).expand(expected.shape[:3])  # (B, H, Sq)
    return checks.compare(out[seen], expected[seen])


def chunked_reference(q, k, v, causal: bool, scale: float, score_bytes: int = ORACLE_SCORE_BYTES, mask=None):
    """fastgpt.reference.attention, computed over chunks of query rows of at most `score_bytes`
    fp32 scores each. Same result: every query row is independent, and a causal chunk of rows
    [i0, i1) sees only keys [0, i1 + Sk - Sq), so k/v cut there keep the bottom-right alignment
    (row i sees j <= i + Sk - Sq either way). With a boolean `mask` (B|1, H|1, Sq, Sk) it is
    the masked reference instead, over the same chunks of rows (the mask holds any causal part).
    q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D).
    """
    from fastgpt import reference as ref
    from fastgpt.ops.attention import masked_attention

    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    rows = max(1, score_bytes // (B * H * Sk * 4))
    if mask is not None:
        return torch.cat([masked_attention(q[:, :, i0:i0 + rows], k, v, mask[:, :, i0:i0 + rows], scale=scale,
                                           backend="torch") for i0 in range(0, Sq, rows)], dim=2)
    if rows >= Sq:
        return ref.attention(q, k, v, causal=causal, scale=scale)
    out = []
    for i0 in range(0, Sq, rows):
        i1 = min(Sq, i0 + rows)
        keys = min(Sk, i1 + Sk - Sq) if causal else Sk
        if keys <= 0:  # no row of this chunk sees a key: zeros, as the reference gives them
            out.append(q.new_zeros(B, H, i1 - i0, D))
        else:
            out.append(ref.attention(q[:, :, i0:i1], k[:, :, :keys], v[:, :, :keys], causal=causal, scale=scale))
    return torch.cat(out, dim=2)


def candidates(device, causal, scale, gqa, Sq, Sk) -> list[Candidate]:
    def fastgpt_fn(backend):
        import fastgpt

        return lambda inp: fastgpt.attention(inp["q"], inp["k"], inp["v"], causal=causal, scale=scale, backend=backend)

    out = with_tuned_config(fastgpt_candidates(device, fastgpt_fn), Sq, Sk)
    out += sdpa_candidates(lambda name: sdpa_fn(name, causal, scale, gqa, Sq, Sk))
    out.append(Candidate("eager matmul-softmax-matmul", REFERENCE, lambda: eager_fn(causal, scale, gqa),
                         note="HF GPT-2 eager"))
    out.append(Candidate("flash_attn", REFERENCE, lambda: flash_attn_fn("flash_attn", causal, scale),
                         note=dist_version("flash-attn", "flash_attn")))
    out.append(Candidate("flash_attn_3", REFERENCE, lambda: flash_attn_fn("flash_attn_interface", causal, scale),
                         note=dist_version("flash-attn-3", "flash_attn_3", "flashattn-hopper")))
    return out


def masked_candidates(device, scale, gqa, Sq: int, Sk: int) -> list[Candidate]:
    """A padded batch: every candidate takes the boolean mask (inputs["mask"])."""
    def fastgpt_fn(backend):
        from fastgpt.ops.attention import masked_attention

        return lambda inp: masked_attention(inp["q"], inp["k"], inp["v"], inp["mask"], scale=scale, backend=backend)

    out = with_tuned_config(fastgpt_candidates(device, fastgpt_fn), Sq, Sk)
    out += sdpa_candidates(lambda name: sdpa_fn(name, False, scale, gqa, 0, 0), suffix=" + mask")
    out.append(Candidate("eager matmul-softmax-matmul + mask", REFERENCE, lambda: eager_fn(False, scale, gqa),
                         note="HF GPT-2 eager"))
    return out


def with_tuned_config(cands: list[Candidate], Sq: int, Sk: int) -> list[Candidate]:
    """fastgpt's candidates, the Triton one reporting the config its autotuner ran last (tiles,
    warps, stages, TMA or not): this case's, when the case goes through the autotuner (more than
    one query, and max(Sq, Sk) long enough)."""
    def tuned_config() -> str:
        from fastgpt.kernels import attention as kernel

        config = getattr(kernel._attn_fwd_tuned, "best_config", None)
        tuned = Sq > 1 and max(Sq, Sk) > kernel._TUNE_MIN_LEN
        return f"tuned: {config}" if config is not None and tuned else ""

    for cand in cands:
        if cand.backend == "triton":
            cand.details = tuned_config
    return cands


def sdpa_candidates(make_fn, suffix: str = "", note: str = "") -> list[Candidate]:
    """SDPA forced to each backend: "sdpa[<backend>]<suffix>", built by make_fn(SDPBackend name),
    with the backend chosen once around the candidate's check and timing (sdpa_setting), as a
    user would, not at each call."""
    names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return [Candidate(f"sdpa[{name.split('_')[0].lower()}]{suffix}", REFERENCE, lambda n=name: make_fn(n),
                      note=f"torch {torch.__version__}{note}", setting=lambda n=name: sdpa_setting(n))
            for name in names]  # fmt: skip


def sdpa_setting(backend_name: str):
    """torch's sdpa_kernel([backend]): SDPA restricted to one backend (none if this torch lacks it:
    its sdpa_fn then says so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def sdpa_fn(backend_name: str, causal: bool, scale: float, gqa: bool, Sq: int, Sk: int):
    """F.scaled_dot_product_attention under sdpa_setting(backend_name), which the caller enters
    (raises if it cannot run), under inputs["mask"] when the case has one."""
    from torch.nn.attention import SDPBackend

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Unavailable(f"this torch has no SDPBackend.{backend_name}")
    mask, is_causal = None, causal
    if causal and Sq != Sk:  # SDPA's is_causal is top-left aligned; fastgpt's is bottom-right
        from torch.nn.attention.bias import causal_lower_right

        mask, is_causal = causal_lower_right(Sq, Sk), False

    def fn(inp):
        try:
            return F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], attn_mask=inp.get("mask", mask),
                                                  is_causal=is_causal, scale=scale, enable_gqa=gqa)
        except RuntimeError as exc:
            if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                raise Unavailable(f"SDPA {backend_name} cannot run these inputs (dtype/head dim/GPU)") from exc
            raise

    return fn


def eager_fn(causal: bool, scale: float, gqa: bool):
    """What HF's eager GPT-2 attention does: q k^T, masked_fill, softmax, @ v, in the input dtype;
    also hiding what inputs["mask"] hides when the case has one."""
    masks = {}

    def fn(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        if gqa:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        w = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
        if causal:
            Sq, Sk = q.shape[2], k.shape[2]
            key = (Sq, Sk, q.device)
            if key not in masks:  # built once, as a model builds its mask once per forward
                i = torch.arange(Sq, device=q.device)[:, None]
                masks[key] = torch.arange(Sk, device=q.device)[None, :] > i + (Sk - Sq)
            w = w.masked_fill(masks[key], torch.finfo(w.dtype).min)
        if "mask" in inp:
            w = w.masked_fill(~inp["mask"], torch.finfo(w.dtype).min)
        return torch.matmul(torch.softmax(w, dim=-1).to(v.dtype), v)

    return fn


def flash_attn_fn(module_name: str, causal: bool, scale: float):
    """flash-attn 2 (flash_attn) or 3 (flash_attn_interface): (B, S, H, D) views, native GQA."""
    module, reason = optional_module(module_name)
    if module is None:
        raise Unavailable(reason)

    def fn(inp):
        q, k, v = (inp[n].transpose(1, 2) for n in ("q", "k", "v"))  # (B, S, H, D), stride(-1) == 1
        out = module.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        out = out[0] if isinstance(out, tuple) else out  # some versions also return the LSE
        return out.transpose(1, 2)

    return fn
