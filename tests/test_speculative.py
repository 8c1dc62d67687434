"""Prompt-lookup decoding in fastgpt.generate (fastgpt/speculative.py): exactly plain greedy's
tokens with fewer forwards, HF's drafts, sampling from the same distribution, every backend."""

import types
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


@pytest.mark.parametrize("L,k,ngram", [(1, 3, 2), (2, 1, 1), (16, 5, 3), (27, 2, 2), (18, 4, 4), (300, 6, 2)])
def test_drafts_are_hf_prompt_lookups(L, k, ngram):
    """Each row's drafts are those of transformers' PromptLookupCandidateGenerator, on rows of
    1 to L tokens (stale tokens past a row's end); the Triton kernel (interpreted here) fills the
    same buffers, filler included."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    hf = PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=ngram, max_length=10**6)
    g = torch.Generator().manual_seed(L * 31 + k)
    texts = torch.randint(0, 3, (48, L + k + 2), generator=g)  # 3 ids: lots of matches, of every n-gram size
    n = torch.randint(1, L + 1, (48,), generator=g)
    runs = [_bare_lookup(texts, n, k, ngram, triton) for triton in (False, True)]
    for lookup in runs:
        lookup._draft()
    ours, kernel = runs
    for name in ("tok", "pos", "drafted", "seqlens"):
        assert torch.equal(getattr(kernel, name), getattr(ours, name)), name
    assert torch.equal(ours.pos, n - 1) and torch.equal(ours.seqlens, (n + k).int())
    for b in range(texts.shape[0]):
        candidates, _ = hf.get_candidates(texts[b: b + 1, : n[b]])
        expected = candidates[0, n[b]:]
        assert int(ours.drafted[b]) == expected.numel()
        assert torch.equal(ours.tok[b, 1: 1 + expected.numel()], expected)
        assert int(ours.tok[b, 0]) == int(texts[b, n[b] - 1])


@pytest.mark.parametrize("eos", [[], [2], [0, 5, 7]], ids=["no-eos", "eos", "3-eos"])
def test_acceptance_kernel_equals_the_torch_steps(eos):
    """kernels/lookup.py's accept against the PyTorch form, over random agreement runs, limits
    (rows at and near theirs), finished rows and eos ids among the chosen tokens."""
    B, k, W = 64, 5, 40
    g = torch.Generator().manual_seed(len(eos))
    chosen = torch.randint(0, 32, (B, k + 1), generator=g)
    tok = torch.randint(0, 32, (B, k + 1), generator=g)
    agree = torch.rand(B, k, generator=g) < 0.85
    tok[:, 1:] = torch.where(agree, chosen[:, :k], tok[:, 1:])  # long agreeing runs, some broken
    runs = []
    for triton in (False, True):
        lookup = _bare_lookup(torch.randint(0, 8, (B, W), generator=torch.Generator().manual_seed(1)),
                              torch.randint(1, W - k, (B,), generator=torch.Generator().manual_seed(2)), k, 2, triton)
        lookup.drafted = torch.randint(0, 2 * k, (B,), generator=torch.Generator().manual_seed(3)).clamp(max=k)
        lookup.count = torch.randint(1, 21, (B,), generator=torch.Generator().manual_seed(4))
        lookup.limit = torch.tensor([20])
        lookup.decoder.finished = torch.rand(B, generator=torch.Generator().manual_seed(5)) < 0.2
        lookup.decoder.eos = torch.tensor(eos + [-1] * 2)
        lookup.decoder.has_eos = bool(eos)
        lookup.tok = tok.clone()
        lookup._accept(chosen.clone())
        runs.append(lookup)
    ours, kernel = runs
    for name in ("text", "n", "count"):
        assert torch.equal(getattr(kernel, name), getattr(ours, name)), name
    assert torch.equal(kernel.decoder.finished, ours.decoder.finished)
    finished = torch.rand(B, generator=torch.Generator().manual_seed(5)) < 0.2
    assert bool((ours.decoder.finished & ~finished).any()) == bool(eos)  # rows ended by an eos
    emitted = ours.count - torch.randint(1, 21, (B,), generator=torch.Generator().manual_seed(4))
    assert set(emitted.tolist()) == set(range(k + 2))  # rows done (0) to rows taking every draft (k + 1)


def compile_lookup_variants(arch):
    """kernels/lookup.py lowered for sm_<arch> (a programmatic dependent on sm_90: waits first)."""
    from tests.gpu_compile import compile_for, load_kernel_module, ptxas_spills

    mod = load_kernel_module("lookup")
    i64 = dict.fromkeys(("text_ptr", "n_ptr", "tok_ptr", "pos_ptr", "drafted_ptr", "chosen_ptr", "count_ptr",
                         "limit_ptr", "eos_ptr"), "*i64")  # fmt: skip
    for block_k in (2, 16):
        draft = compile_for(mod._draft_kernel, i64 | {"seqlens_ptr": "*i32"}, {"BLOCK_S": mod.BLOCK_S,
                            "BLOCK_K": block_k}, arch=arch, num_warps=mod.NUM_WARPS, num_stages=1)  # fmt: skip
        accept = compile_for(mod._accept_kernel, i64 | {"finished_ptr": "*u8"}, {"HAS_EOS": True, "BLOCK_K": block_k,
                             "BLOCK_E": 8}, arch=arch, num_warps=1, num_stages=1)  # fmt: skip
        assert ptxas_spills(draft, arch) == ptxas_spills(accept, arch) == 0


def test_lookup_kernels_compile_for_gpu():
    from tests.gpu_compile import run_compile_check

    run_compile_check("tests.test_speculative.compile_lookup_variants")


def _bare_lookup(texts, n, k, ngram, triton):
    """A PromptLookup over texts (B, W) whose rows hold n tokens, with no model behind it."""
    lookup = PromptLookup.__new__(PromptLookup)
    B = texts.shape[0]
    lookup.k, lookup.ngram, lookup.triton = k, ngram, triton
    lookup.text, lookup.n = texts.clone(), n.clone()
    lookup.tok, lookup.pos, lookup.drafted = torch.zeros(B, k + 1, dtype=torch.long), torch.zeros_like(n), n * 0
    lookup.seqlens = torch.zeros(B, dtype=torch.int32)
    lookup.cols = torch.arange(k + 1)
    decoder = types.SimpleNamespace(finished=torch.zeros(B, dtype=torch.bool), eos=torch.full((2,), -1),
                                    has_eos=False)  # fmt: skip
    lookup._decoder = lambda: decoder  # as the weak reference a PromptLookup holds
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


def test_drafts_and_n_grams_beyond_use_are_cut(model, monkeypatch):
    """More drafts than tokens left to make are never used (at most max_new_tokens - 1: a 10**12
    would size the cache by them), n-grams longer than the text never match: plain greedy's tokens."""
    idx = repetitive(2, 10, 384)
    plain = model.generate(idx, 12)
    calls = count_verifies(model, monkeypatch)
    assert torch.equal(model.generate(idx, 12, prompt_lookup_num_tokens=10**12, max_matching_ngram_size=500), plain)
    assert {shape for shape in calls} == {(2, 12)}  # 11 drafts a step
    assert max(length for _, length in model._decoders) <= model.config.n_positions + 11
    assert torch.equal(model.generate(idx, 1, prompt_lookup_num_tokens=4), plain[:, :11])  # no step: no drafts


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
    assert next(iter(model._decoders.values())).lookup.triton  # drafted and accepted by kernels/lookup.py


def test_fused_verify_equals_unfused(monkeypatch):
    """On the triton backend (Triton's interpreter here) a verification of up to 64 tokens in all
    runs the fused step: each matmul one fastgpt.ops.linear launch, c_attn writing the T tokens'
    k and v into their cache rows, decode attention merging its splits by the counters (left
    zero), c_proj reading its output in place (token-major: no copy of it into rows). The unfused
    step's logits and cache, past the context too."""
    from fastgpt import model as model_module
    from fastgpt.decoder import KVCache

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
    launches, inputs, attended = [], set(), []
    linear, attend = model_module.linear, model_module.decode_step_attention
    monkeypatch.setattr(model_module, "linear", lambda x, *a, **k: launches.append(1) or inputs.add(x.data_ptr())
                        or linear(x, *a, **k))  # fmt: skip
    monkeypatch.setattr(model_module, "decode_step_attention", lambda *a, **k: attended.append(attend(*a, **k))
                        or attended[-1])  # fmt: skip
    fused = model.verify(tok, pos, caches[0], counters=counters)
    assert len(launches) == 4 * 2 + 1  # the fused step ran
    assert len(attended) == 2 and all(y.data_ptr() in inputs for y in attended)
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
    """The step is captured once and replayed; eager and graphed steps give the same tokens."""
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
