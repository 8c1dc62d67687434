"""The Triton split-KV decode attention (kernels/decode.py) against fastgpt.reference in fp32.

Reached through the public API, fastgpt.decode_attention(..., backend="triton"). Without CUDA the
kernels run in Triton's interpreter with 16-position blocks and a pretend 4-SM GPU, so small
caches already take several splits (the plan is asserted where a case depends on it). `gpu` tests
run bf16/fp16 at real sizes and capture the op in a CUDA graph.
"""

import pytest
import torch

import fastgpt
from fastgpt import reference
from tests.gpu_compile import (
    SMEM_LIMIT,
    SMEM_LIMIT_SM86,
    compile_for,
    load_kernel_module,
    ptxas_spills,
    run_compile_check,
    run_isolated,
)
from tests.helpers import assert_close


def _interpreter_plan(B, Hkv, Smax):
    """(num_splits, chunk) the launcher picks on CPU tensors when each KV head's query heads fit
    one program (B * Hkv programs per split)."""
    from fastgpt.kernels import decode

    return decode.split_plan(B * Hkv, Smax, decode._INTERPRETER_BLOCK_N, decode._INTERPRETER_SMS)


def test_split_plan_follows_the_measurements():
    """On an H200's 132 SMs (64-position blocks): grids of more than 2 programs an SM run in one
    split (B32 H12 L288 and B64 H12 L4096 were as fast or faster so), smaller ones split (B1
    H12 L1024; B8 H32 L4096, 256 programs, was 156 us in one split, 129 in 3), never into
    chunks shorter than 2 blocks."""
    from fastgpt.kernels import decode

    assert decode.split_plan(32 * 12, 288, 64, 132)[0] == 1
    assert decode.split_plan(64 * 12, 4096, 64, 132)[0] == 1
    assert decode.split_plan(12, 1024, 64, 132) == (8, 128)
    assert decode.split_plan(8 * 32, 4096, 64, 132)[0] == 3


def test_launchers_size_their_grids_as_triton_does():
    """The launchers' host arithmetic (kernels/sizes.py, a cheap stand-in for Triton's constexpr
    functions) gives Triton's answers."""
    import triton

    from fastgpt.kernels.sizes import cdiv, next_power_of_2

    for n in [*range(0, 300), 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def _inputs(B, Hq, Hkv, Smax, D, dtype, device, seed=0, Sq=1):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return randn(B, Hq, Sq, D), randn(B, Hkv, Smax, D), randn(B, Hkv, Smax, D)


def _check(q, k_cache, v_cache, lengths, *, scale=None):
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    out = fastgpt.decode_attention(q, k_cache, v_cache, seqlens, scale=scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert not out.isnan().any()
    expected = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), seqlens, scale=scale)
    assert_close(out, expected, dtype=q.dtype)
    Smax, Sq = k_cache.shape[2], q.shape[2]
    # Query i of row b sees positions up to len_b - Sq + i (clamped length): none below 0, exactly zero.
    blind = torch.tensor([[min(max(n, 0), Smax) - Sq + i < 0 for i in range(Sq)] for n in lengths], device=q.device)
    assert (out.transpose(1, 2)[blind] == 0).all()
    return out


# ----------------------------------------------------------------------------- CPU (interpreter) and GPU


def test_slots_past_each_length_are_never_read(device):
    """An uninitialised cache tail (NaN, inf) must not reach the output: the kernel never loads it."""
    q, k_cache, v_cache = _inputs(3, 4, 2, 40, 32, torch.float32, device)
    lengths = [5, 17, 33]
    for b, n in enumerate(lengths):
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("inf")
    _check(q, k_cache, v_cache, lengths)


def test_edge_lengths(device):
    """1, Smax, 0, beyond Smax (clamped), negative (clamped to 0), and not multiples of a block."""
    Smax = 50
    lengths = [1, Smax, 0, Smax + 7, -4, 17, 33, 49]
    _check(*_inputs(len(lengths), 2, 2, Smax, 32, torch.float32, device), lengths)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_lengths(device, seed):
    Smax = 64
    gen = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(0, Smax + 1, (5,), generator=gen).tolist()
    _check(*_inputs(5, 4, 2, Smax, 32, torch.float16, device, seed=seed), lengths)


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 1), (3, 3), (16, 1), (40, 2)])
def test_gqa_mqa(device, Hq, Hkv):
    """Groups 1, 3 and 4 take a 16-row tile padded with zero rows, 16 a full one,
    and 20 two tiles of query heads (fp32 tiles hold 16) over the same KV head."""
    _check(*_inputs(2, Hq, Hkv, 40, 32, torch.float32, device, seed=Hq), [40, 23])


@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq", [1, 4])
def test_head_dims_and_dtypes(device, D, dtype, Hq):
    _check(*_inputs(2, Hq, 1, 37, D, dtype, device, seed=D), [37, 20])


def test_small_head_dim(device):
    _check(*_inputs(2, 4, 2, 33, 8, torch.float32, device), [33, 16])


def test_strided_seqlens(device):
    """cache_seqlens as a strided view (every other element of a longer tensor)."""
    q, k_cache, v_cache = _inputs(3, 2, 1, 40, 32, torch.float32, device, seed=9)
    seqlens = torch.tensor([40, -1, 7, -1, 0, -1], dtype=torch.int32, device=device)[::2]
    out = fastgpt.decode_attention(q, k_cache, v_cache, seqlens, backend="triton")
    expected = reference.decode_attention(q, k_cache, v_cache, seqlens.contiguous())
    assert_close(out, expected)


def test_largest_head_dim(device):
    _check(*_inputs(2, 4, 2, 33, 256, torch.float16, device), [33, 5])


def test_many_splits(device):
    """Two rows, one KV head, a long cache: many splits, some past the second row's length (empty)."""
    Smax = 300
    num_splits, chunk = _interpreter_plan(2, 1, Smax)
    if device == "cpu":
        assert num_splits >= 6
    _check(*_inputs(2, 1, 1, Smax, 32, torch.float32, device, seed=4), [Smax, chunk + 3])


def test_single_split(device):
    """Enough (row, KV head) programs to fill the GPU: one split, no combine pass."""
    B, Hkv = 4, 4
    if device == "cpu":
        assert _interpreter_plan(B, Hkv, 48)[0] == 1
    _check(*_inputs(B, 4, Hkv, 48, 32, torch.float16, device, seed=5), [48, 1, 0, 31])


def test_non_contiguous_views(device):
    """q sliced from a wider buffer; the caches as a (B, Smax, Hkv, D) layout and a prefix of a longer cache."""
    B, Hq, Hkv, Smax, D = 3, 4, 2, 40, 64
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(B, Hq, 1, D + 16, generator=gen).half().to(device)[..., :D]
    k_cache = torch.randn(B, Smax, Hkv, D, generator=gen).half().to(device).transpose(1, 2)
    v_cache = torch.randn(B, Hkv, Smax + 24, D, generator=gen).half().to(device)[:, :, :Smax]
    assert not (q.is_contiguous() or k_cache.is_contiguous() or v_cache.is_contiguous())
    _check(q, k_cache, v_cache, [40, 9, 26])


def test_scale_and_large_logits(device):
    q, k_cache, v_cache = _inputs(2, 2, 1, 45, 64, torch.float32, device, seed=8)
    _check(q * 4, k_cache, v_cache, [45, 44], scale=1.0)


def check_large_offsets(device):
    """Caches as views into a buffer of 2^31 fp16 elements (its pages stay untouched). Position
    stride 2^23 + 64 over 257 positions: the last positions' offsets pass 2^31 (int32 offsets
    would wrap and read outside). Then 9 positions of stride 2^28 + 32, so that positions within
    one block pass 2^31: the launcher copies such views."""
    try:
        buf = torch.empty(2**31 + 2**16, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a 4 GiB buffer: {e}")
    for Smax, stride, lengths in [(257, 2**23 + 64, [257, 200]), (9, 2**28 + 32, [9, 4])]:
        q, k_src, v_src = _inputs(2, 4, 2, Smax, 16, torch.float16, device, seed=Smax)
        k_cache, v_cache = (buf[i * 32:].as_strided((2, 2, Smax, 16), (0, 16, stride, 1)) for i in range(2))
        k_cache[0].copy_(k_src[0])  # batch stride 0: both rows read the same cache
        v_cache[0].copy_(v_src[0])
        _check(q, k_cache, v_cache, lengths)


def test_large_offsets(device):
    """Offsets past 2^31 elements; in a subprocess on the CPU, where a wrapped offset crashes the
    interpreter (it reads raw memory)."""
    if device == "cuda":
        check_large_offsets(device)
    else:
        run_isolated("tests.test_decode.check_large_offsets('cpu')")


def test_blocks_within_the_offset_bound():
    """Every GPU tile keeps its positions within _MAX_BLOCK_N, the bound the launcher's copy of
    huge-stride views relies on."""
    from fastgpt.kernels import decode

    for group in (1, 2, 8, 64, 128):
        for D in (8, 64, 80, 128, 256):
            for fp32 in (False, True):
                assert decode.gpu_tiles(group, D, fp32).block_n <= decode._MAX_BLOCK_N
    assert decode._INTERPRETER_BLOCK_N <= decode._MAX_BLOCK_N


@pytest.mark.parametrize("B,Hq,Hkv,Smax,D", [(3, 4, 4, 100, 32), (2, 8, 2, 90, 64), (1, 1, 1, 300, 16),
                                              (2, 40, 2, 70, 32), (2, 4, 2, 20, 32)])
def test_counters_merge_the_splits_in_the_split_kernel(device, B, Hq, Hkv, Smax, D, poisoned_empty):
    """With counters (GPT's decode step), the last split of each program row merges them: the
    output of the combine kernel's merge, the counters zero again, call after call (a single
    split, the last case, reads none)."""
    from fastgpt.kernels.decode import decode_attention as triton_decode

    counters = torch.zeros(B * Hq + 3, dtype=torch.int32, device=device)
    for seed in range(2):
        q, k, v = _inputs(B, Hq, Hkv, Smax, D, torch.float32, device, seed=seed)
        lengths = torch.tensor([Smax, Smax // 3 + seed, 0][:B], dtype=torch.int32, device=device)
        merged = triton_decode(q, k, v, lengths, scale=0.3, counters=counters)
        assert (counters == 0).all()
        torch.testing.assert_close(merged, triton_decode(q, k, v, lengths, scale=0.3), atol=1e-6, rtol=1e-6)
        assert_close(merged, reference.decode_attention(q, k, v, lengths, scale=0.3))
    assert (merged[-1] == 0).all() == (B == 3)  # the empty row
    assert device != "cpu" or (_interpreter_plan(B, Hkv, Smax)[0] > 1) == (Smax != 20)


@pytest.mark.parametrize("counters, error, match", [
    (torch.zeros(4, dtype=torch.int64), TypeError, "counters must have dtype"),
    (torch.zeros(3, dtype=torch.int32), ValueError, r"at least B \* Hq \* Sq = 4"),
    (torch.zeros(8, dtype=torch.int32)[::2], ValueError, "contiguous"),
    (torch.zeros(2, 2, dtype=torch.int32), ValueError, "counters must have 1 dimensions"),
])  # fmt: skip
def test_bad_counters(counters, error, match):
    from fastgpt.ops.decode import decode_step_attention

    q, k, v = _inputs(2, 2, 1, 8, 16, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        decode_step_attention(q, k, v, torch.tensor([8, 3], dtype=torch.int32), counters, backend="torch")


@pytest.mark.parametrize("Smax", [100, 20], ids=["splits", "one-split"])
@pytest.mark.parametrize("Hq,Hkv,mask_heads", [(4, 4, 4), (8, 2, 1), (8, 2, 8)], ids=["mha", "gqa-shared", "gqa-per-head"])
def test_mask_hides_positions_per_head(device, Hq, Hkv, mask_heads, Smax, poisoned_empty):
    """With a mask (transformers' padded decode steps), a head sees the positions below its row's
    length that the mask keeps, over several splits or one; a head that sees none gets zeros."""
    from fastgpt.kernels.decode import decode_attention as triton_decode

    B, D = 3, 32
    assert (_interpreter_plan(B, Hkv, Smax)[0] > 1) == (Smax == 100)
    q, k, v = _inputs(B, Hq, Hkv, Smax, D, torch.float32, device, seed=Hq + mask_heads)
    mask = torch.rand(B, mask_heads, Smax, generator=torch.Generator().manual_seed(mask_heads)).to(device) > 0.5
    mask[:, :, : Smax // 3] = False  # left padding
    mask[2, 0] = False  # head 0 of row 2 (all heads when the mask is shared) sees nothing
    lengths = torch.tensor([Smax, Smax * 7 // 10, Smax], dtype=torch.int32, device=device)
    out = triton_decode(q, k, v, lengths, scale=0.3, mask=mask[:, :, None].expand(B, Hq, 1, Smax))
    visible = mask & (torch.arange(Smax, device=device) < lengths[:, None, None])  # (B, 1|Hq, Smax)
    grouped = visible[:, :, None, None] if mask_heads == 1 else visible.view(B, Hkv, Hq // Hkv, 1, Smax)
    assert_close(out, reference.masked_attention(q, k, v, grouped, 0.3))
    assert (out[2, 0] == 0).all()


# ----------------------------------------------------------------------------- several queries a row


@pytest.mark.parametrize("Sq", [2, 3, 5, 16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa-3", "mqa-8"])
def test_several_queries_a_row_are_causal(device, Sq, Hq, Hkv, poisoned_empty):
    """Speculative decoding's drafts: a row's Sq new tokens are its last Sq positions, each seeing
    the cache up to its own; (head, query) pairs of a KV head share its tile (MQA-8 at Sq 16:
    128 pairs, several tiles), lengths below Sq leave the first queries blind (zeros), over
    several splits (Smax 70) and one (Smax 20)."""
    for Smax, lengths in [(70, [70, Sq + 1, Sq - 1, 0, 90]), (20, [20, 1, Sq, 11, -3])]:
        _check(*_inputs(len(lengths), Hq, Hkv, Smax, 32, torch.float32, device, seed=Sq * Hq + Smax, Sq=Sq), lengths)


def test_several_queries_fp16_head_dims_and_strided_q(device):
    """fp16 at head dims 64 and 80, and q as the (B, Sq, Hq, D) layout a model's projection gives."""
    for D in (64, 80):
        q, k, v = _inputs(2, 4, 2, 45, D, torch.float16, device, seed=D, Sq=4)
        _check(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, [45, 9])


def test_several_queries_equal_causal_attention_over_the_valid_cache(device):
    """Over a full row, decode attention of Sq queries is fastgpt.attention's causal (bottom-right)
    attention of those queries over the cache."""
    q, k, v = _inputs(2, 6, 3, 40, 32, torch.float32, device, seed=3, Sq=7)
    lengths = torch.tensor([40, 25], dtype=torch.int32, device=device)
    out = fastgpt.decode_attention(q, k, v, lengths, backend="triton")
    for b, n in enumerate(lengths.tolist()):
        row = reference.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal=True)
        assert_close(out[b : b + 1], row)


@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
@pytest.mark.parametrize("counters", [False, True], ids=["combine-kernel", "merged-here"])
def test_several_queries_log_sum_exp_and_counters(device, counters, token_major, poisoned_empty):
    """return_lse per (head, query), -inf for a blind query; with counters the split kernel's own
    merge (counters for B * Hq * Sq rows, zero again afterwards). token_major: the output written
    as (B, Sq, Hq, D) (GPT's verify step), both by the split kernel and by the combine kernel."""
    from fastgpt.ops.decode import decode_step_attention

    B, Hq, Hkv, Smax, Sq = 3, 8, 2, 100, 3
    q, k, v = _inputs(B, Hq, Hkv, Smax, 32, torch.float32, device, seed=21, Sq=Sq)
    lengths = torch.tensor([Smax, 2, 50], dtype=torch.int32, device=device)
    state = torch.zeros(B * Hq * Sq, dtype=torch.int32, device=device) if counters else None
    res = decode_step_attention(q, k, v, lengths, state, scale=0.3, backend="triton", return_lse=True,
                                token_major=token_major)  # fmt: skip
    assert (res.out.transpose(1, 2) if token_major else res.out).is_contiguous()
    out, lse = reference.decode_attention(q.double(), k.double(), v.double(), lengths, scale=0.3, return_lse=True)
    assert_close(res.out, out.float())
    torch.testing.assert_close(res.lse, lse.float(), atol=2e-5, rtol=2e-5)
    assert (res.lse[1, :, 0] == float("-inf")).all() and (res.out[1, :, 0] == 0).all()  # row 1's first query
    assert not counters or (state == 0).all()


@pytest.mark.parametrize("Sq", [1, 4])
def test_several_queries_under_a_mask(device, Sq, poisoned_empty):
    """A mask (B, Hq, Sq, Smax), per (head, query) and broadcast, on top of the causal limit."""
    from fastgpt.kernels.decode import decode_attention as triton_decode

    B, Hq, Hkv, Smax = 2, 4, 2, 60
    q, k, v = _inputs(B, Hq, Hkv, Smax, 32, torch.float32, device, seed=Sq, Sq=Sq)
    lengths = torch.tensor([Smax, 33], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(7)
    for mask in (torch.rand(B, Hq, Sq, Smax, generator=gen) > 0.4, torch.rand(1, 1, 1, Smax, generator=gen) > 0.4):
        mask = mask.to(device)
        mask[..., :5] = False
        out = triton_decode(q, k, v, lengths, scale=0.3, mask=mask.expand(B, Hq, Sq, Smax))
        last_seen = lengths[:, None] - Sq + torch.arange(Sq, device=device)  # (B, Sq)
        visible = mask & (torch.arange(Smax, device=device) <= last_seen[:, None, :, None])  # (B, Hq, Sq, Smax)
        grouped = visible.expand(B, Hq, Sq, Smax).view(B, Hkv, Hq // Hkv, Sq, Smax)
        assert_close(out, reference.masked_attention(q, k, v, grouped, 0.3))


def _expected_lse(q, k_cache, lengths, scale):
    """ln sum_j exp(q k_j * scale) over each row's first lengths[b] positions, in fp64: (B, Hq, 1)."""
    B, Hq, _, D = q.shape
    k = k_cache.double().repeat_interleave(Hq // k_cache.shape[1], dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale  # (B, Hq, 1, Smax)
    past = torch.arange(k.shape[2], device=q.device) >= lengths.clamp(0, k.shape[2])[:, None, None, None]
    return scores.masked_fill(past, float("-inf")).logsumexp(-1).float()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("B,Hq,Hkv,Smax,counters", [(4, 4, 4, 48, False), (3, 8, 2, 100, False),
                                                     (3, 8, 2, 100, True), (2, 40, 2, 70, True)],
                         ids=["one-split", "combine-kernel", "merged-here", "gqa-two-tiles-merged"])  # fmt: skip
def test_log_sum_exp(device, backend, B, Hq, Hkv, Smax, counters, poisoned_empty):
    """return_lse: each head's natural-log sum of exp(scores) over its row's positions, -inf for a
    row of length 0, beside the output it gives without; from one split, the combine kernel and the
    split kernel's own merge (counters), which agrees with the combine kernel's."""
    from fastgpt.ops.decode import decode_step_attention

    q, k, v = _inputs(B, Hq, Hkv, Smax, 32, torch.float32, device, seed=Hq + Smax)
    lengths = torch.tensor([Smax, 0, Smax // 3, 1][:B], dtype=torch.int32, device=device)
    if backend == "triton" and device == "cpu":
        assert (_interpreter_plan(B, Hkv, Smax)[0] > 1) == (Smax != 48)
    zeros = torch.zeros(B * Hq, dtype=torch.int32, device=device) if counters else None
    res = decode_step_attention(q, k, v, lengths, zeros, scale=0.3, backend=backend, return_lse=True)
    assert isinstance(res, fastgpt.AttentionOutput)
    assert res.lse.shape == (B, Hq, 1) and res.lse.dtype == torch.float32 and res.lse.is_contiguous()
    expected = _expected_lse(q, k, lengths, 0.3)
    assert torch.equal(res.lse.isneginf(), expected.isneginf()) and res.lse[1].isneginf().all()
    torch.testing.assert_close(res.lse, expected, atol=2e-5, rtol=2e-5)
    # On a GPU the variant that stores the lse is another compile, and the split kernel's merge
    # steps over the splits in other blocks than the combine kernel: equal up to rounding there.
    plain = fastgpt.decode_attention(q, k, v, lengths, scale=0.3, backend=backend)
    torch.testing.assert_close(res.out, plain, atol=1e-6, rtol=1e-5)
    if counters:
        assert (zeros == 0).all()
        unmerged = fastgpt.decode_attention(q, k, v, lengths, scale=0.3, backend=backend, return_lse=True)
        torch.testing.assert_close(res.lse, unmerged.lse, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the point: inf - inf
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's max of it
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("Smax", [100, 48], ids=["splits", "one-split"])
def test_log_sum_exp_is_nan_where_the_softmax_is(device, backend, Smax):
    """An inf in a row's q (scores +-inf, a NaN softmax) gives that head a NaN output and lse on
    every backend, over one split or several; the other heads are untouched."""
    q, k, v = _inputs(2, 4, 2, Smax, 32, torch.float32, device, seed=3)
    q[1, 2, 0, 5] = float("inf")
    lengths = torch.tensor([Smax, Smax - 7], dtype=torch.int32, device=device)
    res = fastgpt.decode_attention(q, k, v, lengths, backend=backend, return_lse=True)
    nan = torch.zeros(2, 4, 1, dtype=torch.bool, device=device)
    nan[1, 2] = True
    assert torch.equal(res.lse.isnan(), nan) and torch.equal(res.out.isnan().any(-1), nan)
    with pytest.raises(TypeError, match="return_lse must be a Python bool"):
        fastgpt.decode_attention(q, k, v, lengths, backend=backend, return_lse=None)


def test_log_sum_exp_merges_a_shared_prefix_with_each_row(device):
    """What the lse is for: attention over a prompt prefix every row shares (computed once, by
    fastgpt.attention) merged with each row's own decode attention by their log-sum-exps equals
    decode attention over the prefix and the row's cache together."""
    B, Hq, Hkv, P, Smax, D = 3, 4, 2, 20, 40, 32
    q, k, v = _inputs(B, Hq, Hkv, Smax, D, torch.float32, device, seed=11)
    _, k_prefix, v_prefix = _inputs(1, Hq, Hkv, P, D, torch.float32, device, seed=12)
    lengths = torch.tensor([Smax, 9, 0], dtype=torch.int32, device=device)
    shared = fastgpt.attention(q.transpose(0, 2), k_prefix, v_prefix, backend="triton", return_lse=True)
    own = fastgpt.decode_attention(q, k, v, lengths, backend="triton", return_lse=True)
    prefix_out, prefix_lse = shared.out.transpose(0, 2), shared.lse.transpose(0, 2)  # (B, Hq, 1, D), (B, Hq, 1)
    lse = torch.logaddexp(prefix_lse, own.lse)
    merged = prefix_out * (prefix_lse - lse).exp()[..., None] + own.out * (own.lse - lse).exp()[..., None]
    whole_k = torch.cat([k_prefix.expand(B, -1, -1, -1), k], dim=2)
    whole_v = torch.cat([v_prefix.expand(B, -1, -1, -1), v], dim=2)
    whole = fastgpt.decode_attention(q, whole_k, whole_v, lengths + P, backend="triton", return_lse=True)
    assert_close(merged, whole.out)
    torch.testing.assert_close(lse, whole.lse, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- compile for the GPU


def compile_decode_variants(arch):
    """The split kernel at MHA and GQA tiles, with and without a mask, with and without its own
    merge of the splits (which must not spill: GPT's decode step takes it), with and without the
    log-sum-exp, and the combine kernel."""
    mod = load_kernel_module("decode")
    variants = [("fp16", 64, 1, False, False, False), ("bf16", 128, 4, False, False, True),
                ("bf16", 256, 64, False, False, False), ("fp32", 80, 2, False, False, True),
                ("fp32", 256, 32, False, False, False), ("fp16", 64, 1, True, False, False),
                ("bf16", 128, 8, True, False, False), ("bf16", 64, 1, False, True, False),
                ("fp16", 128, 8, False, True, False), ("bf16", 64, 1, False, True, True)]
    for dtype, D, group, has_mask, merge, lse in variants:
        kernel = compile_split(mod, arch, dtype, D, group, has_mask, merge, store_lse=lse)
        assert kernel.metadata.shared <= SMEM_LIMIT[arch], (arch, dtype, D, group, kernel.metadata.shared)
        if merge:
            assert ptxas_spills(kernel, arch) == 0, (arch, dtype, D, group)
    for dtype, D, pairs, merge in [("bf16", 64, 16, False), ("fp16", 128, 32, False), ("bf16", 64, 16, True)]:
        # a few causal queries a row; merged here: GPT's verify step, token-major
        kernel = compile_split(mod, arch, dtype, D, pairs, False, merge, causal=True, token_major=merge)
        assert kernel.metadata.shared <= SMEM_LIMIT[arch], (arch, dtype, D, pairs, kernel.metadata.shared)
        assert ptxas_spills(kernel, arch) == 0, (arch, dtype, D, pairs)
    ptrs = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "o_ptr": "*bf16", "o_lse_ptr": "*fp32"}
    for lse in (False, True):
        compile_for(mod._decode_combine_kernel, ptrs, dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_S=32, STORE_LSE=lse,
                                                           TOKEN_MAJOR=lse), arch=arch, num_warps=4, num_stages=1)
    if arch == 80:  # no autotuner skips a tile too large for an sm_86/sm_89 block: the widest fit
        for dtype, D, group in [("bf16", 128, 64), ("bf16", 256, 64), ("fp32", 128, 64), ("fp32", 256, 64)]:
            kernel = compile_split(mod, 80, dtype, D, group, False)
            assert kernel.metadata.shared <= SMEM_LIMIT_SM86, (dtype, D, group, kernel.metadata.shared)


def compile_split(mod, arch, dtype, D, group, has_mask, merge=False, num_splits=8, store_lse=False, causal=False,
                  token_major=False):  # fmt: skip
    """_decode_split_kernel lowered for sm_<arch> with the launcher's tiles (group: pairs, group * Sq)."""
    tiles = mod.gpu_tiles(group, D, dtype == "fp32")
    ptrs = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "seqlens_ptr": "*i32",
            "o_ptr": f"*{dtype}", "o_lse_ptr": "*fp32", "o_part_ptr": "*fp32", "lse_ptr": "*fp32",
            "counters_ptr": "*i32", "mask_ptr": "*u8"}  # fmt: skip
    merge_splits = mod.merge_splits_block(num_splits, tiles.block_g, tiles.block_d)
    const = dict(HEAD_DIM=D, BLOCK_D=tiles.block_d, BLOCK_G=tiles.block_g, BLOCK_N=tiles.block_n, SINGLE_SPLIT=False,
                 MERGE_HERE=merge, MERGE_SPLITS=merge_splits, CAUSAL=causal, HAS_MASK=has_mask, STORE_LSE=store_lse,
                 TOKEN_MAJOR=token_major,
                 DOT_PRECISION=mod._FP32_DOT_PRECISION if dtype == "fp32" else "tf32")  # fmt: skip
    return compile_for(mod._decode_split_kernel, ptrs, const, arch=arch, num_warps=tiles.num_warps,
                       num_stages=tiles.num_stages)


def test_compiles_for_gpu():
    """The split and combine kernels lower to sm_80 and sm_90 cubins within shared memory; the
    widest tiles also fit an sm_86/sm_89 block."""
    run_compile_check("tests.test_decode.compile_decode_variants")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,Hq,Hkv,Smax,D",
    [(64, 12, 12, 4096, 64), (1, 12, 12, 1024, 64), (2, 32, 8, 32768, 128), (1, 8, 1, 32768, 128),
     (4, 16, 4, 5000, 80), (3, 8, 2, 2048, 256)],
)
def test_gpu_real_sizes(B, Hq, Hkv, Smax, D, dtype):
    gen = torch.Generator().manual_seed(B * Smax)
    lengths = torch.randint(1, Smax + 1, (B,), generator=gen)
    lengths[0] = Smax
    if B > 2:
        lengths[1], lengths[2] = 1, 0
    q, k_cache, v_cache = _inputs(B, Hq, Hkv, Smax, D, dtype, "cuda")
    out = _check(q, k_cache, v_cache, lengths.tolist())
    seqlens = lengths.to(device="cuda", dtype=torch.int32)
    res = fastgpt.decode_attention(q, k_cache, v_cache, seqlens, backend="triton", return_lse=True)
    assert_close(res.out, out, dtype=dtype)  # another compile of the kernel (it stores the lse too)
    torch.testing.assert_close(res.lse, _expected_lse(q, k_cache, seqlens, D**-0.5), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """Captured once, replayed with new queries and lengths written in place: no host sync inside."""
    B, Hq, Hkv, Smax, D = 4, 16, 4, 8192, 128
    q, k_cache, v_cache = _inputs(B, Hq, Hkv, Smax, D, torch.bfloat16, "cuda")
    seqlens = torch.tensor([Smax, 1, 4000, 0], dtype=torch.int32, device="cuda")

    def step():
        return fastgpt.decode_attention(q, k_cache, v_cache, seqlens, backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for lengths in ([Smax, 1, 4000, 0], [17, Smax + 100, 0, 8000], [1, 1, 1, 1]):
        q.copy_(torch.randn_like(q))
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), seqlens)
        assert_close(out, expected, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Smax,D", [(1, 12, 12, 288, 64), (16, 12, 12, 288, 64), (2, 32, 8, 32768, 128)])
def test_gpu_counters_merge_without_races(B, Hq, Hkv, Smax, D):
    """The split kernel's own merge at GPT-2's generate shapes (B32 takes one split on an H200:
    B16 splits there) and a long GQA cache, 50 calls: every output the same (a
    merge reading a partial before it lands would move it), the combine kernel's within fp32
    rounding, the counters zero after each call."""
    from fastgpt.kernels.decode import _plan
    from fastgpt.kernels.decode import decode_attention as triton_decode

    assert _plan(torch.device("cuda", torch.cuda.current_device()), B, Hkv, Smax, Hq // Hkv, D, False)[2] > 1
    q, k, v = _inputs(B, Hq, Hkv, Smax, D, torch.bfloat16, "cuda")
    lengths = torch.randint(1, Smax + 1, (B,), generator=torch.Generator().manual_seed(B), dtype=torch.int32).cuda()
    counters = torch.zeros(B * Hq, dtype=torch.int32, device="cuda")
    first = triton_decode(q, k, v, lengths, scale=D**-0.5, counters=counters)
    for _ in range(50):
        assert torch.equal(triton_decode(q, k, v, lengths, scale=D**-0.5, counters=counters), first)
    assert (counters == 0).all()
    # The two merges sum in different groups: fp32 rounding, then at most a bf16 step apart.
    torch.testing.assert_close(first, triton_decode(q, k, v, lengths, scale=D**-0.5), atol=1e-2, rtol=2**-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Smax,D,Sq", [(1, 32, 8, 32768, 128, 4), (1, 32, 8, 4096, 128, 16),
                                                 (16, 32, 8, 4096, 128, 8), (8, 12, 12, 1024, 64, 5)])
def test_gpu_several_queries_a_row(B, Hq, Hkv, Smax, D, Sq, dtype):
    """Drafts verified over real caches (128 pairs of a KV head at Sq 16: two tiles), a row
    shorter than its drafts, through the merge of a decode step's counters too."""
    from fastgpt.ops.decode import decode_step_attention

    lengths = torch.randint(Sq, Smax + 1, (B,), generator=torch.Generator().manual_seed(Sq * B))
    lengths[0] = Smax
    if B > 1:
        lengths[1] = Sq // 2
    q, k_cache, v_cache = _inputs(B, Hq, Hkv, Smax, D, dtype, "cuda", Sq=Sq)
    out = _check(q, k_cache, v_cache, lengths.tolist())
    counters = torch.zeros(B * Hq * Sq, dtype=torch.int32, device="cuda")
    seqlens = lengths.to(device="cuda", dtype=torch.int32)
    merged = decode_step_attention(q, k_cache, v_cache, seqlens, counters, backend="triton")
    assert (counters == 0).all()
    torch.testing.assert_close(merged, out, atol=1e-2, rtol=2**-7)  # two merges: fp32 rounding, a bf16 step apart
