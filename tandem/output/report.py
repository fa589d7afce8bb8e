"""`python -m tandem.output.report <multirun dir> [--out DIR]`: a table and plots for a sweep.

A Hydra multirun (`python -m tandem.train -m algorithm.handoff_p=0.25,0.5,0.75`) writes one run
directory per value; this finds every directory under the given one (any depth) holding a
metrics.jsonl, reads its `.hydra/overrides.yaml`, and writes `report.md` (one row per run, the
overrides that differ between runs as columns) and PNG plots next to it. A run whose metrics
are empty or corrupt is reported and skipped, never fatal. Sweep points that failed (their
`failed.json`, tandem/sweep.py) are listed with their error.

A run evaluated with `python -m tandem.evaluate` into `<run>/eval.json` or `<run>/eval/eval.json`
also gets its final checkpoint's macro eval results as columns, and the evaluated runs side by
side in `eval/report.md` (tandem.output.eval_report).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from tandem.output.eval_report import write_report
from tandem.output.eval_results import (
    EvalReportError,
    Metric,
    benchmark_names,
    cell,
    checkpoints,
    load_results,
    macro_estimate,
)
from tandem.output.plots import fmt, last_value, markdown_table, read_rows, series, tail_mean
from tandem.output.tracking import METRICS_FILE, MetricsError, Row
from tandem.sweep import failed_points

FINAL_METRICS = ("reward/mean", "tandem/senior_token_frac")
LAST_METRICS = ("val/solo_accuracy", "val/handoff_accuracy")
EVAL_FILES = ("eval.json", "eval/eval.json")
"""Where a run's evaluation is looked for, relative to the run directory."""
EVAL_METRICS = (Metric(("solo",), "pass@1"), Metric(("handoff",), "pass@1"),
                Metric(("legibility",), "junior_ce"), Metric(("drift",), "logprob_gap"))
"""The eval results a sweep row shows: macro averages over the evaluated benchmarks."""


class ReportError(RuntimeError):
    """Nothing to report: no runs, or none readable."""


@dataclass
class Run:
    directory: Path
    overrides: dict[str, str]
    rows: list[Row]
    evaluation: dict[str, Any] | None = None
    """The run's eval.json, holding only its final checkpoint (the highest step)."""


@dataclass
class Report:
    runs: list[Run]
    swept: list[str]
    """Override keys whose value differs between runs: the table's leading columns."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    eval_errors: list[tuple[Path, str]] = field(default_factory=list)
    """eval.json files that could not be read; their runs are reported without eval results."""
    table: str = ""
    files: list[Path] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    """Sweep points that failed (their failed.json, tandem/sweep.py): overrides and error."""


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides from Hydra's .hydra/overrides.yaml ({} without one)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as error:
        raise MetricsError(f"{path}: not YAML ({error})") from None
    if not isinstance(items, list):
        raise MetricsError(f"{path}: expected a list of key=value overrides, got {items!r}")
    overrides = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise MetricsError(f"{path}: override {item!r} is not key=value")
        overrides[key.lstrip("+~")] = value
    return overrides


def read_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The run's eval.json (None without one) reduced to its final checkpoint, the one with the
    highest step (the last listed among equals; a step of null, e.g. the base model, is lowest).
    Raises EvalReportError when the file is unreadable or not in the eval.json schema."""
    paths = [run_dir / name for name in EVAL_FILES if (run_dir / name).is_file()]
    if not paths:
        return None
    (result,) = load_results(paths[:1])
    checkpoints([result])  # the schema check
    entries = result["checkpoints"]
    steps = [-1 if e.get("step") is None else int(e["step"]) for e in entries]
    final = max(range(len(entries)), key=lambda i: (steps[i], i))
    return {**result, "checkpoints": [entries[final]]}


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Every run under root, the (run dir, reason) of each one that could not be read, and the
    (eval.json, reason) of each evaluation that could not be read."""
    runs, skipped, eval_errors = [], [], []
    for path in sorted(root.rglob(METRICS_FILE)):
        try:
            run = Run(path.parent, read_overrides(path.parent), read_rows(path.parent))
        except MetricsError as error:
            skipped.append((path.parent, str(error)))
            continue
        try:
            run.evaluation = read_evaluation(run.directory)
        except EvalReportError as error:
            eval_errors.append((run.directory, str(error)))
        runs.append(run)
    return runs, skipped, eval_errors


def number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def swept_keys(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for run in runs for k in run.overrides})
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def _sort_key(run: Run, swept: Sequence[str]) -> tuple:
    # numeric values sort as numbers, others as text; a missing value sorts first
    cells = []
    for key in swept:
        value = run.overrides.get(key)
        cells.append((0, 0.0, "") if value is None else
                     (1, number(value), "") if number(value) is not None else (2, 0.0, value))
    return (*cells, str(run.directory))


def run_label(run: Run, swept: Sequence[str], root: Path) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={run.overrides.get(k, '-')}" for k in swept]
    return ", ".join(parts) if parts else str(run.directory.relative_to(root))


def eval_cells(run: Run) -> list[str]:
    """The run's macro eval results with their 95% intervals ("-" where not evaluated)."""
    if run.evaluation is None:
        return ["-"] * len(EVAL_METRICS)
    (final,) = checkpoints([run.evaluation])
    benchmarks = benchmark_names([final])
    return [cell(macro_estimate(final, metric, benchmarks)) for metric in EVAL_METRICS]


def eval_value(run: Run, metric: Metric) -> float | None:
    if run.evaluation is None:
        return None
    (final,) = checkpoints([run.evaluation])
    value = macro_estimate(final, metric, benchmark_names([final]))
    return None if value is None else value.value


def results_table(runs: Sequence[Run], swept: Sequence[str], root: Path, last: int) -> str:
    evaluated = any(run.evaluation is not None for run in runs)
    header = [*swept, *(f"final {k} (mean of last {last})" for k in FINAL_METRICS),
              *(f"last {k}" for k in LAST_METRICS),
              *(f"eval {m.section[0]}/{m.key}" for m in EVAL_METRICS if evaluated),
              "steps", "run"]
    body = []
    for run in runs:
        relative = run.directory.relative_to(root)
        body.append([run.overrides.get(k, "-") for k in swept]
                    + [fmt(tail_mean(run.rows, k, last)) for k in FINAL_METRICS]
                    + [fmt(last_value(run.rows, k)) for k in LAST_METRICS]
                    + (eval_cells(run) if evaluated else [])
                    + [str(run.rows[-1]["step"]), str(relative) if str(relative) != "." else
                       str(root)])
    return markdown_table(header, body)


def plot_rewards(runs: Sequence[Run], swept: Sequence[str], root: Path, out: Path) -> Path:
    figure = Figure(figsize=(8, 5), constrained_layout=True)
    axes = figure.subplots()
    for run in runs:
        axes.plot(*series(run.rows, "reward/mean"), label=run_label(run, swept, root))
    axes.set_xlabel("step")
    axes.set_ylabel("reward/mean")
    axes.set_title("reward/mean per step")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(out, dpi=100)
    return out


def plot_against(runs: Sequence[Run], key: str, last: int, out: Path) -> Path:
    """Final reward and the last validation accuracies against one numeric swept value."""
    figure = Figure(figsize=(7, 5), constrained_layout=True)
    axes = figure.subplots()
    curves = [(f"final reward/mean (last {last})", "o",
               lambda run: tail_mean(run.rows, "reward/mean", last)),
              ("val solo accuracy", "s", lambda run: last_value(run.rows, "val/solo_accuracy")),
              ("val hand-off accuracy", "^",
               lambda run: last_value(run.rows, "val/handoff_accuracy")),
              ("eval solo pass@1 (macro)", "D", lambda run: eval_value(run, EVAL_METRICS[0])),
              ("eval hand-off pass@1 (macro)", "v",
               lambda run: eval_value(run, EVAL_METRICS[1]))]
    for label, marker, value in curves:
        points = sorted((number(run.overrides[key]), value(run)) for run in runs
                        if value(run) is not None)
        if points:
            axes.plot([x for x, _ in points], [y for _, y in points], marker=marker, label=label)
    axes.set_xlabel(key)
    axes.set_ylabel("reward / accuracy")
    axes.set_title(f"final results vs {key}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(out, dpi=100)
    return out


def build_report(root: str | Path, out: str | Path | None = None, last: int = 3) -> Report:
    """Read every run under root and write report.md and the plots to out (default root)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    out = Path(out) if out is not None else root
    runs, skipped, eval_errors = find_runs(root)
    failed = failed_points(root)
    if not runs:
        reasons = "".join(f"\n  skipped {d}: {why}" for d, why in skipped)
        reasons += "".join(f"\n  failed {f['run_dir']}: {f['error']}" for f in failed)
        raise ReportError(
            f"no runs found under {root.resolve()}: a run directory holds {METRICS_FILE} with "
            "at least one step (written by `python -m tandem.train`) and, for the sweep columns, "
            f"Hydra's .hydra/overrides.yaml{reasons}")
    swept = swept_keys(runs)
    runs.sort(key=lambda run: _sort_key(run, swept))
    report = Report(runs, swept, skipped, eval_errors, failed=failed)
    report.table = results_table(runs, swept, root, last)
    out.mkdir(parents=True, exist_ok=True)
    report.files.append(plot_rewards(runs, swept, root, out / "reward.png"))
    evaluated = [run for run in runs if run.evaluation is not None]
    if evaluated:
        # each run's final checkpoint, named after the run, side by side
        results = [{**run.evaluation, "checkpoints": [{**run.evaluation["checkpoints"][0],
                                                       "name": run_label(run, swept, root)}]}
                   for run in evaluated]
        report.files.append(write_report(results, out / "eval"))
    numeric = [k for k in swept if all(number(r.overrides.get(k)) is not None for r in runs)]
    if len(swept) == 1 and numeric:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", swept[0])
        report.files.append(plot_against(runs, swept[0], last, out / f"vs_{name}.png"))
    (out / "report.md").write_text(_markdown(report, root, out, last))
    report.files.insert(0, out / "report.md")
    return report


def _markdown(report: Report, root: Path, out: Path, last: int) -> str:
    common = {k: v for k, v in report.runs[0].overrides.items() if k not in report.swept
              and all(r.overrides.get(k) == v for r in report.runs)}
    lines = [f"# Sweep report: {root.resolve()}", "",
             f"{len(report.runs)} runs" + (f", {len(report.skipped)} skipped" if report.skipped
                                            else "")
             + (f", {len(report.failed)} failed" if report.failed else "") + ".",
             "Swept: " + (", ".join(report.swept) or "nothing (no override differs)") + ".",
             "Common overrides: " + (" ".join(f"{k}={v}" for k, v in common.items()) or "none")
             + ".", "", report.table, "",
             f"final = mean of the last {last} logged values of the metric; last = the value of "
             "the last validation step; steps = the last step logged.", ""]
    if any(run.evaluation is not None for run in report.runs):
        lines += ["eval = the macro average over the evaluated benchmarks of the run's final "
                  "checkpoint (`python -m tandem.evaluate`), with its 95% bootstrap interval; "
                  "the evaluated runs side by side: [eval/report.md](eval/report.md).", ""]
    if report.failed:
        lines += ["## Failed points", "", "The sweep went on past these; a failed run that "
                  "logged steps is also in the table above.", ""]
        for failure in report.failed:
            where = Path(failure["run_dir"])
            where = where.relative_to(root) if where.is_relative_to(root) else where
            lines.append(f"- `{where}` ({' '.join(failure['overrides'])}): {failure['error']}")
        lines.append("")
    if report.skipped:
        lines += ["## Skipped runs", ""] + [f"- `{d}`: {why}" for d, why in report.skipped]
        lines.append("")
    if report.eval_errors:
        lines += ["## Unreadable eval results", ""]
        lines += [f"- `{d}`: {why}" for d, why in report.eval_errors] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in report.files
                                 if p.suffix == ".png"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.output.report", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a multirun directory (searched at any depth)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the plots go (default: the multirun directory)")
    parser.add_argument("--last", type=int, default=3,
                        help="final reward/mean = mean over this many last steps (default 3)")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    try:
        report = build_report(args.root, args.out, args.last)
    except ReportError as error:
        print(f"tandem.output.report: {error}", file=sys.stderr)
        return 2
    print(report.table)
    for failure in report.failed:
        print(f"failed {failure['run_dir']} ({' '.join(failure['overrides'])}): "
              f"{failure['error']}", file=sys.stderr)
    for directory, why in report.skipped:
        print(f"skipped {directory}: {why}", file=sys.stderr)
    for directory, why in report.eval_errors:
        print(f"eval results of {directory} unreadable: {why}", file=sys.stderr)
    print(f"{len(report.runs)} runs, {len(report.skipped)} skipped, {len(report.failed)} "
          "failed; wrote "
          + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
