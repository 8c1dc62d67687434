"""filter_logits against transformers' logits warpers, exactly (bit for bit)."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import fastgpt


def hf_filter(scores, temperature, top_k, top_p, min_p):
    """The warpers transformers' generate adds for these settings, in its order."""
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


def random_logits(gen, B, V, dtype, ties):
    x = torch.randn(B, V, generator=gen) * (0.5 + 4 * torch.rand((), generator=gen))
    if ties:  # coarse values: many exact ties, also at the k-th value
        x = torch.round(x * 2) / 2
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_hf_warpers_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        V = int(torch.randint(1, 400, (), generator=gen))
        logits = random_logits(gen, 3, V, dtype, ties=trial % 2 == 0)
        t = [1.0, 0.7, 1.9, 0.05][trial % 4]
        k = [0, 1, 5, 50, V, V + 7][trial % 6]
        p = [1.0, 0.9, 0.5, 0.01, 0.999][trial % 5]
        m = [0.0, 0.1, 0.5, 1.0][trial % 4 if trial % 3 else 0]
        out = fastgpt.filter_logits(logits, temperature=t, top_k=k, top_p=p, min_p=m)
        expected = hf_filter(logits.clone(), t, k, p, m)
        assert torch.equal(out, expected), (trial, V, t, k, p, m)


def test_per_row_parameters_equal_rows_run_alone():
    gen = torch.Generator().manual_seed(1)
    logits = random_logits(gen, 5, 257, torch.float32, ties=True)
    temperature = torch.tensor([1.0, 0.5, 2.0, 0.8, 1.3])
    top_k = torch.tensor([0, 3, 40, 1, 0])
    top_p = torch.tensor([1.0, 0.3, 0.95, 0.9, 0.6], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.2, 0.0, 0.05, 0.3])
    out = fastgpt.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for b in range(5):
        args = (float(temperature[b]), int(top_k[b]), float(top_p[b]), float(min_p[b]))
        assert torch.equal(out[b : b + 1], hf_filter(logits[b : b + 1].clone(), *args)), b


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    out = fastgpt.filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[True, False, True, True, True, False]]


def test_off_values_change_nothing():
    logits = torch.randn(4, 100)
    assert torch.equal(fastgpt.filter_logits(logits), logits)
    assert torch.equal(fastgpt.filter_logits(logits, top_k=0, top_p=1.0, min_p=0.0), logits)


def test_always_keeps_the_top_token():
    logits = torch.randn(8, 64)
    out = fastgpt.filter_logits(logits, top_p=1e-9, min_p=1.0)
    assert (torch.isfinite(out).sum(-1) >= 1).all()
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
