"""fastgpt.ops.step (GPT-2's decode step as one persistent kernel, kernels/step.py) against GPT's
fused step (fastgpt.ops.linear and decode attention), which the rest of the suite holds to the
reference.

On a CPU the kernel runs in Triton's interpreter (fp32/fp16, tiny models), whose programs run one
after another: the first takes every item. The `gpu` cases add bf16, GPT-2's sizes, the grid's
programs at once and CUDA-graph capture.
"""

import pytest
import torch
import triton
import triton.language as tl

from fastgpt import BackendUnavailableError
from fastgpt.decoder import KVCache
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import step
from tests.gpu_compile import compile_for, load_kernel_module, run_compile_check
from tests.helpers import assert_close
from tests.test_model import tiny_hf


def tiny_model(device, dtype=torch.float32, *, n_embd=64, n_head=4, n_layer=2, out_in=False):
    """tests.test_model's random GPT-2 (wide initial weights, so that greedy ties are unlikely) on
    the triton backend. out_in: the (out, in) weight order GPT keeps on a GPU (a CPU's is (in, out))."""
    model = GPT.from_hf(tiny_hf(n_embd, n_head, n_layer)).to(device=device, dtype=dtype)
    if out_in:
        for w in model.parameters():
            w.data = w.data.contiguous()
    model.backend = "triton"
    return model


def run_steps(model, idx, prompt, length, persistent):
    """Prefill idx[:, :prompt], then decode the rest of idx one token a step: (logits (steps, B, V), kv)."""
    model.persistent_decode = persistent
    B = idx.shape[0]
    cache = KVCache(model.config, B, length, model.transformer.wte.weight.dtype, idx.device)
    model.prefill(idx[:, :prompt], cache, last=torch.full((B,), prompt - 1, device=idx.device))
    with torch.inference_mode():
        steps = [model.decode(idx[:, t], torch.full((B,), t, device=idx.device), cache)
                 for t in range(prompt, idx.shape[1])]  # fmt: skip
    assert not cache.step_sync.any()  # the kernel leaves its counters zero (and no wait gave up)
    return torch.stack(steps), cache.kv


# Every pair of (weight order, dtype, rows) in 6 cases rather than the 12 of the full product:
# each case is an interpreter run of three or four steps of the whole model.
@pytest.mark.parametrize("out_in, dtype, B", [
    (False, torch.float32, 1), (True, torch.float16, 1), (True, torch.float32, 3), (False, torch.float16, 3),
    (False, torch.float32, 5), (True, torch.float16, 5),
], ids=["in_out-fp32-1", "out_in-fp16-1", "out_in-fp32-3", "in_out-fp16-3", "in_out-fp32-5", "out_in-fp16-5"])
def test_matches_the_fused_step(out_in, dtype, B, device, poisoned_empty):
    """Logits and cache of a few steps: one token a row (5 rows: padded to the kernel's 8), a cache
    of 40 positions in several chunks (the interpreter's 16-position blocks), the scratch poisoned."""
    model = tiny_model(device, dtype, out_in=out_in)
    idx = torch.randint(0, 384, (B, 14), device=device)
    assert model._persistent_decode(B, torch.device(device)) is False  # off unless set
    fused, kv_fused = run_steps(model, idx, 11, 40, persistent=False)
    logits, kv = run_steps(model, idx, 11, 40, persistent=True)
    assert model._persistent_decode(B, torch.device(device))
    assert logits.dtype == dtype and logits.shape == fused.shape
    if dtype == torch.float32:
        assert_close(logits, fused)
        assert_close(kv, kv_fused)
        assert_close(logits[-1], model(idx)[:, -1])  # and the full forward's last position
    else:  # two fp16 paths round differently: each within twice the fused step's error of fp32's
        ref, kv_ref = run_steps(model.float(), idx, 11, 40, persistent=False)  # the same weights, in fp32
        for ours, theirs, exact in ((logits, fused, ref), (kv, kv_fused, kv_ref)):
            error, fused_error = ((t.float() - exact).abs().max().item() for t in (ours, theirs))
            assert error <= 2 * fused_error + 1e-3, (error, fused_error)


def test_rows_of_different_lengths_and_a_first_token(device):
    """Each row attends to its own length: rows at positions 0, 7 and 30 of a 33-position cache
    (chunks past a row's length are empty), against the fused step."""
    model = tiny_model(device, n_layer=1)
    B, S = 3, 33
    pos = torch.tensor([0, 7, 30], device=device)
    tok = torch.randint(0, 384, (B,), device=device)
    results = []
    for persistent in (False, True):
        model.persistent_decode = persistent
        torch.manual_seed(1)
        cache = KVCache(model.config, B, S, torch.float32, device)
        cache.kv.normal_()  # stale k and v beyond each row's length must not be read
        with torch.inference_mode():
            results.append((model.decode(tok, pos, cache), cache.kv.clone()))
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("claim", [1, 3])
def test_any_claim_size(claim, device, monkeypatch):
    """A program may take its items one at a time or several (the last claim cut at the end)."""
    from fastgpt.kernels import step as kernel

    monkeypatch.setattr(kernel, "ITEMS_PER_CLAIM", claim)
    model = tiny_model(device, n_layer=1)
    idx = torch.randint(0, 384, (2, 9), device=device)
    fused, _ = run_steps(model, idx, 8, 12, persistent=False)
    assert_close(run_steps(model, idx, 8, 12, persistent=True)[0], fused)


def test_ids_and_slots_outside_the_tables(device):
    """A token id past the vocabulary and a position past wpe (and the cache) read zeros and write
    no slot, as the fused step does; the other rows are untouched by them."""
    model = tiny_model(device, n_layer=1)
    B, S = 3, 100  # the cache holds slot 96, one past wpe's 96 rows
    tok = torch.tensor([5, 384, 7], device=device)  # 384: one past the vocabulary
    pos = torch.tensor([3, 4, 96], device=device)
    results = []
    for persistent in (False, True):
        model.persistent_decode = persistent
        cache = KVCache(model.config, B, S, torch.float32, device)
        with torch.inference_mode():
            results.append((model.decode(tok, pos, cache), cache.kv.clone()))
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])
    assert results[1][1][:, :, 2, :, 96].any()  # row 2's token went to its slot


def test_greedy_generation_matches(device):
    """generate with the persistent step: the same tokens as the fused step (a batch of 2 with
    left padding, so that rows sit at different positions)."""
    model = tiny_model(device)
    idx = torch.randint(0, 384, (2, 6), device=device)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]], device=device)
    model.persistent_decode = False
    expected = model.generate(idx, 7, attention_mask=mask)
    model.persistent_decode = True
    assert torch.equal(model.generate(idx, 7, attention_mask=mask), expected)


def test_where_it_runs(device):
    """Only where switched on, for one token a row, up to MAX_ROWS rows, on the triton backend,
    GPT-2's tanh GELU, a power-of-two head dim, and weights it can read."""
    dev = torch.device(device)
    model = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2)).to(device)
    model.persistent_decode = True
    assert model._persistent_decode(1, dev) == (device == "cuda")  # auto: triton on a GPU only
    model.backend = "triton"
    assert model._persistent_decode(step.MAX_ROWS, dev) and not model._persistent_decode(step.MAX_ROWS + 1, dev)
    for backend in ("torch", "cuda"):
        model.backend = backend
        assert not model._persistent_decode(1, dev)
    model.backend = "triton"
    model.half()  # a new place for every weight: the table is made again
    assert model._persistent_decode(1, dev)
    if device == "cpu":
        model.bfloat16()  # the interpreter has no bf16
        assert not model._persistent_decode(1, dev)
    exact = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, activation_function="gelu"))
    exact.backend, exact.persistent_decode = "triton", True
    assert not exact._persistent_decode(1, torch.device("cpu"))
    odd = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=48, n_layer=1, n_head=2))  # head dim 24
    odd.backend, odd.persistent_decode = "triton", True
    assert not odd._persistent_decode(1, torch.device("cpu"))


def _layers(model):
    return [tuple(block.get_parameter(name) for name in step.LAYER_WEIGHTS) for block in model.transformer.h]


def test_mixed_dtypes_and_norms_keep_the_fused_step(device):
    """A model the kernel cannot take whole (LayerNorms kept in fp32 in an fp16 model; a block's
    LayerNorm with another eps) keeps the fused step, and generates as it would without the flag."""
    model = tiny_model(device, torch.float16, n_layer=1)
    for block in model.transformer.h:
        block.ln_1.float()
    model.persistent_decode = True
    assert not model._persistent_decode(1, torch.device(device))
    idx = torch.randint(0, 384, (1, 5), device=device)
    out = model.generate(idx, 3)
    model.persistent_decode = False
    assert torch.equal(model.generate(idx, 3), out)
    other = tiny_model(device, n_layer=1)
    other.transformer.h[0].ln_2.eps = 1e-3
    other.persistent_decode = True
    assert not other._persistent_decode(1, torch.device(device))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # what the steps compute once waits give up is garbage
def test_generate_raises_where_a_wait_gave_up(device):
    """generate reads the flag a wait that gave up sets (here set by hand: every wait then gives up
    at once) and raises, clearing it: the next call gives the tokens it would have."""
    from fastgpt.ops.step import GAVE_UP

    model = tiny_model(device, n_layer=1)
    model.persistent_decode = True
    idx = torch.randint(0, 384, (1, 5), device=device)
    expected = model.generate(idx, 3)
    (decoder,) = model._decoders.values()
    with torch.inference_mode():  # the decoder's buffers are inference tensors
        decoder.cache.step_sync[GAVE_UP] = 1
    with pytest.raises(RuntimeError, match="gave up"):
        model.generate(idx, 3)
    assert not decoder.cache.step_sync.any()
    assert torch.equal(model.generate(idx, 3), expected)


def test_the_kernel_reads_what_it_writes_from_l2_after_waiting():
    """What the interpreter cannot show (it runs the programs one after another): in kernels/step.py
    every load of an activation another program writes in the same launch (h, qkv, y, f, the
    attention's partials, the cache) is a .cg load (past this SM's L1), and each item function that
    waits does so before its first such load."""
    import ast
    import inspect

    from fastgpt.kernels import step as kernel

    written = ("h_ptr", "qkv_ptr", "y_ptr", "f_ptr", "x_ptr", "part_o_ptr", "part_lse_ptr", "k_base", "v_base")
    tree = ast.parse(inspect.getsource(kernel))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def calls(function):
        return sorted((n for n in ast.walk(function) if isinstance(n, ast.Call)), key=lambda n: n.lineno)

    loaders, loads = set(), 0  # the functions that load such an activation themselves, and their loads
    for name, function in functions.items():
        for node in calls(function):
            if ast.unparse(node.func) == "tl.load" and any(p in ast.unparse(node.args[0]) for p in written):
                loads += 1
                loaders.add(name)
                modifiers = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert modifiers.get("cache_modifier") == "'.cg'", (name, node.lineno)
    assert loads >= 8 and {"_ln_matmul_rows", "_matmul_rows", "_add_to_stream", "_attention_item"} <= loaders
    # Every item but the attention's waits itself, before its first such load; the kernel waits
    # right before each attention item.
    for name, function in functions.items():
        if not name.endswith("_item") or name == "_attention_item":
            continue
        waits = [n.lineno for n in calls(function) if ast.unparse(n.func) == "_wait_until"]
        for node in calls(function):
            called = ast.unparse(node.func)
            if called in loaders or (called == "tl.load" and any(p in ast.unparse(node.args[0]) for p in written)):
                assert waits and min(waits) < node.lineno, (name, called, node.lineno)
    order = [ast.unparse(n.func) for n in calls(functions["_step_kernel"])]
    order = [c for c in order if c == "_wait_until" or c.endswith("_item") or c == "_count_done"]
    assert all(order[i - 1] == "_wait_until" for i, c in enumerate(order) if c == "_attention_item")


def test_step_weights_refuses_what_the_kernel_cannot_read():
    model = tiny_model("cpu")
    layers, head = _layers(model), model.lm_head.weight
    weights = step.step_weights(layers, head)
    assert weights is not None and weights.table.shape == (2, 12)
    assert step.still_valid(weights, layers, head)
    moved = [list(layer) for layer in layers]
    moved[1][2] = moved[1][2].clone()  # a new place for layer 1's c_attn weight
    assert not step.still_valid(weights, [tuple(layer) for layer in moved], head)
    moved[1][2] = moved[1][2].contiguous()  # (out, in) in layer 1, (in, out) in layer 0: two layouts of one kind
    assert step.step_weights([tuple(layer) for layer in moved], head) is None
    odd = [list(layer) for layer in layers]
    odd[0][1] = torch.empty(65)[1:].copy_(odd[0][1])  # ln_1's bias 4 bytes past an aligned start
    assert step.step_weights([tuple(layer) for layer in odd], head) is None
    short = [list(layer) for layer in layers]
    short[0][5] = short[0][5][:-1]
    with pytest.raises(ValueError, match=r"layers\[0\] attn.c_proj.bias must have shape"):
        step.step_weights([tuple(layer) for layer in short], head)
    with pytest.raises(TypeError, match="layers"):
        step.step_weights([tuple(t.half() for t in layers[0])], head)
    with pytest.raises(ValueError, match="12 tensors"):
        step.step_weights([layers[0][:11]], head)


def test_the_grid_is_what_an_sm_holds():
    """The launches after a kernel's first take as many programs an SM as its registers fit: 4 at
    the 128 registers of one bf16 row on sm_90, 3 at the ~152 of more rows, 5 under a 96 cap;
    a warp's registers are allocated 256 at a time."""
    from fastgpt.kernels import step as kernel

    assert [kernel.resident_programs(r, 128) for r in (64, 96, 128, 129, 152, 255)] == [8, 5, 4, 3, 3, 2]
    assert kernel.resident_programs(128, 256) == 2 and kernel.resident_programs(1024, 128) == 1


def test_checks_its_arguments():
    """Each argument refused with its name, before any launch."""
    model = tiny_model("cpu")
    t = model.transformer
    weights = step.step_weights(_layers(model), model.lm_head.weight)
    cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
    tok, pos = torch.tensor([1, 2]), torch.tensor([3, 4])
    seqlens = (pos + 1).int()
    args = dict(tok=tok, pos=pos, seqlens=seqlens, kv=cache.kv, weights=weights, wte=t.wte.weight, wpe=t.wpe.weight,
                ln_f=(t.ln_f.weight, t.ln_f.bias), eps=1e-5, sync=cache.step_sync)  # fmt: skip
    logits = step.decode_step(**args)
    assert logits.shape == (2, 384)
    cases = [
        (dict(tok=torch.zeros(9, dtype=torch.int64), pos=torch.zeros(9, dtype=torch.int64),
              seqlens=torch.ones(9, dtype=torch.int32)), ValueError, "tok must hold 1 to 2 rows"),
        (dict(tok=tok[:0]), ValueError, "tok must hold"),
        (dict(tok=tok.int()), TypeError, "tok"),
        (dict(seqlens=pos), TypeError, "seqlens"),
        (dict(pos=pos[:1]), ValueError, "pos must have shape"),
        (dict(kv=cache.kv[..., :12]), ValueError, "power of two"),
        (dict(kv=cache.kv.half()), TypeError, "wte"),
        (dict(kv=cache.kv[:1]), ValueError, "weights must be"),
        (dict(weights=None), ValueError, "weights must be"),
        (dict(sync=cache.step_sync[:5]), ValueError, "sync must be"),
        (dict(sync=cache.step_sync.long()), TypeError, "sync"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(wpe=t.wpe.weight[:, :32]), ValueError, "wpe must have shape"),
        (dict(kv=cache.kv.transpose(-1, -2)), ValueError, "unit stride"),
        (dict(kv=cache.kv[:, :1]), ValueError, "k and v side by side"),
        (dict(ln_f=None), TypeError, "ln_f"),
        (dict(weights=object()), ValueError, "weights must be"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            step.decode_step(**(args | change))
    bf16 = tiny_model("cpu", torch.bfloat16)
    tb = bf16.transformer
    bf16_args = dict(kv=cache.kv.bfloat16(), weights=step.step_weights(_layers(bf16), bf16.lm_head.weight),
                     wte=tb.wte.weight, wpe=tb.wpe.weight, ln_f=(tb.ln_f.weight, tb.ln_f.bias))  # fmt: skip
    with pytest.raises(BackendUnavailableError, match="bf16"):
        step.decode_step(**(args | bf16_args))
    assert not cache.step_sync.any()


@triton.jit
def _spans_kernel(out_ptr, total, per_layer, t_qkv, t_attn, t_proj, t_fc, n_layer, table_ptr, head_ptr, C, F, V,
                  DTYPE: tl.constexpr, N_QKV: tl.constexpr, N_PROJ: tl.constexpr, N_FC: tl.constexpr,
                  N_OUT: tl.constexpr, N_HEAD: tl.constexpr):  # fmt: skip
    """kernels/step.py's _item_weights for every item of the queue: out[item] = (start, elements)."""
    from fastgpt.kernels.step import _item_weights

    for item in range(total):
        start, elements = _item_weights(item, per_layer, t_qkv, t_attn, t_proj, t_fc, n_layer, table_ptr, head_ptr,
                                        C, F, V, DTYPE, N_QKV, N_PROJ, N_FC, N_OUT, N_HEAD)  # fmt: skip
        tl.store(out_ptr + 2 * item, start.to(tl.int64))
        tl.store(out_ptr + 2 * item + 1, elements.to(tl.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_the_weights_an_item_prefetches_are_its_own(dtype):
    """The span the kernel asks L2 for ahead of an item (PREFETCH_ROUNDS) is exactly the weight
    rows of the item's columns, inside its tensor, for every item of the queue (none for the
    attention items); and the kernel prefetches only where rows lie one after another."""
    from fastgpt.kernels import step as kernel

    model = tiny_model("cpu", dtype, n_embd=48, n_head=3, out_in=True)
    layers = _layers(model)
    head = model.lm_head.weight
    weights = step.step_weights(layers, head)
    C, F, V, es = 48, 4 * 48, head.shape[0], head.element_size()
    M, n_head, n_chunks, n_layer = 3, 3, 2, len(layers)
    width = {"qkv": 32, "proj": 32, "fc": 16, "out": 8, "head": 256}  # columns an item: 144, 48, 384 ragged
    kinds = [("qkv", 2, 3 * C, C), ("attention", None, M * n_head * n_chunks, None), ("proj", 4, C, C),
             ("fc", 8, F, C), ("out", 10, C, F)]  # fmt: skip
    expected, tensors = [], []  # (start, elements) an item, in the queue's order; the tensor it reads
    for layer in layers:
        for kind, j, n, k in kinds:
            if j is None:
                expected += [(0, 0)] * n  # an attention item: no weights (its start is not looked at)
                tensors += [None] * n
                continue
            for column in range(0, n, width[kind]):
                expected.append((layer[j].data_ptr() + column * k * es, min(width[kind], n - column) * k))
                tensors.append(layer[j])
    for column in range(0, V, width["head"]):
        expected.append((head.data_ptr() + column * C * es, min(width["head"], V - column) * C))
        tensors.append(head)
    t = [-(-n // width[kind]) if kind != "attention" else n for kind, _, n, _ in kinds]
    out = torch.full((len(expected), 2), -1, dtype=torch.int64)
    _spans_kernel[(1,)](out, len(expected), sum(t), t[0], t[1], t[2], t[3], n_layer, weights.table, head, C, F, V,
                        kernel._DTYPES[dtype], width["qkv"], width["proj"], width["fc"], width["out"],
                        width["head"])  # fmt: skip
    got = [(int(a), int(b)) if b else (0, 0) for a, b in out.tolist()]
    assert got == expected
    for (start, elements), tensor in zip(got, tensors):
        if tensor is not None:  # inside its tensor, 16-byte aligned
            assert tensor.data_ptr() <= start and start + elements * es <= tensor.data_ptr() + tensor.numel() * es
            assert start % 16 == 0 and elements * es % 16 == 0
    assert kernel._can_prefetch(torch.device("cpu"), weights, C, F, es) is False  # no sm_90 here (no CUDA device)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # what the unmet waits' items compute is garbage
def test_a_wait_that_cannot_be_met_gives_up():
    """A bug that would leave a wait unmet (here: the queue starts past layer 1's qkv items, so
    nothing counts them) ends the wait after its bound: the step finishes, sync[GAVE_UP] is set
    and stays set, and the counters are zero again."""
    from fastgpt.kernels import step as kernel

    model = tiny_model("cpu")
    t = model.transformer
    weights = step.step_weights(_layers(model), model.lm_head.weight)
    cache = KVCache(model.config, 1, 16, torch.float32, "cpu")
    args = (torch.tensor([1]), torch.tensor([0]), torch.tensor([1], dtype=torch.int32), cache.kv, weights,
            t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias), 1e-5, cache.step_sync)  # fmt: skip
    kernel.decode_step(*args)
    assert not cache.step_sync.any()
    items = [-(-n // kernel.tile_columns(n, k, 4, kernel.TILE_BYTES)) for n, k in ((192, 64), (64, 64), (256, 64),
                                                                                     (64, 256))]  # fmt: skip
    n_chunks, _ = kernel.attention_chunks(1, 4, 16, kernel._INTERPRETER_SMS * kernel.PROGRAMS_PER_SM,
                                          kernel._INTERPRETER_BLOCK_N)  # fmt: skip
    qkv_items = items[0]
    cache.step_sync[0] = sum(items) + 4 * n_chunks + qkv_items  # layer 1's first attention item
    kernel.decode_step(*args)
    assert cache.step_sync[step.GAVE_UP] == 1
    cache.step_sync[step.GAVE_UP] = 0
    assert not cache.step_sync.any()


def compile_step_variants(arch):
    """The kernel for sm_<arch> at GPT-2's widths (bf16 and fp32; 1 and MAX_ROWS rows): every
    weight tile in 16-byte loads, the activations other programs write read from L2 (.cg), the
    waits acquire loads that back off (nanosleep), and at one bf16 row no spills, in at most 128
    registers on sm_90 (4 programs an SM; sm_80's build takes 162, 3 an SM), with the L2 prefetch
    of the items ahead (PREFETCH_ROUNDS 1) and the claims taken ahead (CLAIM_AHEAD) too; no
    prefetch without it."""
    import triton.language as tl

    from tests.gpu_compile import ptxas_usage

    mod = load_kernel_module("step")
    assert (mod.MAX_ROWS, mod.GAVE_UP) == (step.MAX_ROWS, step.GAVE_UP)  # the ops layer's copies
    assert all(step.sync_entries(n, h) == mod.sync_entries(n, h) for n, h in ((1, 1), (12, 12), (48, 25)))
    names = ("wte_ptr", "wpe_ptr", "lnf_w_ptr", "lnf_b_ptr", "head_ptr", "kv_ptr", "h_ptr", "qkv_ptr", "y_ptr", "f_ptr",
             "logits_ptr")  # fmt: skip
    C, F, V = 768, 3072, 50257
    for dtype, size, tl_dtype in (("bf16", 2, tl.bfloat16), ("fp32", 4, tl.float32)):
        ptrs = {name: f"*{dtype}" for name in names} | {"table_ptr": "*i64", "tok_ptr": "*i64", "pos_ptr": "*i64",
                                                         "seqlens_ptr": "*i32", "part_o_ptr": "*fp32",
                                                         "part_lse_ptr": "*fp32", "sync_ptr": "*i32"}  # fmt: skip
        for rows in (1, mod.MAX_ROWS):
            const = dict(
                DTYPE=tl_dtype, BLOCK_M=rows, HEAD_DIM=64, CHUNKS_P=16, K_C=1024, K_F=4096,
                N_QKV=mod.tile_columns(3 * C, C, size, mod.TILE_BYTES),
                N_PROJ=mod.tile_columns(C, C, size, mod.TILE_BYTES),
                N_FC=mod.tile_columns(F, C, size, mod.TILE_BYTES),
                N_OUT=mod.tile_columns(C, F, size, mod.TILE_BYTES),
                N_HEAD=mod.tile_columns(V, C, size, mod.HEAD_TILE_BYTES),
                ATTN_BLOCK_N=mod.ATTN_BLOCK_N, CLAIM=mod.ITEMS_PER_CLAIM, BACKOFF=True, PREFETCH_ROUNDS=0,
                CLAIM_AHEAD=False, THREADS=32 * mod.NUM_WARPS,
                SYNC_P=triton.next_power_of_2(mod.sync_entries(12, 12)),  # as the launcher sets them for GPT-2
                stride_attn_k=1, stride_proj_k=1, stride_fc_k=1, stride_out_k=1, stride_head_k=1,
                stride_wte_k=1, stride_wpe_k=1,  # the JIT specialises a unit stride
            )  # fmt: skip
            kernel = compile_for(mod._step_kernel, ptrs, const, arch=arch, num_warps=mod.NUM_WARPS, num_stages=1,
                                 scalar_types={"eps": "fp32", "qk_scale": "fp32"}, divisible=("C", "F"))  # fmt: skip
            ptx, where = kernel.asm["ptx"], (arch, dtype, rows)
            weight_loads = [line for line in ptx.splitlines() if "ld.global.L1::evict_first" in line]
            assert weight_loads and all(".v4." in line for line in weight_loads), where
            assert "ld.global.cg" in ptx and "ld.global.gpu.acquire" in ptx and "nanosleep" in ptx, where
            assert "prefetch" not in ptx, where
            if rows == 1 and dtype == "bf16":
                registers, spills = ptxas_usage(kernel, arch)
                assert spills == 0 and registers <= (128 if arch >= 90 else 168), (*where, registers, spills)
            if rows == 1 and dtype == "bf16" and arch >= 90:  # the weights ahead into L2, the claims ahead
                kernel = compile_for(mod._step_kernel, ptrs, const | {"PREFETCH_ROUNDS": 1, "CLAIM_AHEAD": True},
                                     arch=arch, num_warps=mod.NUM_WARPS, num_stages=1, divisible=("C", "F"),
                                     scalar_types={"eps": "fp32", "qk_scale": "fp32"})  # fmt: skip
                ptx = kernel.asm["ptx"]
                assert "cp.async.bulk.prefetch.L2.global" in ptx, where
                claims = [line for line in ptx.splitlines() if "relaxed" in line and ".add.u32" in line]
                assert len(claims) == 2 and "@first atom" in claims[1], (where, claims)  # the first, then the async
                registers, spills = ptxas_usage(kernel, arch)
                assert spills == 0 and registers <= 128, (*where, registers, spills)


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_for_gpu(arch):
    run_compile_check("tests.test_step.compile_step_variants", (arch,))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpt2_sized_step_on_gpu(dtype, B):
    """GPT-2 124M's shapes, random weights, 8 steps over a 1024-position cache with the rows at
    different positions: the logits and the cache within twice the fused step's error of the same
    weights in fp32 (two paths that round differently), the counters zero after every step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device="cuda", dtype=dtype)
    model.backend = "triton"
    idx = torch.randint(0, 50257, (B, 40), device="cuda")
    offsets = torch.arange(B, device="cuda")

    def steps(persistent):
        model.persistent_decode = persistent
        cache = KVCache(model.config, B, 1024, model.transformer.wte.weight.dtype, "cuda")
        model.prefill(idx[:, :32], cache, last=torch.full((B,), 31, device="cuda"))
        with torch.inference_mode():
            out = [model.decode(idx[:, t], t - offsets, cache) for t in range(32, 40)]
            assert not cache.step_sync.any()
        return torch.stack(out).float(), cache.kv.float()

    fused, ours = steps(False), steps(True)
    from fastgpt.kernels import step as kernel

    assert kernel._RESIDENT and all(1 <= n <= 16 for n in kernel._RESIDENT.values())  # the grid read the registers
    model.float()
    exact = steps(False)
    for name, i in (("logits", 0), ("cache", 1)):
        error, fused_error = ((t[i] - exact[i]).abs().max().item() for t in (ours, fused))
        assert error <= 2 * fused_error + 1e-3, (name, error, fused_error)


@pytest.mark.gpu
def test_graphed_generation_on_gpu():
    """generate captures the persistent step in its CUDA graph: every token the greedy choice of
    the full forward's logits over the tokens before it (within fp16 rounding), and the same
    tokens again on a second call (every replay leaves the counters zero)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4)).to(device="cuda", dtype=torch.float16)
    model.backend = "triton"
    idx = torch.randint(0, 50257, (2, 16), device="cuda")
    model.persistent_decode = True
    out = model.generate(idx, 48)
    assert torch.equal(model.generate(idx, 48), out)
    with torch.inference_mode():
        logits = model(out)[:, 15:-1].float()  # the logits each new token was chosen from
    chosen = logits.gather(-1, out[:, 16:, None])[..., 0]
    assert (logits.amax(dim=-1) - chosen).max() <= 0.05
