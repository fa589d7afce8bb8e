"""pass@k against enumeration, and bootstrap intervals that cover the truth at their level."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from tandem.estimators import (
    bootstrap_ci,
    macro_average,
    macro_bootstrap_ci,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_summary,
)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_pass_at_k_equals_the_share_of_k_subsets_holding_a_correct_sample(n):
    for correct in range(n + 1):
        samples = [1] * correct + [0] * (n - correct)
        for k in range(1, n + 1):
            subsets = list(combinations(samples, k))
            assert pass_at_k(n, correct, k) == pytest.approx(
                sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"correct must be in \[0, n=4\]"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="empty"):
        mean_pass_at_k([], 8, 1)


def test_benchmark_pass_at_k_is_the_mean_over_problems():
    assert mean_pass_at_k([8, 0, 4, 2], 8, 1) == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)
    summary = pass_at_k_summary([8, 0, 4, 2], 8, [1, 2, 16])
    assert sorted(summary) == ["pass@1", "pass@1_ci", "pass@2", "pass@2_ci"]  # k > n left out
    assert summary["pass@2"] == pytest.approx(mean_pass_at_k([8, 0, 4, 2], 8, 2))
    low, high = summary["pass@1_ci"]
    assert 0 <= low < summary["pass@1"] < high <= 1


def test_macro_average_counts_each_benchmark_once():
    assert macro_average({"aime24": 0.1, "math500": 0.7}) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        macro_average({})


# A population of problems whose chance of a correct sample is known: the expected pass@k of a
# problem with chance q is exactly 1 - (1 - q)^k, so the population's pass@k is known exactly.
CHANCES = np.array([0.0, 0.05, 0.2, 0.4, 0.6, 0.85, 1.0])


def true_pass_at_k(k: int) -> float:
    return float(np.mean(1 - (1 - CHANCES) ** k))


def draw_benchmark(rng: np.random.Generator, problems: int, n: int) -> np.ndarray:
    """Correct counts of `problems` problems drawn from the population, n samples each."""
    return rng.binomial(n, rng.choice(CHANCES, size=problems))


def coverage(level: float, k: int, trials: int = 300, problems: int = 40, n: int = 8) -> float:
    rng = np.random.default_rng(1234)
    hits = 0
    for trial in range(trials):
        correct = draw_benchmark(rng, problems, n)
        low, high = bootstrap_ci([pass_at_k(n, int(c), k) for c in correct], level=level,
                                 resamples=1000, seed=trial)
        hits += low <= true_pass_at_k(k) <= high
    return hits / trials


@pytest.mark.parametrize("k", [1, 4])
def test_bootstrap_interval_covers_the_true_pass_at_k_at_about_its_level(k):
    # 300 trials: the binomial standard error of a coverage near 0.95 is ~0.013; the percentile
    # bootstrap runs slightly short on 40 problems, so the band is asymmetric
    assert 0.90 <= coverage(0.95, k) <= 0.985
    # and the interval is no wider than its level asks: a 50% interval misses half the time
    assert 0.38 <= coverage(0.5, k) <= 0.62


def test_macro_interval_covers_the_true_macro_average():
    rng = np.random.default_rng(7)
    truth = (true_pass_at_k(1) + 1.0) / 2  # the second benchmark is all-correct
    hits = 0
    for trial in range(200):
        groups = {"hard": [c / 8 for c in draw_benchmark(rng, 30, 8)],
                  "easy": [1.0] * 10}
        low, high = macro_bootstrap_ci(groups, resamples=1000, seed=trial)
        hits += low <= truth <= high
    # pooling the 40 problems into one bootstrap would weigh `hard` 3:1 and cover the truth
    # only ~27% of the time
    assert 0.88 <= hits / 200 <= 0.99


def test_weighted_interval_is_of_the_per_token_mean():
    # per-problem mean cross-entropies with token counts: the pooled per-token mean is
    # (1*100 + 3*300) / 400 = 2.5, not the mean of means 2.0
    values, tokens = [1.0, 3.0] * 20, [100, 300] * 20
    low, high = bootstrap_ci(values, tokens)
    assert low <= 2.5 <= high and low > 2.0
    with pytest.raises(ValueError, match="2 weights for 40 values"):
        bootstrap_ci(values, [1, 2])


def test_a_constant_statistic_has_a_zero_width_interval_and_bad_input_is_refused():
    assert bootstrap_ci([0.25] * 12) == (0.25, 0.25)
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=95)


def test_the_interval_is_reproducible_and_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    small = rng.random(20).tolist()
    assert bootstrap_ci(small) == bootstrap_ci(small)
    large = small * 16
    assert np.diff(bootstrap_ci(large))[0] < np.diff(bootstrap_ci(small))[0] / 2
