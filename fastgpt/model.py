"""GPT-2 in one file, on fastgpt's fused ops.

The module tree and parameter names are Hugging Face's (transformer.wte, transformer.h.0.attn.c_attn,
...), so a GPT2LMHeadModel state dict loads after one change: HF's Conv1D stores its weight as
(in, out), nn.Linear as (out, in), so those weights are transposed on load (fastgpt/loading.py).

The residual stream is carried through the fused residual-add + LayerNorm: every LayerNorm takes
the branch output x and the stream h and returns (LN(x + h), x + h). So ln_1 of block i also does
the MLP residual add of block i-1, ln_2 does the attention residual add, ln_f the last one, and
the first ln_1 adds the token and position embeddings.

    h = wte(idx) + wpe(pos)
    for each block:  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
    logits = lm_head(ln_f(h))                    # lm_head is tied to wte
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastgpt
from fastgpt import _backends
from fastgpt.nn import LayerNorm
from fastgpt.ops import step
from fastgpt.ops.decode import decode_step_attention
from fastgpt.ops.linear import MAX_ROWS, linear

# Hugging Face activation names this module implements; gelu_new is GPT-2's (the tanh form).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# From this many rows a fused decode step runs ln_1 and ln_2 as the LayerNorm op before their
# matmuls, rather than inside them, where each of a matmul's programs recomputes the rows'
# statistics (B 16: 768 values a row, 144 programs). Measured on an H200 (bf16, gpu-probe's
# linear, 2026-11-30): at B16 / B32 ln_1 + c_attn fused took 10.7 / 11.3 us at its best tiles,
# the LayerNorm op with cuBLAS's matmul 5.7 / 5.8; ln_2 + c_fc + gelu 10.8 / 11.5 against 7.1 /
# 7.2. At B1 the fused forms were the faster or close (c_attn 5.6 against 5.3 without the cache
# write it does; c_fc 5.8 against 6.7), at B4 mixed (6.6 against 5.5; 6.9 against 6.9): where
# between 4 and 16 rows the op starts to pay is not measured. Here the matmul after the op is
# still fastgpt.ops.linear (it writes the cache), not measured in this form.
LN_APART_MIN_ROWS = 16
_LAYER_WEIGHTS = operator.attrgetter(*step.LAYER_WEIGHTS)  # a block's weights as the persistent step takes them


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # the context: wpe has this many rows
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {sorted(ACTIVATIONS)}, got {self.activation_function!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd


def _ln(module: LayerNorm) -> tuple:
    """A LayerNorm module as fastgpt.ops.linear's ln argument."""
    return module.weight, module.bias, module.eps


def _norm_linear(x, residual, ln: LayerNorm, proj: nn.Linear, apart: bool, backend: str, **kwargs):
    """proj(ln(x + residual)) -> (out, x + residual): one fastgpt.ops.linear launch, or (`apart`)
    the LayerNorm op and then the matmul. kwargs: the rest of linear's arguments."""
    if not apart:
        return linear(x, proj.weight, proj.bias, ln=_ln(ln), residual=residual, backend=backend, **kwargs)
    y, h = fastgpt.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual, backend=backend)
    return linear(y, proj.weight, proj.bias, backend=backend, **kwargs)[0], h


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.backend = "auto"

    def forward(self, x, kv_cache=None, slot=None, seqlens=None, graphed=False):
        """x (B, T, C) -> (B, T, C).

        Without kv_cache: causal attention over x itself. With kv_cache (2, B, H, S, D), this
        layer's k and v caches, and seqlens None: prefill, k/v of the T tokens go to cache slots
        [0, T). With seqlens (B,) int32: decode, the T tokens of row b are its last T positions,
        their k/v go to cache slots `slot` ((2, B, H, T, D) int64, token t's slot in every element
        of [..., t, :]; GPT.verify makes it once for all layers) and token t attends to slots
        [0, seqlens[b] - T + t]. graphed: the decode step is being captured in a CUDA graph.
        """
        return self.c_proj(self.attend(self.c_attn(x), kv_cache, slot, seqlens, graphed=graphed))

    def attend(self, qkv, kv_cache=None, slot=None, seqlens=None, counters=None, graphed=False):
        """The attention between the two projections: qkv (B, T, 3C) -> (B, T, C); the rest as
        forward, except that a decode step (seqlens given) with slot None finds its k/v already
        in the cache (GPT's fused decode writes them there). counters: a decode step's, as
        fastgpt.ops.decode.decode_step_attention takes them (GPT's fused decode passes its cache's)."""
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        H, D = self.n_head, self.head_dim
        q = qkv[..., :C].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        kv = qkv[..., C:].view(B, T, 2, H, D).permute(2, 0, 3, 1, 4)  # (2, B, H, T, D)
        if seqlens is None:
            if kv_cache is not None:
                kv_cache[..., :T, :].copy_(kv)
            y = fastgpt.attention(q, kv[0], kv[1], causal=True, backend=self.backend)  # (B, H, T, D)
        else:
            if slot is not None:
                kv_cache.scatter_(3, slot, kv)  # kv_cache[:, b, :, slot_bt] = kv[:, b, :, t]: one kernel, no copy
            k_cache, v_cache = kv_cache[0], kv_cache[1]
            # (B, H, T, D); with several tokens a row (verify) a view of (B, T, H, D), so the reshape copies nothing
            y = decode_step_attention(q, k_cache, v_cache, seqlens, counters, backend=self.backend, token_major=T > 1,
                                      graphed=graphed)  # fmt: skip
        return y.transpose(1, 2).reshape(B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.approximate = ACTIVATIONS[config.activation_function]

    def forward(self, x):  # (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, h, kv_cache=None, slot=None, seqlens=None, graphed=False):
        """x: the previous branch's output, h: the residual stream before it; both (B, T, C).

        Returns (this block's MLP output, the stream before it): the next LayerNorm adds them.
        """
        y, h = self.ln_1(x, h)  # h = h + x
        a = self.attn(y, kv_cache, slot, seqlens, graphed)
        y, h = self.ln_2(a, h)  # h = h + a
        return self.mlp(y), h


def check_idx(model, idx) -> None:
    """idx must be a (B, T) int64 (or int32) tensor of ids in [0, vocab_size) on the model's
    device, T <= n_positions. The ids' range costs a sync: checked eagerly only (not while
    torch.compile traces or a CUDA graph captures, nor on the meta device), since an id past the
    table would fault the GPU."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {getattr(idx, 'shape', type(idx).__name__)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must hold int64 token ids, got {idx.dtype}")
    device = model.transformer.wte.weight.device
    if idx.device != device:
        raise ValueError(f"idx is on {idx.device} but the model is on {device}")
    B, T = idx.shape
    context = model.config.n_positions
    if T > context:
        raise ValueError(f"idx has {T} tokens, more than the model's context n_positions = {context}")
    V = model.config.vocab_size
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()  # a sync would end the capture
    checkable = B and T and not idx.is_meta and not torch.compiler.is_compiling() and not capturing
    if checkable and not bool(((idx >= 0) & (idx < V)).all()):
        raise ValueError(f"idx holds token ids outside [0, vocab_size = {V})")


class GPT(nn.Module):
    """GPT-2 on fastgpt's ops: forward(idx (B, T) int64) -> logits (B, T, vocab_size), and generate.

    Attributes:
      config         GPTConfig
      eos_token_id   the checkpoint's end-of-text id (int, a list of ints, or None), from its
                     config.json (GPT.from_pretrained) or HF config (GPT.from_hf); None for a
                     model built from a GPTConfig. generate does not read it: pass it on, as
                     generate(..., eos_token_id=model.eos_token_id), to stop rows there.
      backend        the backend every op of the model runs on ("auto" unless set)
      fused_decode   decode steps of up to 64 rows on the triton backend (auto's on a GPU) run
                     each matmul as one fastgpt.ops.linear launch with its neighbours fused in
                     (True unless set; see decode)
      persistent_decode  decode steps of one token a row, up to 8 rows, on the triton backend
                     run as one launch, a persistent kernel (fastgpt.ops.step) instead of the
                     fused step's ~60; GPT-2's tanh GELU only. False unless set: not yet
                     measured on a GPU. generate raises after a call in which one of the
                     kernel's waits gave up (a bug); a caller of decode reads
                     kv_cache.step_sync[fastgpt.ops.step.GAVE_UP] itself
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.eos_token_id = None  # set by from_pretrained and from_hf (see the class docstring)
        self._fused_decode_on = True
        self._persistent_decode_on = False
        self._step_weights = None  # fastgpt.ops.step.step_weights' table of this model's weights, once made
        self._decoders = {}  # generate's decoders (fastgpt/decoder.py): caches and CUDA graphs, per (batch, length)
        self._decoders_made_over = None  # the parameters' places when those were made (_kept_decoders)
        self.arrange_weights()

    @property
    def backend(self) -> str:
        return self.transformer.ln_f.backend

    @backend.setter
    def backend(self, name: str):
        """Run every op of this model on one backend ("auto", "cuda", "triton" or "torch")."""
        self._decoders.clear()  # their CUDA graphs captured the old backend's kernels
        for m in self.modules():
            if isinstance(m, (LayerNorm, CausalSelfAttention)):
                m.backend = name

    @property
    def fused_decode(self) -> bool:
        return self._fused_decode_on

    @fused_decode.setter
    def fused_decode(self, on: bool):
        """Run decode steps of up to MAX_ROWS rows on fastgpt.ops.linear (True, the default) or on
        nn.Linear and the LayerNorm op (False); either way only on the backends that can."""
        self._decoders.clear()  # their CUDA graphs captured the other path
        self._fused_decode_on = bool(on)

    @property
    def persistent_decode(self) -> bool:
        return self._persistent_decode_on

    @persistent_decode.setter
    def persistent_decode(self, on: bool):
        """Run decode steps of one token a row, up to fastgpt.ops.step.MAX_ROWS rows, as one
        persistent kernel (True) where it can run, or as the fused or unfused step (False, the default)."""
        self._decoders.clear()  # their CUDA graphs captured the other path
        self._persistent_decode_on = bool(on)

    def _kept_decoders(self) -> dict:
        """generate's decoders of this model ((batch, cache length) -> fastgpt.decoder.Decoder),
        emptied first where a parameter has changed place since they were made: their CUDA graphs
        read the old places. .to() and friends empty them too (_apply); this catches the other
        ways, load_state_dict(assign=True), a new Parameter, param.data = ... (a copy_ into a
        parameter keeps its place, and the graphs read the new values)."""
        places = tuple((p.data_ptr(), p.dtype, p.shape) for p in self.parameters())
        if places != self._decoders_made_over:
            self._decoders.clear()
            self._decoders_made_over = places
        return self._decoders

    def _apply(self, fn, *args, **kwargs):  # behind .to(), .cuda(), .half(), ...
        self._decoders.clear()  # their caches and CUDA graphs point at the old weights
        self._step_weights = None
        super()._apply(fn, *args, **kwargs)
        self.arrange_weights()
        return self

    def arrange_weights(self):
        """Pick the memory order of the matmul weights for their device; values and shapes stay.

        On the CPU the weights of every nn.Linear (lm_head, that is wte, included) are stored
        input-major, the (in, out) order of HF's Conv1D, behind nn.Linear's (out, in) shape: MKL's
        batch-1 matrix-vector product, one per weight per decoded token, reads that order 1.3-1.7x
        faster (measured on GPT-2 124M shapes). Elsewhere they are the usual contiguous (out, in).
        """
        weights = {id(m.weight): m.weight for m in self.modules() if isinstance(m, nn.Linear)}
        for w in weights.values():
            if w.device.type == "meta" or w.dim() != 2:
                continue
            input_major = w.device.type == "cpu"
            if input_major and not w.t().is_contiguous():
                w.data = w.data.t().contiguous().t()
            elif not input_major and not w.is_contiguous():
                w.data = w.data.contiguous()

    def _trunk(self, tok, pos, kv_cache=None, slot=None, seqlens=None, graphed=False):
        """The blocks and ln_f over tokens tok (B, T) at positions pos (T,) or (B, T): (B, T, C).

        kv_cache, slot, seqlens, graphed: as for CausalSelfAttention.forward.
        """
        x = self.transformer.wte(tok)  # (B, T, C)
        h = self.transformer.wpe(pos).expand_as(x)  # (B, T, C); the first ln_1 adds the two
        for i, block in enumerate(self.transformer.h):
            x, h = block(x, h, None if kv_cache is None else kv_cache.layer(i), slot, seqlens, graphed)
        y, _ = self.transformer.ln_f(x, h)
        return y

    def forward(self, idx):
        """idx (B, T) int64 token ids, T <= n_positions -> logits (B, T, vocab_size). No cache."""
        check_idx(self, idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self._trunk(idx, pos))  # (B, T, V)

    def prefill(self, idx, kv_cache, last):
        """Run the prompt idx (B, T) and write its k/v to kv_cache slots [0, T).

        Every row's tokens must start at slot 0 (generate.py moves left padding to the right).
        last (B,) int64: the position whose logits to return per row. Returns (B, vocab_size).
        """
        B, T = idx.shape
        y = self._trunk(idx, torch.arange(T, device=idx.device), kv_cache)  # (B, T, C)
        y = y[torch.arange(B, device=idx.device), last]  # (B, C)
        return self.lm_head(y)  # (B, V)

    def decode(self, tok, pos, kv_cache, seqlens=None):
        """One step: token tok (B,) int64 at position pos (B,) int64 of each row -> logits (B, V).

        Writes the token's k/v to cache slot pos[b] and attends to slots [0, pos[b]]. seqlens:
        pos + 1 as int32 (B,), where the caller keeps it (generate's decoder does); else one
        kernel makes it.
        """
        return self.verify(tok[:, None], pos, kv_cache, seqlens, kv_cache.counters)[:, 0]  # (B, V)

    def verify(self, tok, pos, kv_cache, seqlens=None, counters=None):
        """T tokens a row, tok (B, T) int64, at positions pos[b] .. pos[b] + T - 1 -> logits (B, T, V):
        a token and its drafts (speculative decoding's verification), each seeing the row's cache
        and the tokens before it. pos (B,) int64.

        Writes their k/v to cache slots pos[b] + t; the cache needs pos[b] + T of them. seqlens:
        pos + T as int32 (B,), else one kernel makes it. Positions past the context (drafts beyond
        the last one a row may reach) read the last position's embedding: their logits mean nothing.
        counters: None, or int32 zeros (B * n_head * T,) that the fused step's decode attention
        merges its splits with (see decode_step_attention); the unfused step does not use them.
        kv_cache.graphed (fastgpt.generate's capture sets it) has decode attention picked by its
        time on the GPU, not by one eager call's. With persistent_decode, a step of one token a row
        runs as one launch where it can (see _persistent_decode).
        """
        (B, T), config = tok.shape, self.config
        if seqlens is None:
            seqlens = torch.add(pos, T, out=torch.empty(B, dtype=torch.int32, device=pos.device))
        slots = pos[:, None] if T == 1 else pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
        positions = slots if T == 1 else slots.clamp(max=config.n_positions - 1)
        if T == 1 and self._persistent_decode(B, tok.device):
            t = self.transformer
            logits = step.decode_step(tok.reshape(B), pos, seqlens, kv_cache.kv, self._step_weights, t.wte.weight,
                                      t.wpe.weight, (t.ln_f.weight, t.ln_f.bias), t.ln_f.eps, kv_cache.step_sync)
            return logits[:, None]  # (B, 1, V)
        if self._fused_decode(B * T, tok.device):
            return self._decode_fused(tok, slots, positions, kv_cache, seqlens, counters)
        slot = slots.view(1, B, 1, T, 1).expand(2, B, config.n_head, T, config.head_dim)  # all layers' slots
        return self.lm_head(self._trunk(tok, positions, kv_cache, slot, seqlens, kv_cache.graphed))  # (B, T, V)

    def _fused_decode(self, rows: int, device: torch.device) -> bool:
        """Whether a decode step of `rows` tokens in all runs on fastgpt.ops.linear: on the triton
        backend (auto's choice on a GPU) for the rows the kernel takes (MAX_ROWS), unless
        fused_decode is off."""
        return self._fused_decode_on and rows <= MAX_ROWS and _backends.runs_on_triton("linear", self.backend, device)

    def _persistent_decode(self, rows: int, device: torch.device) -> bool:
        """Whether a decode step of `rows` rows of one token runs as one persistent kernel: where
        persistent_decode is on, on the triton backend (auto's choice on a GPU; not on the
        interpreter's bf16), for up to fastgpt.ops.step.MAX_ROWS rows, GPT-2's tanh GELU and a head
        dim of a power of two, outside torch.compile, with every weight there in one dtype, every
        LayerNorm with its weight and bias and ln_f's eps, lm_head without a bias, and weights the
        kernel can read (made into its table here, once, and again only when a parameter changes place)."""
        config, t = self.config, self.transformer
        tanh = ACTIVATIONS[config.activation_function] == "tanh"
        if not (self._persistent_decode_on and rows <= step.MAX_ROWS and tanh and not torch.compiler.is_compiling()
                and config.head_dim & (config.head_dim - 1) == 0
                and not (device.type == "cpu" and t.wte.weight.dtype == torch.bfloat16)
                and _backends.runs_on_triton("decode_step", self.backend, device)):  # fmt: skip
            return False
        layers = [_LAYER_WEIGHTS(block) for block in t.h]
        others = (t.wte.weight, t.wpe.weight, t.ln_f.weight, t.ln_f.bias, self.lm_head.weight)
        if (self.lm_head.bias is not None or any(w is None or w.dtype != t.wte.weight.dtype
                                                  for w in (*others, *(w for layer in layers for w in layer)))
                or any(norm.eps != t.ln_f.eps for block in t.h for norm in (block.ln_1, block.ln_2))):  # fmt: skip
            return False
        if self._step_weights is None or not step.still_valid(self._step_weights, layers, self.lm_head.weight):
            self._step_weights = step.step_weights(layers, self.lm_head.weight)
        return self._step_weights is not None

    def _decode_fused(self, tok, slots, positions, kv_cache, seqlens, counters):
        """verify's trunk and lm_head in 5 launches a layer instead of 9 (or 10 where decode
        attention splits the cache): every matmul is one fastgpt.ops.linear launch, with the
        residual add and LayerNorm before it (ln_1 + c_attn, ln_2 + c_fc, ln_f + lm_head), GELU
        after it (c_fc), and the cache write of k and v (c_attn) fused in; the first also reads
        the token and position embeddings (no gathers). From LN_APART_MIN_ROWS rows, ln_1 (after
        layer 0) and ln_2 run as the LayerNorm op before their matmuls: 7 launches a layer.
        Decode attention merges its splits in its own launch where given counters, and the output
        projections (c_proj) may split their K over more programs (kv_cache.linear_counters). tok, slots
        (cache slots), positions (wpe rows): (B, T)."""
        t, backend = self.transformer, self.backend
        (B, T), C = tok.shape, self.config.n_embd
        tok, slots, positions = tok.reshape(-1), slots.reshape(-1), positions.reshape(-1)  # (B T,): rows
        apart = B * T >= LN_APART_MIN_ROWS  # ln_1 and ln_2 as the LayerNorm op
        # Rows (B T, C) throughout. Layer 0 reads the embeddings in place: its input and residual
        # are the tables wte and wpe at rows tok and positions, whose sum is ln_1's residual add
        # (so its ln_1 stays fused: an id outside a table reads zeros there, no gather).
        x, h = t.wte.weight, t.wpe.weight
        split = kv_cache.linear_counters  # the output projections may split their K (c_proj's 3072 in the MLP)
        for i, block in enumerate(t.h):
            attn, mlp = block.attn, block.mlp
            cache = kv_cache.layer(i)  # (2, B, H, S, D): row b's T tokens write its slots
            tables = dict(x_rows=tok, residual_rows=positions) if i == 0 else {}
            qkv, h = _norm_linear(x, h, block.ln_1, attn.c_attn, apart and i > 0, backend, kv_cache=cache,
                                  kv_pos=slots, **tables)  # fmt: skip
            y = attn.attend(qkv.view(B, T, 3 * C), cache, None, seqlens, counters, kv_cache.graphed).view(B * T, C)
            a, _ = linear(y, attn.c_proj.weight, attn.c_proj.bias, counters=split, backend=backend)
            tanh = mlp.approximate == "tanh"
            f, h = _norm_linear(a, h, block.ln_2, mlp.c_fc, apart, backend, activation="gelu_tanh" if tanh else None)
            f = f if tanh else F.gelu(f)
            x, _ = linear(f, mlp.c_proj.weight, mlp.c_proj.bias, counters=split, backend=backend)
        logits, _ = linear(x, self.lm_head.weight, self.lm_head.bias, ln=_ln(t.ln_f), residual=h, backend=backend)
        return logits.view(B, T, -1)  # (B, T, V)

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 eos_token_id=None, attention_mask=None, generator=None, **options):
        """Continue each row of idx (B, T) int64 by up to max_new_tokens tokens -> (B, T + n) int64.

        temperature 0 is greedy; top_k/top_p/min_p follow Hugging Face. attention_mask (B, T) marks
        real tokens with 1 and left padding with 0, as in HF; each row then equals its unbatched
        run. With eos_token_id (an int or a list), a row stops at its first eos and is filled with
        pad_token_id (default: the first eos id) afterwards; n is less than max_new_tokens only if
        every row stopped. T + max_new_tokens may be at most config.n_positions: one token fewer
        than transformers allows (its last new token is never fed back; here every token has a
        cache slot and a position). Other options (pad_token_id, cuda_graph, check_every, compile, and
        prompt-lookup decoding's prompt_lookup_num_tokens, max_matching_ngram_size) are documented
        in fastgpt.generate.generate.
        """
        from fastgpt.generate import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, eos_token_id=eos_token_id, attention_mask=attention_mask,
                        generator=generator, **options)

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=None, device=None) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint: a local directory or a hub id such as "gpt2"."""
        from fastgpt.loading import load_gpt

        return load_gpt(cls, name_or_path, dtype=dtype, device=device)

    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """Convert an in-memory transformers GPT2LMHeadModel (same device and dtype; weights copied)."""
        from fastgpt.loading import build, config_from_hf, convert_state_dict

        if not (isinstance(hf_model, nn.Module) and hasattr(hf_model, "transformer") and hasattr(hf_model, "config")):
            raise TypeError(f"from_hf takes a transformers GPT2LMHeadModel, got {type(hf_model).__name__} "
                            "(for a hub id or a directory: GPT.from_pretrained)")  # fmt: skip

        config = config_from_hf(hf_model.config.to_dict())
        weight = hf_model.transformer.wte.weight
        model = build(cls, config, convert_state_dict(hf_model.state_dict(), clone=True), type(hf_model).__name__)
        model.eos_token_id = hf_model.config.eos_token_id
        return model.to(device=weight.device, dtype=weight.dtype).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
