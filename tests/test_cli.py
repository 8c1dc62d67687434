"""The `fastgpt` command: info, and generate from a local checkpoint with its tokenizer."""

import pytest
import torch

from fastgpt import cli


def test_info_reports_versions_and_each_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    for backend in ("cuda", "triton", "torch"):
        assert f"backend       {backend}" in out
    assert "pdl           o" in out  # on, or off and why


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GPT-2 saved as Hugging Face saves one, with a byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = ByteLevelBPETokenizer()
    text = ["The quick brown fox jumps over the lazy dog."] * 20 + ["Hello world, this is fastgpt."] * 20
    tokenizer.train_from_iterator(text, vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer.save(str(path / "tokenizer.json"))
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_generate_prints_prompt_and_continuation(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "The quick brown fox", "--max-new-tokens", "8",
            "--device", "cpu", "--stats"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The quick brown fox")
    assert len(captured.out.strip()) > len("The quick brown fox")
    assert "tok/s" in captured.err


def test_generate_is_reproducible_with_a_seed(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu",
            "--temperature", "1.0", "--top-k", "20", "--seed", "3"]
    cli.main(args)
    first = capsys.readouterr().out
    cli.main(args)
    assert capsys.readouterr().out == first


def test_generate_compiled_prints_the_same_text(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hello there", "--max-new-tokens", "6", "--device", "cpu"]
    cli.main(args)
    plain = capsys.readouterr().out
    torch._dynamo.reset()
    assert cli.main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == plain
    torch._dynamo.reset()


@pytest.mark.parametrize("extra, message", [(["--top-p", "0"], "top_p"), (["--max-new-tokens", "500"], "n_positions")])
def test_generate_reports_bad_arguments_in_one_line(checkpoint, capsys, extra, message):
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hi", "--device", "cpu", "--max-new-tokens", "4"]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert "fastgpt generate: error:" in err and message in err


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "Hi", "--device", "cpu"]) == 2
    assert "fastgpt generate: error:" in capsys.readouterr().err
