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

The per-token work is all on the device: sampling parameters, positions, the output buffer and
the "finished" flags are tensors, so one decode step can be captured in a CUDA graph and
replayed. The host reads the device only to ask whether every row has hit eos, every
`check_every` tokens.
The prefill is captured too once a prompt length repeats (Decoder.prefill): a short prompt's
eager prefill costs the host more than the GPU.

With prompt_lookup_num_tokens = k > 0, the decode steps draft up to k tokens a row and verify
them in one forward each (fastgpt/speculative.py); the cache then has k spare slots.

With the `compile` option the model's decode forward (everything but the sampler, whose
generator argument torch.compile cannot trace) runs through torch.compile(fullgraph=True), and
the CUDA graph then captures the compiled step: inductor fuses the glue around fastgpt's ops.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator

import torch

from fastgpt import _backends, _graphs
from fastgpt.model import check_idx
from fastgpt.ops import _checks
from fastgpt.ops.linear import COUNTER_COLUMNS
from fastgpt.ops.sampling import check_generator, draw, row_params, top_k_bound
from fastgpt.ops.step import GAVE_UP as STEP_GAVE_UP
from fastgpt.ops.step import sync_entries as step_sync_entries
from fastgpt.speculative import PromptLookup

CHECK_EVERY = 8  # decode steps between the host's checks for "every row finished"
BUCKET = 256  # cache lengths round up to a multiple of this (capped by n_positions), so decoders are reused
EOS_SLOTS = 8  # eos ids held by a decoder; more ids make a decoder with more slots
MAX_GRAPH_DECODERS = 2  # decoders kept per model with CUDA graphs (one without), least recently used dropped
# With CUDA graphs, a prompt of at most this many tokens (B T) has its prefill captured too (see
# Decoder.prefill); a longer one keeps the GPU busy for longer than its launches take the host.
PREFILL_GRAPH_MAX_TOKENS = 4096
# torch.compile's error when a function passes Dynamo's recompile limit under fullgraph (the older name too).
_RECOMPILE_LIMIT = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                         if hasattr(torch._dynamo.exc, name))  # fmt: skip


class KVCache:
    """k and v of every layer in one tensor, kv (n_layer, 2, B, H, S, D), in the model's dtype:
    a layer's k and v sit side by side, so one scatter_ writes a decode step's pair. counters
    (B * H,) int32 zeros: the decode attention's, so that it merges its KV splits in the same
    launch (fastgpt.ops.decode.decode_step_attention); every layer's launch leaves them zero.
    linear_counters (cdiv(n_embd, 16),) int32 zeros: the fused step's output projections', with
    which they may split their K (fastgpt.ops.linear); left zero likewise. step_sync: int32 zeros,
    the persistent step's counters (fastgpt.ops.step), left zero likewise.
    graphed: True while the steps over it are being captured in a CUDA graph (a decoder's
    capture, warm-up included), so that auto picks decode attention by its time on the GPU rather
    than by one eager call's."""

    def __init__(self, config, batch: int, length: int, dtype, device):
        shape = (config.n_layer, 2, batch, config.n_head, length, config.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.counters = torch.zeros(batch * config.n_head, dtype=torch.int32, device=device)
        self.linear_counters = torch.zeros(-(-config.n_embd // COUNTER_COLUMNS), dtype=torch.int32, device=device)
        self.step_sync = torch.zeros(step_sync_entries(config.n_layer, config.n_head), dtype=torch.int32,
                                     device=device)
        self.graphed = False

    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, 0]  # (n_layer, B, H, S, D)

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]  # (2, B, H, S, D): k, v

    def narrow(self, length: int) -> KVCache:
        """The first `length` positions of every layer, as views (no copy)."""
        view = copy.copy(self)
        view.kv = self.kv[..., :length, :]
        return view


class Decoder:
    """Every buffer one generation needs, for one (batch, cache length): reused across calls.

    State (all device tensors, so a CUDA graph can own them):
      tok (B,) int64       the last token emitted, the next decode step's input
      pos (B,) int64       its position and cache slot
      step (1,) int64      its column in out
      out (B, S + W) int64 the new tokens (W spare columns for the capture's warm-up steps)
      finished (B,) bool   rows that emitted an eos
      temperature, top_k, top_p, min_p (B,)   sampling parameters; eos (E,) int64, pad (1,) int64
    The sampler draws from the decoder's own generator, on its device: a call loads the caller's
    generator state into it and writes it back after (load_rng, store_rng), so a captured graph
    never holds the caller's generator, and a seed gives the same tokens with or without graphs.
    """

    def __init__(self, model, batch: int, length: int, eos_slots: int):
        weight = model.transformer.wte.weight
        device, self.model = weight.device, model
        self.batch, self.length = batch, length
        self.cache = KVCache(model.config, batch, length, weight.dtype, device)
        self.kv = self.cache  # the positions this call uses: decode attends over all of them
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.tok, self.pos, self.step = zeros(batch), zeros(batch), zeros(1)
        self.seqlens = zeros(batch, dtype=torch.int32)  # pos + 1, kept with pos: the step's cache lengths
        self.out = zeros(batch, length + _graphs.WARMUP_STEPS + 1)
        self.finished = zeros(batch, dtype=torch.bool)
        self.temperature, self.top_k = zeros(batch, dtype=torch.float32), zeros(batch)
        self.top_p, self.min_p = zeros(batch, dtype=torch.float64), zeros(batch, dtype=torch.float32)
        self.eos, self.pad = zeros(eos_slots), zeros(1)
        self.generator, self.all_greedy, self.has_eos = torch.Generator(device), False, True
        self.top_k_bound = 0  # every row's top_k is in [1, top_k_bound], as the host knows (0: unknown)
        self.graph, self.graph_mode = None, None  # graph_mode: what _mode() bakes into the graph
        self.forward, self.compiled_with = model.decode, None  # compiled_with: torch.compile's options
        # emit's bookkeeping in one Triton launch where the model's ops run on Triton (auto's on a
        # GPU): 1 launch a step instead of 4 (8 with eos ids); an all-greedy step's argmax in that
        # same launch (kernels/advance.py's greedy_advance: 1 instead of 3), which keeps its
        # running maxima and count here, left ready for the next step by each.
        self.triton_advance = _backends.runs_on_triton("advance", model.backend, device)
        self.best = torch.full((batch,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
        self.count = zeros(1, dtype=torch.int32)
        self.busy = False  # a call is iterating over it (a stream not yet done): not to be handed out
        self.lookup = None  # a PromptLookup of this decoder's, kept for its CUDA graph
        # The prefill's CUDA graph (see prefill): the prompt length of the last prefill, its graph
        # (None: not captured, False: the capture failed), and the graph's input and output tensors.
        self.prefill_length, self.prefill_graph = None, None
        self.prefill_idx = self.prefill_last = self.prefill_logits = None

    def reset(self, sampling: dict, eos_ids: list[int], pad_id: int, *, positions: int | None = None,
              all_greedy: bool | None = None, top_k_bound: int = 0):
        """Load one call's settings: each copy_ keeps the buffer (and a captured graph) valid.

        positions: the cache positions the call needs (default all); the eager steps attend over
        just those. all_greedy: whether every row is greedy, if the caller knows without reading
        the device. top_k_bound: ops.sampling.top_k_bound of the call's top_k (the sampler's
        faster path where it is small).
        """
        for name, value in sampling.items():
            getattr(self, name).copy_(value)
        self.eos.fill_(-1)  # never a token id
        self.eos[: len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.int64)
        self.pad.fill_(pad_id)
        self.finished.zero_()
        self.step.zero_()
        self.kv = self.cache if positions is None or positions == self.length else self.cache.narrow(positions)
        # Every row greedy (decided once per call, on the host): sampling with temperature=0.0, a
        # Python number, lets the op skip its filtering work (two sorts over V on the torch backend).
        if all_greedy is None:
            all_greedy = bool((sampling["temperature"] <= 0).all())
        self.all_greedy = all_greedy
        self.top_k_bound = top_k_bound
        self.has_eos = bool(eos_ids)  # without, no row ever finishes: emit skips that bookkeeping

    def load_rng(self, generator):
        """Draw from here on as `generator` (None: the default generator of the device) would."""
        self.generator.set_state(_get_rng(generator, self.tok.device))

    def store_rng(self, generator):
        """Advance `generator` (None: the device's default) past the draws made since load_rng."""
        _set_rng(generator, self.tok.device, self.generator.get_state())

    def emit(self, logits):
        """Sample from logits (B, V), write the tokens to out[:, step] and tok, advance step and
        pos. No host sync."""
        advance = _backends.launchers("triton", "advance") if self.triton_advance else None
        if advance and self.all_greedy:  # the argmax and what follows, in one launch
            advance.greedy_advance(_checks.last_dim_contiguous(logits), self.best, self.count, self.out, self.step,
                                   self.tok, self.pos, self.seqlens, self.finished, self.pad, self.eos,
                                   has_eos=self.has_eos)  # fmt: skip
            return
        temperature = 0.0 if self.all_greedy else self.temperature
        nxt = draw(logits, temperature=temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                   generator=self.generator, backend=self.model.backend, top_k_bound=self.top_k_bound)
        if advance:  # what follows, in one launch (kernels/advance.py)
            advance.advance(nxt, self.out, self.step, self.tok, self.pos, self.seqlens, self.finished, self.pad,
                            self.eos, has_eos=self.has_eos)  # fmt: skip
            return
        if self.has_eos:
            nxt = torch.where(self.finished, self.pad, nxt)  # finished rows emit pad
            self.finished |= (nxt[:, None] == self.eos).any(dim=1)
        self.out.index_copy_(1, self.step, nxt[:, None])
        self.tok.copy_(nxt)
        self.step += 1
        self.pos += 1
        torch.add(self.pos, 1, out=self.seqlens)

    def use_compile(self, options: dict | None):
        """Run the decode forward through torch.compile(fullgraph=True, **options), or plainly
        (None). A change drops the captured graph, which holds the other forward. Shapes are
        static (dynamic=False unless the options say otherwise): each decoder has one batch and
        one cache length, and without it a second batch size recompiles with symbolic shapes
        (Dynamo's automatic dynamic): the likely cause of the H200 run's compiled B32 (after B1)
        at a fifth of the uncompiled speed; not re-measured since."""
        if options == self.compiled_with:
            return
        self.forward = self.model.decode if options is None else self._compiled(options)
        self.compiled_with, self.graph = options, None

    def _compiled(self, options: dict):
        """model.decode through torch.compile. Every decoder compiles the same function, so each
        new (batch, cache length) is a recompile of it, and past Dynamo's recompile limit (8 by
        default) fullgraph makes that an error: this decoder then decodes eagerly, saying why."""
        compiled = torch.compile(self.model.decode, fullgraph=True, **{"dynamic": False, **options})

        def forward(*args):
            try:
                return compiled(*args)
            except _RECOMPILE_LIMIT as err:
                warnings.warn(f"fastgpt: compile=True, but torch.compile's recompile limit was reached (raise "
                              f"torch._dynamo.config.recompile_limit to compile more batch sizes and cache lengths); "
                              f"decoding eagerly ({type(err).__name__})", stacklevel=2)  # fmt: skip
                self.forward = self.model.decode
                return self.forward(*args)

        return forward

    def prefill(self, idx, last, use_graph: bool):
        """model.prefill of the left-aligned prompt idx (B, T) into the cache -> the logits (B, V)
        at positions last (B,).

        With use_graph, the second prefill in a row of a prompt length replays a CUDA graph,
        captured then, and so do the prefills of that length after it (up to
        PREFILL_GRAPH_MAX_TOKENS tokens): a short prompt's prefill is ~10 eager launches a
        layer, whose host time exceeds what they take the GPU. One length is kept at a time; the
        first prefill of another is eager. Graph or not, the same kernels run on the same shapes.
        """
        B, T = idx.shape
        if not use_graph or B * T > PREFILL_GRAPH_MAX_TOKENS:
            return self.model.prefill(idx, self.kv, last)
        if T != self.prefill_length:  # a new length: eager, and remembered
            self.prefill_length, self.prefill_graph = T, None
            self.prefill_idx = self.prefill_last = self.prefill_logits = None  # the last graph's pool goes too
            return self.model.prefill(idx, self.kv, last)
        if self.prefill_graph is None:
            self.prefill_graph = self._capture_prefill(idx, last)
        if self.prefill_graph is False:
            return self.model.prefill(idx, self.kv, last)
        self.prefill_idx.copy_(idx)
        self.prefill_last.copy_(last)
        self.prefill_graph.replay()
        return self.prefill_logits

    def _capture_prefill(self, idx, last):
        """A CUDA graph of model.prefill over copies of idx and last (its inputs from then on)
        writing self.prefill_logits; False, with a warning saying why, where the capture fails."""
        self.prefill_idx, self.prefill_last = idx.clone(), last.clone()

        def prefill():
            self.prefill_logits = self.model.prefill(self.prefill_idx, self.kv, self.prefill_last)

        graph, reason = _graphs.capture(prefill, (), None, self.cache, warmup=1)  # compiled already: eager first
        if graph is None:
            warnings.warn(f"fastgpt: CUDA graph capture of the prefill failed, prefilling eagerly ({reason})",
                          stacklevel=7)  # fmt: skip
            self.prefill_idx = self.prefill_last = self.prefill_logits = None
            return False
        return graph

    def decode_step(self):
        """Feed tok at pos through the model, sample the next token. Static shapes, no host sync."""
        self.emit(self.forward(self.tok, self.pos, self.kv, self.seqlens))  # (B, V) logits; emit advances pos

    def capture(self) -> str | None:
        """Capture decode_step over the whole cache in a CUDA graph (or keep the one captured).

        Returns None, or why the capture failed. The graph replays the sampler's draws from
        self.generator, whatever generator the call came with: only _mode() is baked in.
        """
        if self.graph is not None and self.graph_mode == self._mode():
            return None
        self.kv = self.cache
        state = (self.tok, self.pos, self.seqlens, self.step, self.out, self.finished)
        self.graph, reason = _graphs.capture(self.decode_step, state, self.generator, self.cache)
        self.graph_mode = self._mode()
        return reason

    def _mode(self):
        """What a captured graph holds of one call's settings: whether every row is greedy, whether
        eos ids end rows, and the sampler's path: its candidate list length for top_k_bound (0: no
        candidate path), which bounds in one power-of-two bucket share (the rows' top_k are device
        tensors the graph reads)."""
        return self.all_greedy, self.has_eos, _backends.sample_candidate_k(self.top_k_bound)


def _get_rng(generator, device):
    if generator is not None:
        return generator.get_state()
    return torch.get_rng_state() if device.type == "cpu" else getattr(torch, device.type).get_rng_state(device)


def _set_rng(generator, device, state):
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


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


def _pad_id(pad_token_id, eos_ids: list[int]) -> int:
    """What finished rows emit: pad_token_id, else the first eos id, else 0."""
    if pad_token_id is None:
        return eos_ids[0] if eos_ids else 0
    if not _is_token_id(pad_token_id):  # the output would hold it as a token id
        raise ValueError(f"pad_token_id must be an int >= 0 (a token id), got {pad_token_id!r}")
    return int(pad_token_id)


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
    decoders = model._decoders  # (batch, cache length) -> Decoder, least recently used first
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
    pad_id = _pad_id(pad_token_id, eos_ids)
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


def _decode(model, decoder, idx, lengths, max_new_tokens, *, use_graph, check_every) -> Iterator[Decoder]:
    """The prefill of the left-aligned idx (B, T), then the decode steps (check_every None: no eos)."""
    _prefill(decoder, idx, lengths, use_graph)
    yield decoder

    step = _replayed(decoder, decoder.decode_step, use_graph and max_new_tokens > 1)
    for i in range(1, max_new_tokens):
        if check_every and i % check_every == 0 and bool(decoder.finished.all()):
            return
        step()
        yield decoder


def _speculate(model, decoder, idx, lengths, max_new_tokens, *, use_graph, k, ngram) -> Iterator[PromptLookup]:
    """The prefill of the left-aligned idx (B, T), then prompt-lookup steps until every row is done."""
    _prefill(decoder, idx, lengths, use_graph)
    lookup = decoder.lookup
    if lookup is None or (lookup.k, lookup.ngram) != (k, ngram):
        lookup = decoder.lookup = PromptLookup(decoder, k, ngram)
    lookup.reset(idx, lengths, max_new_tokens)
    yield lookup

    step = _replayed(lookup, lookup.step, use_graph and max_new_tokens > 1)
    for _ in range(1, max_new_tokens):  # every step emits a token in each row not done
        if lookup.done():
            return
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
    default one; it ends as if every draw had been made from it (same seed, same tokens, with
    or without CUDA graphs). Options: pad_token_id (what finished rows emit; default the first eos id),
    cuda_graph (capture the decode step, and the prefill of a prompt length met twice in a row;
    default True on CUDA; falls back to eager with a warning saying why), check_every (decode
    steps between checks that every row is finished), compile (False; True or a dict of
    torch.compile arguments: the decode forward runs compiled, fullgraph, inside the CUDA graph
    when there is one; the first call pays the compilation),
    prompt_lookup_num_tokens (0; k > 0 drafts up to k tokens a step from each row's own text and
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
