"""The `fastgpt` command: info, and generate from a local checkpoint with its tokenizer."""

import json

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


def test_generate_compiled_prints_the_same_text(checkpoint, capsys, monkeypatch):
    """--compile runs the decode forward through torch.compile(fullgraph=True): the same text. Its
    backend here is aot_eager, which traces what inductor gets without inductor's C++ build (~30 s
    on a cold cache); inductor's own run: tests/test_generate.py's test_compile_option."""
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hello there", "--max-new-tokens", "6",
            "--device", "cpu"]
    cli.main(args)
    plain = capsys.readouterr().out
    torch_compile, calls = torch.compile, []

    def aot_eager(fn, **options):
        calls.append(options)
        return torch_compile(fn, **(options | {"backend": "aot_eager"}))

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    assert cli.main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == plain
    assert len(calls) == 1 and calls[0]["fullgraph"]
    torch._dynamo.reset()


def test_generate_with_the_persistent_step_prints_the_same_text(checkpoint, capsys, monkeypatch):
    """--persistent-decode on the triton backend (the interpreter's on a CPU): the same greedy text."""
    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hello there", "--max-new-tokens", "5",
            "--device", "cpu"]
    cli.main(args)
    plain = capsys.readouterr().out
    assert cli.main(args + ["--persistent-decode"]) == 0
    assert capsys.readouterr().out == plain


def test_generate_with_prompt_lookup_prints_the_same_text(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "one two one two one", "--max-new-tokens", "12",
            "--device", "cpu"]
    cli.main(args)
    plain = capsys.readouterr().out
    assert cli.main(args + ["--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("extra, message", [(["--top-p", "0"], "top_p"), (["--max-new-tokens", "500"], "n_positions"),
                                            (["--device", "foo"], "--device must be cpu or cuda"),
                                            (["--device", "meta"], "--device must be cpu or cuda")])
def test_generate_reports_bad_arguments_in_one_line(checkpoint, capsys, extra, message):
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hi", "--device", "cpu", "--max-new-tokens", "4"]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert "fastgpt generate: error:" in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_generate_refuses_cuda_without_it(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "Hi", "--device", "cuda", "--max-new-tokens", "4"]
    assert cli.main(args) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_device_index_past_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli._device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device cuda:2: torch sees 2 CUDA device"):
        cli._device("cuda:2")


def test_generate_stops_at_any_of_a_list_of_eos_ids(checkpoint, tmp_path, capsys):
    """config.json's eos_token_id may be a list: the text stops before whichever comes first (the
    CLI compared each token with the list itself, and printed the end-of-text token)."""
    import shutil

    from fastgpt.loading import load_tokenizer
    from fastgpt.model import GPT

    prompt, tokenizer = "The quick brown fox", load_tokenizer(str(checkpoint))
    prompt_ids = tokenizer.encode(prompt).ids
    greedy = GPT.from_pretrained(checkpoint).generate(torch.tensor([prompt_ids]), 8)[0, len(prompt_ids):].tolist()
    unused = next(i for i in range(tokenizer.get_vocab_size()) if i not in greedy)
    model_dir = tmp_path / "eos-list"
    shutil.copytree(checkpoint, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": [unused, greedy[3]]}))
    args = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(greedy[:greedy.index(greedy[3])]) + "\n"


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "Hi", "--device", "cpu"]) == 2
    assert "fastgpt generate: error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--top-p", "1.5"], "top_p must be in (0, 1]"),
                                            (["--temperature", "nan"], "temperature must be >= 0"),
                                            (["--top-k", "-1"], "top_k must be >= 0"),
                                            (["--min-p", "2"], "min_p must be in [0, 1]"),
                                            (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
                                            (["--seed", str(2**64)], "--seed must be in [-2**63, 2**64)"),
                                            (["--prompt-lookup", "-2"], "--prompt-lookup must be >= 0"),
                                            (["--prompt-lookup", "3", "--compile"], "--compile does not apply")])
def test_generate_checks_its_arguments_before_loading(tmp_path, capsys, extra, message):
    """A bad sampling argument or seed is reported before the model loads (a hub id downloads
    first) and before the prompt is printed; a seed past torch.Generator's range said only
    "Overflow when unpacking long long"."""
    args = ["generate", "--model", str(tmp_path / "not-there"), "--prompt", "Hi", "--device", "cpu"]
    assert cli.main(args + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("fastgpt generate: error: ") and message in line


def test_ctrl_c_stops_quietly(monkeypatch, capsys):
    """Ctrl-C during a subcommand (a long generation, say) prints one line, no traceback, and exits 130."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "info", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "fastgpt info: interrupted"
