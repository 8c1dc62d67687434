"""Prompt-lookup decoding in fastgpt.generate (fastgpt/speculative.py): exactly plain greedy's
tokens with fewer forwards, HF's drafts, sampling from the same distribution, every backend."""

import warnings

import pytest
import torch

from fastgpt.generate import generate, stream
from fastgpt.model import GPT, GPTConfig
from fastgpt.speculative import PromptLookup

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pair(vocab_size=384, n_embd=64, n_head=4, n_layer=2, n_positions=96, seed=0):
    """(hf, fastgpt) pair of one random GPT-2; initializer_range 0.2 keeps argmax ties unlikely."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, GPT.from_hf(hf)


def looping(vocab_size=384, n_embd=64, n_head=4, n_layer=2, n_positions=96, seed=0):
    """A random GPT-2 whose greedy text runs in repeats that switch now and then (its token
    embeddings, tied to lm_head, at half of PyTorch's N(0, 1) init): drafts are accepted and rejected."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(0.5)
    return model


def repetitive(B, T, V, seed=1):
    """Prompts that repeat a random piece, so that lookups find drafts."""
    g = torch.Generator().manual_seed(seed)
    piece = torch.randint(0, V, (B, 5), generator=g)
    return piece.repeat(1, T // 5 + 1)[:, :T]


def count_verifies(model, monkeypatch):
    calls = []
    verify = model.verify
    monkeypatch.setattr(model, "verify", lambda tok, *a: calls.append(tuple(tok.shape)) or verify(tok, *a))
    return calls


@pytest.fixture(scope="module")
def model():
    return looping()


@pytest.mark.parametrize("k,ngram", [(1, 1), (3, 2), (6, 3)])
@pytest.mark.parametrize("B", [1, 3])
def test_greedy_equals_plain_greedy_in_fewer_forwards(model, k, ngram, B, monkeypatch):
    idx = repetitive(B, 11, 384)
    plain = model.generate(idx, 40)
    calls = count_verifies(model, monkeypatch)
    drafted = model.generate(idx, 40, prompt_lookup_num_tokens=k, max_matching_ngram_size=ngram)
    assert torch.equal(drafted, plain)
    assert all(shape == (B, k + 1) for shape in calls)  # a token and k drafts a row, every step
    assert len(calls) < 39  # drafts were accepted: fewer steps than one a token after the prefill's


def test_random_prompts_and_hf():
    """Prompts with little to look up: drafts are mostly rejected, the tokens are still greedy's,
    and HF's prompt-lookup generate gives them too (its assisted decoding takes one row)."""
    hf, model = tiny_pair()
    idx = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(4))
    ours = model.generate(idx, 30, prompt_lookup_num_tokens=4)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                         pad_token_id=0, prompt_lookup_num_tokens=4)  # fmt: skip
    assert torch.equal(ours, model.generate(idx, 30))
    assert torch.equal(ours, theirs)


def test_padding_eos_and_the_context_edge(monkeypatch):
    """Left-padded rows of different lengths, eos ids that end rows at different steps (pad after),
    and a last step whose drafts reach past the context (T + max_new_tokens = n_positions)."""
    model = looping(n_positions=48)
    idx = repetitive(4, 12, 384, seed=2)
    mask = torch.ones_like(idx)
    mask[1, :5], mask[3, :11] = 0, 0
    free = model.generate(idx, 36, attention_mask=mask)
    eos = [int(free[0, 20]), int(free[2, 30])]
    for kwargs in ({}, {"eos_token_id": eos, "pad_token_id": 7}, {"eos_token_id": eos[:1]}):
        plain = model.generate(idx, 36, attention_mask=mask, **kwargs)
        for k in (2, 5):
            drafted = model.generate(idx, 36, attention_mask=mask, prompt_lookup_num_tokens=k, **kwargs)
            assert torch.equal(drafted, plain)
    assert (plain[0, 21:] == eos[0]).all()  # row 0 ends at its first eos, pad (= eos) after


def test_every_row_ending_early_trims_the_output():
    model = looping()
    idx = repetitive(2, 10, 384, seed=3)
    free = model.generate(idx, 30)
    eos = [int(free[0, 14]), int(free[1, 17])]
    plain = model.generate(idx, 30, eos_token_id=eos)
    assert plain.shape[1] < 40  # every row hit an eos
    assert torch.equal(model.generate(idx, 30, eos_token_id=eos, prompt_lookup_num_tokens=3), plain)


@pytest.mark.parametrize("T,n,k,ngram", [(1, 1, 3, 2), (2, 1, 1, 1), (12, 4, 5, 3), (20, 7, 2, 2), (9, 9, 4, 4)])
def test_drafts_are_hf_prompt_lookups(T, n, k, ngram):
    """The drafts of each row are those of transformers' PromptLookupCandidateGenerator."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    hf = PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=ngram, max_length=10**6)
    g = torch.Generator().manual_seed(T * 31 + n)
    texts = torch.randint(0, 3, (64, T + n), generator=g)  # 3 ids: lots of matches, of every n-gram size
    lookup = _bare_lookup(texts, k, ngram)
    drafts, drafted = lookup._drafts()
    for b in range(texts.shape[0]):
        candidates, _ = hf.get_candidates(texts[b: b + 1])
        expected = candidates[0, T + n:]
        assert int(drafted[b]) == expected.numel()
        assert torch.equal(drafts[b, : expected.numel()], expected)


def _bare_lookup(texts, k, ngram):
    """A PromptLookup over the given full texts (B, L), with no decoder behind it."""
    lookup = PromptLookup.__new__(PromptLookup)
    lookup.k, lookup.ngram = k, ngram
    lookup.text = torch.cat([texts, torch.full((texts.shape[0], k + 3), 99)], dim=1)  # stale tokens past the ends
    lookup.n = torch.full((texts.shape[0],), texts.shape[1])
    lookup.cols = torch.arange(k + 1)
    return lookup


def test_sampling_draws_from_the_model_distribution():
    """Prompt lookup with sampling emits each token as a draw given the tokens before it: the
    joint distribution of 3 new tokens (V = 4: 64 outcomes) over 6000 rows is the model's, as plain
    sampling's is. A lookup that accepted a draft without its verification skews it."""
    V, B = 4, 6000
    _, model = tiny_pair(vocab_size=V, n_embd=32, n_head=2, n_layer=1, n_positions=32, seed=5)
    prompt = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    exact = _joint(model, prompt, 3)  # (V,) * 3
    idx = prompt.expand(B, -1)
    for kwargs in ({}, {"prompt_lookup_num_tokens": 3}):
        out = model.generate(idx, 3, temperature=1.0, generator=torch.Generator().manual_seed(11), **kwargs)
        new = out[:, prompt.shape[1]:]
        counts = torch.bincount(new[:, 0] * V * V + new[:, 1] * V + new[:, 2], minlength=V**3).double()
        tv = 0.5 * (counts / B - exact.flatten()).abs().sum()
        assert tv < 0.06, (kwargs, tv)  # expected about 0.03 by chance at this size


@torch.inference_mode()
def _joint(model, prompt, n):
    """P(t1, ..., tn | prompt) from the model's logits, in float64."""
    V = model.config.vocab_size
    seqs = prompt
    probs = torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        p = torch.softmax(model(seqs)[:, -1].double(), dim=-1)  # (rows, V)
        probs = (probs[:, None] * p).flatten()
        seqs = torch.cat([seqs.repeat_interleave(V, dim=0), torch.arange(V).repeat(seqs.shape[0])[:, None]], dim=1)
    return probs.view((V,) * n)


def test_sampling_reproducible_and_top_k_1_greedy(model):
    idx = repetitive(2, 10, 384, seed=6)
    runs = [model.generate(idx, 20, temperature=0.9, top_p=0.95, prompt_lookup_num_tokens=3,
                           generator=torch.Generator().manual_seed(5)) for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])
    top1 = model.generate(idx, 20, temperature=[0.7, 1.3], top_k=1, prompt_lookup_num_tokens=3)
    assert torch.equal(top1, model.generate(idx, 20))


def test_decoder_and_lookup_reused(model):
    idx = repetitive(2, 10, 384, seed=7)
    first = model.generate(idx, 20, prompt_lookup_num_tokens=3)
    lookup = next(iter(model._decoders.values())).lookup
    again = model.generate(idx, 20, prompt_lookup_num_tokens=3)
    assert next(iter(model._decoders.values())).lookup is lookup and torch.equal(first, again)
    model.generate(idx, 20, prompt_lookup_num_tokens=2)  # another k: a new lookup on the decoder
    assert next(iter(model._decoders.values())).lookup.k == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt_lookup_num_tokens": -1}, "prompt_lookup_num_tokens must be an int >= 0"),
    ({"prompt_lookup_num_tokens": 2.0}, "prompt_lookup_num_tokens must be an int >= 0"),
    ({"prompt_lookup_num_tokens": True}, "prompt_lookup_num_tokens must be an int >= 0"),
    ({"prompt_lookup_num_tokens": 2, "max_matching_ngram_size": 0}, "max_matching_ngram_size must be an int >= 1"),
    ({"prompt_lookup_num_tokens": 2, "compile": True}, "compile does not apply to prompt lookup"),
])  # fmt: skip
def test_bad_options(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)


@pytest.mark.parametrize("eos", [None, "some", "all"])
def test_stream_yields_generates_tokens(model, eos):
    """stream yields a column once every row has it: generate's new tokens, pad after a row's eos,
    and no more columns than generate's once every row has ended."""
    idx = repetitive(3, 10, 384, seed=10)
    free = model.generate(idx, 24)
    eos_ids = {None: None, "some": [int(free[0, 15])], "all": [int(free[b, 12 + b]) for b in range(3)]}[eos]
    expected = model.generate(idx, 24, eos_token_id=eos_ids, prompt_lookup_num_tokens=4)
    columns = list(stream(model, idx, 24, eos_token_id=eos_ids, prompt_lookup_num_tokens=4))
    assert torch.equal(torch.stack(columns, dim=1), expected[:, 10:])
    assert (len(columns) < 24) == (eos == "all")


def test_zero_drafts_is_plain_generate(model, monkeypatch):
    idx = repetitive(1, 10, 384)
    calls = count_verifies(model, monkeypatch)
    assert torch.equal(generate(model, idx, 8, prompt_lookup_num_tokens=0), model.generate(idx, 8))
    assert calls == [(1, 1)] * 14  # plain decode steps only (7 a call; decode runs verify with T = 1)


def test_triton_kernels_verify_drafts():
    """On the triton backend (Triton's interpreter here) the verification's decode attention runs
    k + 1 queries a row on the split-KV kernel: plain greedy's tokens, with padding."""
    model = looping(n_embd=64, n_head=2, n_layer=1, n_positions=40)
    idx = repetitive(2, 8, 384, seed=8)
    mask = torch.ones_like(idx)
    mask[1, :3] = 0
    plain = model.generate(idx, 14, attention_mask=mask)
    model.backend = "triton"
    assert torch.equal(model.generate(idx, 14, attention_mask=mask, prompt_lookup_num_tokens=3), plain)


def test_fused_verify_equals_unfused(monkeypatch):
    """On the triton backend (Triton's interpreter here) a verification of up to 64 tokens in all
    runs the fused step: each matmul one fastgpt.ops.linear launch, c_attn writing the T tokens'
    k and v into their cache rows, decode attention merging its splits by the counters (left
    zero). The unfused step's logits and cache, past the context too."""
    from fastgpt import model as model_module
    from fastgpt.generate import KVCache

    model = looping(n_embd=64, n_head=2, n_layer=2, n_positions=16)
    model.backend = "triton"
    B, T = 2, 5
    pos = torch.tensor([3, 13])  # row 1's last drafts at positions 16 and 17: past the context
    caches = [KVCache(model.config, B, 20, torch.float32, "cpu") for _ in range(2)]
    caches[0].kv.normal_()
    caches[1].kv.copy_(caches[0].kv)
    before = caches[0].kv.clone()
    tok = torch.randint(0, 384, (B, T), generator=torch.Generator().manual_seed(12))
    counters = torch.zeros(B * 2 * T, dtype=torch.int32)
    launches = []
    linear = model_module.linear
    monkeypatch.setattr(model_module, "linear", lambda *a, **k: launches.append(1) or linear(*a, **k))
    fused = model.verify(tok, pos, caches[0], counters=counters)
    assert len(launches) == 4 * 2 + 1  # the fused step ran
    model.fused_decode = False
    unfused = model.verify(tok, pos, caches[1])
    assert len(launches) == 9
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[0].kv, caches[1].kv, atol=1e-5, rtol=1e-5)
    written = (caches[0].kv != before).any(dim=(0, 1, 3, 5))  # (B, S): the slots each row's tokens wrote
    assert written[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert written[1].nonzero().flatten().tolist() == [13, 14, 15, 16, 17]
    assert (counters == 0).all()


@pytest.mark.usefixtures("cuda_emulator")
def test_cuda_kernels_verify_drafts():
    """The same on the cuda backend (fp16, head dim 64: its prefill kernel's), csrc's kernels on the
    SIMT emulator: the tokens of its own plain decode steps."""
    model = looping(n_embd=128, n_head=2, n_layer=1, n_positions=40).half()
    model.backend = "cuda"
    idx = repetitive(2, 8, 384, seed=9)
    assert torch.equal(model.generate(idx, 12, prompt_lookup_num_tokens=3), model.generate(idx, 12))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_matches_eager(dtype):
    """The step is captured once and replayed; eager and graphed steps give the same tokens, and
    fp32 gives plain greedy's."""
    model = looping(n_embd=128, n_head=2, n_positions=512).to("cuda", dtype)
    idx = repetitive(3, 20, 384).cuda()
    mask = torch.ones_like(idx)
    mask[1, :7] = 0
    eager = model.generate(idx, 64, attention_mask=mask, prompt_lookup_num_tokens=4, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastgpt: CUDA graph capture failed")
        graphed = model.generate(idx, 64, attention_mask=mask, prompt_lookup_num_tokens=4)
        again = model.generate(idx, 64, attention_mask=mask, prompt_lookup_num_tokens=4)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert any(d.lookup is not None and d.lookup.graph is not None for d in model._decoders.values())
    if dtype == torch.float32:
        assert torch.equal(eager, model.generate(idx, 64, attention_mask=mask))
