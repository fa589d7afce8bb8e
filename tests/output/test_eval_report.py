"""The side-by-side eval report from eval.json files written by hand in the eval.json schema."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.estimators import bootstrap_ci, macro_bootstrap_ci, pass_at_k, pass_at_k_summary
from tandem.output import eval_report
from tandem.output.eval_results import (
    Estimate,
    EvalReportError,
    Metric,
    collect,
    difference,
    verdict,
)

REPO = Path(__file__).resolve().parents[2]
N = 8
BENCHMARKS = {"arithmetic": 40, "gsm8k": 30}
DOSES = ("1.0", "0.75", "0.5", "0.25", "0.0")


def protocol(correct) -> dict:
    return {**pass_at_k_summary(correct, N, [1, 2, 4, 8]), "correct": [int(c) for c in correct]}


def benchmark(rng, problems: int, solo: float, handoff: float, ce: float, gap: float) -> dict:
    """One benchmark's entry: correct counts drawn at the given chances, as evaluate writes."""
    solo_correct = rng.binomial(N, solo, size=problems)
    entry = {"problems": problems, "n": N, "solo": protocol(solo_correct),
             "handoff": protocol(rng.binomial(N, handoff, size=problems)),
             "handoff_junior_first": protocol(rng.binomial(N, handoff * 0.9, size=problems)),
             "handoff_word": protocol(rng.binomial(N, handoff * 0.8, size=problems)),
             "dose": {p: protocol(rng.binomial(N, solo * float(p) + 0.05 * (1 - float(p)),
                                               size=problems)) for p in DOSES},
             "legibility": {"junior_ce": ce, "junior_ce_ci": [ce - 0.02, ce + 0.02],
                            "tokens": 1000 * problems},
             "drift": {"logprob_gap": gap, "logprob_gap_ci": [gap - 0.01, gap + 0.01],
                       "start_logprob_gap": 0.0}}
    entry["dose"]["1.0"] = protocol(solo_correct)  # p = 1 is solo
    return entry


def checkpoint(name: str, step, seed: int, solo: float, handoff: float, ce: float,
               gap: float) -> dict:
    rng = np.random.default_rng(seed)
    benches = {b: benchmark(rng, count, solo, handoff, ce, gap)
               for b, count in BENCHMARKS.items()}
    macro = {f"{p}/pass@1": np.mean([b[p]["pass@1"] for b in benches.values()])
             for p in ("solo", "handoff")}
    macro["legibility/junior_ce"], macro["drift/logprob_gap"] = ce, gap
    return {"name": name, "path": f"/runs/{name}", "step": step, "benchmarks": benches,
            "macro": macro}


def result(*checkpoints: dict) -> dict:
    return {"config": {"eval": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "n": N}},
            "junior": "/models/base", "started": "2026-01-01T00:00:00",
            "finished": "2026-01-01T01:00:00", "checkpoints": list(checkpoints)}


@pytest.fixture(scope="module")
def grpo_and_tandem() -> list[dict]:
    """Two eval.json results: base + GRPO in one, tandem in the other. Tandem: same solo
    counts as GRPO, hand-off much higher, junior cross-entropy clearly lower."""
    grpo = checkpoint("grpo", 100, seed=1, solo=0.5, handoff=0.2, ce=1.5, gap=0.3)
    tandem = copy.deepcopy(checkpoint("tandem", 100, seed=2, solo=0.5, handoff=0.6, ce=1.1,
                                      gap=0.1))
    for name in BENCHMARKS:
        tandem["benchmarks"][name]["solo"] = copy.deepcopy(grpo["benchmarks"][name]["solo"])
    return [result(checkpoint("base", None, seed=0, solo=0.3, handoff=0.2, ce=1.2, gap=0.0),
                   grpo), result(tandem)]


def table_rows(text: str, first: int = 3) -> dict[tuple[str, str], list[str]]:
    """(benchmark, metric) -> the first table's cells from column `first` on (3: the
    checkpoints' cells, 2: the paper's expectation and then those)."""
    table = text.split("\n\n")[2].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return {(r[0], r[1]): r[first:] for r in rows[2:]}


def parse(cell: str) -> tuple[float, float, float]:
    value, interval = cell.split(" ", 1)
    low, high = interval.strip("≈[]").split(", ")
    return float(value), float(low), float(high)


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_one_table_puts_checkpoints_side_by_side_with_intervals(grpo_and_tandem, tmp_path):
    report = eval_report.write_report(grpo_and_tandem, tmp_path)
    text = report.read_text()
    header = text.split("\n\n")[2].splitlines()[0]
    assert header == "| benchmark | metric | paper expects | base | grpo | tandem |"
    rows = table_rows(text)
    tandem = grpo_and_tandem[1]["checkpoints"][0]["benchmarks"]
    # a benchmark's cell is the file's value and interval
    value, low, high = parse(rows["gsm8k", "hand-off (senior first) pass@4"][2])
    stored = tandem["gsm8k"]["handoff"]
    assert value == pytest.approx(stored["pass@4"], abs=5e-4)
    assert (low, high) == pytest.approx(stored["pass@4_ci"], abs=5e-4)
    # macro: the mean over benchmarks, with a stratified interval from the stored counts
    value, low, high = parse(rows["macro", "solo pass@1"][1])  # grpo
    grpo = grpo_and_tandem[0]["checkpoints"][1]["benchmarks"]
    assert value == pytest.approx(np.mean([grpo[b]["solo"]["pass@1"] for b in BENCHMARKS]),
                                  abs=5e-4)
    assert (low, high) == pytest.approx(macro_bootstrap_ci(
        {b: [pass_at_k(N, c, 1) for c in grpo[b]["solo"]["correct"]] for b in BENCHMARKS}),
        abs=5e-4)
    # every accuracy has an interval around its value, macro first: pass@{1,2,4,8} solo and
    # hand-off, pass@1 of the two other hand-offs and of each dose, for 3 checkpoints
    accuracies = [c for key, cells in rows.items() if "pass@" in key[1] for c in cells]
    assert len(accuracies) == (1 + len(BENCHMARKS)) * 3 * (2 * 4 + 2 + len(DOSES))
    for c in accuracies:
        value, low, high = parse(c)
        assert 0 <= low <= value <= high <= 1
    assert list(rows)[0] == ("macro", "solo pass@1")
    assert rows["arithmetic", "dose p=0.25 (junior 75% of steps) pass@1"][0] != "-"
    # the paper's direction stands next to the numbers
    expects = {metric: cells[0] for (bench, metric), cells in table_rows(text, 2).items()
               if bench == "macro"}
    assert expects["solo pass@1"] == "tandem ≈ GRPO"
    assert expects["hand-off (senior first) pass@1"] == "tandem > GRPO"
    assert expects["legibility junior_ce"] == "tandem < GRPO"
    assert expects["drift start_logprob_gap"] == ""  # the starting senior: nothing to expect
    # legibility has no per-problem values: its macro interval is flagged as approximate
    assert rows["macro", "legibility junior_ce"][2].startswith("1.100 ≈[")
    assert "Junior: `/models/base`." in text and "gsm8k: 30 problems × 8 samples" in text
    assert "temperature=0.7 top_p=0.8 top_k=20 n=8" in text


def test_differences_read_against_the_paper(grpo_and_tandem, tmp_path):
    text = eval_report.write_report(grpo_and_tandem, tmp_path, baseline="grpo").read_text()
    section = text.split("## Against `grpo`")[1].split("\n\n")[1]
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]:
            [c.strip() for c in line.strip("|").split("|")][2:]
            for line in section.splitlines()[2:]}
    # identical solo counts: a zero difference, which is what the paper expects
    assert rows["tandem", "solo pass@1"][1:] == ["0.000 [0.000, 0.000]",
                                                 "as expected (no detectable difference)"]
    assert rows["tandem", "hand-off (senior first) pass@1"][2] == "as expected"
    assert rows["tandem", "legibility junior_ce"][2] == "as expected"
    # base: hand-off drawn at the same chance as grpo's, solo at a lower one
    assert rows["base", "hand-off (senior first) pass@1"][2] == "within noise"
    assert rows["base", "solo pass@1"][2] == "lower: differs"
    assert rows["base", "drift logprob_gap"][2] == "as expected"  # base 0.0 < grpo 0.3
    assert ("base", "solo pass@1") in rows and ("grpo", "solo pass@1") not in rows

    # marked as the starting senior (eval.start_senior), base gets no reading against the paper
    results = copy.deepcopy(grpo_and_tandem)
    for result in results:
        for entry in result["checkpoints"]:
            entry["start"] = entry["name"] == "base"
    text = eval_report.write_report(results, tmp_path / "start", baseline="grpo").read_text()
    section = text.split("## Against `grpo`")[1].split("\n\n")[1]
    readings = {tuple(c.strip() for c in line.strip("|").split("|"))[0:5:4]
                for line in section.splitlines()[2:]}
    assert {reading for label, reading in readings if label == "base"} == {"before training"}
    assert ("tandem", "as expected") in readings


def test_verdict_reads_the_interval_not_the_point():
    assert verdict(Estimate(0.1, (0.02, 0.2)), "higher") == "as expected"
    assert verdict(Estimate(0.1, (-0.01, 0.2)), "higher") == "within noise"
    assert verdict(Estimate(-0.1, (-0.2, -0.05)), "higher") == "opposite to the paper"
    assert verdict(Estimate(-0.1, (-0.2, -0.05)), "lower") == "as expected"
    assert verdict(Estimate(0.03, (0.01, 0.05)), "about") == "higher: differs"
    assert verdict(Estimate(0.03, None), "about") == "no interval"


def test_paired_difference_interval_is_narrower_than_the_two_intervals(grpo_and_tandem):
    res = collect(grpo_and_tandem)
    base, grpo, tandem = res.checkpoints
    metric = Metric(("handoff",), "pass@1")
    delta = difference(tandem, grpo, metric, res.benchmarks)
    mine = res.get(tandem, metric, "macro")
    theirs = res.get(grpo, metric, "macro")
    assert delta.value == pytest.approx(mine.value - theirs.value)
    assert not delta.approximate and delta.ci[0] > 0
    assert delta.ci[0] <= delta.value <= delta.ci[1]
    # a benchmark the baseline lacks is left out of both sides
    partial = copy.deepcopy(grpo_and_tandem[0])
    del partial["checkpoints"][1]["benchmarks"]["gsm8k"]["handoff"]
    _, short_grpo = collect([partial]).checkpoints
    delta = difference(tandem, short_grpo, metric, res.benchmarks)
    arithmetic = [cp.entry["benchmarks"]["arithmetic"]["handoff"]["pass@1"]
                  for cp in (tandem, short_grpo)]
    assert delta.value == pytest.approx(arithmetic[0] - arithmetic[1])


def test_all_four_plots_are_written_and_linked(grpo_and_tandem, tmp_path):
    report = eval_report.write_report(grpo_and_tandem, tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["dose.png", "handoff_vs_solo.png", "legibility.png", "pass_at_k.png"]
    for name in names:
        assert_png(tmp_path / name)
        assert f"]({name})" in report.read_text()


def test_protocols_not_run_leave_dashes_and_no_plot(grpo_and_tandem, tmp_path):
    solo_only = copy.deepcopy(grpo_and_tandem[1])
    for bench in solo_only["checkpoints"][0]["benchmarks"].values():
        for key in ("handoff", "handoff_junior_first", "handoff_word", "dose", "legibility",
                    "drift"):
            del bench[key]
        del bench["solo"]["pass@1_ci"]  # recomputed from the stored counts
    report = eval_report.write_report([solo_only], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["pass_at_k.png"]
    rows = table_rows(report.read_text())
    assert {metric for _, metric in rows} == {f"solo pass@{k}" for k in (1, 2, 4, 8)}
    bench = solo_only["checkpoints"][0]["benchmarks"]["arithmetic"]["solo"]
    _, low, high = parse(rows["arithmetic", "solo pass@1"][0])
    assert (low, high) == pytest.approx(
        bootstrap_ci([pass_at_k(N, c, 1) for c in bench["correct"]]), abs=5e-4)

    # side by side with a full checkpoint: its missing protocols read "-"
    eval_report.write_report([solo_only, grpo_and_tandem[0]], tmp_path / "both")
    rows = table_rows((tmp_path / "both" / "report.md").read_text())
    assert rows["macro", "hand-off (senior first) pass@1"][0] == "-"
    assert rows["macro", "hand-off (senior first) pass@1"][1] != "-"


def test_a_checkpoint_name_seen_twice_is_told_apart(grpo_and_tandem, tmp_path):
    text = eval_report.write_report([grpo_and_tandem[0], grpo_and_tandem[0]],
                                    tmp_path).read_text()
    assert "| base | grpo | base #2 | grpo #2 |" in text


def test_cli_writes_the_report_from_two_files(grpo_and_tandem, tmp_path):
    paths = []
    for number, data in enumerate(grpo_and_tandem):
        paths.append(tmp_path / f"eval{number}" / "eval.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "tandem.output.eval_report", *map(str, paths),
                           "--out", str(out), "--baseline", "grpo"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "| benchmark | metric | paper expects | base | grpo | tandem |" in done.stdout
    assert (out / "report.md").exists() and len(list(out.glob("*.png"))) == 4


def test_bad_input_is_one_clear_line(grpo_and_tandem, tmp_path, capsys):
    broken = tmp_path / "eval.json"
    broken.write_text('{"checkpoints": [')
    assert eval_report.main([str(broken), "--out", str(tmp_path / "out")]) == 2
    assert f"{broken}: not JSON" in capsys.readouterr().err
    broken.write_text('{"checkpoints": []}')
    assert eval_report.main([str(broken), "--out", str(tmp_path / "out")]) == 2
    assert 'no "checkpoints" list' in capsys.readouterr().err
    with pytest.raises(EvalReportError, match="baseline 'sft' is none of the checkpoints"):
        eval_report.write_report(grpo_and_tandem, tmp_path, baseline="sft")
    wrong = copy.deepcopy(grpo_and_tandem[1])
    wrong["checkpoints"][0]["benchmarks"]["gsm8k"]["handoff"]["pass@2"] = "0.5"
    with pytest.raises(EvalReportError, match="checkpoint 'tandem': handoff pass@2 must be a "
                                              "number, got '0.5'"):
        eval_report.write_report([wrong], tmp_path)
    wrong["checkpoints"][0]["benchmarks"]["gsm8k"]["handoff"]["pass@2"] = 0.5
    wrong["checkpoints"][0]["benchmarks"]["gsm8k"]["dose"]["half"] = {"pass@1": 0.1}
    with pytest.raises(EvalReportError, match=r"dose keys must be probabilities p in \[0, 1\]"):
        eval_report.write_report([wrong], tmp_path)
