"""Prompt-lookup decoding for fastgpt.generate: up to k tokens a step from the row's own text.

Each step drafts up to k tokens a row and verifies them in one forward over the row's last token
and its drafts (GPT.verify, whose decode attention runs the k + 1 queries of a row on the
split-KV kernels: one read of the cache and of the weights for all of them).

Drafts. The row's last g tokens, for the longest g <= ngram found earlier in the row's text so far
(prompt and new tokens), are looked up; the tokens that followed their first occurrence are the
drafts, at most k and none past the text's end. Transformers' prompt lookup drafts the same way.

Verification keeps generation exact. The forward gives, after the row's token and after each
draft, the next token as generate would choose it (the argmax when greedy, else a draw with the
row's sampling parameters). Drafts are accepted while each equals the token chosen before it;
the step emits the accepted drafts and the token chosen after the last of them, 1 to k + 1 tokens.
Greedy output is plain greedy's, token for token (up to rounding: the k + 1 queries of a row run
in other kernels than one query does); each sampled token is a draw from the distribution given
the tokens before it, as without drafts, though not the same draw for a seed.

A step is static in shape and never reads the device on the host, so it is captured in a CUDA
graph like the plain decode step; the host asks once a step whether every row is done. Where the
decoder's bookkeeping runs on Triton (auto's choice on a GPU), the drafting and the acceptance are
one launch each (kernels/lookup.py); elsewhere the PyTorch code here, which defines them.
"""

from __future__ import annotations

import weakref

import torch

from fastgpt import _backends, _graphs
from fastgpt.ops.sampling import draw


class PromptLookup:
    """One decoder's state for prompt-lookup decoding with k drafts and n-grams up to `ngram`.

    Device tensors (a CUDA graph owns them):
      text (B, S + 1) int64   each row's tokens so far, left-aligned: prompt, then the new ones
      n (B,) int64            how many; the last is the next step's input, at position n - 1
      start (B,) int64        where the new tokens begin (the prompt's length)
      count (B,) int64        new tokens so far; limit (1,) int64: max_new_tokens
      tok (B, k + 1) int64    a step's tokens: the row's last, then its drafts (filler past drafted)
      pos (B,) int64          n - 1, the last token's position; drafted (B,) int64: the real drafts
      seqlens (B,) int32      n + k, the cache length a step's verification attends over
      counters (B * H * (k + 1),) int32 zeros: its decode attention's (GPT.verify), left zero
      temperature, top_k, top_p, min_p (B * (k + 1),)   the rows' sampling parameters, each row's
                              repeated for its token and drafts
    """

    def __init__(self, decoder, k: int, ngram: int):
        self._decoder, self.k, self.ngram = weakref.ref(decoder), k, ngram  # its decoder keeps it (decoder.lookup)
        B, device = decoder.batch, decoder.tok.device
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.text = zeros(B, decoder.length + 1)
        self.n, self.start, self.count, self.limit = zeros(B), zeros(B), zeros(B), zeros(1)
        self.tok, self.pos, self.drafted = zeros(B, k + 1), zeros(B), zeros(B)
        self.seqlens = zeros(B, dtype=torch.int32)
        self.counters = zeros(B * decoder.model.config.n_head * (k + 1), dtype=torch.int32)
        self.cols = torch.arange(k + 1, device=device)  # a step's columns: the token, then its k drafts
        self.sampling = {name: getattr(decoder, name).repeat_interleave(k + 1) for name in _SAMPLING}
        self.graph, self.graph_mode = None, None
        # Drafting and acceptance in one Triton launch each where the decoder's bookkeeping runs
        # on Triton (auto's on a GPU): kernels/lookup.py, instead of some 75 small PyTorch kernels.
        self.triton = decoder.triton_advance

    @property
    def decoder(self):
        return self._decoder()

    def reset(self, idx, lengths, max_new_tokens: int):
        """Load one call, after the prefill emitted each row's first new token (decoder.tok):
        idx (B, T) left-aligned, lengths (B,) its real tokens a row."""
        d, T = self.decoder, idx.shape[1]
        self.text[:, :T] = idx
        self.text.scatter_(1, lengths[:, None], d.tok[:, None])
        torch.add(lengths, 1, out=self.n)
        self.start.copy_(lengths)
        self.count.fill_(1)
        self.limit.fill_(max_new_tokens)
        for name, value in self.sampling.items():
            value.copy_(getattr(d, name).repeat_interleave(self.k + 1))

    def done(self) -> bool:
        """Whether every row has its max_new_tokens or an eos (a read of the device)."""
        return bool((self.decoder.finished | (self.count >= self.limit)).all())

    def ready(self) -> int:
        """How many new tokens every row has (a read of the device): a row that ended has them all
        (pad after its end); once every row ended, the longest row's count."""
        d = self.decoder
        every = torch.where(d.finished, self.limit, self.count).min()
        return int(torch.where(d.finished.all(), self.count.max(), every))  # one read

    def tokens(self, width: int) -> torch.Tensor:
        """The new tokens (B, width): each row's, then pad_token_id after a row's last."""
        cols = torch.arange(width, device=self.text.device)
        new = self.text.gather(1, (self.start[:, None] + cols).clamp(max=self.text.shape[1] - 1))
        return torch.where(cols < self.count[:, None], new, self.decoder.pad)

    def step(self):
        """Draft, verify, emit: 1 to k + 1 new tokens a row that is not done. No host sync."""
        d = self.decoder
        self._draft()
        self._accept(self._choose(d.model.verify(self.tok, self.pos, d.kv, self.seqlens, self.counters)))

    def _draft(self):
        """Each row's drafts into tok (after its last token), how many are real, pos and seqlens."""
        if self.triton:
            launchers = _backends.launchers("triton", "lookup")
            launchers.draft(self.text, self.n, self.tok, self.pos, self.drafted, self.seqlens, ngram=self.ngram)
            return
        text, n = self.text, self.n[:, None]
        B, width = text.shape
        start = torch.zeros_like(n)  # where the drafts begin in text
        found = torch.zeros_like(n, dtype=torch.bool)
        for g in range(min(self.ngram, width - 1), 0, -1):  # the longest n-gram found wins
            tail = text.gather(1, (n - g + torch.arange(g, device=n.device)).clamp(min=0))  # (B, g): the last g tokens
            where = torch.arange(width - g + 1, device=n.device)  # the windows' starts
            hit = (text.unfold(1, g, 1) == tail[:, None, :]).all(dim=2) & (where < n - g)  # a token follows the window
            first = hit.int().argmax(dim=1, keepdim=True)  # the earliest hit
            new = hit.any(dim=1, keepdim=True) & ~found
            start = torch.where(new, first + g, start)
            found |= new
        torch.sub(self.n, 1, out=self.pos)
        src = torch.cat([self.pos[:, None], start + self.cols[: self.k]], dim=1)  # the last token, then the drafts
        torch.gather(text, 1, src.clamp(max=width - 1), out=self.tok)
        self.drafted.copy_((self.n - start[:, 0]).clamp(max=self.k).masked_fill(~found[:, 0], 0))
        torch.add(self.n, self.k, out=self.seqlens)

    def _accept(self, chosen):
        """Emit each row's agreeing drafts and the token chosen after the last of them (up to its
        limit and its first eos): text, n, count and finished advance."""
        d, k = self.decoder, self.k
        if self.triton:
            launchers = _backends.launchers("triton", "lookup")
            launchers.accept(chosen, self.tok, self.drafted, self.text, self.n, self.count, self.limit, d.finished,
                             d.eos, has_eos=d.has_eos)  # fmt: skip
            return
        agree = (self.tok[:, 1:] == chosen[:, :k]) & (self.cols[:k] < self.drafted[:, None])  # draft i: chosen i?
        accepted = agree.cumprod(dim=1).sum(dim=1)  # (B,): the leading run of agreeing drafts
        emit = torch.minimum(accepted + 1, self.limit - self.count).clamp(min=0).masked_fill(d.finished, 0)
        if d.has_eos:  # a row ends at its first eos: emit up to it
            is_eos = (chosen[:, :, None] == d.eos).any(dim=2) & (self.cols < emit[:, None])  # (B, k + 1)
            ended = is_eos.any(dim=1)
            emit = torch.where(ended, is_eos.int().argmax(dim=1) + 1, emit)
            d.finished |= ended
        at = self.n[:, None] + self.cols  # (B, k + 1): the emitted tokens' places in text
        self.text.scatter_(1, at, torch.where(self.cols < emit[:, None], chosen, self.text.gather(1, at)))
        self.n += emit
        self.count += emit

    def _choose(self, logits):
        """The token generate chooses after each of the k + 1 positions: (B, k + 1, V) -> (B, k + 1)."""
        d = self.decoder
        B, T, V = logits.shape
        temperature = 0.0 if d.all_greedy else self.sampling["temperature"]
        params = {name: value for name, value in self.sampling.items() if name != "temperature"}
        return draw(logits.reshape(B * T, V), temperature=temperature, **params, generator=d.generator,
                    backend=d.model.backend, top_k_bound=d.top_k_bound).view(B, T)  # fmt: skip

    def capture(self) -> str | None:
        """Capture step over the whole cache in a CUDA graph (or keep the one captured): None, or
        why the capture failed."""
        d = self.decoder
        if self.graph is not None and self.graph_mode == d._mode():
            return None
        d.kv = d.cache
        state = (self.text, self.n, self.count, self.seqlens, d.finished)
        self.graph, reason = _graphs.capture(self.step, state, d.generator, d.cache)
        self.graph_mode = d._mode()
        return reason


_SAMPLING = ("temperature", "top_k", "top_p", "min_p")
