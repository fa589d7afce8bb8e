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


def _section_of_three_benchmarks() -> str:
    """A document as a full bench.all run leaves it: rollout, learner and weight_sync."""
    rows = [{"figure": "tandem/solo step", "value": 0.91, "goal": ">= 0.95", "machine": "m",
             "date": "2026-12-01", "command": "python -m bench.rollout --tokens 128"},
            {"figure": "learner/plain", "value": None, "goal": ">= 0.9 (world size 1)",
             "machine": "m", "date": "2026-12-01", "command": "python -m bench.learner"},
            {"figure": "push GB/s", "value": 0.32, "unit": " GB/s", "goal": ">= 1 on CPU",
             "machine": "m", "date": "2026-12-01", "command": "python -m bench.weight_sync"}]
    outputs = {"bench.rollout": "schedule  tok/s\n\nsolo  2592.8\ntandem/solo step: 0.91",
               "bench.learner": "learner/plain: n/a", "bench.weight_sync": "push GB/s: 0.32"}
    generated = section(rows, outputs, "benchmarks/schedules.png", quick=False,
                        minutes={"bench.rollout": 19.5, "bench.learner": 9.9,
                                 "bench.weight_sync": 4.6})
    return merge("# Benchmarks\n\nnotes\n", generated)


def test_keep_reruns_one_benchmark_and_keeps_every_other_row_and_output(tmp_path, monkeypatch):
    import sys

    import bench.all as bench_all

    ran = []

    def fake_run(bench, quick, scratch):
        ran.append(bench.module)
        return "python -m bench.weight_sync", "rest\npush GB/s: 0.41\n", {}, 0

    monkeypatch.setattr(bench_all, "run_bench", fake_run)
    out = tmp_path / "BENCHMARKS.md"
    before = _section_of_three_benchmarks()
    out.write_text(before)
    monkeypatch.setattr(sys, "argv", ["bench.all", "--only", "weight_sync", "--keep",
                                      "--out", str(out)])
    bench_all.main()
    after = out.read_text()
    assert ran == ["weight_sync"]
    lines = after.splitlines()
    rollout_row = next(line for line in before.splitlines() if "| tandem/solo step |" in line)
    learner_row = next(line for line in before.splitlines() if "| learner/plain |" in line)
    push_row = next(line for line in lines if line.startswith("| push GB/s |"))
    # the kept rows as they were, in the benchmarks' order; the rerun's row dated today
    assert lines.index(rollout_row) < lines.index(learner_row) < lines.index(push_row)
    assert "| 0.41 GB/s | >= 1 on CPU |" in push_row and "2026-12-01" not in push_row
    for name in ("bench.rollout", "bench.learner"):  # outputs and minutes kept too
        block = before[before.index(f"<summary>{name}"):]
        block = block[:block.index("</details>")]
        assert block in after
    assert "<summary>bench.weight_sync output, 0.0 min</summary>" in after
    assert "push GB/s: 0.32" not in after and "push GB/s: 0.41" in after
    assert "](benchmarks/schedules.png)" in after  # rollout not rerun: its plot stays
    assert "29 minutes of benchmarks in all" in after  # 19.5 + 9.9 + 0.0
    assert ("bench.weight_sync rerun alone (`--only ... --keep`). Rows and outputs kept from "
            "an earlier run of bench.rollout, bench.learner: the dates say") in after
    assert after.startswith("# Benchmarks\n\nnotes\n")

    # read back again, nothing is lost: a second --keep run leaves the kept rows as they are
    earlier = bench_all.read_section(after)
    assert [row["figure"] for row in earlier.rows["bench.rollout"]] == ["tandem/solo step"]
    assert earlier.rows["bench.learner"][0]["value"] is None
    assert earlier.rows["bench.weight_sync"][0]["value"] == 0.41
    assert table(earlier.rows["bench.rollout"]).splitlines()[2] == rollout_row


def test_keep_needs_only_and_a_section_written_in_the_same_mode(tmp_path, monkeypatch,
                                                                  capsys):
    import sys

    import pytest

    import bench.all as bench_all

    monkeypatch.setattr(bench_all, "run_bench", lambda *a: pytest.fail("nothing may run"))
    out = tmp_path / "BENCHMARKS.md"
    for document, argv, message in [
            (_section_of_three_benchmarks(), ["--keep"], "name the ones to rerun with --only"),
            ("# Benchmarks\n", ["--only", "learner", "--keep"], "no section written by"),
            (_section_of_three_benchmarks(), ["--only", "learner", "--keep", "--quick"],
             "written without --quick")]:
        out.write_text(document)
        monkeypatch.setattr(sys, "argv", ["bench.all", *argv, "--out", str(out)])
        with pytest.raises(SystemExit):
            bench_all.main()
        assert message in capsys.readouterr().err
        assert out.read_text() == document  # untouched


def test_notes_edited_while_the_benchmarks_run_survive_the_rewrite(tmp_path, monkeypatch):
    import sys

    import bench.all as bench_all

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(_section_of_three_benchmarks())

    def fake_run(bench, quick, scratch):  # someone edits the notes during an 80-minute run
        out.write_text(out.read_text().replace("notes\n", "notes, edited meanwhile\n"))
        return "python -m bench.weight_sync", "push GB/s: 0.41\n", {}, 0

    monkeypatch.setattr(bench_all, "run_bench", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench.all", "--only", "weight_sync", "--keep",
                                      "--out", str(out)])
    bench_all.main()
    written = out.read_text()
    assert "notes, edited meanwhile" in written and "| 0.41 GB/s |" in written
    assert "| tandem/solo step | 0.91 |" in written
