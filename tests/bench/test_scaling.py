"""bench.scaling: the headline lines are the figures bench.all looks for, and the step points
walk one axis at a time."""

from __future__ import annotations

from bench.all import BENCHES, parse_figures
from bench.scaling import headlines, step_points


def _step(group_size: int, tokens: int, step_s: float) -> dict:
    return {"group_size": group_size, "tokens": tokens, "step_s": step_s,
            "generated_tokens": 4 * group_size * tokens}


def test_bench_all_reads_every_headline_scaling_prints():
    replicas = {1: {"rollout/tokens_per_s": 1000.0}, 2: {"rollout/tokens_per_s": 900.0}}
    # the 32-token row at group 4 is off the center length: not part of the group figure
    steps = [_step(2, 64, 1.0), _step(4, 64, 1.5), _step(8, 64, 2.0), _step(4, 32, 9.0)]
    figures = parse_figures("\n".join(headlines(replicas, steps, tokens=64)))
    (scaling,) = [bench for bench in BENCHES if bench.module == "scaling"]
    assert set(figures) == {figure.name for figure in scaling.figures}
    assert figures["rollout 2/1 replicas"] == 0.9
    assert figures["step s/token largest/smallest group"] == 0.5  # (2 s / 2048) / (1 s / 512)


def test_a_part_not_run_prints_no_headline():
    assert headlines({}, [_step(2, 32, 1.0)], tokens=32) == []


def test_step_points_cross_at_the_center_without_repeating_it():
    assert step_points([2, 4, 8], [32, 64, 128], (4, 64)) == [
        (2, 64), (4, 64), (8, 64), (4, 32), (4, 128)]
    assert step_points([2, 4], [32], (4, 32)) == [(2, 32), (4, 32)]
