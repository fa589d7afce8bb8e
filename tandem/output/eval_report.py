"""`python -m tandem.output.eval_report EVAL_JSON [...] --out DIR`: checkpoints side by side.

Reads one or more `eval.json` files (written by `python -m tandem.evaluate`), puts every
checkpoint they hold side by side, and writes to DIR:

- `report.md` with one table: a row per (benchmark, metric), the macro average over benchmarks
  first; a column per checkpoint holding the value and its 95% bootstrap interval over
  problems; a column with the direction the paper expects for a tandem senior against a GRPO
  senior. Then each checkpoint minus the baseline (the first checkpoint, or `--baseline`) on
  the headline metrics, with a paired interval and whether the difference goes the paper's way,
  the other way, or is within noise.
- `pass_at_k.png`, `handoff_vs_solo.png`, `dose.png`, `legibility.png`, each when its protocol
  was run. Figures are drawn on matplotlib's Agg canvas (no pyplot state); one colour per
  checkpoint throughout.

`write_report(results, out_dir)` does the same from parsed results; `python -m tandem.evaluate`
calls it at the end of an evaluation.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tandem.output.eval_results import (
    MACRO,
    PROTOCOLS,
    Checkpoint,
    Estimate,
    EvalReportError,
    Metric,
    Results,
    cell,
    collect,
    difference,
    load_results,
    verdict,
)
from tandem.output.plots import markdown_table

EXPECTED = {"solo": "tandem ≈ GRPO", "handoff": "tandem > GRPO",
            "legibility": "tandem < GRPO", "drift": "tandem < GRPO (ours, not the paper's)"}
"""The paper's findings for a tandem senior against a GRPO senior (drift: our expectation)."""
ALL_K = ("solo", "handoff")
"""Protocols whose every pass@k is in the table; the others show pass@1 (eval.json has all)."""
HEADLINE = (("solo", "pass@1", "about"), ("handoff", "pass@1", "higher"),
            ("legibility", "junior_ce", "lower"), ("drift", "logprob_gap", "lower"))
"""The metrics of the difference table, with the direction expected for tandem."""


TABLE_NOTE = (
    "Each cell: the value and its 95% bootstrap interval over problems (2000 resamples); "
    "`≈[..]`: a normal approximation from per-benchmark intervals. macro = mean over "
    "benchmarks, its interval resampling problems within each benchmark. pass@k: the unbiased "
    "estimator from n samples (k > 1 of the junior-first and word hand-offs: in eval.json). "
    "Dose: Bernoulli step hand-off, the senior writes a step with probability p. junior_ce: the "
    "junior's mean cross-entropy per token on the senior's solo text (nats); logprob_gap: "
    "senior - junior log-prob per token on that text (start_: the starting senior). 'paper "
    "expects' compares a tandem senior with a GRPO senior trained alike.")


def expected(metric: Metric) -> str:
    """The paper's direction for this metric ("" where it states none, e.g. the starting
    senior's drift)."""
    return "" if metric.key.startswith("start_") else EXPECTED.get(metric.section[0], "")


def results_table(res: Results) -> str:
    """One row per (benchmark, metric), macro first; one column per checkpoint."""
    metrics = [m for m in res.metrics if m.section[0] in ALL_K or m.key == "pass@1"
               or not m.key.startswith("pass@")]
    body = []
    for name in [MACRO, *res.benchmarks]:
        for metric in metrics:
            cells = [cell(res.get(cp, metric, name)) for cp in res.checkpoints]
            if any(c != "-" for c in cells):
                body.append([name, metric.label, expected(metric), *cells])
    return markdown_table(["benchmark", "metric", "paper expects",
                           *(cp.label for cp in res.checkpoints)], body)


def difference_table(res: Results, base: Checkpoint) -> str | None:
    """Each other checkpoint minus the baseline on the headline macro metrics."""
    body = []
    for cp in res.checkpoints:
        if cp is base:
            continue
        for section, key, expected in HEADLINE:
            delta = difference(cp, base, Metric((section,), key), res.benchmarks)
            if delta is not None:
                # the starting senior is no tandem run: the paper's directions say nothing of it
                reading = "before training" if cp.entry.get("start") else verdict(delta, expected)
                body.append([cp.label, f"{PROTOCOLS.get(section, section)} {key}",
                             EXPECTED[section], cell(delta), reading])
    header = ["checkpoint", f"macro metric, minus {base.label}", "paper expects",
              "difference [95% interval]", "reading"]
    return markdown_table(header, body) if body else None


# Plots: one colour per checkpoint, the macro panel or group first.

def _grid(count: int) -> tuple[Figure, list[Any]]:
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(4.2 * cols, 3.4 * rows), constrained_layout=True)
    axes = list(figure.subplots(rows, cols, squeeze=False).ravel())
    for spare in axes[count:]:
        spare.set_visible(False)
    return figure, axes[:count]


def _yerr(points: Sequence[Estimate]) -> list[list[float]] | None:
    if any(p.ci is None for p in points):
        return None
    return [[p.value - p.ci[0] for p in points], [p.ci[1] - p.value for p in points]]


def _legend(figure: Figure, res: Results, extra: Sequence[tuple[str, dict]] = ()) -> None:
    handles = [figure.axes[0].plot([], [], color=f"C{i}", label=cp.label)[0]
               for i, cp in enumerate(res.checkpoints)]
    handles += [figure.axes[0].plot([], [], color="gray", label=label, **style)[0]
                for label, style in extra]
    figure.legend(handles=handles, loc="outside lower center", fontsize="small",
                  ncols=min(len(handles), 4))


def plot_pass_at_k(res: Results, out: Path) -> Path | None:
    """Solo (solid) and hand-off (dashed) pass@k against k, one panel per benchmark."""
    lines = [("solo", "-"), ("handoff", "--")]
    if not res.having(lambda m: m.section[0] in dict(lines)):
        return None
    figure, axes = _grid(len(res.benchmarks) + 1)
    for axis, name in zip(axes, [MACRO, *res.benchmarks], strict=True):
        for i, cp in enumerate(res.checkpoints):
            for protocol, style in lines:
                points = [(int(m.key.removeprefix("pass@")), res.get(cp, m, name))
                          for m in res.having(lambda m, p=protocol: m.section == (p,))]
                points = [(k, e) for k, e in points if e is not None]
                if not points:
                    continue
                ks = [k for k, _ in points]
                axis.plot(ks, [e.value for _, e in points], style, marker="o", color=f"C{i}")
                if all(e.ci is not None for _, e in points):
                    axis.fill_between(ks, [e.ci[0] for _, e in points],
                                      [e.ci[1] for _, e in points], color=f"C{i}", alpha=0.15)
        axis.set_xscale("log", base=2)
        ks = sorted({int(m.key.removeprefix("pass@")) for m in res.metrics
                     if m.key.startswith("pass@") and m.section[0] in dict(lines)})
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.minorticks_off()
        axis.set_xlabel("k")
        axis.set_ylabel("pass@k")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(name)
        axis.grid(alpha=0.3)
    _legend(figure, res, [("solo", {"linestyle": "-"}), ("hand-off", {"linestyle": "--"})])
    figure.savefig(out, dpi=100)
    return out


def _bars(axis: Any, res: Results, series: Sequence[tuple[Metric, dict]], names: Sequence[str]
          ) -> None:
    """Grouped bars: a group per benchmark, within it a bar per checkpoint and series."""
    width = 0.8 / (len(res.checkpoints) * len(series))
    slot = 0
    for i, cp in enumerate(res.checkpoints):
        for metric, style in series:
            xs, points = [], []
            for x, name in enumerate(names):
                if (e := res.get(cp, metric, name)) is not None:
                    xs.append(x - 0.4 + (slot + 0.5) * width)
                    points.append(e)
            slot += 1
            if points:
                axis.bar(xs, [e.value for e in points], width, yerr=_yerr(points), capsize=2,
                         color=f"C{i}", edgecolor="black", linewidth=0.5, **style)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.grid(alpha=0.3, axis="y")


def plot_handoff_vs_solo(res: Results, out: Path) -> Path | None:
    """pass@1 solo (plain bars) and hand-off (hatched), per benchmark and checkpoint."""
    series = [(Metric(("solo",), "pass@1"), {}), (Metric(("handoff",), "pass@1"),
                                                  {"hatch": "//", "alpha": 0.6})]
    if not all(m in res.metrics for m, _ in series):
        return None
    figure = Figure(figsize=(max(6.0, 1.2 * (len(res.benchmarks) + 1)
                                 * max(1, len(res.checkpoints) / 2)), 4.5),
                    constrained_layout=True)
    axis = figure.subplots()
    _bars(axis, res, series, [MACRO, *res.benchmarks])
    axis.set_ylabel("pass@1")
    axis.set_title("solo (plain) vs hand-off, senior first (hatched); 95% intervals")
    _legend(figure, res)
    figure.savefig(out, dpi=100)
    return out


def plot_dose(res: Results, out: Path) -> Path | None:
    """Team pass@1 against the junior's share of steps (1 - p), a line per checkpoint."""
    doses = res.having(lambda m: m.section[0] == "dose")
    if not doses:
        return None
    figure, axes = _grid(len(res.benchmarks) + 1)
    for axis, name in zip(axes, [MACRO, *res.benchmarks], strict=True):
        for i, cp in enumerate(res.checkpoints):
            points = sorted((1 - float(m.section[1]), e) for m in doses
                            if (e := res.get(cp, m, name)) is not None)
            if points:
                axis.errorbar([x for x, _ in points], [e.value for _, e in points],
                              yerr=_yerr([e for _, e in points]), marker="o", capsize=3,
                              color=f"C{i}")
        axis.set_xlabel("junior share of steps (1 - p)")
        axis.set_ylabel("team pass@1")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(name)
        axis.grid(alpha=0.3)
    _legend(figure, res)
    figure.savefig(out, dpi=100)
    return out


def plot_legibility(res: Results, out: Path) -> Path | None:
    """The junior's cross-entropy on the senior's solo text, and the senior - junior log-prob
    gap (drift), per benchmark and checkpoint."""
    panels = [(m, title) for m, title in
              ((Metric(("legibility",), "junior_ce"),
                "legibility: junior cross-entropy, nats/token; lower = more legible"),
               (Metric(("drift",), "logprob_gap"),
                "drift: senior - junior log-prob, nats/token; lower = closer to the junior"))
              if m in res.metrics]
    if not panels:
        return None
    figure = Figure(figsize=(max(6.0, 1.2 * (len(res.benchmarks) + 1)), 3.8 * len(panels)),
                    constrained_layout=True)
    axes = figure.subplots(len(panels), 1, squeeze=False).ravel()
    for axis, (metric, title) in zip(axes, panels, strict=True):
        _bars(axis, res, [(metric, {})], [MACRO, *res.benchmarks])
        axis.set_title(title)
    _legend(figure, res)
    figure.savefig(out, dpi=100)
    return out


PLOTS = {"pass_at_k.png": plot_pass_at_k, "handoff_vs_solo.png": plot_handoff_vs_solo,
         "dose.png": plot_dose, "legibility.png": plot_legibility}


def _problem_counts(res: Results) -> str:
    counts = {}
    for name in res.benchmarks:
        seen = {(cp.benchmark(name).get("problems"), cp.benchmark(name).get("n"))
                for cp in res.checkpoints if cp.benchmark(name)}
        counts[name] = " or ".join(f"{p} problems × {n} samples" for p, n in sorted(seen, key=str))
    return "; ".join(f"{name}: {what}" for name, what in counts.items())


def _markdown(res: Results, results: Sequence[dict[str, Any]], base: Checkpoint,
              plots: Sequence[Path]) -> str:
    juniors = sorted({cp.junior for cp in res.checkpoints})
    configs = [((r.get("config") or {}).get("eval") or {}) for r in results]
    sampling = {" ".join(f"{k}={c[k]}" for k in ("temperature", "top_p", "top_k", "n") if k in c)
                for c in configs} - {""}
    lines = ["# Evaluation report", "",
             f"{len(res.checkpoints)} checkpoints from {len(results)} eval result(s): "
             + ", ".join(f"`{cp.label}` ({cp.entry.get('path', '?')})" for cp in res.checkpoints)
             + ".", f"Junior: {', '.join(f'`{j}`' for j in juniors)}.",
             *(["Eval sampling: " + "; ".join(sorted(sampling)) + "."] if sampling else []),
             f"Benchmarks: {_problem_counts(res)}.", "",
             results_table(res), "",
             TABLE_NOTE, ""]
    differences = difference_table(res, base)
    if differences:
        lines += [f"## Against `{base.label}`", "", differences, "",
                  "Paired over the same problems where per-problem counts are stored. The reading "
                  "applies to a tandem checkpoint against a GRPO baseline: 'as expected' = the "
                  "interval excludes 0 on the paper's side, 'within noise' = it includes 0.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(results: list[dict[str, Any]], out_dir: str | Path,
                 baseline: str | None = None) -> Path:
    """Write report.md and the plots for the checkpoints of `results` (parsed eval.json files)
    to out_dir; the difference table is against checkpoint `baseline` (default the first).
    Returns the path of report.md."""
    res = collect(results)
    labels = [cp.label for cp in res.checkpoints]
    if baseline is not None and baseline not in labels:
        raise EvalReportError(f"baseline {baseline!r} is none of the checkpoints: {labels}")
    base = res.checkpoints[labels.index(baseline) if baseline is not None else 0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [path for name, plot in PLOTS.items() if (path := plot(res, out / name)) is not None]
    report = out / "report.md"
    report.write_text(_markdown(res, results, base, plots))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.output.eval_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="eval.json files")
    parser.add_argument("--out", type=Path, required=True, help="where report.md and plots go")
    parser.add_argument("--baseline", default=None,
                        help="checkpoint the difference table subtracts (default: the first)")
    args = parser.parse_args(argv)
    try:
        report = write_report(load_results(args.results), args.out, args.baseline)
    except EvalReportError as error:
        print(f"tandem.output.eval_report: {error}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
