"""Bad input raises a clear error naming the argument, before any kernel runs."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgpt
from fastgpt import _backends
from fastgpt.ops.decode import decode_step_attention


def qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=5, D=16, dtype=torch.float32):
    return torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k must have dtype"),
        (lambda q, k, v: (q, k, v.half()), TypeError, "v has dtype"),
        (lambda q, k, v: (q, k[:, :, :3], v), ValueError, r"v must have shape \(B, Hkv, Sk, D\)"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, r"k must have shape \(B, Hkv, Sk, D\)"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of k/v's"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must have dtype"),
        (lambda q, k, v: (q, "k", v), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_attention_rejects(mutate, error, match):
    with pytest.raises(error, match=match):
        fastgpt.attention(*mutate(*qkv()))


def test_attention_rejects_bad_scale_and_causal():
    with pytest.raises(ValueError, match="scale must be finite"):
        fastgpt.attention(*qkv(), scale=float("nan"))
    with pytest.raises(ValueError, match=r"scale must be at most 2.36e\+38 in magnitude"):
        fastgpt.attention(*qkv(), scale=-3e38)
    with pytest.raises(TypeError, match="causal must be a Python bool, got 1 of type builtins.int"):
        fastgpt.attention(*qkv(), causal=1)
    with pytest.raises(TypeError, match="of type numpy.bool"):
        fastgpt.attention(*qkv(), causal=np.bool_(True))


def test_decode_rejects():
    q = torch.randn(2, 4, 1, 16)
    kc, vc = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"at least B \* Hq \* Sq = 16"):
        decode_step_attention(torch.randn(2, 4, 2, 16), kc, vc, lens, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        fastgpt.decode_attention(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(B,\)"):
        fastgpt.decode_attention(q, kc, vc, lens[:1])
    with pytest.raises(ValueError, match=r"v_cache must have shape \(B, Hkv, Smax, D\)"):
        fastgpt.decode_attention(q, kc, vc[:, :, :4], lens)


def test_layer_norm_rejects():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(N,\)"):
        fastgpt.layer_norm(x, torch.ones(7), None)
    with pytest.raises(ValueError, match="residual must have shape"):
        fastgpt.layer_norm(x, None, None, residual=torch.randn(3, 9))
    with pytest.raises(TypeError, match="residual has dtype"):
        fastgpt.layer_norm(x, None, None, residual=torch.randn(3, 8).half())
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        fastgpt.layer_norm(x, None, None, eps=-1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        fastgpt.layer_norm(torch.tensor(1.0), None, None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, ValueError, "top_k must be >= 0"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"min_p": 2.0}, ValueError, r"min_p must be in \[0, 1\]"),
        ({"top_p": torch.tensor([0.5, 0.0, 0.9])}, ValueError, "top_p must be in"),
        ({"top_k": torch.tensor([1, 2])}, ValueError, r"top_k must be a number or a tensor of shape \(B,\)"),
        ({"top_k": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "top_k must be an integer tensor"),
        ({"generator": 5}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_sample_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastgpt.sample(torch.randn(3, 10), **kwargs)


def test_filter_logits_rejects_zero_temperature_and_empty_vocab():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastgpt.filter_logits(torch.randn(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="V >= 1"):
        fastgpt.sample(torch.randn(2, 0))


def test_empty_batch_gives_empty_results():
    assert fastgpt.sample(torch.randn(0, 10)).shape == (0,)
    q, k, v = qkv(B=0)
    assert fastgpt.attention(q, k, v).shape == (0, 4, 5, 16)
    y, h = fastgpt.layer_norm(torch.randn(0, 8), None, None, residual=torch.randn(0, 8))
    assert y.shape == h.shape == (0, 8)


def test_zero_keys_give_zero_output():
    q, k, v = qkv(Sk=0)
    assert torch.equal(fastgpt.attention(q, k, v), torch.zeros_like(q))


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastgpt.attention(*qkv(), backend="tpu")
    with pytest.raises(fastgpt.BackendUnavailableError, match="cuda backend needs CUDA tensors|not built"):
        fastgpt.attention(*qkv(), backend="cuda")
    with pytest.raises(fastgpt.BackendUnavailableError, match="cuda"):
        fastgpt.sample(torch.randn(2, 5), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Triton decides at import whether its own library functions (tl.cdiv, ...) run in the
    # interpreter: import it with the interpreter on, or later interpreted kernels break.
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastgpt.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fastgpt.layer_norm(torch.randn(2, 8), None, None, backend="triton")


def test_triton_refuses_rocm(monkeypatch):
    """ROCm's torch names its devices "cuda": the Triton kernels (PTX inside) are refused there by
    name, and auto takes the reference."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    gpu = torch.device("cuda")
    assert "ROCm" in _backends.why_not("triton", gpu) and "backend='torch'" in _backends.why_not("triton", gpu)
    with pytest.raises(fastgpt.BackendUnavailableError, match="written for NVIDIA GPUs"):
        _backends.resolve("layer_norm", "triton", gpu)
    assert _backends.resolve("layer_norm", "auto", gpu, preference=("triton",)) == "torch"
    assert not _backends.runs_on_triton("linear", "auto", gpu)


def test_triton_refuses_lengths_near_int32():
    """Lengths past 2^30 (expanded views: no memory) are refused for the triton backend before a
    kernel runs: its blocked loops count in 32 bits, and a length within a block of 2^31 wraps
    the last step to a negative index that passes the length masks (a hang, or loads and stores
    before the tensor; an expanded k of 2^31 - 1 keys, or 4 GB of fp16 logits on one row)."""
    pytest.importorskip("triton")
    from fastgpt.ops.linear import linear

    long = 2**31 - 1
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Sq=1, Sk=1, D=16)
    k_long, v_long = k.expand(1, 1, long, 16), v.expand(1, 1, long, 16)
    seqlens = torch.full((1,), long, dtype=torch.int32)
    calls = {
        "sequence lengths": [lambda: fastgpt.attention(q, k_long, v_long, backend="triton"),
                             lambda: fastgpt.attention(q.expand(1, 1, long, 16), k, v, backend="triton"),
                             lambda: fastgpt.decode_attention(q, k_long, v_long, seqlens, backend="triton")],
        "vocab sizes": [lambda: fastgpt.sample(torch.randn(1, 1).expand(1, long), backend="triton")],
        "rows of N": [lambda: fastgpt.layer_norm(torch.randn(1, 1).expand(1, long), None, None, backend="triton")],
        "N and K": [lambda: linear(torch.randn(1, 1).expand(1, long), torch.randn(1, 1).expand(8, long),
                                   backend="triton"),
                    lambda: linear(torch.randn(1, 8), torch.randn(1, 1).expand(2**30 + 1, 8), backend="triton")],
    }
    for what, fns in calls.items():
        for fn in fns:
            with pytest.raises(fastgpt.BackendUnavailableError, match=f"triton kernels support {what} <= 2\\^30"):
                fn()


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "cuda")
    with pytest.raises(fastgpt.BackendUnavailableError):
        fastgpt.layer_norm(torch.randn(2, 8), None, None)
    monkeypatch.setenv("FASTGPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTGPT_BACKEND must be one of"):
        fastgpt.layer_norm(torch.randn(2, 8), None, None)
    monkeypatch.setenv("FASTGPT_BACKEND", "torch")
    assert fastgpt.layer_norm(torch.randn(2, 8), None, None).shape == (2, 8)


def test_auto_on_cpu_is_torch():
    assert _backends.resolve("attention", "auto", torch.device("cpu")) == "torch"


def test_the_orders_follow_the_measurements():
    """auto's orders (measured on an H200): decode by graph or eager call and cache size,
    sampling by batch and top-k bound, attention by work."""
    triton, cuda = _backends.TRITON_FIRST, _backends.CUDA_FIRST
    mib = 1 << 20
    assert _backends.decode_preference(1, 3 * mib, graphed=True) == triton  # a decode step in a graph
    assert _backends.decode_preference(1, 3 * mib, graphed=False) == cuda  # one eager call: host time
    assert _backends.decode_preference(1, 201 * mib, graphed=False) == triton
    assert _backends.decode_preference(4, 3 * mib, graphed=False) == triton  # several queries a row
    assert _backends.sample_preference(1) == triton
    assert _backends.sample_preference(32) == cuda
    assert _backends.sample_preference(256, top_k_bound=50) == triton  # the candidate path
    assert _backends.sample_preference(256, top_k_bound=_backends.SAMPLE_CANDIDATE_MAX_K) == cuda
    assert _backends.attention_preference(4 * 1 * 12 * 32 * 32 * 64 / 2) == cuda  # a short prompt
    assert _backends.attention_preference(4 * 16 * 12 * 1024 * 1024 * 64 / 2) == triton
    assert _backends.attention_preference(4 * 4 * 12 * 4096 * 4096 * 64 / 2) == triton


def test_auto_follows_the_measured_order(monkeypatch):
    """Each op hands resolve its order of preference, and resolve takes the first backend that
    can run the inputs."""
    cuda = torch.device("cuda")
    if _backends.why_not("cuda", cuda) or _backends.why_not("triton", cuda):
        pytest.skip("needs both compiled backends installed (no GPU needed)")
    assert _backends.resolve("layer_norm", "auto", cuda, preference=_backends.TRITON_FIRST) == "triton"
    no_triton = lambda name: "no" if name == "triton" else None  # noqa: E731
    assert _backends.resolve("sample", "auto", cuda, no_triton, _backends.TRITON_FIRST) == "cuda"

    seen = {}
    real = _backends.resolve

    def spy(op, backend, device, unsupported=lambda name: None, preference=("cuda", "triton")):
        seen[op] = tuple(preference)
        return real(op, backend, device, unsupported, preference)

    monkeypatch.setattr(_backends, "resolve", spy)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
    fastgpt.attention(q[:, :, :1], k, k)
    assert seen["attention"] == _backends.CUDA_FIRST  # one query, a small cache: the decode kernels' eager order
    fastgpt.attention(torch.randn(2, 4, 17, 8), k, k)
    fastgpt.decode_attention(q[:, :, :1], k, k, torch.tensor([5, 2], dtype=torch.int32))
    assert seen["decode_attention"] == _backends.CUDA_FIRST
    decode_step_attention(q[:, :, :1], k, k, torch.tensor([5, 2], dtype=torch.int32), None, graphed=True)  # captured
    fastgpt.layer_norm(torch.randn(2, 8), None, None)
    fastgpt.sample(torch.randn(3, 10), temperature=0.0)
    fastgpt.sample(torch.randn(9, 10), temperature=0.0)  # the last call of an op wins in `seen`
    assert seen == {"attention": _backends.CUDA_FIRST, "decode_attention": _backends.TRITON_FIRST,
                    "layer_norm": _backends.TRITON_FIRST, "sample": _backends.CUDA_FIRST}


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])


@settings(max_examples=150, deadline=None)
@given(
    B=st.integers(0, 3), Hq=st.integers(0, 6), Hkv=st.integers(0, 4), Sq=st.integers(0, 6), Sk=st.integers(0, 6),
    D=st.integers(1, 12), Dk=st.integers(1, 12), dq=DTYPES, dk=DTYPES, causal=st.booleans(),
)
def test_fuzz_attention_checks(B, Hq, Hkv, Sq, Sk, D, Dk, dq, dk, causal):
    """Random shapes and dtypes: either a clear error, or the reference's answer."""
    q = torch.randn(B, Hq, Sq, D).to(dq)
    k = torch.randn(B, Hkv, Sk, Dk).to(dk)
    v = torch.randn(B, Hkv, Sk, Dk).to(dk)
    valid = dq == dk and dq in (torch.float32, torch.float16, torch.bfloat16) and D == Dk and Hkv > 0 and Hq % Hkv == 0
    if not valid:
        with pytest.raises((ValueError, TypeError)):
            fastgpt.attention(q, k, v, causal=causal)
        return
    out = fastgpt.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()


@settings(max_examples=100, deadline=None)
@given(B=st.integers(0, 4), V=st.integers(0, 40), t=st.floats(-1, 3), k=st.integers(-2, 50), p=st.floats(-0.5, 1.5),
       m=st.floats(-0.5, 1.5))
def test_fuzz_sample_checks(B, V, t, k, p, m):
    logits = torch.randn(B, V)
    # temperature is checked as the fp32 the kernels take: -1e-185 is -0.0 there, greedy, as 1e-185 is
    t32 = torch.tensor(t, dtype=torch.float32).item()
    valid = V > 0 and t32 >= 0 and k >= 0 and 0 < p <= 1 and 0 <= m <= 1
    if not valid:
        with pytest.raises(ValueError):
            fastgpt.sample(logits, temperature=t, top_k=k, top_p=p, min_p=m)
        return
    ids = fastgpt.sample(logits, temperature=t, top_k=k, top_p=p, min_p=m)
    assert ids.shape == (B,) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < V)).all()


# ----------------------------------------------------------------------------- awkward input


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_dim_zero_is_rejected(backend):
    """D = 0 has no default scale (1/sqrt(0)): a clear error, not a ZeroDivisionError."""
    q, k, v = qkv(D=0)
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        fastgpt.attention(q, k, v, backend=backend)
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        fastgpt.decode_attention(q[:, :, :1], k, v, torch.full((2,), 5, dtype=torch.int32), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_and_inf_inputs_reach_the_output(backend):
    """A NaN query or an inf key poisons the outputs that read it, as softmax(q k^T) v does
    (SDPA's math backend): neither backend may turn them into zeros (the value a query with no
    visible key gets)."""
    q, k, v = qkv(Hq=2, Hkv=2)
    q[0, 0, 2] = float("nan")
    k[1, 1, 3] = float("inf")
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(torch.ones(5, 5).triu(1).bool(), -torch.inf)
    expected = scores.softmax(dim=-1) @ v
    out = fastgpt.attention(q, k, v, causal=True, backend=backend)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("call, name", [
    (lambda sp: fastgpt.attention(sp(torch.randn(2, 4, 5, 16)), *qkv()[1:]), "q"),
    (lambda sp: fastgpt.decode_attention(torch.randn(2, 4, 1, 16), *qkv()[1:], sp(torch.ones(2, dtype=torch.int32))),
     "cache_seqlens"),
    (lambda sp: fastgpt.layer_norm(torch.randn(3, 8), sp(torch.ones(8)), None), "weight"),
    (lambda sp: fastgpt.sample(sp(torch.randn(3, 8))), "logits"),
    (lambda sp: fastgpt.sample(torch.randn(3, 8), temperature=sp(torch.ones(3))), "temperature"),
    (lambda sp: fastgpt.sample(torch.randn(3, 8), top_k=sp(torch.ones(3, dtype=torch.int64))), "top_k"),
])  # fmt: skip
@pytest.mark.parametrize("kind", ["sparse", "nested", "negated"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensors_that_are_not_their_memory_are_rejected(call, name, kind, backend, monkeypatch):
    """Kernels take data pointers and strides: a sparse or nested tensor has neither, and a view
    with a lazy negation (is_neg(): the imaginary part of a conjugate) holds the values unnegated,
    which the kernels read as they are (triton drew from min_p=1.0's row as if it were -1.0)."""
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    if kind == "negated":
        with pytest.raises(ValueError, match=rf"{name} is a view with a lazy negation .* {name}.resolve_neg\(\)"):
            call(torch._neg_view)
        return
    with pytest.raises(TypeError, match=f"{name} must be a dense"):
        call(lambda t: t.to_sparse() if kind == "sparse" else torch.nested.nested_tensor([t]))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"top_k": [1, None, 2]}, TypeError, r"top_k must be an int or a list of ints.*got \[1, None, 2\]"),
    ({"temperature": ["a", "b", "c"]}, TypeError, "temperature must be a float or a list of floats"),
    ({"temperature": [1j, 1.0, 1.0]}, TypeError, "temperature must be a float or a list of floats"),
    ({"top_p": [torch.tensor(0.5)] * 3}, TypeError, r"top_p must be a float or a list of floats.*tensor of shape \(B,\)"),
    ({"temperature": 1e300}, ValueError, "temperature must be >= 0 and finite in float32"),
    ({"temperature": torch.tensor([1e300, 1.0, 1.0], dtype=torch.float64)}, ValueError, "temperature must be >= 0"),
    ({"top_k": torch.ones(3, dtype=torch.int64, device="meta")}, ValueError, r"top_k must be on the CPU or .* got meta"),
])  # fmt: skip
def test_sample_rejects_parameters_that_do_not_convert(kwargs, error, match):
    """Lists of non-numbers and values beyond float32 used to fail inside torch.tensor/torch.full
    (RuntimeError, or a message naming no argument)."""
    with pytest.raises(error, match=match):
        fastgpt.sample(torch.randn(3, 10), **kwargs)


def test_sampling_parameters_take_any_python_number():
    """A top_k beyond int64 keeps every token (as any top_k >= V does), and any numbers.Real or
    numbers.Integral (Fraction, numpy scalars) is a number."""
    from fractions import Fraction

    logits = torch.randn(3, 10)
    assert torch.equal(fastgpt.filter_logits(logits, top_k=2**63), logits)
    assert torch.equal(fastgpt.filter_logits(logits, top_k=[2**64, 0, 10]), logits)
    halved = fastgpt.filter_logits(logits, temperature=0.5, top_p=0.75)
    assert torch.equal(fastgpt.filter_logits(logits, temperature=Fraction(1, 2), top_p=Fraction(3, 4)), halved)
    assert torch.equal(fastgpt.sample(logits, temperature=0.0, top_k=2**63), logits.argmax(dim=-1))
    grad = logits.clone().requires_grad_()  # through torch's dispatcher, whose ints are int64
    assert fastgpt.sample(grad, top_k=[2**63, 1, 1], backend="triton").shape == (3,)
    for top_k in (-(2**64), [1, 2, -(10**30)]):  # below int64: refused by the range check, named
        with pytest.raises(ValueError, match="top_k must be >= 0"):
            fastgpt.filter_logits(logits, top_k=top_k)


def test_linear_rejects_a_residual_table_of_another_width():
    """The kernel reads K values of each residual row: a narrower table was read out of bounds."""
    from fastgpt.ops.linear import linear

    with pytest.raises(ValueError, match=r"residual must be a table \(R, K\) when residual_rows is given, K = x.shape\[-1\] = 8"):
        linear(torch.randn(5, 8), torch.randn(6, 8), ln=(None, None, 1e-5), residual=torch.randn(4, 7),
               x_rows=torch.tensor([0, 1]), residual_rows=torch.tensor([0, 1]), backend="torch")  # fmt: skip


def test_linear_rejects_a_kv_cache_that_overlaps_itself():
    """An expanded cache (stride 0) maps several slots to one address: the kernel's writes would race."""
    from fastgpt.ops.linear import linear

    cache = torch.zeros(2, 1, 2, 4, 2).expand(2, 2, 2, 4, 2)
    with pytest.raises(ValueError, match="kv_cache must not overlap itself"):
        linear(torch.randn(2, 12), torch.randn(12, 12), kv_cache=cache, kv_pos=torch.tensor([0, 1]), backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_with_an_empty_kv_cache_writes_nothing(backend):
    """Every slot is outside [0, S) when S == 0: the output only (the reference indexed slot -1)."""
    from fastgpt.ops.linear import linear

    x, w = torch.randn(2, 12), torch.randn(12, 12)
    out, _ = linear(x, w, kv_cache=torch.zeros(2, 2, 2, 0, 2), kv_pos=torch.tensor([0, 1]), backend=backend)
    torch.testing.assert_close(out, linear(x, w, backend=backend)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scales_past_fp32s_normal_numbers(backend, monkeypatch):
    """A scale whose scale * log2(e) is below fp32's smallest normal number is 0 to the kernels (a
    subnormal: flushed on a GPU, a float64 that failed an assertion in Triton's interpreter): the
    ops take it as 0, for attention (the prefill and the few-query kernels) and decode attention;
    up to 2.36e38 a scale is taken as it is."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for Sq in (20, 1):
        q, k, v = qkv(B=1, Hq=1, Hkv=1, Sq=Sq, Sk=20, D=4)
        for tiny in (1e-39, -1e-39, 5e-45):
            torch.testing.assert_close(fastgpt.attention(q, k, v, scale=tiny, backend=backend),
                                       fastgpt.attention(q, k, v, scale=0.0, backend=backend))  # fmt: skip
        assert fastgpt.attention(q, k, v, scale=2e38, backend=backend).shape == q.shape  # (scores overflow: NaN)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    q, kc, vc = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    torch.testing.assert_close(fastgpt.decode_attention(q, kc, vc, lens, scale=1e-39, backend=backend),
                               fastgpt.decode_attention(q, kc, vc, lens, scale=0.0, backend=backend))  # fmt: skip


def test_interpreter_refuses_bf16_dots(monkeypatch):
    """Triton's interpreter has no bf16 arithmetic: the ops whose kernels take tensor-core dots
    (attention, decode attention, the fused linear) refuse bf16 CPU tensors on the triton backend,
    saying why (their results were off by ~1e9), and auto takes the reference."""
    from fastgpt.ops.linear import linear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.bfloat16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    x, w = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    calls = [lambda b: fastgpt.attention(q, k, v, backend=b), lambda b: fastgpt.attention(q[:, :, :1], k, v, backend=b),
             lambda b: fastgpt.decode_attention(q[:, :, :1], k, v, lens, backend=b), lambda b: linear(x, w, backend=b)]
    for call in calls:
        with pytest.raises(fastgpt.BackendUnavailableError, match="no bf16 arithmetic"):
            call("triton")
        call("auto")


def test_temperature_is_checked_as_fp32():
    """A temperature is checked as the fp32 the kernels take: 1e-50 is 0 there, which
    filter_logits refuses (it divided by 0: inf and NaN scores) and sample takes as greedy."""
    logits = torch.tensor([[1.0, 0.0, 3.0]])
    for t in (1e-50, torch.tensor([1e-50], dtype=torch.float64)):
        with pytest.raises(ValueError, match="temperature must be > 0 and finite in float32"):
            fastgpt.filter_logits(logits, temperature=t)
        assert fastgpt.sample(logits, temperature=t).tolist() == [2]


def test_scale_and_eps_beyond_float64_are_named():
    """An int or Fraction past float64 raised float()'s OverflowError."""
    q, k, v = qkv()
    for scale in (10**400, Fraction(-(10**400))):
        with pytest.raises(ValueError, match="scale must be finite, got a number beyond float64's range"):
            fastgpt.attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="eps must be finite, got a number beyond float64's range"):
        fastgpt.layer_norm(torch.randn(3, 8), None, None, eps=10**400)


def test_scale_and_eps_take_any_real_number():
    """numpy scalars are numbers (np.float32 was refused as 'not a float'); a non-number is a TypeError."""
    x = torch.randn(3, 8)
    assert torch.equal(fastgpt.layer_norm(x, None, None, eps=np.float32(1e-3)), fastgpt.layer_norm(x, None, None, eps=1e-3))
    q, k, v = qkv()
    assert torch.equal(fastgpt.attention(q, k, v, scale=np.float32(0.5)), fastgpt.attention(q, k, v, scale=0.5))
    with pytest.raises(TypeError, match="eps must be a float"):
        fastgpt.layer_norm(x, None, None, eps=torch.tensor(1e-5))
