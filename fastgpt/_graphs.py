"""Capturing a step of generation (a decode step, a prefill) in a CUDA graph, for fastgpt.decoder."""

from __future__ import annotations

import torch

from fastgpt import _backends

WARMUP_STEPS = 2  # eager steps before a capture: Triton compiles, cuBLAS plans


def capture(step, state: tuple[torch.Tensor, ...], generator: torch.Generator | None, cache,
            warmup: int = WARMUP_STEPS):
    """A CUDA graph of step() -> (graph, None), or (None, why the capture failed).

    step is first run `warmup` times on a side stream (kernels compile, libraries plan), then
    captured once; `state`, the tensors it updates, and the generator it draws from are put
    back as they were before the warm-up, whatever happens. The graph replays the draws from
    `generator`, advancing it as eager steps do (None: step draws nothing). The KV cache the
    step runs over (fastgpt.decoder.KVCache) is marked graphed meanwhile, so the warm-up and the
    capture pick the same kernels; a step over PDL_PLAIN_ROWS sequences or more (the cache's
    batch) launches its kernels plainly, its warm-up too (fastgpt/_backends.py: as programmatic
    dependents such a step is slower).
    """
    device = cache.kv.device
    saved, rng = [t.clone() for t in state], None if generator is None else generator.get_state()
    cache.graphed = True
    try:
        # On the cache's GPU, whichever is current: Triton launches on the current device, and
        # torch.cuda.graph's own capture stream is on the device of the process's first capture.
        plain = cache.kv.shape[2] >= _backends.PDL_PLAIN_ROWS  # kv (L, 2, B, H, S, D): B sequences
        with torch.cuda.device(device), _backends.plain_launches(plain):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream(device).wait_stream(stream)
            _restore(state, saved, generator, rng)
            graph = torch.cuda.CUDAGraph()
            if generator is not None:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph, stream=stream):
                step()
    except Exception as exc:  # a sync or an uncapturable op somewhere: the caller steps eagerly instead
        _restore(state, saved, generator, rng)
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        cache.graphed = False
    return graph, None


def _restore(state, saved, generator, rng):
    for t, value in zip(state, saved):
        t.copy_(value)
    if generator is not None:
        generator.set_state(rng)
