"""The reference ops against PyTorch: SDPA (GQA, bottom-right causal) and F.layer_norm."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import reference


def bottom_right_mask(Sq, Sk):
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    return j <= i + (Sk - Sq)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D", [(2, 4, 4, 17, 17, 32), (1, 6, 2, 33, 33, 80), (2, 8, 1, 5, 5, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(B, Hq, Hkv, Sq, Sk, D, causal):
    q, k, v = (torch.randn(B, h, s, D, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal), expected)


@pytest.mark.parametrize("Sq,Sk", [(3, 11), (1, 9), (16, 40)])
def test_causal_is_bottom_right_when_sq_lt_sk(Sq, Sk):
    q, k, v = (torch.randn(2, 4, s, 16, dtype=torch.float64) for s in (Sq, Sk, Sk))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right_mask(Sq, Sk), scale=0.3)
    torch.testing.assert_close(reference.attention(q, k, v, causal=True, scale=0.3), expected)


def test_causal_rows_that_see_no_key_are_zero():
    Sq, Sk = 7, 3  # queries 0..3 see no key under bottom-right alignment
    q, k, v = (torch.randn(1, 2, s, 16, dtype=torch.float64) for s in (Sq, Sk, Sk))
    out = reference.attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, : Sq - Sk], torch.zeros_like(out[:, :, : Sq - Sk]))
    expected = F.scaled_dot_product_attention(q[:, :, Sq - Sk :], k, v, is_causal=True)
    torch.testing.assert_close(out[:, :, Sq - Sk :], expected)


def test_decode_matches_sdpa_over_each_rows_prefix():
    B, Hq, Hkv, Smax, D = 3, 6, 2, 21, 32
    q = torch.randn(B, Hq, 1, D, dtype=torch.float64)
    kc, vc = (torch.randn(B, Hkv, Smax, D, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor([1, 21, 9], dtype=torch.int32)
    out = reference.decode_attention(q, kc, vc, lens)
    for b, n in enumerate(lens.tolist()):
        expected = F.scaled_dot_product_attention(q[b : b + 1], kc[b : b + 1, :, :n], vc[b : b + 1, :, :n], enable_gqa=True)
        torch.testing.assert_close(out[b : b + 1], expected)


def test_decode_ignores_whatever_lies_past_each_length():
    q = torch.randn(2, 2, 1, 16)
    kc, vc = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lens = torch.tensor([4, 6], dtype=torch.int32)
    expected = reference.decode_attention(q, kc, vc, lens)
    kc[0, :, 4:], vc[0, :, 4:] = float("nan"), float("inf")
    kc[1, :, 6:], vc[1, :, 6:] = float("inf"), float("nan")
    torch.testing.assert_close(reference.decode_attention(q, kc, vc, lens), expected)


def test_decode_clamps_lengths_and_zero_length_is_zero():
    q = torch.randn(2, 2, 1, 16)
    kc, vc = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    out = reference.decode_attention(q, kc, vc, torch.tensor([0, 99], dtype=torch.int32))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], reference.decode_attention(q[1:], kc[1:], vc[1:], torch.tensor([5], dtype=torch.int32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_affine", [True, False])
def test_layer_norm_matches_torch(dtype, with_affine):
    x = torch.randn(4, 7, 100, dtype=dtype)
    r = torch.randn(4, 7, 100, dtype=dtype)
    w = torch.randn(100) if with_affine else None
    b = torch.randn(100) if with_affine else None
    y, h = reference.layer_norm(x, w, b, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    expected = F.layer_norm(h.float(), (100,), w, b, 1e-5).to(dtype)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x.float(), (100,), w, b).to(dtype))


def test_gumbel_noise_is_gumbel_with_both_tails_to_e_minus_22_9():
    """reference.gumbel: Gumbel(0, 1) by a Kolmogorov-Smirnov test, reproducible under its seed;
    gumbel_of_bits' extremes 33 ln 2 and -ln(33 ln 2) (u within 2^-33 of 1 and of 0), finite."""
    from scipy.stats import kstest

    g = reference.gumbel(torch.tensor([1234567891011]), (64, 1000), "cpu")
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert kstest(g.flatten().double().numpy(), "gumbel_r").pvalue > 1e-3
    assert torch.equal(g, reference.gumbel(torch.tensor([1234567891011]), (64, 1000), "cpu"))
    assert not torch.equal(g, reference.gumbel(torch.tensor([1234567891012]), (64, 1000), "cpu"))
    for s in range(1, 9):  # a small seed's element n = s: not the all-zero bits (the largest noise)
        assert reference.gumbel(torch.tensor([s]), (9,), "cpu")[s] < 22
    ends = reference.gumbel_of_bits(torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1])).double()
    top, bottom = 33 * math.log(2), -math.log(33 * math.log(2))
    torch.testing.assert_close(ends, torch.tensor([top, -math.log(math.log(2)), bottom, -math.log(math.log(2))],
                                                  dtype=torch.float64), atol=1e-6, rtol=0)  # fmt: skip


def test_torch_backend_is_the_reference():
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    torch.testing.assert_close(fastgpt.attention(q, k, v, causal=True, backend="torch"), reference.attention(q, k, v, causal=True))
    x, w, b = torch.randn(5, 32), torch.randn(32), torch.randn(32)
    torch.testing.assert_close(fastgpt.layer_norm(x, w, b, backend="torch"), reference.layer_norm(x, w, b))
