"""A run's progress plot and its end-of-run console table, both from metrics.jsonl.

`python -m tandem.output.plots <run dir>` prints the table and writes <run dir>/progress.png.

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot global state), so this
works on a headless node and in a Ray job.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tandem.output.tracking import VAL_METRICS, MetricsError, Row, metrics_path, read_metrics

TABLE_METRICS = ("reward/mean", "reward/accuracy", "tandem/senior_token_frac",
                 "tandem/handoffs_per_episode", "train/loss", "time/step") + VAL_METRICS
VAL_STYLE = {"val/solo_accuracy": ("o", "tab:orange", "val solo accuracy"),
             "val/handoff_accuracy": ("s", "tab:red", "val hand-off accuracy")}


def series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the rows that have a value for it."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [int(s) for s, _ in pairs], [float(v) for _, v in pairs]


def last_value(rows: Sequence[Row], key: str) -> float | None:
    _, values = series(rows, key)
    return values[-1] if values else None


def tail_mean(rows: Sequence[Row], key: str, last: int) -> float | None:
    """Mean of the metric over its last `last` logged values (None when never logged)."""
    _, values = series(rows, key)
    tail = values[-last:]
    return sum(tail) / len(tail) if tail else None


def read_rows(run_dir: str | Path) -> list[Row]:
    """read_metrics, but a run with no rows yet is an error too."""
    rows = read_metrics(run_dir)
    if not rows:
        raise MetricsError(f"{metrics_path(run_dir)} is empty: the run logged no step")
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG (default <run_dir>/progress.png) of reward/mean and tandem/senior_token_frac per step
    (two panels; val/solo_accuracy and val/handoff_accuracy as markers where present, with
    their 95% intervals as error bars when logged)."""
    rows = read_rows(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "progress.png"
    reward, senior = series(rows, "reward/mean"), series(rows, "tandem/senior_token_frac")
    if not reward[0] and not senior[0]:
        raise MetricsError(f"{metrics_path(run_dir)} has neither reward/mean nor "
                           "tandem/senior_token_frac: nothing to plot")
    figure = Figure(figsize=(8, 6), constrained_layout=True)
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(*reward, label="reward/mean", color="tab:blue")
    for key, (marker, color, label) in VAL_STYLE.items():
        steps, values = series(rows, key)
        if steps:
            top.errorbar(steps, values, yerr=_interval_bars(rows, key), marker=marker,
                         color=color, linestyle="none", capsize=3, label=label)
    top.set_ylabel("reward / accuracy")
    top.set_title(f"{Path(run_dir).resolve().name}: {rows[-1]['step']} steps")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    bottom.plot(*senior, color="tab:green")
    bottom.set_ylabel("senior token fraction")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _interval_bars(rows: Sequence[Row], key: str) -> list[list[float]] | None:
    """Error bars (below, above) from `<key>_lo` / `<key>_hi` where every point has them."""
    points = [r for r in rows if r.get(key) is not None]
    if not all(r.get(f"{key}_lo") is not None and r.get(f"{key}_hi") is not None
               for r in points):
        return None
    return [[max(0.0, r[key] - r[f"{key}_lo"]) for r in points],
            [max(0.0, r[f"{key}_hi"] - r[key]) for r in points]]


def pick_rows(count: int, max_rows: int) -> list[int]:
    """Indices to show of `count` rows: all when few, else the first, the last and every k-th."""
    if count <= max_rows:
        return list(range(count))
    every = math.ceil((count - 1) / (max_rows - 1))
    return sorted(set(range(0, count, every)) | {count - 1})


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def summary_table(run_dir: str | Path, max_rows: int = 20) -> str:
    """A plain-text/markdown table for the console at the end of a run: per step (or the first,
    last and every k-th when long) the key metrics, plus a final line with totals/means."""
    rows = read_rows(run_dir)
    keys = [k for k in TABLE_METRICS if any(r.get(k) is not None for r in rows)]
    body = [[str(rows[i]["step"])] + [fmt(rows[i].get(k)) for k in keys]
            for i in pick_rows(len(rows), max_rows)]
    body.append(["mean"] + [fmt(tail_mean(rows, k, len(rows))) for k in keys])
    table = markdown_table(["step", *keys], body)
    trained = [r for r in rows if r["step"] > 0]
    seconds = sum(series(rows, "time/step")[1])
    totals = [f"{len(trained)} steps logged (last: step {rows[-1]['step']})"]
    if seconds:
        totals.append(f"{seconds:.1f} s in steps (sum of time/step)")
    for key in VAL_METRICS:
        steps, values = series(rows, key)
        if steps:
            totals.append(f"last {key} {values[-1]:.4g} (step {steps[-1]})")
    shown = "" if len(body) - 1 == len(rows) else f"; table shows {len(body) - 1} of {len(rows)}"
    return f"{table}\n{'; '.join(totals)}{shown}; mean = over every logged value"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.output.plots",
        description="A run's per-step table (printed) and <run dir>/progress.png, from its "
        "metrics.jsonl. For a sweep's report: python -m tandem.output.report.")
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        print(summary_table(args.run_dir))
        print(f"wrote {plot_run(args.run_dir)}")
    except MetricsError as error:
        print(f"tandem.output.plots: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
