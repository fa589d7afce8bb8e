"""bench.all's report: headline lines parsed, the table written, notes around it kept."""

from __future__ import annotations

from bench.all import (
    BEGIN,
    END,
    cpu_model,
    last_paragraphs,
    merge,
    parse_figures,
    plot_schedules,
    printed_lines,
    section,
    table,
)

OUTPUT = """tiny: 8 episodes x <= 64 tokens
schedule      tok/s  ratio
tandem/solo step (tiny): 0.80
tandem/solo step: 0.84
tandem/solo word: 0.59
learner/plain: 1.02
push GB/s: 1.37
trl/tandem step time: 2.50
"""


def test_headline_lines_become_figures_and_the_last_of_a_name_wins():
    figures = parse_figures(OUTPUT)
    assert figures["tandem/solo step"] == 0.84
    assert figures["tandem/solo step (tiny)"] == 0.80
    assert figures["trl/tandem step time"] == 2.5
    assert "schedule      tok/s  ratio" not in figures
    assert parse_figures("push GB/s: 1.0\npush GB/s: 2.0")["push GB/s"] == 2.0


def test_the_table_names_figure_value_goal_machine_date_and_command():
    rows = [{"figure": "trl/tandem step time", "value": 2.5, "goal": ">= 2",
             "machine": "AMD EPYC 9B14 (2 cores)", "date": "2026-12-01",
             "command": "python -m bench.vs_trl"},
            {"figure": "push GB/s", "value": None, "unit": " GB/s", "goal": ">= 1 on CPU",
             "machine": "m", "date": "d", "command": "python -m bench.weight_sync"}]
    lines = table(rows).splitlines()
    assert lines[0] == "| figure | value | goal | machine | date | command |"
    assert lines[2] == ("| trl/tandem step time | 2.50 | >= 2 | AMD EPYC 9B14 (2 cores) | "
                        "2026-12-01 | `python -m bench.vs_trl` |")
    assert "| push GB/s | not measured | >= 1 on CPU |" in lines[3]


def test_a_rerun_replaces_only_the_generated_section(tmp_path):
    rows = [{"figure": "learner/plain", "value": 0.95, "goal": ">= 0.9", "machine": "m",
             "date": "d", "command": "python -m bench.learner"}]
    first = merge("# Benchmarks\n\nHand-written notes.\n",
                  section(rows, {"bench.learner": "learner/plain: 0.95"}, None, quick=True))
    assert first.startswith("# Benchmarks\n\nHand-written notes.\n")
    assert "quick mode" in first and "| learner/plain | 0.95 |" in first
    second = merge(first + "\nMore notes after.\n",
                   section([{**rows[0], "value": 1.05}], {}, "benchmarks/schedules.png", False))
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "| learner/plain | 1.05 |" in second and "0.95 |" not in second
    assert "Hand-written notes." in second and "More notes after." in second
    assert "![tandem/solo rollout throughput by schedule](benchmarks/schedules.png)" in second


def test_cpu_model_names_the_model_and_counts_cores():
    info = "processor\t: 0\nmodel name\t: Intel Xeon X\n\n" * 2
    assert cpu_model(info) == "Intel Xeon X (2 cores)"


def test_the_schedule_plot_is_written(tmp_path):
    path = tmp_path / "benchmarks" / "schedules.png"
    plot_schedules({"tiny": {"solo": 1.0, "step": 0.8, "word": 0.45},
                    "smollm2": {"solo": 1.0, "step": 0.84, "word": 0.59}}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_ray_worker_logs_stay_out_of_the_printed_output():
    output = ("\x1b[36m(RolloutEngineActor pid=16503)\x1b[0m INFO engine stopped\n"
              "(LearnerActor pid=12, ip=10.0.0.2) Loading weights\n"
              "schedule      tok/s  ratio\n(a parenthesis that is not Ray's)\n"
              "tandem/solo step: 0.84\n")
    assert printed_lines(output) == ["schedule      tok/s  ratio",
                                     "(a parenthesis that is not Ray's)",
                                     "tandem/solo step: 0.84"]


def test_a_long_output_is_cut_between_paragraphs_not_inside_a_table():
    """bench.rollout prints a table per model: a cut 30 lines from the end (the limit then) fell
    one line into the first table and dropped the line naming its model (the 2026-12-02 run)."""
    tiny = ["tiny: 32 episodes", "schedule tok/s", *[f"row {i}" for i in range(20)]]
    smollm2 = ["smollm2: 32 episodes", "schedule tok/s", *[f"row {i}" for i in range(8)]]
    lines = [*tiny, "", *smollm2, "", "tandem/solo step: 0.91"]
    assert last_paragraphs(lines, limit=100) == lines
    assert last_paragraphs(lines, limit=len(lines) - 1) == [*smollm2, "", "tandem/solo step: 0.91"]
    assert last_paragraphs(lines, limit=2) == ["tandem/solo step: 0.91"]
    one_long_paragraph = [f"line {i}" for i in range(50)]
    assert last_paragraphs(one_long_paragraph, limit=40) == one_long_paragraph[10:]
    assert last_paragraphs(["a", "", *one_long_paragraph], limit=40) == one_long_paragraph


def test_a_failed_benchmark_leaves_the_others_figures_written(tmp_path, monkeypatch):
    """One benchmark failing (the last, after an hour of the others) must not lose the rest:
    bench.all writes the document with its figures 'not measured', then exits non-zero."""
    import sys

    import pytest

    import bench.all as bench_all

    def fake_run(bench, quick, scratch):
        if bench.module == "weight_sync":
            return "python -m bench.weight_sync", "Traceback ...", {}, 1
        return f"python -m bench.{bench.module}", "learner/plain: 0.97\n", {}, 0

    monkeypatch.setattr(bench_all, "run_bench", fake_run)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\nnotes\n\n{BEGIN}\nold\n{END}\n")
    monkeypatch.setattr(sys, "argv", ["bench.all", "--only", "learner", "weight_sync",
                                      "--out", str(out)])
    with pytest.raises(SystemExit, match="bench.weight_sync failed"):
        bench_all.main()
    written = out.read_text()
    assert "| learner/plain | 0.97 |" in written
    assert "| push GB/s | not measured |" in written
    assert "bench.weight_sync failed (exit 1)" in written
    assert "notes" in written and "\nold\n" not in written
    assert "<summary>bench.learner output, 0.0 min</summary>" in written  # each one's wall time
    assert "minutes of benchmarks in all." in written
