"""fastgpt's generate: token-identical to HF greedy, left padding, eos, sampling, edge cases (CPU, fp32)."""

import warnings

import pytest
import torch

from fastgpt.generate import generate, stream
from fastgpt.model import GPT

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


V = 384


def tiny(n_embd=64, n_head=4, n_layer=2, n_positions=96, seed=0):
    """(hf, fastgpt) pair of one random GPT-2; initializer_range 0.2 keeps argmax ties unlikely."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, GPT.from_hf(hf)


def hf_greedy(hf, idx, n, mask=None, **kw):
    mask = torch.ones_like(idx) if mask is None else mask
    with torch.no_grad():
        return hf.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def pair():
    return tiny(96, 2)  # head dim 48


@pytest.mark.parametrize("n_embd,n_head,B,T", [(64, 4, 1, 7), (96, 2, 3, 16), (160, 2, 2, 5)])
def test_greedy_matches_hf(n_embd, n_head, B, T):
    hf, model = tiny(n_embd, n_head)
    idx = torch.randint(0, V, (B, T))
    out = model.generate(idx, 40)
    assert out.shape == (B, T + 40)
    assert torch.equal(out, hf_greedy(hf, idx, 40))


def test_left_padded_batch_equals_rows_alone(pair):
    hf, model = pair
    lengths = [9, 4, 1, 6]
    T = max(lengths)
    rows = [torch.randint(1, V, (1, n)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(idx)
    for b, row in enumerate(rows):
        idx[b, T - row.shape[1]:] = row
        mask[b, T - row.shape[1]:] = 1
    out = model.generate(idx, 33, attention_mask=mask)
    assert torch.equal(out[:, :T], idx)  # the caller's layout: padding kept, new tokens after it
    for b, row in enumerate(rows):
        assert torch.equal(out[b, T:], model.generate(row, 33)[0, row.shape[1]:])
    assert torch.equal(out, hf_greedy(hf, idx, 33, mask))


def test_eos_stops_rows(pair):
    hf, model = pair
    idx = torch.randint(1, V, (3, 6))
    free = model.generate(idx, 30)[:, 6:]
    eos = int(free[0, 4])  # row 0 emits it at step 4 (or earlier); others may or may not
    out = model.generate(idx, 30, eos_token_id=eos, pad_token_id=7)
    expected = hf_greedy(hf, idx, 30, eos_token_id=eos).clone()
    assert out.shape[1] <= 36
    new = out[:, 6:]
    first = (new[0] == eos).nonzero()[0, 0]
    assert (new[0, first + 1:] == 7).all()  # pad after eos
    # HF pads with pad_token_id=0 here: compare with pads mapped back.
    hf_new = expected[:, 6:]
    assert hf_new.shape == new.shape
    for b in range(3):
        hits = (hf_new[b] == eos).nonzero()
        stop = hits[0, 0] + 1 if len(hits) else new.shape[1]
        assert torch.equal(new[b, :stop], hf_new[b, :stop])
        assert (new[b, stop:] == 7).all()


def test_eos_every_row_ends_output_early(pair):
    _, model = pair
    idx = torch.randint(1, V, (2, 5))
    free = model.generate(idx, 20)[:, 5:]
    eos_ids = [int(free[0, 2]), int(free[1, 3])]
    for check_every in (1, 8):
        out = model.generate(idx, 20, eos_token_id=eos_ids, check_every=check_every)
        new = out[:, 5:]
        is_eos = (new[:, :, None] == torch.tensor(eos_ids)).any(-1)
        assert is_eos.any(1).all()
        assert out.shape[1] == 5 + int(is_eos.int().argmax(1).max()) + 1  # ends at the last row's eos


@pytest.mark.parametrize("B", [1, 33, 1100])  # one block of rows, a padded one, several (1024 each)
@pytest.mark.parametrize("has_eos", [False, True])
def test_advance_kernel_equals_the_torch_bookkeeping(B, has_eos, device):
    """kernels/advance.py against Decoder.emit's PyTorch steps: tokens (pad for finished rows),
    out's column, tok, pos, seqlens, step, and the finished flags (eos hits, padding slots of -1)."""
    from fastgpt.kernels.advance import advance

    g = torch.Generator().manual_seed(B)
    state = {"out": torch.randint(0, 99, (B, 7), generator=g), "step": torch.tensor([3]),
             "tok": torch.randint(0, 99, (B,), generator=g), "pos": torch.randint(0, 50, (B,), generator=g),
             "seqlens": torch.zeros(B, dtype=torch.int32), "finished": torch.rand(B, generator=g) < 0.3}  # fmt: skip
    nxt = torch.randint(0, 12, (B,), generator=g)
    pad, eos = torch.tensor([11]), torch.tensor([4, 7, -1, -1, -1, -1, -1, -1])
    theirs = {k: v.clone().to(device) for k, v in state.items()}
    advance(nxt.to(device), theirs["out"], theirs["step"], theirs["tok"], theirs["pos"], theirs["seqlens"],
            theirs["finished"], pad.to(device), eos.to(device), has_eos=has_eos)  # fmt: skip
    if has_eos:
        nxt = torch.where(state["finished"], pad, nxt)
        state["finished"] |= (nxt[:, None] == eos).any(dim=1)
    state["out"][:, 3] = nxt
    state["tok"], state["pos"], state["step"] = nxt, state["pos"] + 1, state["step"] + 1
    state["seqlens"] = (state["pos"] + 1).int()
    for name, value in state.items():
        assert torch.equal(theirs[name].cpu(), value), name


@pytest.mark.parametrize("B, V", [(1, 7), (9, 2500), (70, 1030)], ids=["B1-V7", "3-row-blocks-3-vocab-blocks", "B70"])
@pytest.mark.parametrize("has_eos", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_greedy_advance_is_argmax_then_advance(B, V, has_eos, dtype, device):
    """kernels/advance.py's greedy_advance against reference.greedy + advance, twice in a row (each
    call leaves its maxima and count ready for the next): ties across vocabulary blocks (the
    first index), NaN (never the argmax), +inf, rows of -inf and NaN only (0), -0.0 tied with 0."""
    from fastgpt.kernels.advance import advance, greedy_advance

    from fastgpt import reference

    NO_ENTRY = torch.iinfo(torch.int64).min  # as the decoder fills best
    g = torch.Generator().manual_seed(B + V)
    best = torch.full((B,), NO_ENTRY, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    state = {"out": torch.zeros(B, 5, dtype=torch.int64), "step": torch.tensor([1]),
             "tok": torch.zeros(B, dtype=torch.int64), "pos": torch.randint(0, 50, (B,), generator=g),
             "seqlens": torch.zeros(B, dtype=torch.int32), "finished": torch.rand(B, generator=g) < 0.3}  # fmt: skip
    mine = {k: v.clone().to(device) for k, v in state.items()}
    pad, eos = torch.tensor([2]), torch.tensor([3, 5, -1, -1])
    for call in range(2):
        logits = (torch.randn(B, V, generator=g) * 2).round().to(dtype)  # many ties
        logits[0, [V - 1, V // 2]] = 50.0  # tied maxima in two blocks
        logits[-1, ::3] = float("nan")
        if B > 2:
            logits[1] = float("-inf")
            logits[2, :] = float("nan")
        if B > 4:
            logits[3, [5, 1000]] = float("inf")
            logits[4] = -1.0
            logits[4, [7, 600]] = torch.tensor([-0.0, 0.0], dtype=dtype)
        greedy_advance(logits.to(device), best, count, mine["out"], mine["step"], mine["tok"], mine["pos"],
                       mine["seqlens"], mine["finished"], pad.to(device), eos.to(device), has_eos=has_eos)  # fmt: skip
        advance(reference.greedy(logits), state["out"], state["step"], state["tok"], state["pos"], state["seqlens"],
                state["finished"], pad, eos, has_eos=has_eos)  # fmt: skip
        for name, value in state.items():
            assert torch.equal(mine[name].cpu(), value), (call, name)
        assert (best == NO_ENTRY).all() and count.item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 32, 64])
def test_gpu_greedy_advance_has_no_race(B):
    """greedy_advance at GPT-2's vocabulary, 50 steps in a row with fresh bf16 logits (ties
    across programs, NaN): each step's tokens are reference.greedy's, and best and count are
    left reset. A lost atomic or an early reader would show as a wrong token now and then."""
    from fastgpt.kernels.advance import greedy_advance

    from fastgpt import reference

    V, steps = 50257, 50
    best = torch.full((B,), torch.iinfo(torch.int64).min, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(B, steps, dtype=torch.int64, device="cuda")
    step, tok, pos = (torch.zeros(n, dtype=torch.int64, device="cuda") for n in (1, B, B))
    seqlens = torch.zeros(B, dtype=torch.int32, device="cuda")
    finished = torch.zeros(B, dtype=torch.bool, device="cuda")
    pad, eos = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), -1, device="cuda")  # no eos
    expected = []
    for i in range(steps):
        logits = (torch.randn(B, V, device="cuda") * 2).round().to(torch.bfloat16)  # many ties
        logits[:, i * 997 % V] = float("nan")
        expected.append(reference.greedy(logits))
        greedy_advance(logits, best, count, out, step, tok, pos, seqlens, finished, pad, eos, has_eos=False)
    assert torch.equal(out, torch.stack(expected, dim=1)) and step.item() == steps and (pos == steps).all()
    assert (seqlens == steps + 1).all()
    assert (best == torch.iinfo(torch.int64).min).all() and count.item() == 0


def compile_advance_variants(arch):
    """kernels/advance.py lowered for sm_<arch>, with and without eos ids, at one block and the widest."""
    from tests.gpu_compile import compile_for, load_kernel_module

    mod = load_kernel_module("advance")
    ptrs = {"nxt_ptr": "*i64", "out_ptr": "*i64", "step_ptr": "*i64", "tok_ptr": "*i64", "pos_ptr": "*i64",
            "seqlens_ptr": "*i32", "finished_ptr": "*u8", "pad_ptr": "*i64", "eos_ptr": "*i64"}  # fmt: skip
    for has_eos, block in [(False, mod.MIN_BLOCK), (True, 1024)]:
        compile_for(mod._advance_kernel, ptrs, {"HAS_EOS": has_eos, "BLOCK_B": block, "BLOCK_E": 8}, arch=arch,
                    num_warps=1, num_stages=1)  # fmt: skip
    ptrs |= {"best_ptr": "*i64", "count_ptr": "*i32"}
    for dtype, has_eos, block in [("bf16", False, 32 * mod.GREEDY_WARPS), ("fp32", True, 1024)]:
        const = {"HAS_EOS": has_eos, "BLOCK_V": mod.GREEDY_BLOCK_V, "BLOCK_R": mod.GREEDY_BLOCK_R, "BLOCK_B": block,
                 "BLOCK_E": 8}  # fmt: skip
        kernel = compile_for(mod._greedy_advance_kernel, ptrs | {"logits_ptr": f"*{dtype}"}, const, arch=arch,
                             num_warps=mod.GREEDY_WARPS, num_stages=1)  # fmt: skip
        ptx = kernel.asm["ptx"]
        assert "atom.global.gpu.acq_rel.add" in ptx or "atom.acq_rel.gpu.global.add" in ptx, "the count's ordering"


def test_advance_compiles_for_gpu():
    from tests.gpu_compile import run_compile_check

    run_compile_check("tests.test_generate.compile_advance_variants")


def test_triton_glue_generates_what_the_torch_one_does():
    """The triton backend's decode step (fused linear, the advance kernel) gives the torch
    backend's tokens: greedy with left padding and eos ids (rows finishing early), and sampled."""
    _, model = tiny(64, 4, n_layer=1, n_positions=64)
    idx = torch.randint(1, V, (3, 6))
    mask = torch.ones_like(idx)
    mask[1, :2] = 0
    free = model.generate(idx, 12, attention_mask=mask)
    eos = [int(free[0, 9]), int(free[2, 13])]
    runs = {}
    for backend in ("torch", "triton"):
        model.backend = backend
        assert next(iter(model._decoders.values()), None) is None  # the setter dropped the decoders
        runs[backend] = [model.generate(idx, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0),
                         model.generate(idx, 4, attention_mask=mask, temperature=0.8, top_k=20,
                                        generator=torch.Generator().manual_seed(3))]  # fmt: skip
        decoder = next(iter(model._decoders.values()))
        assert decoder.triton_advance == (backend == "triton")
    assert torch.equal(runs["torch"][0], runs["triton"][0])
    assert (runs["triton"][0][0, 10:] == 0).all()  # row 0 padded after its eos
    assert runs["triton"][1].shape == runs["torch"][1].shape == (3, 10)


def test_sampling_reproducible_under_generator(pair):
    _, model = pair
    idx = torch.randint(0, V, (2, 8))

    def run(seed, **kw):
        return model.generate(idx, 24, temperature=0.9, top_k=50, top_p=0.95,
                              generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < V)).all()


def test_generator_state_is_taken_and_advanced(pair):
    """The decoder draws from its own generator, loaded from the caller's and written back: a
    seed gives the same tokens on every call, and the caller's generator moves on as if drawn from."""
    _, model = pair
    idx = torch.randint(0, V, (2, 8))

    def run(generator):
        return model.generate(idx, 12, temperature=1.0, generator=generator)

    g = torch.Generator().manual_seed(3)
    start = g.get_state()
    first, second = run(g), run(g)
    assert not torch.equal(g.get_state(), start) and not torch.equal(first, second)
    again = torch.Generator().manual_seed(3)
    assert torch.equal(run(again), first) and torch.equal(run(again), second)
    assert torch.equal(again.get_state(), g.get_state())
    # No generator: the default one, the same way.
    torch.manual_seed(3)
    assert torch.equal(run(None), first) and torch.equal(run(None), second)
    assert torch.equal(torch.get_rng_state(), g.get_state())
    with pytest.raises(TypeError, match="generator"):
        run(3)


def test_stream_closed_early_advances_the_generator(pair):
    _, model = pair
    idx = torch.randint(0, V, (1, 8))
    g = torch.Generator().manual_seed(4)
    steps = stream(model, idx, 12, temperature=1.0, generator=g)
    first = [next(steps) for _ in range(3)]
    steps.close()  # the draws made so far are written back to g here
    h = torch.Generator().manual_seed(4)
    assert torch.equal(torch.stack(first), torch.stack(list(stream(model, idx, 3, temperature=1.0, generator=h))))
    assert torch.equal(g.get_state(), h.get_state())


def test_call_inside_a_stream_does_not_take_its_decoder(pair):
    _, model = pair
    idx = torch.randint(0, V, (2, 8))
    alone = model.generate(idx, 10)[:, 8:]
    inner = []
    outer = []
    for tok in stream(model, idx, 10):
        outer.append(tok)
        inner.append(model.generate(idx[:, :5], 3))  # same batch, fits the stream's cache
    assert torch.equal(torch.stack(outer, dim=1), alone)
    assert all(torch.equal(x, inner[0]) for x in inner)
    assert len(model._decoders) == 1


def test_graph_mode_keys_the_sampler_path_not_the_bound():
    """A captured step is replayed for another call's top_k bound when the sampler takes the same
    path for it (the same candidate list length), and captured again when not."""
    from fastgpt import generate as gen
    from fastgpt.model import GPTConfig

    model = GPT(GPTConfig(vocab_size=V, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    decoder = gen._decoder(model, 2, 16, 8, use_graph=False)

    def mode(bound):
        with torch.inference_mode():
            decoder.reset(gen._sampling(2, "cpu", 0.8, bound, 1.0, 0.0), [], 0, top_k_bound=bound)
        return decoder._mode()

    assert mode(40) == mode(50) == mode(63)  # lists of 64
    assert len({mode(0), mode(50), mode(64), mode(200)}) == 4  # none, 64, 128, 256


@pytest.mark.parametrize("B", [1, 32])
def test_capture_marks_the_cache_and_launches_plainly_from_32_rows(B, monkeypatch):
    """_graphs.capture (with torch.cuda's streams and graph stubbed out, on the CPU): the warm-up
    and the capture run with the cache marked graphed and, from PDL_PLAIN_ROWS rows, with
    plain launches; afterwards, and after a failed capture, the cache is marked eager again and
    the state restored."""
    import contextlib

    from fastgpt import _backends, _graphs
    from fastgpt.decoder import KVCache
    from fastgpt.model import GPTConfig

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, stream):
            pass

        def register_generator_state(self, generator):
            pass

    entered = []  # the contexts the capture entered: on the cache's device, the capture on the side stream

    def context(name):
        return lambda *args, **kwargs: entered.append((name, args, kwargs)) or contextlib.nullcontext()

    for name in ("Stream", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, Stub)
    for name in ("stream", "graph", "device"):
        monkeypatch.setattr(torch.cuda, name, context(name))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stub())
    monkeypatch.setattr(_backends, "_capability", lambda index: 9)
    cache = KVCache(GPTConfig(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2), B, 8, torch.float32, "cpu")
    state, seen = torch.zeros(3), []

    def step():
        state.add_(1)
        seen.append((cache.graphed, _backends.launch_pdl(torch.device("cuda", 0))))

    graph, reason = _graphs.capture(step, (state,), torch.Generator(), cache)
    assert reason is None and isinstance(graph, Stub)
    assert seen == [(True, B < _backends.PDL_PLAIN_ROWS)] * (_graphs.WARMUP_STEPS + 1)
    assert not cache.graphed and _backends.launch_pdl(torch.device("cuda", 0))
    assert torch.equal(state, torch.ones(3))  # the warm-up's steps undone, the capture's kept
    (device,), (warm_up,), (capture,) = ([e for e in entered if e[0] == name] for name in ("device", "stream", "graph"))
    assert device[1] == (cache.kv.device,) and capture[2]["stream"] is warm_up[1][0]  # not torch's default stream

    def failing():
        step()
        raise RuntimeError("operation not permitted when stream is capturing")

    state.zero_()
    graph, reason = _graphs.capture(failing, (state,), torch.Generator(), cache)
    assert graph is None and "not permitted" in reason
    assert not cache.graphed and not state.any()


class _ReplayingGraph:
    """A stand-in for a captured CUDA graph on the CPU: replay reruns what was captured."""

    def __init__(self, fn):
        self.replay = fn


def test_prefill_graph_from_the_second_prefill_of_a_length(pair, monkeypatch):
    """Decoder.prefill with use_graph, _graphs.capture stood in for on the CPU (warm-up and capture
    run the prefill once; a replay reruns it): the first prefill of a length is eager, the second
    captures, later ones replay on the graph's copies of their inputs, and a new length is eager
    again. The logits and the cache are model.prefill's every time. Without use_graph, past
    PREFILL_GRAPH_MAX_TOKENS, or after a failed capture (which warns once), the prefill is eager."""
    from fastgpt import _graphs
    from fastgpt import decoder as dec

    _, model = pair
    captures, fail = [], []

    def capture(fn, state, generator, cache, warmup):
        assert state == () and generator is None and cache is decoder.cache
        captures.append(fn)
        fn()
        return (None, "RuntimeError: stand-in failure") if fail else (_ReplayingGraph(fn), None)

    monkeypatch.setattr(_graphs, "capture", capture)
    B, S = 2, 32
    decoder = dec.Decoder(model, B, S, 8)

    def check(idx, use_graph=True, captured=None):
        last = torch.tensor([idx.shape[1] - 1, idx.shape[1] // 2])
        decoder.cache.kv.normal_()
        expected_cache = dec.KVCache(model.config, B, S, torch.float32, "cpu")
        with torch.inference_mode():
            expected = model.prefill(idx, expected_cache, last)
            got = decoder.prefill(idx, last, use_graph)
        T = idx.shape[1]
        assert torch.equal(got, expected)
        assert torch.equal(decoder.cache.kv[..., :T, :], expected_cache.kv[..., :T, :])
        assert len(captures) == captured

    prompts = [torch.randint(0, V, (B, 5)) for _ in range(4)]
    check(prompts[0], captured=0)  # eager: a new length
    check(prompts[1], captured=1)  # captured
    check(prompts[2], captured=1)  # replayed with its own tokens and rows
    check(prompts[3], use_graph=False, captured=1)  # eager
    check(prompts[0], captured=1)  # replayed still
    check(torch.randint(0, V, (B, 7)), captured=1)  # another length: eager
    assert decoder.prefill_graph is None and decoder.prefill_idx is None
    monkeypatch.setattr(dec, "PREFILL_GRAPH_MAX_TOKENS", B * 7 - 1)
    for _ in range(3):
        check(torch.randint(0, V, (B, 7)), captured=1)  # too many tokens: eager
    fail.append(True)
    check(torch.randint(0, V, (B, 6)), captured=1)
    with pytest.warns(UserWarning, match="capture of the prefill failed, prefilling eagerly .*stand-in failure"):
        check(torch.randint(0, V, (B, 6)), captured=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(torch.randint(0, V, (B, 6)), captured=2)  # not retried
    assert decoder.prefill_graph is False


@pytest.mark.parametrize("fused", [True, False])
def test_decode_attention_is_picked_for_the_graph_while_capturing(fused, monkeypatch):
    """GPT's decode step hands its cache's graphed mark to decode attention's choice of backend
    (by device time while a capture runs, by one eager call's time otherwise), fused or not."""
    from fastgpt import _backends
    from fastgpt.decoder import KVCache

    _, model = tiny(64, 4)
    model.backend = "triton"
    model.fused_decode = fused
    seen = []
    real = _backends.decode_preference
    monkeypatch.setattr(_backends, "decode_preference", lambda *a: seen.append(a[2]) or real(*a))
    cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
    with torch.inference_mode():
        for graphed in (False, True):
            cache.graphed = graphed
            model.decode(torch.tensor([1, 2]), torch.tensor([3, 4]), cache)
    assert seen == [False] * 2 + [True] * 2  # two layers a step


def test_decoders_kept_are_bounded():
    """Eager: one decoder per model, reused while it is big enough; CUDA graphs: an LRU by (batch, bucket)."""
    from fastgpt import generate as gen
    from fastgpt.model import GPTConfig

    model = GPT(GPTConfig(vocab_size=V, n_positions=1024, n_embd=16, n_layer=1, n_head=2))
    for B, T, n in [(1, 5, 3), (1, 9, 4), (2, 3, 2), (2, 30, 300), (2, 7, 1), (3, 4, 2)]:
        model.generate(torch.randint(0, V, (B, T)), n)
        assert len(model._decoders) == 1
    (key, decoder), = model._decoders.items()
    assert key == (3, gen.BUCKET) == (decoder.batch, decoder.length)
    # A shorter call with the same batch takes the kept cache, attending over just its positions.
    cache = decoder.cache.k.data_ptr()
    assert gen._decoder(model, 3, 40, 8, use_graph=False) is decoder
    assert decoder.cache.k.data_ptr() == cache
    with torch.inference_mode():  # the decoder's buffers were made under generate's inference mode
        decoder.reset(gen._sampling(3, "cpu", 0.0, 0, 1.0, 0.0), [], 0, positions=40)
    assert decoder.kv.k.shape[3] == 40 and decoder.kv.k.data_ptr() == cache

    made = [gen._decoder(model, B, length, 8, use_graph=True) for B, length in [(3, 100), (3, 300), (1, 10)]]
    assert list(model._decoders) == [(3, 512), (1, 256)]  # exact buckets; the oldest dropped
    assert gen._decoder(model, 3, 257, 8, use_graph=True) is made[1]  # reused: now the most recent
    assert list(model._decoders) == [(1, 256), (3, 512)]
    assert gen._decoder(model, 1, 200, 8, use_graph=False) is made[2]  # eager takes a kept one that fits
    assert gen._decoder(model, 2, 10, 8, use_graph=False).batch == 2
    assert list(model._decoders) == [(2, 256)]  # eager made a new one: every other one dropped first


def test_top_k_1_is_greedy_and_per_row_params(pair):
    _, model = pair
    idx = torch.randint(0, V, (2, 8))
    greedy = model.generate(idx, 16)
    assert torch.equal(model.generate(idx, 16, temperature=1.3, top_k=1), greedy)
    mixed = model.generate(idx, 16, temperature=[0.0, 1.0], top_k=[0, 1])
    assert torch.equal(mixed, greedy)
    assert torch.equal(model.generate(idx, 16, temperature=[0, 2], top_k=torch.tensor([3, 1])), greedy)


def test_sampling_parameters_are_checked_by_the_sampling_op(pair):
    """generate has no range checks of its own: the messages are fastgpt.sample's."""
    import fastgpt

    _, model = pair
    idx = torch.randint(0, V, (2, 3))
    for kwargs in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(min_p=2.0)):
        with pytest.raises(ValueError) as from_sample:
            fastgpt.sample(torch.randn(2, V), **kwargs)
        with pytest.raises(ValueError) as from_generate:
            model.generate(idx, 2, **kwargs)
        assert str(from_generate.value) == str(from_sample.value)


def test_stream_yields_the_generated_tokens(pair):
    _, model = pair
    idx = torch.randint(0, V, (2, 8))
    steps = list(stream(model, idx, 12))
    assert len(steps) == 12 and steps[0].shape == (2,)
    assert torch.equal(torch.stack(steps, dim=1), model.generate(idx, 12)[:, 8:])


def test_stream_stops_at_eos(pair):
    _, model = pair
    idx = torch.randint(1, V, (1, 8))
    free = model.generate(idx, 12)[0, 8:]
    steps = list(stream(model, idx, 12, eos_token_id=int(free[3])))
    first = int((free == free[3]).nonzero()[0, 0])
    assert len(steps) == first + 1 and int(steps[-1]) == int(free[3])


def test_decoder_reused_across_calls(pair):
    _, model = pair
    idx = torch.randint(0, V, (2, 8))
    a = model.generate(idx, 10)
    b = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(idx, 10), a)  # the state of the sampled call did not leak
    assert not torch.equal(a, b)
    assert len(model._decoders) == 1  # eager: one decoder, one KV cache
    model.backend = model.backend  # a backend change drops the caches (and graphs) made for the old one
    assert not model._decoders


def test_prompt_too_long(pair):
    _, model = pair
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(torch.zeros(1, 97, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="at most 6 new tokens"):
        model.generate(torch.zeros(1, 90, dtype=torch.long), 7)


def test_empty_batch_and_zero_tokens(pair):
    _, model = pair
    assert model.generate(torch.zeros(0, 5, dtype=torch.long), 4).shape == (0, 9)
    assert list(stream(model, torch.zeros(0, 5, dtype=torch.long), 4)) == []
    idx = torch.randint(0, V, (2, 5))
    assert torch.equal(model.generate(idx, 0), idx)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(temperature=[1.0, 1.0, 1.0]), ValueError, r"temperature .*\(B,\) = \(2,\)"),
    (dict(top_p=torch.tensor([0.5, 1.5])), ValueError, "top_p"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(top_k=[1, 2.5]), TypeError, "top_k"),
    (dict(temperature=[True, False]), TypeError, "temperature"),
    (dict(eos_token_id="x"), ValueError, "eos_token_id"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), ValueError, "left-padded"),
    (dict(attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), ValueError, "no tokens"),
    (dict(attention_mask=torch.ones(2, 4)), ValueError, "shape"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(check_every=0), ValueError, "check_every"),
])
def test_bad_arguments(pair, kwargs, error, match):
    _, model = pair
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, V, (2, 3)), 2, **kwargs)


def test_mask_checks_read_the_device_once(monkeypatch):
    from fastgpt.generate import _check_mask

    idx = torch.zeros(2, 4, dtype=torch.long)
    reads = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _f=original, _n=name: reads.append(_n) or _f(t, *a))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert _check_mask(mask, idx).tolist() == [3, 4]
    assert reads == ["tolist", "tolist"]  # the checks' one read, then the test's own
    monkeypatch.undo()
    with pytest.raises(ValueError, match="only 0"):
        _check_mask(torch.tensor([[0, 2, 1, 1], [1, 1, 1, 1]]), idx)


def test_bad_prompts(pair):
    _, model = pair
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside"):
        model.generate(torch.tensor([[V]]), 2)
    with pytest.raises(TypeError, match="int64"):
        model.generate(torch.zeros(1, 2), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


def test_cuda_graph_request_on_cpu_warns(pair):
    _, model = pair
    idx = torch.randint(0, V, (1, 4))
    with pytest.warns(UserWarning, match="eagerly"):
        out = generate(model, idx, 3, cuda_graph=True)
    assert torch.equal(out, model.generate(idx, 3))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_decode_step_compiles_fullgraph(pair, temperature, monkeypatch):
    """torch.compile traces one decode step (sampling included) without a graph break: no host sync.

    Dynamo cannot take a torch.Generator argument (a PyTorch limit, not fastgpt's), so the step
    draws from the default generator here; the GPU tests capture it with the decoder's own.
    """
    _, model = pair
    from fastgpt.decoder import Decoder

    decoder = Decoder(model, 2, 32, 8)
    sampling = dict(temperature=torch.full((2,), temperature), top_k=torch.zeros(2, dtype=torch.long),
                    top_p=torch.ones(2, dtype=torch.float64), min_p=torch.zeros(2))
    decoder.reset(sampling, [], 0)
    monkeypatch.setattr(decoder, "generator", None)
    decoder.pos.fill_(3)
    torch._dynamo.reset()
    step = torch.compile(decoder.decode_step, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        step()
    assert int(decoder.step) == 1 and int(decoder.pos[0]) == 4


def test_compile_option(pair):
    """compile=...: the decode forward through torch.compile gives the same tokens, greedy and
    sampled under a seed (aot_eager traces what inductor gets, quickly); inductor itself once."""
    _, model = pair
    idx = torch.randint(0, V, (2, 7))
    greedy = model.generate(idx, 10)
    torch._dynamo.reset()
    assert torch.equal(model.generate(idx, 10, compile={"backend": "aot_eager"}), greedy)
    sampled = [model.generate(idx, 10, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(5),
                              compile=options) for options in (False, {"backend": "aot_eager"})]
    assert torch.equal(*sampled)
    torch._dynamo.reset()
    assert torch.equal(model.generate(idx, 10, compile=True), greedy)
    torch._dynamo.reset()


def test_compile_option_through_the_triton_kernels():
    """The compiled decode forward dispatches to the Triton kernels (the interpreter here): the
    ops' backend checks must trace, as they do on a GPU, where auto looks for the compiled
    backends."""
    _, model = tiny(64, 4, n_layer=1, n_positions=64)
    model.backend = "triton"
    idx = torch.randint(0, V, (2, 5))
    expected = model.generate(idx, 3)
    torch._dynamo.reset()
    assert torch.equal(model.generate(idx, 3, compile={"backend": "aot_eager"}), expected)
    torch._dynamo.reset()


def test_compiled_step_keeps_static_shapes():
    """A second batch size compiles the decode forward again for its own shapes, not once more
    with symbolic ones (Dynamo's automatic dynamic; the H200 run that did so ran 5x slower)."""
    _, model = tiny(seed=3)
    symbolic = []

    def backend(gm, example_inputs):
        sizes = [s for t in example_inputs if isinstance(t, torch.Tensor) for s in (*t.shape, *t.stride())]
        symbolic.append(any(isinstance(s, torch.SymInt) for s in (*sizes, *example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    for B in (1, 3):
        idx = torch.randint(0, V, (B, 5))
        assert torch.equal(model.generate(idx, 4, compile={"backend": backend}), model.generate(idx, 4))
    assert symbolic == [False, False]
    torch._dynamo.reset()


def test_compile_past_the_recompile_limit_decodes_eagerly():
    """Each new batch size recompiles the one decode forward; past Dynamo's recompile limit (8 by
    default; 1 here) fullgraph made that an error. That decoder now decodes eagerly, with a warning
    that says why, and gives the same tokens."""
    _, model = tiny(seed=4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for B, warns in ((1, False), (2, True)):
            idx = torch.randint(0, V, (B, 5))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model.generate(idx, 4, compile={"backend": "aot_eager"})
            assert torch.equal(out, model.generate(idx, 4))
            assert any("recompile limit" in str(w.message) for w in caught) == warns
    torch._dynamo.reset()


def test_compile_option_checks(pair):
    _, model = pair
    idx = torch.randint(0, V, (1, 3))
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        model.generate(idx, 2, compile="yes")
    with pytest.raises(ValueError, match="fullgraph is always True"):
        model.generate(idx, 2, compile={"fullgraph": False})
    for options in ({"mode": "reduce-overhead"}, {"backend": "cudagraphs"}, {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(ValueError, match="own CUDA graphs"):
            model.generate(idx, 2, compile=options)


@pytest.mark.gpu
def test_cuda_graph_of_the_compiled_step():
    """compile=True under the CUDA graph: inductor's kernels captured and replayed, same tokens."""
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda")
    idx = torch.randint(0, V, (3, 20), device="cuda")
    plain = model.generate(idx, 48)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # A failed capture warns: that fails here. (Inductor's own advice, such as enabling TF32
        # for this fp32 model, stays a warning.)
        warnings.filterwarnings("error", message="fastgpt: CUDA graph capture failed")
        compiled = model.generate(idx, 48, compile=True)
    assert torch.equal(compiled, plain)
    assert any(d.graph is not None and d.compiled_with == {} for d in model._decoders.values())
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager(dtype):
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda", dtype)
    idx = torch.randint(0, V, (3, 20), device="cuda")
    mask = torch.ones_like(idx)
    mask[1, :7] = 0
    eager = model.generate(idx, 64, attention_mask=mask, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastgpt: CUDA graph capture failed")
        graphed = model.generate(idx, 64, attention_mask=mask, cuda_graph=True)
        again = model.generate(idx, 64, attention_mask=mask, cuda_graph=True)  # replays the captured graph
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert any(d.graph is not None for d in model._decoders.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_graph_on_gpu(dtype):
    """The second call with a prompt length captures its prefill in a CUDA graph and later calls
    replay it: the same tokens as eager calls, with left padding and with prompt lookup too."""
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda", dtype)
    idx = torch.randint(0, V, (3, 20), device="cuda")
    mask = torch.ones_like(idx)
    mask[1, :7] = 0
    for options in ({}, {"prompt_lookup_num_tokens": 3}):
        eager = model.generate(idx, 24, attention_mask=mask, cuda_graph=False, **options)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fastgpt: CUDA graph capture")
            runs = [model.generate(idx, 24, attention_mask=mask, **options) for _ in range(3)]
            other = model.generate(idx[:, 1:], 24, attention_mask=mask[:, 1:], **options)  # another length: eager
        assert all(torch.equal(run, eager) for run in runs)
        assert torch.equal(other, model.generate(idx[:, 1:], 24, attention_mask=mask[:, 1:], cuda_graph=False,
                                                 **options))  # fmt: skip
        model.generate(idx, 24, attention_mask=mask, **options)  # prefill length 20 again: captured at the next
        assert any(d.prefill_length == 20 and d.prefill_graph is None for d in model._decoders.values())
        assert torch.equal(model.generate(idx, 24, attention_mask=mask, **options), eager)
        assert any(d.prefill_graph for d in model._decoders.values())


@pytest.mark.gpu
def test_cuda_graph_with_and_without_eos():
    """A call without eos captures a step without the finished-row bookkeeping; the next call with
    eos needs it back (a new capture), and the one after without eos again: each as eager."""
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda")
    idx = torch.randint(1, V, (2, 10), device="cuda")
    free = model.generate(idx, 40, cuda_graph=False)
    eos = int(free[0, 14])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastgpt: CUDA graph capture failed")
        runs = [model.generate(idx, 40, eos_token_id=e) for e in (None, eos, None)]
    assert torch.equal(runs[0], free) and torch.equal(runs[2], free)
    assert torch.equal(runs[1], model.generate(idx, 40, eos_token_id=eos, cuda_graph=False))
    assert (runs[1][0, 15:] == eos).all()  # row 0 finished at its first eos: pad (= eos) after it


@pytest.mark.gpu
def test_cuda_graph_sampling_reproducible():
    """The graph draws from the decoder's generator: fresh generators of one seed give the same
    tokens, with or without the graph, and each caller's generator ends in the same state."""
    _, model = tiny(128, 2, n_positions=512)
    model = model.to("cuda")
    idx = torch.randint(0, V, (2, 10), device="cuda")

    def run(seed, cuda_graph=True):
        g = torch.Generator("cuda").manual_seed(seed)
        out = model.generate(idx, 40, temperature=1.0, top_p=0.9, generator=g, cuda_graph=cuda_graph)
        return out, g.get_state()

    (a, state), (b, _), (eager, eager_state) = run(5), run(5), run(5, cuda_graph=False)
    assert torch.equal(a, b) and not torch.equal(a, run(6)[0])
    assert torch.equal(a, eager) and torch.equal(state, eager_state)
    assert not torch.equal(state, torch.Generator("cuda").manual_seed(5).get_state())
    assert any(d.graph is not None for d in model._decoders.values())


def test_all_greedy_shortcut_equals_sample(pair):
    """An all-greedy decoder samples with temperature=0.0 (no filtering): same tokens, NaN/inf included."""
    import fastgpt
    from fastgpt.decoder import Decoder

    _, model = pair
    decoder = Decoder(model, 4, 16, 8)
    sampling = dict(temperature=torch.zeros(4), top_k=torch.zeros(4, dtype=torch.long),
                    top_p=torch.ones(4, dtype=torch.float64), min_p=torch.zeros(4))
    decoder.reset(sampling, [], 0)
    assert decoder.all_greedy
    logits = torch.randn(4, V)
    logits[1, 7] = float("nan")
    logits[2, [3, 9]] = float("inf")
    logits[3] = float("-inf")
    logits[0, 5] = logits[0, 11] = logits[0].max() + 1  # a tie: the first index wins
    decoder.emit(logits)
    assert torch.equal(decoder.tok, fastgpt.sample(logits, temperature=0.0, backend="torch"))
    decoder.reset({**sampling, "temperature": torch.tensor([0.0, 0.0, 0.0, 1.0])}, [], 0)
    assert not decoder.all_greedy


@pytest.mark.parametrize("options", [{}, {"prompt_lookup_num_tokens": 2}, {"compile": {"backend": "eager"}}],
                         ids=["plain", "prompt-lookup", "compiled"])
def test_a_model_and_its_caches_are_freed_without_the_cycle_collector(options):
    """A model keeps its decoders (caches, CUDA graphs, prompt lookup's state, the compiled step),
    which refer back to it weakly: `del model` frees them at once, not at Python's next cyclic
    collection, which GPU memory does not prompt (a second model loaded after could run out)."""
    import gc
    import weakref

    _, model = tiny(seed=5)
    torch._dynamo.reset()
    model.generate(torch.randint(0, V, (2, 5)), 4, **options)
    (decoder,) = model._decoders.values()
    assert (decoder.lookup is not None) == ("prompt_lookup_num_tokens" in options)
    assert (decoder.compiled is not None) == ("compile" in options)
    alive, cache = weakref.ref(model), weakref.ref(decoder.cache.kv)
    del decoder
    gc.collect()
    gc.disable()
    try:
        del model
        assert alive() is None and cache() is None
    finally:
        gc.enable()
        torch._dynamo.reset()


def test_weights_put_elsewhere_drop_the_kept_decoders():
    """A kept decoder's CUDA graphs read the weights where they were: weights that move (here
    load_state_dict(assign=True), or param.data = ...) drop it, and the next call decodes with
    the new ones; a copy into the weights in place keeps it."""
    _, model = tiny(seed=6)
    idx = torch.randint(0, V, (2, 5))
    model.generate(idx, 3)
    (kept,) = model._decoders.values()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)  # in place
    model.generate(idx, 3)
    assert next(iter(model._decoders.values())) is kept
    other = tiny(seed=7)[1]
    model.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(model.generate(idx, 4), other.generate(idx, 4))
    assert next(iter(model._decoders.values())) is not kept
    kept = next(iter(model._decoders.values()))
    model.transformer.ln_f.weight.data = model.transformer.ln_f.weight.data.clone()
    model.generate(idx, 3)
    assert next(iter(model._decoders.values())) is not kept
