"""torch.compile(fullgraph=True) traces through every op (their torch.library registrations)."""

import pytest
import torch

import fastgpt
from fastgpt.ops.attention import masked_attention


def test_compile_fullgraph_through_every_op():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, lens, key_mask, x, w, b, r, logits):
        a = fastgpt.attention(q, k, v, causal=True) + masked_attention(q, k, v, key_mask)
        d = fastgpt.decode_attention(q[:, :, :1], k, v, lens)
        y, h = fastgpt.layer_norm(x, w, b, residual=r)
        y2 = fastgpt.layer_norm(h, w, None)
        ids = fastgpt.sample(logits, temperature=0.7, top_k=5, top_p=0.9)
        f = fastgpt.filter_logits(logits, top_k=3)
        return a, d, y, h, y2, ids, f

    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    lens = torch.tensor([2, 6], dtype=torch.int32)
    x, r, w, b = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32), torch.randn(32)
    logits = torch.randn(2, 50)
    key_mask = (torch.arange(6) < lens[:, None]).view(2, 1, 1, 6).expand(2, 1, 6, 6)  # padding
    a, d, y, h, y2, ids, f = step(q, k, v, lens, key_mask, x, w, b, r, logits)
    masked = masked_attention(q, k, v, key_mask)
    torch.testing.assert_close(a, fastgpt.attention(q, k, v, causal=True) + masked)
    torch.testing.assert_close(d, fastgpt.decode_attention(q[:, :, :1], k, v, lens))
    torch.testing.assert_close(y, fastgpt.layer_norm(x, w, b, residual=r)[0])
    torch.testing.assert_close(y2, fastgpt.layer_norm(x + r, w, None))
    assert ids.shape == (2,) and ((ids >= 0) & (ids < 50)).all()
    assert torch.equal(f, fastgpt.filter_logits(logits, top_k=3))


def test_ops_are_registered_with_fake_impls():
    for name in ("attention", "attention_lse", "masked_attention", "decode_attention", "decode_attention_lse",
                 "layer_norm", "add_layer_norm", "sample", "linear"):
        op = getattr(torch.ops.fastgpt, name)
        torch.library.opcheck(op.default, _example_args(name), test_utils=("test_schema", "test_faketensor"))
    table, ids = torch.randn(5, 8), torch.tensor([4, 0, 2])  # linear reading its rows from tables (embeddings)
    torch.library.opcheck(torch.ops.fastgpt.linear.default,
                          (table, torch.randn(6, 8), None, table, None, None, 1e-5, True, False, None, None, ids, ids,
                           torch.zeros(1, dtype=torch.int32), "torch"),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def _example_args(name):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    x = torch.randn(2, 8)
    B = torch.ones(2)
    return {
        "attention": (q, k, k.clone(), True, 0.3, "torch"),
        "attention_lse": (q, k, k.clone(), True, 0.3, "torch"),
        "masked_attention": (q, k, k.clone(), torch.rand(1, 1, 3, 3) > 0.5, 0.3, "torch"),
        "decode_attention": (q[:, :, :1], k, k.clone(), torch.tensor([2], dtype=torch.int32), None, 0.3, "torch",
                             False),
        "decode_attention_lse": (q[:, :, :3], k, k.clone(), torch.tensor([2], dtype=torch.int32), None, 0.3, "torch",
                                 True),  # the output token-major, as GPT's verify step asks: the fake's strides too
        "layer_norm": (x, torch.ones(8), None, 1e-5, "torch"),
        "add_layer_norm": (x, torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5, "torch"),
        "linear": (x, torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.ones(8), None, 1e-5, True, True,
                   torch.zeros(2, 2, 1, 4, 2), torch.tensor([1, 3]), None, None, None,
                   "torch"),  # writes k/v to the cache
        "sample": (torch.randn(2, 9), B, torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.float64),
                   torch.zeros(2), torch.tensor([7]), "torch", 0),
    }[name]


def test_backend_resolution_traces_for_a_cuda_device():
    """On a GPU, auto asks which compiled backends exist (imports, done once per process) and
    whether the extension's code runs on the GPU: Dynamo must trace that without a graph break.
    Only a device object is needed here (conftest.py answers the second question without a GPU)."""
    from fastgpt import _backends

    cuda = torch.device("cuda")
    expected = _backends.resolve("attention", "auto", cuda)

    @torch.compile(fullgraph=True, backend="eager")
    def pick(x):
        name = _backends.resolve("attention", "auto", cuda)
        return x + len(name) + (_backends.why_not("triton", cuda) is None) + (_backends.why_not("cuda", cuda) is None)

    torch._dynamo.reset()
    available = (_backends.why_not("triton", cuda) is None) + (_backends.why_not("cuda", cuda) is None)
    assert pick(torch.zeros(1)).item() == len(expected) + available
    torch._dynamo.reset()


def test_eager_calls_skip_the_dispatcher_unless_something_needs_it(monkeypatch):
    """Plain eager inference runs an op's implementation directly (the dispatcher costs ~30 us a
    call); autograd, tensor subclasses and dispatch modes still go through the registered op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastgpt.ops import _dispatch

    calls = []
    impl = lambda *args: calls.append("impl") or args[0] * 2
    op = lambda *args: calls.append("op") or args[0] * 3
    x = torch.ones(2)
    assert torch.equal(_dispatch.call(op, impl, x, "triton"), x * 2) and calls == ["impl"]
    calls.clear()
    with torch.no_grad():
        _dispatch.call(op, impl, x.requires_grad_(), "triton")
    _dispatch.call(op, impl, x, "triton")  # grad enabled, x requires grad: autograd must see it
    assert calls == ["impl", "op"]
    calls.clear()
    with FakeTensorMode() as mode:
        _dispatch.call(op, impl, mode.from_tensor(torch.ones(2)), "triton")
    assert calls == ["op"]
    calls.clear()
    weight = torch.nn.Parameter(torch.ones(2))  # a module's weight: plain for dispatch
    with torch.no_grad():
        _dispatch.call(op, impl, x.detach(), weight, "triton")
    _dispatch.call(op, impl, x.detach(), weight, "triton")  # grad enabled, weight requires grad
    assert calls == ["impl", "op"]

    # The registered op still refuses a backward pass, as before the shortcut.
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    out = _dispatch.call(torch.ops.fastgpt.attention, lambda *a: None, q, q, q, True, 0.3, "torch")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_eager_calls_run_with_their_gpu_current(monkeypatch):
    """Triton launches on the current device's stream, whichever GPU the tensors are on: an op
    makes the first tensor's GPU current while it runs where it is not already (no GPU here:
    stand-in tensors and torch.cuda's device context)."""
    import contextlib
    import types

    from fastgpt.ops import _dispatch

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    on_gpu = lambda index: types.SimpleNamespace(is_cuda=True, get_device=lambda: index)  # noqa: E731
    for t in (on_gpu(1), on_gpu(0), torch.ones(1), None):
        with _dispatch.on_device(t):
            pass
    assert entered == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_and_generate_on_a_gpu_that_is_not_current():
    """With cuda:0 current, the Triton and CUDA kernels and generate's CUDA graphs of a model on
    cuda:1 run there, and give what they give with cuda:1 current."""
    from tests.test_generate import V, tiny

    assert torch.cuda.current_device() == 0
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    x = torch.randn(33, 768, device="cuda:1", dtype=torch.bfloat16)
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda:1", torch.bfloat16)
    idx = torch.randint(0, V, (3, 20), device="cuda:1")
    results = []
    for current in (0, 1):
        with torch.cuda.device(current):
            results.append([fastgpt.attention(q, k, v, causal=True, backend=backend) for backend in ("triton", "cuda")]
                           + [fastgpt.layer_norm(x, None, None, backend="triton"),
                              model.generate(idx, 24), model.generate(idx, 24, prompt_lookup_num_tokens=2)])
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_compiled_graph_holds_the_registered_ops():
    """Under torch.compile the kernel backends are traced as the registered ops (not run eagerly
    by the dispatch shortcut): the graph names them, and its results are the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    from fastgpt.ops.decode import decode_step_attention

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, x, w, r, lens):
        return (fastgpt.attention(q, q, q, causal=True, backend="triton"),
                fastgpt.attention(q, q, q, backend="triton", return_lse=True).lse,
                fastgpt.decode_attention(q[:, :, :1], q, q, lens, backend="triton", return_lse=True).lse,
                fastgpt.layer_norm(x, w, None, residual=r, backend="triton"),
                fastgpt.decode_attention(q[:, :, :3], q, q, lens, backend="triton"),  # a row's 3 new tokens
                decode_step_attention(q[:, :, :3], q, q, lens, None, backend="triton", token_major=True))

    q, x, w, r = torch.randn(1, 2, 5, 16), torch.randn(3, 64), torch.randn(64), torch.randn(3, 64)
    lens = torch.tensor([4], dtype=torch.int32)
    a, lse, decode_lse, (y, _), drafts, rows = step(q, x, w, r, lens)
    code = counter.graphs[0].code
    ops = ("attention", "attention_lse", "decode_attention_lse", "add_layer_norm")
    assert all(f"torch.ops.fastgpt.{op}." in code for op in ops)
    torch.testing.assert_close(a, fastgpt.attention(q, q, q, causal=True, backend="triton"))
    torch.testing.assert_close(lse, fastgpt.attention(q, q, q, backend="triton", return_lse=True).lse)
    torch.testing.assert_close(decode_lse, fastgpt.decode_attention(q[:, :, :1], q, q, lens, backend="triton",
                                                                    return_lse=True).lse)  # fmt: skip
    torch.testing.assert_close(y, fastgpt.layer_norm(x, w, None, residual=r, backend="triton")[0])
    torch.testing.assert_close(drafts, fastgpt.decode_attention(q[:, :, :3], q, q, lens, backend="triton"))
    assert rows.transpose(1, 2).is_contiguous() and torch.equal(rows, drafts)
    torch._dynamo.reset()


def test_compile_fullgraph_through_the_cuda_backend(device, request):
    """The cuda backend's ops trace as registered ops too (on a CPU: csrc's kernels on the emulator)."""
    if device == "cpu":
        request.getfixturevalue("cuda_emulator")
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, lens, x, r, logits):
        return (fastgpt.attention(q, k, k, causal=True, backend="cuda"),
                fastgpt.decode_attention(q[:, :, :1], k, k, lens, backend="cuda"),
                fastgpt.layer_norm(x, None, None, residual=r, backend="cuda")[0],
                fastgpt.sample(logits, temperature=0.0, backend="cuda"))  # fmt: skip

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, H, 9, 64, generator=g).half().to(device) for H in (4, 2))
    lens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    x, r, logits = (torch.randn(3, n, generator=g).to(device) for n in (96, 96, 300))
    outs = step(q, k, lens, x, r, logits)
    code = counter.graphs[0].code
    assert all(f"torch.ops.fastgpt.{op}" in code for op in ("attention", "decode_attention", "add_layer_norm"))
    eager = (fastgpt.attention(q, k, k, causal=True, backend="cuda"),
             fastgpt.decode_attention(q[:, :, :1], k, k, lens, backend="cuda"),
             fastgpt.layer_norm(x, None, None, residual=r, backend="cuda")[0],
             fastgpt.sample(logits, temperature=0.0, backend="cuda"))  # fmt: skip
    for got, want in zip(outs, eager, strict=True):
        assert torch.equal(got, want)
    torch._dynamo.reset()
