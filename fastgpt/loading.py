"""Hugging Face GPT-2 checkpoints -> fastgpt.GPT, and their tokenizers.

A checkpoint is a directory holding config.json and the weights (model.safetensors,
pytorch_model.bin, or either one sharded with an index file), or a hub id such as "gpt2" that
huggingface_hub downloads (or finds in its cache). The conversion:
- HF's Conv1D layers (c_attn, c_proj, c_fc) store weights as (in, out): transposed to nn.Linear's (out, in);
- the attn.bias / attn.masked_bias buffers (old causal masks) are dropped;
- keys get the "transformer." prefix if they lack it (the original gpt2 checkpoints do);
- lm_head is tied to wte, so lm_head.weight is not read.
A file that is missing raises FileNotFoundError, and one that is truncated, corrupt or of another
kind (not JSON, int tensors) a ValueError; each names the file and says what it should hold.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastgpt.model import GPTConfig

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
DROPPED_BUFFERS = (".attn.bias", ".attn.masked_bias")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt"]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def config_from_hf(hf: dict) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json dict; raises ValueError on variants this model lacks."""
    unsupported = {
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True),
    }
    for key, (value, supported) in unsupported.items():
        if bool(value) != supported:
            raise ValueError(f"GPT-2 config has {key}={value}; fastgpt's GPT supports only {key}={supported}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"expected a GPT-2 checkpoint (model_type 'gpt2'), got model_type {hf['model_type']!r}")
    absent = [key for key in ("vocab_size", "n_embd", "n_layer", "n_head") if key not in hf]
    if absent:
        raise ValueError(f"GPT-2 config.json lacks {absent}")
    sizes = {key: hf[key] for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
             if key in hf}
    if sizes.get("n_inner", 0) is None:
        del sizes["n_inner"]  # null means 4 * n_embd
    bad = {key: value for key, value in sizes.items() if type(value) is not int or value < 1}  # True and 2.0 too
    if bad:
        raise ValueError(f"GPT-2 config.json's sizes must be positive integers, got {bad}")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation_function=hf.get("activation_function", "gelu_new"),
    )


def convert_state_dict(state_dict: dict, *, clone: bool = False) -> dict:
    """An HF GPT-2 state dict (with or without the "transformer." prefix) -> fastgpt.GPT's.

    Conv1D weights come back as transposed views, nn.Linear's (out, in) shape over the checkpoint's
    (in, out) memory: no copy here; GPT.arrange_weights later picks the order for the device. With
    clone, the result shares no memory with the input.
    """
    out = {}
    for name, t in state_dict.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if key == "lm_head.weight" or key.endswith(DROPPED_BUFFERS):
            continue
        if clone:
            t = t.clone()
        if key.endswith(CONV1D_WEIGHTS):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        out[key] = t
    return out


def read_state_dict(directory: Path) -> dict:
    """All tensors of the checkpoint in `directory`, on the CPU: safetensors preferred, then .bin."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            index = _read_checked(path, "a JSON object whose weight_map maps tensor names to files", _read_index)
            files = [directory / shard for shard in sorted(set(index["weight_map"].values()))]
        else:
            files = [path]
        state_dict = {}
        for file in files:
            form = "a safetensors file" if file.suffix == ".safetensors" else "a state dict saved by torch.save"
            state_dict.update(_read_checked(file, f"GPT-2's floating-point weights as {form}", _read_weights))
        return state_dict
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_checked(file: Path, expected: str, read: Callable[[Path], Any]) -> Any:
    """read(file); a missing file is a FileNotFoundError, and any failure to read or parse it a
    ValueError, each naming the file and what it should be (the library's error chained)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing or not a file: expected {expected}")
    try:
        return read(file)
    except Exception as exc:  # safetensors', torch's, pickle's, json's errors, or _read_*'s own checks
        lines = str(exc).strip().splitlines()
        # Only a one-line message is quoted: torch's run to paragraphs, and the CLI prints one line.
        reason = f"{type(exc).__name__}: {lines[0]}" if len(lines) == 1 else type(exc).__name__
        raise ValueError(f"could not load {file}: expected {expected} ({reason})") from exc


def _read_json_object(file: Path) -> dict:
    value = json.loads(file.read_text())
    if not isinstance(value, dict):
        raise TypeError(f"the file holds a JSON {type(value).__name__}")
    return value


def _read_index(file: Path) -> dict:
    index = _read_json_object(file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise TypeError(f"weight_map is {weight_map!r:.60}, not a JSON object of file names")
    return index


def _read_weights(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(file), device="cpu")
    else:
        # Mapped, not read, where the file allows: only torch's zip format does (not the legacy one).
        state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    if not isinstance(state_dict, dict):
        raise TypeError(f"the file holds a {type(state_dict).__name__}, not a dict of tensors")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if not (t.is_floating_point() or str(name).endswith(DROPPED_BUFFERS)):  # the old causal masks are bool
            raise TypeError(f"tensor {name!r} is {t.dtype}, not floating point")
    return state_dict


def resolve(name_or_path, patterns) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (only files matching `patterns`)."""
    if not str(name_or_path).strip():  # Path("") is the working directory
        raise ValueError(f"the checkpoint is {name_or_path!r}: expected a directory or a hub id such as 'gpt2'")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path!r} is not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=list(patterns)))
    except Exception as exc:  # offline, unknown repo, no huggingface_hub: say which and why
        raise OSError(
            f"{name_or_path!r} is not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Offline? Pass the path of a downloaded checkpoint directory "
            "(config.json + model.safetensors or pytorch_model.bin)."
        ) from exc


def resolve_checkpoint(name_or_path) -> Path:
    """The checkpoint directory, downloading config and weights (safetensors if the repo has them)."""
    directory = resolve(name_or_path, ["config.json", "model*.safetensors", "model.safetensors.index.json"])
    if not any((directory / name).exists() for name in WEIGHT_FILES[:2]):
        directory = resolve(name_or_path, ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"])
    return directory


def build(cls, config: GPTConfig, state_dict: dict, source: str):
    """`cls(config)` holding the tensors of a converted state dict (no copy), lm_head tied to wte."""
    with torch.device("meta"):  # no memory for weights that are replaced right away
        model = cls(config)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape than the config gives
        raise ValueError(f"{source} does not match its config: {exc}") from None
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{source} does not match its config: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = model.transformer.wte.weight
    return model


def load_gpt(cls, name_or_path, *, dtype=None, device=None):
    """Build `cls` (fastgpt.GPT) from a checkpoint; dtype None keeps the checkpoint's, device None is CPU."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be None, a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (the kernels' dtypes), got {dtype!r}")
    directory = resolve_checkpoint(name_or_path)
    hf_config = _read_checked(directory / "config.json", "GPT-2's config as a JSON object", _read_json_object)
    state_dict = convert_state_dict(read_state_dict(directory))
    model = build(cls, config_from_hf(hf_config), state_dict, str(directory))
    model.eos_token_id = hf_config.get("eos_token_id")
    stored = state_dict["transformer.wte.weight"].dtype
    if dtype is None and stored not in DTYPES.values():
        raise ValueError(f"{directory} holds {stored} weights, which the kernels lack: pass dtype= "
                         "(--dtype on the command line) float32, float16 or bfloat16")
    return model.to(device=device or "cpu", dtype=dtype or stored).eval()


def load_tokenizer(path_or_id):
    """The checkpoint's tokenizer as a `tokenizers` object (encode(text).ids, decode(ids)).

    tokenizer.json if the directory has it, else GPT-2's byte-level BPE from vocab.json + merges.txt.
    """
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    directory = resolve(path_or_id, TOKENIZER_FILES)
    if (directory / "tokenizer.json").exists():
        return _read_checked(directory / "tokenizer.json", "a tokenizer saved by the tokenizers library",
                             lambda file: Tokenizer.from_file(str(file)))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.exists() and merges.exists():
        return _read_checked(vocab, f"a byte-level BPE vocabulary (with {merges.name})",
                             lambda file: ByteLevelBPETokenizer(str(file), str(merges)))
    raise FileNotFoundError(f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json and merges.txt")
