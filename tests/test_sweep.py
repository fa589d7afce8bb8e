"""A Hydra multirun over the hand-off rate: one run directory per value, then one report; a
point that fails is recorded and the sweep goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.config.checks import ConfigError
from tandem.sweep import FAILED_FILE, failed_points, run_point

ONE_TINY_STEP = [
    "model@model.senior=tiny", "trainer.total_steps=1", "trainer.val_every=1",
    "trainer.val_before_train=false", "eval.val_problems=2", "trainer.export_final=false",
    "algorithm.group_size=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
    "rollout.max_prompt_tokens=128", "rollout.max_response_tokens=16",
    "eval.max_response_tokens=16", "data.num_generated=32", "data.holdout_size=2",
    "cluster.cpu_kvcache_gib=0.25", "cluster.enforce_eager=true", "reward.num_workers=1",
]


@pytest.mark.slow
def test_two_value_sweep_makes_two_runs_and_one_report(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    train = subprocess.run(
        [sys.executable, "-m", "tandem.train", "-m", "algorithm.handoff_p=0.25,0.75",
         *ONE_TINY_STEP, f"hydra.sweep.dir={sweep}"],
        env=env, capture_output=True, text=True, timeout=1500)
    assert train.returncode == 0, train.stderr[-4000:]
    runs = sorted(path.parent for path in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 2, runs
    swept = sorted((run / ".hydra" / "overrides.yaml").read_text() for run in runs)
    assert "algorithm.handoff_p=0.25" in swept[0] and "algorithm.handoff_p=0.75" in swept[1]
    assert all(len(run.name) <= 100 for run in runs)  # a long command line still fits a name

    report = subprocess.run([sys.executable, "-m", "tandem.output.report", str(sweep)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    table = (sweep / "report.md").read_text()
    assert "0.25" in table and "0.75" in table
    assert list(sweep.glob("*.png")), "the report wrote no plot"


def test_failed_points_are_recorded_and_the_sweep_goes_on(tmp_path):
    """`python -m tandem.train -m` over two points that fail at compose time (cheap: nothing
    heavy loads; `test_run_point_records_any_failure_but_ctrl_c` has exceptions from inside a
    run): the second runs after the first failed, both are recorded and listed, the sweep
    exits 1, and the report lists them."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    train = subprocess.run(
        [sys.executable, "-m", "tandem.train", "-m", "algorithm.handoff_p=1.5,0.5",
         "model@model.senior=tiny", "rollout.max_response_tokens=4000",
         f"hydra.sweep.dir={sweep}"], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 1, train.stderr[-3000:]
    assert "tandem: 2 sweep point(s) failed" in train.stderr
    listed = train.stderr.split("sweep point(s) failed", 1)[1].splitlines()[1:]
    assert listed[0].startswith("  algorithm.handoff_p=1.5 ")
    assert listed[0].endswith("ConfigError: algorithm.handoff_p must be in [0, 1], got 1.5")
    assert listed[1].startswith("  algorithm.handoff_p=0.5 ")
    assert "ConfigError: rollout.max_prompt_tokens + rollout.max_response_tokens" in listed[1]
    failed = failed_points(sweep)
    assert [f["overrides"][0] for f in failed] == ["algorithm.handoff_p=1.5",
                                                   "algorithm.handoff_p=0.5"]

    report = subprocess.run([sys.executable, "-m", "tandem.output.report", str(sweep)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 2  # no run logged a step
    assert "failed" in report.stderr and "algorithm.handoff_p must be in [0, 1]" in report.stderr


def test_run_point_records_any_failure_but_ctrl_c(tmp_path):
    def fails_with(error):
        def run():
            raise error
        return run

    assert run_point(lambda: None, tmp_path / "ok", ["a=1"])
    assert run_point(fails_with(SystemExit(0)), tmp_path / "exit0", ["a=2"])

    class CheckpointException(BaseException):  # as torch's: not an Exception
        pass

    for name, error in (("raised", RuntimeError("engine died\ntrace")),
                        ("base", CheckpointException("disk full"))):
        assert not run_point(fails_with(error), tmp_path / name, [f"p={name}"])
    try:
        raise ConfigError("trainer.lr must be > 0")
    except ConfigError:
        assert not run_point(fails_with(SystemExit(2)), tmp_path / "config", ["p=config"])
    errors = {Path(f["run_dir"]).name: f["error"] for f in failed_points(tmp_path)}
    assert errors == {"raised": "RuntimeError: engine died",
                      "base": "CheckpointException: disk full",
                      "config": "ConfigError: trainer.lr must be > 0"}
    assert "engine died" in json.loads((tmp_path / "raised" / FAILED_FILE).read_text())[
        "traceback"]

    with pytest.raises(KeyboardInterrupt):
        run_point(fails_with(KeyboardInterrupt()), tmp_path / "ctrl_c", [])
    # a point run again and succeeding is no longer listed as failed
    assert run_point(lambda: None, tmp_path / "raised", ["p=raised"])
    assert "raised" not in {Path(f["run_dir"]).name for f in failed_points(tmp_path)}
