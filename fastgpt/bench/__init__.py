"""`fastgpt bench`: every kernel against the implementations people use, on this machine.

    fastgpt bench [attention|decode|layernorm|sampling|generate|all] [--quick] [--shapes ...]
                  [--dtype bf16|fp16|fp32] [--json PATH] [--csv PATH] [--plot PATH]

Ceilings (copy GB/s, matmul TFLOP/s) are measured first; each case reports ms (median, p20,
p80), TFLOP/s or GB/s from a formula in `formulas`, % of the ceiling, and the speedup over each
reference. Candidates are checked against fastgpt.reference before they are timed. Without a
CUDA GPU only the generate comparison runs (on the CPU) and the rest is reported as skipped.

Entry points: `add_arguments(parser)` + `run(args) -> int` (what `fastgpt bench` calls), and
`main(argv) -> int` (`python -m fastgpt.bench`). Importing this package is cheap: the harness
loads on first use.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """Add the `fastgpt bench` options to an argparse parser (or subparser)."""
    from fastgpt.bench.runner import add_arguments as _add

    _add(parser)


def run(args) -> int:
    """Run the benchmarks selected by parsed `args`; returns the exit status (0 unless a fastgpt
    candidate gave a wrong result or raised)."""
    from fastgpt.bench.runner import run as _run

    return _run(args)


def main(argv: list[str] | None = None) -> int:
    """`fastgpt bench` with `argv` (default: sys.argv[1:]): the CLI's parser, and its one-line errors."""
    import sys

    from fastgpt.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
