"""The run plot, the end-of-run table and `python -m tandem.output.report` over a real Hydra
multirun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.estimators import macro_bootstrap_ci, pass_at_k, pass_at_k_summary
from tandem.output import plots, report
from tandem.output.plots import pick_rows, plot_run, summary_table
from tandem.output.tracking import MetricsError

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
HANDOFF_P = (0.25, 0.5, 0.75)

# A throwaway Hydra app on our real conf/: it logs made-up metrics that depend on handoff_p
# through the real RunLogger, so the multirun layout is exactly what Hydra writes.
APP = """
import hydra
from hydra.core.hydra_config import HydraConfig
from tandem.config.compose import CONF_DIR, to_config
from tandem.output.tracking import RunLogger

@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg):
    config = to_config(cfg)
    p, steps = config.algorithm.handoff_p, config.trainer.total_steps
    with RunLogger(HydraConfig.get().runtime.output_dir, config, steps, console=False) as log:
        log.log(0, {"val/solo_accuracy": 0.1, "val/handoff_accuracy": 0.05})
        for step in range(1, steps + 1):
            metrics = {"reward/mean": p * step / steps, "tandem/senior_token_frac": p,
                       "train/loss": 1 / step, "time/step": 1.5}
            if step % 2 == 0:
                metrics["val/solo_accuracy"] = p / 2 + step / 100
                metrics["val/handoff_accuracy"] = p / 4 + step / 100
            log.log(step, metrics)

main()
"""


def reward_mean(p: float, step: int) -> float:
    return p * step / STEPS


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("sweep")
    (work / "app.py").write_text(APP)
    root = work / "runs" / "multirun" / "2026-11-27" / "19-00-00"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        [sys.executable, "app.py", "-m", "algorithm.handoff_p=" + ",".join(map(str, HANDOFF_P)),
         f"trainer.total_steps={STEPS}", "trainer.tensorboard=false",
         f"hydra.sweep.dir={root}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def copy_of(multirun: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(multirun, tmp_path / "multirun"))


def run_dir(root: Path, p: float) -> Path:
    (found,) = [d for d in root.iterdir() if f"algorithm.handoff_p={p}," in d.name]
    return found


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 200


def test_hydra_wrote_one_run_per_value_with_overrides(multirun):
    runs = sorted(d.name for d in multirun.iterdir() if d.is_dir())
    assert len(runs) == 3
    for p in HANDOFF_P:
        assert (run_dir(multirun, p) / ".hydra" / "overrides.yaml").exists()


def test_report_table_holds_the_logged_values(multirun, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(multirun), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header.startswith("| algorithm.handoff_p | final reward/mean (mean of last 3) | "
                             "final tandem/senior_token_frac (mean of last 3) | "
                             "last val/solo_accuracy | last val/handoff_accuracy | steps | run |")
    assert len(body) == 3
    for line, p in zip(body, HANDOFF_P, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        final = sum(reward_mean(p, s) for s in (2, 3, 4)) / 3
        assert cells[0] == str(p)
        assert float(cells[1]) == pytest.approx(final, rel=1e-3)
        assert float(cells[2]) == pytest.approx(p)
        assert float(cells[3]) == pytest.approx(p / 2 + 0.04, rel=1e-3)
        assert float(cells[4]) == pytest.approx(p / 4 + 0.04, rel=1e-3)
        assert cells[5] == str(STEPS)
        assert cells[6] == run_dir(multirun, p).name
    assert "Common overrides: trainer.total_steps=4 trainer.tensorboard=False." in text
    assert rows[1] in printed and "3 runs, 0 skipped" in printed


def test_report_plots_are_pngs_with_the_sweep_plot_for_one_numeric_key(multirun, tmp_path):
    result = report.build_report(multirun, tmp_path / "out")
    names = sorted(p.name for p in result.files)
    assert names == ["report.md", "reward.png", "vs_algorithm.handoff_p.png"]
    for path in result.files[1:]:
        assert_png(path)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "![reward](reward.png)" in text and "(vs_algorithm.handoff_p.png)" in text


def test_no_sweep_plot_when_the_varying_value_is_not_a_number(multirun, tmp_path):
    root = copy_of(multirun, tmp_path)
    overrides = run_dir(root, 0.5) / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("algorithm.handoff_p=0.5",
                                                       "algorithm.handoff_p=half"))
    result = report.build_report(root)
    assert [p.name for p in result.files] == ["report.md", "reward.png"]
    assert [r.overrides["algorithm.handoff_p"] for r in result.runs] == ["0.25", "0.75", "half"]


def test_corrupt_and_empty_runs_are_counted_and_skipped_a_cut_line_is_not(
        multirun, tmp_path, capsys):
    root = copy_of(multirun, tmp_path)
    with open(run_dir(root, 0.25) / "metrics.jsonl", "a") as cut:
        cut.write('{"step": 5, "reward/me')
    corrupt = run_dir(root, 0.5) / "metrics.jsonl"
    lines = corrupt.read_text().splitlines()
    corrupt.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    (run_dir(root, 0.75) / "metrics.jsonl").write_text("")

    assert report.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "1 runs, 2 skipped" in captured.out
    assert "metrics.jsonl:3: not JSON" in captured.err and "is empty" in captured.err
    text = (root / "report.md").read_text()
    assert "## Skipped runs" in text and text.count("\n- `") == 2
    (line,) = [row for row in text.splitlines() if row.startswith("| -") or "| 4 |" in row]
    assert run_dir(root, 0.25).name in line  # the cut-short run still reports its 4 steps


def test_failed_sweep_points_are_listed_next_to_the_runs(multirun, tmp_path, capsys):
    """A point that failed before logging (tandem.sweep.run_point wrote its failed.json) is
    listed with its error; one that failed after some steps is in the table and the list."""
    from tandem.sweep import run_point

    def crash():
        raise RuntimeError("engine died")

    root = copy_of(multirun, tmp_path)
    run_point(crash, root / "3_algorithm.handoff_p=2", ["algorithm.handoff_p=2"])
    run_point(crash, run_dir(root, 0.75), ["algorithm.handoff_p=0.75"])
    assert report.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "3 runs, 0 skipped, 2 failed" in captured.out
    assert "(algorithm.handoff_p=2): RuntimeError: engine died" in captured.err
    text = (root / "report.md").read_text()
    assert "3 runs, 2 failed." in text and "## Failed points" in text
    assert "- `3_algorithm.handoff_p=2` (algorithm.handoff_p=2): RuntimeError: engine died" in text


def test_no_runs_says_where_it_looked_and_what_a_run_holds(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert f"no runs found under {(tmp_path / 'empty').resolve()}" in error
    assert "metrics.jsonl" in error and ".hydra/overrides.yaml" in error


def test_the_cli_runs_as_a_module(multirun, tmp_path):
    done = subprocess.run([sys.executable, "-m", "tandem.output.report", str(multirun), "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "| algorithm.handoff_p |" in done.stdout and (tmp_path / "report.md").exists()


def test_plot_run_writes_progress_png(multirun, tmp_path):
    run = run_dir(copy_of(multirun, tmp_path), 0.5)
    assert plot_run(run) == run / "progress.png"
    assert_png(run / "progress.png")


def test_validation_intervals_become_error_bars():
    rows = [{"step": 0, "val/solo_accuracy": 0.3, "val/solo_accuracy_lo": 0.2,
             "val/solo_accuracy_hi": 0.45},
            {"step": 1, "reward/mean": 0.5},
            {"step": 2, "val/solo_accuracy": 0.6, "val/solo_accuracy_lo": 0.5,
             "val/solo_accuracy_hi": 0.7}]
    below, above = plots._interval_bars(rows, "val/solo_accuracy")
    assert below == pytest.approx([0.1, 0.1]) and above == pytest.approx([0.15, 0.1])
    del rows[2]["val/solo_accuracy_hi"]  # a run from before intervals were logged: no bars
    assert plots._interval_bars(rows, "val/solo_accuracy") is None


def test_plot_run_of_an_empty_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(MetricsError, match="empty"):
        plot_run(tmp_path)
    assert plots.main([str(tmp_path)]) == 1
    assert "metrics.jsonl is empty: the run logged no step" in capsys.readouterr().err


def test_plots_cli_prints_the_table_and_writes_the_png(multirun, tmp_path, capsys):
    run = run_dir(copy_of(multirun, tmp_path), 0.25)
    assert plots.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| step | reward/mean |") and f"wrote {run / 'progress.png'}" in out
    assert_png(run / "progress.png")


def test_summary_table_shows_each_step_and_the_means(multirun):
    table = summary_table(run_dir(multirun, 0.5))
    lines = table.splitlines()
    assert lines[0] == ("| step | reward/mean | tandem/senior_token_frac | train/loss | time/step "
                        "| val/solo_accuracy | val/handoff_accuracy |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:-1]]
    assert [c[0] for c in cells] == ["0", "1", "2", "3", "4", "mean"]
    assert [c[1] for c in cells[1:5]] == ["0.125", "0.25", "0.375", "0.5"]
    assert cells[0][1] == "-" and cells[0][5] == "0.1"
    assert cells[-1][1] == "0.3125"  # mean reward/mean of steps 1-4
    assert lines[-1].startswith("4 steps logged (last: step 4); 6.0 s in steps")
    assert "last val/solo_accuracy 0.29 (step 4)" in lines[-1]


def test_a_long_run_shows_first_last_and_every_kth_step():
    shown = pick_rows(101, 20)
    assert shown[0] == 0 and shown[-1] == 100 and len(shown) <= 21
    assert len({b - a for a, b in zip(shown[:-2], shown[1:-1], strict=True)}) == 1
    assert pick_rows(5, 20) == [0, 1, 2, 3, 4]


def evaluation(steps_and_counts: dict) -> dict:
    """An eval.json in the evaluate schema: per checkpoint step, {benchmark: (solo correct
    counts, hand-off correct counts)} out of n = 4."""
    checkpoints = []
    for step, benchmarks in steps_and_counts.items():
        entry = {"name": "base" if step is None else f"step_{step}", "path": "/x", "step": step,
                 "benchmarks": {}}
        for name, (solo, handoff) in benchmarks.items():
            entry["benchmarks"][name] = {
                "problems": len(solo), "n": 4,
                "solo": {**pass_at_k_summary(solo, 4, [1, 2, 4]), "correct": solo},
                "handoff": {**pass_at_k_summary(handoff, 4, [1, 2, 4]), "correct": handoff},
                "legibility": {"junior_ce": 1.25, "junior_ce_ci": [1.0, 1.5], "tokens": 99}}
        checkpoints.append(entry)
    return {"config": {}, "junior": "kit:tiny", "checkpoints": checkpoints}


def test_sweep_report_shows_each_runs_final_eval_and_puts_them_side_by_side(
        multirun, tmp_path, capsys):
    root = copy_of(multirun, tmp_path)
    low = {"a": ([4, 0, 2, 1], [0, 0, 1, 1]), "b": ([1, 1, 0], [0, 1, 0])}
    (run_dir(root, 0.25) / "eval.json").write_text(json.dumps(evaluation(
        {None: {"a": ([0] * 4, [0] * 4), "b": ([0] * 3, [0] * 3)}, 4: low})))
    (run_dir(root, 0.75) / "eval").mkdir()
    (run_dir(root, 0.75) / "eval" / "eval.json").write_text(json.dumps(evaluation(
        {4: {"a": ([4, 4, 3, 2], [4, 3, 3, 2]), "b": ([4, 2, 4], [3, 3, 4])}})))
    assert report.main([str(root)]) == 0
    text = (root / "report.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    assert rows[0][5:10] == ["eval solo/pass@1", "eval handoff/pass@1",
                             "eval legibility/junior_ce", "eval drift/logprob_gap", "steps"]
    by_p = {row[0]: row for row in rows[1:]}
    # the final checkpoint (step 4), not the base model: the macro over both benchmarks
    value, interval = by_p["0.25"][5].split(" ", 1)
    solo = {b: [pass_at_k(4, c, 1) for c in counts[0]] for b, counts in low.items()}
    assert float(value) == pytest.approx((sum(solo["a"]) / 4 + sum(solo["b"]) / 3) / 2,
                                         abs=5e-4)
    assert [float(x) for x in interval.strip("[]").split(", ")] == pytest.approx(
        macro_bootstrap_ci(solo), abs=5e-4)
    assert by_p["0.5"][5:9] == ["-"] * 4 and by_p["0.75"][8] == "-"  # no drift measured
    assert by_p["0.75"][7].startswith("1.250 ≈[")
    # the evaluated runs side by side, named after the run
    side = (root / "eval" / "report.md").read_text()
    assert "| benchmark | metric | paper expects | handoff_p=0.25 | handoff_p=0.75 |" in side
    assert sorted(p.name for p in (root / "eval").glob("*.png")) == [
        "handoff_vs_solo.png", "legibility.png", "pass_at_k.png"]
    assert "[eval/report.md](eval/report.md)" in text
    assert "Unreadable eval results" not in text
    assert f"wrote {root / 'report.md'}" in capsys.readouterr().out


def test_an_unreadable_eval_json_is_listed_and_its_run_still_reported(multirun, tmp_path,
                                                                       capsys):
    root = copy_of(multirun, tmp_path)
    (run_dir(root, 0.5) / "eval.json").write_text('{"checkpoints": [{"name": "x"}]}')
    assert report.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "3 runs, 0 skipped" in captured.out
    assert "eval results of" in captured.err and 'without a "benchmarks" object' in captured.err
    text = (root / "report.md").read_text()
    assert "## Unreadable eval results" in text and "eval solo/pass@1" not in text
    assert not (root / "eval").exists()
