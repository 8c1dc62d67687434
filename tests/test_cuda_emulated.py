"""The CUDA backend's kernels (csrc/) run on the CPU: compiled for the host by tests/simt/ (a SIMT
emulator: each CUDA thread a fiber, blocks one after another, warp collectives and the PTX
wrappers emulated) and reached through the public API with backend="cuda" on CPU tensors
(FASTGPT_CUDA_EMULATOR). The GPU suite (test_cuda_kernels.py) runs the same kernels at real sizes
on a GPU; this one runs them in CI, at small sizes, against fastgpt.reference, with outputs
poisoned, and once more with the fibers of each block run in reverse order: a result that
depends on that order is a race between two barriers.
"""

import collections
import importlib
import shutil

import pytest
import torch

import fastgpt
from fastgpt import _backends, reference
from fastgpt.ops import _cuda
from tests.helpers import assert_close
from tests.test_cuda_kernels import FILTERS, _kept

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def emulator():
    """The host build of fastgpt._C, made current for this module (built once, then cached)."""
    if shutil.which("g++") is None:
        pytest.skip("the SIMT emulator needs g++")
    from tests.simt import build

    path = build.build()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_backends.EMULATOR_ENV_VAR, str(path))
        yield path


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def test_the_backend_takes_cpu_tensors_only_under_the_emulator(monkeypatch):
    try:  # a process that loaded the installed extension first (CPython caches it by name)
        importlib.import_module("fastgpt._C")
    except ImportError:
        pass
    assert _backends.cuda_extension().archs == "simt"
    assert _backends.why_not("cuda", torch.device("cpu")) is None
    monkeypatch.delenv(_backends.EMULATOR_ENV_VAR)
    assert _backends.why_not("cuda", torch.device("cpu"))  # CUDA tensors needed, or _C not built
    with pytest.raises(fastgpt.BackendUnavailableError, match="cuda"):
        fastgpt.layer_norm(torch.randn(2, 8), None, None, backend="cuda")


# ----------------------------------------------------------------------------- attention

ATTENTION_SHAPES = [  # B, Hq, Hkv, Sq, Sk
    (1, 1, 1, 1, 1),
    (2, 3, 3, 17, 17),
    (1, 4, 2, 70, 70),    # GQA, a partial second tile
    (1, 2, 2, 33, 129),   # Sq < Sk: a cached prefix
    (1, 2, 1, 130, 47),   # Sq > Sk: leading rows see no key when causal
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(shape, causal, D, dtype, poisoned_empty):
    B, Hq, Hkv, Sq, Sk = shape
    q, k, v = (_randn(B, H, S, D, dtype=dtype, seed=i) for i, (H, S) in enumerate([(Hq, Sq), (Hkv, Sk), (Hkv, Sk)]))
    out = fastgpt.attention(q, k, v, causal=causal, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), causal=causal), dtype)


def test_attention_views_and_rows_without_keys():
    qkv = _randn(2, 77, 3, 4, 64, dtype=torch.bfloat16)  # (B, S, 3, H, D), as a fused projection gives
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = fastgpt.attention(q, k, v, causal=True, scale=0.3, backend="cuda")
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), causal=True, scale=0.3), torch.bfloat16)
    q, k = _randn(1, 2, 90, 64, dtype=torch.float16), _randn(1, 2, 20, 64, dtype=torch.float16, seed=1)
    out = fastgpt.attention(q, k, k, causal=True, backend="cuda")
    assert torch.equal(out[:, :, :70], torch.zeros_like(out[:, :, :70]))  # row i sees keys j <= i - 70


# ----------------------------------------------------------------------------- decode

DECODE_SHAPES = [  # B, Hq, Hkv, Smax
    (1, 1, 1, 1),
    (3, 12, 12, 100),
    (4, 8, 2, 333),
    (2, 6, 2, 64),     # group 3
    (2, 16, 1, 513),   # MQA
    (1, 4, 4, 3000),   # several splits on the emulator's 4 SMs
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_matches_reference(shape, D, dtype, poisoned_empty):
    B, Hq, Hkv, Smax = shape
    q = _randn(B, Hq, 1, D, dtype=dtype)
    k, v = _randn(B, Hkv, Smax, D, dtype=dtype, seed=1), _randn(B, Hkv, Smax, D, dtype=dtype, seed=2)
    lens = torch.randint(1, Smax + 1, (B,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    lens[0] = Smax
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), dtype)


def test_decode_splits_long_caches():
    ext = _backends.cuda_extension()
    blocks = _cuda._decode_blocks_per_sm(1, 64, 1, torch.device("cpu"))
    assert ext.decode_num_splits(1, 4, 4, 3000, _backends.EMULATOR_SMS, blocks) > 1


def test_decode_lengths_clamped_and_strided_caches():
    q = _randn(5, 4, 1, 128, dtype=torch.bfloat16)
    k, v = _randn(5, 2, 50, 128, dtype=torch.bfloat16, seed=1), _randn(5, 2, 50, 128, dtype=torch.bfloat16, seed=2)
    lens = torch.tensor([0, -7, 150, 1, 50], dtype=torch.int32)
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), torch.bfloat16)
    cache = _randn(2, 300, 4, 64, dtype=torch.float16)  # (B, S, H, D) storage, read as (B, H, S, D)
    q = _randn(2, 8, 1, 64, dtype=torch.float16, seed=5)
    lens = torch.tensor([300, 123], dtype=torch.int32)
    out = fastgpt.decode_attention(q, cache.transpose(1, 2), cache.transpose(1, 2), lens, backend="cuda")
    expected = reference.decode_attention(q.float(), cache.transpose(1, 2).float(), cache.transpose(1, 2).float(), lens)
    assert_close(out, expected, torch.float16)


# ----------------------------------------------------------------------------- layer norm


# N up to 1024 vectors a row: a warp per row; to 4096: a block per row; past that, the looped kernel.
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("N", [1, 7, 100, 768, 1025, 5000, 20000, 40000])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_matches_reference(N, dtype, fused, poisoned_empty):
    M = 5 if N <= 5000 else 2
    x, r = _randn(M, N, dtype=dtype, scale=3.0), _randn(M, N, dtype=dtype, seed=1)
    w, b = _randn(N, seed=2) + 1, _randn(N, seed=3)
    if fused:
        y, h = fastgpt.layer_norm(x, w, b, residual=r, backend="cuda")
        ey, eh = reference.layer_norm(x, w, b, residual=r)
        assert torch.equal(h, eh)
    else:
        y, ey = fastgpt.layer_norm(x, w, b, backend="cuda"), reference.layer_norm(x, w, b)
    assert_close(y, ey, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_optional_params_mixed_dtypes_and_strided_rows(dtype):
    x = _randn(9, 1030, dtype=dtype)[:, 3:1027]  # row stride 1030, misaligned start: the scalar path
    w16 = (_randn(1024, seed=1) + 1).to(dtype)
    for w, b in [(None, None), (w16, None), (None, _randn(1024, seed=2)), (w16, _randn(1024, seed=3))]:
        assert_close(fastgpt.layer_norm(x, w, b, eps=1e-3, backend="cuda"), reference.layer_norm(x, w, b, 1e-3), dtype)


# ----------------------------------------------------------------------------- sampling


def _row_params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return (torch.full((B,), temperature), torch.full((B,), top_k, dtype=torch.int64),
            torch.full((B,), top_p, dtype=torch.float64), torch.full((B,), min_p))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_greedy_is_the_first_argmax(dtype):
    logits = _randn(6, 3000, dtype=dtype, scale=4)
    logits[1, 7] = logits[1, 2000] = 100  # tie: the first index wins
    logits[2, :] = float("nan")
    logits[3, 11] = logits[3, 2500] = float("inf")
    logits[4, :] = float("-inf")
    logits[5, 5] = float("nan")
    out = fastgpt.sample(logits, temperature=0.0, backend="cuda")
    assert out.tolist() == reference.sample(logits, *_row_params(6, 0.0), torch.zeros(1, dtype=torch.int64)).tolist()
    assert out[1] == 7 and out[2] == 0 and out[3] == 11 and out[4] == 0


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_draws_stay_in_the_kept_set_and_cover_it(params):
    V, n, dtype = 64, 600, torch.float16  # fp16 rows tie often: the tie rules matter
    row = _randn(1, V, dtype=dtype, scale=2.0)
    kept = _kept(row.float(), **params)[0]
    draws = fastgpt.sample(row.expand(n, V), generator=torch.Generator().manual_seed(0), backend="cuda", **params)
    assert draws.min() >= 0 and draws.max() < V
    assert kept[draws].all(), f"drew removed tokens {sorted(set(draws[~kept[draws]].tolist()))}"
    probs = torch.softmax(reference.filter_logits(row.float(), *_row_params(1, **params)), dim=-1)[0]
    counts = torch.bincount(draws, minlength=V)
    assert (counts[probs > 20 / n] > 0).all(), "a kept token with a visible probability was never drawn"


def test_draws_follow_the_filtered_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    V, n = 12, 2500
    row = _randn(1, V, scale=1.5)
    params = {"temperature": 0.8, "top_k": 9, "top_p": 0.95}
    probs = torch.softmax(reference.filter_logits(row, *_row_params(1, **params)), dim=-1)[0].double()
    draws = fastgpt.sample(row.expand(n, V), generator=torch.Generator().manual_seed(1), backend="cuda", **params)
    counts = torch.bincount(draws, minlength=V).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    assert scipy_stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4, chi2


def test_sampling_is_reproducible_and_handles_special_rows():
    logits = _randn(6, 1000, scale=2)

    def draw(seed):
        return fastgpt.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(seed), backend="cuda")

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    logits[0, :] = float("-inf")
    logits[1, :] = float("nan")
    logits[2, [3, 500]] = float("inf")
    temperature = torch.tensor([1.0, 1.0, 1.0, -2.0, 1.0, 1.0])  # < 0 on the device (unchecked): greedy
    top_k = torch.tensor([0, 0, 0, 0, -5, 10_000])  # <= 0 and > V: off
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # 0: the max only
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # > 1: clamped to 1, the max only
    for seed in range(4):
        s = torch.tensor([seed])
        out = _cuda.sample(logits, temperature, top_k, top_p, min_p, s)
        assert out[0] == 0 and out[1] == 0 and out[2].item() in (3, 500)
        assert out[3] == logits[3].argmax() and out[4] == logits[4].argmax() and out[5] == logits[5].argmax()


@pytest.mark.parametrize("V", [1, 3, 5000])
def test_sampling_vocab_sizes(V):
    logits = _randn(4, V, dtype=torch.bfloat16, scale=3)
    out = fastgpt.sample(logits, top_k=50, top_p=0.9, backend="cuda")
    assert ((out >= 0) & (out < V)).all()
    assert _kept(logits.float(), top_k=50, top_p=0.9).gather(1, out[:, None]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, V", [(12, 3000), (12, 100), (12, 5), (2, 50257)])
def test_sampling_candidate_path_equals_one_block(B, V, dtype):
    """top_k_bound > 0 (the candidate path: each 1024-entry chunk's best, then the row's) draws
    the same tokens as one block per row, to the bit, for every kind of row, including those it
    hands to the one-block code (top-k off or past the bound, a tie group longer than the list,
    +inf logits, nothing finite, scores overflowing)."""
    logits = _randn(B, V, dtype=dtype, seed=B + V, scale=3)
    rows = torch.arange(B)
    t = torch.tensor([0.8, 0.0, 1.0, 1.3, 0.7, 0.5, 1.0, 0.9, 1e-30, 1.0, 2.0, 0.6])[rows % 12]
    k = torch.tensor([50, 3, 0, 7, 50, 1, 50, 20, 50, 64, 5, 50])[rows % 12]
    p = torch.tensor([0.9, 1.0, 0.9, 1.0, 0.5, 1.0, 0.95, 0.0, 1.0, 1.0, 0.8, 1.0], dtype=torch.float64)[rows % 12]
    mp = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0])[rows % 12]
    special = rows[rows % 12 == 6]
    logits[special, : min(V, 200)] = logits[special].amax(dim=-1, keepdim=True) - 1  # a tie group past the list
    logits[rows[rows % 12 == 4], V // 2] = float("inf")
    logits[rows[rows % 12 == 5]] = float("-inf")
    logits[::3, :: max(1, V // 7)] = float("nan")
    for seed in (1, 2):
        s = torch.tensor([seed])
        fast, one_block = _cuda.sample(logits, t, k, p, mp, s, top_k_bound=50), _cuda.sample(logits, t, k, p, mp, s)
        assert torch.equal(fast, one_block), (fast, one_block)


def test_top_k_keeps_ties_with_the_kth_value():
    row = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    draws = fastgpt.sample(row.expand(400, 6), top_k=2, backend="cuda")
    assert set(draws.tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- races


def test_results_do_not_depend_on_the_order_of_threads(monkeypatch):
    """Each kernel with each block's fibers run in order, then in reverse order between barriers
    (FASTGPT_SIMT_SCHEDULE): the same bits, or two threads race between barriers."""
    q, k = _randn(1, 4, 70, 64, dtype=torch.float16), _randn(1, 2, 90, 64, dtype=torch.float16, seed=1)
    kc = _randn(1, 4, 3000, 64, dtype=torch.float16, seed=2)
    x, r = _randn(3, 5000, dtype=torch.bfloat16, seed=3), _randn(3, 5000, dtype=torch.bfloat16, seed=4)
    logits = _randn(12, 3000, seed=5, scale=3)
    params = (*_row_params(12, 0.9, 50, 0.9, 0.01), torch.tensor([7]))

    def run():
        return [fastgpt.attention(q, k, k, causal=True, backend="cuda"),
                fastgpt.decode_attention(q[:, :, :1], kc, kc, torch.tensor([2999], dtype=torch.int32), backend="cuda"),
                *fastgpt.layer_norm(x, None, None, residual=r, backend="cuda"),
                _cuda.sample(logits, *params, top_k_bound=50), _cuda.sample(logits, *params)]  # fmt: skip

    forward = run()
    monkeypatch.setenv("FASTGPT_SIMT_SCHEDULE", "reverse")
    for got, want in zip(run(), forward, strict=True):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_generates_on_the_cuda_kernels(monkeypatch):
    """GPT-2 (fp16, left-padded batch) with every op on the cuda backend (its matmuls stay
    PyTorch's): prefill attention, decode attention over the static cache, the LayerNorms and the
    sampler all run on the extension, and greedy decoding gives the torch backend's tokens."""
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=2))  # head dim 64
    for p in model.parameters():
        p.data.normal_(0, 0.08 if p.dim() > 1 else 0.3)
    model = model.half().eval()
    idx = torch.randint(0, 256, (3, 9))
    mask = torch.ones_like(idx)
    mask[1, :3] = mask[2, :8] = 0
    model.backend = "torch"
    want = model.generate(idx, 12, attention_mask=mask)

    calls, ext = collections.Counter(), _backends.cuda_extension()

    class Counted:  # the extension, counting its calls
        def __getattr__(self, name):
            calls[name] += 1
            return getattr(ext, name)

    monkeypatch.setattr(_backends, "cuda_extension", Counted)
    model.backend = "cuda"
    assert torch.equal(model.generate(idx, 12, attention_mask=mask), want)
    # 2 layers: the prefill's attention and 11 decode steps' (the 12th token needs no forward), and
    # 2 LayerNorms a layer plus ln_f a forward; one draw a token
    ops = {name: calls[name] for name in ("attention", "decode_attention", "layer_norm", "sample")}
    assert ops == {"attention": 2, "decode_attention": 2 * 11, "layer_norm": 5 * 12, "sample": 12}
