"""The transformers drop-in: attn_implementation="fastgpt" and patch() change nothing but speed (CPU, fp32)."""

import collections

import pytest
import torch
import torch.nn.functional as F

import fastgpt
import fastgpt.hf
import fastgpt.nn
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

V = 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """fastgpt's attention calls in this test, counted (count_calls)."""
    return count_calls(monkeypatch)


def count_calls(monkeypatch):
    """Counts of the fused path (fastgpt.attention) and the masked fallback, per test."""
    counter = collections.Counter()
    fused, masked = fastgpt.attention, fastgpt.hf.masked_attention

    def count(name, fn):
        def wrapper(*args, **kwargs):
            counter[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fastgpt, "attention", count("fused", fused))
    monkeypatch.setattr(fastgpt.hf, "masked_attention", count("masked", masked))
    return counter


def gpt2_config():
    return transformers.GPT2Config(vocab_size=V, n_positions=128, n_embd=96, n_layer=2, n_head=2,  # head dim 48
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None)


def llama_config():
    return transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def pair(config, tmp_path):
    """The same random weights loaded twice: with SDPA, and with attn_implementation="fastgpt"."""
    fastgpt.hf.register()
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    reference.save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastgpt").eval()
    assert ours.config._attn_implementation == "fastgpt"
    return reference, ours


def padded_batch():
    """Prompts of 20 positions, past fastgpt.ops.attention.SPLIT_KV_MAX_QUERIES (the prefill
    kernel, not the decode one), left-padded by 0, 5 and 19."""
    torch.manual_seed(1)
    idx = torch.randint(1, V, (3, 20))
    mask = torch.ones_like(idx)
    mask[1, :5] = 0
    mask[2, :19] = 0
    idx[mask == 0] = 0
    return idx, mask


def greedy(model, idx, mask=None, max_new_tokens=32, **kwargs):
    mask = torch.ones_like(idx) if mask is None else mask
    with torch.no_grad():
        return model.generate(idx, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


def check_same_logits(config, tmp_path, calls):
    """Logits as SDPA's, unpadded (the fused kernel in both layers) and left-padded (the masked path)."""
    reference, ours = pair(config, tmp_path)
    idx, mask = padded_batch()
    with torch.no_grad():
        assert_close(ours(idx).logits, reference(idx).logits)
        assert calls == {"fused": 2}  # no padding: the fused kernel, every layer
        real = mask.bool()
        assert_close(ours(idx, attention_mask=mask).logits[real], reference(idx, attention_mask=mask).logits[real])
        assert calls == {"fused": 2, "masked": 2}  # padding: the masked fallback


def check_same_greedy_generations(config, tmp_path, calls):
    """Greedy tokens as SDPA's: one prompt, a left-padded batch, and that batch on a static cache."""
    reference, ours = pair(config, tmp_path)
    idx, mask = padded_batch()
    assert torch.equal(greedy(ours, idx[:1]), greedy(reference, idx[:1]))
    assert calls == {"fused": 2 * 32}  # prefill and decode steps, both layers
    assert torch.equal(greedy(ours, idx, mask), greedy(reference, idx, mask))
    static = {"cache_implementation": "static"}
    assert torch.equal(greedy(ours, idx, mask, **static), greedy(reference, idx, mask, **static))


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama-gqa"])
def test_same_logits(make_config, tmp_path, calls):
    check_same_logits(make_config(), tmp_path, calls)


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama-gqa"])
def test_same_greedy_generations(make_config, tmp_path, calls):
    check_same_greedy_generations(make_config(), tmp_path, calls)


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama-gqa"])
def test_padded_batches_on_the_triton_kernel(make_config, tmp_path, monkeypatch):
    """Padding masks reach the Triton kernels (their interpreter on CPU): the prefill kernel for
    the prompt, the split-KV decode kernel for each new token; the same logits on the real
    positions and the same greedy generations as SDPA."""
    from fastgpt.kernels import attention, decode

    masked_launches = collections.Counter()

    def counted(module, name):
        launch = getattr(module, name)

        def wrapper(*args, mask=None, **kwargs):
            masked_launches[name] += mask is not None
            return launch(*args, mask=mask, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(attention, "attention")
    counted(decode, "decode_attention")
    reference, _ = pair(make_config(), tmp_path)
    fastgpt.hf.register("fastgpt-triton", backend="triton")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastgpt-triton").eval()
    idx, mask = padded_batch()
    with torch.no_grad():
        real = mask.bool()
        assert_close(ours(idx, attention_mask=mask).logits[real], reference(idx, attention_mask=mask).logits[real])
    assert masked_launches == {"attention": 2}  # both layers
    assert torch.equal(greedy(ours, idx, mask, max_new_tokens=8), greedy(reference, idx, mask, max_new_tokens=8))
    assert masked_launches == {"attention": 2 + 2, "decode_attention": 2 * 7}  # the prefill, then 7 decode steps


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama-gqa"])
def test_drafted_tokens_are_verified_on_the_split_kv_kernel(make_config, tmp_path, monkeypatch):
    """transformers' prompt-lookup decoding drafts tokens from the prompt's n-grams and verifies
    several at once (a few queries a row over the cache, under the causal mask transformers
    builds): the Triton split-KV kernel takes them, and the tokens are plain greedy's."""
    from fastgpt.kernels import decode

    launches = count_decode_launches(monkeypatch, decode)
    reference, _ = pair(make_config(), tmp_path)
    fastgpt.hf.register("fastgpt-triton", backend="triton")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastgpt-triton").eval()
    check_drafts_verified(ours, reference, launches, max_new_tokens=12)


def count_decode_launches(monkeypatch, launchers) -> collections.Counter:
    """launchers.decode_attention's calls from now on, counted by (queries a row, masked)."""
    launches = collections.Counter()
    launch = launchers.decode_attention

    def counted(q, *args, mask=None, **kwargs):
        launches[q.shape[2], mask is not None] += 1
        return launch(q, *args, mask=mask, **kwargs)

    monkeypatch.setattr(launchers, "decode_attention", counted)
    return launches


def check_drafts_verified(ours, reference, launches, max_new_tokens):
    """Prompt-lookup decoding gives plain greedy's tokens, verifying drafts on the split-KV kernel."""
    idx = torch.tensor([[5, 6, 7, 8, 9] * 4])  # n-grams to draft from
    drafted = greedy(ours, idx, max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=4)
    assert torch.equal(drafted, greedy(reference, idx, max_new_tokens=max_new_tokens))
    verified = sum(n for (Sq, masked), n in launches.items() if Sq > 1 and masked)
    assert verified >= 2  # a verification (a token and its drafts), in both layers


@pytest.mark.usefixtures("cuda_emulator")
def test_padded_batches_on_the_cuda_kernels(tmp_path, monkeypatch):
    """Padding masks reach the CUDA kernels too (csrc's, on the SIMT emulator): a Llama-style GQA
    model of head dim 64 in fp16, registered with backend="cuda", gives SDPA's fp32 logits (to fp16's
    precision) on the real positions and its greedy tokens, through the masked prefill and split-KV
    decode kernels."""
    from fastgpt.ops import _cuda

    masked_launches = collections.Counter()
    for name in ("attention", "decode_attention"):
        def wrapper(*args, _launch=getattr(_cuda, name), _name=name, mask=None, **kwargs):
            masked_launches[_name] += mask is not None
            return _launch(*args, mask=mask, **kwargs)

        monkeypatch.setattr(_cuda, name, wrapper)
    reference, ours = cuda_llama_pair(tmp_path, heads=4, kv_heads=2)
    idx, mask = padded_batch()
    with torch.no_grad():
        real = mask.bool()
        expected = reference(idx, attention_mask=mask).logits[real]
        torch.testing.assert_close(ours(idx, attention_mask=mask).logits[real].float(), expected, atol=1e-2, rtol=1e-2)
    assert masked_launches == {"attention": 2}  # both layers
    assert torch.equal(greedy(ours, idx, mask, max_new_tokens=4), greedy(reference, idx, mask, max_new_tokens=4))
    assert masked_launches == {"attention": 2 + 2, "decode_attention": 2 * 3}  # the prefill, then 3 decode steps


@pytest.mark.usefixtures("cuda_emulator")
def test_drafted_tokens_are_verified_on_the_cuda_kernels(tmp_path, monkeypatch):
    """Prompt-lookup decoding on the CUDA kernels (the SIMT emulator): its verification steps, a
    token and its drafts under transformers' causal mask, run the split-KV decode kernel with
    several queries a row, and the tokens are SDPA's plain greedy ones."""
    from fastgpt.ops import _cuda

    launches = count_decode_launches(monkeypatch, _cuda)
    reference, ours = cuda_llama_pair(tmp_path, heads=2, kv_heads=1)
    check_drafts_verified(ours, reference, launches, max_new_tokens=6)


def cuda_llama_pair(tmp_path, *, heads: int, kv_heads: int):
    """A Llama-style model of head dim 64 (the CUDA kernels'): SDPA in fp32, and the drop-in
    registered with backend="cuda" in fp16."""
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64 * heads, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=128, initializer_range=0.05, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)  # fmt: skip
    reference, _ = pair(config, tmp_path)
    fastgpt.hf.register("fastgpt-cuda", backend="cuda")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastgpt-cuda",
                                                             dtype=torch.float16).eval()  # fmt: skip
    return reference, ours


def test_static_cache_prefill_gets_a_mask(tmp_path, calls):
    """sdpa_mask leaves the mask out of a prefill into an empty static cache, for SDPA's top-left causal
    alignment over the unwritten keys; fastgpt's mask builder builds it."""
    reference, ours = pair(gpt2_config(), tmp_path)
    idx = torch.randint(0, V, (2, 9))
    static = {"cache_implementation": "static"}
    assert torch.equal(greedy(ours, idx, **static), greedy(reference, idx, **static))
    assert calls == {"masked": 2 * 32}  # the prefill and every decode step, both layers


def test_mask_builder():
    """None (the fused kernel) exactly when bottom-right causal attention is right."""
    build = fastgpt.hf.make_mask_builder()
    assert build(batch_size=2, q_length=4, kv_length=4) is None
    assert build(batch_size=2, q_length=1, kv_length=6) is None  # one query sees every key
    top_left = torch.ones(4, 6, dtype=torch.bool).tril()  # a prefill of 4 into an empty cache of 6
    assert torch.equal(build(batch_size=2, q_length=4, kv_length=6), top_left.expand(2, 1, 4, 6))


def test_no_mask_is_causal_aligned_bottom_right():
    """Queries dropped after the mask was left out (Gemma 4's KV-shared layers keep the last ones)."""
    forward = fastgpt.hf.make_attention_forward(backend="torch")
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    out, _ = forward(torch.nn.Module(), q, k, k, None)
    bottom_right = torch.ones(3, 5, dtype=torch.bool).tril(5 - 3)
    assert_close(out, F.scaled_dot_product_attention(q, k, k, attn_mask=bottom_right).transpose(1, 2))


def test_patch_swaps_layer_norms(tmp_path):
    reference, ours = pair(gpt2_config(), tmp_path)
    assert fastgpt.hf.patch(ours) == 2 * 2 + 1  # ln_1, ln_2 per block, ln_f
    assert all(type(m) is not torch.nn.LayerNorm for m in ours.modules())
    assert isinstance(ours.transformer.ln_f, fastgpt.nn.LayerNorm)
    idx, mask = padded_batch()
    with torch.no_grad():
        assert_close(ours(idx).logits, reference(idx).logits)
    assert torch.equal(greedy(ours, idx, mask), greedy(reference, idx, mask))
    _, llama = pair(llama_config(), tmp_path / "llama")
    assert fastgpt.hf.patch(llama) == 0  # RMSNorm is not a LayerNorm


def test_training_with_dropout_is_refused(tmp_path):
    config = gpt2_config()
    config.attn_pdrop = 0.1
    _, ours = pair(config, tmp_path)
    ours.train()
    with pytest.raises(ValueError, match="inference"):
        ours(torch.randint(0, V, (1, 4)))


def test_output_attentions_says_there_are_none(tmp_path):
    """The weights are never formed: output_attentions=True returns none, saying so, as
    transformers' SDPA does (it returned none silently)."""
    reference, ours = pair(llama_config(), tmp_path)
    idx = torch.randint(0, V, (1, 6))
    with pytest.warns(UserWarning, match="output_attentions=True returns none"):
        out = ours(idx, output_attentions=True)
    assert not out.attentions
    assert_close(out.logits, reference(idx).logits)


@pytest.mark.parametrize("name", fastgpt.hf.UNSUPPORTED_KWARGS)
def test_unsupported_kwargs_refused(name):
    forward = fastgpt.hf.make_attention_forward()
    q = torch.randn(1, 2, 3, 8)
    forward(torch.nn.Module(), q, q, q, None, **{name: None})  # what models pass when the feature is off
    with pytest.raises(ValueError, match=f"does not support .*{name}.*'eager'"):
        forward(torch.nn.Module(), q, q, q, None, **{name: torch.zeros(1)})


def test_value_heads_of_another_width_refused():
    """Value heads narrower than the query's (DeepSeek-V3's attention): refused, saying what to use."""
    forward = fastgpt.hf.make_attention_forward(backend="torch")
    q, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="value heads as wide as query heads, got 8 and 16.*'eager'"):
        forward(torch.nn.Module(), q, q, v, None)


def test_sliding_window_without_a_mask():
    """A window over more keys than it spans needs a mask: refused without one (transformers always builds it)."""
    forward = fastgpt.hf.make_attention_forward(backend="torch")
    q = torch.randn(1, 2, 5, 8)
    out, _ = forward(torch.nn.Module(), q, q, q, None, sliding_window=5)  # the window spans every key: causal
    assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2))
    with pytest.raises(ValueError, match="sliding_window=4 over 5 keys without a mask"):
        forward(torch.nn.Module(), q, q, q, None, sliding_window=4)


@pytest.mark.parametrize("mask_heads", [1, 4])
def test_masked_attention_matches_sdpa(mask_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 16)
    k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, mask_heads, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees a key (SDPA would give NaN otherwise)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(fastgpt.hf.masked_attention(q, k, v, mask, 16**-0.5), expected)
    mask[0, :, 2] = False  # a query that sees nothing gets zeros
    out = fastgpt.hf.masked_attention(q, k, v, mask, 16**-0.5)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


def test_mask_longer_than_the_keys_is_cut():
    """transformers' SDPA path cuts a mask built for a longer cache to the keys it is given."""
    forward = fastgpt.hf.make_attention_forward(backend="torch")
    module = torch.nn.Module()
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(1, 1, 3, 9, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[..., 0] = True
    out, _ = forward(module, q, k, k, mask)
    expected = F.scaled_dot_product_attention(q, k, k, attn_mask=mask[..., :5])
    assert_close(out, expected.transpose(1, 2))


def test_masked_attention_refuses_additive_masks():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="boolean attention mask.*ALiBi.*'eager'"):
        fastgpt.hf.masked_attention(q, q, q, torch.zeros(1, 1, 3, 3), 0.5)
