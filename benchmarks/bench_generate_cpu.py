"""fastgpt's generate vs transformers' generate on the CPU, side by side, on the same weights.

GPT-2 124M architecture with random weights, fp32, torch backend, batch 1, a 32-token prompt,
64 new tokens, greedy. Both run under torch.inference_mode with the same thread count; each is
warmed up once, then timed `--repeats` times (median). tok/s counts new tokens, prefill included.

    python benchmarks/bench_generate_cpu.py [--repeats 3] [--new-tokens 64] [--prompt 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

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
    results = {}
    for name, fn in (("fastgpt (torch backend)", run_fastgpt), (f"transformers ({hf.config._attn_implementation})", run_hf)):
        seconds, out = timed(fn, args.repeats)
        results[name] = out
        print(f"{name:32s} {seconds * 1e3:8.1f} ms   {args.batch * n / seconds:7.1f} tok/s")
    a, b = results.values()
    print("outputs identical:", bool(torch.equal(a, b)))


if __name__ == "__main__":
    main()
