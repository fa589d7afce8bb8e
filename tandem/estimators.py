"""Estimators for evaluation results: pass@k, bootstrap intervals over problems, macro averages.

- **pass@k** (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): from n
  samples of one problem with c correct, 1 - C(n-c, k) / C(n, k) is the unbiased estimate of
  the chance that at least one of k samples is correct. A benchmark's pass@k is its mean over
  problems.
- **Bootstrap interval**: the percentile interval of a statistic over problems resampled with
  replacement (Efron 1979). Problems, not samples, are resampled: a benchmark is a sample of
  problems, and the samples of one problem are not independent draws of the benchmark. The
  interval says how much the number would move on another draw of equally many problems.
- **Macro average**: the unweighted mean over benchmarks, as in the paper's reference
  evaluation (each benchmark counts once, however many problems it has). Its interval
  resamples problems within each benchmark (stratified bootstrap).

Pure functions of numbers (numpy only); a fixed default seed makes every report reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
"""Bootstrap resamples: the interval's ends move by well under 0.01 between seeds at this count
for benchmarks of 30+ problems."""


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k of one problem, n samples with `correct` right: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def per_problem_pass_at_k(correct: Sequence[int], n: int, k: int) -> list[float]:
    """pass@k of each problem, from its count of correct samples out of n."""
    return [pass_at_k(n, int(c), k) for c in correct]


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """A benchmark's pass@k: the mean over its problems."""
    if not correct:
        raise ValueError("pass@k of no problems: `correct` is empty")
    return sum(per_problem_pass_at_k(correct, n, k)) / len(correct)


def _resampled_means(strata: Sequence[tuple[np.ndarray, np.ndarray | None]], resamples: int,
                     seed: int) -> np.ndarray:
    """[resamples] bootstrap replicates of the mean over strata of each stratum's (weighted) mean,
    each stratum's problems resampled with replacement on their own."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values, weights in strata:
        picks = rng.integers(0, len(values), size=(resamples, len(values)))  # [resamples, problems]
        if weights is None:
            total += values[picks].mean(axis=1)
        else:
            picked = weights[picks]  # [resamples, problems]
            sums = picked.sum(axis=1)
            # a replicate that drew only zero-weight problems has no tokens: its value is nan
            with np.errstate(invalid="ignore", divide="ignore"):
                total += np.where(sums > 0, (values[picks] * picked).sum(axis=1) / sums, np.nan)
    return total / len(strata)


def _stratum(values: Sequence[float], weights: Sequence[float] | None, name: str
             ) -> tuple[np.ndarray, np.ndarray | None]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: need a non-empty list of per-problem values, got {values!r}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: per-problem values must be finite numbers")
    if weights is None:
        return array, None
    weight = np.asarray(weights, dtype=np.float64)
    if weight.shape != array.shape:
        raise ValueError(f"{name}: {weight.size} weights for {array.size} values")
    if (weight < 0).any() or weight.sum() <= 0:
        raise ValueError(f"{name}: weights must be >= 0 with a positive sum")
    return array, weight


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    low, high = np.nanquantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, *,
                 level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval, over problems, of the mean of a per-problem statistic.

    `values` holds one number per problem (its pass@k, its accuracy, the mean cross-entropy of
    its chains, ...). With `weights` the statistic is the weighted mean sum(w v) / sum(w): with
    per-problem mean cross-entropies and token counts as weights, that is the per-token mean.
    """
    strata = [_stratum(values, weights, "bootstrap_ci")]
    return _interval(_resampled_means(strata, resamples, seed), level)


def macro_average(per_benchmark: Mapping[str, float]) -> float:
    """The unweighted mean over benchmarks."""
    if not per_benchmark:
        raise ValueError("macro average of no benchmarks")
    return sum(per_benchmark.values()) / len(per_benchmark)


def macro_bootstrap_ci(per_benchmark: Mapping[str, Sequence[float]],
                       weights: Mapping[str, Sequence[float]] | None = None, *,
                       level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                       ) -> tuple[float, float]:
    """Bootstrap interval of the macro average: problems resampled within each benchmark.

    `per_benchmark` maps a benchmark to its per-problem values (and `weights` likewise, as in
    `bootstrap_ci`); the statistic is the mean over benchmarks of each benchmark's mean.
    """
    if not per_benchmark:
        raise ValueError("macro interval of no benchmarks")
    strata = [_stratum(values, None if weights is None else weights[name], name)
              for name, values in per_benchmark.items()]
    return _interval(_resampled_means(strata, resamples, seed), level)


def pass_at_k_summary(correct: Sequence[int], n: int, ks: Sequence[int], *,
                      level: float = LEVEL, seed: int = 0) -> dict[str, float | list[float]]:
    """`{"pass@k": mean, "pass@k_ci": [low, high]}` for every k in ks with k <= n: the eval.json
    fields of one benchmark and protocol."""
    summary: dict[str, float | list[float]] = {}
    for k in ks:
        if k <= n:
            values = per_problem_pass_at_k(correct, n, k)
            summary[f"pass@{k}"] = sum(values) / len(values)
            summary[f"pass@{k}_ci"] = list(bootstrap_ci(values, level=level, seed=seed))
    return summary
