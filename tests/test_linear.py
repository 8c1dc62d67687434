"""fastgpt.ops.linear (the decode step's fused residual + LayerNorm + matmul + GELU) with
backend="triton" against fastgpt.reference.linear.

On CPU the kernel runs in Triton's interpreter (fp32/fp16, small sizes); the `gpu` cases add
bf16 and GPT-2's shapes.
"""

import pytest
import torch

from fastgpt import BackendUnavailableError, _backends, reference
from fastgpt.ops.linear import MAX_ROWS, linear
from tests.gpu_compile import (
    SMEM_LIMIT_SM86,
    compile_for,
    load_kernel_module,
    run_compile_check,
)
from tests.helpers import assert_close


def _inputs(M, K, N, dtype, device, *, row_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    # x and residual are views with row stride K + row_pad: any row stride must do.
    x = rand(M, K + row_pad, scale=2.0, shift=0.5).to(dtype)[:, :K]
    r = rand(M, K + row_pad).to(dtype)[:, :K]
    w = (rand(N, K) / K**0.5).to(dtype)
    return x, r, w, rand(N, scale=0.5).to(dtype), rand(K, shift=1.0).to(dtype), rand(K, scale=0.5).to(dtype)


@pytest.fixture(params=["tiled", "gemv"])
def path(request, monkeypatch):
    """Either kernel of kernels/linear.py: the tiled one (_linear_kernel) at every row count, or
    the matrix-vector one (_gemv_kernel) up to 8 rows, past its default GEMV_MAX_ROWS."""
    from fastgpt.kernels import linear as mod

    monkeypatch.setattr(mod, "GEMV_MAX_ROWS", 0 if request.param == "tiled" else 8)
    return request.param


def _check(x, w, b=None, *, ln=None, residual=None, activation=None):
    out, h = linear(x, w, b, ln=ln, residual=residual, activation=activation, backend="triton")
    ref, h_ref = reference.linear(x, w, b, ln=ln, residual=residual, gelu_tanh=activation == "gelu_tanh")
    assert out.shape == (*x.shape[:-1], w.shape[0]) and out.dtype == x.dtype and out.is_contiguous()
    assert_close(out, ref)
    if residual is None:
        assert h is None
    else:
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the same rounded sum as torch


@pytest.mark.parametrize("M", [1, 3, 16, 37])
@pytest.mark.parametrize("K, N", [(64, 48), (100, 130), (200, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_block_matches_reference(dtype, K, N, M, device, poisoned_empty, path):
    """GPT-2's two fused forms: ln_1 + c_attn (residual, LayerNorm, bias) and ln_2 + c_fc + GELU."""
    x, r, w, b, g, beta = _inputs(M, K, N, dtype, device, row_pad=8)
    _check(x, w, b, ln=(g, beta, 1e-5), residual=r)
    _check(x, w, b, ln=(g, beta, 1e-5), residual=r, activation="gelu_tanh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plain_and_partial_forms(dtype, device, poisoned_empty, path):
    """c_proj (bias only), lm_head (no bias, after ln_f), LayerNorm without weight or bias; a
    weight stored transposed (as GPT keeps them on a CPU)."""
    x, r, w, b, g, beta = _inputs(5, 72, 40, dtype, device)
    _check(x, w, b)
    _check(x, w.t().contiguous().t(), b)
    _check(x, w)
    _check(x, w, activation="gelu_tanh")
    _check(x, w, ln=(g, None, 1e-5), residual=r)
    _check(x, w, b, ln=(None, beta, 1e-3))
    _check(x, w, ln=(None, None, 1e-5))


def test_wide_programs(device, poisoned_empty, monkeypatch):
    """A vocabulary-wide N's LayerNorm form in programs of WIDE_BLOCK_N columns (here from N 64:
    150 columns, the last program's partly past N; 16-bit only)."""
    from fastgpt.kernels import linear as mod

    monkeypatch.setattr(mod, "WIDE_N", 64)
    x, r, w, b, g, beta = _inputs(3, 40, 150, torch.float16, device)
    assert mod.gpu_tiles(16, 150, 40, x.element_size(), True)[0] == mod.WIDE_BLOCK_N
    _check(x, w, ln=(g, beta, 1e-5), residual=r)
    _check(x, w, b, ln=(g, None, 1e-5), residual=r, activation="gelu_tanh")


@pytest.mark.parametrize("block_k", [128, 256])
def test_the_gpus_steps_on_the_interpreter(block_k, device, poisoned_empty, monkeypatch):
    """The K steps the GPU takes (gpu_tiles: 128, 256) over a K of 700 (a partial last step), in
    programs of 16 and of WIDE_BLOCK_N columns, where the interpreter otherwise steps 32 wide."""
    from fastgpt.kernels import linear as mod

    if device != "cpu":
        pytest.skip("the GPU takes its own steps (test_gpt2_shapes_on_gpu)")
    monkeypatch.setattr(mod, "_INTERPRETER_BLOCK_K", block_k)
    monkeypatch.setattr(mod, "WIDE_N", 100)
    for N in (40, 150):  # 16 columns a program; 64
        x, r, w, b, g, beta = _inputs(3, 700, N, torch.float16, device, row_pad=8)
        _check(x, w, b, ln=(g, beta, 1e-5), residual=r, activation="gelu_tanh")
        _check(x, w, b)


def test_gpu_tiles_follow_the_measurements():
    """gpu_tiles gives GPT-2's forms the tiles the H200's sweep found fastest (kernels/linear.py),
    within the bounds the compile check holds them to (an sm_86 block's shared memory)."""
    from fastgpt.kernels import linear as mod

    bf16, fp32 = 2, 4
    assert mod.gpu_tiles(16, 2304, 768, bf16, True) == (16, 256)  # ln_1 + c_attn up to 16 rows
    assert mod.gpu_tiles(32, 3072, 768, bf16, True) == (16, 256)  # ln_2 + c_fc at 32
    assert mod.gpu_tiles(64, 3072, 768, bf16, True) == (16, 128)  # 64 rows: the narrower step
    assert mod.gpu_tiles(32, 50257, 768, bf16, True) == (64, 128)  # ln_f + lm_head
    assert mod.gpu_tiles(64, 50257, 768, bf16, True) == (16, 128)
    assert mod.gpu_tiles(16, 50257, 768, bf16, False) == (16, 512)  # no LayerNorm: 16 columns
    assert mod.gpu_tiles(16, 50257, 768, fp32, True) == (16, mod.BLOCK_K_FP32)
    assert mod.gpu_tiles(16, 768, 3072, bf16, False) == (16, 512)  # mlp c_proj: TILE_ELEMENTS / rows
    assert mod.gpu_tiles(16, 2304, 768, fp32, True) == (16, mod.BLOCK_K_FP32)
    assert mod.gpu_tiles(16, 2304, 100, bf16, True) == (16, 128)  # never much wider than K


def test_gemv_columns_follow_the_tile(monkeypatch):
    """The matrix-vector kernel's columns a program (gemv_columns): whole weight rows within
    GEMV_TILE_BYTES (a vocabulary-wide N: GEMV_WIDE_TILE_BYTES, by default none), up to
    GEMV_MAX_ROWS rows, never a row past the tile."""
    from fastgpt.kernels import linear as mod

    monkeypatch.setattr(mod, "GEMV_WIDE_TILE_BYTES", mod.GEMV_WIDE_TILE_BYTES)
    bf16, fp32 = 2, 4
    assert mod.GEMV_TILE_BYTES == 8192 and mod.GEMV_MAX_ROWS == 1
    assert mod.gemv_columns(1, 2304, 768, bf16) == 4  # ln_1 + c_attn: K 768 is 1024 wide in registers
    assert mod.gemv_columns(1, 768, 3072, bf16) == 1  # mlp c_proj
    assert mod.gemv_columns(1, 2304, 768, fp32) == 2
    assert mod.gemv_columns(1, 2, 64, bf16) == 2  # no more columns than N (rounded up)
    assert mod.gemv_columns(1, 768, 4097, bf16) == 0  # a row past the tile: the tiled kernel
    assert mod.gemv_columns(1, 50257, 768, bf16) == 0  # lm_head: the tiled kernel's wide programs
    mod.GEMV_WIDE_TILE_BYTES = 32 * 1024  # (monkeypatch undoes it)
    assert mod.gemv_columns(1, 50257, 768, bf16) == 16
    mod.GEMV_WIDE_TILE_BYTES = 12 * 1024  # 6 rows would fit: a power of two of them
    assert mod.gemv_columns(1, 50257, 768, bf16) == 4
    assert mod.gemv_columns(2, 2304, 768, bf16) == 0  # past GEMV_MAX_ROWS


@pytest.mark.parametrize("K", [1, 37, 700])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_gemv_rows_and_widths(M, K, device, poisoned_empty, monkeypatch):
    """The matrix-vector kernel over odd widths (a row of one element; rows padded in registers
    to a power of two) and 1 to 3 rows (padded to 4), every form, with programs of one column and
    of several (the last one partly past N), N narrow and (GEMV_WIDE_TILE_BYTES) wide."""
    from fastgpt.kernels import linear as mod

    monkeypatch.setattr(mod, "GEMV_MAX_ROWS", 4)
    for tile, wide_n in ((2 * 1024, mod.WIDE_N), (8 * 1024, 40)):  # 1 column a program at K 700 in fp16; 4
        monkeypatch.setattr(mod, "GEMV_TILE_BYTES", tile)
        monkeypatch.setattr(mod, "GEMV_WIDE_TILE_BYTES", tile)
        monkeypatch.setattr(mod, "WIDE_N", wide_n)
        x, r, w, b, g, beta = _inputs(M, K, 45, torch.float16, device, row_pad=3)
        assert mod.gemv_columns(M, 45, K, 2) > 0
        _check(x, w, b, ln=(g, beta, 1e-5), residual=r, activation="gelu_tanh")
        _check(x, w, b, ln=(None, beta, 1e-5))
        _check(x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_and_expanded_vectors(dtype, device, poisoned_empty, path):
    """bias, ln_weight and ln_bias as strided views and as expanded ones (stride 0, a single
    element in memory): the kernel reads them with a unit stride, so they must be read as given,
    never past their elements."""
    x, r, w, b = _inputs(5, 72, 40, dtype, device)[:4]
    _check(x, w, torch.randn(80, device=device).to(dtype)[::2])
    _check(x, w, torch.randn(1, device=device).to(dtype).expand(40))
    strided = (torch.randn(144, device=device).to(dtype)[::2], torch.randn(72, 2, device=device).to(dtype)[:, 0])
    _check(x, w, b, ln=(*strided, 1e-5), residual=r)
    _check(x, w, b, ln=(torch.randn(1, device=device).to(dtype).expand(72),
                        torch.randn(1, device=device).to(dtype).expand(72), 1e-5))


def test_leading_dims_and_extreme_gelu_inputs(device, poisoned_empty, path):
    """(B, 1, K) as the model passes it; GELU far out on both sides (no inf / NaN)."""
    x = torch.randn(2, 1, 48, device=device)
    w = torch.randn(33, 48, device=device) * 40  # outputs of +-1000 and more
    _check(x, w, activation="gelu_tanh")
    out, _ = linear(x, w, activation="gelu_tanh", backend="triton")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("slots", [[[0], [6], [3], [-1], [9]], [[2, 3, 4, 5], [7, 8, 9, -1], [0, 1, 2, 3]]],
                         ids=["a-token-a-row", "4-tokens-a-row"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_qkv_projection_writes_the_kv_cache(dtype, slots, device, path):
    """ln_1 + c_attn writing k and v to each token's slot in its row's cache (M = B T rows of x,
    T tokens a cache row: a decode step's one, a token and its drafts): the same cache as the
    reference's scatters; slots outside [0, S) (past the cache, a padding row) write nothing."""
    pos = torch.tensor(slots, device=device)
    (B, T), H, D, S = pos.shape, 3, 16, 9
    K, N = 40, 3 * H * D
    x, r, w, b, g, beta = _inputs(B * T, K, N, dtype, device)
    cache = torch.randn(2, B, H, S, D, device=device).to(dtype)
    initial, expected = cache.clone(), cache.clone()
    ref, _ = reference.linear(x, w, b, ln=(g, beta, 1e-5), residual=r, kv_cache=expected, kv_pos=pos.flatten())
    out, _ = linear(x, w, b, ln=(g, beta, 1e-5), residual=r, kv_cache=cache, kv_pos=pos.flatten(), backend="triton")
    assert_close(out, ref)
    assert_close(cache, expected)
    kv = ref[:, H * D:].view(B, T, 2, H, D)
    written = torch.zeros(B, S, dtype=torch.bool, device=device)
    for row, t in torch.cartesian_prod(torch.arange(B), torch.arange(T)).view(-1, 2).tolist():
        slot = int(pos[row, t])
        if 0 <= slot < S:
            assert torch.equal(expected[:, row, :, slot], kv[row, t])
            written[row, slot] = True
    untouched = ~written  # (B, S): the other slots keep their values
    assert torch.equal(expected.permute(1, 3, 0, 2, 4)[untouched], initial.permute(1, 3, 0, 2, 4)[untouched])
    with pytest.raises(ValueError, match=f"B dividing the M = {B * T} rows"):
        linear(x, w, kv_cache=torch.zeros(2, B * T + 1, H, S, D, dtype=dtype, device=device), kv_pos=pos.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_embedding_rows_are_read_in_place(dtype, device, poisoned_empty, path):
    """x and residual as tables read at row ids (GPT's wte[tok] + wpe[pos] into ln_1 + c_attn):
    the same out, h and cache as the gathered tensors give, and ids outside a table read zeros."""
    M, H, D, S = 6, 2, 8, 5
    K, N = 40, 3 * H * D
    wte, wpe, w, b, g, beta = _inputs(11, K, N, dtype, device)  # an 11-row "vocabulary", 11 positions
    tok = torch.tensor([3, 0, 10, 3, -2, 11], device=device)  # the last two outside the table
    pos = torch.tensor([0, 4, 2, 1, 3, 20], device=device)
    cache, expected = (torch.zeros(2, M, H, S, D, device=device, dtype=dtype) for _ in range(2))
    x = reference.gather_rows(wte, tok)
    assert torch.equal(x[4], torch.zeros(K, dtype=dtype, device=device)) and torch.equal(x[0], wte[3])
    ref, h_ref = reference.linear(x, w, b, ln=(g, beta, 1e-5), residual=reference.gather_rows(wpe, pos),
                                  kv_cache=expected, kv_pos=pos)  # fmt: skip
    out, h = linear(wte, w, b, ln=(g, beta, 1e-5), residual=wpe, kv_cache=cache, kv_pos=pos, x_rows=tok,
                    residual_rows=pos, backend="triton")  # fmt: skip
    assert out.shape == (M, N) and h.shape == (M, K)
    assert_close(out, ref)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    assert_close(cache, expected)
    torch_out, _ = linear(wte, w, b, ln=(g, beta, 1e-5), residual=wpe, x_rows=tok, residual_rows=pos, backend="torch")
    assert_close(torch_out, ref)
    gathered, _ = linear(wte, w, x_rows=tok, backend="triton")  # only x gathered, no LayerNorm
    assert_close(gathered, reference.linear(x, w, None)[0])


@pytest.mark.parametrize("M", [2, 5, 37])
@pytest.mark.parametrize("K, N", [(200, 40), (200, 17), (700, 17), (96, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_k(dtype, K, N, M, device, poisoned_empty, monkeypatch):
    """The tiled kernel over K in parts (k_splits: 2, 3 and 4 splits of 32-wide steps on the
    interpreter's 4 pretend SMs, the last split shorter; 130 columns: one split) with the caller's
    counters: the parts' sum, in split order, as the reference's; the counters zero again, so a
    second call (a GELU form) is right too. With a LayerNorm the kernel does not split."""
    from fastgpt.kernels import linear as mod

    monkeypatch.setattr(mod, "GEMV_MAX_ROWS", 0)
    x, r, w, b, g, beta = _inputs(M, K, N, dtype, device, row_pad=8)
    block_k = 32 if device == "cpu" else mod.gpu_tiles(max(16, M), N, K, x.element_size(), False)[1]
    sms = mod._INTERPRETER_SMS if device == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count
    expected = {(200, 40): 2, (200, 17): 3, (700, 17): 4, (96, 130): 1}[K, N]
    if device == "cpu":
        assert mod.k_splits(-(-N // 16), -(-K // block_k), sms) == expected
    counters = torch.zeros(-(-N // 16) + 3, dtype=torch.int32, device=device)
    for kwargs in ({}, dict(activation="gelu_tanh"), dict(bias=None)):
        bias = kwargs.pop("bias", b)
        out, _ = linear(x, w, bias, counters=counters, backend="triton", **kwargs)
        ref, _ = reference.linear(x, w, bias, gelu_tanh=kwargs.get("activation") == "gelu_tanh")
        assert_close(out, ref)
        assert counters.count_nonzero() == 0
    out, h = linear(x, w, b, ln=(g, beta, 1e-5), residual=r, counters=counters, backend="triton")
    ref, h_ref = reference.linear(x, w, b, ln=(g, beta, 1e-5), residual=r)
    assert_close(out, ref)
    assert torch.equal(h, h_ref) and counters.count_nonzero() == 0
    torch_out, _ = linear(x, w, b, counters=counters, backend="torch")  # the reference has no use for them
    assert_close(torch_out, reference.linear(x, w, b)[0])


def test_constant_rows(device, poisoned_empty, path):
    """Rows of one value (tests/test_layer_norm.py's constant_rows) LayerNorm to exactly 0 (eps > 0):
    out is the bias, as the reference's, in the tiled kernel's statistics and the matrix-vector
    kernel's (a mean taken as sum(h) / N rounds: the normalised row was +-1 at eps 1e-12)."""
    from tests.test_layer_norm import constant_rows

    for x, r, eps, _ in constant_rows(device):
        if eps == 0 or x.shape[1] > 1000:  # (no NaN rows; the rows the kernels take)
            continue
        w, b = torch.randn(24, x.shape[1], device=device), torch.randn(24, device=device)
        out, _ = linear(x, w, b, ln=(None, None, eps), residual=r, backend="triton")
        torch.testing.assert_close(out, b.expand(4, 24), atol=0, rtol=0)


def test_k_splits_follow_the_shapes(monkeypatch):
    """k_splits: GPT-2's output projections on the H200's 132 SMs (kernels/linear.py), none where
    the grid fills the GPU or K is a step or two, none with SPLIT_K_MAX 1."""
    from fastgpt.kernels import linear as mod

    assert mod.k_splits(48, 12, 132) == 4  # the MLP's c_proj at 32 rows: K 3072 in 256-wide steps
    assert mod.k_splits(48, 6, 132) == 3  # at 16 rows (512-wide steps); the attention's c_proj at 64 rows (128)
    assert mod.k_splits(48, 24, 132) == 4  # at 64 rows (128-wide steps)
    assert mod.k_splits(48, 3, 132) == 1  # the attention's c_proj at 32 rows (256-wide steps)
    assert mod.k_splits(144, 12, 132) == 1  # a grid of more than a wave
    assert mod.k_splits(48, 7, 132) == 3  # 3 steps, 3, 1: no split left empty
    assert mod.k_splits(1, 1000, 132) == mod.SPLIT_K_MAX
    monkeypatch.setattr(mod, "SPLIT_K_MAX", 1)
    assert mod.k_splits(48, 12, 132) == 1


def test_counters_errors(device):
    x, _, w, _, _, _ = _inputs(2, 32, 40, torch.float32, device)
    with pytest.raises(TypeError, match="counters must have dtype"):
        linear(x, w, counters=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"counters must be contiguous with at least cdiv\(N, 16\) = 3"):
        linear(x, w, counters=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="counters must be contiguous"):
        linear(x, w, counters=torch.zeros(6, dtype=torch.int32, device=device)[::2])
    with pytest.raises(ValueError, match="counters must have 1 dim"):
        linear(x, w, counters=torch.zeros(3, 1, dtype=torch.int32, device=device))


def test_row_id_errors(device):
    table, w = torch.randn(9, 32, device=device), torch.randn(16, 32, device=device)
    ids = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match=r"x must be a table \(R, K\) when x_rows is given"):
        linear(table[None], w, x_rows=ids)
    with pytest.raises(TypeError, match="x_rows must have dtype"):
        linear(table, w, x_rows=ids.int())
    with pytest.raises(ValueError, match="residual_rows needs a residual"):
        linear(table, w, x_rows=ids, residual_rows=ids)
    with pytest.raises(ValueError, match="residual_rows must have shape"):
        linear(table, w, ln=(None, None, 1e-5), residual=table, x_rows=ids, residual_rows=ids[:1])
    with pytest.raises(ValueError, match="residual must have shape"):
        linear(table, w, ln=(None, None, 1e-5), residual=table, x_rows=ids)  # (9, 32), not the input's (2, 32)


def test_empty_inputs(device, path):
    """No rows, no outputs, or no inputs: shapes and values as the unfused ops give them."""
    w, b = torch.randn(5, 8, device=device), torch.randn(5, device=device)
    out, _ = linear(torch.randn(0, 8, device=device), w, b, backend="triton")
    assert out.shape == (0, 5)
    out, _ = linear(torch.randn(3, 8, device=device), w[:0], b[:0], backend="triton")
    assert out.shape == (3, 0)
    out, _ = linear(torch.randn(3, 0, device=device), w[:, :0], b, backend="triton")
    assert torch.equal(out, b.expand(3, 5))  # an empty sum, plus the bias


def test_shape_and_backend_errors(device):
    x, r, w, b, g, beta = _inputs(2, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear(x, w[:, :8])
    with pytest.raises(TypeError, match="weight has dtype"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, w, b[:3])
    with pytest.raises(ValueError, match="residual needs ln"):
        linear(x, w, residual=r)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        linear(x, w, ln=(g[:4], None, 1e-5))
    with pytest.raises(ValueError, match="eps"):
        linear(x, w, ln=(g, beta, -1.0))
    with pytest.raises(TypeError, match="ln must be None or a tuple"):
        linear(x, w, ln=g)
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, activation="relu")
    kv, pos = torch.zeros(2, 2, 2, 4, 4, device=device), torch.zeros(2, dtype=torch.int64, device=device)
    w24 = torch.randn(24, 32, device=device)
    with pytest.raises(ValueError, match="pass both or neither"):
        linear(x, w24, kv_cache=kv)
    with pytest.raises(ValueError, match="kv_cache must have shape"):
        linear(x, w, kv_cache=kv, kv_pos=pos)  # N = 16, not 3 H D = 24
    with pytest.raises(TypeError, match="kv_pos must have dtype"):
        linear(x, w24, kv_cache=kv, kv_pos=pos.int())
    with pytest.raises(ValueError, match="unit stride"):
        linear(x, w24, kv_cache=kv.transpose(-1, -2), kv_pos=pos)
    with pytest.raises(BackendUnavailableError, match=f"at most {MAX_ROWS} rows"):
        linear(torch.randn(MAX_ROWS + 1, 32, device=device), w, backend="triton")
    with pytest.raises(BackendUnavailableError, match="linear: backend='cuda'"):
        linear(x, w, backend="cuda")


def test_cuda_is_refused_where_the_extension_runs(monkeypatch):
    """With the extension available (a GPU, the emulator), backend='cuda' passed resolve and
    failed looking up a CUDA linear launcher that does not exist (AttributeError)."""
    real = _backends.why_not
    monkeypatch.setattr(_backends, "why_not", lambda name, device: None if name == "cuda" else real(name, device))
    with pytest.raises(BackendUnavailableError, match="linear: backend='cuda' .* no linear kernel"):
        linear(torch.randn(2, 8), torch.randn(4, 8), backend="cuda")


def test_auto_takes_torch_beyond_the_kernels_rows(device):
    """More rows than the kernel takes (a prefill, a large batch): the unfused ops, same result."""
    x, _, w, b, g, beta = _inputs(MAX_ROWS + 3, 64, 24, torch.float32, device)
    out, _ = linear(x, w, b, ln=(g, beta, 1e-5))
    assert_close(out, reference.linear(x, w, b, ln=(g, beta, 1e-5))[0])


# The forms GPT.decode launches: (residual + LayerNorm, GELU, bias, k/v cache write, embedding
# gathers, N: a vocabulary-wide one takes wider programs).
_FORMS = {"wte + wpe + ln_1 + c_attn": (True, False, True, True, True, 2304),
          "ln_1 + c_attn": (True, False, True, True, False, 2304),
          "ln_2 + c_fc + gelu": (True, True, True, False, False, 3072),
          "c_proj": (False, False, True, False, False, 768),
          "ln_f + lm_head": (True, False, False, False, False, 50257)}
# (A vocabulary-wide matmul without a LayerNorm takes c_proj's tiles: the same kernel as c_proj's.)


def compile_linear_variants(arch):
    """Every form GPT.decode launches, in bf16 and fp32, at 16 and 64 rows, in bf16 at 32 too
    (K 3072; those with a LayerNorm also at 1, whose statistics tiles differ), with its tiles
    (gpu_tiles), lowered for sm_<arch>: no autotuner stands between these launches and the GPU,
    so each must fit even an sm_86/sm_89 block, and its weight loads must be pipelined.
    lm_head's one row's LayerNorm statistics hold no padded rows: at most 128 registers (4
    programs an SM; they were 168 with 16 rows' tiles, 3 programs an SM, which its hundreds of
    programs feel; 112 with its 64 columns, the H200's fastest); at one row no form spills (the
    narrow forms' single wave of programs takes their 256-wide steps' ~120 registers). More rows
    may spill a few bytes (sm_90: lm_head's 64 columns at 16 rows bf16, 8 B, measured the
    fastest there anyway; fp32's embedding form at 64 rows, 24 B). The forms without a LayerNorm
    also with K split (SPLIT), as GPT's output projections launch them."""
    from tests.gpu_compile import ptxas_usage

    mod = load_kernel_module("linear")
    names = ("x_ptr", "r_ptr", "h_ptr", "ln_w_ptr", "ln_b_ptr", "w_ptr", "bias_ptr", "out_ptr", "kv_ptr")
    for dtype in ("bf16", "fp32"):  # fp16's tiles and code are bf16's but for the element type
        ptrs = {name: f"*{dtype}" for name in names} | dict.fromkeys(("kv_pos_ptr", "x_idx_ptr", "r_idx_ptr"), "*i64")
        ptrs |= {"ws_ptr": "*fp32", "counters_ptr": "*i32"}
        rows_tried = (16, 32, mod.MAX_ROWS) if dtype == "bf16" else (16, mod.MAX_ROWS)
        forms = [(form, rows, split) for form in _FORMS.values() for rows in ((1,) if form[0] else ()) + rows_tried
                 for split in ((False,) if form[0] else (False, True))]  # K splits: the forms without a LayerNorm
        for (ln, gelu, bias, kv, gather, N), rows, split in forms:
            block_m = max(16, rows)
            block_n, block_k = mod.gpu_tiles(block_m, N, 3072, 4 if dtype == "fp32" else 2, ln)
            const = {"HAS_RESIDUAL": ln, "HAS_LN": ln, "HAS_LN_WEIGHT": ln, "HAS_LN_BIAS": ln, "HAS_BIAS": bias,
                     "KV_CACHE": kv, "X_GATHER": gather, "R_GATHER": gather, "GELU_TANH": gelu,
                     "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "BLOCK_K": block_k, "STATS_M": rows, "STATS_BLOCK_K": min(mod.STATS_ELEMENTS // rows, 4096),
                     "PREFETCH_W": arch >= 90, "SPLIT": split,
                     "stride_wk": 1}  # the JIT specialises a unit stride  # fmt: skip
            kernel = compile_for(mod._linear_kernel, ptrs, const, arch=arch, num_warps=mod.NUM_WARPS,
                                 num_stages=mod.NUM_STAGES, scalar_types={"eps": "fp32"},
                                 divisible=("K", "k_per_split"))  # fmt: skip
            where = (arch, dtype, ln, gelu, bias, kv, gather, N, rows, split)
            assert kernel.metadata.shared <= SMEM_LIMIT_SM86, (*where, kernel.metadata.shared)
            if rows == 1 and ln and dtype == "bf16":
                registers, spills = ptxas_usage(kernel, arch)
                assert spills == 0 and (registers <= 128 or N < mod.WIDE_N), (*where, registers, spills)
            # K a multiple of 16, as every GPT-2 width is (the JIT specialises on it): the weight
            # tiles stream through shared memory with cp.async, several in flight.
            assert "cp.async" in kernel.asm["ptx"], where
            # sm_90: a programmatic dependent, prefetching its weight rows before it waits (kernels/pdl.py).
            assert ("cp.async.bulk.prefetch.L2" in kernel.asm["ptx"]) == (arch >= 90), where
    assert mod.MAX_ROWS == MAX_ROWS  # the ops layer's copy
    compile_gemv_variants(mod, arch)


def compile_gemv_variants(mod, arch):
    """The matrix-vector kernel in every form at GPT-2's K (768; 3072 for the MLP's c_proj) and 1,
    2 and 4 rows, bf16 and fp32 (within the tile; lm_head's 32 KB, the probe's largest), with
    gemv_columns' programs: its weight rows in 16-byte loads, a small block (no shared memory but
    the reductions'), and at one row no spills in at most 128 registers."""
    from tests.gpu_compile import ptxas_usage

    names = ("x_ptr", "r_ptr", "h_ptr", "ln_w_ptr", "ln_b_ptr", "w_ptr", "bias_ptr", "out_ptr", "kv_ptr")
    mod.GEMV_WIDE_TILE_BYTES = 32 * 1024  # lm_head as gpu-probe's linear tries it at most (a fresh process)
    forms = [(form, K) for name, form in _FORMS.items() for K in ((768, 3072) if name == "c_proj" else (768,))]
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        ptrs = {name: f"*{dtype}" for name in names} | dict.fromkeys(("kv_pos_ptr", "x_idx_ptr", "r_idx_ptr"), "*i64")
        for ((ln, gelu, bias, kv, gather, N), K), rows in ((f, m) for f in forms for m in (1, 2, 4)):
            block_n = mod.gemv_columns(1, N, K, size)
            if block_n == 0:  # fp32's rows at K 3072 pass the tile: the tiled kernel's
                assert (dtype, K) == ("fp32", 3072)
                continue
            const = {"HAS_RESIDUAL": ln, "HAS_LN": ln, "HAS_LN_WEIGHT": ln, "HAS_LN_BIAS": ln, "HAS_BIAS": bias,
                     "KV_CACHE": kv, "X_GATHER": gather, "R_GATHER": gather, "GELU_TANH": gelu, "BLOCK_M": rows,
                     "BLOCK_N": block_n, "BLOCK_K": 1 << (K - 1).bit_length(), "PREFETCH_W": arch >= 90,
                     "stride_wk": 1}  # fmt: skip
            kernel = compile_for(mod._gemv_kernel, ptrs, const, arch=arch, num_warps=mod.GEMV_WARPS, num_stages=1,
                                 scalar_types={"eps": "fp32"}, divisible=("K",))  # fmt: skip
            where = (arch, dtype, ln, gelu, kv, gather, N, K, rows)
            ptx = kernel.asm["ptx"]
            assert kernel.metadata.shared <= 1024, (*where, kernel.metadata.shared)
            assert "ld.global.v4" in ptx, where
            assert ("cp.async.bulk.prefetch.L2" in ptx) == (arch >= 90), where
            if rows == 1:
                registers, spills = ptxas_usage(kernel, arch)
                assert spills == 0 and registers <= 128, (*where, registers, spills)


@pytest.mark.parametrize("arch", [80, 90])  # ~50 s each: two tests, for two workers
def test_compiles_for_gpu(arch):
    run_compile_check("tests.test_linear.compile_linear_variants", (arch,))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("K, N", [(768, 2304), (768, 3072), (3072, 768), (768, 50257), (1600, 4800)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpt2_shapes_on_gpu(dtype, K, N, M, poisoned_empty, path):
    x, r, w, b, g, beta = _inputs(M, K, N, dtype, "cuda", row_pad=8)
    _check(x, w, b, ln=(g, beta, 1e-5), residual=r, activation="gelu_tanh" if N == 4 * K else None)
    _check(x, w, b)
