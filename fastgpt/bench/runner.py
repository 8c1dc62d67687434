"""`fastgpt bench`: the options, and the run (ceilings, kernel cases, generate, report)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

OPS = ("attention", "decode", "layernorm", "sampling", "generate")
MODEL_CONFIGS = ("gpt2", "tiny")  # fastgpt.bench.cases.generate.MODEL_CONFIGS (kept light to import)
NO_GPU = ("No CUDA GPU here: the kernel benchmarks ({ops}) need one and were skipped. "
          "What runs on this machine is the generate comparison on the CPU.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastgpt bench` (no heavy imports: the CLI builds this for every command)."""
    parser.add_argument("ops", nargs="*", metavar="OP",
                        help=f"what to run: {', '.join(OPS)} or all (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a few representative shapes and short timing budgets (minutes, not hours)")
    parser.add_argument("--shapes", action="append", metavar="SPEC",
                        help="shapes for a single op, e.g. 'B=16,H=12,S=1024,D=64' (repeat the option, or "
                             "separate specs with ';'). Keys: attention B H HKV S SK D causal PAD; decode B H HKV L D; "
                             "layernorm M N residual; sampling B V T K P MINP; generate B T N")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="input dtype (default: bf16 kernels, fp32 sampling logits, bf16 generate on a GPU, "
                             "fp32 on a CPU)")
    parser.add_argument("--json", metavar="PATH", help="write the records as JSON (rewritten after each op)")
    parser.add_argument("--csv", metavar="PATH", help="write the records as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="PNG plots of the sweeps: a .png file (one panel per sweep) or a directory")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available (default)")
    parser.add_argument("--model-config", choices=MODEL_CONFIGS, default="gpt2",
                        help="generate: gpt2 (GPT-2 124M architecture, random weights; default) or tiny")
    parser.add_argument("--impl", metavar="REGEX", help="only the implementations whose label matches REGEX")
    parser.add_argument("--time-limit", type=seconds, metavar="SECONDS",
                        help="stop starting new cases after this long; the rest is reported as skipped")
    parser.add_argument("--budget", type=seconds, metavar="SECONDS",
                        help="timing budget per candidate (default: 1 s, 0.25 s with --quick; generate x5)")


class UsageError(ValueError):
    """A bad combination of options: reported, exit status 2."""


def seconds(text: str) -> float:
    """The argparse type of --budget and --time-limit: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def selected_ops(args) -> list[str]:
    """The ops to run, in the canonical order."""
    names = [n.lower() for n in (args.ops or ["all"])]
    bad = [n for n in names if n not in OPS + ("all",)]
    if bad:
        raise UsageError(f"unknown op(s) {bad}: choose from {', '.join(OPS)} or all")
    return list(OPS) if "all" in names else [op for op in OPS if op in names]


def shape_specs(args, ops: list[str]) -> list[str] | None:
    """The --shapes specs, split on ';'; they need exactly one op."""
    if not args.shapes:
        return None
    specs = [s.strip() for item in args.shapes for s in item.split(";") if s.strip()]
    if len(ops) != 1:
        raise UsageError("--shapes applies to exactly one op (e.g. `fastgpt bench attention --shapes ...`)")
    if not specs:
        raise UsageError(f"--shapes {';'.join(args.shapes)!r} holds no spec (e.g. 'B=16,H=12,S=1024,D=64')")
    check_specs(ops[0], specs, args.model_config)
    return specs


def check_specs(op: str, specs: list[str], model_config: str) -> None:
    """Parse the specs now, not after the ceilings (or, without a GPU, never): keys, value types and
    sizes (parse_spec) for every op; for generate, T + N within the model's context."""
    from fastgpt.bench.cases import generate as gen
    from fastgpt.bench.cases import op_module, parse_spec

    module = gen if op == "generate" else op_module(op)
    try:
        for spec in specs:
            params = parse_spec(spec, module.KEYS, module.POSITIVE)
            if op == "generate":
                gen.check_params(params, model_config)
    except ValueError as exc:
        raise UsageError(f"--shapes: {exc}") from exc


def check_outputs(args) -> None:
    """--json, --csv and --plot paths that could not be written, refused before anything is measured."""
    for option, value in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if not value:
            continue
        path = Path(value)
        wants_dir = option == "--plot" and path.suffix.lower() != ".png"  # plots: a .png file or a directory
        if path.exists() and path.is_dir() != wants_dir:
            raise UsageError(f"{option} {value} is a {'file' if wants_dir else 'directory'}: "
                             f"expected a {'directory' if wants_dir else 'file'}")
        blocking = next(parent for parent in path.parents if parent.exists())
        if not blocking.is_dir():
            raise UsageError(f"{option} {value}: {blocking} is a file, not a directory")


def settings_for(args, ceilings: dict, deadline: float | None = None):
    """Timing budgets from --quick / --budget, the ceilings, the --impl filter, the deadline."""
    from fastgpt.bench.core import Settings

    quick = bool(args.quick)
    budget_s = args.budget if args.budget is not None else (0.25 if quick else 1.0)
    pattern = re.compile(args.impl) if args.impl else None
    return Settings(budget_ms=budget_s * 1e3, min_runs=10 if quick else 20, max_runs=200 if quick else 1000,
                    ceilings=ceilings, deadline=deadline,
                    impl_filter=(lambda label: bool(pattern.search(label))) if pattern else (lambda label: True))


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available to torch here")
    return torch.device(name)


def make_console():
    """A rich console; when not a terminal (CI logs, the GPU check), wide enough for the tables."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=180)


def run(args) -> int:
    """Run `fastgpt bench`: 0 when done, 1 if a fastgpt candidate was wrong or raised, 2 on bad options."""
    console = make_console()
    try:
        ops = selected_ops(args)
        specs = shape_specs(args, ops)
        device = pick_device(args.device)
        check_outputs(args)
        if args.impl:
            re.compile(args.impl)
    except (UsageError, re.error) as exc:
        console.print(f"fastgpt bench: error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    from fastgpt.bench.session import Session

    session = Session(args, console, device, ops, specs)
    session.start()
    session.run_kernels()
    if "generate" in ops:
        session.run_generate()
    return session.finish()

