"""fastgpt's generate vs transformers' generate on the CPU, side by side, on the same weights.

GPT-2 124M architecture with random weights, fp32, torch backend, batch 1, a 32-token prompt,
64 new tokens, greedy. Both run under torch.inference_mode with the same thread count; each is
warmed up once, then the two are timed alternately `--repeats` times (median and best reported),
so a busy machine slows both alike. tok/s counts new tokens, prefill included.

    python benchmarks/bench_generate_cpu.py [--repeats 3] [--new-tokens 64] [--prompt 32] [--batch 1] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed_side_by_side(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds per call of each function, runs interleaved (A B A B ...) so that a change in the
    machine's load hits both alike; each warmed up once. Returns ({name: [seconds]}, {name: output})."""
    outputs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastgpt.model import GPT

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # gpt2 (124M) shapes, random weights, fp32
    model = GPT.from_hf(hf)
    model.backend = "torch"
    idx = torch.randint(0, hf.config.vocab_size, (args.batch, args.prompt))
    n = args.new_tokens

    def run_fastgpt():
        return model.generate(idx, n)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=hf.config.eos_token_id)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"GPT-2 124M (random weights), fp32, B={args.batch}, prompt {args.prompt}, {n} new tokens, greedy")
    fns = {"fastgpt (torch backend)": run_fastgpt, f"transformers ({hf.config._attn_implementation})": run_hf}
    times, outputs = timed_side_by_side(fns, args.repeats)
    print(f"{'':32s} {'median ms':>10s} {'tok/s':>8s}   {'best ms':>8s} {'tok/s':>8s}   ({args.repeats} runs)")
    for name, seconds in times.items():
        median, best = statistics.median(seconds), min(seconds)
        print(f"{name:32s} {median * 1e3:10.1f} {args.batch * n / median:8.1f}   {best * 1e3:8.1f} {args.batch * n / best:8.1f}")
    a, b = outputs.values()
    print("outputs identical:", bool(torch.equal(a, b)))


if __name__ == "__main__":
    main()
