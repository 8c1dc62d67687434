"""One `fastgpt bench` run: the environment, the ceilings, the records, and the outputs."""

from __future__ import annotations

import dataclasses
import gc
import time

import torch
from rich.markup import escape

from fastgpt.bench import ceilings, report
from fastgpt.bench.cases import DTYPES, KERNEL_OPS, build_cases, parse_spec
from fastgpt.bench.core import SKIPPED, Unavailable, empty_record, free_cached_memory, is_fastgpt_failure, run_case
from fastgpt.bench.env import environment
from fastgpt.bench.runner import NO_GPU, settings_for


def progress_bar(console):
    """A transient progress bar over cases (silent when the output is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _free(device: torch.device) -> None:
    gc.collect()
    free_cached_memory(device)


def _shared(settings, deadline: float | None, parts_left: int):
    """settings with an even share of the time left to `deadline` (None: no limit) for the next of
    parts_left parts: what a part leaves unused goes to the ones after it."""
    if deadline is None:
        return settings
    now = time.monotonic()
    return dataclasses.replace(settings, deadline=now + max(0.0, deadline - now) / parts_left)


class Session:
    """Holds what one run has measured so far; writes JSON/CSV after each op."""

    def __init__(self, args, console, device: torch.device, ops: list[str], specs: list[str] | None):
        self.args, self.console, self.device, self.ops, self.specs = args, console, device, ops, specs
        self.quick = bool(args.quick)
        limit = getattr(args, "time_limit", None)
        self.deadline = time.monotonic() + limit if limit else None
        # With generate selected too, the kernel cases get half the time limit.
        share = 0.5 if "generate" in ops else 1.0
        self.kernel_deadline = time.monotonic() + share * limit if limit else None
        self.env = environment(device)
        self.ceilings: dict = {}  # filled by start(); the settings hold this same dict
        self.records: list[dict] = []
        self.settings = settings_for(args, self.ceilings, self.kernel_deadline)  # the kernel cases

    def add(self, records: list[dict]) -> None:
        """Keep records, each stamped with the environment (device, versions, git sha, date)."""
        self.records.extend({**rec, **self.env} for rec in records)

    def start(self) -> None:
        """Print the header and measure the ceilings first."""
        env = self.env
        dirty = " (dirty tree)" if env["git_dirty"] else ""
        self.console.print(f"[bold]fastgpt bench[/] on {escape(env['gpu'])} | torch {env['torch']} | triton {env['triton']} "
                           f"| CUDA {env['cuda']} | git {env['git_sha'][:10]}{dirty} | {env['date']}")
        try:
            with self.console.status("measuring the ceilings (copy GB/s, matmul TFLOP/s)"):
                values, records = ceilings.measure(self.device, self.quick)
            self.ceilings.update(values)
        except Exception as exc:  # out of memory on a small card: go on without percentages
            self.console.print(f"[yellow]ceilings not measured ({escape(str(exc))}); no % of ceiling[/]")
            records = []
        self.add(records)
        if self.ceilings:
            self.console.print(f"ceilings: copy {self.ceilings['copy_gbps']:,.4g} GB/s (read + write), "
                               f"read {self.ceilings['read_gbps']:,.4g} GB/s, "
                               f"matmul {self.ceilings['matmul_tflops']:,.4g} TFLOP/s")

    def _skip(self, op: str, reason: str, case: str = "-") -> None:
        self.add([empty_record(op=op, case=case, implementation=f"{op} (all)", status=SKIPPED, reason=reason)])

    def run_kernels(self) -> None:
        """Every case of the selected kernel ops; on a machine without CUDA, say so and skip."""
        ops = [op for op in self.ops if op in KERNEL_OPS]
        if not ops:
            return
        if self.device.type != "cuda":
            self.console.print(f"[yellow]{NO_GPU.format(ops=', '.join(ops))}[/]")
            for op in ops:
                self._skip(op, "needs a CUDA GPU")
            self.save()
            return
        dtype = DTYPES.get(self.args.dtype) if self.args.dtype else None
        cases = [case for op in ops for case in build_cases(op, self.device, dtype, self.quick, self.specs)]
        with progress_bar(self.console) as bar:
            task = bar.add_task("kernels", total=len(cases))
            settings = self.settings
            for i, case in enumerate(cases):
                if i == 0 or cases[i - 1].op != case.op:
                    settings = self._op_settings(len({c.op for c in cases[i:]}))
                if settings.out_of_time():
                    self._skip(case.op, "not started: --time-limit reached", case.name)
                else:
                    self.add(run_case(case, self.device, settings,
                                      on_step=lambda text: bar.update(task, description=escape(text))))
                _free(self.device)
                bar.advance(task)
                self.save()

    def _op_settings(self, ops_left: int):
        """The settings for the next kernel op's cases: with --time-limit, an even share of the
        kernel time left (an op done early leaves the rest of its share to the next), so that a
        short run measures every op's first cases rather than the first op's all."""
        return _shared(self.settings, self.kernel_deadline, ops_left)

    def run_generate(self) -> None:
        """The end-to-end comparison: GPU or CPU, whatever this machine has."""
        from fastgpt.bench import formulas
        from fastgpt.bench.cases import generate as gen

        dtype = DTYPES[self.args.dtype] if self.args.dtype else gen.default_dtype(self.device)
        plan = ([parse_spec(s, gen.KEYS, gen.POSITIVE) for s in self.specs] if self.specs
                else gen.shapes(self.quick, self.device))  # fmt: skip
        config = self.args.model_config
        try:
            with self.console.status(f"building {config} with random weights on {self.device.type}"):
                hf = gen.build_hf(config, self.device, dtype)
                oracle = gen.hf_variant(hf, "eager", torch.float32)
        except Unavailable as exc:
            self._skip("generate", str(exc))
            return
        settings = dataclasses.replace(self.settings, budget_ms=5 * self.settings.budget_ms, deadline=self.deadline)
        weight_nbytes = formulas.weight_bytes(hf)
        cases = [gen.make_case(p, hf, oracle, self.device, dtype, config) for p in plan]
        with progress_bar(self.console) as bar:
            task = bar.add_task("generate", total=len(cases))
            for i, case in enumerate(cases):  # each with an even share of the time left, as the kernel ops
                self.add(gen.run_case(case, self.device, _shared(settings, self.deadline, len(cases) - i),
                                      weight_nbytes, self.quick,
                                      on_step=lambda text: bar.update(task, description=escape(text)),
                                      on_record=lambda records: self.save(pending=records)))  # fmt: skip
                bar.advance(task)
                self.save()
        del hf, oracle
        _free(self.device)
        self.save()

    def save(self, pending: list[dict] = ()) -> None:
        """Write JSON / CSV now, with the `pending` records of a case under way, so that an
        interrupted run keeps what it measured."""
        records = [*self.records, *pending]
        if self.args.json:
            run = {"ops": self.ops, "quick": self.quick, "shapes": self.specs, "dtype": self.args.dtype,
                   "model_config": self.args.model_config, "time_limit": getattr(self.args, "time_limit", None)}
            report.write_json(self.args.json, self.env, self.ceilings, records, run)
        if self.args.csv:
            report.write_csv(self.args.csv, records)

    def finish(self) -> int:
        """Tables, files, plots, the summary last; 1 if a fastgpt candidate was wrong (FAILED) or
        crashed (ERROR)."""
        report.print_tables(self.console, self.records)
        self.save()
        for path in (self.args.json, self.args.csv):
            if path:
                self.console.print(f"wrote {path}")
        if self.args.plot:
            for path in report.plot(self.records, self.args.plot, self.env):
                self.console.print(f"wrote {path}")
        report.print_summary(self.console, self.records, self.env)
        failed = [r for r in self.records if is_fastgpt_failure(r)]
        for rec in failed:
            line = f"{rec['status'].upper()}: {rec['implementation']} on {rec['op']} {rec['case']}: {rec['reason']}"
            self.console.print(f"[bold red]{escape(line)}[/]")
        return 1 if failed else 0
