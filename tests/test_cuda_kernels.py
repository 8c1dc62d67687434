"""The CUDA backend (csrc/, fastgpt._C) against fastgpt.reference on a GPU.

Every test is `gpu` (skipped without CUDA) and needs the extension built (`pip install -e .`
with nvcc). Shapes are the awkward ones: lengths that are not multiples of the 64-row tiles, 1,
Sq != Sk both ways, odd head counts, GQA/MQA, non-contiguous views, rows longer than registers.
Outputs are allocated by the launchers, so the caching allocator is first filled with NaN
(`_dirty_allocator`): an element a kernel forgets to write shows up as NaN.
"""

import importlib.util

import pytest
import torch

import fastgpt
from fastgpt import reference
from tests.helpers import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("fastgpt._C") is None, reason="fastgpt._C is not built"),
]

HALF = [torch.bfloat16, torch.float16]


def _dirty_allocator():
    """Hand NaN-filled blocks back to the caching allocator so new outputs start as NaN: large
    blocks, and small ones (<= 1 MiB come from the allocator's separate small pool)."""
    junk = [torch.full((2 << 20,), float("nan"), device="cuda") for _ in range(8)]
    junk += [torch.full((n,), float("nan"), device="cuda") for n in (1 << 18, 1 << 16, 1 << 12, 1 << 8) for _ in range(8)]
    del junk


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


# ----------------------------------------------------------------------------- attention

ATTENTION_SHAPES = [  # B, Hq, Hkv, Sq, Sk
    (1, 1, 1, 1, 1),
    (2, 4, 4, 17, 17),
    (1, 6, 2, 100, 100),
    (2, 8, 1, 64, 64),
    (1, 2, 2, 33, 129),   # Sq < Sk: prefill after a cached prefix
    (1, 2, 1, 130, 47),   # Sq > Sk: leading rows see no key when causal
    (1, 3, 3, 257, 300),
    (1, 4, 2, 1000, 1000),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(shape, causal, D, dtype):
    B, Hq, Hkv, Sq, Sk = shape
    q, k, v = (_randn(B, H, S, D, dtype=dtype, seed=i) for i, (H, S) in enumerate([(Hq, Sq), (Hkv, Sk), (Hkv, Sk)]))
    _dirty_allocator()
    out = fastgpt.attention(q, k, v, causal=causal, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), causal=causal), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_rows_that_see_no_key_are_zero(dtype):
    q, k, v = _randn(1, 2, 90, 64, dtype=dtype), _randn(1, 2, 20, 64, dtype=dtype, seed=1), _randn(1, 2, 20, 64, dtype=dtype, seed=2)
    out = fastgpt.attention(q, k, v, causal=True, backend="cuda")
    assert torch.equal(out[:, :, :70], torch.zeros_like(out[:, :, :70]))  # row i sees keys j <= i - 70


@pytest.mark.parametrize("D", [64, 128])
def test_attention_non_contiguous_layouts(D):
    B, S, H = 2, 77, 4
    qkv = _randn(B, S, 3, H, D, dtype=torch.bfloat16)  # (B, S, 3, H, D) as a fused projection gives
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, stride(-1) == 1
    out = fastgpt.attention(q, k, v, causal=True, scale=0.3, backend="cuda")
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), causal=True, scale=0.3), torch.bfloat16)
    odd = _randn(B, H, S, D + 4, dtype=torch.float16)[..., :D]  # row stride D + 4: copied by the launcher
    out = fastgpt.attention(odd, odd, odd, backend="cuda")
    assert_close(out, reference.attention(odd.float(), odd.float(), odd.float()), torch.float16)


# ----------------------------------------------------------------------------- decode


DECODE_SHAPES = [  # B, Hq, Hkv, Smax
    (1, 1, 1, 1),
    (3, 12, 12, 100),
    (4, 8, 2, 333),
    (2, 6, 2, 64),     # group 3: one padded head per tile
    (2, 16, 1, 513),   # MQA: two tiles of 8 heads
    (2, 12, 2, 1000),  # group 6
    (1, 8, 8, 16384),  # long cache: several splits
    (1, 32, 8, 5000),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_matches_reference(shape, D, dtype):
    B, Hq, Hkv, Smax = shape
    q = _randn(B, Hq, 1, D, dtype=dtype)
    k, v = _randn(B, Hkv, Smax, D, dtype=dtype, seed=1), _randn(B, Hkv, Smax, D, dtype=dtype, seed=2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    lens = torch.randint(1, Smax + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
    lens[0] = Smax
    _dirty_allocator()
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), dtype)


@pytest.mark.parametrize("Smax", [50, 4096])
def test_decode_lengths_are_clamped_on_the_device(Smax):
    q, k, v = _randn(5, 4, 1, 128, dtype=torch.bfloat16), _randn(5, 2, Smax, 128, dtype=torch.bfloat16, seed=1), _randn(5, 2, Smax, 128, dtype=torch.bfloat16, seed=2)
    lens = torch.tensor([0, -7, Smax + 100, 1, Smax], dtype=torch.int32, device="cuda")
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    expected = reference.decode_attention(q.float(), k.float(), v.float(), lens)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert_close(out, expected, torch.bfloat16)


def test_decode_strided_cache_view():
    cache = _randn(2, 300, 4, 64, dtype=torch.float16)  # (B, S, H, D) storage, read as (B, H, S, D)
    k = v = cache.transpose(1, 2)
    q = _randn(2, 8, 1, 64, dtype=torch.float16, seed=5)
    lens = torch.tensor([300, 123], dtype=torch.int32, device="cuda")
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), torch.float16)


# ----------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
# 32768 (fp16/bf16): the register-resident block path at 1024 threads, which needs the kernel to
# fit 64 registers per thread (without __launch_bounds__ sm_80 used 66 and refused the launch).
@pytest.mark.parametrize("N", [1, 7, 64, 100, 768, 1000, 1024, 1025, 4096, 5000, 16384, 32768, 40000])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_matches_reference(N, dtype, fused):
    M = 37 if N <= 16384 else 3
    x, r = _randn(M, N, dtype=dtype, scale=3.0), _randn(M, N, dtype=dtype, seed=1)
    w, b = _randn(N, seed=2) + 1, _randn(N, seed=3)
    _dirty_allocator()
    if fused:
        y, h = fastgpt.layer_norm(x, w, b, residual=r, backend="cuda")
        ey, eh = reference.layer_norm(x, w, b, residual=r)
        assert torch.equal(h, eh)
    else:
        y, ey = fastgpt.layer_norm(x, w, b, backend="cuda"), reference.layer_norm(x, w, b)
    assert_close(y, ey, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_optional_params_mixed_dtypes_and_strided_rows(dtype):
    base = _randn(9, 1030, dtype=dtype)
    x = base[:, 3:1027]  # row stride 1030, misaligned start: the scalar path
    w16 = (_randn(1024, seed=1) + 1).to(dtype)
    for w, b in [(None, None), (w16, None), (None, _randn(1024, seed=2)), (w16, _randn(1024, seed=3))]:
        y = fastgpt.layer_norm(x, w, b, eps=1e-3, backend="cuda")
        assert_close(y, reference.layer_norm(x, w, b, 1e-3), dtype)
    x3 = _randn(2, 5, 768, dtype=dtype)  # leading dims are flattened by the ops layer
    assert_close(fastgpt.layer_norm(x3, None, None, backend="cuda"), reference.layer_norm(x3, None, None), dtype)


# ----------------------------------------------------------------------------- sampling


def _kept(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """reference.filter_logits' kept set closed over ties: HF's unstable sort keeps an arbitrary
    part of a tie group straddling the top-p boundary, the kernel keeps all of it (csrc/sampling.cu).
    fp16/bf16 rows of 64+ tokens tie often enough to matter."""
    B = logits.shape[0]
    full = lambda v, dt: torch.full((B,), v, dtype=dt, device=logits.device)  # noqa: E731
    clean, t = reference.clean_logits(logits), full(temperature, torch.float32)
    scores = reference.filter_logits(clean, t, full(top_k, torch.int64), full(top_p, torch.float64),
                                     full(min_p, torch.float32))
    kept = torch.isfinite(scores)
    divided = clean / t[:, None]  # ties are between scores (after the division), as the kernel sees them
    lowest = torch.where(kept, divided, float("inf")).amin(dim=-1, keepdim=True)
    return kept | (divided == lowest)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_greedy_is_the_first_argmax(dtype):
    logits = _randn(6, 50257, dtype=dtype, scale=4)
    logits[1, 7] = logits[1, 9000] = 100  # tie: the first index wins
    logits[2, :] = float("nan")
    logits[3, 11] = logits[3, 40000] = float("inf")
    logits[4, :] = float("-inf")
    logits[5, 5] = float("nan")
    out = fastgpt.sample(logits, temperature=0.0, backend="cuda")
    assert out.tolist() == reference.sample(logits, *_params(6, 0.0), torch.zeros(1, dtype=torch.int64, device="cuda")).tolist()
    assert out[1] == 7 and out[2] == 0 and out[3] == 11 and out[4] == 0


def _params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    dev = "cuda"
    return (torch.full((B,), temperature, device=dev), torch.full((B,), top_k, dtype=torch.int64, device=dev),
            torch.full((B,), top_p, dtype=torch.float64, device=dev), torch.full((B,), min_p, device=dev))


FILTERS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=0.5, top_p=0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_draws_stay_in_the_kept_set_and_cover_it(params, dtype):
    V, n = 64, 20000
    row = _randn(1, V, dtype=dtype, scale=2.0)
    kept = _kept(row.float(), **params)[0]
    draws = fastgpt.sample(row.expand(n, V), backend="cuda", **params)  # n rows: n independent draws
    assert draws.min() >= 0 and draws.max() < V
    counts = torch.bincount(draws, minlength=V)
    assert kept[draws].all(), f"drew removed tokens {sorted(set(draws[~kept[draws]].tolist()))}"
    probs = torch.softmax(reference.filter_logits(row.float(), *_params(1, **params)), dim=-1)[0]
    assert (counts[probs > 20 / n] > 0).all(), "a kept token with a visible probability was never drawn"


def test_draws_follow_the_filtered_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    V, n = 40, 200_000
    row = _randn(1, V, scale=1.5)
    params = dict(temperature=0.8, top_k=25, top_p=0.95)
    probs = torch.softmax(reference.filter_logits(row, *_params(1, **params)), dim=-1)[0].double()
    counts = torch.bincount(fastgpt.sample(row.expand(n, V), backend="cuda", **params), minlength=V).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    assert scipy_stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4, chi2


def test_sampling_is_reproducible_under_a_seed():
    logits = _randn(8, 32000, scale=3)
    a = fastgpt.sample(logits, top_p=0.9, generator=torch.Generator("cuda").manual_seed(1), backend="cuda")
    b = fastgpt.sample(logits, top_p=0.9, generator=torch.Generator("cuda").manual_seed(1), backend="cuda")
    c = fastgpt.sample(logits, top_p=0.9, generator=torch.Generator("cuda").manual_seed(2), backend="cuda")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_special_rows_and_unchecked_device_params():
    V = 1000
    logits = _randn(6, V, scale=2)
    logits[0, :] = float("-inf")
    logits[1, :] = float("nan")
    logits[2, [3, 500]] = float("inf")
    temperature = torch.tensor([1.0, 1.0, 1.0, -2.0, 1.0, 1.0], device="cuda")  # < 0: greedy
    top_k = torch.tensor([0, 0, 0, 0, -5, 10 * V], device="cuda")  # <= 0 and > V: off
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], device="cuda", dtype=torch.float64)  # 0: the max only
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0], device="cuda")  # > 1: clamped to 1, the max only
    for seed in range(20):
        out = fastgpt.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             generator=torch.Generator("cuda").manual_seed(seed), backend="cuda")
        assert out[0] == 0 and out[1] == 0 and out[2].item() in (3, 500)
        assert out[3] == logits[3].argmax() and out[4] == logits[4].argmax() and out[5] == logits[5].argmax()


@pytest.mark.parametrize("V", [1, 3, 128256])
def test_sampling_vocab_sizes(V):
    logits = _randn(4, V, dtype=torch.bfloat16, scale=3)
    out = fastgpt.sample(logits, top_k=50, top_p=0.9, backend="cuda")
    assert ((out >= 0) & (out < V)).all()
    assert _kept(logits.float(), top_k=50, top_p=0.9).gather(1, out[:, None]).all()


def test_a_dominant_token_is_always_drawn_in_a_large_vocab():
    # Token 7 outweighs each of the others by e^100: no honest draw picks another one. A uniform
    # that can round up to exactly 1.0 gives Gumbel noise +inf to a random token instead (with
    # 24-bit uniforms, once per 2^24 tokens: ~0.8% of the rows here, about 60 of 8192).
    V, n = 128256, 8192
    row = torch.zeros(1, V, device="cuda")
    row[0, 7] = 100.0
    for dtype in (torch.float32, torch.bfloat16):
        draws = fastgpt.sample(row.to(dtype).expand(n, V), generator=torch.Generator("cuda").manual_seed(0), backend="cuda")
        assert (draws == 7).all(), f"{int((draws != 7).sum())} of {n} draws left the dominant token"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, V", [(1, 50257), (12, 50257), (256, 50257), (12, 128256), (12, 100), (12, 5)])
def test_sampling_candidate_path_equals_one_block(B, V, dtype):
    """top_k_bound > 0 (the candidate path: each chunk's best entries, then the row's): the same
    tokens as one block per row, to the bit (the same fixed-point weights, the same noise), for
    every kind of row, including those it hands to the one-block code: top-k off or past the
    bound, a tie group longer than the list, +inf logits, nothing finite, scores overflowing."""
    from fastgpt.ops import _cuda

    logits = _randn(B, V, dtype=dtype, seed=B + V, scale=3)
    rows = torch.arange(B, device="cuda")
    t = torch.tensor([0.8, 0.0, 1.0, 1.3, 0.7, 0.5, 1.0, 0.9, 1e-30, 1.0, 2.0, 0.6], device="cuda")[rows % 12]
    k = torch.tensor([50, 3, 0, 7, 50, 1, 50, 20, 50, 64, 5, 50], device="cuda")[rows % 12]
    p = torch.tensor([0.9, 1.0, 0.9, 1.0, 0.5, 1.0, 0.95, 0.0, 1.0, 1.0, 0.8, 1.0], device="cuda",
                     dtype=torch.float64)[rows % 12]  # fmt: skip
    mp = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0], device="cuda")[rows % 12]
    special = rows[rows % 12 == 6]
    logits[special, : min(V, 200)] = logits[special].amax(dim=-1, keepdim=True) - 1  # a tie group past the list
    logits[rows[rows % 12 == 4], V // 2] = float("inf")
    logits[rows[rows % 12 == 5]] = float("-inf")
    logits[::3, :: max(1, V // 7)] = float("nan")
    for seed in (1, 2):
        s = torch.tensor([seed], device="cuda")
        fast = _cuda.sample(logits, t, k, p, mp, s, top_k_bound=50)
        assert torch.equal(fast, _cuda.sample(logits, t, k, p, mp, s)), (fast, _cuda.sample(logits, t, k, p, mp, s))


def test_top_k_keeps_ties_with_the_kth_value():
    row = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]], device="cuda")
    draws = fastgpt.sample(row.expand(5000, 6), top_k=2, backend="cuda")
    assert set(draws.tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- CUDA graphs


def test_all_ops_capture_and_replay_in_a_cuda_graph():
    q, k, v = _randn(2, 4, 70, 64, dtype=torch.bfloat16), _randn(2, 2, 70, 64, dtype=torch.bfloat16, seed=1), _randn(2, 2, 70, 64, dtype=torch.bfloat16, seed=2)
    kc, vc = _randn(2, 2, 4096, 64, dtype=torch.bfloat16, seed=3), _randn(2, 2, 4096, 64, dtype=torch.bfloat16, seed=4)
    lens = torch.tensor([10, 4000], dtype=torch.int32, device="cuda")
    x, r, w = _randn(8, 768, dtype=torch.bfloat16, seed=5), _randn(8, 768, dtype=torch.bfloat16, seed=6), _randn(768, seed=7)
    logits = _randn(4, 5000, seed=8)

    def step():
        return (fastgpt.attention(q, k, v, causal=True, backend="cuda"),
                fastgpt.decode_attention(q[:, :, :1], kc, vc, lens, backend="cuda"),
                fastgpt.layer_norm(x, w, None, residual=r, backend="cuda")[0],
                fastgpt.sample(logits, temperature=0.0, backend="cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (module loading, allocator)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in range(2):  # new inputs in place, replay, compare with eager
        for t in (q, k, v, kc, vc, x, r, logits):
            t.copy_(torch.randn(t.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 10)))
        lens.copy_(torch.tensor([4096 - seed, 1 + seed], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert torch.equal(got, want)
