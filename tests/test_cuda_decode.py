"""The CUDA backend's decode attention (csrc/decode.cu) against fastgpt.reference and its definition:
one query a row (a decode step) and several (speculative decoding's drafts), splits merged by a
kernel or by the last split, masks, the log-sum-exp.

As tests/test_cuda_kernels.py (whose fixtures and helpers these share): on a GPU every test is
`gpu` and runs the built extension at real sizes; on a CPU the kernels run on tests/simt/'s SIMT
emulator at small sizes, their outputs poisoned beforehand.
"""

import pytest
import torch

import fastgpt
from fastgpt import reference
from fastgpt.ops import _cuda
from tests.conftest import HAS_CUDA
from tests.helpers import assert_close
from tests.test_cuda_kernels import (  # noqa: F401 (extension and _poisoned: autouse fixtures)
    DEVICE,
    HALF,
    _num_splits,
    _poisoned,
    _randn,
    _tensor,
    extension,
    on_gpu,
)

pytestmark = [pytest.mark.gpu] if HAS_CUDA else []


# ----------------------------------------------------------------------------- decode


DECODE_SHAPES = [  # B, Hq, Hkv, Smax
    (1, 1, 1, 1),
    (3, 12, 12, 100),
    (4, 8, 2, 333),
    (2, 6, 2, 64),     # group 3: one padded head per tile
    (2, 16, 1, 513),   # MQA: two tiles of 8 heads
    (1, 4, 4, 3000),   # several splits (on the emulator's 4 SMs too)
    *on_gpu((2, 12, 2, 1000), (1, 8, 8, 16384), (1, 32, 8, 5000)),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_matches_reference(shape, D, dtype):
    B, Hq, Hkv, Smax = shape
    q = _randn(B, Hq, 1, D, dtype=dtype)
    k, v = _randn(B, Hkv, Smax, D, dtype=dtype, seed=1), _randn(B, Hkv, Smax, D, dtype=dtype, seed=2)
    lens = torch.randint(1, Smax + 1, (B,), generator=torch.Generator().manual_seed(3), dtype=torch.int32).to(DEVICE)
    lens[0] = Smax
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), dtype)


@pytest.mark.skipif(HAS_CUDA, reason="the emulator's SM count")
def test_decode_splits_the_long_cache_on_the_emulator():
    assert _num_splits(1, 4, 4, 3000, torch.float16) > 1  # on EMULATOR_SMS = 4 SMs


@pytest.mark.parametrize("Smax", [50, 4096])
def test_decode_lengths_are_clamped_on_the_device(Smax):
    q = _randn(5, 4, 1, 128, dtype=torch.bfloat16)
    k, v = (_randn(5, 2, Smax, 128, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    lens = _tensor([0, -7, Smax + 100, 1, Smax], torch.int32)
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    expected = reference.decode_attention(q.float(), k.float(), v.float(), lens)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert_close(out, expected, torch.bfloat16)


def test_decode_strided_cache_view():
    cache = _randn(2, 300, 4, 64, dtype=torch.float16)  # (B, S, H, D) storage, read as (B, H, S, D)
    k = v = cache.transpose(1, 2)
    q = _randn(2, 8, 1, 64, dtype=torch.float16, seed=5)
    lens = _tensor([300, 123], torch.int32)
    out = fastgpt.decode_attention(q, k, v, lens, backend="cuda")
    assert_close(out, reference.decode_attention(q.float(), k.float(), v.float(), lens), torch.float16)


@pytest.mark.parametrize("shape", [(1, 4, 4, 3000), (2, 16, 1, 1500), (3, 6, 2, 2000),
                                   *on_gpu((1, 12, 12, 1024), (8, 32, 8, 8192))])
def test_decode_merges_its_splits_in_one_launch_given_counters(shape):
    """With a decode step's counters the last split of each (row, head tile) to finish merges the
    tile's splits, and no combine kernel runs (the poisoned output proves the merge wrote it all):
    the combine kernel's bits, every counter zero again, twice in a row. On a GPU, 50 launches a
    case more, each the same bits (a merge reading a partial before it lands would move one)."""
    from fastgpt.ops.decode import decode_step_attention

    B, Hq, Hkv, Smax = shape
    assert _num_splits(B, Hq, Hkv, Smax) > 1
    counters = torch.zeros(B * Hq + 3, dtype=torch.int32, device=DEVICE)
    for seed in range(2):
        q = _randn(B, Hq, 1, 64, dtype=torch.bfloat16, seed=seed)
        k, v = (_randn(B, Hkv, Smax, 64, dtype=torch.bfloat16, seed=seed + s) for s in (10, 20))
        lens = torch.randint(0, Smax + 1, (B,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        lens = lens.to(DEVICE)
        merged = decode_step_attention(q, k, v, lens, counters, backend="cuda")
        assert torch.equal(merged, decode_step_attention(q, k, v, lens, None, backend="cuda"))
        for _ in range(50 if HAS_CUDA else 0):
            assert torch.equal(decode_step_attention(q, k, v, lens, counters, backend="cuda"), merged)
        assert not counters.any()
        assert_close(merged, reference.decode_attention(q.float(), k.float(), v.float(), lens), torch.bfloat16)


@pytest.mark.parametrize("Smax", [8, 3000])  # one split; several, merged by a kernel or by the last split
def test_decode_a_nan_in_the_cache_gives_nan(Smax):
    """A NaN in a key a row sees makes its heads' outputs NaN, as SDPA's (they were zeros: a NaN
    softmax sum was taken for an empty one); a NaN past a row's length is never read."""
    from fastgpt.ops.decode import decode_step_attention

    q = _randn(2, 4, 1, 64, dtype=torch.float16)
    k, v = (_randn(2, 2, Smax, 64, dtype=torch.float16, seed=s) for s in (1, 2))
    k[0, 1, Smax // 2, 3] = float("nan")  # row 0, kv head 1 (query heads 2 and 3): seen
    k[1, 0, Smax - 1, 0] = float("nan")  # row 1: past its length
    lens = _tensor([Smax, Smax - 1], torch.int32)
    assert (_num_splits(2, 4, 2, Smax, torch.float16) > 1) == (Smax > 128)
    expected = reference.decode_attention(q.float(), k.float(), v.float(), lens)
    assert expected[0, 2:].isnan().all() and expected.isnan().sum() == 2 * 64
    counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    for out, lse in (fastgpt.decode_attention(q, k, v, lens, backend="cuda", return_lse=True),
                     decode_step_attention(q, k, v, lens, counters, backend="cuda", return_lse=True)):  # fmt: skip
        assert torch.equal(out.isnan(), expected.isnan())
        assert_close(out.nan_to_num(), expected.nan_to_num(), torch.float16)
        assert torch.equal(lse.isnan(), expected.isnan().any(-1)) and lse.isfinite().sum() == 6


@pytest.mark.parametrize("shape, merged", [((1, 1, 1, 1), False), ((3, 12, 12, 100), False),
                                           ((1, 4, 4, 3000), False), ((2, 16, 1, 1500), True),
                                           ((3, 6, 2, 2000), True), *on_gpu(((8, 32, 8, 8192), True))])
def test_decode_log_sum_exp(shape, merged):
    """return_lse: each head's natural-log sum of exp(scores) over its row's positions (-inf for a
    row of length 0), from one split, the combine kernel, or the last split to finish (counters,
    bit-equal to the combine kernel's); the output is the one without."""
    from fastgpt.ops.decode import decode_step_attention

    B, Hq, Hkv, Smax = shape
    q = _randn(B, Hq, 1, 128, dtype=torch.bfloat16)
    k, v = (_randn(B, Hkv, Smax, 128, dtype=torch.bfloat16, seed=s) for s in (1, 2))
    lens = _tensor(([Smax, 0, Smax // 3] * B)[:B], torch.int32)
    counters = torch.zeros(B * Hq, dtype=torch.int32, device=DEVICE) if merged else None
    out, lse = decode_step_attention(q, k, v, lens, counters, scale=0.1, backend="cuda", return_lse=True)
    _, expected = reference.decode_attention(q.double(), k.double(), v.double(), lens, scale=0.1, return_lse=True)
    assert lse.shape == (B, Hq, 1) and lse.dtype == torch.float32
    assert torch.equal(lse.isneginf(), expected.isneginf()) and (B == 1 or lse[1].isneginf().all())
    torch.testing.assert_close(lse, expected.float(), atol=2e-5, rtol=2e-5)
    assert torch.equal(out, fastgpt.decode_attention(q, k, v, lens, scale=0.1, backend="cuda"))
    if merged:
        assert not counters.any()
        assert torch.equal(lse, fastgpt.decode_attention(q, k, v, lens, scale=0.1, backend="cuda", return_lse=True).lse)
    assert (_num_splits(B, Hq, Hkv, Smax, D=128) > 1) == (Smax > 128)


# ----------------------------------------------------------------------------- decode: several queries a row


def _decode_fp64(q, k, v, lens, *, scale, causal=True, mask=None):
    """(out, lse) of Sq queries a row from the definition, in fp64: query i of row b stands at
    position len_b - Sq + i (len_b clamped to [0, Smax]) and sees the positions j < len_b, with
    causal those j <= len_b - Sq + i, and those `mask` (B, Hq, Sq, Smax) does not hide; a query
    that sees none gets zeros and an lse of -inf."""
    B, Hq, Sq, _ = q.shape
    Smax = k.shape[2]
    lens = lens.long().clamp(0, Smax)[:, None, None, None]  # (B, 1, 1, 1)
    k, v = (t.double().repeat_interleave(Hq // k.shape[1], dim=1) for t in (k, v))
    j, i = torch.arange(Smax, device=q.device), torch.arange(Sq, device=q.device)[:, None]
    seen = (j < lens) & ((j <= lens - Sq + i) if causal else True)  # (B, 1, Sq, Smax)
    seen = seen & (True if mask is None else mask)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    lse = scores.logsumexp(-1)
    weights = torch.where(seen, (scores - lse[..., None]).exp(), 0.0)
    return weights @ v, lse


def _decode_case(B, Hq, Hkv, Sq, Smax, D, dtype, seed=0):
    q = _randn(B, Hq, Sq, D, dtype=dtype, seed=seed)
    k, v = (_randn(B, Hkv, Smax, D, dtype=dtype, seed=seed + s) for s in (1, 2))
    return q, k, v


MULTI_QUERY_SHAPES = [  # B, Hq, Hkv, Sq, Smax, lengths: past Smax, 0, below Sq (queries that see nothing)
    (1, 2, 2, 2, 40, [40]),              # MHA: one tile of 2 a head
    (2, 4, 2, 3, 70, [70, 2]),           # GQA 2 x 3 queries: 6 rows in a tile of 8; row 1's first query sees nothing
    (2, 8, 2, 5, 100, [130, 0]),         # GQA 4 x 5: 20 rows, tiles of 8, the last half padding
    (3, 12, 2, 16, 60, [60, 16, 7]),     # GQA 6 x 16: 96 rows in 12 tiles; a length of Sq, one below
    (1, 3, 1, 8, 3000, [2900]),          # several splits, 3 tiles of 8
    # On an H200 a grid of a wave or more (e.g. B2 Hq64 Hkv8 Sq16: 256 blocks) takes one split, so
    # the real sizes keep the grid under half a wave (64 blocks here) to split on any GPU.
    *on_gpu((4, 32, 8, 8, 5000, [5000, 4000, 9, 1]), (2, 16, 2, 16, 20000, [20000, 17])),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", MULTI_QUERY_SHAPES)
def test_decode_several_queries_match_the_definition(shape, dtype, causal):
    """Sq queries a row, the row's last Sq positions (causal or not), MHA and GQA with padded
    tiles, one split or several (D 64 and 128 in turn); with return_lse too (the same output)."""
    B, Hq, Hkv, Sq, Smax, lens = shape
    D = (64, 128)[(Sq + (dtype == torch.float16)) % 2]
    q, k, v = _decode_case(B, Hq, Hkv, Sq, Smax, D, dtype)
    lens = _tensor(lens, torch.int32)
    out, lse = _cuda.decode_attention(q, k, v, lens, scale=0.1, causal=causal, return_lse=True)
    expected, expected_lse = _decode_fp64(q, k, v, lens, scale=0.1, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous() and lse.shape == (B, Hq, Sq)
    assert_close(out, expected, dtype)
    assert torch.equal(lse.isneginf(), expected_lse.isneginf())
    torch.testing.assert_close(lse, expected_lse.float(), atol=2e-5, rtol=2e-5)
    assert torch.equal(out, _cuda.decode_attention(q, k, v, lens, scale=0.1, causal=causal))
    nothing = expected_lse.isneginf()
    assert torch.equal(out[nothing], torch.zeros_like(out[nothing]))
    assert (_num_splits(B, Hq, Hkv, Smax, dtype, D, Sq=Sq) > 1) == (Smax > 128)


@pytest.mark.parametrize("Sq", [2, 3, 8])
def test_decode_several_queries_are_the_prefill_of_the_valid_cache(Sq):
    """Causal, a row of length >= Sq is attention over its valid slice with bottom-right alignment;
    non-causal, over the whole slice; through the public decode_attention (its ops layer)."""
    q, k, v = _decode_case(2, 4, 2, Sq, 50, 64, torch.bfloat16, seed=Sq)
    lens = _tensor([50, 20], torch.int32)
    for causal in (True, False):
        out = _cuda.decode_attention(q, k, v, lens, scale=0.125, causal=causal)
        for b, n in enumerate((50, 20)):
            sliced = (t[b : b + 1].float() for t in (q, k[:, :, :n], v[:, :, :n]))
            assert_close(out[b : b + 1], reference.attention(*sliced, causal=causal, scale=0.125), torch.bfloat16)
    assert torch.equal(fastgpt.decode_attention(q, k, v, lens, scale=0.125, backend="cuda"),
                       _cuda.decode_attention(q, k, v, lens, scale=0.125))  # fmt: skip


def test_decode_one_query_is_the_same_causal_or_not():
    """Sq == 1: the query stands at the row's last position, so causal changes nothing, to the bit."""
    q, k, v = _decode_case(3, 6, 2, 1, 600, 128, torch.float16)
    lens = _tensor([600, 0, 301], torch.int32)
    mask = torch.rand(3, 6, 1, 600, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.5
    for m in (None, mask):
        causal, plain = (_cuda.decode_attention(q, k, v, lens, scale=0.1, causal=c, mask=m) for c in (True, False))
        assert torch.equal(causal, plain)
        assert_close(causal, _decode_fp64(q, k, v, lens, scale=0.1, mask=m)[0], torch.float16)


@pytest.mark.parametrize("shape", [(1, 4, 4, 4, 3000), (2, 8, 1, 3, 1500), (3, 6, 2, 5, 2000),
                                   *on_gpu((2, 32, 8, 8, 8192))])  # 64 blocks: splits on any GPU
def test_decode_several_queries_merge_in_one_launch_given_counters(shape):
    """With counters (one per (row, head, query)) the last split of each tile to finish merges the
    tile's splits: the combine kernel's bits, output and lse, and every counter zero again."""
    B, Hq, Hkv, Sq, Smax = shape
    assert _num_splits(B, Hq, Hkv, Smax, Sq=Sq) > 1
    counters = torch.zeros(B * Hq * Sq, dtype=torch.int32, device=DEVICE)
    q, k, v = _decode_case(B, Hq, Hkv, Sq, Smax, 64, torch.bfloat16)
    lens = _tensor([Smax, 2, Smax // 3][:B], torch.int32)
    for causal in (True, False):
        merged = _cuda.decode_attention(q, k, v, lens, scale=0.125, causal=causal, counters=counters, return_lse=True)
        assert not counters.any()
        combined = _cuda.decode_attention(q, k, v, lens, scale=0.125, causal=causal, return_lse=True)
        assert torch.equal(merged.out, combined.out) and torch.equal(merged.lse, combined.lse)
        for _ in range(50 if HAS_CUDA else 0):
            assert torch.equal(_cuda.decode_attention(q, k, v, lens, scale=0.125, causal=causal, counters=counters),
                               merged.out)  # fmt: skip
        expected, expected_lse = _decode_fp64(q, k, v, lens, scale=0.125, causal=causal)
        assert_close(merged.out, expected, torch.bfloat16)
        torch.testing.assert_close(merged.lse, expected_lse.float(), atol=2e-5, rtol=2e-5)


def test_decode_token_major_output_is_a_copy_of_the_kernels():
    """decode_step_attention(token_major=True) on the cuda backend: the kernel's output and lse,
    the output laid out (B, Sq, Hq, D) (GPT's verify step reads it as rows)."""
    from fastgpt.ops.decode import decode_step_attention

    B, Hq, Hkv, Sq, Smax = 2, 8, 2, 3, 1500
    q, k, v = _decode_case(B, Hq, Hkv, Sq, Smax, 64, torch.bfloat16)
    lens = _tensor([Smax, 40], torch.int32)
    counters = torch.zeros(B * Hq * Sq, dtype=torch.int32, device=DEVICE)
    rows = decode_step_attention(q, k, v, lens, counters, backend="cuda", return_lse=True, token_major=True)
    plain = decode_step_attention(q, k, v, lens, counters, backend="cuda", return_lse=True)
    assert rows.out.transpose(1, 2).is_contiguous() and plain.out.is_contiguous()
    assert torch.equal(rows.out, plain.out) and torch.equal(rows.lse, plain.lse)


@pytest.mark.parametrize("Smax", [90, 2000])  # one split; several, merged by the last split
def test_decode_several_queries_under_masks(Smax):
    """4-D masks (B, Hq, Sq, Smax): random per (head, query); broadcast over rows, heads and queries
    (stride 0, read in place); a strided view of queries; a transposed one (copied): each the
    definition's result, with the causal limit as well; a (head, query) the mask hides all from
    gets zeros."""
    B, Hq, Hkv, Sq = 2, 6, 2, 4
    q, k, v = _decode_case(B, Hq, Hkv, Sq, Smax, 64, torch.float16)
    lens = _tensor([Smax, Smax // 2], torch.int32)
    counters = torch.zeros(B * Hq * Sq, dtype=torch.int32, device=DEVICE)
    rand = torch.rand(B, Hq, 2 * Sq, Smax, generator=torch.Generator().manual_seed(Smax)).to(DEVICE) > 0.4
    rand[1, 4, 2] = False  # head 4's query 2 of row 1 sees nothing
    masks = {"per (head, query)": rand[:, :, :Sq].contiguous(), "strided queries": rand[:, :, ::2],
             "broadcast": rand[1:, 2:3, 1:2].expand(B, Hq, Sq, Smax),
             "transposed": rand[:, :, :Sq].transpose(2, 3).contiguous().transpose(2, 3)}  # fmt: skip
    for name, mask in masks.items():
        for causal in (True, False):
            res = _cuda.decode_attention(q, k, v, lens, scale=0.1, causal=causal, mask=mask, return_lse=True,
                                         counters=counters)  # fmt: skip
            expected, expected_lse = _decode_fp64(q, k, v, lens, scale=0.1, causal=causal, mask=mask)
            assert_close(res.out, expected, torch.float16)
            assert torch.equal(res.lse.isneginf(), expected_lse.isneginf()), name
            torch.testing.assert_close(res.lse, expected_lse.float(), atol=2e-5, rtol=2e-5)
    assert not counters.any()
    hidden = res.out[1, 4, 2]  # the last: transposed, so the per-(head, query) mask's
    assert res.lse[1, 4, 2].isneginf() and torch.equal(hidden, torch.zeros_like(hidden))
    assert (_num_splits(B, Hq, Hkv, Smax, torch.float16, masked=True, Sq=Sq) > 1) == (Smax > 128)


def test_decode_several_queries_from_strided_views():
    """q as (B, Sq, H, D) storage read as (B, H, Sq, D) (query stride H * D: read in place) and with a
    row stride that is no multiple of 16 bytes (copied); caches likewise; the same bits as contiguous."""
    B, Hq, Hkv, Sq, Smax, D = 2, 4, 2, 5, 300, 64
    q = _randn(B, Sq, Hq, D, dtype=torch.bfloat16).transpose(1, 2)
    cache = _randn(B, Smax, 2, Hkv, D, dtype=torch.bfloat16, seed=1)
    k, v = cache[:, :, 0].transpose(1, 2), cache[:, :, 1].transpose(1, 2)  # (B, Hkv, Smax, D) views
    lens = _tensor([300, 4], torch.int32)
    want = _cuda.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), lens, scale=0.1)
    assert torch.equal(_cuda.decode_attention(q, k, v, lens, scale=0.1), want)
    odd = _randn(B, Hq, Sq, D + 4, dtype=torch.bfloat16)[..., :D]
    odd.copy_(q)
    assert torch.equal(_cuda.decode_attention(odd, k, v, lens, scale=0.1), want)
    assert_close(want, _decode_fp64(q, k, v, lens, scale=0.1)[0], torch.bfloat16)


def test_decode_several_queries_launcher_checks():
    """The launcher refuses what the kernels cannot take, naming it, before any launch."""
    q, k, v = _decode_case(2, 4, 2, 3, 40, 64, torch.float16)
    lens = _tensor([40, 40], torch.int32)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4, 3, 40\)"):
        _cuda.decode_attention(q, k, v, lens, scale=0.1, mask=torch.ones(2, 4, 40, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"counters must be contiguous int32 .* B \* Hq \* Sq = 24"):
        _cuda.decode_attention(q, k, v, lens, scale=0.1, counters=torch.zeros(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"q must have shape \(B, Hq, Sq, D\) with Sq >= 1"):
        _cuda.decode_attention(q[:, :, :0], k, v, lens, scale=0.1)


def test_decode_more_pair_tiles_than_the_grid_holds_is_unavailable():
    """Hkv * ceil(group * Sq / 8) tiles past the grid's 65535: the ops layer says the cuda backend
    cannot run it (auto then takes another), before any launch, for decode_attention and for
    attention and masked_attention of a few queries (the same kernel); one tile fewer runs."""
    from fastgpt.ops.attention import decode_limits, masked_attention

    k = _randn(1, 1, 8, 64, dtype=torch.float16)
    lens = _tensor([8], torch.int32)
    too_many = _randn(1, 1, 1, 64, dtype=torch.float16).expand(1, 1, 8 * 65535 + 1, 64)  # 65536 tiles
    with pytest.raises(fastgpt.BackendUnavailableError, match=r"65535 tiles of \(query head, query\) pairs, got 65536"):
        fastgpt.decode_attention(too_many, k, k, lens, backend="cuda")
    assert decode_limits(too_many, 1, 8)("cuda") and decode_limits(too_many[:, :, : 8 * 65535], 1, 8)("cuda") is None
    wide = _randn(1, 1, 1, 64, dtype=torch.float16).expand(1, 32768, 16, 64)  # 65536 tiles of 8 pairs at Sq 16
    k_wide = k.expand(1, 32768, 8, 64)
    with pytest.raises(fastgpt.BackendUnavailableError, match="got 65536"):
        fastgpt.attention(wide, k_wide, k_wide, causal=True, backend="cuda")
    with pytest.raises(fastgpt.BackendUnavailableError, match="got 65536"):
        masked_attention(wide, k_wide, k_wide, torch.ones(1, 1, 16, 8, dtype=torch.bool, device=DEVICE), backend="cuda")
