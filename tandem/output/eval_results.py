"""eval.json files read into estimates: each checkpoint's value and 95% interval per metric.

The schema is the one `python -m tandem.evaluate` writes (docs/evaluation.md): per checkpoint,
per benchmark, a block per protocol (`solo`, `handoff`, `handoff_junior_first`,
`handoff_word`) with `pass@k`, `pass@k_ci` and `correct` (per-problem counts of correct samples
out of n), `dose` keyed by the senior's step probability p, `legibility` and `drift`.

Intervals come from the file (`<metric>_ci`) or, where the file holds `correct`, are recomputed
from it. A macro value is the mean over the benchmarks that have the metric; its interval
resamples problems within each benchmark. Where per-problem values are missing (legibility,
drift), a macro or difference interval is a normal approximation from the per-benchmark
intervals, flagged `approximate` (shown as `≈[lo, hi]`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.estimators import bootstrap_ci, macro_bootstrap_ci, per_problem_pass_at_k

PROTOCOLS = {"solo": "solo", "handoff": "hand-off (senior first)",
             "handoff_junior_first": "hand-off (junior first)",
             "handoff_word": "hand-off (word, Bernoulli)"}
MACRO = "macro"


class EvalReportError(ValueError):
    """An eval.json that cannot be read or is not in the expected schema."""


@dataclass(frozen=True)
class Estimate:
    value: float
    ci: tuple[float, float] | None
    approximate: bool = False
    """The interval is a normal approximation, not a bootstrap over problems."""


@dataclass(frozen=True)
class Metric:
    section: tuple[str, ...]
    """Path inside a benchmark's entry: ("solo",), ("dose", "0.5"), ("legibility",)."""
    key: str

    @property
    def label(self) -> str:
        if self.section[0] == "dose":
            p = float(self.section[1])
            return f"dose p={p:g} (junior {1 - p:.0%} of steps) {self.key}"
        return f"{PROTOCOLS.get(self.section[0], self.section[0])} {self.key}"


@dataclass(frozen=True)
class Checkpoint:
    label: str
    entry: dict[str, Any]
    junior: str

    def benchmark(self, name: str) -> dict[str, Any]:
        return self.entry["benchmarks"].get(name) or {}


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The parsed eval.json files; EvalReportError names a file that is missing or not JSON."""
    results = []
    for path in map(Path, paths):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError) as error:
            raise EvalReportError(f"{path}: unreadable ({error})") from None
        except json.JSONDecodeError as error:
            raise EvalReportError(f"{path}: not JSON ({error})") from None
    return results


def checkpoints(results: Sequence[dict[str, Any]]) -> list[Checkpoint]:
    """Every checkpoint of every result in order, each with a unique label (its name; a name
    seen before gets ` #2`, ` #3`, ...)."""
    found, seen = [], {}
    for number, result in enumerate(results, start=1):
        entries = result.get("checkpoints") if isinstance(result, dict) else None
        if not isinstance(entries, list) or not entries:
            raise EvalReportError(f"eval result {number}: no \"checkpoints\" list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("benchmarks"), dict):
                raise EvalReportError(f"eval result {number}: a checkpoint without a "
                                      f"\"benchmarks\" object: {str(entry)[:80]}")
            name = str(entry.get("name") or entry.get("path") or f"checkpoint {len(found) + 1}")
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name} #{seen[name]}"
            found.append(Checkpoint(label, entry, str(result.get("junior", "?"))))
    return found


def benchmark_names(cps: Sequence[Checkpoint]) -> list[str]:
    """Benchmarks in the order first met."""
    return list(dict.fromkeys(name for cp in cps for name in cp.entry["benchmarks"]))


def _block(bench: dict[str, Any], section: tuple[str, ...]) -> dict[str, Any] | None:
    for part in section:
        bench = bench.get(part) if isinstance(bench, dict) else None
    return bench if isinstance(bench, dict) else None


def problem_values(bench: dict[str, Any], metric: Metric) -> list[float] | None:
    """The per-problem values behind a benchmark's number (pass@k from `correct`), or None."""
    block = _block(bench, metric.section)
    if block is None or not metric.key.startswith("pass@") or not block.get("correct"):
        return None
    k, n = int(metric.key.removeprefix("pass@")), block.get("n", bench.get("n"))
    return per_problem_pass_at_k(block["correct"], int(n), k) if n and k <= n else None


def _value(bench: dict[str, Any], metric: Metric) -> float | None:
    block = _block(bench, metric.section)
    value = None if block is None else block.get(metric.key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise EvalReportError(f"{'/'.join(metric.section)} {metric.key} must be a number, "
                              f"got {value!r}")
    return None if value is None else float(value)


def estimate(bench: dict[str, Any], metric: Metric) -> Estimate | None:
    """A benchmark's value of a metric with its interval (from the file or recomputed)."""
    value = _value(bench, metric)
    if value is None:
        return None
    block = _block(bench, metric.section)
    ci = block.get(f"{metric.key}_ci")
    if ci is None and (values := problem_values(bench, metric)) is not None:
        ci = bootstrap_ci(values)
    if ci is not None and (len(ci) != 2 or not all(isinstance(x, int | float) for x in ci)):
        raise EvalReportError(f"{'/'.join(metric.section)} {metric.key}_ci must be [low, high], "
                              f"got {ci!r}")
    return Estimate(value, (float(ci[0]), float(ci[1])) if ci is not None else None)


def _normal_ci(center: float, intervals: Sequence[tuple[float, float]], scale: float
               ) -> tuple[float, float]:
    """center ± sqrt(sum of squared half-widths) * scale: independent estimates combined."""
    half = math.sqrt(sum(((high - low) / 2) ** 2 for low, high in intervals)) * scale
    return center - half, center + half


def macro_estimate(cp: Checkpoint, metric: Metric, benchmarks: Sequence[str]) -> Estimate | None:
    """The mean over the benchmarks that have the metric, with a stratified interval
    (recomputed from the benchmarks; the file's flat `macro` names the same numbers)."""
    have = [b for b in benchmarks if _value(cp.benchmark(b), metric) is not None]
    if not have:
        return None
    per = {b: estimate(cp.benchmark(b), metric) for b in have}
    value = sum(e.value for e in per.values()) / len(per)
    values = {b: problem_values(cp.benchmark(b), metric) for b in have}
    if all(v is not None for v in values.values()):
        return Estimate(value, macro_bootstrap_ci(values))
    if all(e.ci is not None for e in per.values()):
        return Estimate(value, _normal_ci(value, [e.ci for e in per.values()], 1 / len(per)),
                        approximate=True)
    return Estimate(value, None)


def estimates(cp: Checkpoint, metric: Metric, benchmarks: Sequence[str]
              ) -> dict[str, Estimate | None]:
    """{"macro": ..., benchmark: ...} for one checkpoint and metric."""
    return {MACRO: macro_estimate(cp, metric, benchmarks),
            **{b: estimate(cp.benchmark(b), metric) for b in benchmarks}}


def difference(cp: Checkpoint, base: Checkpoint, metric: Metric, benchmarks: Sequence[str]
               ) -> Estimate | None:
    """Macro value of cp minus base over the benchmarks both have: a paired bootstrap over the
    same problems when both hold per-problem values, else a normal approximation from the two
    intervals."""
    have = [b for b in benchmarks if _value(cp.benchmark(b), metric) is not None
            and _value(base.benchmark(b), metric) is not None]
    mine, theirs = macro_estimate(cp, metric, have), macro_estimate(base, metric, have)
    if mine is None or theirs is None:
        return None
    delta = mine.value - theirs.value
    pairs = {b: (problem_values(cp.benchmark(b), metric),
                 problem_values(base.benchmark(b), metric)) for b in have}
    if pairs and all(a is not None and c is not None and len(a) == len(c)
                     for a, c in pairs.values()):
        return Estimate(delta, macro_bootstrap_ci(
            {b: [x - y for x, y in zip(a, c, strict=True)] for b, (a, c) in pairs.items()}))
    if mine.ci is not None and theirs.ci is not None:
        return Estimate(delta, _normal_ci(delta, [mine.ci, theirs.ci], 1.0), approximate=True)
    return Estimate(delta, None)


def verdict(delta: Estimate, expected: str) -> str:
    """How a difference compares with the expected direction ("higher", "lower", "about")."""
    if delta.ci is None:
        return "no interval"
    low, high = delta.ci
    sign = "higher" if low > 0 else "lower" if high < 0 else None
    if expected == "about":
        return "as expected (no detectable difference)" if sign is None else f"{sign}: differs"
    if sign is None:
        return "within noise"
    return "as expected" if sign == expected else "opposite to the paper"


def cell(value: Estimate | None) -> str:
    if value is None:
        return "-"
    if value.ci is None:
        return f"{value.value:.3f}"
    mark = "≈" if value.approximate else ""
    return f"{value.value:.3f} {mark}[{value.ci[0]:.3f}, {value.ci[1]:.3f}]"


def metrics_of(cps: Sequence[Checkpoint], benchmarks: Sequence[str]) -> list[Metric]:
    """Every metric some checkpoint has, in reading order: protocols by k, dose by p, then
    legibility and drift."""
    benches = [cp.benchmark(b) for cp in cps for b in benchmarks]
    found: list[Metric] = []
    for protocol in PROTOCOLS:
        keys = {key for bench in benches for key in (bench.get(protocol) or {})
                if re.fullmatch(r"pass@\d+", key)}
        found += [Metric((protocol,), key) for key in
                  sorted(keys, key=lambda key: int(key.removeprefix("pass@")))]
    doses = {p for bench in benches for p in (bench.get("dose") or {})}
    if bad := [p for p in doses if not re.fullmatch(r"[01](\.\d+)?", p) or float(p) > 1]:
        raise EvalReportError(f"dose keys must be probabilities p in [0, 1], got {bad}")
    found += [Metric(("dose", p), "pass@1") for p in sorted(doses, key=float, reverse=True)]
    found += [Metric(("legibility",), "junior_ce"), Metric(("drift",), "logprob_gap"),
              Metric(("drift",), "start_logprob_gap")]
    return [m for m in found if any(_value(bench, m) is not None for bench in benches)]


@dataclass
class Results:
    """Every checkpoint's estimates, computed once: values[label, metric][benchmark or macro]."""

    checkpoints: list[Checkpoint]
    benchmarks: list[str]
    metrics: list[Metric]
    values: dict[tuple[str, Metric], dict[str, Estimate | None]]

    def get(self, cp: Checkpoint, metric: Metric, name: str) -> Estimate | None:
        return self.values.get((cp.label, metric), {}).get(name)

    def having(self, predicate: Callable[[Metric], bool]) -> list[Metric]:
        return [m for m in self.metrics if predicate(m)]


def collect(results: Sequence[dict[str, Any]]) -> Results:
    """Parsed eval.json results -> every checkpoint's estimates. EvalReportError names the
    checkpoint of a value that is not in the schema."""
    cps = checkpoints(results)
    benchmarks = benchmark_names(cps)
    values: dict[tuple[str, Metric], dict[str, Estimate | None]] = {}
    for cp in cps:
        try:
            values.update({(cp.label, m): estimates(cp, m, benchmarks)
                           for m in metrics_of([cp], benchmarks)})
        except EvalReportError as error:
            raise EvalReportError(f"checkpoint {cp.label!r}: {error}") from None
    return Results(cps, benchmarks, metrics_of(cps, benchmarks), values)
