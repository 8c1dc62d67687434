"""fastgpt.GPT against transformers' GPT2LMHeadModel: same weights, same logits (CPU, fp32)."""

import pytest
import torch

import fastgpt
from fastgpt.model import GPT, GPTConfig
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


# (n_embd, n_head, n_layer): head dims 16, 48, 64, 80; an odd head count.
CONFIGS = [(64, 4, 2), (96, 2, 2), (128, 2, 3), (160, 2, 2), (120, 5, 1)]


def tiny_hf(n_embd=64, n_head=4, n_layer=2, vocab_size=384, n_positions=96, seed=0, **extra):
    """A random GPT2LMHeadModel; initializer_range 0.2 spreads the logits so argmax ties are unlikely."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, initializer_range=0.2, bos_token_id=None, eos_token_id=None, **extra)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("n_embd,n_head,n_layer", CONFIGS)
def test_logits_match_hf(n_embd, n_head, n_layer):
    hf = tiny_hf(n_embd, n_head, n_layer)
    model = GPT.from_hf(hf)
    idx = torch.randint(0, hf.config.vocab_size, (3, 37))
    with torch.no_grad():
        expected = hf(idx).logits
    assert_close(model(idx), expected)


def test_full_context_and_one_token():
    hf = tiny_hf(n_positions=40)
    model = GPT.from_hf(hf)
    for T in (1, 40):
        idx = torch.randint(0, 384, (2, T))
        with torch.no_grad():
            assert_close(model(idx), hf(idx).logits)


def test_from_hf_copies_and_ties():
    hf = tiny_hf()
    model = GPT.from_hf(hf)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    # Conv1D (in, out) -> Linear (out, in)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.weight.t())
    # On the CPU every Linear weight (the tied wte too) is stored input-major: GPT.arrange_weights.
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(w.t().is_contiguous() for w in linears)
    assert model.transformer.wte.weight.t().is_contiguous()
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_eos_token_id_from_hf():
    """from_hf keeps the HF config's eos id (from_pretrained: tests/test_loading.py); GPT(config) has none."""
    hf = tiny_hf()
    assert GPT.from_hf(hf).eos_token_id is None
    for eos in (7, [7, 9]):
        hf.config.eos_token_id = eos
        model = GPT.from_hf(hf)
        assert model.eos_token_id == eos and model.to(torch.float64).eos_token_id == eos
    assert GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2)).eos_token_id is None


def test_hf_parameter_names():
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.bias",
                 "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight",
                 "lm_head.weight"):
        assert name in names


def test_exact_gelu_config():
    hf = tiny_hf(activation_function="gelu")
    idx = torch.randint(0, 384, (1, 9))
    with torch.no_grad():
        assert_close(GPT.from_hf(hf)(idx), hf(idx).logits)


def test_prompt_longer_than_context():
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("idx, error, match", [
    (torch.zeros(1, 3), TypeError, "idx must hold int64 token ids"),
    (torch.full((1, 3), 10), ValueError, "outside \\[0, vocab_size = 10\\)"),
    (torch.tensor([[-1, 0, 1]]), ValueError, "outside"),
    (torch.zeros(3, dtype=torch.long), ValueError, "idx must be a \\(B, T\\) tensor"),
])  # fmt: skip
def test_forward_checks_its_input(idx, error, match):
    """GPT.forward checks idx as generate does (it raised torch's embedding errors, or an IndexError)."""
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(error, match=match):
        model(idx)


def test_from_hf_takes_a_gpt2_lm_head_model():
    with pytest.raises(TypeError, match="from_hf takes a transformers GPT2LMHeadModel, got str"):
        GPT.from_hf("gpt2")


def test_empty_batch():
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    assert model(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 10)


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation_function="relu")


def test_backend_setter():
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    model.backend = "torch"
    assert model.backend == "torch"
    assert all(b.attn.backend == "torch" and b.ln_1.backend == "torch" for b in model.transformer.h)


def test_prefill_and_decode_match_forward():
    hf = tiny_hf(96, 2)
    model = GPT.from_hf(hf)
    from fastgpt.decoder import KVCache

    idx = torch.randint(0, 384, (2, 12))
    full = model(idx)  # (B, T, V)
    cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
    assert_close(model.prefill(idx[:, :8], cache, last=torch.tensor([7, 7])), full[:, 7])
    for t in range(8, 12):
        logits = model.decode(idx[:, t], torch.tensor([t, t]), cache)
        assert_close(logits, full[:, t])


@pytest.mark.parametrize("fused", [False, True])
def test_decode_step_launches(fused, device, monkeypatch):
    """Launch count is what a batch-1 step costs on a GPU. Unfused, each layer writes its k/v
    pair with one scatter_ into the joint (2, B, H, S, D) cache; fused, the q|k|v projection
    writes them itself and every matmul is one fastgpt.ops.linear (4 a layer, and ln_f +
    lm_head), the first reading the embeddings too (no gathers), and decode attention, over a
    cache long enough to split, merges its splits in its own launch (the cache's counters).
    Neither copies anything, and both leave the cache a fresh prefill would."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastgpt.decoder import KVCache
    from fastgpt.kernels import decode as tri_decode

    combines = []
    combine = tri_decode._decode_combine_kernel
    monkeypatch.setattr(tri_decode, "_decode_combine_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: combines.append(grid) or combine[grid]})())  # fmt: skip

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = GPT.from_hf(tiny_hf(64, 4, 3)).to(device)
    for w in model.parameters():  # the (out, in) order GPT keeps its weights in on a GPU (a CPU's is (in, out))
        w.data = w.data.contiguous()
    model.backend = "triton"  # the kernels' ops, not the reference's aten ops (the interpreter on a CPU)
    model.fused_decode = fused
    cache = KVCache(model.config, 2, 80, torch.float32, device)
    splits, _ = tri_decode.split_plan(2 * 4, 80, tri_decode._INTERPRETER_BLOCK_N, tri_decode._INTERPRETER_SMS)
    assert device != "cpu" or splits > 1
    idx, pos = torch.randint(0, 384, (2, 6), device=device), torch.tensor([5, 5], device=device)
    model.prefill(idx[:, :5], cache, last=torch.tensor([4, 4], device=device))
    seqlens = (pos + 1).int()  # kept by generate's decoder with pos: no kernel here for it
    with Ops() as ops:
        model.decode(idx[:, 5], pos, cache, seqlens)
    n_layer = model.config.n_layer
    assert "add" not in ops.names or not fused  # the fused step adds nothing outside its kernels
    assert ops.names.count("scatter_") == (0 if fused else n_layer)
    assert ops.names.count("linear") == (4 * n_layer + 1 if fused else 0)
    assert ops.names.count("embedding") == (0 if fused else 2)
    assert not {"copy_", "cat", "clone", "contiguous", "index_put_"} & set(ops.names)
    assert ops.names.count("decode_attention") == n_layer
    if device == "cpu":  # the interpreter's blocks split this cache in two (a GPU's 64-position blocks do not)
        assert len(combines) == (0 if fused else n_layer)
    fresh = KVCache(model.config, 2, 6, torch.float32, device)  # the prompt and the token in one prefill
    model.prefill(idx, fresh, last=torch.tensor([5, 5], device=device))
    assert_close(cache.kv[..., 5, :], fresh.kv[..., 5, :])  # k and v of every layer, both rows


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_fused_decode_matches_the_unfused_step(activation, device):
    """decode on fastgpt.ops.linear (fused residual + LayerNorm + matmul + GELU) against the
    step on nn.Linear and the LayerNorm op: the same logits and the same cache, step after step.
    GELU's exact form ("gelu") keeps a separate GELU after the fused c_fc."""
    from fastgpt.decoder import KVCache

    model = GPT.from_hf(tiny_hf(64, 4, 2, activation_function=activation)).to(device)
    model.backend = "triton"
    idx = torch.randint(0, 384, (3, 9), device=device)
    caches, logits = [], []
    for fused in (True, False):
        model.fused_decode = fused
        assert model._fused_decode(3, idx.device) == fused
        cache = KVCache(model.config, 3, 12, torch.float32, device)
        model.prefill(idx[:, :6], cache, last=torch.full((3,), 5, device=device))
        steps = [model.decode(idx[:, t], torch.full((3,), t, device=device), cache) for t in range(6, 9)]
        caches.append(cache.kv)
        logits.append(torch.stack(steps))
    assert_close(logits[0], logits[1])
    assert_close(caches[0], caches[1])
    assert_close(logits[0][-1], model(idx)[:, -1])  # and the full forward's last position


@pytest.mark.parametrize("T", [1, 3])
def test_fused_decode_with_the_layer_norms_apart(T, device, monkeypatch):
    """From LN_APART_MIN_ROWS rows the fused step runs ln_1 (after layer 0) and ln_2 as the
    LayerNorm op before their matmuls: the unfused step's logits and cache, step after step, with
    one token a row and with drafts (verify); 2 LayerNorm ops a layer but layer 0's one."""
    from fastgpt import model as model_module
    from fastgpt.decoder import KVCache

    model = GPT.from_hf(tiny_hf(64, 4, 2)).to(device)
    model.backend = "triton"
    B, steps = 3, 2
    idx = torch.randint(0, 384, (B, 5 + steps * T), device=device)
    monkeypatch.setattr(model_module, "LN_APART_MIN_ROWS", B * T)
    norms = []
    real_norm = fastgpt.layer_norm
    monkeypatch.setattr(fastgpt, "layer_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    caches, logits = [], []
    for fused in (True, False):
        model.fused_decode = fused
        cache = KVCache(model.config, B, 5 + steps * T, torch.float32, device)
        model.prefill(idx[:, :5], cache, last=torch.full((B,), 4, device=device))
        norms.clear()
        out = [model.verify(idx[:, p : p + T], torch.full((B,), p, device=device), cache)
               for p in range(5, 5 + steps * T, T)]  # fmt: skip
        if fused:
            assert len(norms) == steps * (2 * model.config.n_layer - 1)
        caches.append(cache.kv)
        logits.append(torch.cat(out, dim=1))
    assert_close(logits[0], logits[1])
    assert_close(caches[0], caches[1])
    assert_close(logits[0], model(idx)[:, 5:])  # and the full forward's


def test_fused_decode_only_where_the_kernel_runs(device):
    """auto on a CPU, the torch and cuda backends, and batches past the kernel's MAX_ROWS keep the
    unfused step."""
    from fastgpt.ops.linear import MAX_ROWS

    model = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2)).to(device)
    assert model._fused_decode(2, torch.device(device)) == (device == "cuda")
    model.backend = "triton"
    assert model._fused_decode(MAX_ROWS, torch.device(device)) and not model._fused_decode(MAX_ROWS + 1, torch.device(device))
    model.backend = "torch"
    assert not model._fused_decode(1, torch.device(device))
    model.backend = "cuda"
    assert not model._fused_decode(1, torch.device(device))


def test_forward_compiles_fullgraph():
    hf = tiny_hf(96, 2)
    model = GPT.from_hf(hf)
    idx = torch.randint(0, 384, (2, 11))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(idx), model(idx))
