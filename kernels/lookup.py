"""Prompt lookup's drafting and acceptance (fastgpt/speculative.py), one Triton launch each: what is
otherwise some 75 small PyTorch kernels a step (n-gram matches, gathers, the agreeing run, eos,
the text's update), in a step whose verification is some 60 launches.

draft, one program a row b (n = its token count, capped at the text's width W):
    for g = ngram .. 1: the first window s < n - g with text[s : s + g] == text[n - g : n];
        the longest g found wins, and the drafts start at s + g (at 0 when none is found)
    tok[b] = [text[n - 1], text[start], .., text[start + K - 1]]   (indices clamped into the row)
    drafted[b] = min(K, n - start) if found else 0;  pos[b] = n - 1;  seqlens[b] = n + K

accept, one program a row, with chosen[b] the tokens chosen after each of tok[b]'s:
    accepted = the leading drafts tok[b, 1 + i] (i < drafted[b]) equal to chosen[b, i]
    emit = min(accepted + 1, limit - count[b]), 0 for a finished row; with eos ids, up to and
        including the first eos among the emitted (the row then finished)
    text[b, n : n + emit] = chosen[b, :emit];  n[b] += emit;  count[b] += emit
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt._backends import launch_pdl
from fastgpt.kernels.pdl import _wait_for_previous_grid
from fastgpt.kernels.sizes import next_power_of_2

BLOCK_S = 256  # windows a program compares at once
NUM_WARPS = 2


@triton.jit
def _draft_kernel(
    text_ptr,  # (B, W) int64, row stride stride_text: each row's tokens so far
    n_ptr,  # (B,) int64: how many
    tok_ptr,  # (B, K + 1) int64 contiguous, written: the row's last token, then K drafts (filler past drafted)
    pos_ptr,  # (B,) int64, written: n - 1, the last token's position
    drafted_ptr,  # (B,) int64, written: the real drafts
    seqlens_ptr,  # (B,) int32, written: n + K, the cache length the verification attends over
    W, K, ngram, stride_text,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _wait_for_previous_grid(PDL)
    b = tl.program_id(0).to(tl.int64)
    row = text_ptr + b * stride_text
    n = tl.minimum(tl.load(n_ptr + b), W)  # never read past the row
    start = n * 0  # where the drafts begin
    found = n < 0
    for g in range(ngram, 0, -1):  # the longest n-gram found wins
        first = n * 0 + W  # the first matching window; W: none
        for s0 in range(0, n - g, BLOCK_S):  # windows s < n - g: a token follows each
            s = s0 + tl.arange(0, BLOCK_S)
            hit = s < n - g
            for j in range(0, g):
                tail = tl.load(row + n - g + j)  # n > g inside this loop: in the row
                hit &= tl.load(row + s + j, mask=hit, other=-1) == tail
            first = tl.minimum(first, tl.min(tl.where(hit, s, W), axis=0))
        new = (first < W) & ~found
        start = tl.where(new, first + g, start)
        found |= new
    cols = tl.arange(0, BLOCK_K)
    src = tl.where(cols == 0, n - 1, start + cols - 1)
    src = tl.minimum(tl.maximum(src, 0), W - 1)
    tl.store(tok_ptr + b * (K + 1) + cols, tl.load(row + src, mask=cols <= K, other=0), mask=cols <= K)
    tl.store(pos_ptr + b, n - 1)
    tl.store(drafted_ptr + b, tl.where(found, tl.minimum(n - start, K), 0))
    tl.store(seqlens_ptr + b, (n + K).to(tl.int32))


@triton.jit
def _accept_kernel(
    chosen_ptr,  # (B, K + 1) int64 contiguous: the token chosen after each of the step's tokens
    tok_ptr,  # (B, K + 1) int64 contiguous: the step's tokens, drafts from column 1
    drafted_ptr,  # (B,) int64
    text_ptr,  # (B, W) int64, row stride stride_text: the emitted tokens are appended
    n_ptr, count_ptr,  # (B,) int64 each, advanced by the tokens emitted
    limit_ptr,  # (1,) int64: max_new_tokens, what count may reach
    finished_ptr,  # (B,) bool as uint8: read; written when HAS_EOS
    eos_ptr,  # (E,) int64 eos ids (-1 in unused slots), when HAS_EOS
    E, W, K, stride_text,
    HAS_EOS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    _wait_for_previous_grid(PDL)
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    chosen = tl.load(chosen_ptr + b * (K + 1) + cols, mask=cols <= K, other=-3)
    draft = tl.load(tok_ptr + b * (K + 1) + cols + 1, mask=cols < K, other=-2)  # draft i follows chosen i
    disagree = (cols >= tl.load(drafted_ptr + b)) | (draft != chosen)
    accepted = tl.min(tl.where(disagree, cols, K), axis=0)  # the leading run of agreeing drafts, at most K
    count = tl.load(count_ptr + b)
    done = tl.load(finished_ptr + b) != 0
    emit = tl.where(done, 0, tl.maximum(tl.minimum(accepted + 1, tl.load(limit_ptr) - count), 0))
    if HAS_EOS:
        eos = tl.load(eos_ptr + tl.arange(0, BLOCK_E), mask=tl.arange(0, BLOCK_E) < E, other=-1)
        is_eos = (tl.max((chosen[:, None] == eos[None, :]).to(tl.int32), axis=1) != 0) & (cols < emit)
        first = tl.min(tl.where(is_eos, cols, BLOCK_K), axis=0)
        emit = tl.where(first < BLOCK_K, first + 1, emit)
        tl.store(finished_ptr + b, (done | (first < BLOCK_K)).to(tl.uint8))
    n = tl.load(n_ptr + b)
    dst = n + cols
    tl.store(text_ptr + b * stride_text + dst, chosen, mask=(cols < emit) & (dst >= 0) & (dst < W))
    tl.store(n_ptr + b, n + emit)
    tl.store(count_ptr + b, count + emit)


def draft(text, n, tok, pos, drafted, seqlens, *, ngram: int) -> None:
    """The drafting (module docstring) for every row, one launch. text (B, W) int64 with a unit
    column stride; n, pos, drafted (B,) int64; tok (B, K + 1) int64; seqlens (B,) int32; all
    contiguous but text, on one device. ngram >= 1: the longest n-gram looked up (at most W - 1
    can match)."""
    B, W = text.shape
    K = tok.shape[1] - 1
    pdl = launch_pdl(text.device)
    _draft_kernel[(B,)](
        text, n, tok, pos, drafted, seqlens, W, K, min(ngram, W - 1), text.stride(0), BLOCK_S=BLOCK_S,
        BLOCK_K=next_power_of_2(K + 1), PDL=pdl, num_warps=NUM_WARPS, launch_pdl=pdl,
    )  # fmt: skip


def accept(chosen, tok, drafted, text, n, count, limit, finished, eos, *, has_eos: bool) -> None:
    """The acceptance (module docstring) for every row, one launch. chosen, tok (B, K + 1) int64
    contiguous; drafted, n, count (B,) int64 contiguous; text (B, W) int64 with a unit column
    stride; limit (1,) int64; finished (B,) bool; eos (E,) int64 (read when has_eos)."""
    B, W = text.shape
    K, E = tok.shape[1] - 1, eos.shape[0]
    pdl = launch_pdl(text.device)
    _accept_kernel[(B,)](
        chosen, tok, drafted, text, n, count, limit, finished.view(torch.uint8), eos, E, W, K, text.stride(0),
        HAS_EOS=has_eos, BLOCK_K=next_power_of_2(K + 1), BLOCK_E=max(1, next_power_of_2(E)), PDL=pdl,
        num_warps=1, launch_pdl=pdl,
    )  # fmt: skip
