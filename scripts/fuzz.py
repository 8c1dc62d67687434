"""Random cases for every kernel op against fastgpt.reference, until a time limit.

The tests pin chosen awkward shapes; this draws them: random batch, head counts and GQA groups,
sequence and cache lengths, head dims, hidden sizes, layouts (transposed, padded, strided and
expanded views), parameters and dtypes, each case from one seed so a failure reproduces with
--seed. Outputs are compared with the fp32 reference under the project's tolerance table
(fastgpt.bench.checks), and sampled tokens must lie in the reference's kept set (widened by a
hair of top-p and min-p: the kernels may keep a boundary token the reference's fp32 cumsum
drops, see kernels/sampling/).

    TRITON_INTERPRET=1 python scripts/fuzz.py --seconds 600          # CPU: Triton's interpreter
    python scripts/fuzz.py --seconds 120 --backends triton,cuda      # on a GPU (bf16 too)
    FASTGPT_CUDA_EMULATOR=$(python -m tests.simt.build) python scripts/fuzz.py --backends cuda
                                      # CPU: the CUDA kernels on tests/simt's emulator (linear left out)
    python scripts/fuzz.py --ops attention --seed 1234 --cases 1     # replay one case

Exits 1 when a case fails, after printing each failure with its seed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch

import fastgpt
from fastgpt import _backends, reference
from fastgpt.bench.checks import compare, ids_in_kept_set
from fastgpt.ops.attention import masked_attention
from fastgpt.ops.decode import decode_step_attention
from fastgpt.ops.linear import COUNTER_COLUMNS, linear


def _dtypes(device: str, backend: str) -> list[torch.dtype]:
    # Triton's interpreter has no bf16 arithmetic (the CUDA kernels' emulator has)
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" or backend == "cuda" else [])


def _tensor(rng: random.Random, shape, dtype, device, *, scale=1.0, layout=True):
    """Fresh normal data of `shape`: a contiguous tensor or (layout) a view of another layout:
    last dim padded (every other stride grows), (B, S, H, D) storage seen as (B, H, S, D), or
    for vectors every other element of a longer one, or one element expanded (stride 0)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    kinds = ["contiguous"] + (["padded"] if len(shape) >= 2 else ["strided", "expanded"])
    kind = rng.choice(kinds + (["transposed"] if len(shape) >= 3 else [])) if layout else "contiguous"

    def randn(*size):
        return (torch.randn(*size, generator=g) * scale).to(device, dtype)

    if kind == "padded":
        return randn(*shape[:-1], shape[-1] + 8)[..., : shape[-1]]
    if kind == "transposed":
        return randn(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2)
    if kind == "strided":
        return randn(2 * shape[0])[::2]
    if kind == "expanded":
        return randn(1).expand(shape)
    return randn(*shape)


def _up(t):
    """t in fp32, for the reference; None stays None."""
    return None if t is None else t.float()


def _dtype_and_head_dim(rng: random.Random, device: str, backend: str) -> tuple[torch.dtype, int]:
    """For attention: the cuda kernels take fp16/bf16 and head dims 64 and 128."""
    dtype = rng.choice(_dtypes(device, backend))
    if backend == "cuda":
        return (torch.float16 if dtype == torch.float32 else dtype), rng.choice([64, 128])
    return dtype, rng.choice([16, 32, 40, 64, 80, 96, 128] + ([8, 256] if device == "cuda" else []))


def attention_case(rng, device, backend):
    dtype, D = _dtype_and_head_dim(rng, device, backend)
    B, Hkv, group = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 1, 2, 3, 4])
    most = 300 if device == "cuda" else 90
    Sq = rng.choice([1, rng.randint(2, 16), rng.randint(1, most)])  # up to 16: the split-KV kernels
    Sk = Sq if rng.random() < 0.5 else rng.randint(1, most)
    causal = rng.random() < 0.6
    q = _tensor(rng, (B, Hkv * group, Sq, D), dtype, device)
    k, v = (_tensor(rng, (B, Hkv, Sk, D), dtype, device) for _ in range(2))
    scale = rng.choice([None, 0.3, -0.3, 0.0])  # the kernels scale unmasked blocks' maxima: a sign matters
    lse = rng.random() < 0.3  # the log-sum-exp too
    out = fastgpt.attention(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=lse)
    ref = reference.attention(q.float(), k.float(), v.float(), causal=causal, scale=scale, return_lse=lse)
    problem = compare(tuple(out), (ref[0].to(dtype), ref[1])) if lse else compare(out, ref.to(dtype))
    return problem, f"B{B} Hkv{Hkv} g{group} Sq{Sq} Sk{Sk} D{D} causal={causal} scale={scale} lse={lse} {dtype}"


def masked_attention_case(rng, device, backend):
    dtype, D = _dtype_and_head_dim(rng, device, backend)
    B, Hkv, group = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 1, 2, 3, 4])
    Hq, most = Hkv * group, 300 if device == "cuda" else 90
    Sq = rng.choice([1, rng.randint(2, 16), rng.randint(1, most)])
    Sk = rng.randint(1, 2000 if device == "cuda" else most)
    q = _tensor(rng, (B, Hq, Sq, D), dtype, device)
    k, v = (_tensor(rng, (B, Hkv, Sk, D), dtype, device) for _ in range(2))
    shape = (rng.choice([1, B]), rng.choice([1, Hq]), Sq, Sk)  # broadcast over rows or heads, or not
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    mask = torch.rand(shape, generator=g) < rng.choice([0.1, 0.5, 0.95])  # some queries see no key
    mask = mask.to(device)
    out = masked_attention(q, k, v, mask, backend=backend)
    grouped = mask[:, :, None] if shape[1] == 1 else mask.unflatten(1, (Hkv, group))
    ref = reference.masked_attention(q.float(), k.float(), v.float(), grouped, D**-0.5)
    return compare(out, ref.to(dtype)), f"B{B} Hkv{Hkv} g{group} Sq{Sq} Sk{Sk} D{D} mask {shape} {dtype}"


def decode_case(rng, device, backend):
    dtype, D = _dtype_and_head_dim(rng, device, backend)
    B, Hkv, group = rng.randint(1, 4), rng.randint(1, 3), rng.choice([1, 1, 2, 4, 8])
    Smax = rng.randint(1, 2000 if device == "cuda" else 300)
    Sq = rng.choice([1, 1, rng.randint(2, 8)])  # several: speculative decoding's drafts, causal
    q = _tensor(rng, (B, Hkv * group, Sq, D), dtype, device, layout=False)
    k, v = (_tensor(rng, (B, Hkv, Smax, D), dtype, device) for _ in range(2))
    lengths = torch.tensor([rng.choice([1, Smax, rng.randint(1, Smax)]) for _ in range(B)], dtype=torch.int32)
    # With a decode step's counters the kernels merge their splits in the split launch.
    counters = torch.zeros(B * Hkv * group * Sq, dtype=torch.int32, device=device) if rng.random() < 0.5 else None
    lse = rng.random() < 0.3  # the log-sum-exp too
    token_major = rng.random() < 0.5  # the output laid out (B, Sq, Hq, D), as GPT's verify step asks
    out = decode_step_attention(q, k, v, lengths.to(device), counters, backend=backend, return_lse=lse,
                                token_major=token_major)  # fmt: skip
    ref = reference.decode_attention(q.float(), k.float(), v.float(), lengths.to(device), return_lse=lse)
    problem = compare(tuple(out), (ref[0].to(dtype), ref[1])) if lse else compare(out, ref.to(dtype))
    problem = problem or (None if counters is None or not counters.any() else "counters left set")
    o = out[0] if lse else out
    problem = problem or (None if (o.transpose(1, 2) if token_major else o).is_contiguous() else "wrong layout")
    merged = counters is not None
    return problem, f"B{B} Hkv{Hkv} g{group} Sq{Sq} Smax{Smax} D{D} lengths={lengths.tolist()} merged={merged} " \
                    f"lse={lse} token_major={token_major} {dtype}"


def layer_norm_case(rng, device, backend):
    dtype = rng.choice(_dtypes(device, backend))
    M = rng.choice([1, rng.randint(1, 70)])
    N = rng.choice([rng.randint(1, 3000), rng.choice([768, 1024, 1600, 4096])])
    x = _tensor(rng, (M, N), dtype, device, scale=3.0)
    weight = None if rng.random() < 0.2 else _tensor(rng, (N,), dtype, device)
    bias = None if rng.random() < 0.2 else _tensor(rng, (N,), dtype, device)
    residual = _tensor(rng, (M, N), dtype, device) if rng.random() < 0.6 else None
    eps = rng.choice([1e-5, 1e-6, 0.1])
    got = fastgpt.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
    ref = reference.layer_norm(x.float(), _up(weight), _up(bias), eps, residual=_up(residual))
    ref = tuple(r.to(dtype) for r in ref) if residual is not None else ref.to(dtype)
    return compare(got, ref), f"M{M} N{N} residual={residual is not None} weight={weight is not None} " \
                              f"bias={bias is not None} eps={eps} {dtype}"


def linear_case(rng, device, backend):
    dtype = rng.choice(_dtypes(device, backend))
    # One row a third of the time: a decode step's, which takes the matrix-vector kernel (kernels/linear.py).
    M = 1 if rng.random() < 1 / 3 else rng.randint(1, 20)
    K, N = rng.randint(1, 300), rng.randint(1, 300)
    x = _tensor(rng, (M, K), dtype, device, scale=2.0)
    weight = _tensor(rng, (N, K), dtype, device, scale=1 / math.sqrt(K))
    bias = None if rng.random() < 0.3 else _tensor(rng, (N,), dtype, device)
    ln = (_tensor(rng, (K,), dtype, device), _tensor(rng, (K,), dtype, device), 1e-5) if rng.random() < 0.5 else None
    residual = _tensor(rng, (M, K), dtype, device) if ln is not None and rng.random() < 0.5 else None
    activation = rng.choice([None, "gelu_tanh"])
    # Counters half the time: the tiled kernel may then split K (forms without a LayerNorm).
    counters = torch.zeros(-(-N // COUNTER_COLUMNS), dtype=torch.int32, device=device) if rng.random() < 0.5 else None
    out, h = linear(x, weight, bias, ln=ln, residual=residual, activation=activation, counters=counters,
                    backend=backend)  # fmt: skip
    # The reference rounds where the unfused ops would (the LayerNorm's output to x's dtype), as the
    # kernel does: an fp32 LayerNorm output would differ from it by that rounding, ~2 ulps of out.
    ref, h_ref = reference.linear(x, weight, bias, ln=ln, residual=residual, gelu_tanh=activation == "gelu_tanh")
    problem = compare(out, ref) or (compare(h, h_ref) if residual is not None else None)
    if counters is not None and counters.count_nonzero():
        problem = problem or f"counters left at {counters.tolist()}"
    return problem, f"M{M} K{K} N{N} bias={bias is not None} ln={ln is not None} " \
                    f"residual={residual is not None} {activation} counters={counters is not None} {dtype}"


def sample_case(rng, device, backend):
    dtype = rng.choice(_dtypes(device, backend))
    B = rng.choice([1, rng.randint(1, 40)])
    V = rng.choice([rng.randint(2, 5000), 50257] if device == "cuda" else [rng.randint(2, 3000)])
    logits = _tensor(rng, (B, V), dtype, device, scale=rng.choice([1.0, 4.0]))
    if rng.random() < 0.3:  # ties, NaN and infinities
        logits[:, : V // 3] = logits[:, :1]
        logits[0, rng.randrange(V)] = float("nan")
        logits[-1, rng.randrange(V)] = rng.choice([float("inf"), float("-inf")])
    temperature = rng.choice([0.0, 0.7, 1.0, 1.5])
    top_k = rng.choice([0, 1, 5, 50, 300, V])
    top_p = rng.choice([1.0, 0.9, 0.5])
    min_p = rng.choice([0.0, 0.05])
    seed = rng.randrange(2**31)
    g = torch.Generator(device=device).manual_seed(seed)
    ids = fastgpt.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=g,
                         backend=backend)  # fmt: skip
    clean = reference.clean_logits(logits.float())
    if temperature == 0.0:
        kept = reference.greedy(logits.float())[:, None] == torch.arange(V, device=device)
    else:  # widened by a hair: a token at the top-p or min-p boundary may go either way
        def full(p):
            return torch.full((B,), p, device=device)

        clean = reference.top_ties_if_overflow(clean, full(temperature))
        kept = reference.filter_logits(clean, full(temperature), full(top_k).long(),
                                       full(min(1.0, top_p + 1e-3)).double(), full(max(0.0, min_p - 1e-4)))
        # and closed under ties: the kernels keep a whole tie group at the top-p boundary
        lowest = torch.where(kept != float("-inf"), kept, float("inf")).amin(dim=-1, keepdim=True)
        scores = clean / temperature
        kept = (scores >= lowest) & (scores > float("-inf"))
        kept |= ~kept.any(dim=-1, keepdim=True) & (torch.arange(V, device=device) == 0)  # nothing to draw: 0
    return ids_in_kept_set(ids, kept), f"B{B} V{V} t{temperature} k{top_k} p{top_p} min_p{min_p} {dtype}"


def step_case(rng, device, backend):
    """GPT-2's decode step as one persistent kernel (fastgpt.ops.step through GPT.persistent_decode)
    on a random tiny GPT-2: 1-8 rows at random positions of a random cache (fresh random k and v),
    either weight order. Two paths that round differently in fp16/bf16: the kernel's logits and
    cache must be within twice the fused step's error of the same weights in fp32, plus a hair."""
    from fastgpt.decoder import KVCache
    from fastgpt.model import GPT, GPTConfig
    from fastgpt.ops.step import MAX_ROWS

    dtype = rng.choice(_dtypes(device, backend))
    D, H = rng.choice([8, 16, 32] + ([64] if device == "cuda" else [])), rng.randint(1, 4)
    config = GPTConfig(vocab_size=rng.randint(16, 300), n_positions=rng.randint(8, 96), n_embd=H * D,
                       n_layer=rng.randint(1, 2), n_head=H, n_inner=rng.choice([None, rng.randint(1, 6) * 16]))
    torch.manual_seed(rng.randrange(2**31))
    model = GPT(config)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model = model.to(device, dtype)
    if rng.random() < 0.5:  # the (out, in) order GPT keeps on a GPU, on either device
        for p in model.parameters():
            p.data = p.data.contiguous()
    model.backend = "triton"
    B, S = rng.randint(1, MAX_ROWS), rng.randint(1, config.n_positions)
    pos = torch.tensor([rng.randrange(S) for _ in range(B)], device=device)
    tok = torch.tensor([rng.randrange(config.vocab_size) for _ in range(B)], device=device)
    kv = torch.randn((config.n_layer, 2, B, H, S, D), device=device)

    def step(persistent):
        model.persistent_decode = persistent
        cache = KVCache(config, B, S, model.transformer.wte.weight.dtype, device)
        cache.kv.copy_(kv)
        with torch.inference_mode():
            logits = model.decode(tok, pos, cache).float()
        return logits, cache.kv.float(), cache.step_sync

    ours, fused = step(True), step(False)
    model.float()
    exact = step(False)
    case = f"B{B} S{S} pos={pos.tolist()} D{D} H{H} layers {config.n_layer} width {config.inner_dim} {dtype}"
    if ours[2].any():
        return f"sync left at {ours[2].tolist()}", case
    for name, i in (("logits", 0), ("cache", 1)):
        error, fused_error = ((t[i] - exact[i]).abs().max().item() for t in (ours, fused))
        if not error <= 2 * fused_error + 1e-3:
            return f"{name} off by {error:.3g} (the fused step's {fused_error:.3g})", case
    return None, case


OPS = {"attention": attention_case, "masked_attention": masked_attention_case, "decode": decode_case,
       "layer_norm": layer_norm_case, "linear": linear_case, "sample": sample_case, "step": step_case}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--cases", type=int, default=0, help="stop after this many cases (0: the time limit)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {list(OPS)}")
    parser.add_argument("--backends", default="triton", help="comma-separated: triton, cuda")
    parser.add_argument("--seed", type=int, default=None, help="the first case's seed (then seed + 1, ...)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops, backends = args.ops.split(","), args.backends.split(",")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    # The fused linear and the persistent step have no cuda kernel: their cuda turns run Triton's,
    # where Triton runs (not on a CPU outside its interpreter: the CUDA emulator's runs leave them out).
    linear_backend = "triton" if _backends.why_not("triton", torch.device(device)) is None else None
    deadline, cases, skipped, failures = time.monotonic() + args.seconds, 0, 0, []
    while time.monotonic() < deadline and (args.cases == 0 or cases + skipped < args.cases):
        turn = cases + skipped
        op, backend = ops[turn % len(ops)], backends[(turn // len(ops)) % len(backends)]
        if op in ("linear", "step") and backend == "cuda":
            if linear_backend is None:
                skipped, seed = skipped + 1, seed + 1
                continue
            backend = linear_backend
        try:
            problem, case = OPS[op](random.Random(seed), device, backend)
        except Exception as e:  # noqa: BLE001 (a crash is a failure to report, with its seed)
            problem, case = f"{type(e).__name__}: {e}", "(crashed)"
        if problem:
            replay = f"--ops {op} --backends {backend} --seed {seed} --cases 1"
            failures.append(f"{op} {case}: {problem}\n  replay: {replay}")
            print("FAIL", failures[-1], flush=True)
        cases, seed = cases + 1, seed + 1
    left_out = f", {skipped} linear and step turns left out" if skipped else ""
    print(f"{cases} cases on {device}, {len(failures)} failed{left_out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
