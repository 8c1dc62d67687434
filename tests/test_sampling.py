"""fastgpt.sample: the Triton sampler's kept set against the reference, and every backend's draws
checked statistically (chi-square against softmax of the filtered logits), against the noise
recomputed from their seed, and for reproducibility.
The Triton kernels' own paths (split, candidate lists) and their GPU compiles are in
test_sampling_paths.py, which imports this module's helpers.

On CPU the Triton kernels run in Triton's interpreter, which is slow (~tens of ms per row), so
the CPU cases keep V and B small; the `gpu` cases use real vocabularies and batches.

The kept set is compared with reference.filter_logits "closed over ties": a token whose score
equals that of a kept token counts as kept. Of a tie group that straddles the top-p boundary
Hugging Face keeps a part fixed by the masses, which members depending on its sort's order; the
kernels keep the group whole, weighted in the draw so that it carries HF's mass
(reference.draw_scores, which the chi-square tests draw against). Inputs whose
cumulative top-p mass (or min-p ratio) lies within float rounding of the threshold are redrawn:
there the kernel's fp32 sums and torch's softmax + cumsum may legitimately disagree.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy.stats import chisquare

import fastgpt
from fastgpt import _backends, reference
from fastgpt.kernels.sampling import kept_mask
from fastgpt.kernels.sampling import sample as triton_sample
from fastgpt.kernels.sampling.common import _gumbel_of_bits

NEG_INF = float("-inf")


def _params(B, device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Per-row parameter tensors in the launchers' dtypes."""

    def row(value, dtype):
        return torch.as_tensor(value, dtype=dtype).expand(B).contiguous().to(device)

    return (row(temperature, torch.float32), row(top_k, torch.int64),
            row(top_p, torch.float64), row(min_p, torch.float32))  # fmt: skip


def _reference_kept(logits, temperature, top_k, top_p, min_p):
    """reference.filter_logits' kept set closed over ties. Every filter keeps the best scores, so
    the closure is {finite score >= the lowest kept score}."""
    x = reference.clean_logits(logits.cpu())
    t = temperature.cpu()
    scores = x / t[:, None]
    filtered = reference.filter_logits(x, t, top_k.cpu(), top_p.cpu(), min_p.cpu())
    lowest = torch.where(filtered > NEG_INF, scores, float("inf")).amin(dim=-1, keepdim=True)
    return (scores >= lowest) & (scores > NEG_INF)


def _margins(logits, temperature, top_k, top_p, min_p):
    """Per row, how far (in fp64) the nearest token is from flipping at the top-p and min-p
    thresholds: the distance of HF's ascending cumulative mass from 1 - top_p, and the relative
    distance of p / p_max from min_p. inf where the filter is off."""
    x = reference.clean_logits(logits.cpu()).double()
    scores = x / temperature.cpu().double()[:, None]
    V = scores.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(1, V).cpu()
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, NEG_INF)
    probs = scores.sort(dim=-1).values.softmax(dim=-1)
    cum = probs.cumsum(dim=-1).masked_fill(probs == 0, float("inf"))
    thr = (1.0 - top_p.cpu()).float().double()
    top_p_margin = (cum - thr[:, None]).abs().amin(dim=-1)
    ratio = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    mp = min_p.cpu().double()[:, None]
    min_p_margin = ((ratio - mp).abs() / mp).masked_fill(ratio == 0, float("inf")).amin(dim=-1)
    return (torch.where(top_p.cpu() < 1, top_p_margin, float("inf")),
            torch.where(min_p.cpu() > 0, min_p_margin, float("inf")))  # fmt: skip


def _random_rows(B, V, seed, *, margin=1e-5, ties=True, top_ks=None):
    """Logits and per-row parameters with no token near a float-rounding boundary. Rows mix
    Gaussian logits with coarse grids (many ties), some -inf, and every filter combination
    (top_k from `top_ks` where given)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return torch.tensor(options)[torch.randint(len(options), (B,), generator=g)]

    temperature = pick([0.5, 0.7, 1.0, 1.3, 2.0]).float()
    top_k = pick(top_ks or [0, 0, 1, 3, 10, V // 2, V - 1, V, V + 5]).long()
    top_p = pick([1.0, 1.0, 0.95, 0.8, 0.5, 0.1]).double()
    min_p = pick([0.0, 0.0, 0.02, 0.1, 0.3]).float()
    logits = torch.empty(B, V)
    for b in range(B):
        for _ in range(50):  # redraw rows that sit on a threshold
            row = torch.randn(V, generator=g) * float(torch.rand(1, generator=g) * 4 + 0.5)
            if ties and b % 2:
                row = (row * 2).round() / 2
            row[torch.rand(V, generator=g) < 0.05] = NEG_INF
            params = (temperature[b : b + 1], top_k[b : b + 1], top_p[b : b + 1], min_p[b : b + 1])
            near_p, near_min_p = _margins(row[None], *params)
            if near_p > margin and near_min_p > margin:
                break
        logits[b] = row
    return logits, temperature, top_k, top_p, min_p


# ----------------------------------------------------------------------------- kept set (Triton)


@pytest.mark.parametrize("V, B", [(7, 16), (100, 24), (1000, 8), (3000, 4)])
def test_kept_set_matches_reference(V, B, device):
    logits, *params = _random_rows(B, V, seed=V)
    params = [p.to(device) for p in params]
    kept = kept_mask(logits.to(device), *params).cpu()
    torch.testing.assert_close(kept, _reference_kept(logits, *params), atol=0, rtol=0)


@pytest.mark.parametrize("top_k_bound", [0, 40], ids=["searches", "candidates"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kept_set_half_logits(dtype, top_k_bound, device):
    top_ks = [1, 3, 10, 40] if top_k_bound else None
    logits, *params = _random_rows(12, 300, seed=5, ties=False, top_ks=top_ks)
    logits = logits.to(dtype)  # the reference upcasts the rounded values, like the kernel
    kept = kept_mask(logits.to(device), *[p.to(device) for p in params], top_k_bound=top_k_bound).cpu()
    expected = _reference_kept(logits, *params)
    near_p, near_min_p = _margins(logits, *params)
    rows = (near_p > 1e-5) & (near_min_p > 1e-5)  # rounding to half may move a row onto a threshold
    assert rows.sum() >= 8
    torch.testing.assert_close(kept[rows], expected[rows], atol=0, rtol=0)


def test_kept_set_non_contiguous_rows(device):
    logits, *params = _random_rows(6, 200, seed=11)
    wide = torch.randn(6, 256)
    wide[:, :200] = logits
    params = [p.to(device) for p in params]
    kept = kept_mask(wide.to(device)[:, :200], *params).cpu()
    torch.testing.assert_close(kept, _reference_kept(logits, *params), atol=0, rtol=0)


def test_top_k_ties_are_all_kept(device):
    # The 3rd largest value (1.0) appears three times: top_k=3 keeps all of them (5 tokens).
    logits = torch.tensor([[0.0, 1.0, 3.0, 1.0, -1.0, 2.0, 1.0, 0.5]])
    kept = kept_mask(logits.to(device), *_params(1, device, top_k=3)).cpu()
    assert kept[0].tolist() == [False, True, True, True, False, True, True, False]


def _assert_parameters_clamped(device, num_chunks=None, top_k_bound=0):
    """Values the host never checks (they live on the device) are clamped, never out of range,
    on the path `num_chunks` and `top_k_bound` pick."""
    V = 50
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)).expand(10, V).contiguous()
    nan = float("nan")
    t = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, -1, nan])
    k = torch.tensor([-5, 10**12, 0, 0, 0, 0, 0, 0, 0, 0])
    p = torch.tensor([1.0, 1, 0, -3, 2, nan, 1, 1, 1, 1], dtype=torch.float64)
    mp = torch.tensor([0.0, 0, 0, 0, 0, 0, 2, nan, 0, 0])
    params = [a.to(device) for a in (t, k, p, mp)]
    kept = kept_mask(logits.to(device), *params, num_chunks=num_chunks, top_k_bound=top_k_bound).cpu()
    top = logits[0].argmax()
    everything = torch.ones(V, dtype=torch.bool)
    only_top = torch.arange(V) == top
    # top_k -5 and 1e12: off. top_p 0 and -3: the top token. top_p 2, NaN: off. min_p 2: the
    # top token; NaN: off. Temperature -1 and NaN: greedy (the argmax alone).
    expected = [everything, everything, only_top, only_top, everything, everything, only_top,
                everything, only_top, only_top]  # fmt: skip
    torch.testing.assert_close(kept, torch.stack(expected), atol=0, rtol=0)
    ids = triton_sample(logits.to(device), *params, torch.tensor([7], device=device), num_chunks=num_chunks,
                        top_k_bound=top_k_bound).cpu()
    assert ((ids >= 0) & (ids < V)).all()
    assert (ids[[2, 3, 6, 8, 9]] == top).all()


def test_device_parameters_are_clamped(device):
    _assert_parameters_clamped(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("V", [50257, 128256, 262144])
def test_gpu_kept_set_large_vocab(V, dtype):
    B = 32
    g = torch.Generator(device="cuda").manual_seed(V)
    logits = (torch.randn(B, V, device="cuda", generator=g) * 4).to(dtype)
    logits[::3, :: V // 10] = float("nan")
    t = torch.linspace(0.5, 1.5, B, device="cuda")
    k = torch.tensor([0, 1, 50, 1000, V - 1, V] * 6, device="cuda")[:B]
    p = torch.tensor([1.0, 0.9, 0.5, 0.99], device="cuda", dtype=torch.float64).repeat(8)
    mp = torch.tensor([0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0], device="cuda").repeat(4)
    kept = kept_mask(logits, t, k, p, mp).cpu()
    expected = _reference_kept(logits.float(), t, k, p, mp)
    near_p, near_min_p = _margins(logits.float(), t, k, p, mp)
    rows = (near_p > 1e-4) & (near_min_p > 1e-4)  # torch's fp32 cumsum over V tokens drifts
    assert rows.sum() >= B // 2
    torch.testing.assert_close(kept[rows], expected[rows], atol=0, rtol=0)


# ----------------------------------------------------------------------------- parameters (the op layer)


def test_top_k_bound_from_the_arguments():
    """The bound the op layer derives: known values all > 0 give their maximum; anything unknown
    (a tensor off the CPU) or a row with top-k off gives 0."""
    from fastgpt.ops.sampling import top_k_bound

    assert top_k_bound(50) == 50 and top_k_bound([3, 40, 7]) == 40 and top_k_bound(torch.tensor([5, 9])) == 9
    assert top_k_bound(0) == 0 and top_k_bound([3, 0]) == 0 and top_k_bound(True) == 0
    assert top_k_bound(torch.tensor([5, 9], device="meta")) == 0


def test_number_parameters_are_made_once():
    """A parameter given as a number is one cached (B,) tensor per (value, B, dtype, device): no
    fill kernel per call. Other values, batch sizes or dtypes get their own."""
    from fastgpt.ops.sampling import row_params

    first, again = row_params(3, "cpu", 0.7, 50, 0.9, 0.0), row_params(3, "cpu", 0.7, 50, 0.9, 0.0)
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert [p.tolist() for p in first[1:]] == [[50] * 3, [0.9] * 3, [0.0] * 3]
    assert first[0].dtype == torch.float32 and torch.equal(first[0], torch.full((3,), 0.7))
    other = row_params(4, "cpu", 0.7, 40, 0.9, 0.0)
    assert other[1].tolist() == [40] * 4 and other[0] is not first[0] and other[0].shape == (4,)
    assert row_params(3, "meta", 0.7, 50, 0.9, 0.0)[0].device.type == "meta"


def test_cached_parameters_do_not_leak_between_modes():
    """Rows made under inference_mode are inference tensors, which autograd will not save: a
    filter_logits with grad after one under inference_mode raised. Under a dispatch mode
    (FakeTensorMode) the rows are fake, and cached they broke every later real call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B = 5  # a batch no other test caches rows for
    with torch.inference_mode():
        fastgpt.filter_logits(torch.randn(B, 20), temperature=0.7, top_p=0.9)
    logits = torch.randn(B, 20, requires_grad=True)
    fastgpt.filter_logits(logits, temperature=0.7, top_p=0.9).logsumexp(dim=-1).sum().backward()
    assert logits.grad.shape == (B, 20)
    with FakeTensorMode() as mode:
        fastgpt.filter_logits(mode.from_tensor(torch.randn(B, 20)), temperature=0.6, top_p=0.8)
    assert fastgpt.sample(torch.randn(B, 20), temperature=0.6, top_p=0.8, backend="torch").shape == (B,)


def test_cached_parameters_are_still_checked():
    """Four numbers that passed once are looked up, not checked again: the lookup tells values of
    another type (50.0 == 50) and the other check (filter_logits takes no temperature 0) apart."""
    from fastgpt.ops.sampling import row_params

    assert row_params(2, "cpu", 0.0, 50, 0.9, 0.0)[0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        row_params(2, "cpu", 0.0, 50, 0.9, 0.0, allow_greedy=False)
    with pytest.raises(TypeError, match="top_k must be an int"):
        row_params(2, "cpu", 0.0, 50.0, 0.9, 0.0)
    assert row_params(2, "cpu", 1, 50, 1, 0)[2].dtype == torch.float64  # ints for the float ones are fine
    with pytest.raises(ValueError, match="top_p must be in"):
        row_params(2, "cpu", 0.7, 50, 1.5, 0.0)
    with pytest.raises(ValueError, match="top_p must be in"):  # a refused call is not remembered
        row_params(2, "cpu", 0.7, 50, 1.5, 0.0)


def test_public_sample_passes_the_bound(monkeypatch):
    """fastgpt.sample hands the Triton launcher the bound of its top_k; generate's decoder keeps
    the one of its call."""
    from fastgpt.kernels import sampling as kernels

    bounds = []
    real = kernels.sample
    monkeypatch.setattr(kernels, "sample", lambda *a, top_k_bound: bounds.append(top_k_bound) or real(*a))
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    for top_k in (50, [2, 9, 4], torch.tensor([1, 1, 3]), 0):
        fastgpt.sample(logits, temperature=0.9, top_k=top_k, backend="triton")
    assert bounds == [50, 9, 3, 0]


# ----------------------------------------------------------------------------- greedy, non-finite


def test_greedy_first_index_on_ties(device, poisoned_empty):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [0.0, 2.0, 1.0, 2.0, 2.0],
        [3.0, 3.0, 3.0, 3.0, 3.0],
        [nan, 1.0, nan, 1.0, 0.0],  # NaN is -inf
        [1.0, inf, 2.0, inf, nan],  # the first +inf
        [-inf, -inf, -inf, -inf, -inf],
        [nan, nan, nan, nan, nan],
        [-1.0, -0.0, 0.0, -2.0, -inf],  # -0.0 == 0.0: the first
    ])  # fmt: skip
    ids = fastgpt.sample(logits.to(device), temperature=0.0, top_k=2, backend="triton").cpu()
    assert ids.tolist() == [1, 0, 1, 1, 0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_argmax_is_the_cleaned_argmax(dtype):
    """reference.greedy skips building clean_logits: the same ids on rows with NaN, +inf, -inf,
    ties and nothing drawable."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 50, generator=g).round().to(dtype)  # rounded: many ties
    special = torch.rand(64, 50, generator=g)
    logits[special < 0.1] = float("nan")
    logits[(special > 0.95) & (torch.arange(64) % 3 == 0)[:, None]] = float("inf")
    logits[special > 0.97] = float("-inf")
    logits[5], logits[6] = float("nan"), float("-inf")
    assert torch.equal(reference.greedy(logits), torch.argmax(reference.clean_logits(logits), dim=-1))


def test_all_greedy_under_auto_is_an_argmax(monkeypatch):
    """temperature=0 (a number) under auto: an argmax, not the sampling kernels; asked for by name
    (or by FASTGPT_BACKEND), the kernels run."""
    from fastgpt import _backends

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    logits[1, 7] = float("nan")
    launched = []
    monkeypatch.setattr(_backends, "resolve", lambda *args, **kwargs: "triton")  # as on a GPU
    monkeypatch.setattr(_backends, "launchers", lambda backend, op: launched.append(op) or _Launch())
    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    expected = torch.where(logits.isnan(), float("-inf"), logits).argmax(-1)  # NaN is never the choice
    assert torch.equal(fastgpt.sample(logits, temperature=0.0), expected) and launched == []
    fastgpt.sample(logits, temperature=0.0, backend="triton")
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    fastgpt.sample(logits, temperature=0.0)
    assert launched == ["sampling", "sampling"]


class _Launch:
    """Stands in for a backend's launchers module: sample returns zeros."""

    @staticmethod
    def sample(logits, *args, **kwargs):
        return torch.zeros(logits.shape[0], dtype=torch.int64)


def test_greedy_rows_in_a_sampling_batch(device):
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0, 0.0, 0.8, 0.0, 1.5, 0.0, 0.0])
    ids = fastgpt.sample(logits.to(device), temperature=t, top_p=0.9, backend="triton").cpu()
    greedy = t == 0
    assert (ids[greedy] == logits.argmax(-1)[greedy]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_non_finite_rows(dtype, device, poisoned_empty):
    nan, inf = float("nan"), float("inf")
    V = 40
    rows = torch.randn(5, V, generator=torch.Generator().manual_seed(1)) * 3
    rows[0] = nan  # nothing drawable: 0
    rows[1] = -inf  # nothing drawable: 0
    rows[2, [5, 17, 30]] = inf  # only the +inf entries, equally likely
    rows[3, : V // 2] = nan  # NaN never drawn
    rows[4] = -inf
    rows[4, 33] = 2.0  # a single finite token
    copies = torch.tensor([2, 2, 24, 4, 2])
    logits = rows.repeat_interleave(copies, dim=0).to(dtype).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    ids = fastgpt.sample(logits, temperature=0.7, top_k=20, top_p=0.9, generator=g, backend="triton")
    ids = ids.cpu().split(copies.tolist())
    assert (ids[0] == 0).all() and (ids[1] == 0).all()
    assert set(ids[2].tolist()) == {5, 17, 30}
    assert (ids[3] >= V // 2).all()
    assert (ids[4] == 33).all()


def test_ids_always_in_range(device, poisoned_empty):
    """Random parameters and logits with NaN/inf: every id lies in [0, V) and is drawable."""
    logits, t, k, p, mp = _random_rows(32, 333, seed=2)
    logits[::5, ::7] = float("nan")
    logits[3, 100] = float("inf")
    t[::4] = 0.0
    args = [a.to(device) for a in (logits, t, k, p, mp)]
    ids = triton_sample(*args, torch.tensor([123], device=device)).cpu()
    assert ((ids >= 0) & (ids < 333)).all()
    kept = kept_mask(*args).cpu()
    assert kept[torch.arange(32), ids].all()


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64, 256, 1024])
def test_gpu_sample_batches(B):
    V = 128256
    logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.rand(B, device="cuda") + 0.2
    t[::4] = 0.0
    ids = fastgpt.sample(logits, temperature=t, top_k=50, top_p=0.9, min_p=0.01, backend="triton")
    assert ((ids >= 0) & (ids < V)).all()
    greedy = (t == 0).cpu()
    assert torch.equal(ids.cpu()[greedy], logits.float().argmax(-1).cpu()[greedy])
    k = torch.full((B,), 50, device="cuda")
    kept = kept_mask(logits, t, k, torch.full((B,), 0.9, device="cuda", dtype=torch.float64),
                     torch.full((B,), 0.01, device="cuda"))  # fmt: skip
    assert kept[torch.arange(B, device="cuda"), ids].all()


# ----------------------------------------------------------------------------- draws, every backend

BACKENDS = ["torch", "triton", "cuda"]


def _skip_unavailable(backend, device, request):
    """Skip where `backend` cannot run on `device`; the cuda backend on a CPU runs on the emulator."""
    if backend == "cuda" and device == "cpu":
        request.getfixturevalue("cuda_emulator")
    reason = _backends.why_not(backend, torch.device(device))
    if reason:
        pytest.skip(reason)


def _chi_square(backend, device, logits, draws, **params):
    """Draw `draws` tokens from identical rows with one seed; chi-square against the softmax of
    reference.draw_scores. Tokens outside the kept set must never appear."""
    B, V = draws, logits.shape[-1]
    rows = logits.expand(B, V).contiguous().to(device)
    g = torch.Generator(device=device).manual_seed(1234)
    ids = fastgpt.sample(rows, generator=g, backend=backend, **params).cpu()
    scores = reference.draw_scores(logits, *_params(1, "cpu", **params))
    _assert_chi_square(ids, torch.softmax(scores.double(), dim=-1)[0])


def _assert_chi_square(ids, probs):
    """ids (draws,) never outside probs' support, and counted as probs (V,) predicts."""
    B, V = ids.shape[0], probs.shape[0]
    assert ((ids >= 0) & (ids < V)).all()
    counts = torch.bincount(ids, minlength=V).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, f"drew removed tokens: {counts[~kept]}"
    result = chisquare(counts[kept].numpy(), (probs[kept] * B).numpy())
    assert result.pvalue > 1e-3, f"chi-square p={result.pvalue}, counts {counts[kept]}"


LOGITS = torch.tensor([[2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, NEG_INF]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_filtered(backend, device, request):
    """Every filter bites: top-k cuts the two lowest finite logits, top-p two more, min-p one."""
    _skip_unavailable(backend, device, request)
    draws = 20000 if device == "cuda" or backend == "torch" else 300  # the interpreter, the emulator: fewer
    _chi_square(backend, device, LOGITS, draws, temperature=0.8, top_k=7, top_p=0.95, min_p=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_temperature_only(backend, device, request):
    _skip_unavailable(backend, device, request)
    draws = 20000 if device == "cuda" or backend == "torch" else 400
    _chi_square(backend, device, LOGITS[:, :8], draws, temperature=1.7)


SPLIT_TIE = torch.tensor([[1.0] + [0.0] * 10])  # at top_p 0.6 Hugging Face keeps 5 of the 10 tied


def test_draw_scores_keep_a_split_tie_group_at_hugging_faces_mass():
    """reference.draw_scores against transformers' warpers on rows of many ties: every token's
    probability is HF's (softmax of its filtered scores), except in a tie group that top-p splits,
    which is kept whole, its members equal, at the group's mass under HF."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(5)
    split = 0
    for _ in range(200):
        V = int(torch.randint(2, 40, (1,), generator=g))
        logits = torch.randint(-4, 3, (1, V), generator=g).float() * 0.5
        top_p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        top_k = int(torch.randint(0, V + 2, (1,), generator=g))
        hf = logits.clone()
        hf = TopKLogitsWarper(top_k)(None, hf) if top_k > 0 else hf
        hf = TopPLogitsWarper(top_p)(None, hf)
        ours = reference.draw_scores(logits, *_params(1, "cpu", top_k=top_k, top_p=top_p))
        p_hf, p_ours = torch.softmax(hf.double(), -1)[0], torch.softmax(ours.double(), -1)[0]
        value = logits[0]
        for v in value.unique():
            members = value == v
            torch.testing.assert_close(p_ours[members].sum(), p_hf[members].sum(), rtol=1e-5, atol=1e-7)
            assert (p_ours[members] == p_ours[members][0]).all()  # equal members, kept or not as a group
            split += bool((p_hf[members] > 0).any() and (p_hf[members] == 0).any())
    assert split > 10  # the rows did split groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["candidates", "searches"])
def test_a_split_tie_group_carries_hugging_faces_mass(backend, path, device, request):
    """One token at 1, ten tied at 0, top_p 0.6: HF keeps 5 of the ten, token 0 has probability
    0.352. The kernels kept the whole group at full weight (0.214); the torch backend drew from
    HF's 5 members only. Every backend and path now draws all ten at HF's total.

    On a GPU the Triton split path is counted too. In the interpreter (~80 ms a row) it is not:
    there its draws of such rows are argmax(draw_scores + the noise) to the token
    (test_draws_are_the_argmax_of_the_scores_plus_the_documented_noise), whose law is the one
    counted here, given draw_scores' masses (test_draw_scores_keep_a_split_tie_group_at_hugging_faces_mass)
    and the noise's law (tests/test_reference.py)."""
    _skip_unavailable(backend, device, request)
    draws = 400 if device == "cpu" and backend != "torch" else 20000  # the interpreter, the emulator: fewer
    top_k = 50 if path == "candidates" else 0  # below 256, known on the host: the candidate lists
    _chi_square(backend, device, SPLIT_TIE, draws, top_p=0.6, top_k=top_k)
    if backend == "triton" and device != "cpu":  # the split path (one row of a wide vocabulary takes it)
        params = [p.to(device) for p in _params(draws, device, top_p=0.6, top_k=top_k)]
        seed = torch.tensor([11], device=device)
        ids = triton_sample(SPLIT_TIE.expand(draws, 11).contiguous().to(device), *params, seed,
                            num_chunks=2).cpu()  # fmt: skip
        _assert_chi_square(ids, torch.softmax(reference.draw_scores(SPLIT_TIE, *_params(1, "cpu", top_p=0.6,
                                                                                        top_k=top_k)).double(), -1)[0])


@pytest.mark.gpu
def test_gpu_chi_square_large_batch():
    _chi_square("triton", "cuda", LOGITS, 200000, temperature=0.8, top_k=7, top_p=0.95, min_p=0.2)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 0.5
    _chi_square("triton", "cuda", logits, 200000, temperature=1.0, top_k=30)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point: x / t overflows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [[50, 50, 50, 1], [0, 50, 0, 1]], ids=["candidates", "searches"])
def test_overflowing_scores_draw_among_the_top_ties(backend, device, top_k, request):
    """Where a row's largest x / t overflows (a tiny temperature, or huge logits), every entry below
    the row's maximum has probability exactly 0: each backend draws uniformly among the entries
    tied at the maximum, with top-k, top-p (rows 1 and 3 split the tie group: Hugging Face keeps
    part of it, which the draw spreads over all of it; the torch backend drew from HF's part) and
    min-p on. (A top_k known below 256 for every row takes the kernels' candidate path, which
    hands such rows to the searching code.)"""
    _skip_unavailable(backend, device, request)
    g = torch.Generator().manual_seed(3)
    V = 128
    n = 4 if backend == "triton" and device == "cpu" else 40  # draws a row (40: missing a tie ~3e-7)
    logits = torch.randn(4, V, generator=g)
    logits[1] *= 1e37
    logits[2:] = 2.9e38 * logits[2:].sign() * (1 - torch.rand(2, V, generator=g) * 1e-3)  # one ulp is ~2e31
    ties = [[17, 127], [5, 6, 7], [0, 99], [40, 41, 42]]
    for row, cols in enumerate(ties):
        logits[row, cols] = 3e38 if row >= 2 else logits[row].max() * 1.5
    t = torch.tensor([1e-40, 1e-2, 0.5, 0.75])  # every row's max / t overflows
    assert (logits.amax(-1) / t == float("inf")).all()
    params = dict(temperature=t.repeat_interleave(n).to(device), top_k=[k for k in top_k for _ in range(n)],
                  top_p=torch.tensor([1.0, 0.5, 0.95, 0.4], dtype=torch.float64).repeat_interleave(n).to(device),
                  min_p=torch.tensor([0.0, 0.0, 0.2, 0.5]).repeat_interleave(n).to(device))  # fmt: skip
    draws = fastgpt.sample(logits.repeat_interleave(n, 0).to(device), generator=torch.Generator(device).manual_seed(0),
                           backend=backend, **params).view(4, n).cpu()  # fmt: skip
    for row, cols in enumerate(ties):
        drawn = set(draws[row].tolist())
        assert drawn == set(cols) if n == 40 else drawn <= set(cols), (row, sorted(drawn))
    if backend == "triton":  # the kept sets themselves, on every path
        expected = torch.zeros(4, V, dtype=torch.bool)
        for row, cols in enumerate(ties):
            expected[row, cols] = True
        args = (logits.to(device), t.to(device), torch.tensor(top_k, device=device), params["top_p"][::n],
                params["min_p"][::n])  # fmt: skip
        paths = [dict(num_chunks=0), dict(num_chunks=2)] if 0 in top_k else [dict(top_k_bound=max(top_k))]
        for path in paths:
            assert torch.equal(kept_mask(*args, **path).cpu(), expected), path


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_temperatures_at_or_below_zero_or_nan_are_greedy(backend, device, request):
    """Values the ops layer cannot check (a GPU tensor's, or under torch.compile) reach the
    launchers as they are: a temperature <= 0 or NaN makes its row greedy on every backend (the
    reference drew token 0 for NaN: its every score was NaN)."""
    _skip_unavailable(backend, device, request)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)).to(device)
    temperature, *params = _params(4, device, top_k=40)
    temperature = torch.tensor([0.0, -1.0, float("nan"), 1.0], device=device)
    launch = reference.sample if backend == "torch" else _backends.launchers(backend, "sampling").sample
    ids = launch(logits, temperature, *params, torch.tensor([3], device=device)).cpu()
    assert torch.equal(ids[:3], logits[:3].argmax(-1).cpu()) and 0 <= ids[3] < 300


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_a_seed(backend, device, request):
    _skip_unavailable(backend, device, request)
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0)).to(device)

    def draw(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        return fastgpt.sample(logits, temperature=1.5, top_p=0.99, generator=g, backend=backend)

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_seed_tensor_drives_the_draw(device):
    """The launcher reads its seed from the device: same seed, same draws; new seed, new draws."""
    logits = torch.randn(16, 97, generator=torch.Generator().manual_seed(0)).to(device)
    params = _params(16, device, temperature=2.0)
    seed = torch.tensor([5], device=device)
    a = triton_sample(logits, *params, seed)
    b = triton_sample(logits, *params, seed)
    seed.fill_(6)
    c = triton_sample(logits, *params, seed)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- the noise
# Each backend's draw is argmax(scores + g), g = reference.gumbel_of_bits of 32 bits per entry:
# the reference's hash; in the kernels, Philox4x32-10 keyed by the seed, at counter (row * V + col
# as two 32-bit words, 0, 0), word 0, in Triton (tl.randint); at (col / 4, row, 0, 0), word col % 4,
# in CUDA.

_M32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(c0, c1, c2, c3, seed):
    """Random123's Philox4x32 with 10 rounds on numpy uint64 arrays holding 32-bit words, keyed
    by an int64 seed's two halves: the four output words."""
    c = [np.asarray(w, dtype=np.uint64) for w in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]  # < 2^64: exact
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c


def _noise(backend, seed, B, V):
    """Entry (row, col)'s Gumbel noise on `backend` under `seed`, from the bits above."""
    if backend == "torch":
        return reference.gumbel(torch.tensor([seed]), (B, V), "cpu")
    row, col = np.meshgrid(np.arange(B, dtype=np.uint64), np.arange(V, dtype=np.uint64), indexing="ij")
    zero = np.zeros_like(row)
    if backend == "triton":
        n = row * np.uint64(V) + col
        bits = _philox4x32_10(n & _M32, n >> np.uint64(32), zero, zero, seed)[0]
    else:
        words = _philox4x32_10(col // np.uint64(4), row, zero, zero, seed)
        bits = np.choose((col % np.uint64(4)).astype(np.int64), words)
    return reference.gumbel_of_bits(torch.from_numpy(bits.astype(np.int64)))


# Every way a row is drawn: (backend, path). top_k_bound > 0 takes the kernels' candidate path.
DRAW_PATHS = [("torch", "reference"), ("triton", "row"), ("triton", "split"), ("triton", "candidates"),
              ("cuda", "one-block"), ("cuda", "candidates")]  # fmt: skip


def _draw_on(backend, path, logits, params, seed, top_k_bound=0):
    """The draw of `backend` along `path`, the seed (an int) given to the launcher."""
    s = torch.tensor([seed], device=logits.device)
    if backend == "torch":
        return reference.sample(logits, *params, s)
    bound = top_k_bound if path == "candidates" else 0
    if backend == "triton":
        return triton_sample(logits, *params, s, top_k_bound=bound, num_chunks={"row": 0, "split": 3}.get(path))
    return _backends.launchers("cuda", "sampling").sample(logits, *params, s, top_k_bound=bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend, path", DRAW_PATHS)
def test_draws_are_the_argmax_of_the_scores_plus_the_documented_noise(backend, path, dtype, device, request):
    """Every backend and path draws argmax(draw_scores + g), g computed here from the seed, to the
    token: the kept set, the tie share at a top-p cut and the noise (Gumbel, over the documented
    counters) at once. 24 rows of every filter, ties and -inf (none near a rounding boundary), and
    40 of SPLIT_TIE's kind at top_p 0.6 (half the tie group kept: a share of 1/2, which flips
    several of their draws)."""
    _skip_unavailable(backend, device, request)
    V, seed = 200, -7_046_029_254_386_353_131  # 0x9E3779B97F4A7C15: both halves set
    candidates = path == "candidates"
    logits, *params = _random_rows(24, V, seed=5 + candidates, top_ks=[1, 3, 10, 50] if candidates else None)
    split = torch.full((40, V), NEG_INF)
    split[:, : SPLIT_TIE.shape[1]] = SPLIT_TIE
    split_params = _params(40, "cpu", top_k=50 if candidates else 0, top_p=0.6)
    logits = torch.cat([logits, split]).to(dtype)
    params = [torch.cat(pair) for pair in zip(params, split_params)]
    B = logits.shape[0]
    z = reference.draw_scores(logits.float(), *params).double() + _noise(backend, seed, B, V)
    best2 = z.topk(2, dim=-1).values
    clear = best2[:, 0] - best2[:, 1] > 1e-3  # rows a last-ulp difference in the noise cannot flip
    assert clear.sum() >= B - 4
    ids = _draw_on(backend, path, logits.to(device), [p.to(device) for p in params], seed, top_k_bound=50).cpu()
    assert torch.equal(ids[clear], z.argmax(dim=-1)[clear])


# (seed, far token) per backend, found by a search over seeds: in a 64-token row the far token's
# noise exceeds the lowest of the others' by more than 20 (_noise; the test checks it).
FAR_DRAWS = {
    "torch": (6601192716809183571, 13),
    "triton": (-2400162671940186402, 26),
    "cuda": (2695220534419095211, 38),
}


@pytest.mark.parametrize("backend, path", DRAW_PATHS)
def test_a_token_19_5_nats_below_the_best_can_be_drawn(backend, path, device, request):
    """A row of two tokens, the second 19.5 nats below the first, under a seed whose noise favours
    the second by more than that: it is drawn. (Its probability is e^-19.5, 3e-9; with 23-bit
    uniforms the noise spanned only [-2.81, 16.64], so no seed could draw it.)"""
    _skip_unavailable(backend, device, request)
    seed, far = FAR_DRAWS[backend]
    V = 64
    g = _noise(backend, seed, 1, V)[0]
    top = int(torch.where(torch.arange(V) == far, float("inf"), g).argmin())  # the lowest noise but far's
    assert g[far] - 19.5 > g[top] + 0.5
    logits = torch.full((1, V), NEG_INF)
    logits[0, top], logits[0, far] = 0.0, -19.5
    params = [p.to(device) for p in _params(1, "cpu", top_k=2 if path == "candidates" else 0)]
    assert int(_draw_on(backend, path, logits.to(device), params, seed, top_k_bound=2)[0]) == far


def test_triton_noise_is_the_reference_mapping(device):
    """common._gumbel_of_bits against the mapping in fp64 (and reference.gumbel_of_bits) over
    random bits, the ends of each half (the extremes 22.87 and -3.13, finite) and the bits whose
    w = 1 - x lies within 2^-12 of 1, where log(w) / (w - 1) stands for log1p."""
    bits = torch.cat([torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**24, 2**24 + 1]),
                      torch.tensor([2**7, 2**7 + 1, 2**12 + 5, 2**16 + 77, 2**20 + 3]),  # log(w) / (w - 1), w near 1
                      torch.randint(0, 2**32, (503,), generator=torch.Generator().manual_seed(0))])  # fmt: skip
    out = torch.full((bits.numel(),), float("nan"), device=device)
    as_int32 = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # the same 32 bits
    _noise_kernel[(1,)](as_int32.to(device), out, bits.numel(), BLOCK=triton.next_power_of_2(bits.numel()))
    x = ((bits & 0x7FFFFFFF).double() + 0.5) * 2.0**-32
    exact = -torch.log(torch.where(bits >= 2**31, -torch.log(x), -torch.log1p(-x)))
    torch.testing.assert_close(out.cpu().double(), exact, atol=1e-5, rtol=1e-6)  # a GPU's logf: other last bits
    torch.testing.assert_close(reference.gumbel_of_bits(bits).double(), exact, atol=2e-6, rtol=0)
    assert abs(exact[0] - 33 * math.log(2)) < 1e-9 and abs(exact[4] + math.log(33 * math.log(2))) < 1e-9


@triton.jit
def _noise_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + i, mask=i < n).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, _gumbel_of_bits(bits), mask=i < n)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64, 1024])
def test_gpu_cuda_graph_capture_and_replay(B):
    """Capture and replay of whichever path the batch takes (split at B = 1, and at 64 on a GPU
    with more than 32 SMs; one program per row at 1024 on one with at most 512)."""
    V = 50257
    logits = torch.randn(B, V, device="cuda") * 2
    params = _params(B, "cuda", temperature=0.8, top_k=50, top_p=0.9)
    seed = torch.tensor([11], device="cuda")
    triton_sample(logits, *params, seed)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = triton_sample(logits, *params, seed)
    for s in (3, 4):
        seed.fill_(s)
        logits.normal_()
        graph.replay()
        torch.testing.assert_close(ids, triton_sample(logits, *params, seed), atol=0, rtol=0)
    # Through the public API the seed comes from the CUDA generator, which advances per replay.
    fastgpt.sample(logits, temperature=1.0, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        public_ids = fastgpt.sample(logits, temperature=5.0, backend="triton")
    graph.replay()
    first = public_ids.clone()
    graph.replay()
    assert ((public_ids >= 0) & (public_ids < V)).all()
    assert not torch.equal(first, public_ids)
