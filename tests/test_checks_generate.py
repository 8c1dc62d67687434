"""GPT.generate's arguments: bad ones raise a clear error naming the argument before anything runs
(the rest of its checks: tests/test_generate.py's test_bad_arguments and test_bad_prompts)."""

import pytest
import torch

from fastgpt.model import GPT, GPTConfig

V = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()


@pytest.mark.parametrize("kwargs, error, match", [
    # Non-binary masks were cast to int64 first, so 0.5 became padding and 1.5 a token, silently.
    (dict(attention_mask=torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]])), ValueError, "only 0 .* and 1"),
    (dict(attention_mask=torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]])), ValueError, "only 0 .* and 1"),
    (dict(attention_mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "attention_mask must hold integers"),
    (dict(attention_mask=torch.ones(2, 3, device="meta")), ValueError, "attention_mask must hold values"),
    (dict(eos_token_id=1.0), ValueError, "eos_token_id must be an int >= 0"),  # was: 'float' object is not iterable
    (dict(eos_token_id=2**70), ValueError, "eos_token_id must be an int >= 0"),  # was: int64 overflow
    (dict(eos_token_id=1, pad_token_id="x"), ValueError, "pad_token_id must be an int >= 0"),
    (dict(eos_token_id=1, pad_token_id=2**70), ValueError, "pad_token_id must be an int >= 0"),
    (dict(eos_token_id=1, pad_token_id=-5), ValueError, "pad_token_id must be an int >= 0"),
    (dict(eos_token_id=1, pad_token_id=1.5), ValueError, "pad_token_id must be an int >= 0"),
    # A finished row feeds its pad to the model next: one past the vocabulary was an IndexError
    # mid-call on the torch backend (a device-side assert on a GPU's nn.Embedding).
    (dict(eos_token_id=1, pad_token_id=V), ValueError, "pad_token_id must be below the model's vocab_size = 50"),
    (dict(eos_token_id=[V + 5, 1]), ValueError, r"the first eos id \(pad_token_id's default\) must be below"),
    (dict(cuda_graph="no"), TypeError, "cuda_graph must be None or a bool"),
])  # fmt: skip
def test_generate_rejects(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, V, (2, 3)), 2, **kwargs)


def test_a_pad_past_the_vocabulary_is_fine_where_no_row_can_finish(model):
    """Without eos ids in the vocabulary (a tokenizer's eos over a smaller model's) no row
    finishes, so the pad is never emitted nor fed back."""
    idx = torch.randint(0, V, (2, 3))
    expected = model.generate(idx, 3)
    assert torch.equal(model.generate(idx, 3, pad_token_id=V + 7), expected)
    assert torch.equal(model.generate(idx, 3, eos_token_id=V + 2), expected)  # the default pad: V + 2


def test_float_and_bool_masks_of_zeros_and_ones_are_masks(model):
    idx = torch.randint(0, V, (2, 3))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = model.generate(idx, 2, attention_mask=mask)
    assert torch.equal(model.generate(idx, 2, attention_mask=mask.float()), expected)
    assert torch.equal(model.generate(idx, 2, attention_mask=mask.bool()), expected)
