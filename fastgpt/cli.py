"""The `fastgpt` command: generate | bench | info."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def info(args: argparse.Namespace) -> int:
    """Print versions, the GPU, and which backends are available here and why not."""
    from fastgpt import _backends
    from fastgpt.bench.env import package_version

    def version(package: str) -> str:
        return package_version(package) or "not installed"

    print(f"fastgpt       {version('fastgpt')}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for package in ("triton", "transformers"):
        print(f"{package:<13} {version(package)}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"gpu           {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print("gpu           none (CUDA is not available to torch)")
    print(f"default       backend={_backends.default_backend()} ({_backends.ENV_VAR})")
    for name, status in _backends.report().items():
        print(f"backend       {name:<7} {status}")
    print(f"pdl           {_backends.pdl_report()}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Load a GPT-2 checkpoint and its tokenizer, continue the prompt, print the text as it comes."""
    from fastgpt.generate import stream
    from fastgpt.loading import load_tokenizer
    from fastgpt.model import GPT

    _check_generate_args(args)
    device = _device(args.device)
    model = GPT.from_pretrained(args.model, dtype=args.dtype, device=device)  # the loader maps dtype names
    model.persistent_decode = args.persistent_decode
    tokenizer = load_tokenizer(args.model)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    idx = torch.tensor([tokenizer.encode(args.prompt).ids], dtype=torch.long, device=device)

    eos = None if args.ignore_eos else model.eos_token_id  # an int, a list of ints, or None
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    print(args.prompt, end="", flush=True)
    new_ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    for token in stream(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, eos_token_id=eos, generator=generator,
                        compile=args.compile, prompt_lookup_num_tokens=args.prompt_lookup):
        token_id = int(token[0])
        if token_id in stop:
            break
        new_ids.append(token_id)
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    elapsed = time.perf_counter() - start
    print()
    if args.stats:
        print(f"[{len(new_ids)} tokens in {elapsed:.2f} s: {len(new_ids) / elapsed:.1f} tok/s on {device}]",
              file=sys.stderr)
    return 0


def _check_generate_args(args: argparse.Namespace) -> None:
    """What can be checked before the model loads (perhaps downloads), by generate's own rules."""
    from fastgpt.ops.sampling import row_params

    row_params(1, "cpu", args.temperature, args.top_k, args.top_p, args.min_p)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prompt_lookup < 0:
        raise ValueError(f"--prompt-lookup must be >= 0, got {args.prompt_lookup}")
    if args.prompt_lookup and args.compile:
        raise ValueError("--compile does not apply to --prompt-lookup, whose steps run uncompiled: "
                         "pass one or the other")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:  # torch.Generator's range
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")


def _device(name: str | None) -> torch.device:
    """--device, checked: cpu, or cuda[:index] where torch has CUDA; None picks cuda when it can."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a GPT-2 checkpoint")
    gen.add_argument("--model", default="gpt2", help="checkpoint directory or hub id (default: gpt2)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    gen.add_argument("--stats", action="store_true", help="print tokens/s at the end")
    gen.add_argument("--compile", action="store_true",
                     help="run the decode forward through torch.compile (the first tokens wait for it)")
    gen.add_argument("--persistent-decode", action="store_true",
                     help="decode steps as one persistent kernel where it can run (GPT.persistent_decode: "
                          "triton, up to 8 rows; not yet measured on a GPU)")
    gen.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                     help="draft up to K tokens a step from the text so far and verify them in one forward "
                          "(prompt-lookup decoding: the same tokens, fewer steps where text repeats; default 0: off)")
    gen.set_defaults(func=generate)

    from fastgpt import bench

    bench_parser = sub.add_parser("bench", help="benchmark the kernels against PyTorch / Hugging Face")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.run)

    sub.add_parser("info", help="versions, GPU and available backends").set_defaults(func=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a bad argument or an unavailable backend prints one line and exits 2,
    Ctrl-C one line and 130."""
    from fastgpt import BackendUnavailableError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, BackendUnavailableError) as exc:
        print(f"\nfastgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
        print(f"\nfastgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
