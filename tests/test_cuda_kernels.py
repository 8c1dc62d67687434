"""The CUDA backend (csrc/, fastgpt._C) against fastgpt.reference.

On a GPU every test here is `gpu` and runs the built extension at real sizes. On a CPU the same
tests run the same kernels compiled for the host by tests/simt/ (a SIMT emulator: each CUDA thread
a fiber, blocks one after another, warp collectives and the PTX wrappers emulated), reached
through backend="cuda" on CPU tensors (FASTGPT_CUDA_EMULATOR), at small sizes; there, one more
test runs each kernel with its blocks and each block's fibers in reverse and random orders (a
result that depends on the order is a race). Shapes are the awkward ones: lengths that are not
multiples of the tiles, 1, Sq != Sk both ways, odd head counts, GQA/MQA, non-contiguous views,
rows longer than registers. Outputs the launchers allocate start poisoned (NaN): an element a
kernel forgets to write fails. Decode attention's tests are in tests/test_cuda_decode.py.
"""

import collections
import importlib
import importlib.util

import pytest
import torch

import fastgpt
from fastgpt import _backends, reference
from fastgpt.ops import _cuda
from tests.conftest import HAS_CUDA
from tests.helpers import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"
# On a GPU, `gpu` tests (-m gpu); on a CPU, CI's tests on the emulator.
pytestmark = [pytest.mark.gpu] if HAS_CUDA else []

HALF = [torch.float16, torch.bfloat16]


def on_gpu(*cases):
    """Cases for the GPU only: the emulator runs one thread at a time, thousands of times slower."""
    return list(cases) if HAS_CUDA else []


@pytest.fixture(autouse=True)
def extension(request):
    """The built fastgpt._C on a GPU; on a CPU, the emulator's host build of it (conftest.py)."""
    if HAS_CUDA:
        if importlib.util.find_spec("fastgpt._C") is None:
            pytest.skip("fastgpt._C is not built")
    else:
        request.getfixturevalue("cuda_emulator")


@pytest.fixture(autouse=True)
def _poisoned(poisoned_empty):
    """Every test's outputs start poisoned (tests/conftest.py)."""


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def _gen(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


def _tensor(values, dtype=None):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _num_splits(B, Hq, Hkv, Smax, dtype=torch.bfloat16, D=64, masked=False, Sq=1) -> int:
    """The KV splits the cuda decode kernel takes for these shapes here (bf16, D 64 by default)."""
    device = torch.empty(0, device=DEVICE).device  # with its index, which the extension needs
    return _cuda.decode_num_splits(B, Hq, Hkv, Smax, D, dtype, device, masked=masked, Sq=Sq)


@pytest.mark.skipif(HAS_CUDA, reason="the emulator's own test")
def test_the_backend_takes_cpu_tensors_only_under_the_emulator(monkeypatch):
    try:  # a process that loaded the installed extension first (CPython caches it by name)
        importlib.import_module("fastgpt._C")
    except ImportError:
        pass
    assert _backends.cuda_extension().archs == "simt"
    assert _backends.why_not("cuda", torch.device("cpu")) is None
    assert "SIMT emulator" in _backends.report()["cuda"]  # fastgpt info
    monkeypatch.delenv(_backends.EMULATOR_ENV_VAR)
    assert _backends.why_not("cuda", torch.device("cpu"))  # CUDA tensors needed, or _C not built
    with pytest.raises(fastgpt.BackendUnavailableError, match="cuda"):
        fastgpt.layer_norm(torch.randn(2, 8), None, None, backend="cuda")


# ----------------------------------------------------------------------------- attention

ATTENTION_SHAPES = [  # B, Hq, Hkv, Sq, Sk
    (1, 1, 1, 1, 1),
    (2, 4, 4, 17, 17),
    (1, 6, 2, 70, 70),    # GQA, a partial second tile
    (1, 2, 2, 33, 129),   # Sq < Sk: prefill after a cached prefix
    (1, 2, 1, 130, 47),   # Sq > Sk: leading rows see no key when causal
    *on_gpu((2, 8, 1, 64, 64), (1, 3, 3, 257, 300), (1, 4, 2, 1000, 1000)),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(shape, causal, D, dtype):
    B, Hq, Hkv, Sq, Sk = shape
    q, k, v = (_randn(B, H, S, D, dtype=dtype, seed=i) for i, (H, S) in enumerate([(Hq, Sq), (Hkv, Sk), (Hkv, Sk)]))
    out = fastgpt.attention(q, k, v, causal=causal, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.attention(q.float(), k.float(), v.float(), causal=causal), dtype)


@pytest.mark.parametrize("scale", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_scales(D, scale):
    """Logits ~ +-25 (q * 3, scale +-1): blocks without masks take the max of the raw scores and
    scale it, which needs a scale >= 0 (a negative one flips q's signs, or exp2 overflows); a zero
    scale attends uniformly (masked blocks scale before masking: -inf * 0 is NaN)."""
    q = _randn(1, 2, 150, D, dtype=torch.float16, scale=3.0)
    k, v = _randn(1, 2, 150, D, dtype=torch.float16, seed=1), _randn(1, 2, 150, D, dtype=torch.float16, seed=2)
    for causal in (False, True):
        out = fastgpt.attention(q, k, v, causal=causal, scale=scale, backend="cuda")
        expected = reference.attention(q.float(), k.float(), v.float(), causal=causal, scale=scale)
        assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_rows_that_see_no_key_are_zero(dtype):
    q = _randn(1, 2, 90, 64, dtype=dtype)
    k, v = _randn(1, 2, 20, 64, dtype=dtype, seed=1), _randn(1, 2, 20, 64, dtype=dtype, seed=2)
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


@pytest.mark.parametrize("shape", [(1, 2, 1, 130, 47), (2, 4, 2, 33, 129), (1, 3, 3, 1, 70),
                                   *on_gpu((2, 8, 2, 1000, 1000))])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_log_sum_exp(shape, D):
    """return_lse: each row's log-sum-exp (natural log) beside the output it gives without; -inf for
    rows that see no key (Sq > Sk, causal). One query takes the prefill kernel here too."""
    B, Hq, Hkv, Sq, Sk = shape
    q, k, v = (_randn(B, H, S, D, dtype=torch.bfloat16, seed=i)
               for i, (H, S) in enumerate([(Hq, Sq), (Hkv, Sk), (Hkv, Sk)]))  # fmt: skip
    res = fastgpt.attention(q, k, v, causal=True, backend="cuda", return_lse=True)
    out, lse = reference.attention(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    assert res.lse.shape == (B, Hq, Sq) and res.lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(res.lse), torch.isneginf(lse))
    torch.testing.assert_close(res.lse, lse, atol=1e-4, rtol=1e-4)
    assert_close(res.out, out, torch.bfloat16)
    if Sq > 1:  # the same kernel: the same bits
        assert torch.equal(res.out, fastgpt.attention(q, k, v, causal=True, backend="cuda"))


# ----------------------------------------------------------------------------- masked attention


def _masked(q, k, v, mask, dtype, scale=None):
    """masked_attention on the cuda kernels against the reference in fp32; returns the output."""
    from fastgpt.ops.attention import masked_attention

    out = masked_attention(q, k, v, mask, scale=scale, backend="cuda")
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    assert_close(out, masked_attention(q.float(), k.float(), v.float(), mask, scale=scale, backend="torch"), dtype)
    return out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 90, 1), (2, 4, 2, 33, 17, 4), (1, 8, 1, 1, 300, 8),
                                   (2, 6, 2, 1, 3000, 1), *on_gpu((4, 16, 4, 1000, 1500, 16), (8, 32, 8, 1, 9000, 1))])
def test_masked_attention_random_masks(shape, D, dtype):
    """Random masks, per head or broadcast (stride 0 over heads), over GQA heads, in the prefill
    kernel (Sq > 1, lengths past its 64-row tiles) and the split-KV decode kernel (Sq == 1, one
    split or several); a query the mask hides every key from returns zeros."""
    B, Hq, Hkv, Sq, Sk, mask_heads = shape
    q = _randn(B, Hq, Sq, D, dtype=dtype)
    k, v = (_randn(B, Hkv, Sk, D, dtype=dtype, seed=s) for s in (1, 2))
    mask = torch.rand(B, mask_heads, Sq, Sk, generator=torch.Generator().manual_seed(Sq + Sk)).to(DEVICE) > 0.4
    mask[-1, 0, Sq // 2] = False  # sees nothing: the query of each head that reads mask head 0
    out = _masked(q, k, v, mask, dtype)
    hidden = out[-1, : Hq // mask_heads, Sq // 2]
    assert torch.equal(hidden, torch.zeros_like(hidden))


@pytest.mark.parametrize("Sq, Sk", [(21, 21), (9, 130), (1, 37), (1, 2000)])
def test_masked_attention_padding(Sq, Sk):
    """Left padding as transformers masks it (causal bottom-right, each row's padding hidden), the
    mask broadcast over heads and rows; a row that is all padding returns zeros."""
    i, j = torch.arange(Sq, device=DEVICE)[:, None], torch.arange(Sk, device=DEVICE)[None, :]
    pad = _tensor([0, Sk - 5, Sk])[:, None, None, None]
    mask = ((j <= i + Sk - Sq) & (j >= pad)).expand(3, 1, Sq, Sk)
    q, k, v = _randn(3, 4, Sq, 64, dtype=torch.float16), *(_randn(3, 2, Sk, 64, dtype=torch.float16, seed=s)
                                                           for s in (1, 2))  # fmt: skip
    out = _masked(q, k, v, mask, torch.float16, scale=0.3)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    _masked(q, k, v, mask[:1], torch.float16)  # one row's mask for all


def test_masked_attention_transposed_mask_and_lse():
    """A transposed mask (no unit last stride: copied) gives the expanded one's bits; the launchers
    also keep the log-sum-exp under a mask (-inf where it hides every key)."""
    q, k, v = _randn(2, 4, 19, 64, dtype=torch.bfloat16), *(_randn(2, 2, 23, 64, dtype=torch.bfloat16, seed=s)
                                                             for s in (1, 2))  # fmt: skip
    mask = torch.rand(2, 1, 23, 19, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.5
    mask[1, 0, :, 4] = False
    transposed = mask.transpose(2, 3)
    out = _masked(q, k, v, transposed, torch.bfloat16)
    assert torch.equal(_masked(q, k, v, transposed.contiguous().expand(2, 4, 19, 23), torch.bfloat16), out)
    scores = (q.float() @ k.float().repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.125
    expected = scores.masked_fill(~transposed, float("-inf")).logsumexp(-1)
    res = _cuda.attention(q, k, v, causal=False, scale=0.125, return_lse=True, mask=transposed.expand(2, 4, 19, 23))
    assert torch.equal(res.out, out) and res.lse[1, :, 4].isneginf().all()
    torch.testing.assert_close(res.lse, expected, atol=2e-5, rtol=2e-5)
    lens = _tensor([23, 23], torch.int32)
    dec = _cuda.decode_attention(q[:, :, 4:5], k, v, lens, scale=0.125, return_lse=True,
                                 mask=transposed[:, :, 4:5].expand(2, 4, 1, 23))  # fmt: skip
    assert_close(dec.out, out[:, :, 4:5], torch.bfloat16)  # query 4 alone, on the split-KV kernel
    torch.testing.assert_close(dec.lse, expected[:, :, 4:5], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="the GPU's occupancy (the emulator's is an estimate)")
def test_masked_decode_splits_by_its_own_occupancy():
    """The masked MHA split kernel holds more registers (109 against 96 on sm_90a: no 5-blocks-an-SM
    bound): its split count comes from its own occupancy, not the unmasked kernel's."""
    device = torch.empty(0, device=DEVICE).device
    for code in (1, 2):  # fp16, bf16
        masked, plain = (_cuda._decode_blocks_per_sm(code, 64, 1, m, device) for m in (True, False))
        assert 1 <= masked < plain, (code, masked, plain)
        assert all(_cuda._decode_blocks_per_sm(code, 128, group, True, device) >= 1 for group in (2, 4, 8))


def test_masked_decode_step_merges_in_one_launch():
    """A masked decode with the step's counters (the launcher's: the decode op takes no mask): the
    split kernel's own merge, the combine kernel's bits."""
    B, Hq, Hkv, Smax = 2, 16, 1, 1500
    assert _num_splits(B, Hq, Hkv, Smax, masked=True) > 1
    q, k, v = _randn(B, Hq, 1, 64, dtype=torch.bfloat16), *(_randn(B, Hkv, Smax, 64, dtype=torch.bfloat16, seed=s)
                                                             for s in (1, 2))  # fmt: skip
    mask = torch.rand(B, Hq, 1, Smax, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.3
    mask[1, 3] = False
    lens = _tensor([Smax, 700], torch.int32)
    counters = torch.zeros(B * Hq, dtype=torch.int32, device=DEVICE)
    merged = _cuda.decode_attention(q, k, v, lens, scale=0.125, mask=mask, counters=counters)
    assert not counters.any()
    assert torch.equal(merged, _cuda.decode_attention(q, k, v, lens, scale=0.125, mask=mask))
    visible = mask & (torch.arange(Smax, device=DEVICE) < lens[:, None, None, None])
    expected = reference.masked_attention(q.float(), k.float(), v.float(), visible.view(B, 1, Hq, 1, Smax), 0.125)
    assert_close(merged, expected, torch.bfloat16)
    assert torch.equal(merged[1, 3], torch.zeros_like(merged[1, 3]))


@pytest.mark.parametrize("Sq", [70, 1])
def test_attention_scores_past_the_float_range_see_nothing(Sq):
    """Finite inputs whose scores all overflow to -inf: zeros and an lse of -inf, as the reference."""
    q, v = torch.ones(1, 2, Sq, 64, dtype=torch.float16, device=DEVICE), _randn(1, 1, 40, 64, dtype=torch.float16)
    k = torch.full((1, 1, 40, 64), -100.0, dtype=torch.float16, device=DEVICE)
    res = fastgpt.attention(q, k, v, scale=1e36, backend="cuda", return_lse=True)
    assert torch.equal(res.out, torch.zeros_like(res.out)) and res.lse.isneginf().all()
    _, lse = reference.attention(q.float(), k.float(), v.float(), scale=1e36, return_lse=True)
    assert lse.isneginf().all()


def test_attention_a_nan_score_gives_nan_lse():
    """A query whose scores hold a NaN gets a NaN log-sum-exp beside its NaN output, not the -inf
    of a query that sees no key (the prefill kernel; a single query, the decode kernels)."""
    q, k, v = (_randn(1, 2, S, 64, dtype=torch.float16, seed=i) for i, S in enumerate((70, 40, 40)))
    k[0, 1, 7, 0] = float("nan")
    for rows in (slice(None), slice(69, 70)):
        res = fastgpt.attention(q[:, :, rows], k, v, causal=True, backend="cuda", return_lse=True)
        out, lse = reference.attention(q[:, :, rows].float(), k.float(), v.float(), causal=True, return_lse=True)
        assert torch.equal(res.lse.isnan(), lse.isnan()) and torch.equal(res.lse.isneginf(), lse.isneginf())
        assert lse.isnan().any() and torch.equal(res.out.isnan(), out.isnan())


# ----------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
# Up to 32 vectors a row: a warp a row; to 4096: a block a row, in registers; past that, looped.
# 32768 (fp16/bf16): the register-resident block path at 1024 threads, which needs the kernel to
# fit 64 registers per thread (without __launch_bounds__ sm_80 used 66 and refused the launch).
@pytest.mark.parametrize("N", [1, 7, 64, 100, 768, 1025, 5000, 20000, 40000, *on_gpu(1000, 1024, 4096, 16384, 32768)])
@pytest.mark.parametrize("fused", [False, True])
def test_layer_norm_matches_reference(N, dtype, fused):
    M = (37 if HAS_CUDA else 5) if N <= 16384 else 3
    x, r = _randn(M, N, dtype=dtype, scale=3.0), _randn(M, N, dtype=dtype, seed=1)
    w, b = _randn(N, seed=2) + 1, _randn(N, seed=3)
    if fused:
        y, h = fastgpt.layer_norm(x, w, b, residual=r, backend="cuda")
        ey, eh = reference.layer_norm(x, w, b, residual=r)
        assert torch.equal(h, eh)
    else:
        y, ey = fastgpt.layer_norm(x, w, b, backend="cuda"), reference.layer_norm(x, w, b)
    assert_close(y, ey, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("M, N", [(3, 96), (5, 768), (1030, 64), *on_gpu((4096, 1024), (7, 4096))])
def test_layer_norm_params_in_the_inputs_dtype(M, N, dtype):
    """Weight and bias in x's dtype, read as vectors: with x in a warp's registers (up to 1024
    rows asked for together with x, beyond that when y is written) and in a block's; either one
    absent."""
    x, r = _randn(M, N, dtype=dtype, scale=3.0), _randn(M, N, dtype=dtype, seed=1)
    w, b = (_randn(N, seed=2) + 1).to(dtype), _randn(N, dtype=dtype, seed=3)
    for weight, bias in [(w, b), (w, None), (None, b)]:
        y, h = fastgpt.layer_norm(x, weight, bias, residual=r, backend="cuda")
        ey, eh = reference.layer_norm(x, weight, bias, residual=r)
        assert torch.equal(h, eh)
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


def test_sizes_past_the_bindings_are_unavailable():
    """Rows or columns past 2^31 - 1 (an expanded view: no memory) are the cuda backend's limit,
    said before any launch as BackendUnavailableError (bindings.cpp's bare ValueError came after
    the output was allocated, and auto did not move on)."""
    x = torch.zeros(1, 1, dtype=torch.float16, device=DEVICE).expand(2**31, 1)
    with pytest.raises(fastgpt.BackendUnavailableError, match="fewer than 2\\^31 rows and columns"):
        fastgpt.layer_norm(x, None, None, backend="cuda")
    logits = torch.zeros(1, 4, device=DEVICE).expand(2**31, 4)
    with pytest.raises(fastgpt.BackendUnavailableError, match="fewer than 2\\^31 rows"):
        fastgpt.sample(logits, temperature=1.0, backend="cuda")


def test_launchers_check_what_they_are_given():
    """The launchers, called directly (the ops layer checks first): a q of 3 dims, a residual of
    another shape or dtype, each named."""
    q = torch.randn(2, 16, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"attention \(cuda backend\): q must have shape \(B, Hq, Sq, D\)"):
        _cuda.attention(q, q, q, causal=False, scale=0.125)
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="residual must have x's dtype torch.float32, got torch.float16"):
        _cuda.layer_norm(x, None, None, eps=1e-5, residual=x.half())
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 8\)"):
        _cuda.layer_norm(x, None, None, eps=1e-5, residual=x[:2])


def test_layer_norm_constant_rows():
    """Constant rows (tests/test_layer_norm.py's constant_rows: warp, block and looped paths, with
    and without a residual): y exactly 0, or NaN at eps 0, as torch's."""
    from tests.test_layer_norm import constant_rows

    device = "cuda" if HAS_CUDA else "cpu"
    for x, r, eps, expected in constant_rows(device):
        out = fastgpt.layer_norm(x, None, None, eps, residual=r, backend="cuda")
        torch.testing.assert_close((out[0] if r is not None else out).cpu(), expected, atol=0, rtol=0,
                                   equal_nan=True)  # fmt: skip


# ----------------------------------------------------------------------------- sampling


def test_sample_scores_underflowing_draw_nothing():
    """Finite logits whose every score x / t underflows to -inf (t 1e-3 over -2e38..-3.1e38): nothing
    is drawable, and every path returns 0 as the reference and the Triton kernels do (the block-a-row
    path returned the argmax, 2); a row with one score left finite draws it."""
    logits = torch.tensor([[-3e38, -3.1e38, -2e38, -2.5e38], [-3e38, -3.1e38, -2e38, -1e30]], device=DEVICE)
    for top_k in (0, 2):
        ids = fastgpt.sample(logits, temperature=1e-3, top_k=top_k, backend="cuda")
        assert ids.tolist() == reference.sample(logits, *_params(2, 1e-3, top_k), _tensor([0])).tolist() == [0, 3]


def _kept(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """reference.filter_logits' kept set closed over ties: of a tie group straddling the top-p
    boundary HF keeps a part (which, its sort decides), the kernel keeps all of it drawable, at the
    mass HF keeps of it (reference.draw_scores, csrc/sampling.cu). fp16/bf16 rows of 64+ tokens tie
    often enough to matter."""
    clean, params = reference.clean_logits(logits), _params(logits.shape[0], temperature, top_k, top_p, min_p)
    kept = torch.isfinite(reference.filter_logits(clean, *params))
    divided = clean / params[0][:, None]  # ties are between scores (after the division), as the kernel sees them
    lowest = torch.where(kept, divided, float("inf")).amin(dim=-1, keepdim=True)
    return kept | (divided == lowest)


def _params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The four per-row parameter tensors in the launcher's dtypes."""
    return (torch.full((B,), temperature, device=DEVICE), torch.full((B,), top_k, dtype=torch.int64, device=DEVICE),
            torch.full((B,), top_p, dtype=torch.float64, device=DEVICE), torch.full((B,), min_p, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_greedy_is_the_first_argmax(dtype):
    V = 50257 if HAS_CUDA else 3000
    logits = _randn(6, V, dtype=dtype, scale=4)
    logits[1, 7] = logits[1, V - 1000] = 100  # tie: the first index wins
    logits[2, :] = float("nan")
    logits[3, 11] = logits[3, V - 500] = float("inf")
    logits[4, :] = float("-inf")
    logits[5, 5] = float("nan")
    out = fastgpt.sample(logits, temperature=0.0, backend="cuda")
    assert out.tolist() == reference.sample(logits, *_params(6, 0.0), _tensor([0])).tolist()
    assert out[1] == 7 and out[2] == 0 and out[3] == 11 and out[4] == 0


FILTERS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=0.5, top_p=0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF] if HAS_CUDA else [torch.float16])
@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_draws_stay_in_the_kept_set_and_cover_it(params, dtype):
    V, n = 64, 20000 if HAS_CUDA else 600  # n rows: n independent draws
    row = _randn(1, V, dtype=dtype, scale=2.0)
    kept = _kept(row.float(), **params)[0]
    draws = fastgpt.sample(row.expand(n, V), generator=_gen(0), backend="cuda", **params)
    assert draws.min() >= 0 and draws.max() < V
    counts = torch.bincount(draws, minlength=V)
    assert kept[draws].all(), f"drew removed tokens {sorted(set(draws[~kept[draws]].tolist()))}"
    probs = torch.softmax(reference.draw_scores(row.float(), *_params(1, **params)), dim=-1)[0]
    assert (counts[probs > 20 / n] > 0).all(), "a kept token with a visible probability was never drawn"


def test_draws_follow_the_filtered_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    V, n = (40, 200_000) if HAS_CUDA else (12, 2500)
    row = _randn(1, V, scale=1.5)
    params = {"temperature": 0.8, "top_k": V * 5 // 8, "top_p": 0.95}
    probs = torch.softmax(reference.filter_logits(row, *_params(1, **params)), dim=-1)[0].double()
    draws = fastgpt.sample(row.expand(n, V), generator=_gen(1), backend="cuda", **params)
    counts = torch.bincount(draws, minlength=V).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    assert scipy_stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4, chi2


def test_sampling_is_reproducible_under_a_seed():
    logits = _randn(8, 32000 if HAS_CUDA else 1000, scale=3)
    a = fastgpt.sample(logits, top_p=0.9, generator=_gen(1), backend="cuda")
    b = fastgpt.sample(logits, top_p=0.9, generator=_gen(1), backend="cuda")
    c = fastgpt.sample(logits, top_p=0.9, generator=_gen(2), backend="cuda")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_special_rows_and_unchecked_device_params():
    V = 1000
    logits = _randn(6, V, scale=2)
    logits[0, :] = float("-inf")
    logits[1, :] = float("nan")
    logits[2, [3, 500]] = float("inf")
    temperature = _tensor([1.0, 1.0, 1.0, -2.0, 1.0, 1.0])  # < 0: greedy
    top_k = _tensor([0, 0, 0, 0, -5, 10 * V])  # <= 0 and > V: off
    top_p = _tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], torch.float64)  # 0: the max only
    min_p = _tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # > 1: clamped to 1, the max only
    for seed in range(20 if HAS_CUDA else 4):  # the launcher: the ops layer refuses such values on a CPU
        out = _cuda.sample(logits, temperature, top_k, top_p, min_p, _tensor([seed]))
        assert out[0] == 0 and out[1] == 0 and out[2].item() in (3, 500)
        assert out[3] == logits[3].argmax() and out[4] == logits[4].argmax() and out[5] == logits[5].argmax()


@pytest.mark.parametrize("V", [1, 3, 5000, *on_gpu(128256)])
def test_sampling_vocab_sizes(V):
    logits = _randn(4, V, dtype=torch.bfloat16, scale=3)
    out = fastgpt.sample(logits, top_k=50, top_p=0.9, backend="cuda")
    assert ((out >= 0) & (out < V)).all()
    assert _kept(logits.float(), top_k=50, top_p=0.9).gather(1, out[:, None]).all()


@pytest.mark.skipif(not HAS_CUDA, reason="8192 draws over 128256 tokens: too slow for the emulator")
def test_a_dominant_token_is_always_drawn_in_a_large_vocab():
    # Token 7 outweighs each of the others by e^100: no honest draw picks another one. A uniform
    # that can round up to exactly 1.0 gives Gumbel noise +inf to a random token instead (with
    # 24-bit uniforms, once per 2^24 tokens: ~0.8% of the rows here, about 60 of 8192).
    V, n = 128256, 8192
    row = torch.zeros(1, V, device=DEVICE)
    row[0, 7] = 100.0
    for dtype in (torch.float32, torch.bfloat16):
        draws = fastgpt.sample(row.to(dtype).expand(n, V), generator=_gen(0), backend="cuda")
        assert (draws == 7).all(), f"{int((draws != 7).sum())} of {n} draws left the dominant token"


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, V", [(12, 3000), (12, 100), (12, 5), (2, 50257),
                                  *on_gpu((1, 50257), (12, 50257), (256, 50257), (12, 128256))])
def test_sampling_candidate_path_equals_one_block(B, V, dtype, bounded, monkeypatch):
    """top_k_bound > 0 (the candidate path: each chunk's best entries, then the row's; bounded,
    each row's k-th best key bounded from below first): the same tokens as one block per row, to
    the bit (the same fixed-point weights, the same noise), for every kind of row, including
    those it hands to the one-block code: top-k off or past the bound, a tie group longer than
    the list, +inf logits, nothing finite, scores overflowing."""
    monkeypatch.setattr(_cuda, "SAMPLE_BOUND_MIN_ROWS", 1 if bounded else B + 1)
    logits = _randn(B, V, dtype=dtype, seed=B + V, scale=3)
    rows = torch.arange(B, device=DEVICE)
    t = _tensor([0.8, 0.0, 1.0, 1.3, 0.7, 0.5, 1.0, 0.9, 1e-30, 1.0, 2.0, 0.6])[rows % 12]
    k = _tensor([50, 3, 0, 7, 50, 1, 50, 20, 50, 64, 5, 50])[rows % 12]
    p = _tensor([0.9, 1.0, 0.9, 1.0, 0.5, 1.0, 0.95, 0.0, 1.0, 1.0, 0.8, 1.0], torch.float64)[rows % 12]
    mp = _tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0])[rows % 12]
    special = rows[rows % 12 == 6]
    logits[special, : min(V, 200)] = logits[special].amax(dim=-1, keepdim=True) - 1  # a tie group past the list
    logits[rows[rows % 12 == 4], V // 2] = float("inf")
    logits[rows[rows % 12 == 5]] = float("-inf")
    logits[::3, :: max(1, V // 7)] = float("nan")
    for seed in (1, 2):
        s = _tensor([seed])
        fast, one_block = _cuda.sample(logits, t, k, p, mp, s, top_k_bound=50), _cuda.sample(logits, t, k, p, mp, s)
        assert torch.equal(fast, one_block), (fast, one_block)


@pytest.mark.parametrize("k", [40, 1, 15])
def test_sampling_bounded_candidates_past_their_list(k):
    """The bounded candidate path where its shortcuts end. At k 40: (row 0) each chunk holds 20
    entries at or above the row's bound, 781 in all, past the 512 a row's list holds, so the draw
    merges the chunks' lists; (row 1) 1024 in each of two chunks, which sort; (row 2, every k)
    every group's maximum is one tied value: 16 entries a chunk, 786 ties, past the list and past
    cand_k (the one-block code draws). At k 1 and 15 rows 0 and 1 fit their lists. The same tokens
    as one block per row, and the draws land in the kept set."""
    V, chunk, group = 50257, 1024, 64
    logits = _randn(3, V, seed=k, scale=0.1) - 10.0
    for c in range(V // chunk):  # row 0: 20 entries per chunk in its first group, rising chunk by chunk
        logits[0, c * chunk: c * chunk + 20] = 5.0 + 0.01 * c + 1e-4 * torch.arange(20, device=DEVICE)
    crowd = torch.rand(2 * chunk, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    logits[1, 3 * chunk: 5 * chunk] = 5.0 + 1e-3 * crowd  # row 1: 2048 entries above the others, in two chunks
    logits[2, ::group] = 5.0  # one entry a group at 5: ties far past any list
    t, top_k = _tensor([0.9, 1.0, 0.7]), _tensor([k, k, k])
    p, mp = _tensor([0.9, 1.0, 0.95], torch.float64), _tensor([0.0, 0.0, 0.0])
    for seed in (3, 4):
        s = _tensor([seed])
        fast = _cuda.sample(logits, t, top_k, p, mp, s, top_k_bound=50)
        assert torch.equal(fast, _cuda.sample(logits, t, top_k, p, mp, s)), fast
        kept = reference.filter_logits(logits, temperature=t, top_k=top_k, top_p=p, min_p=mp) > float("-inf")
        assert kept.gather(1, fast[:, None]).all()


@pytest.mark.parametrize("bound", [0, 50], ids=["one-block", "candidates"])
@pytest.mark.parametrize("top_k, top_p_keeps, margin", [(20, 0, 0), (0, 15, 0.002), (0, 15, -0.002),
                                                      (25, 12, 0.002), (25, 12, -0.002)])
def test_sampling_draws_exactly_the_kept_set(top_k, top_p_keeps, margin, bound):
    """Near-equal scores for the 30 best tokens (some at positions where a pass that skipped or
    repeated tokens would err: 31, 62, 124, 125, 127 of each 128), the rest far below, and a top-p
    that keeps top_p_keeps of the top-k survivors, 0.002 of their mass short of what keeps one
    more (margin > 0) or past what keeps one fewer (< 0): over 300 draws every token of the
    reference's kept set comes up and no other, so a threshold one token off (top-k's count,
    top-p's mass, either way) shows."""
    V, B = 700, 300
    best = torch.tensor([31, 62, 124, 125, 127, 3, 200, 251, 252, 255, 380, 381, 383, 509, 510, 511, 600, 640, 641,
                         643, 650, 660, 670, 680, 690, 695, 696, 697, 698, 699])  # fmt: skip
    row = torch.full((V,), -5.0)
    row[best] = 5.0 + 1e-3 * torch.arange(30.0)
    top_p = 1.0
    if top_p_keeps:  # the mass of the best top_p_keeps (- 1) survivors, less (plus) the margin
        survivors = row.double().topk(top_k).values if top_k else row.double()
        mass = survivors.softmax(0).sort(descending=True).values.cumsum(0)
        top_p = float(mass[top_p_keeps - 1]) - margin if margin > 0 else float(mass[top_p_keeps - 2]) - margin
    logits = row.to(DEVICE).expand(B, V)
    params = _params(B, 1.0, top_k, top_p)
    draws = _cuda.sample(logits, *params, _tensor([11]), top_k_bound=bound)
    t, k, p, mp = (x[:1] for x in params)
    kept = reference.filter_logits(logits[:1], temperature=t, top_k=k, top_p=p, min_p=mp)[0] > float("-inf")
    assert int(kept.sum()) == (top_p_keeps or top_k)
    assert set(draws.tolist()) == set(kept.nonzero().flatten().tolist())


def test_top_k_keeps_ties_with_the_kth_value():
    row = _tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    draws = fastgpt.sample(row.expand(5000 if HAS_CUDA else 400, 6), top_k=2, backend="cuda")
    assert set(draws.tolist()) == {0, 1, 2, 3}


SPLIT_TIES = [  # (row, top_k, top_p): top-p's cut falls inside a group of tied scores
    # HF keeps 5 of the ten 0.0s: token 0 draws with 0.352, not the 0.214 of keeping all ten.
    ([1.0] + [0.0] * 10, 0, 0.6),
    # top-k drops the -1.0s; top-p the 0.0s (the weight below the group) and 3 of the eight 1.0s:
    # each 2.0 draws with 0.260, not 0.202.
    ([2.0] * 2 + [1.0] * 8 + [0.0] * 6 + [-1.0] * 8, 16, 0.64),
]


@pytest.mark.skipif(not HAS_CUDA, reason="the emulator's draws: to the bit in the test below")
@pytest.mark.parametrize("bound", [0, 50], ids=["one-block", "candidates"])
@pytest.mark.parametrize("values, top_k, top_p", SPLIT_TIES, ids=["alone", "after-top-k"])
def test_top_p_draws_a_split_tie_group_at_the_mass_hf_keeps(values, top_k, top_p, bound):
    """A tie group straddling the top-p boundary stays drawable whole, at the probability mass HF
    keeps of it (reference.draw_scores): chi-square against softmax(draw_scores) on both paths
    (bound 50: the candidate path's list; V <= its 64 entries, so it draws these rows itself).

    On the GPU only. The emulator's draws (5-9 ms a row) are checked to the token instead: they are
    those of draw_scores (test_top_p_split_tie_draws_are_those_of_draw_scores), whose masses are
    HF's (tests/test_sampling.py, which also counts 400 draws of the first row on each path), and
    the noise's law is tested apart (test_draws_are_the_argmax_of_the_scores_plus_the_documented_noise)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    row, n = _tensor([values]), 200_000
    params = _params(n, 1.0, top_k, top_p)
    probs = torch.softmax(reference.draw_scores(row, *(x[:1] for x in params)), dim=-1)[0].double()
    draws = _cuda.sample(row.expand(n, row.shape[1]), *params, _tensor([5]), top_k_bound=bound)
    counts = torch.bincount(draws, minlength=row.shape[1]).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum().item()
    assert scipy_stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4, (chi2, counts[keep] / n, probs[keep])


@pytest.mark.parametrize("bound", [0, 50], ids=["one-block", "candidates"])
@pytest.mark.parametrize("values, top_k, top_p", [
    ([1.0] + [0.0] * 10, 0, 0.6),  # 5 of the ten 0.0s kept: 1/2
    ([2.0] * 2 + [1.0] * 8 + [0.0] * 6 + [-1.0] * 8, 16, 0.57),  # 4 of the eight 1.0s: 1/2
    ([2.0] * 2 + [1.0] * 8 + [0.0] * 6 + [-1.0] * 8, 16, 0.45),  # 2 of them: 1/4
], ids=["half", "half-after-top-k", "quarter-after-top-k"])  # fmt: skip
def test_top_p_split_tie_draws_are_those_of_draw_scores(values, top_k, top_p, bound):
    """The tie rule to the bit, where the chi-square tests above see only large errors: the draws
    are those of reference.draw_scores' scores with every filter off (the same noise: the counters
    are the tokens' indices). The shares HF keeps are powers of two, whose logs the kernel's logf
    and the reference's fp64 log round alike; a count of removed ties one off changes them."""
    row, n = _tensor([values]), 300
    params = _params(n, 1.0, top_k, top_p)
    scores = reference.draw_scores(row, *(x[:1] for x in params))
    shares = (scores - row)[torch.isfinite(scores) & (scores != row)].exp()
    assert len(shares) > 0 and torch.allclose(shares, torch.full_like(shares, 0.5 if top_p > 0.5 else 0.25))
    for seed in (1, 2):
        s = _tensor([seed])
        draws = _cuda.sample(row.expand(n, row.shape[1]), *params, s, top_k_bound=bound)
        plain = _cuda.sample(scores.expand(n, row.shape[1]), *_params(n), s, top_k_bound=bound)
        assert torch.equal(draws, plain)


@pytest.mark.parametrize("bound", [0, 50], ids=["one-block", "candidates"])
def test_top_p_without_a_split_tie_draws_as_without_top_p(bound):
    """Where top-p removes none of the group at its cut, the draw is the plain Gumbel-max of the
    scores: the same tokens, to the bit, as the kept tokens alone with top-p off (the same noise:
    the counters are the tokens' indices). Each row's cut falls half a token into its lowest kept
    group, the one the tie rule weighs: three tied tokens on even rows, the 4th best alone on odd."""
    V, B = 64, 200
    logits = _randn(B, V, seed=13, scale=1.5)
    logits[0::2, [5, 40, 63]] = logits[0::2].amax(dim=-1, keepdim=True) - 0.5
    probs = torch.softmax(logits.double(), dim=-1)
    lowest = probs.argsort()[:, -4:-3]
    lowest[0::2] = 5
    p_lowest = probs.gather(1, lowest)  # each token's of the lowest kept group
    below = torch.where(probs < p_lowest, probs, 0).sum(dim=-1)
    top_p = 1.0 - (below + 0.5 * p_lowest[:, 0])  # the cut: the mass below the group and half a token
    t, k, _, mp = _params(B)
    kept = reference.filter_logits(logits, t, k, top_p, mp) > float("-inf")
    sizes = torch.where(torch.arange(B, device=DEVICE) % 2 == 0, 3, 1)
    assert torch.equal(kept, probs >= p_lowest) and torch.equal((probs == p_lowest).sum(dim=-1), sizes)
    for seed in (1, 2):
        s = _tensor([seed])
        draws = _cuda.sample(logits, t, k, top_p, mp, s, top_k_bound=bound)
        alone = _cuda.sample(logits.masked_fill(~kept, float("-inf")), *_params(B), s, top_k_bound=bound)
        assert torch.equal(draws, alone)


# ----------------------------------------------------------------------------- races and graphs


@pytest.mark.skipif(HAS_CUDA, reason="the emulator's schedules")
def test_results_do_not_depend_on_the_order_of_threads(monkeypatch):
    """Each kernel with its blocks, and each block's fibers, run in order, then in reverse order
    and in random orders (a fresh one each sweep between barriers; FASTGPT_SIMT_SCHEDULE): the same
    bits, or two threads race between barriers, or the result depends on which block runs last
    (the decode step's merge by the last split to finish)."""
    from fastgpt.ops.decode import decode_step_attention

    q, k = _randn(1, 4, 70, 64, dtype=torch.float16), _randn(1, 2, 90, 64, dtype=torch.float16, seed=1)
    kc = _randn(1, 4, 3000, 64, dtype=torch.float16, seed=2)
    x, r = _randn(3, 5000, dtype=torch.bfloat16, seed=3), _randn(3, 5000, dtype=torch.bfloat16, seed=4)
    logits = _randn(12, 3000, seed=5, scale=3)
    params = (*_params(12, 0.9, 50, 0.9, 0.01), _tensor([7]))
    counters = torch.zeros(36, dtype=torch.int32)
    # GQA over two rows, two tiles of 8 query heads a kv head: each tile's counter apart.
    qg, kg = _randn(2, 16, 1, 64, dtype=torch.bfloat16, seed=6), _randn(2, 1, 1500, 64, dtype=torch.bfloat16, seed=7)
    assert _num_splits(2, 16, 1, 1500) > 1
    # 3 queries a row of GQA 3, masked: 9 (head, query) rows a kv head in tiles of 8, the second padded.
    qm, km = _randn(2, 6, 3, 64, dtype=torch.float16, seed=8), _randn(2, 2, 1500, 64, dtype=torch.float16, seed=9)
    mask = torch.rand(2, 6, 3, 1500, generator=torch.Generator().manual_seed(10)) > 0.3
    assert _num_splits(2, 6, 2, 1500, torch.float16, masked=True, Sq=3) > 1

    def run():
        return [fastgpt.attention(q, k, k, causal=True, backend="cuda"),
                fastgpt.decode_attention(q[:, :, :1], kc, kc, _tensor([2999], torch.int32), backend="cuda"),
                decode_step_attention(q[:, :, :1], kc, kc, _tensor([2999], torch.int32), counters, backend="cuda"),
                decode_step_attention(qg, kg, kg, _tensor([1500, 777], torch.int32), counters, backend="cuda"),
                _cuda.decode_attention(qm, km, km, _tensor([1400, 700], torch.int32), scale=0.1, mask=mask,
                                       counters=counters),
                *fastgpt.layer_norm(x, None, None, residual=r, backend="cuda"),
                _cuda.sample(logits, *params, top_k_bound=50), _cuda.sample(logits, *params)]  # fmt: skip

    forward = run()
    for schedule in ("reverse", "random:1"):
        monkeypatch.setenv("FASTGPT_SIMT_SCHEDULE", schedule)
        for got, want in zip(run(), forward, strict=True):
            assert torch.equal(got, want), schedule


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_all_ops_capture_and_replay_in_a_cuda_graph():
    q = _randn(2, 4, 70, 64, dtype=torch.bfloat16)
    k, v = (_randn(2, 2, 70, 64, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    kc, vc = _randn(2, 2, 4096, 64, dtype=torch.bfloat16, seed=3), _randn(2, 2, 4096, 64, dtype=torch.bfloat16, seed=4)
    lens = torch.tensor([10, 4000], dtype=torch.int32, device="cuda")
    x, r = (_randn(8, 768, dtype=torch.bfloat16, seed=s) for s in (5, 6))
    w = _randn(768, seed=7)
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


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_generates_on_the_cuda_kernels(monkeypatch):
    """GPT-2 (fp16, left-padded batch) with every op on the cuda backend (its matmuls stay
    PyTorch's): prefill attention, decode attention over the static cache, the LayerNorms and the
    sampler all run on the extension, and greedy decoding gives the torch backend's tokens. The
    prompt fills the cache past 128 positions, so that decode attention splits it (on the
    emulator's 4 SMs) and merges the splits in its one launch, by the cache's counters."""
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_positions=512, n_embd=128, n_layer=2, n_head=2))  # head dim 64
    for p in model.parameters():
        p.data.normal_(0, 0.08 if p.dim() > 1 else 0.3)
    model = model.half().to(DEVICE).eval()
    assert _num_splits(3, 2, 2, 512, torch.float16) > 1
    idx = torch.randint(0, 256, (3, 260), device=DEVICE)
    mask = torch.ones_like(idx)
    mask[1, :3] = mask[2, :8] = 0
    model.backend = "torch"
    want = model.generate(idx, 12, attention_mask=mask, cuda_graph=False)  # eager: each launch counted

    calls, ext = collections.Counter(), _backends.cuda_extension()

    class Counted:  # the extension, counting its calls
        def __getattr__(self, name):
            calls[name] += 1
            return getattr(ext, name)

    monkeypatch.setattr(_backends, "cuda_extension", Counted)
    model.backend = "cuda"
    got = model.generate(idx, 12, attention_mask=mask, cuda_graph=False)
    if HAS_CUDA:  # fp16 on two paths of GPU math: a near-tie may flip an argmax, and its row's tail with it
        assert torch.equal(got[:, :-11], want[:, :-11])  # the prompt's next token
        assert (got == want).all(dim=1).sum() >= 2  # and all but at most one row throughout
    else:  # the emulator: fp32 arithmetic, libm
        assert torch.equal(got, want)
    # 2 layers: the prefill's attention and 11 decode steps' (the 12th token needs no forward), and
    # 2 LayerNorms a layer plus ln_f a forward; one draw a token
    ops = {name: calls[name] for name in ("attention", "decode_attention", "layer_norm", "sample")}
    assert ops == {"attention": 2, "decode_attention": 2 * 11, "layer_norm": 5 * 12, "sample": 12}
