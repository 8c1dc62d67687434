"""The Triton sampler's paths past one program per row: the split path (a row's chunks searched
in parallel: radix selects over per-chunk histograms) and the candidate path (per-chunk lists of
the top scores under a known top-k bound, with key bounds from group maxima), each against one
program per row and the reference; the split plan and the candidate list length; and every
sampling kernel compiled for sm_80 and sm_90. The helpers (rows away from rounding thresholds,
the reference's kept set) come from test_sampling.py.
"""

import pytest
import torch

from fastgpt import _backends, reference
from fastgpt.kernels.sampling import kept_mask
from fastgpt.kernels.sampling import sample as triton_sample
from tests.test_sampling import (
    LOGITS,
    NEG_INF,
    _assert_chi_square,
    _assert_parameters_clamped,
    _margins,
    _params,
    _random_rows,
    _reference_kept,
)


# ----------------------------------------------------------------------------- split path
# num_chunks=0 forces one program per row, n >= 1 the split path with n chunks (16-aligned, capped).


@pytest.mark.parametrize(
    "V, B, chunks",
    [(7, 16, 1), (100, 12, 3), (1000, 5, 7), (100, 4, 10**6)],
    ids=["1-chunk", "3-chunks-of-48", "7-chunks-of-144", "too-many-chunks-7-of-16"],
)
def test_split_kept_set_matches_reference(V, B, chunks, device, poisoned_empty):
    """The split path's kept set (radix selects over per-chunk histograms) is the reference's:
    ties, -inf entries, every filter combination, top_k >= V, chunks that do not divide V."""
    logits, *params = _random_rows(B, V, seed=V + chunks)
    params = [p.to(device) for p in params]
    kept = kept_mask(logits.to(device), *params, num_chunks=chunks).cpu()
    torch.testing.assert_close(kept, _reference_kept(logits, *params), atol=0, rtol=0)


def _edge_rows():
    """Rows that stress the split: maxima repeated across and on both sides of chunk edges (48
    wide at V=100, 3 chunks), non-finite rows, greedy and sampling rows, per-row parameters."""
    nan, inf = float("nan"), float("inf")
    logits, t, k, p, mp = _random_rows(12, 100, seed=21)
    logits[0, [50, 90]] = 100.0  # chunks 1 and 2
    logits[1, [47, 48]] = 100.0  # both sides of the first edge
    logits[2] = NEG_INF
    logits[3] = nan
    logits[4, [30, 20]] = inf
    logits[5, :50] = nan
    t[:6] = 0.0  # greedy
    t[6:] = torch.tensor([0.7, 1.0, 1.3, 0.9, 1.1, 0.5])
    logits[6:9, [60, 95]] = 50.0  # tied top tokens in two chunks
    logits[9, [3, 70]] = inf  # sampling among +inf entries
    logits[10, :96] = NEG_INF  # only the last, partial chunk is finite
    k[6:] = torch.tensor([2, 0, 5, 3, 50, 1])
    p[6:] = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.8, 0.3], dtype=torch.float64)
    return logits, t, k, p, mp


def test_split_tokens_equal_one_program(device, poisoned_empty):
    """Same seed, same tokens as one program per row, to the bit. Kept sets agree too, and
    greedy rows take the first index."""
    logits, *params = _edge_rows()
    args = [a.to(device) for a in (logits, *params)]
    seed = torch.tensor([99], device=device)
    ids = triton_sample(*args, seed, num_chunks=3).cpu()
    assert ids[:6].tolist() == [50, 47, 0, 0, 20, logits[5].nan_to_num(NEG_INF).argmax().item()]
    assert ids[9].item() in (3, 70) and ids[10].item() >= 96
    torch.testing.assert_close(ids, triton_sample(*args, seed, num_chunks=0).cpu(), atol=0, rtol=0)
    masks = kept_mask(*args, num_chunks=2).cpu()
    torch.testing.assert_close(masks, kept_mask(*args, num_chunks=0).cpu(), atol=0, rtol=0)
    assert masks[torch.arange(12), ids].all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point: x / t and s - m overflow
def test_split_key_bytes_at_the_edges(device, poisoned_empty):
    """Keys whose radix bytes sit at the edges: fp32 bit patterns next to each other on both sides
    of the sign (±denormals, ±0), scores near ±3e38 (top key bytes 0 and 255), and rows whose
    x / t overflows to +inf (then only the entries tied at the row's maximum stay). Split and
    one-program paths give the same kept sets and tokens."""
    g = torch.Generator().manual_seed(9)
    V = 300
    bits = torch.cat([torch.arange(1, 120), torch.arange(0, 60) - 2**31, torch.zeros(5, dtype=torch.int64)])
    bits = torch.cat([bits, torch.full((V - len(bits),), 0xFF800000 - 2**32)])  # the rest -inf
    tiny = bits.to(torch.int32).view(torch.float32)[torch.randperm(V, generator=g)]
    huge = torch.randn(V, generator=g).sign() * 3e38 * (1 - torch.rand(V, generator=g) * 1e-3)
    logits = torch.stack([tiny] * 4 + [huge] * 4 + [torch.randn(V, generator=g) * 1e37] * 2)
    t = torch.tensor([1.0, 1e-40, 1e-44, 1.0, 1.0, 0.5, 1.0, 2.0, 1e-3, 0.01])  # x / 1e-3 overflows
    k = torch.tensor([5, 60, 130, 183, 3, 0, 150, 299, 0, 7])
    p = torch.tensor([1.0, 0.7, 0.3, 0.9, 1.0, 0.5, 0.99, 0.2, 1.0, 0.8], dtype=torch.float64)
    mp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    args = [a.to(device) for a in (logits, t, k, p, mp)]
    one = kept_mask(*args, num_chunks=0).cpu()
    for chunks in (1, 5):
        torch.testing.assert_close(kept_mask(*args, num_chunks=chunks).cpu(), one, atol=0, rtol=0)
    seed = torch.tensor([5], device=device)
    ids = triton_sample(*args, seed, num_chunks=5).cpu()
    torch.testing.assert_close(ids, triton_sample(*args, seed, num_chunks=0).cpu(), atol=0, rtol=0)
    assert one[torch.arange(len(ids)), ids].all()
    assert (logits[8] / 1e-3 == float("inf")).sum() > 1  # entries below the maximum overflow too ...
    assert (one[8] == (logits[8] == logits[8].max())).all()  # ... but only the maximum stays


def test_split_device_parameters_are_clamped(device):
    _assert_parameters_clamped(device, num_chunks=2)


def test_greedy_first_index_across_blocks(device):
    """Maxima repeated in two 1024-wide blocks of one program (one row's pass, then one chunk of
    the split path): the earlier block's index."""
    logits = torch.randn(2, 2100, generator=torch.Generator().manual_seed(4))
    logits[0, [1000, 1030]] = 9.0  # blocks 0 and 1 of the row; chunk 0 of 2 (1056 wide)
    logits[1, [700, 2090]] = 9.0  # blocks 0 and 2; chunks 0 and 1
    t = torch.zeros(2)
    args = [a.to(device) for a in (logits, t, *_params(2, "cpu")[1:])]
    for c in (0, 2):
        assert triton_sample(*args, torch.tensor([0], device=device), num_chunks=c).tolist() == [1000, 700]


def test_split_plan():
    """The split path only where rows alone leave the GPU idle and a row splits into at least
    _MIN_SPLIT_CHUNKS chunks, never below _MIN_CHUNK entries a chunk, never above MAX_CHUNKS
    chunks, never past 2^24 entries (its fp32 counts)."""
    from fastgpt.kernels import sampling

    assert sampling.split_chunks(1, 262144, 132) == sampling.MAX_CHUNKS
    assert sampling.split_chunks(1, 50257, 132) == 32
    assert sampling.split_chunks(32, 50257, 132) == 9
    assert sampling.split_chunks(37, 50257, 132) == 8
    assert sampling.split_chunks(38, 50257, 132) == 1  # 7 chunks: 8 is the fewest worth a split
    assert sampling.split_chunks(64, 128256, 132) == 1
    assert sampling.split_chunks(256, 50257, 132) == 1  # measured: 2 chunks ran 3.2x slower
    assert sampling.split_chunks(1, 7000, 132) == 1  # 7 chunks of 1024
    assert sampling.split_chunks(1, 1024, 132) == 1
    assert sampling.split_chunks(1, 2**24 + 1, 132) == 1


def test_chi_square_split_path(device):
    """Draws through the split path against the filtered softmax: top-p cuts the three lowest
    finite logits, min-p two more (top-k's search is cheaper to check exactly, above). The first
    rows again, alone: the same draws under the same seed (a row's noise depends on the seed and
    its index only), other draws under another seed."""
    B, params = 100, {"temperature": 0.8, "top_p": 0.95, "min_p": 0.2}
    rows = LOGITS.expand(B, -1).contiguous().to(device)
    seed = torch.tensor([1], device=device)
    ids = triton_sample(rows, *_params(B, device, **params), seed, num_chunks=1).cpu()
    filtered = reference.filter_logits(LOGITS, *_params(1, "cpu", **params))
    _assert_chi_square(ids, torch.softmax(filtered.double(), dim=-1)[0])
    first = (rows[:10], *_params(10, device, **params))
    torch.testing.assert_close(triton_sample(*first, seed, num_chunks=1).cpu(), ids[:10], atol=0, rtol=0)
    assert not torch.equal(triton_sample(*first, seed + 1, num_chunks=1).cpu(), ids[:10])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [50257, 128256])
@pytest.mark.parametrize("B", [1, 2, 7, 32])
def test_gpu_split_path(B, V, dtype):
    """Real sizes, the split path (the default at these batch sizes) against one program per row
    and the reference: kept sets, and tokens to the bit wherever the kept sets agree."""
    from fastgpt.kernels.sampling import split_chunks

    if split_chunks(B, V, _backends.sm_count(torch.cuda.current_device())) == 1:
        pytest.skip(f"B={B} fills this GPU with one program per row")
    g = torch.Generator(device="cuda").manual_seed(B * V)
    logits = (torch.randn(B, V, device="cuda", generator=g) * 3).to(dtype)
    logits[:, V - 1] = logits.float().max() + 1  # the maximum in the last, partial chunk
    logits[1::3, :: V // 10] = float("nan")
    # Row 0 is the target case (temperature 0.8, top-k 50, top-p 0.9); row 1 is greedy.
    t = torch.tensor([0.8, 0.0, 1.0, 1.2, 0.0, 0.7, 0.5, 1.5], device="cuda").repeat(8)[:B]
    k = torch.tensor([50, 40, 0, 1, 1000, V - 1, 0, 7], device="cuda").repeat(8)[:B]
    p = torch.tensor([0.9, 0.9, 0.95, 1.0, 0.5, 1.0, 0.99, 0.8], device="cuda", dtype=torch.float64).repeat(8)[:B]
    mp = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0], device="cuda").repeat(8)[:B]
    seed = torch.tensor([3], device="cuda")
    split, rows = triton_sample(logits, t, k, p, mp, seed), triton_sample(logits, t, k, p, mp, seed, num_chunks=0)
    kept, kept_rows = kept_mask(logits, t, k, p, mp), kept_mask(logits, t, k, p, mp, num_chunks=0)
    same = (kept == kept_rows).all(dim=-1)  # a top-p rounding boundary may split them (docstring)
    assert same.float().mean() >= 0.9
    torch.testing.assert_close(split[same], rows[same], atol=0, rtol=0)
    torch.testing.assert_close(split, triton_sample(logits, t, k, p, mp, seed), atol=0, rtol=0)
    assert (split[t == 0] == V - 1).all() and kept[torch.arange(B, device="cuda"), split].all()
    expected = _reference_kept(logits.float(), t, k, p, mp)
    near_p, near_min_p = _margins(logits.float(), t, k, p, mp)
    check = ((near_p > 1e-4) & (near_min_p > 1e-4) & (t > 0).cpu()).nonzero().flatten()
    torch.testing.assert_close(kept.cpu()[check], expected[check], atol=0, rtol=0)


# ----------------------------------------------------------------------------- candidate path
# top_k_bound in [1, CAND_MAX_K) takes the candidate path (unless num_chunks forces another).


@pytest.fixture(params=["sorted", "bounded", "bounded-short-list"])
def candidate_variant(request, monkeypatch):
    """The candidate path's chunks sorted, or first bounded by each row's group maxima (from
    CAND_BOUND_MIN_ROWS rows: here from 1 or never); with a row list of cand_k entries, rows
    whose entries above their bound overflow it merge their chunks' lists instead."""
    from fastgpt.kernels import sampling

    monkeypatch.setattr(sampling, "CAND_BOUND_MIN_ROWS", 1 << 30 if request.param == "sorted" else 1)
    if request.param == "bounded-short-list":
        monkeypatch.setattr(sampling, "CAND_LIST", 1)
    return request.param


def test_candidate_list_length():
    """A power of two above the bound (the list must show where the k-th entry's tie group ends),
    16 at least; no candidate path for an unknown or too large a bound."""
    from fastgpt._backends import SAMPLE_CANDIDATE_MAX_K, sample_candidate_k

    expected = [0, 0, 16, 16, 32, 64, 64, 128, 256]
    assert [sample_candidate_k(b) for b in (0, -3, 1, 15, 16, 50, 63, 64, 255)] == expected
    assert sample_candidate_k(SAMPLE_CANDIDATE_MAX_K) == 0


@pytest.mark.parametrize("V, B, bound", [(7, 12, 10), (300, 16, 31), (2500, 8, 50)],
                         ids=["list-longer-than-V", "1-chunk", "3-chunks"])  # fmt: skip
@pytest.mark.parametrize("candidate_variant", ["sorted", "bounded"], indirect=True)
def test_candidate_kept_set_matches_reference(V, B, bound, device, candidate_variant, poisoned_empty):
    """The candidate path's kept set is the reference's: top_k from 1 to the bound (at or past V
    when V is short), ties, -inf entries, every filter, and rows that break the bound (0: top-k
    off), which the kernel hands to its slow path."""
    logits, *params = _random_rows(B, V, seed=V + bound, top_ks=[1, 3, bound // 2, bound, bound, 0])
    params = [p.to(device) for p in params]
    kept = kept_mask(logits.to(device), *params, top_k_bound=bound).cpu()
    torch.testing.assert_close(kept, _reference_kept(logits, *params), atol=0, rtol=0)


def _candidate_edge_rows():
    """Rows at V = 2500 for top_k_bound=10 (three 1024-wide chunks, lists of 16 entries)."""
    inf = float("inf")
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(12, 2500, generator=g)
    t = torch.tensor([0.0, 0.0, 0.0, 0.8, 1.0, 1.2, 0.7, 1.0, 0.9, 1.0, 1.1, 0.6])
    k = torch.tensor([0, 0, 0, 10, 10, 5, 3, 10, 10, 1, 10, 0])
    p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.9, 1.0, 1.0, 0.8, 0.9], dtype=torch.float64)
    mp = torch.tensor([0.0] * 8 + [0.3, 0.0, 0.0, 0.0])
    logits[0, [2400, 1500, 30]] = 9.0  # greedy: the maximum in every chunk, the first index
    logits[1] = NEG_INF  # greedy, nothing finite: 0
    logits[2, [1200, 40]] = inf  # greedy: the first +inf
    top = [7, 900, 1400, 2050, 2490]
    logits[3:5, top] = torch.tensor([12.0, 11.0, 10.0, 9.0, 8.0])
    logits[3, [10, 500, 1100, 1500, 2000, 2100, 2300, 2450]] = 5.0  # the k-th's tie group: 13 of 16 listed
    logits[4, torch.arange(20) * 120 + 3] = 5.0  # a tie group of 20 runs past the list: slow path
    logits[5] = NEG_INF
    logits[5, [100, 1800, 2200]] = torch.tensor([1.0, 2.0, 0.5])  # fewer finite entries than k
    logits[6, [100, 1300, 2200]] = 6.0  # the top 3 tied: top-p keeps the whole group
    logits[7, [5, 2000]] = inf  # sampling among +inf entries: slow path
    logits[10] = (logits[10] * 2).round() / 2  # many ties
    return logits, t, k, p, mp


def test_candidate_tokens_equal_one_program(device, candidate_variant, poisoned_empty):
    """Same seed, same tokens as one program per row, to the bit (the same noise on the same kept
    sets), and the same kept sets, on rows that stress the candidate lists; rows that break the
    bound or hold +inf go through the kernel's slow path."""
    logits, *params = _candidate_edge_rows()
    args = [a.to(device) for a in (logits, *params)]
    seed = torch.tensor([17], device=device)
    ids = triton_sample(*args, seed, top_k_bound=10).cpu()
    assert ids[:3].tolist() == [30, 0, 40] and ids[5].item() in (100, 1800, 2200)
    assert ids[7].item() in (5, 2000) and ids[9] == logits[9].argmax()  # top_k=1: the maximum
    torch.testing.assert_close(ids, triton_sample(*args, seed, num_chunks=0).cpu(), atol=0, rtol=0)
    masks = kept_mask(*args, top_k_bound=10).cpu()
    torch.testing.assert_close(masks, kept_mask(*args, num_chunks=0).cpu(), atol=0, rtol=0)
    assert masks[3].sum() == 13 and masks[4].sum() == 25 and masks[6].sum() == 3 and masks[5].sum() == 3
    assert masks[torch.arange(12), ids].all()
    torch.testing.assert_close(masks[3:], _reference_kept(logits, *params)[3:], atol=0, rtol=0)


def test_key_bounds(device):
    """Each row's bound is the k-th largest of its 64-entry groups' maxima, in the order of the
    scores x / t (NaN as -inf, a greedy row's t as 1); none where top_k is off, at or past the list
    length, or above the group count."""
    from fastgpt.kernels.sampling import CAND_GROUP, key_bounds

    V, cand_k = 2500, 16  # 3 chunks of 1024: 40 groups, the last one short
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(7, V, generator=g)
    logits[1, ::7] = float("nan")
    logits[2, 64:] = float("-inf")  # two groups hold every finite score: k = 3 finds -inf
    t = torch.tensor([0.8, 1.0, 1.0, 0.0, 1.3, 1.0, 1.0])
    k = torch.tensor([1, 5, 3, 15, 10, 0, 16])
    bound, count = (x.cpu() for x in key_bounds(logits.to(device), t.to(device), k.to(device), cand_k))
    assert (count == 0).all()
    s = torch.where(logits.isnan(), float("-inf"), logits) / torch.where(t > 0, t, 1.0)[:, None]
    s = torch.nn.functional.pad(s, (0, 40 * CAND_GROUP - V), value=float("-inf"))
    gmax = s.view(7, 40, CAND_GROUP).amax(-1).sort(-1, descending=True).values
    bits = bound.view(torch.int32)
    value = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)
    for row in range(5):
        assert value[row] == gmax[row, k[row] - 1], row
    assert value[2] == float("-inf")
    assert bound[5:].tolist() == [-(2**31)] * 2  # top_k off; top_k 16, the list's length


@pytest.mark.parametrize("candidate_variant", ["sorted", "bounded"], indirect=True)
def test_candidate_device_parameters_are_clamped(device, candidate_variant):
    """Parameters out of range on the device, under a bound they break: the slow path's answers."""
    _assert_parameters_clamped(device, top_k_bound=20)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, V", [(1, 50257), (32, 50257), (256, 50257), (1, 128256), (32, 128256)])
def test_gpu_candidate_path(B, V, dtype):
    """Real sizes through the candidate path (top_k_bound=50, one row in 8 breaking it) against one
    program per row (kept sets; tokens to the bit wherever they agree) and the reference; then
    captured in a CUDA graph and replayed."""
    g = torch.Generator(device="cuda").manual_seed(B + V)
    logits = (torch.randn(B, V, device="cuda", generator=g) * 3).to(dtype)
    logits[1::3, :: V // 10] = float("nan")
    t = torch.tensor([0.8, 0.0, 1.0, 1.2, 0.7, 0.5, 1.5, 0.9], device="cuda").repeat(B)[:B]
    k = torch.tensor([50, 40, 1, 7, 50, 0, 20, 50], device="cuda").repeat(B)[:B]
    p = torch.tensor([0.9, 0.9, 0.95, 1.0, 0.5, 0.99, 1.0, 0.8], device="cuda", dtype=torch.float64).repeat(B)[:B]
    mp = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.02], device="cuda").repeat(B)[:B]
    args, seed = (logits, t, k, p, mp), torch.tensor([5], device="cuda")
    ids, rows = triton_sample(*args, seed, top_k_bound=50), triton_sample(*args, seed, num_chunks=0)
    kept, kept_rows = kept_mask(*args, top_k_bound=50), kept_mask(*args, num_chunks=0)
    same = (kept == kept_rows).all(dim=-1)  # a top-p rounding boundary may split them
    assert same.float().mean() >= 0.9
    torch.testing.assert_close(ids[same], rows[same], atol=0, rtol=0)
    assert kept[torch.arange(B, device="cuda"), ids].all()
    expected = _reference_kept(logits.float(), t, k, p, mp)
    near_p, near_min_p = _margins(logits.float(), t, k, p, mp)
    check = ((near_p > 1e-4) & (near_min_p > 1e-4) & (t > 0).cpu()).nonzero().flatten()
    torch.testing.assert_close(kept.cpu()[check], expected[check], atol=0, rtol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_sample(*args, seed, top_k_bound=50)
    seed.fill_(6)
    graph.replay()
    torch.testing.assert_close(captured, triton_sample(*args, seed, top_k_bound=50), atol=0, rtol=0)


# ----------------------------------------------------------------------------- compile for the GPU


_PARAMS = {"temperature_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp64", "min_p_ptr": "*fp32",
           "seed_ptr": "*i64"}  # fmt: skip
_SPLIT = _PARAMS | {"part_max_ptr": "*fp32", "part_idx_ptr": "*i32", "hist_in_ptr": "*fp32", "hist_out_ptr": "*fp32",
                    "state_ptr": "*fp64", "part_z_ptr": "*fp32", "part_zi_ptr": "*i32"}  # fmt: skip


def compile_row_variants(arch):
    """One program per row (bf16 tokens, fp16 kept set), the split path's first two search
    stages (the chunk max and counts; a count byte picked) and its token kernel, at a real
    vocabulary. The Gumbel noise takes log(w) / (w - 1) for w = 1 - x near 1 (x down to 2^-25),
    where an approximate log (lg2.approx, absolute error ~2^-22) would be off by 100% or more,
    even of the wrong sign (NaN noise): tl.log must stay exact."""
    from tests.gpu_compile import compile_for, load_kernel_module, ptxas_spills

    mod = load_kernel_module("sampling")
    for dtype, write_mask in [("bf16", False), ("fp16", True), ("fp32", False)]:
        ptrs = _PARAMS | {"logits_ptr": f"*{dtype}", "out_ptr": "*i1" if write_mask else "*i64"}
        size = 4 if dtype == "fp32" else 2
        const = {"V": 128256, "WRITE_MASK": write_mask, "BLOCK_V": mod.ROW_BLOCK_V[size], "NUM_PIVOTS": mod.NUM_PIVOTS}
        kernel = compile_for(mod._sample_kernel, ptrs, const, arch=arch, num_warps=mod.ROW_WARPS[size], num_stages=3)
        assert "lg2.approx" not in kernel.asm["ptx"], (arch, dtype)
        # the row's tiles are sized to the registers: a few words of spills at most (not ~1 KB)
        assert ptxas_spills(kernel, arch) <= 32, (arch, dtype, ptxas_spills(kernel, arch))
    for stage, dtype in [(0, "bf16"), (1, "fp32")]:
        const = {"V": 128256, "STAGE": stage, "BLOCK_V": mod.MAX_BLOCK_V, "MAX_CHUNKS": mod.MAX_CHUNKS}
        compile_for(mod._split_search_kernel, _SPLIT | {"logits_ptr": f"*{dtype}"}, const, arch=arch,
                    num_warps=mod.NUM_WARPS, num_stages=3)  # fmt: skip
    compile_for(mod._split_token_kernel, _SPLIT | {"out_ptr": "*i64"}, {"V": 128256, "MAX_CHUNKS": mod.MAX_CHUNKS},
                arch=arch, num_warps=1, num_stages=3)  # fmt: skip


def compile_split_variants(arch):
    """The split path's top-p stages (t_k's last byte and the first masses; the budget and a
    mass byte picked) and its draw (tokens, with an exact log, and the kept set)."""
    from tests.gpu_compile import compile_for, load_kernel_module

    mod = load_kernel_module("sampling")
    for stage, dtype in [(4, "bf16"), (5, "fp16")]:
        const = {"V": 128256, "STAGE": stage, "BLOCK_V": mod.MASS_BLOCK, "MAX_CHUNKS": mod.MAX_CHUNKS}
        compile_for(mod._split_search_kernel, _SPLIT | {"logits_ptr": f"*{dtype}"}, const, arch=arch,
                    num_warps=4, num_stages=3)  # fmt: skip
    for dtype, write_mask in [("bf16", False), ("fp32", True)]:
        const = {"V": 50257, "WRITE_MASK": write_mask, "BLOCK_V": mod.MAX_BLOCK_V, "MAX_CHUNKS": mod.MAX_CHUNKS}
        kernel = compile_for(mod._split_draw_kernel, _SPLIT | {"logits_ptr": f"*{dtype}", "out_ptr": "*i1"}, const,
                             arch=arch, num_warps=mod.NUM_WARPS, num_stages=3)  # fmt: skip
        assert "lg2.approx" not in kernel.asm["ptx"], (arch, write_mask)


def compile_candidate_variants(arch):
    """The candidate path's kernels at the smallest and largest lists (bf16 and fp32 logits; tokens
    with an exact log, and the kept set), without register spills."""
    from tests.gpu_compile import compile_for, load_kernel_module, ptxas_spills

    mod = load_kernel_module("sampling")
    for cand_k, dtype, write_mask in [(64, "bf16", False), (mod.CAND_MAX_K, "fp32", True)]:
        block, list_len = mod._candidate_block(128256, cand_k), max(mod.CAND_LIST, cand_k)  # V 128256: the longest
        ptrs = {"logits_ptr": f"*{dtype}", "temperature_ptr": "*fp32", "bound_ptr": "*i32", "cand_ptr": "*i64",
                "count_ptr": "*i32", "list_ptr": "*i64", "gmax_ptr": "*i32", "top_k_ptr": "*i64"}
        kernel = compile_for(mod._group_max_kernel, ptrs, {"V": 128256, "BLOCK": block, "GROUP": mod.CAND_GROUP},
                             arch=arch, num_warps=4, num_stages=3)  # fmt: skip
        assert ptxas_spills(kernel, arch) == 0, (arch, cand_k)
        kernel = compile_for(mod._key_bound_kernel, ptrs, {"CAND_K": cand_k, "BLOCK_G": mod.MERGE_BLOCK},
                             arch=arch, num_warps=4, num_stages=3)  # fmt: skip
        assert ptxas_spills(kernel, arch) == 0, (arch, cand_k)
        for bounded in (False, True):
            const = {"V": 128256, "CAND_K": cand_k, "BLOCK": block, "BOUNDED": bounded, "LIST": list_len}
            kernel = compile_for(mod._candidates_kernel, ptrs, const, arch=arch, num_warps=4, num_stages=3)
            assert ptxas_spills(kernel, arch) == 0, (arch, cand_k, bounded)
            const = {"V": 128256, "WRITE_MASK": write_mask, "CAND_K": cand_k, "MERGE_BLOCK": mod.MERGE_BLOCK,
                     "BOUNDED": bounded, "LIST": list_len, "BLOCK_V": mod.MAX_BLOCK_V, "NUM_PIVOTS": mod.NUM_PIVOTS}
            out = {"out_ptr": "*i1" if write_mask else "*i64"}
            kernel = compile_for(mod._candidate_draw_kernel, _PARAMS | ptrs | out, const, arch=arch,
                                 num_warps=mod.NUM_WARPS, num_stages=3)  # fmt: skip
            assert "lg2.approx" not in kernel.asm["ptx"] and ptxas_spills(kernel, arch) == 0, (arch, cand_k, bounded)


def compile_search_variants(arch):
    """compile_row_variants and compile_split_variants (a few seconds together)."""
    compile_row_variants(arch)
    compile_split_variants(arch)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variants", ["search", "candidate"])  # the candidate path's take ~60 s an arch here
def test_compiles_for_gpu(variants, arch):
    """Every sampling kernel lowers to sm_80 and sm_90 cubins, with an exact log: four tests, which
    pytest's workers share (each compile is single-threaded)."""
    from tests.gpu_compile import run_compile_check

    run_compile_check(f"tests.test_sampling_paths.compile_{variants}_variants", (arch,))


def test_launch_grids_fit_cudas_limits(monkeypatch):
    """CUDA caps a grid's second and third dimensions at 65535: the candidate path puts each row's
    vocabulary chunks on the first (a 70M-entry vocabulary has 68,360 chunks of 1024), and so does
    generate's greedy_advance its row blocks (300,000 rows, 75,000 blocks of 4). The kernels are
    replaced by recorders: this checks the grids, not the results."""
    from fastgpt.kernels import advance
    from fastgpt.kernels import sampling as tri_sampling

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    for module in (tri_sampling, advance):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, Recorder())
    B, V = 1, 70_000_000
    logits = torch.empty(B, V, dtype=torch.float16)
    t, k, p, m = torch.ones(B), torch.full((B,), 50), torch.ones(B, dtype=torch.float64), torch.zeros(B)
    tri_sampling.sample(logits, t, k, p, m, torch.zeros(1, dtype=torch.int64), top_k_bound=50)
    assert max(len(g) for g in grids) == 1 and any(g[0] > 65535 for g in grids)  # all 1-D, the chunks past 65535
    grids.clear()
    B, V = 300_000, 8
    tok, pos = torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
    advance.greedy_advance(torch.empty(B, V), torch.empty(B, dtype=torch.int64), torch.zeros(1, dtype=torch.int32),
                           torch.zeros(B, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), tok, pos,
                           torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.bool),
                           torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), has_eos=False)
    assert grids == [(75_000,)]
