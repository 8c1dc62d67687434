"""Checkpoint loading: HF directories (safetensors, .bin, sharded, old key layout), hub ids, tokenizers."""

import json
import re

import pytest
import torch

from fastgpt import loading
from fastgpt.model import GPT
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_hf(n_embd=96, n_head=2, n_layer=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                     initializer_range=0.2, bos_token_id=None, eos_token_id=5)
    return transformers.GPT2LMHeadModel(config).eval()


def check_same(model, hf):
    idx = torch.randint(0, hf.config.vocab_size, (2, 21))
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits)
    assert model.lm_head.weight is model.transformer.wte.weight


def save_old_layout(hf, directory, shards=1):
    """pytorch_model.bin as the original gpt2 checkpoints on the hub store it: no "transformer."
    prefix, no lm_head.weight, the attn.bias / attn.masked_bias buffers present."""
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf.config.to_json_file(directory / "config.json")
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("n_embd,n_head", [(96, 2), (160, 2)])  # head dims 48 and 80
def test_save_pretrained_safetensors(tmp_path, n_embd, n_head):
    hf = tiny_hf(n_embd, n_head)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = GPT.from_pretrained(tmp_path)
    check_same(model, hf)
    assert model.eos_token_id == 5


def test_sharded_safetensors(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    check_same(GPT.from_pretrained(str(tmp_path)), hf)


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_old_hub_layout(tmp_path, shards):
    hf = tiny_hf()
    save_old_layout(hf, tmp_path, shards)
    check_same(GPT.from_pretrained(tmp_path), hf)


def test_dtype_and_device(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), ("fp16", torch.float16), (None, torch.float32)):
        model = GPT.from_pretrained(tmp_path, dtype=dtype, device="cpu")
        assert all(p.dtype == expected and p.device.type == "cpu" for p in model.parameters())
        assert not model.training


def test_convert_state_dict():
    sd = {"h.0.attn.c_attn.weight": torch.randn(4, 12), "h.0.attn.c_attn.bias": torch.randn(12),
          "h.0.attn.bias": torch.ones(1, 1, 2, 2), "h.0.attn.masked_bias": torch.tensor(0.0),
          "transformer.wte.weight": torch.randn(3, 4), "lm_head.weight": torch.randn(3, 4)}
    out = loading.convert_state_dict(sd)
    assert set(out) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                        "transformer.wte.weight"}
    assert torch.equal(out["transformer.h.0.attn.c_attn.weight"], sd["h.0.attn.c_attn.weight"].t())
    assert out["transformer.h.0.attn.c_attn.weight"].data_ptr() == sd["h.0.attn.c_attn.weight"].data_ptr()
    cloned = loading.convert_state_dict(sd, clone=True)
    assert all(t.data_ptr() != sd[k.removeprefix("transformer.")].data_ptr() for k, t in cloned.items()
               if k.removeprefix("transformer.") in sd)
    assert out["transformer.wte.weight"] is sd["transformer.wte.weight"]


# Parameter counts of the GPT-2 family, from their config.json values.
FAMILY = {
    "distilgpt2": (dict(n_embd=768, n_layer=6, n_head=12), 81_912_576),
    "gpt2": (dict(n_embd=768, n_layer=12, n_head=12), 124_439_808),
    "gpt2-medium": (dict(n_embd=1024, n_layer=24, n_head=16), 354_823_168),
    "gpt2-large": (dict(n_embd=1280, n_layer=36, n_head=20), 774_030_080),
    "gpt2-xl": (dict(n_embd=1600, n_layer=48, n_head=25), 1_557_611_200),
}


@pytest.mark.parametrize("name", FAMILY)
def test_every_gpt2_size_builds(name):
    dims, params = FAMILY[name]
    config = loading.config_from_hf({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, **dims})
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() == params


@pytest.mark.parametrize("key,value", [("add_cross_attention", True), ("scale_attn_by_inverse_layer_idx", True),
                                       ("tie_word_embeddings", False), ("model_type", "llama")])
def test_unsupported_config(key, value):
    hf_config = {"vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2, key: value}
    with pytest.raises(ValueError, match=key):
        loading.config_from_hf(hf_config)


def test_missing_weights(tmp_path):
    tiny_hf().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        loading.read_state_dict(tmp_path)


def test_mismatched_checkpoint(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        GPT.from_pretrained(tmp_path)


def test_legacy_bin_format(tmp_path):
    """A pytorch_model.bin in torch's pre-zip format (older checkpoints) loads: it cannot be
    memory-mapped, so it is read."""
    hf = tiny_hf()
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    check_same(GPT.from_pretrained(tmp_path), hf)


def test_bad_dtypes_and_configs_are_value_errors(tmp_path):
    """A dtype the kernels lack, a config without a size, a tensor of another shape than the
    config's: ValueErrors that say what, not KeyError / RuntimeError."""
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    for dtype, match in (("half", "dtype must be None, a torch dtype or one of"), (torch.float64, "float64")):
        with pytest.raises(ValueError, match=match):
            GPT.from_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(ValueError, match="lacks \\['vocab_size'\\]"):
        loading.config_from_hf({"n_embd": 8, "n_layer": 1, "n_head": 2})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="(?s)does not match its config.*size mismatch"):
        GPT.from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("name", ["", " "])
def test_empty_name_is_refused(tmp_path, monkeypatch, name):
    """An empty --model was Path(""), the working directory, and failed as "config.json is missing"."""
    monkeypatch.chdir(tmp_path)
    tiny_hf(n_embd=32, n_layer=1).save_pretrained(tmp_path)  # not loaded from the working directory either
    for load in (GPT.from_pretrained, loading.load_tokenizer):
        with pytest.raises(ValueError, match="expected a directory or a hub id"):
            load(name)


def test_hub_failure_is_explained(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network and nothing cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="Offline"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(OSError, match="Hugging Face hub"):
        loading.load_tokenizer("gpt2")


def test_hub_id_downloads_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    calls = []

    def fake(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    check_same(GPT.from_pretrained("someone/tiny-gpt2"), hf)
    assert calls[0][0] == "someone/tiny-gpt2" and "config.json" in calls[0][1]


@pytest.fixture(scope="module")
def trained_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = ["The quick brown fox jumps over the lazy dog.", "Hello, world! fastgpt runs GPT-2 fast."] * 20
    tok.train_from_iterator(text, vocab_size=300, min_frequency=1, show_progress=False)
    return tok


def test_tokenizer_json(tmp_path, trained_tokenizer):
    trained_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = loading.load_tokenizer(tmp_path)
    text = "The lazy fox, hello world."
    ids = tok.encode(text).ids
    assert ids == trained_tokenizer.encode(text).ids
    assert tok.decode(ids) == text


def test_tokenizer_vocab_and_merges(tmp_path, trained_tokenizer):
    trained_tokenizer.save_model(str(tmp_path))  # vocab.json + merges.txt, as the old gpt2 repos have
    tok = loading.load_tokenizer(str(tmp_path))
    text = "quick brown dog jumps"
    assert tok.encode(text).ids == trained_tokenizer.encode(text).ids
    assert tok.decode(tok.encode(text).ids) == text


def test_no_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        loading.load_tokenizer(tmp_path)


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def flip_header(path):
    """Overwrite part of a safetensors file's JSON header (after its 8-byte length)."""
    data = bytearray(path.read_bytes())
    data[12:40] = b"#" * 28
    path.write_bytes(bytes(data))


def to_bin(directory, mutate=lambda path: None, **save_kwargs):
    """The safetensors checkpoint in `directory` as a pytorch_model.bin instead, then mutated."""
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin", **save_kwargs)
    mutate(directory / "pytorch_model.bin")


def retype(directory, convert):
    """Rewrite model.safetensors with convert(name, tensor) for every tensor."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    save_file({name: convert(name, t) for name, t in load_file(path).items()}, path)


def shard_index(directory, index):
    """model.safetensors renamed as a shard, with `index` as model.safetensors.index.json."""
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_text(index)


ST, BIN, CONFIG, INDEX = "model.safetensors", "pytorch_model.bin", "config.json", "model.safetensors.index.json"
SAFETENSORS, TORCH_SAVE = "weights as a safetensors file", "weights as a state dict saved by torch.save"
MALFORMED = {  # name: (mutate the directory, the file named, what the message says is expected, the cause's type)
    "safetensors truncated data": (lambda d: truncate(d / ST, (d / ST).stat().st_size - 64), ST, SAFETENSORS,
                                   "SafetensorError"),
    "safetensors truncated header": (lambda d: truncate(d / ST, 20), ST, SAFETENSORS, "SafetensorError"),
    "safetensors empty": (lambda d: truncate(d / ST, 0), ST, SAFETENSORS, "SafetensorError"),
    "safetensors corrupt header": (lambda d: flip_header(d / ST), ST, SAFETENSORS, "SafetensorError"),
    "safetensors garbage": (lambda d: (d / ST).write_bytes(b"not a checkpoint " * 8), ST, SAFETENSORS,
                            "SafetensorError"),
    "safetensors int weights": (lambda d: retype(d, lambda n, t: (t * 100).to(torch.int32)), ST,
                                "floating-point weights", "TypeError"),
    "safetensors one bool tensor": (lambda d: retype(d, lambda n, t: t > 0 if n.endswith("wte.weight") else t), ST,
                                    "floating-point", "TypeError"),
    "bin truncated": (lambda d: to_bin(d, lambda p: truncate(p, p.stat().st_size // 2)), BIN, TORCH_SAVE, "OSError"),
    "bin truncated legacy format": (lambda d: to_bin(d, lambda p: truncate(p, p.stat().st_size // 2),
                                                     _use_new_zipfile_serialization=False), BIN, TORCH_SAVE,
                                    "RuntimeError"),
    "bin garbage": (lambda d: to_bin(d, lambda p: p.write_bytes(b"garbage" * 64)), BIN, TORCH_SAVE,
                    "UnpicklingError"),
    "bin empty": (lambda d: to_bin(d, lambda p: truncate(p, 0)), BIN, TORCH_SAVE, "EOFError"),
    "bin a list": (lambda d: to_bin(d, lambda p: torch.save([torch.zeros(2)], p)), BIN, TORCH_SAVE, "TypeError"),
    "config not JSON": (lambda d: (d / CONFIG).write_text("{not json"), CONFIG, "config as a JSON object",
                        "JSONDecodeError"),
    "config not UTF-8": (lambda d: (d / CONFIG).write_bytes(b"\xff\xfe{}"), CONFIG, "config as a JSON object",
                         "UnicodeDecodeError"),
    "config a list": (lambda d: (d / CONFIG).write_text("[1, 2]"), CONFIG, "config as a JSON object", "TypeError"),
    "index not JSON": (lambda d: shard_index(d, "nope"), INDEX, "weight_map", "JSONDecodeError"),
    "index without weight_map": (lambda d: shard_index(d, "{}"), INDEX, "weight_map", "TypeError"),
    "index weight_map a list": (lambda d: shard_index(d, '{"weight_map": ["a"]}'), INDEX, "weight_map", "TypeError"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoint_is_a_clear_value_error(tmp_path, case):
    """A corrupt, truncated or mistyped file: a ValueError that names it and says what it should
    hold, the library's own error (safetensors', torch's, json's) chained, not raised as is."""
    mutate, file, expected, cause = MALFORMED[case]
    tiny_hf(n_embd=32, n_layer=1).save_pretrained(tmp_path)
    mutate(tmp_path)
    message = f"could not load {re.escape(str(tmp_path / file))}: expected .*{expected}"
    with pytest.raises(ValueError, match=message) as info:
        GPT.from_pretrained(tmp_path)
    assert type(info.value.__cause__).__name__ == cause


@pytest.mark.parametrize("missing", ["config.json", "shard", "weights a directory"])
def test_missing_checkpoint_file_is_named(tmp_path, missing):
    tiny_hf(n_embd=32, n_layer=1).save_pretrained(tmp_path)
    if missing == "config.json":
        (tmp_path / CONFIG).unlink()
        named = tmp_path / CONFIG
    elif missing == "shard":
        named = tmp_path / "model-00002-of-00002.safetensors"
        shard_index(tmp_path, json.dumps({"weight_map": {"transformer.wte.weight": named.name}}))
    else:
        (tmp_path / ST).unlink()
        (tmp_path / ST).mkdir()
        named = tmp_path / ST
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(named))} is missing or not a file: expected"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value", [("n_layer", "2"), ("n_embd", 32.5), ("n_head", 0), ("vocab_size", -1),
                                       ("n_inner", True)])
def test_config_sizes_must_be_positive_integers(key, value):
    hf_config = {"vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2, key: value}
    with pytest.raises(ValueError, match=re.escape(f"sizes must be positive integers, got {({key: value})}")):
        loading.config_from_hf(hf_config)


def test_float64_checkpoint_needs_a_dtype(tmp_path):
    """The kernels lack float64: dtype None (keep the checkpoint's) says to pass one; float32 loads."""
    hf = tiny_hf(n_embd=32, n_layer=1)
    hf.save_pretrained(tmp_path)
    retype(tmp_path, lambda n, t: t.double())
    with pytest.raises(ValueError, match="holds torch.float64 weights, which the kernels lack: pass dtype="):
        GPT.from_pretrained(tmp_path)
    check_same(GPT.from_pretrained(tmp_path, dtype="float32"), hf)


@pytest.mark.parametrize("files", [{"tokenizer.json": "{garbage"}, {"vocab.json": "nope", "merges.txt": "x"}])
def test_corrupt_tokenizer_is_a_clear_value_error(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"could not load {re.escape(str(tmp_path / next(iter(files))))}: expected"):
        loading.load_tokenizer(tmp_path)
