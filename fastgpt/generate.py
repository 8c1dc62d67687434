"""Generation for fastgpt.GPT: prefill, then one decode step per token over a static KV cache.

The cache is allocated once, (n_layer, 2, B, H, S, D) for k and v together. The prefill writes
the prompt's k/v into slots [0, T); each decode step writes its token's k/v into one slot per row
(one scatter_ for both, no concatenation) and attends over the cache with fastgpt.decode_attention.

Left padding. HF marks padding with attention_mask = 0 at the start of a row. Here each row's
real tokens are moved to the front (slots 0 .. L_b - 1, positions 0 .. L_b - 1 as HF's
position_ids from the mask), so the padding sits at the end: a causal prefill never lets a real
token see it, and decode_attention with cache_seqlens = L_b + t never reads it (the first decode
step of row b overwrites slot L_b). No mask is needed anywhere, and every row computes exactly
what it computes alone. The output keeps the caller's layout: idx, then the new tokens.

The per-token work is all on the device (fastgpt/decoder.py), so one decode step can be captured
in a CUDA graph and replayed, and so can the prefill of a prompt length met twice in a row. The
host reads the device only to ask whether every row has hit eos, every `check_every` tokens.

With prompt_lookup_num_tokens = k > 0, the decode steps draft up to k tokens a row and verify
them in one forward each (fastgpt/speculative.py); the cache then has k spare slots.

With the `compile` option the model's decode forward (everything but the sampler, whose
generator argument torch.compile cannot trace) runs through torch.compile(fullgraph=True), and
the CUDA graph then captures the compiled step: inductor fuses the glue around fastgpt's ops.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Iterator

import torch

from fastgpt.decoder import Decoder
from fastgpt.model import check_idx
from fastgpt.ops._dispatch import on_device
from fastgpt.ops.sampling import check_generator, row_params, top_k_bound
from fastgpt.ops.step import GAVE_UP as STEP_GAVE_UP
from fastgpt.speculative import PromptLookup

CHECK_EVERY = 8  # decode steps between the host's checks for "every row finished"
BUCKET = 256  # cache lengths round up to a multiple of this (capped by n_positions), so decoders are reused
EOS_SLOTS = 8  # eos ids held by a decoder; more ids make a decoder with more slots
MAX_GRAPH_DECODERS = 2  # decoders kept per model with CUDA graphs (one without), least recently used dropped


# ----------------------------------------------------------------------------- argument checks


def _check_prompt(model, idx, max_new_tokens):
    check_idx(model, idx)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B, T = idx.shape
    context = model.config.n_positions
    if T + max_new_tokens > context:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"n_positions = {context}: ask for at most {context - T} new tokens")
    if T == 0 and B > 0:
        raise ValueError("the prompt is empty (T = 0): generation needs at least one token per row")


def _check_mask(attention_mask, idx):
    """The number of real tokens per row (B,) int64; the mask must be 0/1 with left padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask must be a tensor of idx's shape {tuple(idx.shape)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.is_meta:  # no values to check
        raise ValueError(f"attention_mask must hold values (on the CPU or idx's device), got {attention_mask.device}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must hold integers (or bools, or floats 0 and 1), got {attention_mask.dtype}")
    mask = attention_mask.to(device=idx.device)
    binary = ((mask == 0) | (mask == 1)).all()  # before the cast to int64, which would make 0.5 a 0
    mask = mask.to(torch.int64)
    lengths = mask.sum(dim=1)
    checks = torch.stack([binary, (mask[:, 1:] >= mask[:, :-1]).all(), (lengths > 0).all()])
    binary, left_padded, no_empty_row = checks.tolist()  # one read of the device for the three
    if not binary:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    if not left_padded:
        raise ValueError("attention_mask must be left-padded (each row: 0s, then 1s), as for HF generate")
    if not no_empty_row:
        raise ValueError("a row of attention_mask has no tokens (all 0): every row needs at least one")
    return lengths


def _sampling(B, device, temperature, top_k, top_p, min_p) -> dict:
    """The sampling parameters as (B,) tensors on device, checked by fastgpt.sample's own rules.

    Each is a number, a (B,) tensor or a list of B numbers. Tensors on a GPU are not range-checked
    (that would sync the host): the kernels clamp them, as for fastgpt.sample.
    """
    temperature, top_k, top_p, min_p = row_params(B, device, temperature, top_k, top_p, min_p)
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def _all_greedy(temperature) -> bool:
    """Whether every row is greedy, decided on the host: a tensor on a GPU is not read (False)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.device.type == "cpu" and bool((temperature <= 0).all())
    values = temperature if isinstance(temperature, (list, tuple)) else [temperature]
    return all(v == 0 for v in values)


def _eos_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    ids = list(ids) if isinstance(ids, Iterable) else [ids]
    if not all(_is_token_id(i) for i in ids):
        raise ValueError(f"eos_token_id must be an int >= 0 or a list of them, got {eos_token_id!r}")
    return [int(i) for i in ids]


def _is_token_id(value) -> bool:
    """An int in [0, 2^63): what an int64 buffer of token ids can hold."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < 2**63


def _pad_id(pad_token_id, eos_ids: list[int], vocab_size: int) -> int:
    """What finished rows emit: pad_token_id, else the first eos id, else 0. Where a row can finish
    (an eos id in the vocabulary) it is also what a finished row feeds the model next (as in HF),
    so it must be in the vocabulary too."""
    if pad_token_id is not None and not _is_token_id(pad_token_id):  # the output would hold it as a token id
        raise ValueError(f"pad_token_id must be an int >= 0 (a token id), got {pad_token_id!r}")
    pad = int(pad_token_id) if pad_token_id is not None else eos_ids[0] if eos_ids else 0
    if pad >= vocab_size and any(e < vocab_size for e in eos_ids):
        what = "pad_token_id" if pad_token_id is not None else "the first eos id (pad_token_id's default)"
        raise ValueError(f"{what} must be below the model's vocab_size = {vocab_size}, got {pad}: a row that "
                         "has emitted an eos feeds it to the model as its next token")  # fmt: skip
    return pad


# ----------------------------------------------------------------------------- the loop


def _decoder(model, B, length, eos_slots, use_graph, spare=0):
    """A decoder with room for B rows of `length` positions: a kept one if it fits, else a new one.

    Each holds a whole KV cache, so a model keeps one decoder, or with CUDA graphs (whose
    capture is worth keeping) MAX_GRAPH_DECODERS, keyed by (batch, cache length), the least
    recently used dropped before a new one is allocated. Cache lengths round up to BUCKET, up to
    the context plus `spare` (the slots prompt lookup's drafts past the context write to).
    An eager call takes any kept decoder with B rows and enough positions; a graph call the
    one of its exact length, whose graph covers the whole cache. One in use (busy) is not taken.
    """
    decoders = model._kept_decoders()  # (batch, cache length) -> Decoder, least recently used first
    bucket = min(math.ceil(length / BUCKET) * BUCKET, model.config.n_positions + spare)
    if use_graph:
        fits = [(B, bucket)]
    else:
        fits = [key for key in reversed(decoders) if key[0] == B and key[1] >= length] or [(B, bucket)]
    decoder = decoders.pop(fits[0], None)
    if decoder is None or decoder.busy or decoder.eos.numel() < eos_slots:
        decoder = None  # freed before the new cache is allocated
        while len(decoders) >= (MAX_GRAPH_DECODERS if use_graph else 1):
            decoders.pop(next(iter(decoders)))
        decoder = Decoder(model, B, bucket, eos_slots)
    decoders[(decoder.batch, decoder.length)] = decoder  # re-inserted: dicts keep insertion order
    return decoder


def _left_align(idx, lengths):
    """Move each row's lengths[b] real tokens to the front; the padding (token 0) goes to the end."""
    B, T = idx.shape
    src = torch.arange(T, device=idx.device)[None, :] + (T - lengths)[:, None]  # (B, T)
    return torch.where(src < T, idx.gather(1, src.clamp(max=T - 1)), 0)


def _steps(model, idx, max_new_tokens, *, attention_mask, temperature, top_k, top_p, min_p, eos_token_id,
           pad_token_id, generator, cuda_graph, check_every, compile, prompt_lookup_num_tokens,
           max_matching_ngram_size) -> Iterator[Decoder | PromptLookup]:  # fmt: skip
    """Prefill, then decode; yields the decoder after each new token (its column step - 1 of out),
    or with prompt_lookup_num_tokens = k > 0 the PromptLookup after each step (1 to k + 1 tokens a row).

    `generator` (None: the device's default) is advanced past the draws made when the iteration
    ends or is closed, as if the sampler had drawn from it.
    """
    _check_prompt(model, idx, max_new_tokens)
    B, T = idx.shape
    lengths = _check_mask(attention_mask, idx)
    sampling = _sampling(B, idx.device, temperature, top_k, top_p, min_p)
    eos_ids = _eos_ids(eos_token_id)
    check_generator(generator, idx.device)
    pad_id = _pad_id(pad_token_id, eos_ids, model.config.vocab_size)
    if B == 0 or max_new_tokens == 0:
        return
    use_graph = idx.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and idx.device.type != "cuda":
        warnings.warn(f"cuda_graph=True ignored: the model is on {idx.device}, decoding eagerly", stacklevel=3)
        use_graph = False

    # A step's drafts write k slots past the last token's; more than max_new_tokens - 1 are never used.
    k = min(prompt_lookup_num_tokens, max_new_tokens - 1)
    decoder = _decoder(model, B, T + max_new_tokens + k, max(EOS_SLOTS, len(eos_ids)), use_graph, spare=k)
    decoder.use_compile(compile)
    # Eager steps attend over just the positions this call needs; graphs and compiled steps over
    # the whole cache, whose shapes stay the same from call to call.
    whole = use_graph or compile is not None
    decoder.reset(sampling, eos_ids, pad_id, positions=None if whole else T + max_new_tokens + k,
                  all_greedy=_all_greedy(temperature), top_k_bound=top_k_bound(top_k))
    idx = idx.long()
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=idx.device)
    else:
        idx = _left_align(idx, lengths)
    decoder.load_rng(generator)
    decoder.busy = True
    try:
        if k:
            yield from _speculate(model, decoder, idx, lengths, max_new_tokens, use_graph=use_graph, k=k,
                                  ngram=max_matching_ngram_size)  # fmt: skip
        else:
            yield from _decode(model, decoder, idx, lengths, max_new_tokens, use_graph=use_graph,
                               check_every=check_every if eos_ids else None)
        _check_persistent_steps(model, decoder)
    finally:
        decoder.busy = False
        decoder.store_rng(generator)


def _check_persistent_steps(model, decoder) -> None:
    """After a generation with GPT.persistent_decode: raise if a wait in one of its steps gave up
    (fastgpt.ops.step; a bug, never in a correct step), whose tokens are then wrong. One read of
    the device; the flag is cleared for the next call."""
    if not model.persistent_decode:
        return
    sync = decoder.cache.step_sync
    if int(sync[STEP_GAVE_UP]):
        sync[STEP_GAVE_UP] = 0
        raise RuntimeError("a persistent decode step's wait gave up (fastgpt.ops.step): these tokens are wrong; "
                           "this is a bug, please report it (model.persistent_decode = False avoids the path)")


def _prefill(decoder, idx, lengths, use_graph: bool):
    """Run the left-aligned prompt idx (B, T) into the cache and emit each row's first new token."""
    decoder.pos.copy_(lengths - 1)  # the prompt's last position: emit advances it to L_b, the first new token's
    decoder.emit(decoder.prefill(idx, lengths - 1, use_graph))


def _replayed(owner, step, use_graph: bool):
    """step, or with use_graph the replay of owner's CUDA graph of it (owner.capture() captures it
    or keeps the one captured); step again, with a warning saying why, where the capture fails."""
    if not use_graph:
        return step
    reason = owner.capture()
    if reason:
        warnings.warn(f"fastgpt: CUDA graph capture failed, decoding eagerly ({reason})", stacklevel=5)
        return step
    return owner.graph.replay


# The model's GPU is the current device while each prefill, capture and step runs (on_device: Triton
# launches and graph replays go to the current device's stream), and only then: between tokens
# the caller's current device is its own.
def _decode(model, decoder, idx, lengths, max_new_tokens, *, use_graph, check_every) -> Iterator[Decoder]:
    """The prefill of the left-aligned idx (B, T), then the decode steps (check_every None: no eos)."""
    with on_device(idx):
        _prefill(decoder, idx, lengths, use_graph)
    yield decoder

    with on_device(idx):
        step = _replayed(decoder, decoder.decode_step, use_graph and max_new_tokens > 1)
    for i in range(1, max_new_tokens):
        if check_every and i % check_every == 0 and bool(decoder.finished.all()):
            return
        with on_device(idx):
            step()
        yield decoder


def _speculate(model, decoder, idx, lengths, max_new_tokens, *, use_graph, k, ngram) -> Iterator[PromptLookup]:
    """The prefill of the left-aligned idx (B, T), then prompt-lookup steps until every row is done."""
    with on_device(idx):
        _prefill(decoder, idx, lengths, use_graph)
        lookup = decoder.lookup
        if lookup is None or (lookup.k, lookup.ngram) != (k, ngram):
            lookup = decoder.lookup = PromptLookup(decoder, k, ngram)
        lookup.reset(idx, lengths, max_new_tokens)
    yield lookup

    with on_device(idx):
        step = _replayed(lookup, lookup.step, use_graph and max_new_tokens > 1)
    for _ in range(1, max_new_tokens):  # every step emits a token in each row not done
        if lookup.done():
            return
        with on_device(idx):
            step()
        yield lookup


def _options(kwargs):
    known = {"pad_token_id": None, "cuda_graph": None, "check_every": CHECK_EVERY, "compile": False,
             "prompt_lookup_num_tokens": 0, "max_matching_ngram_size": 2}  # fmt: skip
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    options = {**known, **kwargs}
    if options["cuda_graph"] is not None and not isinstance(options["cuda_graph"], bool):
        raise TypeError(f"cuda_graph must be None or a bool, got {options['cuda_graph']!r}")
    every = options["check_every"]
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {every!r}")
    options["compile"] = _compile_options(options["compile"])
    for name, least in (("prompt_lookup_num_tokens", 0), ("max_matching_ngram_size", 1)):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        options[name] = int(value)
    if options["prompt_lookup_num_tokens"] and options["compile"] is not None:
        raise ValueError("compile does not apply to prompt lookup (prompt_lookup_num_tokens > 0), whose steps run "
                         "uncompiled: pass one or the other")  # fmt: skip
    return options


def _compile_options(value) -> dict | None:
    """The `compile` option: False -> None (no compile), True -> {} (torch.compile's defaults), or
    a dict of torch.compile keyword arguments (e.g. {"mode": "max-autotune-no-cudagraphs"})."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {type(value).__name__}")
    if "fullgraph" in value:
        raise ValueError("compile: fullgraph is always True (the decode step has no graph break)")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise TypeError(f"compile: options must be a dict of inductor options, got {type(options).__name__}")
    own_graphs = (value.get("mode") in ("reduce-overhead", "max-autotune") or value.get("backend") == "cudagraphs"
                  or options.get("triton.cudagraphs"))
    if own_graphs:
        raise ValueError("compile: these options bring torch.compile's own CUDA graphs; fastgpt captures the step "
                         "itself (cuda_graph=True): use mode 'default' or 'max-autotune-no-cudagraphs'")
    return dict(value)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             eos_token_id=None, attention_mask=None, generator=None, **options) -> torch.Tensor:
    """Continue each row of idx (B, T) int64 by max_new_tokens tokens -> (B, T + n) int64.

    See GPT.generate. generator: a torch.Generator on the model's device type, or None for the
    default one; it ends as if every draw had been made from it (same seed, same draws, with
    or without CUDA graphs; see fastgpt.decoder.Decoder). Options: pad_token_id (what finished
    rows emit, and feed the model next; default the first eos id), cuda_graph (capture the decode
    step, and the prefill of a prompt length met twice in a row; default True on CUDA; falls back
    to eager with a warning saying why), check_every (decode steps between checks that every row
    is finished), compile (False; True or a dict of torch.compile arguments: the decode forward
    runs compiled, fullgraph, inside the CUDA graph when there is one; the first call pays the
    compilation), prompt_lookup_num_tokens (0; k > 0 drafts up to k tokens a step from each row's own text and
    verifies them in one forward: fastgpt.speculative) and max_matching_ngram_size (2: the longest
    n-gram it looks up), as in HF's prompt-lookup decoding.
    n == max_new_tokens unless every row hit eos, as with HF: then n ends at the last row's eos.
    """
    options = _options(options)
    steps, state = 0, None
    for state in _steps(model, idx, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
                        generator=generator, **options):
        steps += 1
    if state is None:  # nothing ran: an empty batch gets (0, T + n), max_new_tokens == 0 gets idx
        width = idx.shape[1] + (max_new_tokens if idx.shape[0] == 0 else 0)
        return idx.new_zeros(0, width) if idx.shape[0] == 0 else idx.clone()
    if isinstance(state, PromptLookup):
        decoder, new = state.decoder, state.tokens(max_new_tokens)  # (B, max_new_tokens)
    else:
        decoder, new = state, state.out[:, :steps]  # (B, steps)
    width = new.shape[1] if eos_token_id is None else _trim(new, decoder.eos)
    return torch.cat([idx, new[:, :width].to(idx.dtype)], dim=1)


def _trim(new, eos):
    """Columns to keep: all of them, unless every row has an eos, then up to the last row's first eos."""
    is_eos = (new[:, :, None] == eos).any(dim=2)  # (B, steps)
    if not bool(is_eos.any(dim=1).all()):
        return new.shape[1]
    return int(is_eos.int().argmax(dim=1).max()) + 1


@torch.inference_mode()
def stream(model, idx, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, eos_token_id=None,
           attention_mask=None, generator=None, **options) -> Iterator[torch.Tensor]:
    """Generate like `generate`, yielding each step's new tokens (B,) int64 as soon as they exist.

    Rows that hit eos yield pad_token_id afterwards; the iteration ends when every row has hit eos
    (checked every check_every steps, default 1 here) or after max_new_tokens steps. With prompt
    lookup, a step's tokens are yielded one column at a time once every row has them. The generator
    (or the default one) takes the stream's draws when the iteration ends or is closed, so draws
    from it made meanwhile are overwritten then.
    """
    options = _options({"check_every": 1, **options})
    yielded = 0  # prompt lookup: the new tokens yielded so far a row (a step makes 1 to k + 1 of them)
    for state in _steps(model, idx, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
                        generator=generator, **options):
        if not isinstance(state, PromptLookup):
            yield state.tok.clone()
            continue
        ready = state.ready()  # the tokens every row has: rows advance by different numbers of them
        new = state.tokens(ready)
        for column in range(yielded, ready):
            yield new[:, column].clone()
        yielded = ready
