"""attn_implementation="fastgpt" across the model families that route attention through transformers'
AttentionInterface: tiny random models (2 layers, vocab 256, fp32, CPU) give SDPA's logits and greedy
generations; models it cannot run are refused with an error that says so."""

import pytest
import torch

import fastgpt.hf
import fastgpt.nn
from tests.helpers import assert_close
from tests.test_hf import V, check_same_greedy_generations, check_same_logits, count_calls, greedy, padded_batch, pair

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """fastgpt's attention calls in this test, counted (count_calls)."""
    return count_calls(monkeypatch)


def tiny(**sizes):
    """What every config shares: initializer_range 0.2 keeps attention far from uniform; no special tokens."""
    return dict(vocab_size=V, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None, **sizes)


# Llama-style sizes: 4 query heads of dim 16, over 2 key/value heads with GQA.
MHA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
       "max_position_embeddings": 128}
GQA = {**MHA, "num_key_value_heads": 2}

# Each family with what its attention brings that Llama's does not.
FAMILIES = {
    "mistral": lambda: transformers.MistralConfig(**tiny(**GQA), sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**tiny(**GQA)),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**tiny(**GQA), head_dim=32),  # q/k RMSNorm; head dim != hidden/heads
    "phi3": lambda: transformers.Phi3Config(**tiny(**GQA)),  # fused qkv projection
    "gemma": lambda: transformers.GemmaConfig(**tiny(**GQA), head_dim=16),
    "olmo2": lambda: transformers.Olmo2Config(**tiny(**GQA)),  # q/k RMSNorm across heads
    "smollm3": lambda: transformers.SmolLM3Config(**tiny(**GQA)),  # layers without rotary embeddings
    "granite": lambda: transformers.GraniteConfig(**tiny(**GQA), attention_multiplier=0.3),  # scale != D**-0.5
    "starcoder2": lambda: transformers.Starcoder2Config(**tiny(**GQA), sliding_window=None),  # nn.LayerNorm, biases
    "stablelm": lambda: transformers.StableLmConfig(**tiny(**GQA)),  # partial rotary
    "phi": lambda: transformers.PhiConfig(**tiny(**GQA), partial_rotary_factor=0.5),  # partial rotary
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**tiny(**MHA), rotary_pct=0.25),  # partial rotary; MHA
    "gpt-j": lambda: transformers.GPTJConfig(**tiny(n_layer=2, n_embd=64, n_head=4, n_positions=128),
                                             rotary_dim=8),  # interleaved rotary
    "gpt-bigcode": lambda: transformers.GPTBigCodeConfig(**tiny(n_layer=2, n_embd=64, n_head=4, n_positions=128),
                                                         multi_query=True),  # MQA: one key/value head
    "opt": lambda: transformers.OPTConfig(**tiny(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                                 max_position_embeddings=128), init_std=0.2),  # scaling=1.0
}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits(family, tmp_path, calls):
    check_same_logits(FAMILIES[family](), tmp_path, calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_greedy_generations(family, tmp_path, calls):
    check_same_greedy_generations(FAMILIES[family](), tmp_path, calls)


# Windows of 6 keys, under the 14 tokens of padded_batch: Mistral's in every layer, Qwen2's in the
# first layer only (max_window_layers), Gemma 3's in its sliding layer, beside a full one.
SLIDING = {
    "mistral": lambda: transformers.MistralConfig(**tiny(**GQA), sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**tiny(**GQA), use_sliding_window=True, sliding_window=6,
                                              max_window_layers=1),
    "gemma3": lambda: transformers.Gemma3TextConfig(**tiny(**GQA), head_dim=16, sliding_window=6,
                                                    layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_windows(family, tmp_path, calls):
    """transformers puts a sliding window into the mask (sdpa_mask, as registered), which fastgpt applies."""
    reference, ours = pair(SLIDING[family](), tmp_path)
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa",
                                                                   sliding_window=128).eval()
    idx, mask = padded_batch()
    with torch.no_grad():
        expected = reference(idx).logits
        assert_close(ours(idx).logits, expected)
        assert calls["masked"] > 0  # a window shorter than the keys comes as a mask, padding or not
        assert (expected - unwindowed(idx).logits).abs().max() > 0.1  # and the window matters
    assert torch.equal(greedy(ours, idx, mask), greedy(reference, idx, mask))
    static = {"cache_implementation": "static"}  # sliding layers get a cache of the window's size
    assert torch.equal(greedy(ours, idx, mask, **static), greedy(reference, idx, mask, **static))


def gemma4_config():
    """Gemma 4's last two layers reuse earlier layers' keys and values (KV-shared)."""
    return transformers.Gemma4TextConfig(**tiny(**{**GQA, "num_hidden_layers": 4}), vocab_size_per_layer_input=V,
                                         hidden_size_per_layer_input=8, head_dim=16, global_head_dim=16,
                                         sliding_window=64, num_kv_shared_layers=2,
                                         layer_types=["sliding_attention", "full_attention"] * 2)


def test_gemma4_kv_shared_layers_on_the_last_queries(tmp_path, calls):
    """With a model other than SDPA, Gemma 4 runs its KV-shared layers on the logits_to_keep last queries
    only, with the mask built (None: causal) for all of them; causal must then be aligned bottom-right."""
    reference, ours = pair(gemma4_config(), tmp_path)
    idx, mask = padded_batch()
    with torch.no_grad():
        assert_close(ours(idx, logits_to_keep=4).logits, reference(idx, logits_to_keep=4).logits)
    assert calls == {"fused": 4}
    assert torch.equal(greedy(ours, idx, mask), greedy(reference, idx, mask))


def test_patch_swaps_layer_norms(tmp_path):
    """GPT-NeoX, OPT and Phi use nn.LayerNorm: patch() swaps them without changing the logits."""
    idx, mask = padded_batch()
    for family, swapped in [("gpt-neox", 2 * 2 + 1), ("opt", 2 * 2 + 1), ("phi", 2 + 1)]:
        reference, ours = pair(FAMILIES[family](), tmp_path / family)
        assert fastgpt.hf.patch(ours) == swapped
        assert not any(type(m) is torch.nn.LayerNorm for m in ours.modules())
        assert any(isinstance(m, fastgpt.nn.LayerNorm) for m in ours.modules())
        with torch.no_grad():
            assert_close(ours(idx).logits, reference(idx).logits)
        assert torch.equal(greedy(ours, idx, mask, max_new_tokens=8), greedy(reference, idx, mask, max_new_tokens=8))


# Models fastgpt cannot run: each one raises, naming what is unsupported, on its first forward.
REFUSED = {
    "gemma2-softcap": (lambda: transformers.Gemma2Config(**tiny(**GQA), head_dim=16, attn_logit_softcapping=50.0),
                       "soft-capping"),
    "gpt-oss-sinks": (lambda: transformers.GptOssConfig(**tiny(**GQA), head_dim=16, num_local_experts=2,
                                                        num_experts_per_tok=1), "attention sinks"),
    "bloom-alibi": (lambda: transformers.BloomConfig(**tiny(n_layer=2, hidden_size=64, n_head=4)),
                    "computes attention itself"),
    "mpt-alibi": (lambda: transformers.MptConfig(**tiny(n_layers=2, d_model=64, n_heads=4, max_seq_len=128)),
                  "computes attention itself"),
}


@pytest.mark.parametrize("family", REFUSED)
def test_refused(family):
    make_config, what = REFUSED[family]
    fastgpt.hf.register()
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="fastgpt").eval()
    with pytest.raises(ValueError, match=f"fastgpt.*{what}.*use attn_implementation='eager'"), torch.no_grad():
        model(torch.randint(0, V, (1, 5)))
