"""`python -m tandem.output.smoke <run dir>`: did a short run work, and where did its time go?

`make smoke` runs a few tandem steps on one GPU and then this check. PASS needs every planned
step logged with a finite loss, a weight push after each step, and both writers in the
episodes (a senior share strictly between 0 and 1 over the run). Prints the mean seconds of
each phase per step (the first step, which includes warm-up, is shown separately).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tandem.output.tracking import read_metrics

PHASES = ("time/rollout", "time/reward", "time/train", "time/push", "time/step")


def read_steps(run_dir: Path) -> list[dict]:
    """The training rows of metrics.jsonl (step >= 1), in order."""
    return [row for row in read_metrics(run_dir) if row["step"] >= 1]


def check(rows: list[dict], expected_steps: int) -> list[str]:
    """The reasons the run fails (empty: it passed)."""
    problems = []
    if len(rows) != expected_steps:
        problems.append(f"{len(rows)} steps logged, {expected_steps} planned")
    for row in rows:
        loss = row.get("train/loss")
        if loss is None or not math.isfinite(loss):
            problems.append(f"step {row['step']}: train/loss is {loss}")
        if row.get("time/push") is None:
            problems.append(f"step {row['step']}: no weight push was logged")
    fractions = [row.get("tandem/senior_token_frac") for row in rows]
    if rows and not any(f is not None and 0.0 < f < 1.0 for f in fractions):
        problems.append(f"no step had both writers (tandem/senior_token_frac: {fractions})")
    return problems


def timing_table(rows: list[dict]) -> str:
    lines = ["| phase | first step (s) | later steps, mean (s) |", "|---|---|---|"]
    for phase in PHASES:
        first = rows[0].get(phase) if rows else None
        later = [row[phase] for row in rows[1:] if row.get(phase) is not None]
        mean = f"{sum(later) / len(later):.2f}" if later else "-"
        lines.append(f"| {phase} | {first:.2f} | {mean} |" if first is not None
                     else f"| {phase} | - | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="steps the run planned")
    args = parser.parse_args(argv)
    rows = read_steps(args.run_dir)
    print(timing_table(rows))
    problems = check(rows, args.steps)
    for problem in problems:
        print(f"smoke: {problem}")
    print("smoke: FAIL" if problems else f"smoke: PASS ({len(rows)} steps, {args.run_dir})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
