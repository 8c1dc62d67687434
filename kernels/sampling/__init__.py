"""Sort-free fused sampling in Triton: temperature, top-k, top-p, min-p, greedy.

Per row, over the vocabulary in blocks (the row is re-read from L2 on every pass):

1. Clean the logits (fastgpt.reference.clean_logits: NaN is -inf; a row holding +inf keeps only
   its +inf entries, as equal logits). Greedy rows (temperature <= 0, or NaN) return the first
   index of the maximum and stop here.
2. Scores s = x / t, divided with IEEE rounding exactly as torch does, so ties and order match.
   Where the largest score overflows to +inf, only the entries equal to the row's largest logit
   keep any probability (reference.top_ties_if_overflow): they score 0, the rest -inf.
3. Top-k: the k-th largest score t_k, searched over the order-preserving int32 keys of the
   scores as the largest key T with count(key >= T) >= k; ties with the k-th value are kept.
4. Top-p: Hugging Face sorts the survivors ascending and removes those whose cumulative
   probability is <= 1 - top_p (always keeping the top token). For distinct scores the removed
   set is {key < T}, T the largest key with mass(key < T) <= (1 - top_p) * Z, searched likewise.
   Where a group of G ties (each of mass e) straddles the boundary, HF removes the r of them its
   sort puts first, r = floor(((1 - top_p) * Z - mass(key < T)) / e): which r depends on the
   order its sort gives the ties. The kernels keep the whole group, each member's score raised by
   log((G - r) / G) in the draw, so that the group carries the mass HF keeps of it
   (reference.draw_scores; common._tie_weight).
5. Min-p: remove p < min_p * p_max, i.e. exp(s - max) < min_p.
6. Draw by Gumbel-max over the kept set, argmax(s + g) with g = -log(-log(u)), u from 32 bits of
   Philox (tl.randint(seed, row * V + col)), fine near 0 and 1 (common._gumbel_of_bits: g spans
   [-3.13, 22.87]), so a draw depends only on the device seed: reproducible, no host sync,
   capturable in a CUDA graph.

Probabilities use fp32 exp, and sums run in a different order than torch's softmax + cumsum: a
token whose cumulative mass sits that close to 1 - top_p (fp32 sums over V terms drift by up to
~1e-4 relative at V ~ 10^5; the GPU tests allow that margin), or whose probability sits within an
ulp of min_p * p_max, may be kept here and removed by the reference, or the reverse.

Three paths, chosen by the launcher from what the host knows: the caller's bound on top_k, B, V
and the SM count (no device value is read, so every choice is capturable):

- The candidate path (candidates.py) when every row's top_k is bounded below CAND_MAX_K by the
  caller (top_k_bound): each row's k-th best bounded from below, then each chunk's entries
  above the bound (sorting networks where there are more than the list), no search over the
  row; 4 launches (2 in its sorted form, below CAND_BOUND_MIN_ROWS rows). Measured below.

Otherwise:

- One program per row (row.py, 1 launch) unless a row would split into at least
  _MIN_SPLIT_CHUNKS chunks (B below ~1/4 of the SM count on 1024-entry chunks), or when
  V <= 1024 or V > 2^24. Its searches test NUM_PIVOTS pivot keys per pass over the row until
  the answer is pinned down: a data-dependent number of passes inside one program.
- Split (split.py), for smaller batches: every pass runs over a (B, C) grid, program (b, c) on
  chunk c of row b (C <= MAX_CHUNKS, and as the launcher picks it <= V / 1024 rounded up; the
  tests' num_chunks hook may cut shorter chunks), so one row spreads over the GPU. The searches
  are radix selects, one key byte per launch: 8 launches of _split_search_kernel (4 count for
  top-k, 4 sum top-p's masses), then _split_draw_kernel (each chunk's max of s + g and its first
  index) and _split_token_kernel over (B,) (the first chunk holding the row's max): 10 launches,
  9 for kept_mask, fixed by the shapes, so capturable. Bytes, not pivots: 4 fixed passes pin a
  32-bit key exactly (16 pivots would need 8) and tl.histogram counts 256 bins cheaply. Each
  launch sums the previous one's per-chunk histograms in every program, in one fixed order: no
  grid-wide sync, no float atomics, the same tokens for the same seed run after run. Counts are
  exact (fp32 integers, V <= 2^24); masses are fp32 sums in another order than the one-program
  path's, so at a top-p rounding boundary (as against torch above) the paths may keep different
  sets; wherever the kept sets agree the tokens agree to the bit (same scores, noise and
  first-index tie break). A row whose top score is +inf (+inf logits, or an overflowing x / t)
  skips the top-p search and its top-k result is ignored: its kept set is the entries tied at
  its largest logit whatever k, p and min-p.

Measured on an H200 (fp32 logits, V 50257, t 0.8, top-k 50, top-p 0.9, device time under CUDA-graph
replay, scripts/gpu-probe.py, 2026-11-28): B1 split (32 chunks) 182 us vs one program per row
492 us; B32 split (9 chunks) 586 us vs 717 us; B256 split (2 chunks) 3420 us vs 1062 us. Short
chunks pay; a few long ones do not (each of their passes is a long serial loop per program), so
the split path needs _MIN_SPLIT_CHUNKS chunks a row. Both paths are far from bandwidth-bound
(51 MB of logits at B256 read 10 times is ~0.12 ms at 4.1 TB/s): the searches are the hot spot.
"""

from __future__ import annotations

import torch

from fastgpt._backends import SAMPLE_CANDIDATE_MAX_K, launch_pdl, sample_candidate_k, sm_count
from fastgpt.kernels.sampling.candidates import (_candidate_draw_kernel, _candidates_kernel, _group_max_kernel,
                                                 _key_bound_kernel)  # fmt: skip
from fastgpt.kernels.sampling.row import _sample_kernel
from fastgpt.kernels.sampling.split import _split_draw_kernel, _split_search_kernel, _split_token_kernel
from fastgpt.kernels.sizes import cdiv, next_power_of_2

MAX_BLOCK_V = 1024  # vocabulary block per loop step on the split path
NUM_PIVOTS = 16  # keys tested per search pass: the interval shrinks ~17x per pass
NUM_WARPS = 8
# One program per row: each of its ~15 passes over the row is a serial loop whose steps wait on
# their loads (1024-entry blocks on 8 warps: 492 us at B1 on the H200, ~0.6 us a step). Larger
# blocks keep more loads in flight per step, in fewer steps, as far as the registers allow: by
# ptxas (sm_80 and sm_90), fp32 logits in 4096-entry blocks on 32 warps fit 64 registers (12
# bytes of spills on sm_80 at V 128k, none on sm_90): chosen from that, not yet measured
# (gpu-probe's sample_blocks sweeps it). 16-bit logits spill ~1.2 KB a thread there, and up to
# 124 bytes in 2048-entry blocks on 8 warps: they keep the measured 1024 on 8.
ROW_BLOCK_V = {4: 4096, 2: 1024}  # by the logits' element size
ROW_WARPS = {4: 32, 2: 8}
# The candidate path's tiles: picked by ptxas (no spills on sm_80/sm_90) and instruction counts,
# not yet timed (gpu-probe's sample_cand sweeps them).
CAND_MAX_K = SAMPLE_CANDIDATE_MAX_K  # top_k bounds below this take the candidate path (lists of 16..256)
CAND_BLOCK = 1024  # vocabulary entries per program of its first kernel (at least 4 x cand_k)
CAND_WARPS = 4  # (4 warps: ~3.3k instructions a thread for tl.topk of 64 out of 1024 int64)
MERGE_BLOCK = 2048  # candidates per step of its second kernel's merge
MERGE_WARPS = 8
# From this many rows the candidate path first bounds each row's k-th best score from below
# (by its groups' maxima), so that a chunk keeps the few entries at or above the bound by a
# prefix sum instead of sorting 1024 (tl.topk: ~410 instructions an entry on 4 warps, which
# makes the first kernel compute-bound at large B). Two launches more (group maxima, per-row
# bounds), and still the faster at every B measured on an H200 (V 50257, fp32, top-k 50, top-p
# 0.9, graph replay, gpu-probe's sample_batch of 2026-11-30): 16 us against the sorted chunks'
# 37 at B1, 25 against 94 at B32, 86 against 519 at B256. The sorted form stays for the tests
# and the probe (set this past B).
CAND_BOUND_MIN_ROWS = 1
CAND_GROUP = 64  # entries per group maximum (a row of 50257 has 786 groups)
CAND_LIST = 512  # a row's entries at or above its bound, appended to one list when they fit
MAX_CHUNKS = 32  # most vocabulary chunks per row on the split path (each program sums 32 x 256 partials)
MAX_SPLIT_V = 1 << 24  # the split path's fp32 counts are exact up to here; longer rows take one program
MASS_BLOCK = 256  # the top-p masses' one-hot product stages 2 x 16 x MASS_BLOCK fp32 in shared memory
_MIN_CHUNK = 1024  # fewest vocabulary entries per chunk
_PROGRAMS_PER_SM = 2  # split rows until the grid covers the GPU about this many times
_MIN_SPLIT_CHUNKS = 8  # fewer chunks a row: one program per row (measured: 9 chunks win, 2 lose)
_INTERPRETER_SMS = 4  # a pretend SM count on CPU tensors


def split_chunks(B: int, V: int, num_sms: int, min_chunks: int = _MIN_SPLIT_CHUNKS) -> int:
    """Vocabulary chunks per row on the split path: enough that B * chunks programs cover the
    GPU ~_PROGRAMS_PER_SM times, none shorter than _MIN_CHUNK, at most MAX_CHUNKS; 1 means one
    program per row, also when fewer than min_chunks would do. From shapes and the SM count only
    (no host sync: capturable)."""
    if V > MAX_SPLIT_V:
        return 1
    chunks = min(cdiv(_PROGRAMS_PER_SM * num_sms, B), cdiv(V, _MIN_CHUNK), MAX_CHUNKS)
    return chunks if chunks >= min_chunks else 1


def _warps(block: int, most: int = NUM_WARPS) -> int:
    return max(1, min(most, block // 128))


def _launch_split(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, num_chunks):
    """The split path: 8 search launches and 1 draw over a (B, C) grid, then the token kernel
    over (B,) (none for the kept set): a fixed sequence, decided by shapes only."""
    B, V = logits.shape
    chunk = cdiv(cdiv(V, min(num_chunks, MAX_CHUNKS)), 16) * 16  # 16-aligned chunks
    C = cdiv(V, chunk)

    def scratch(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=logits.device)

    part_max, part_idx = scratch(B, C), scratch(B, C, dtype=torch.int32)
    hist = [scratch(B, C, 256), scratch(B, C, 256)]  # stage j writes hist[j % 2], reads the other
    state = scratch(B, 8, 4, dtype=torch.float64)
    draws = (1,) if write_mask else (B, C)  # unused by the kept-set variant
    part_z, part_zi = scratch(*draws), scratch(*draws, dtype=torch.int32)
    block = min(MAX_BLOCK_V, next_power_of_2(chunk))
    warps = max(4, _warps(block))  # 4 warps at least for the (MAX_CHUNKS, 256) sums
    pdl = launch_pdl(logits.device)
    for stage in range(8):  # counts by blocks of `block`, masses by blocks of MASS_BLOCK
        counts = stage < 4
        _split_search_kernel[(B, C)](
            logits, temperature, top_k, top_p, part_max, part_idx, hist[1 - stage % 2], hist[stage % 2],
            state, logits.stride(0), chunk, C, V=V, STAGE=stage, BLOCK_V=block if counts else min(MASS_BLOCK, block),
            MAX_CHUNKS=MAX_CHUNKS, PDL=pdl, num_warps=warps if counts else 4, launch_pdl=pdl)  # fmt: skip
    _split_draw_kernel[(B, C)](
        logits, temperature, top_p, min_p, seed, part_max, part_idx, hist[1], state, out, part_z, part_zi,
        logits.stride(0), chunk, C, V=V, WRITE_MASK=write_mask, BLOCK_V=block, MAX_CHUNKS=MAX_CHUNKS, PDL=pdl,
        num_warps=warps, launch_pdl=pdl)  # fmt: skip
    if not write_mask:
        _split_token_kernel[(B,)](temperature, part_max, part_idx, part_z, part_zi, out, C, V=V,
                                  MAX_CHUNKS=MAX_CHUNKS, PDL=pdl, num_warps=1, launch_pdl=pdl)  # fmt: skip
    return out


def _candidate_block(V: int, cand_k: int) -> int:
    """Vocabulary entries per chunk on the candidate path."""
    return max(4 * cand_k, CAND_GROUP, min(CAND_BLOCK, next_power_of_2(V)))


def key_bounds(logits, temperature, top_k, cand_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32: per row the k-th largest of its CAND_GROUP-entry groups' maximum keys, k its
    top_k, or KEY_MIN where top_k is off, >= cand_k or above the number of groups (2 launches);
    and (B,) int32 zeros, the counts of the rows' lists."""
    B, V = logits.shape
    block = _candidate_block(V, cand_k)
    C = cdiv(V, block)
    groups = C * (block // CAND_GROUP)
    gmax = torch.empty((B, groups), dtype=torch.int32, device=logits.device)
    bound, count = torch.empty((2, B), dtype=torch.int32, device=logits.device)
    pdl = launch_pdl(logits.device)
    _group_max_kernel[(B * C,)](logits, temperature, gmax, logits.stride(0), V=V, BLOCK=block, GROUP=CAND_GROUP,
                                PDL=pdl, num_warps=_warps(block, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    block_g = max(cand_k, min(MERGE_BLOCK, next_power_of_2(groups)))
    _key_bound_kernel[(B,)](gmax, top_k, bound, count, groups, CAND_K=cand_k, BLOCK_G=block_g, PDL=pdl,
                            num_warps=_warps(block_g, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    return bound, count


def _launch_candidates(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, cand_k: int):
    """The candidate path: each chunk's best cand_k entries, then per row the draw from their
    best: 2 launches; from CAND_BOUND_MIN_ROWS rows, each row's bound first: 4."""
    B, V = logits.shape
    block = _candidate_block(V, cand_k)
    C = cdiv(V, block)
    cands = torch.empty((B, C, cand_k), dtype=torch.int64, device=logits.device)
    bounded = B >= CAND_BOUND_MIN_ROWS
    list_len = max(cand_k, min(CAND_LIST, next_power_of_2(C * cand_k)))  # no longer than the chunks' lists
    bound = count = row_list = cands  # unread unless bounded
    pdl = launch_pdl(logits.device)
    if bounded:
        bound, count = key_bounds(logits, temperature, top_k, cand_k)
        row_list = torch.empty((B, list_len), dtype=torch.int64, device=logits.device)
    _candidates_kernel[(B * C,)](
        logits, temperature, bound, cands, count, row_list, logits.stride(0), V=V, CAND_K=cand_k, BLOCK=block,
        BOUNDED=bounded, LIST=list_len, PDL=pdl, num_warps=_warps(block, CAND_WARPS), launch_pdl=pdl)  # fmt: skip
    if write_mask:
        out.zero_()  # the draw kernel marks the kept entries (or, on uncovered rows, writes all)
    merge = max(cand_k, min(MERGE_BLOCK, next_power_of_2(C * cand_k)))
    row_block = min(MAX_BLOCK_V, next_power_of_2(V))
    _candidate_draw_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, seed, cands, count, row_list, out, logits.stride(0), C * cand_k, V=V,
        WRITE_MASK=write_mask, CAND_K=cand_k, MERGE_BLOCK=merge, BOUNDED=bounded, LIST=list_len, BLOCK_V=row_block,
        NUM_PIVOTS=NUM_PIVOTS, PDL=pdl, num_warps=MERGE_WARPS, launch_pdl=pdl)  # fmt: skip
    return out


def _launch(logits, temperature, top_k, top_p, min_p, seed, out, write_mask: bool, num_chunks, top_k_bound):
    B, V = logits.shape
    cand_k = sample_candidate_k(top_k_bound)
    if num_chunks is None and cand_k:
        return _launch_candidates(logits, temperature, top_k, top_p, min_p, seed, out, write_mask, cand_k)
    if num_chunks is None:
        sms = sm_count(logits.device.index) if logits.is_cuda else _INTERPRETER_SMS
        num_chunks = split_chunks(B, V, sms)
        num_chunks = 0 if num_chunks == 1 else num_chunks
    if num_chunks > 0 and V <= MAX_SPLIT_V:
        return _launch_split(logits, temperature, top_k, top_p, min_p, seed, out, write_mask, num_chunks)
    size = logits.element_size()
    block_v = min(ROW_BLOCK_V[size], next_power_of_2(V))
    pdl = launch_pdl(logits.device)
    _sample_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, seed, out, logits.stride(0), V=V,
        WRITE_MASK=write_mask, BLOCK_V=block_v, NUM_PIVOTS=NUM_PIVOTS, PDL=pdl,
        num_warps=_warps(block_v, ROW_WARPS[size]), launch_pdl=pdl,
    )  # fmt: skip
    return out


def sample(logits, temperature, top_k, top_p, min_p, seed, *, top_k_bound=0, num_chunks=None) -> torch.Tensor:
    """Draw one token per row: greedy where temperature <= 0, else from softmax of the kept set.

    logits: (B, V) fp32/bf16/fp16 with logits.stride(1) == 1. temperature: (B,) fp32. top_k:
    (B,) int64 (0 = off). top_p: (B,) fp64 (1.0 = off). min_p: (B,) fp32 (0 = off). seed: (1,)
    int64, on the device. Returns int64 (B,) token ids, always in [0, V).

    top_k_bound: what the caller knows of top_k without reading the device: every row's top_k is
    in [1, top_k_bound] (0: unknown). A bound below CAND_MAX_K takes the candidate path; rows
    that break it are still drawn right, by a slow path inside it. num_chunks (tests): 0 forces
    one program per row, n >= 1 the split path with n chunks (capped); None decides from the
    bound, the shapes and the SM count.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, False, num_chunks, top_k_bound)


def kept_mask(logits, temperature, top_k, top_p, min_p, *, top_k_bound=0, num_chunks=None) -> torch.Tensor:
    """The set `sample` draws from, for tests: bool (B, V), True where a token may be drawn.

    Same inputs as `sample` (no seed). Equals reference.filter_logits(clean_logits(logits), ...)
    != -inf, up to the documented top-p tie and rounding cases; a greedy row marks its argmax.
    """
    out = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
    seed = torch.zeros(1, dtype=torch.int64, device=logits.device)  # unread
    return _launch(logits, temperature, top_k, top_p, min_p, seed, out, True, num_chunks, top_k_bound)
