"""What people read: rich tables in the terminal, JSON and CSV records, PNG plots of the sweeps."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

from rich.markup import escape

from fastgpt.bench.core import ERROR, FAILED, OK, RECORD_FIELDS, best_reference, is_fastgpt_failure
from fastgpt.bench.env import ENV_FIELDS

SCHEMA = "fastgpt.bench/1"
CSV_FIELDS = RECORD_FIELDS + ENV_FIELDS
SHOWN = (OK, FAILED, ERROR)  # statuses that get a table row; the rest are listed under it


def fmt_time(ms) -> str:
    """3 significant digits in µs, ms or s."""
    if ms is None:
        return ""
    if ms < 1:
        return f"{ms * 1e3:.3g} µs"
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"


def fmt_rate(rec: dict) -> str:
    if rec.get("value") is None:
        return ""
    value = rec["value"]
    text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{text} {rec['metric']}"


def _spread(rec: dict) -> str:
    if rec.get("ms") is None:
        return ""
    return f"{fmt_time(rec['ms'])} [{fmt_time(rec['ms_p20'])}–{fmt_time(rec['ms_p80'])}]"


def _pct(rec: dict) -> str:
    return "" if rec.get("pct_of_ceiling") is None else f"{rec['pct_of_ceiling']:.0f}%"


def _speedup(rec: dict) -> str:
    if rec.get("speedup_vs_best_ref") is None:
        return ""
    return f"{rec['speedup_vs_best_ref']:.2f}x vs {rec['best_ref']}"


def _status(rec: dict) -> str:
    status = rec["status"]
    if status == OK:
        return "[green]ok[/]"
    return f"[bold red]{status}[/]" if status == FAILED else f"[yellow]{status}[/]"


def op_table(op: str, records: list[dict]):
    """One rich table for an op: a row per candidate that ran, grouped by case."""
    from rich.table import Table

    table = Table(title=op, title_justify="left", show_lines=False)
    for column, justify in (("case", "left"), ("implementation", "left"), ("status", "left"),
                            ("median [p20–p80]", "right"), ("device", "right"), ("rate", "right"),
                            ("% ceiling", "right"),
                            ("speedup", "left"), ("note / reason", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    last_case = None
    for rec in records:
        if rec["status"] not in SHOWN:
            continue
        case = rec["case"] if rec["case"] != last_case else ""
        if case and last_case is not None:
            table.add_section()
        last_case = rec["case"]
        table.add_row(escape(case), escape(rec["implementation"]), _status(rec), _spread(rec),
                      fmt_time(rec.get("device_ms")), fmt_rate(rec),
                      _pct(rec), escape(_speedup(rec)), escape(rec["reason"] or rec["note"] or ""))
    return table


def not_measured(records: list[dict]) -> list[str]:
    """One line per implementation that did not run (unavailable or skipped), with its reason."""
    seen = {}
    for rec in records:
        if rec["status"] not in SHOWN and rec["implementation"] not in seen:
            seen[rec["implementation"]] = f"{rec['implementation']}: {rec['status']} ({rec['reason']})"
    return list(seen.values())


def print_tables(console, records: list[dict]) -> None:
    """The full report: a table per op (ceilings first), then what was not measured."""
    by_op = defaultdict(list)
    for rec in records:
        by_op[rec["op"]].append(rec)
    for op, recs in by_op.items():
        if any(r["status"] in SHOWN for r in recs):
            console.print(op_table(op, recs))
        else:
            console.print(f"[bold]{op}[/]")
        for line in not_measured(recs):
            console.print(f"  [dim]not measured: {escape(line)}[/]")


def summary_rows(records: list[dict]) -> list[tuple]:
    """Per case: (op, case, best fastgpt, its rate, % ceiling, best reference, its rate, speedup,
    failed), failed listing every FAILED candidate and every fastgpt candidate that crashed (ERROR)."""
    cases = defaultdict(list)
    for rec in records:
        if rec["op"] != "ceiling":
            cases[(rec["op"], rec["case"])].append(rec)
    rows = []
    for (op, case), recs in cases.items():
        if not any(r["status"] in SHOWN for r in recs):
            continue
        ours = [r for r in recs if r["kind"] == "fastgpt" and r["status"] == OK]
        failed = [r["implementation"] + (" (error)" if r["status"] == ERROR else "") for r in recs
                  if r["status"] == FAILED or is_fastgpt_failure(r)]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        ref = best_reference(recs)
        speedup = f"{ref['ms'] / best['ms']:.2f}x" if best and ref else ""
        if speedup and _timed_by(best) != _timed_by(ref):  # one by graph replay, the other by events, say
            speedup += f" ({_timed_by(best)} vs {_timed_by(ref)})"
        rows.append((op, case, best["implementation"] if best else "-", fmt_rate(best) if best else "",
                     _pct(best) if best else "", ref["implementation"] if ref else "-",
                     fmt_rate(ref) if ref else "", speedup, ", ".join(failed)))
    return rows


def _timed_by(rec: dict) -> str:
    """How a record was timed, in a word: cuda-graph (the GPU's time), cuda-events+l2flush (a
    call's, the host's included where it is the slower), host-clock (a whole call). A case times
    its candidates alike, but one whose graph capture failed falls back to events."""
    return (rec.get("method") or "").split(" ")[0].rstrip(",")


def print_summary(console, records: list[dict], env: dict) -> None:
    """The short table printed last: the best fastgpt backend vs the best reference per case."""
    from rich.table import Table

    title = escape(f"summary: {env.get('gpu')} | torch {env.get('torch')} | git {str(env.get('git_sha'))[:10]}")
    table = Table(title=title, title_justify="left")
    for column in ("op", "case", "fastgpt best", "rate", "% ceil", "best reference", "rate", "speedup", "FAILED"):
        table.add_column(column, overflow="fold")
    rows = summary_rows(records)
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table if rows else f"{title}: nothing was measured")


def summary_markdown(records: list[dict], env: dict, run: dict) -> str:
    """The summary table in Markdown, headed by the GPU, versions, git sha and date."""
    head = (f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
            f"git {str(env.get('git_sha'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date')}"
            f"{', --quick' if run.get('quick') else ''}")
    lines = [head, "", "| op | case | fastgpt best | rate | % ceiling | best reference | rate | speedup | FAILED |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in summary_rows(records)]
    return "\n".join(lines)


def write_json(path, env: dict, ceilings: dict, records: list[dict], run: dict | None = None) -> Path:
    """{"schema", "run", "env", "ceilings", "records"}; every record also carries the env fields.

    run: the options of the run (quick, ops, dtype, model config).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA, "run": run or {}, "env": env, "ceilings": ceilings, "records": records}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def write_csv(path, records: list[dict]) -> Path:
    """One row per record, columns CSV_FIELDS; dict fields (params, speedup_vs) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in rec.items()})
    return path


def sweeps(records: list[dict]) -> dict:
    """(op, sweep) -> {implementation: [(x, value), ...] sorted by x}, timed records only."""
    out = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec["sweep"] and rec["status"] == OK and rec["x"] is not None and rec["value"] is not None:
            out[(rec["op"], rec["sweep"])][rec["implementation"]].append((rec["x"], rec["value"]))
    return {key: {impl: sorted(points) for impl, points in lines.items()} for key, lines in out.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _draw(ax, op: str, sweep: str, lines: dict, records: list[dict]) -> None:
    meta = next(r for r in records if r["op"] == op and r["sweep"] == sweep)
    for impl, points in sorted(lines.items()):
        xs, ys = zip(*points)
        style = "-o" if impl.startswith("fastgpt") else "--."
        ax.plot(xs, ys, style, label=impl, linewidth=2 if impl.startswith("fastgpt") else 1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(meta["x_label"] or "x")
    ax.set_ylabel(meta["metric"])
    ax.set_title(f"{op}: {sweep} ({meta['dtype']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)


def plot(records: list[dict], path, env: dict) -> list[Path]:
    """PNG plots of the sweeps, one line per implementation.

    `path` ending in .png: one figure, a panel per sweep. Otherwise a directory: one PNG per
    sweep, named <op>_<sweep>.png. Returns the files written (none if there is no sweep).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data, path = sweeps(records), Path(path)
    if not data:
        return []
    suptitle = f"fastgpt bench: {env.get('gpu')}, torch {env.get('torch')}, {env.get('date')}"
    if path.suffix.lower() == ".png":
        cols = min(2, len(data))
        rows = (len(data) + cols - 1) // cols
        fig = Figure(figsize=(7 * cols, 4.5 * rows))
        for i, ((op, sweep), lines) in enumerate(sorted(data.items())):
            _draw(fig.add_subplot(rows, cols, i + 1), op, sweep, lines, records)
        fig.suptitle(suptitle, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(fig).print_png(str(path))
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, sweep), lines in sorted(data.items()):
        fig = Figure(figsize=(7, 4.5))
        _draw(fig.add_subplot(1, 1, 1), op, sweep, lines, records)
        fig.suptitle(suptitle, fontsize=8)
        fig.tight_layout()
        out = path / f"{_slug(op)}_{_slug(sweep)}.png"
        FigureCanvasAgg(fig).print_png(str(out))
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m fastgpt.bench.report BENCH.json [--full]`: print a saved run's summary table
    (and with --full every table), e.g. after a run was cut short by a time limit."""
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m fastgpt.bench.report", description=main.__doc__)
    parser.add_argument("json")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="the summary as a Markdown table (for READMEs)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    if args.markdown:
        print(summary_markdown(data["records"], data["env"], data.get("run", {})))
        return 0
    console = Console(width=180)
    if args.full:
        print_tables(console, data["records"])
    print_summary(console, data["records"], data["env"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
