"""The Triton prefill attention (kernels/attention.py) against fastgpt.reference in fp32.

Reached through the public API, fastgpt.attention(..., backend="triton"). Without CUDA the kernel
runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): shapes stay tiny and
the interpreter's tiles are 16x16, so lengths of 17, 33 and 100 cross block edges and the causal
diagonal. `gpu` tests run bf16/fp16 at real sizes.
"""


import pytest
import torch
import triton

import fastgpt
from fastgpt import reference
from fastgpt.ops.attention import masked_attention
from tests.gpu_compile import (
    SMEM_LIMIT,
    SMEM_LIMIT_SM86,
    compile_for,
    load_kernel_module,
    run_compile_check,
    run_isolated,
)
from tests.helpers import assert_close


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (_randn((B, Hq, Sq, D), dtype, device, gen), _randn((B, Hkv, Sk, D), dtype, device, gen),
            _randn((B, Hkv, Sk, D), dtype, device, gen))


def _reference(q, k, v, causal, scale):
    """fastgpt.reference in fp32, one batch row at a time to bound the (Sq, Sk) score memory."""
    return torch.cat([reference.attention(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(),
                                          causal=causal, scale=scale) for b in range(q.shape[0])])


def _check(q, k, v, *, causal, scale=None):
    out = fastgpt.attention(q, k, v, causal=causal, scale=scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert not out.isnan().any()
    assert_close(out, _reference(q, k, v, causal, scale), dtype=q.dtype)
    return out


# ----------------------------------------------------------------------------- CPU (interpreter) and GPU


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S", [1, 17, 33, 100])
def test_lengths(device, S, causal):
    _check(*_qkv(1, 2, 2, S, S, 32, torch.float32, device), causal=causal)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 100), (5, 17), (16, 40), (16, 9)])
def test_few_queries_run_the_decode_kernel(device, Sq, Sk, monkeypatch):
    """Sq <= SPLIT_KV_MAX_QUERIES goes to the split-KV decode kernel, causal bottom-right or not,
    the lse too; Sq = 17 to the prefill kernel."""
    from fastgpt.kernels import decode

    from fastgpt.ops.attention import SPLIT_KV_MAX_QUERIES

    calls = []
    launch = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    for causal in (False, True):
        _check(*_qkv(2, 4, 2, Sq, Sk, 64, torch.float32, device, seed=Sk), causal=causal)
    q, k, v = _qkv(1, 2, 1, Sq, Sk, 32, torch.float32, device, seed=Sq)
    res = fastgpt.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    _, lse = reference.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    torch.testing.assert_close(res.lse, lse.float(), atol=2e-5, rtol=2e-5)
    assert len(calls) == 3
    fastgpt.attention(*_qkv(1, 2, 1, SPLIT_KV_MAX_QUERIES + 1, Sk, 32, torch.float32, device), backend="triton")
    assert len(calls) == 3


@pytest.mark.parametrize("Sq,Sk", [(17, 33), (33, 17), (1, 40), (40, 1), (16, 48), (48, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_lengths(device, Sq, Sk, causal):
    out = _check(*_qkv(1, 2, 1, Sq, Sk, 32, torch.float32, device, seed=Sq * 100 + Sk), causal=causal)
    if causal and Sq > Sk:  # bottom-right alignment: the first Sq - Sk queries see no key
        assert (out[:, :, : Sq - Sk] == 0).all()


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 1), (3, 3)])
def test_gqa_mqa(device, Hq, Hkv):
    _check(*_qkv(2, Hq, Hkv, 33, 33, 32, torch.float16, device, seed=Hq), causal=True)


@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims_and_dtypes(device, D, dtype):
    _check(*_qkv(1, 2, 1, 20, 37, D, dtype, device, seed=D), causal=True)


def test_largest_head_dim(device):
    _check(*_qkv(1, 1, 1, 17, 20, 256, torch.float16, device), causal=True)


def test_small_head_dim(device):
    _check(*_qkv(1, 2, 2, 17, 17, 8, torch.float32, device), causal=False)


def test_non_contiguous_views(device):
    """q from a (B, S, H, D) buffer; k and v as strided slices of one fused (B, S, 2, Hkv, D+8) buffer."""
    B, Hq, Hkv, S, D = 2, 4, 2, 33, 64
    gen = torch.Generator().manual_seed(3)
    q = _randn((B, S, Hq, D), torch.float16, device, gen).transpose(1, 2)
    kv = _randn((B, S, 2, Hkv, D + 8), torch.float16, device, gen)
    k, v = (kv[:, :, i, :, :D].transpose(1, 2) for i in (0, 1))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("scale", [0.05, 1.0, -1.0, 0.0])
def test_scale_and_large_logits(device, scale):
    """scale +-1.0 on unit-variance inputs gives logits ~ +-20: the online max must keep exp2 finite
    (a negative scale runs on -q, or the unmasked blocks' max would be the least logit); a zero one
    attends uniformly (the masked blocks scale before masking: -inf * 0 is NaN)."""
    q, k, v = _qkv(1, 2, 2, 33, 33, 64, torch.float32, device, seed=7)
    _check(q * 3, k, v, causal=True, scale=scale)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("Sq, Sk", [(24, 19), (1, 40), (17, 17)])
def test_log_sum_exp(device, backend, Sq, Sk):
    """return_lse: each query's natural-log sum of exp(scores) over the keys it sees, -inf where it
    sees none (Sq > Sk, causal), beside the output it gives without (a single query: the split-KV
    decode kernels')."""
    q, k, v = _qkv(1, 4, 2, Sq, Sk, 32, torch.float32, device)
    res = fastgpt.attention(q, k, v, causal=True, scale=0.2, backend=backend, return_lse=True)
    scores = (q @ k.transpose(-1, -2).repeat_interleave(2, dim=1)) * 0.2
    i, j = torch.arange(Sq, device=device)[:, None], torch.arange(Sk, device=device)[None, :]
    expected = scores.masked_fill(j > i + (Sk - Sq), float("-inf")).logsumexp(-1)
    assert isinstance(res, fastgpt.AttentionOutput)
    assert res.lse.shape == (1, 4, Sq) and res.lse.dtype == torch.float32 and res.lse.is_contiguous()
    assert torch.equal(torch.isneginf(res.lse), torch.isneginf(expected)) and torch.isfinite(expected).any()
    torch.testing.assert_close(res.lse, expected, atol=2e-5, rtol=2e-5)
    assert_close(res.out, _reference(q, k, v, True, 0.2))
    with pytest.raises(TypeError, match="return_lse must be a Python bool"):
        fastgpt.attention(q, k, v, backend=backend, return_lse=1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the point: inf - inf
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_log_sum_exp_is_nan_where_the_softmax_is(device, backend):
    """An inf in q makes a row's scores +-inf, its softmax NaN: its lse is NaN on every backend (the
    reference's logsumexp said +inf), the other rows' as before."""
    q, k, v = _qkv(1, 2, 1, 3, 5, 16, torch.float32, device)
    q[0, 0, 1, 0] = float("inf")
    res = fastgpt.attention(q, k, v, backend=backend, return_lse=True)
    nan = torch.zeros(1, 2, 3, dtype=torch.bool, device=device)
    nan[0, 0, 1] = True
    assert torch.equal(res.lse.isnan(), nan) and torch.equal(res.out.isnan().any(-1), nan)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point: the interpreter's too
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("Sq", [3, 1], ids=["prefill", "single-query"])
def test_scores_past_the_float_range_see_nothing(device, backend, Sq):
    """Finite inputs whose scores all overflow to -inf (a huge scale): the query sees no key, zeros
    and an lse of -inf on every backend, as when a mask hides every key (the reference's softmax
    said NaN, the Triton decode kernel too; the CUDA kernels, the Triton prefill and SDPA said 0)."""
    q = torch.ones(1, 2, Sq, 32, device=device)
    k, v = torch.full((1, 1, 8, 32), -100.0, device=device), torch.randn(1, 1, 8, 32, device=device)
    res = fastgpt.attention(q, k, v, scale=1e36, backend=backend, return_lse=True)
    assert torch.equal(res.out, torch.zeros_like(res.out)) and res.lse.isneginf().all()
    lens = torch.tensor([8], dtype=torch.int32, device=device)
    res = fastgpt.decode_attention(q[:, :, :1], k, v, lens, scale=1e36, backend=backend, return_lse=True)
    assert torch.equal(res.out, torch.zeros_like(res.out)) and res.lse.isneginf().all()


@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("Sq, Sk", [(8, 3), (40, 20)], ids=["few-queries", "prefill"])
def test_a_nan_value_reaches_no_query_that_sees_no_key(device, backend, Sq, Sk, request):
    """Causal with Sq > Sk, a NaN in the last key's value: the query that sees it is NaN, and
    the first Sq - Sk queries, which see no key, are 0 on every backend. The kernels multiply a
    whole tile's weights by v, so those rows met 0 * NaN: the reference and the Triton kernels
    (and the CUDA prefill kernel) wrote NaN there."""
    if backend == "cuda" and device == "cpu":
        request.getfixturevalue("cuda_emulator")
    q, k, v = _qkv(1, 2, 2, Sq, Sk, 64, torch.float16, device)
    v[0, 0, Sk - 1, 3] = float("nan")
    out = fastgpt.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(out[:, :, : Sq - Sk], torch.zeros_like(out[:, :, : Sq - Sk]))
    assert out[0, 0, -1].isnan().any() and not out[0, 1].isnan().any()


def test_log_sum_exp_without_keys():
    """No key at all (Sk = 0): zeros and an fp32 lse of -inf, whatever torch's default dtype."""
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 0, 16)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        res = fastgpt.attention(q, k, k, return_lse=True)
    finally:
        torch.set_default_dtype(default)
    assert res.lse.dtype == torch.float32 and res.lse.shape == (1, 2, 3) and res.lse.isneginf().all()
    assert res.out.shape == q.shape and not res.out.any()


def test_log_sum_exp_merges_attention_over_two_sets_of_keys(device):
    """What the log-sum-exp is for: attention over keys [0, 20) and over [20, 50) apart, weighted
    by exp(lse_part - lse), is attention over all 50 (a cached prefix and new keys, say)."""
    q, k, v = _qkv(2, 4, 2, 33, 50, 32, torch.float32, device)
    a, b = (fastgpt.attention(q, k[:, :, s], v[:, :, s], backend="triton", return_lse=True)
            for s in (slice(0, 20), slice(20, 50)))  # fmt: skip
    lse = torch.logaddexp(a.lse, b.lse)
    merged = a.out * (a.lse - lse).exp()[..., None] + b.out * (b.lse - lse).exp()[..., None]
    whole = fastgpt.attention(q, k, v, backend="triton", return_lse=True)
    assert_close(merged, whole.out)
    torch.testing.assert_close(lse, whole.lse, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- under a boolean mask


def _check_masked(q, k, v, mask, scale=None):
    """masked_attention on the Triton kernel against the reference in fp32; returns the output."""
    out = masked_attention(q, k, v, mask, scale=scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    float_args = (t.float() for t in (q, k, v))
    assert_close(out, masked_attention(*float_args, mask, scale=scale, backend="torch"), dtype=q.dtype)
    return out


def _padding_mask(lengths, Sq, Sk, device):
    """transformers' mask for left-padded rows after a cached prefix: causal bottom-right, and keys
    before row b's padding end hidden. (B, 1, Sq, Sk) bool, an expanded view (stride 0 over heads)."""
    i, j = torch.arange(Sq, device=device)[:, None], torch.arange(Sk, device=device)[None, :]
    pad = torch.tensor([Sk - n for n in lengths], device=device)[:, None, None, None]
    return ((j <= i + Sk - Sq) & (j >= pad)).expand(len(lengths), 1, Sq, Sk)


@pytest.mark.parametrize("Sq,Sk,mask_heads", [(5, 7, 1), (33, 40, 4), (17, 17, 4), (1, 50, 1), (40, 3, 1)])
def test_masked_random(device, Sq, Sk, mask_heads):
    """Random masks over GQA heads, per-head or broadcast; queries hiding every key return zeros."""
    q, k, v = _qkv(2, 4, 2, Sq, Sk, 32, torch.float32, device, seed=Sq + Sk)
    mask = torch.rand(2, mask_heads, Sq, Sk, generator=torch.Generator().manual_seed(Sq)).to(device) > 0.4
    mask[1, :, Sq // 2] = False
    out = _check_masked(q, k, v, mask)
    assert torch.equal(out[1, :, Sq // 2], torch.zeros_like(out[1, :, Sq // 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_padding(device, dtype):
    """Left padding as transformers masks it: a prefill, a chunk after a cached prefix, a decode
    step; the mask broadcast over batch rows too; a row that is all padding returns zeros."""
    for Sq, Sk in [(21, 21), (9, 30), (1, 37)]:
        q, k, v = _qkv(3, 4, 1, Sq, Sk, 64, dtype, device, seed=Sq)
        _check_masked(q, k, v, _padding_mask([Sk, Sk - 5, 3], Sq, Sk, device), scale=0.3)
        _check_masked(q, k, v, _padding_mask([Sk - 4], Sq, Sk, device))
    q, k, v = _qkv(2, 2, 2, 6, 6, 16, dtype, device)
    out = _check_masked(q, k, v, _padding_mask([6, 0], 6, 6, device))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_masked_views(device):
    """Non-contiguous q/k/v and masks: a transposed mask (copied to unit last stride) and an
    expanded one (used as is) give the same result."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 4, 2, 19, 23, 32, torch.float32, device))
    mask = torch.rand(2, 1, 23, 19, generator=torch.Generator().manual_seed(3)).to(device) > 0.5
    transposed = mask.transpose(2, 3)
    expected = _check_masked(q, k, v, transposed)
    torch.testing.assert_close(_check_masked(q, k, v, transposed.contiguous().expand(2, 4, 19, 23)), expected)


def test_masked_checks(monkeypatch):
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    assert_close(masked_attention(q, k, k, mask), masked_attention(q, k, k, mask, backend="torch"))
    monkeypatch.delenv("FASTGPT_BACKEND")
    with pytest.raises(TypeError, match="mask must have dtype in \\(bool\\)"):
        masked_attention(q, k, k, torch.ones(2, 1, 3, 5))
    for shape in [(3, 1, 3, 5), (2, 2, 3, 5), (2, 1, 5, 3), (1, 3, 5)]:
        with pytest.raises(ValueError, match="mask must"):
            masked_attention(q, k, k, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(fastgpt.BackendUnavailableError, match="masked_attention: backend='cuda' is unavailable"):
        masked_attention(q, k, k, mask, backend="cuda")  # CPU tensors (and the cuda kernels' head dims: 64, 128)
    assert masked_attention(q, k[:, :, :0], k[:, :, :0], torch.ones(2, 1, 3, 0, dtype=torch.bool)).eq(0).all()


# ----------------------------------------------------------------------------- TMA loads (sm_90+)


@pytest.mark.parametrize("Sq,Sk,Hq,Hkv,D,causal", [(17, 17, 2, 2, 32, True), (33, 17, 2, 1, 32, True),
                                                   (17, 40, 4, 2, 64, True), (1, 40, 4, 2, 64, False),
                                                   (40, 23, 2, 2, 80, False), (50, 50, 2, 1, 16, True)])
def test_tma_loads(device, Sq, Sk, Hq, Hkv, D, causal):
    """The TMA path (descriptor loads zero-filled past the sequence and the head dim, descriptor
    stores clipped) forced on: fresh tensors and (B, S, H, D) layouts seen as (B, H, S, D)."""
    from fastgpt.kernels.attention import attention as triton_attention

    q, k, v = _qkv(2, Hq, Hkv, Sq, Sk, D, torch.float32, device, seed=Sq * Sk)
    out = triton_attention(q, k, v, causal=causal, scale=D**-0.5, tma=True)
    assert_close(out, _reference(q, k, v, causal, None))
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    res = triton_attention(*views, causal=causal, scale=D**-0.5, tma=True, return_lse=True)
    assert_close(res.out, out)
    assert_close(res.lse, triton_attention(q, k, v, causal=causal, scale=D**-0.5, tma=False, return_lse=True).lse)


def test_tma_loads_under_a_mask(device):
    from fastgpt.kernels.attention import attention as triton_attention

    q, k, v = _qkv(3, 4, 1, 9, 30, 64, torch.float16, device, seed=4)
    mask = _padding_mask([30, 25, 3], 9, 30, device)
    out = triton_attention(q, k, v, causal=False, scale=0.125, mask=mask.expand(3, 4, 9, 30), tma=True)
    assert_close(out, masked_attention(q.float(), k.float(), v.float(), mask, scale=0.125, backend="torch"),
                 dtype=torch.float16)


def test_tma_mode(monkeypatch):
    """Which loads the autotuner may use: TMA too (AUTO) only for fp16/bf16 on an sm_90+ GPU that
    has not failed them, with 16-byte aligned tensors; forced TMA refuses what it cannot run."""
    from types import SimpleNamespace

    from fastgpt.kernels import attention as mod

    def tensor(ptr=4096, strides=(8192, 1024, 64, 1), dtype=torch.bfloat16):
        return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, data_ptr=lambda: ptr,
                               stride=lambda: strides, element_size=lambda: dtype.itemsize)

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])
    monkeypatch.setattr(mod, "_TMA_FAILED", set())
    t = tensor()
    assert mod._tma_mode(None, t, t) == mod.TMA_AUTO and mod._tma_mode(True, t, t) == mod.TMA_ONLY
    assert mod._tma_mode(False, t, t) == mod.TMA_OFF
    for odd in (tensor(ptr=4104), tensor(strides=(8192, 1024, 36, 1)), tensor(strides=(8192, 0, 64, 1)),
                tensor(dtype=torch.float32)):
        assert mod._tma_mode(None, odd, odd) == mod.TMA_OFF
    with pytest.raises(ValueError, match="16-byte aligned"):
        mod._tma_mode(True, t, tensor(ptr=4104))
    mod._TMA_FAILED.add(0)
    assert mod._tma_mode(None, t, t) == mod.TMA_OFF
    capability[0] = (8, 0)
    mod._TMA_FAILED.clear()
    assert mod._tma_mode(None, t, t) == mod.TMA_OFF
    with pytest.raises(ValueError, match="sm_90"):
        mod._tma_mode(True, t, t)


def test_tma_failure_falls_back_to_pointer_loads(device, monkeypatch):
    """An autotuned launch with TMA candidates that fails on the host, where the same call with
    pointer loads works, is redone with those, warns, and marks the GPU; a failure the pointer
    loads share is raised as it is, and so is a failure with TMA forced. (The autotuner is
    stubbed: on CPU tensors the launcher never tunes.)"""
    from fastgpt.kernels import attention as mod

    tma_values, broken = [], {"tma": {mod.TMA_AUTO}}

    class Tuned:  # the autotuner's launch: the interpreter's fixed config
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tma_values.append(args[-1])
                if args[-1] in broken["tma"]:
                    raise RuntimeError("launch refused")
                block_m, block_n, warps, stages = mod._INTERPRETER_CONFIG
                self.best_config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": False},
                                                 num_warps=warps, num_stages=stages)
                mod._attn_fwd_kernel[grid({"BLOCK_M": block_m})](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                                                 USE_TMA=False, num_warps=warps, num_stages=stages)
            return launch

    monkeypatch.setattr(mod, "_attn_fwd_tuned", Tuned())
    monkeypatch.setattr(mod, "_use_autotuner", lambda q, Sq, Sk: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(mod, "_tma_mode", lambda tma, *t: mod.TMA_ONLY if tma else mod.TMA_AUTO)
    monkeypatch.setattr(mod, "_descriptors", lambda tma, block_d, *t: (None,) * len(t))
    monkeypatch.setattr(mod, "_TMA_FAILED", set())
    monkeypatch.setattr(mod, "_BEST", {})
    q, k, v = _qkv(1, 2, 2, 20, 20, 32, torch.float32, device)
    with pytest.warns(UserWarning, match="TMA candidates failed"):
        out = mod.attention(q, k, v, causal=True, scale=0.2)
    assert_close(out, _reference(q, k, v, True, 0.2))
    assert tma_values == [mod.TMA_AUTO, mod.TMA_OFF] and mod._TMA_FAILED == {q.device.index}
    broken["tma"] = {mod.TMA_AUTO, mod.TMA_OFF}  # pointer loads fail too: not TMA's fault
    mod._TMA_FAILED.clear()
    mod._BEST.clear()
    with pytest.raises(RuntimeError, match="launch refused"):
        mod.attention(q, k, v, causal=True, scale=0.2)
    assert not mod._TMA_FAILED
    broken["tma"] = {mod.TMA_ONLY}
    with pytest.raises(RuntimeError, match="launch refused"):
        mod.attention(q, k, v, causal=True, scale=0.2, tma=True)
    assert not mod._TMA_FAILED


def test_tuned_key_launches_directly_after(device, monkeypatch):
    """The autotuner runs once per key; later calls launch its choice straight (no autotuner, no
    descriptors for a pointer config), with the same results. (The autotuner is stubbed: on
    CPU tensors the launcher never tunes.)"""
    from fastgpt.kernels import attention as mod

    tuner_calls, direct, kernel = [], [], mod._attn_fwd_kernel

    class Tuned:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tuner_calls.append(args[-1])
                self.best_config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "USE_TMA": False}, num_warps=4,
                                                 num_stages=1)
                kernel[grid({"BLOCK_M": 32})](*args, **meta, BLOCK_M=32, BLOCK_N=16, USE_TMA=False, num_warps=4,
                                              num_stages=1)
            return launch

    class Direct:  # records the direct launches' configs and descriptors
        def __getitem__(self, grid):
            def launch(*args, **meta):
                direct.append((meta["BLOCK_M"], meta["BLOCK_N"], args[6:10]))
                return kernel[grid](*args, **meta)
            return launch

    monkeypatch.setattr(mod, "_attn_fwd_tuned", Tuned())
    monkeypatch.setattr(mod, "_attn_fwd_kernel", Direct())
    monkeypatch.setattr(mod, "_use_autotuner", lambda q, Sq, Sk: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(mod, "_BEST", {})
    q, k, v = _qkv(2, 2, 1, 40, 40, 16, torch.float32, device)
    for _ in range(3):
        assert_close(mod.attention(q, k, v, causal=True, scale=0.3), _reference(q, k, v, True, 0.3))
    assert len(tuner_calls) == 1 and list(mod._BEST.values()) == [(32, 16, 4, 1, False)]
    # the tuning call's own direct launch (compiling its kernel), then one per later call
    assert [(m, n) for m, n, _ in direct] == [(32, 16)] * 3 and all(d == (None,) * 4 for *_, d in direct)


def test_tma_refuses_unaligned_views(device):
    """TMA needs 16-byte aligned strides: a forced call on rows of 17 fp32 (68 bytes) says so;
    the default (tma=None) takes the pointer path for them."""
    from fastgpt.kernels.attention import attention as triton_attention

    q, k, v = (t[..., :17] for t in _qkv(1, 2, 2, 20, 20, 18, torch.float32, device))
    with pytest.raises(ValueError, match="16-byte aligned"):
        triton_attention(q, k, v, causal=True, scale=0.2, tma=True)
    assert_close(triton_attention(q, k, v, causal=True, scale=0.2), _reference(q, k, v, True, 0.2))


def _views(buf, S, D, stride, count):
    """`count` (1, 1, S, D) views into buf, side by side in rows of `stride`, filled at random."""
    views = [buf[i * D:].as_strided((1, 1, S, D), (0, 0, stride, 1)) for i in range(count)]
    for t, src in zip(views, _qkv(1, 1, 1, S, S, D, torch.float16, buf.device, seed=S)):
        t.copy_(src)
    return views


def check_large_offsets(device):
    """Views into a buffer of 2^31 fp16 elements (its pages stay untouched). First q, k and v with
    row stride 2^23 + 64: the offsets of the 257th query and key pass 2^31 (int32 offsets would
    wrap and read outside). Then k and v with 9 rows of stride 2^28 + 32, so that rows within
    one key block pass 2^31: the launcher copies such views."""
    try:
        buf = torch.empty(2**31 + 2**16, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer: {e}")
    q, k, v = _views(buf, 257, 16, 2**23 + 64, 3)
    for causal in (False, True):
        _check(q, k, v, causal=causal)
    k, v = _views(buf, 9, 16, 2**28 + 32, 2)
    _check(q[:, :, :9], k, v, causal=True)


def test_large_offsets(device):
    """Offsets past 2^31 elements. On the CPU in a subprocess: a wrapped offset crashes the
    interpreter (it reads raw memory), which must not take the test session with it."""
    if device == "cuda":
        check_large_offsets(device)
    else:
        run_isolated("tests.test_attention.check_large_offsets('cpu')")


def test_autotune_candidates():
    """The GPU path's pruning keeps exactly the table for the head dim and dtype (short queries:
    only the smallest BLOCK_M): by pointers without descriptors when TMA is off, by pointers plus
    TMA for the leading entries when the autotuner may choose, by TMA only when forced. Every
    table entry is among the autotuner's configs, and the fixed config for short sequences comes
    from the table. The pruning reads only the tensors' dtypes and arguments in the autotuning
    key (a KeyError otherwise), so the config tuned for a key does not depend on which shape of
    that key came first."""
    from fastgpt.kernels import attention as mod

    assert set(mod._attn_fwd_tuned.keys) == {"HEAD_DIM", "IS_CAUSAL", "HAS_MASK", "seq_bucket", "short_q", "tma"}
    # the launcher's copy of huge-stride K/V views relies on this bound
    assert max(c.kwargs["BLOCK_N"] for c in mod._CONFIGS) <= mod._MAX_BLOCK_N
    assert mod._INTERPRETER_CONFIG[1] <= mod._MAX_BLOCK_N

    def kept(block_d, dtype, Sq, tma=mod.TMA_OFF):
        q = torch.empty(1, dtype=dtype)
        short_q = mod._short_q(Sq, block_d, dtype == torch.float32)
        configs = mod._prune_configs(mod._CONFIGS, {"q_ptr": q, "short_q": short_q, "tma": tma}, BLOCK_D=block_d)
        assert all((c.pre_hook is None) == (tma == mod.TMA_OFF) for c in configs)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["USE_TMA"])
                for c in configs}

    for block_d in (16, 32, 64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            table = mod._table(block_d, dtype == torch.float32)
            assert kept(block_d, dtype, 4096) == {(*c, False) for c in table}
            assert kept(block_d, dtype, 4096, mod.TMA_AUTO) == (
                {(*c, False) for c in table} | {(*c, True) for c in table[:mod._TMA_CANDIDATES]})
            assert kept(block_d, dtype, 4096, mod.TMA_ONLY) == {(*c, True) for c in table}
            smallest = min(m for m, *_ in table)
            assert kept(block_d, dtype, 1) == {(*c, False) for c in table if c[0] == smallest}
            assert mod._fixed_config(block_d, dtype == torch.float32) in table
            assert kept(block_d, dtype, smallest) == kept(block_d, dtype, 1)
            assert kept(block_d, dtype, smallest + 1) == {(*c, False) for c in table}


def test_no_autotuning_during_graph_capture(monkeypatch):
    """Autotuning syncs the host: a key first met while a CUDA graph is being captured takes the
    fixed config (with a warning) instead of failing the capture; a key tuned before is reused."""
    from fastgpt.kernels import attention as mod

    monkeypatch.setattr(mod, "_BEST", {})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    tuned, fresh = (64, True, 1024, 0, torch.bfloat16, False), (64, True, 2048, 0, torch.bfloat16, False)
    assert mod._autotune(tuned)  # outside a capture: tune (the launcher remembers it once it ran)
    mod._BEST[tuned] = (64, 64, 4, 3, False)
    capturing[0] = True
    assert mod._autotune(tuned)  # already tuned: its config, no timing
    with pytest.warns(UserWarning, match="CUDA graph capture"):
        assert not mod._autotune(fresh)
    assert fresh not in mod._BEST


# ----------------------------------------------------------------------------- compile for the GPU


def compile_attention_variants(arch):
    """The first tuned config of a few (dtype, head dim, causal, mask, TMA) variants; asserts they
    fit. TMA variants (sm_90 only) must issue TMA copies."""
    mod = load_kernel_module("attention")
    variants = [("fp16", 64, True, False, False), ("bf16", 80, False, False, False), ("bf16", 256, True, False, False),
                ("fp32", 128, True, False, False), ("bf16", 64, False, True, False), ("fp16", 128, True, True, False)]
    if arch == 90:
        variants += [("bf16", 64, True, False, True), ("fp16", 128, False, False, True), ("bf16", 80, True, True, True)]
    for dtype, D, causal, has_mask, use_tma in variants:
        block_d = max(16, 1 << (D - 1).bit_length())
        block_m, block_n, warps, stages = mod._table(block_d, dtype == "fp32")[0]
        kernel = compile_variant(mod, arch, dtype, D, block_d, (block_m, block_n, warps, stages),
                                 causal=causal, has_mask=has_mask, use_tma=use_tma, write_lse=True)
        assert kernel.metadata.shared <= SMEM_LIMIT[arch], (arch, dtype, D, kernel.metadata.shared)
        if arch == 90 and dtype != "fp32":
            assert "wgmma" in kernel.asm["ptx"], (dtype, D)
        assert ("cp.async.bulk.tensor" in kernel.asm["ptx"]) == use_tma, (dtype, D, use_tma)
    if arch == 80:  # the fixed configs launch without an autotuner to skip what does not fit
        for dtype, block_d in [(d, b) for d in ("bf16", "fp32") for b in (64, 128, 256)]:
            config = mod._fixed_config(block_d, dtype == "fp32")
            kernel = compile_variant(mod, 80, dtype, block_d, block_d, config, causal=True, has_mask=False,
                                     use_tma=False, write_lse=False)
            assert kernel.metadata.shared <= SMEM_LIMIT_SM86, (dtype, block_d, kernel.metadata.shared)


def compile_variant(mod, arch, dtype, D, block_d, config, *, causal, has_mask, use_tma, write_lse):
    """_attn_fwd_kernel lowered for sm_<arch> with one (BLOCK_M, BLOCK_N, warps, stages) config."""
    block_m, block_n, warps, stages = config
    ptrs = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")} | {"lse_ptr": "*fp32", "mask_ptr": "*u8"}
    const = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=causal,
                 HAS_MASK=has_mask, WRITE_LSE=write_lse, USE_TMA=use_tma,
                 DOT_PRECISION=mod._FP32_DOT_PRECISION if dtype == "fp32" else "tf32")
    descs = {"desc_q": block_m, "desc_o": block_m, "desc_k": block_n, "desc_v": block_n}
    if use_tma:
        ptrs |= {name: f"tensordesc<{dtype}[1, 1, {rows}, {block_d}]>" for name, rows in descs.items()}
    else:
        const |= dict.fromkeys(descs)  # None: no descriptors
    return compile_for(mod._attn_fwd_kernel, ptrs, const, arch=arch, num_warps=warps, num_stages=stages)


def test_compiles_for_gpu():
    """The kernel lowers to sm_80 and sm_90 cubins within shared memory; Hopper gets wgmma; the
    fixed (untuned) configs also fit an sm_86/sm_89 block."""
    run_compile_check("tests.test_attention.compile_attention_variants")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Hq,Hkv,Sq,Sk,D,causal,dtype",
    [
        (16, 12, 12, 1024, 1024, 64, True, torch.bfloat16),  # GPT-2 124M prefill
        (16, 12, 12, 1024, 1024, 64, False, torch.float16),
        (4, 16, 16, 4096, 4096, 128, True, torch.bfloat16),
        (2, 32, 8, 2048, 2048, 128, True, torch.float16),  # GQA
        (3, 8, 1, 1000, 3001, 64, True, torch.bfloat16),  # MQA, a chunk of queries after a cached prefix
        (2, 8, 8, 3001, 1000, 64, True, torch.bfloat16),  # the first 2001 queries see no key
        (2, 8, 2, 777, 777, 80, False, torch.bfloat16),
        (1, 4, 4, 1500, 1500, 256, True, torch.float16),
    ],
)
def test_gpu_real_sizes(B, Hq, Hkv, Sq, Sk, D, causal, dtype):
    """Each new (head dim, causal, dtype, length bucket) autotunes first: a few seconds per case."""
    _check(*_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda"), causal=causal)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(monkeypatch):
    """A shape autotuned before the capture replays with its tuned config; a long shape first met
    inside the capture warns and runs the fixed config instead of autotuning (which would sync).
    The tuned choices start empty: another test in this process may have tuned the long shape."""
    from fastgpt.kernels import attention as mod

    monkeypatch.setattr(mod, "_BEST", {})
    q, k, v = _qkv(2, 4, 2, 300, 300, 64, torch.bfloat16, "cuda")
    fastgpt.attention(q, k, v, causal=True, backend="triton")  # autotunes outside the capture
    q2, k2, v2 = _qkv(1, 4, 4, 2, 700, 128, torch.float16, "cuda", seed=1)  # Sq 2: the prefill kernel
    short = (t[:, :, :200] for t in (k2, v2))
    fastgpt.attention(q2, *short, causal=True, backend="triton")  # compiles the fixed config only
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(UserWarning, match="CUDA graph capture"), torch.cuda.graph(graph):
        out = fastgpt.attention(q, k, v, causal=True, backend="triton")
        out2 = fastgpt.attention(q2, k2, v2, causal=True, backend="triton")
    for t in (q, q2):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _reference(q, k, v, True, None), dtype=torch.bfloat16)
    assert_close(out2, _reference(q2, k2, v2, True, None), dtype=torch.float16)


@pytest.mark.gpu
def test_gpu_fp32_and_views():
    B, Hq, Hkv, S, D = 2, 8, 4, 515, 64
    gen = torch.Generator().manual_seed(5)
    q = _randn((B, S, Hq, D), torch.float32, "cuda", gen).transpose(1, 2)
    k = _randn((B, S, Hkv, D), torch.float32, "cuda", gen).transpose(1, 2)
    v = _randn((B, S, Hkv, D), torch.float32, "cuda", gen).transpose(1, 2)
    _check(q, k, v, causal=True)
    _check(q.contiguous(), k.contiguous(), v.contiguous(), causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Sk", [(1024, 1024), (1, 4000), (300, 2048)])
def test_gpu_masked_padding(Sq, Sk):
    """transformers' padded batches on the GPU: bf16 and fp16, GQA, the mask read per tile."""
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = _qkv(4, 8, 2, Sq, Sk, 64, dtype, "cuda")
        _check_masked(q, k, v, _padding_mask([Sk, Sk - 100, Sk // 2, 7], Sq, Sk, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal", [(16, 12, 12, 1024, 1024, 64, True),
                                                     (3, 8, 1, 1000, 3001, 80, True)])
def test_gpu_tma_real_sizes(B, Hq, Hkv, Sq, Sk, D, causal):
    """The TMA path alone (autotuned over its configs) at real sizes, on sm_90+."""
    from fastgpt.kernels.attention import attention as triton_attention

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs an sm_90+ GPU")
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, "cuda")
    out = triton_attention(q, k, v, causal=causal, scale=D**-0.5, tma=True)
    assert_close(out, _reference(q, k, v, causal, None), dtype=torch.bfloat16)
