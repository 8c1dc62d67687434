"""A generation's state on the device: the KV cache (KVCache) and the buffers, CUDA graphs and
sampler of one (batch, cache length) (Decoder), for fastgpt.generate and fastgpt.speculative.

The per-token work is all on the device: sampling parameters, positions, the output buffer and
the "finished" flags are tensors, so one decode step can be captured in a CUDA graph and
replayed, and so can the prefill of a prompt length met twice in a row.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch

from fastgpt import _backends, _graphs
from fastgpt.ops import _checks
from fastgpt.ops.linear import COUNTER_COLUMNS
from fastgpt.ops.sampling import draw
from fastgpt.ops.step import sync_entries as step_sync_entries

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
    never holds the caller's generator, and a seed gives the same draws with or without graphs
    (the same tokens up to the kernels' rounding: a graphed step picks decode attention by its
    time on the GPU, an eager one by its call's, and may pick the other backend's).
    """

    def __init__(self, model, batch: int, length: int, eos_slots: int):
        weight = model.transformer.wte.weight
        # The model keeps its decoders (GPT._decoders), so a decoder refers to it weakly, and holds
        # nothing that refers back to itself: `del model` frees the model, its caches and graphs at
        # once, not at Python's next cyclic collection (which GPU memory does not prompt).
        device, self._model = weight.device, weakref.ref(model)
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
        self.compiled, self.compiled_with = None, None  # torch.compile's GPT.decode (use_compile) and its options
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

    @property
    def model(self):
        return self._model()

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
        # The model's decode as a function of the model, not its bound method: a decoder holds no
        # strong reference to its model (see __init__).
        decode = type(self.model).decode
        self.compiled = None if options is None else torch.compile(decode, fullgraph=True,
                                                                    **{"dynamic": False, **options})  # fmt: skip
        self.compiled_with, self.graph = options, None

    def forward(self, tok, pos, kv, seqlens):
        """model.decode, or its compiled form (use_compile). Every decoder compiles the same
        function, so each new (batch, cache length) is a recompile of it, and past Dynamo's
        recompile limit (8 by default) fullgraph makes that an error: this decoder then decodes
        eagerly, saying why."""
        if self.compiled is None:
            return self.model.decode(tok, pos, kv, seqlens)
        try:
            return self.compiled(self.model, tok, pos, kv, seqlens)
        except _RECOMPILE_LIMIT as err:
            warnings.warn(f"fastgpt: compile=True, but torch.compile's recompile limit was reached (raise "
                          f"torch._dynamo.config.recompile_limit to compile more batch sizes and cache lengths); "
                          f"decoding eagerly ({type(err).__name__})", stacklevel=2)  # fmt: skip
            self.compiled = None
            return self.model.decode(tok, pos, kv, seqlens)

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
