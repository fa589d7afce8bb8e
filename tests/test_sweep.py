"""A Hydra multirun over the hand-off rate: one run directory per value, then one report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ONE_TINY_STEP = [
    "model@model.senior=tiny", "trainer.total_steps=1", "trainer.val_every=1",
    "trainer.val_before_train=false", "eval.val_problems=2", "trainer.export_final=false",
    "algorithm.group_size=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
    "rollout.max_prompt_tokens=128", "rollout.max_response_tokens=16",
    "eval.max_response_tokens=16", "data.num_generated=32", "data.holdout_size=2",
    "cluster.cpu_kvcache_gib=0.25", "cluster.enforce_eager=true", "reward.num_workers=1",
]


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
