"""fastgpt.nn.LayerNorm: a drop-in for nn.LayerNorm that also takes the residual."""

import pytest
import torch
from torch import nn

import fastgpt.nn


def test_matches_torch_layer_norm_and_loads_its_state_dict():
    ref = nn.LayerNorm(48)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ln = fastgpt.nn.LayerNorm(48)
    ln.load_state_dict(ref.state_dict())
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    torch.testing.assert_close(ln(x), ref(x))
    y, h = ln(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r))


def test_from_torch_shares_parameters_and_handles_no_bias():
    ref = nn.LayerNorm(16, bias=False, eps=1e-6)
    ln = fastgpt.nn.LayerNorm.from_torch(ref)
    assert ln.weight is ref.weight and ln.bias is None and ln.eps == 1e-6
    x = torch.randn(3, 16)
    torch.testing.assert_close(ln(x), ref(x))


def test_rejects_multi_dimensional_normalized_shape():
    with pytest.raises(ValueError, match="one dimension"):
        fastgpt.nn.LayerNorm((4, 8))


@pytest.mark.parametrize("affine", [True, False])
def test_rejects_an_input_of_another_width(affine):
    """As nn.LayerNorm does; without weights the op has nothing to check x's width against."""
    ln = fastgpt.nn.LayerNorm(8, elementwise_affine=affine, backend="torch")
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        ln(torch.randn(3, 5))
    assert ln(torch.randn(2, 3, 8)).shape == (2, 3, 8)
