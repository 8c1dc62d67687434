"""The real competitor: plain-PyTorch GPT-2 with a static KV cache and a compiled decode step.

This is the recipe gpt-fast made known, written here for GPT-2: preallocated K/V caches that
each step writes in place (index_copy_ at the step's position), attention over the whole cache
with a boolean mask row, and the one-token decode step compiled with
torch.compile(mode="reduce-overhead", fullgraph=True), which replays it as a CUDA graph, with
gpt-fast's two settings for that step: Inductor's coordinate-descent tuning of its kernels'
launch configs, and attention as plain ops for Inductor to fuse (SDPA's math backend: "actually
better for Inductor to codegen attention here", gpt-fast's generate.py) rather than a library
kernel. Prefill runs eagerly. No fastgpt kernel is used. Greedy decoding only.

    h = wte(idx) + wpe(pos)
    for each block:  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
    logits = lm_head(ln_f(h))                    # lm_head tied to wte
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        # (B, H, Smax, D) each, set by StaticGPT2.setup_cache. Buffers, so that a reduce-overhead
        # graph treats them as static inputs mutated in place (as gpt-fast's KVCache does).
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, pos, mask):
        """x (B, T, C) at positions pos (T,); mask (1, 1, T, Smax) bool, True = may attend."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, h, pos, mask):
        h = h + self.attn(self.ln_1(h), pos, mask)
        return h + self.c_proj(F.gelu(self.c_fc(self.ln_2(h)), approximate="tanh"))


class StaticGPT2(nn.Module):
    """GPT-2 (HF's architecture) whose forward reads and writes a preallocated KV cache."""

    def __init__(self, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int,
                 eps: float = 1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, eps) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)
        self.register_buffer("causal", None, persistent=False)  # (Smax, Smax) bool

    def setup_cache(self, batch: int, length: int) -> None:
        """Allocate (batch, H, length, D) K/V caches and the causal mask (new shapes recompile)."""
        w = self.wte.weight
        for block in self.blocks:
            attn = block.attn
            shape = (batch, attn.n_head, length, w.shape[1] // attn.n_head)
            attn.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            attn.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.causal = torch.ones(length, length, dtype=torch.bool, device=w.device).tril()

    def forward(self, idx, pos):
        """idx (B, T) int64 at positions pos (T,) int64 -> logits (B, T, V); writes the cache."""
        h = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        mask = self.causal[pos][None, None]  # (1, 1, T, Smax)
        for block in self.blocks:
            h = block(h, pos, mask)
        return F.linear(self.ln_f(h), self.wte.weight)

    @classmethod
    def from_hf(cls, hf_model) -> StaticGPT2:
        """Copy a transformers GPT2LMHeadModel's weights (Conv1D (in, out) -> Linear (out, in))."""
        cfg = hf_model.config
        model = cls(cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.layer_norm_epsilon)
        weight = hf_model.transformer.wte.weight
        model.to(device=weight.device, dtype=weight.dtype)
        model.load_state_dict(_convert(hf_model.state_dict(), cfg.n_layer))
        return model.eval()


def _convert(sd: dict, n_layer: int) -> dict:
    """HF GPT-2 state dict -> StaticGPT2's names; Conv1D weights transposed."""
    out = {"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
           "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
             "mlp.c_fc": "c_fc", "mlp.c_proj": "c_proj"}
    for i in range(n_layer):
        for hf_name, name in names.items():
            w, b = sd[f"transformer.h.{i}.{hf_name}.weight"], sd[f"transformer.h.{i}.{hf_name}.bias"]
            out[f"blocks.{i}.{name}.weight"] = w if hf_name.startswith("ln") else w.t().contiguous()
            out[f"blocks.{i}.{name}.bias"] = b
    return out


def decode_one(model: StaticGPT2, tok, pos):
    """One greedy step: tok (B, 1) at position pos (1,) -> next token (B, 1)."""
    return model(tok, pos)[:, -1].argmax(dim=-1, keepdim=True)


class Generator:
    """Greedy generation with StaticGPT2; the decode step compiled when `compile` is set."""

    def __init__(self, model: StaticGPT2, compile: bool):
        self.model = model
        self.shape = None
        self.step = decode_one
        self.compiled = compile
        if compile:
            self.step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def _recipe(self) -> contextlib.AbstractContextManager:
        """gpt-fast's settings around the compiled steps (in force when they compile: Dynamo traces
        the math backend's ops, Inductor tunes their kernels), put back after; entered once a call,
        around its decode loop, as gpt-fast does (not each step's host time)."""
        if not self.compiled:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch._inductor.config.patch(coordinate_descent_tuning=True))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    @torch.no_grad()
    def __call__(self, idx, max_new_tokens: int):
        """idx (B, T) int64 -> (B, T + max_new_tokens) int64, greedy."""
        B, T = idx.shape
        if self.shape != (B, T + max_new_tokens):
            self.model.setup_cache(B, T + max_new_tokens)
            self.shape = (B, T + max_new_tokens)
        logits = self.model(idx, torch.arange(T, device=idx.device))  # prefill, eager
        tok = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        out = [idx, tok]
        pos = torch.tensor([T], device=idx.device)
        with self._recipe():
            for _ in range(max_new_tokens - 1):
                # Outputs of a reduce-overhead step live in the graph's memory: copy before the next one.
                tok = self.step(self.model, tok, pos).clone()
                pos += 1
                out.append(tok)
        return torch.cat(out, dim=1)
