"""Sweeps through Hydra's parallel launchers (conf/hydra/launcher/): the Ray launcher on a
running Ray cluster, submitit's local executor (what submitit_slurm runs on a SLURM cluster,
without SLURM). In each, one point fails at compose time and one trains a tiny step: the
failed point is recorded in its run dir, listed when the sweep ends (exit 1) and marked in the
report, and the other point's run is complete. Skipped when the launcher's extra
(`sweep-ray`, `sweep-slurm`) is not installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cluster import HEAD_START_TIMEOUT_S, LocalHead
from test_sweep import ONE_TINY_STEP

from tandem.sweep import failed_points

SWEEP_TIMEOUT_S = 900


def _needs(plugin: str, extra: str) -> pytest.MarkDecorator:
    try:
        installed = importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None
    except ModuleNotFoundError:  # no Hydra plugin at all: hydra_plugins does not exist
        installed = False
    return pytest.mark.skipif(not installed, reason=f"the {extra} extra is not installed "
                              f"(pip install -e '.[{extra}]')")


def _sweep(launcher: str, sweep: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """handoff_p=1.5 fails at compose time; handoff_p=0.5 trains one tiny step."""
    return subprocess.run(
        [sys.executable, "-m", "tandem.train", "-m", f"hydra/launcher={launcher}",
         "algorithm.handoff_p=1.5,0.5", *ONE_TINY_STEP, f"hydra.sweep.dir={sweep}"],
        env={**env, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True,
        timeout=SWEEP_TIMEOUT_S, cwd=sweep.parent)


def _check_failed_listed_and_reported(train: subprocess.CompletedProcess, sweep: Path,
                                      env: dict[str, str]) -> Path:
    """The failed point is listed at the end and marked in the report; returns the run dir of
    the point that trained."""
    assert train.returncode == 1, train.stderr[-4000:]
    summary = train.stderr.split("tandem: 1 sweep point(s) failed", 1)
    assert len(summary) == 2, train.stderr[-4000:]
    assert summary[1].splitlines()[1].startswith("  algorithm.handoff_p=1.5 ")
    assert summary[1].splitlines()[1].endswith(
        "ConfigError: algorithm.handoff_p must be in [0, 1], got 1.5")
    (failed,) = failed_points(sweep)
    assert failed["overrides"][0] == "algorithm.handoff_p=1.5"
    (trained,) = [path.parent for path in sweep.rglob("metrics.jsonl")]
    assert "algorithm.handoff_p=0.5" in (trained / ".hydra" / "overrides.yaml").read_text()
    assert (trained / "checkpoints").is_dir() and not (trained / "failed.json").exists()

    report = subprocess.run([sys.executable, "-m", "tandem.output.report", str(sweep)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    assert "1 runs, 0 skipped, 1 failed" in report.stdout
    text = (sweep / "report.md").read_text()
    assert "## Failed points" in text
    failed_line = next(line for line in text.splitlines() if "handoff_p must be in" in line)
    assert "algorithm.handoff_p=1.5" in failed_line
    return trained


@pytest.mark.slow
@_needs("hydra_ray_launcher", "sweep-ray")
def test_ray_launcher_runs_points_as_tasks_on_a_running_cluster(tmp_path):
    """`hydra/launcher=tandem_ray` with RAY_ADDRESS set: every point is a Ray task on that
    cluster (a private `ray start --head` with token auth), and its driver joins the cluster
    instead of starting one."""
    head = LocalHead(tmp_path)
    try:
        head.wait_ready(HEAD_START_TIMEOUT_S)
        gcs = next(arg.split("=", 1)[1] for arg in head.process.args if arg.startswith("--port="))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN",)}
        env.update(RAY_ADDRESS=f"127.0.0.1:{gcs}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(head.token_path))
        sweep = tmp_path / "sweep"
        train = _sweep("tandem_ray", sweep, env)
        assert "Ray Launcher is launching 2 jobs" in train.stdout, train.stdout[-3000:]
    finally:
        left = head.stop()
    trained = _check_failed_listed_and_reported(train, sweep, env)
    assert "ray: using the already initialised cluster" in (trained / "train.log").read_text()
    assert not left, f"processes of the test's Ray head survived: {left}"


@_needs("hydra_submitit_launcher", "sweep-slurm")
def test_submitit_launcher_runs_each_point_as_its_own_job(tmp_path):
    """`hydra/launcher=submitit_local`: each point a job (a process here, a SLURM job with
    submitit_slurm). Both points fail at compose time, so the test costs seconds (the Ray
    launcher's test and tests/test_sweep.py train points): each job records its own failure,
    the sweep lists both, and the report marks both."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sweep = tmp_path / "sweep"
    train = subprocess.run(
        [sys.executable, "-m", "tandem.train", "-m", "hydra/launcher=submitit_local",
         "algorithm.handoff_p=1.5,2.5", *ONE_TINY_STEP, f"hydra.sweep.dir={sweep}"],
        env={**env, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True,
        timeout=SWEEP_TIMEOUT_S, cwd=tmp_path)
    assert train.returncode == 1, train.stderr[-4000:]
    assert "tandem: 2 sweep point(s) failed" in train.stderr, train.stderr[-4000:]
    failed = failed_points(sweep)
    assert sorted(f["overrides"][0] for f in failed) == ["algorithm.handoff_p=1.5",
                                                         "algorithm.handoff_p=2.5"]
    # one submitit job per point, each in a process of its own
    jobs = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(jobs) == 2, sorted(p.name for p in sweep.rglob("*"))

    report = subprocess.run([sys.executable, "-m", "tandem.output.report", str(sweep)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 2  # no run logged a step
    assert report.stderr.count("handoff_p must be in [0, 1]") == 2, report.stderr[-3000:]
