"""Data: sources, malformed rows, answer formats, hold-out, the resumable stream, prompts."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import operator
import re
import sys

import pytest
from omegaconf import OmegaConf

from tandem.arithmetic import drill_facts, generate_arithmetic, generate_drill
from tandem.config.checks import ConfigError
from tandem.config.compose import CONF_DIR, user_errors
from tandem.config.schema import PAPER_INSTRUCTION, DataConfig
from tandem.data import (
    DataError,
    Problem,
    PromptStream,
    drop_long_prompts,
    format_prompt,
    holdout_rows,
    load_problems,
    reasoning_gym_rows,
)
from tandem.reward import verify_one

# ----------------------------------------------------------------------------- helpers

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str) -> int:
    """+, -, *, negation and parentheses over integers, evaluated independently of tandem.data."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


# each one-step story, with how its numbers give the answer
_STORIES = [
    (r"has (\d+) \w+ and buys (\d+) more\. How many", lambda a, b: a + b),
    (r"has (\d+) \w+ and gives (\d+) of them to a friend\. How many", lambda a, b: a - b),
    (r"buys (\d+) boxes with (\d+) \w+ in each box\. How many", lambda a, b: a * b),
    (r"shares (\d+) \w+ equally among (\d+) friends\. How many", lambda a, b: a // b),
]


def _expected_answer(problem: str) -> tuple[str, int]:
    """(kind, answer) worked out from the problem text alone."""
    if match := re.fullmatch(r"What is ([\d +\-*()]+)\?", problem):
        return "expression", _evaluate(match.group(1))
    for index, (pattern, solve) in enumerate(_STORIES):
        if match := re.search(pattern, problem):
            return f"story{index}", solve(int(match.group(1)), int(match.group(2)))
    raise AssertionError(f"generated problem of no known kind: {problem!r}")


def _write_jsonl(path, rows) -> str:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _problems(n: int) -> list[Problem]:
    return [Problem(uid=f"t/{i}", problem=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n)]


def _take(stream: PromptStream, batches: int) -> list[list[str]]:
    return [[p.uid for p in stream.next_batch()] for _ in range(batches)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The test kit's real BPE tokenizer with its ChatML template (conftest's tiny model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ----------------------------------------------------------------------------- generated set


def test_generated_set_is_deterministic_and_depends_on_seed():
    assert generate_arithmetic(300, seed=0) == generate_arithmetic(300, seed=0)
    assert generate_arithmetic(300, seed=0) != generate_arithmetic(300, seed=1)
    assert generate_arithmetic(50, seed=0) == generate_arithmetic(300, seed=0)[:50]


def test_generated_answers_are_correct_integers_over_a_mix_of_kinds():
    rows = generate_arithmetic(1000, seed=7)
    kinds = set()
    for row in rows:
        kind, answer = _expected_answer(row["problem"])
        kinds.add(kind)
        assert row["answer"] == str(answer), row
        assert answer >= 0, row
    assert kinds == {"expression", "story0", "story1", "story2", "story3"}
    expressions = [r["problem"] for r in rows if r["problem"].startswith("What is")]
    assert any("(" in p for p in expressions), "no multi-step expression with parentheses"
    assert any(" - " in p for p in expressions) and any(" * " in p for p in expressions)
    assert len({r["problem"] for r in rows}) > 900, "too many duplicate problems"


def test_generated_source_loads_and_splits():
    cfg = DataConfig(source="generated:arithmetic", num_generated=300, holdout_size=30)
    train, holdout, report = load_problems(cfg)
    assert (len(train), len(holdout), report.total_rows, report.bad_rows) == (270, 30, 300, ())
    assert train[0].uid == "arithmetic/0" or holdout[0].uid == "arithmetic/0"
    assert all(p.answer.isdigit() for p in train + holdout)


def test_unknown_generator_lists_the_known_ones():
    with pytest.raises(DataError, match="generated:arithmetic"):
        load_problems(DataConfig(source="generated:algebra"))


# ----------------------------------------------------------------------------- reasoning-gym

_RG_ARGS = {"min_terms": 3, "max_terms": 4, "max_digits": 2, "operators": ["+", "-", "*"]}


def _shipped_rg_set(**changes) -> DataConfig:
    """conf/data/rg_basic_arithmetic.yaml as a run or a benchmark composes it."""
    conf = OmegaConf.load(CONF_DIR / "data" / "rg_basic_arithmetic.yaml")
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), conf))
    return dataclasses.replace(data, **changes)


def test_reasoning_gym_rows_are_a_fixed_set_per_seed_and_options():
    rows = reasoning_gym_rows("basic_arithmetic", _RG_ARGS, 40, seed=0)
    assert rows == reasoning_gym_rows("basic_arithmetic", _RG_ARGS, 40, seed=0)
    assert rows != reasoning_gym_rows("basic_arithmetic", _RG_ARGS, 40, seed=1)
    assert rows != reasoning_gym_rows("basic_arithmetic", {**_RG_ARGS, "max_digits": 3}, 40,
                                      seed=0)


def test_shipped_reasoning_gym_set_has_right_answers_the_reward_grades():
    train, holdout, report = load_problems(_shipped_rg_set(num_generated=40, holdout_size=8))
    assert (len(train), len(holdout), report.bad_rows) == (32, 8, ())
    assert train[0].uid == "rg_basic_arithmetic/0" or holdout[0].uid == "rg_basic_arithmetic/0"
    for problem in train + holdout:
        value = _evaluate(re.fullmatch(r"Calculate (.+)\.", problem.problem).group(1))
        assert problem.answer == str(value), problem
        assert verify_one(f"So it is \\boxed{{{value}}}.", problem.answer).status == "correct"
        assert verify_one(f"\\boxed{{{value + 1}}}", problem.answer).status == "wrong"
    assert any(p.answer.startswith("-") for p in train), "no negative answers to grade"


def test_unknown_reasoning_gym_task_is_named_with_how_to_list_the_tasks():
    with pytest.raises(DataError, match=r"no task 'basic_arithmetc' \(close: basic_arithmetic"
                                        r".*print\(sorted\(f.DATASETS\)\)"):
        load_problems(DataConfig(source="reasoning_gym:basic_arithmetc"))


def test_reasoning_gym_options_are_checked():
    with pytest.raises(DataError, match=r"\['max_digit'\] are not options of basic_arithmetic; "
                                        r"it takes .*max_digits"):
        load_problems(_shipped_rg_set(generator_args={"max_digit": 2}))
    with pytest.raises(DataError, match="max_terms must be >= min_terms"):
        load_problems(_shipped_rg_set(generator_args={"min_terms": 4, "max_terms": 2}))
    with pytest.raises(ConfigError, match="only read by a reasoning_gym:<task> source"):
        DataConfig(source="generated:drill", generator_args={"max_digits": 2})
    with pytest.raises(ConfigError, match="data.generator_args.seed is set by tandem"):
        _shipped_rg_set(generator_args={"seed": 3})


def test_missing_reasoning_gym_says_how_to_install_it(monkeypatch):
    for name in ("reasoning_gym", "reasoning_gym.factory"):  # importing them now fails
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DataError, match=r"pip install 'tandem\[reasoning\]'"):
        load_problems(_shipped_rg_set())


# ----------------------------------------------------------------------------- files


def _jsonl_with_bad_rows(tmp_path, good: int):
    """A JSONL file with `good` valid rows and malformed rows at known line numbers."""
    rows = [{"problem": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(good)]
    bad = {
        3: "{not json",
        10: {"problem": "What is 1 + 1?"},  # no answer
        20: {"problem": "   ", "answer": "1"},
        30: {"problem": {"text": "What is 2 + 2?"}, "answer": "4"},
        40: {"problem": ["What is", "3 + 3?"], "answer": "6"},
        50: {"problem": "What is 4 + 4?", "answer": None},
        60: ["a", "list", "not", "an", "object"],
    }
    for line in sorted(bad):
        rows.insert(line - 1, bad[line])
    return _write_jsonl(tmp_path / "train.jsonl", rows), sorted(bad)


def test_jsonl_malformed_rows_under_the_threshold_are_skipped_and_reported(tmp_path, caplog):
    source, bad_lines = _jsonl_with_bad_rows(tmp_path, good=200)
    cfg = DataConfig(name="mine", source=source, holdout_size=0, max_bad_row_frac=0.05)
    with caplog.at_level(logging.WARNING, logger="tandem.data"):
        train, _, report = load_problems(cfg)
    assert len(train) == 200 and report.total_rows == 207
    assert [n for n, _ in report.bad_rows] == bad_lines
    assert report.unit == "line"
    warning = caplog.text
    assert "skipped 7 of 207" in warning
    assert all(str(n) in warning for n in bad_lines)
    assert "not valid JSON" in warning and "missing 'answer'" in warning
    # uids carry the line number, so they do not shift when a bad row is fixed
    assert {"mine/1", "mine/2", "mine/4"} <= {p.uid for p in train}
    assert "mine/3" not in {p.uid for p in train}


def test_jsonl_malformed_rows_over_the_threshold_raise_naming_the_field(tmp_path):
    source, bad_lines = _jsonl_with_bad_rows(tmp_path, good=200)
    cfg = DataConfig(source=source, holdout_size=0, max_bad_row_frac=0.01)
    with pytest.raises(DataError) as error:
        load_problems(cfg)
    message = str(error.value)
    assert "data.max_bad_row_frac" in message and "train.jsonl" in message
    assert "7 of 207" in message and "3 (not valid JSON" in message


UNREADABLE_GOLDS = ["$$", "\\text{}", "\\!"]


@pytest.mark.parametrize("gold", UNREADABLE_GOLDS)
def test_a_gold_answer_the_reward_cannot_read_is_a_reported_row_not_a_dead_run(tmp_path, gold,
                                                                              caplog):
    # Graded mid-run, such a gold raised in the reward pool and stopped the run (again after
    # resume); now the load skips it and names its line.
    with pytest.raises(ValueError, match="extracts nothing"):
        verify_one("\\boxed{1}", gold)
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(30)]
    rows.insert(6, {"problem": "What is the answer?", "answer": gold})
    cfg = DataConfig(name="golds", source=_write_jsonl(tmp_path / "g.jsonl", rows),
                     holdout_size=0, max_bad_row_frac=0.05)
    with caplog.at_level(logging.WARNING, logger="tandem.data"):
        train, _, report = load_problems(cfg)
    assert [n for n, _ in report.bad_rows] == [7]
    assert "gold answer" in report.bad_rows[0][1] and "g.jsonl" in caplog.text
    assert "golds/7" not in {p.uid for p in train} and len(train) == 30
    assert all(verify_one(f"\\boxed{{{p.answer}}}", p.answer).status == "correct" for p in train)


def test_too_many_unreadable_golds_fail_the_load_naming_file_lines_and_field(tmp_path):
    rows = [{"problem": f"Q{i}?", "answer": ("\\text{}" if i % 2 else f"{i}")} for i in range(10)]
    cfg = DataConfig(source=_write_jsonl(tmp_path / "half.jsonl", rows), holdout_size=0)
    with pytest.raises(DataError) as error:
        load_problems(cfg)
    message = str(error.value)
    assert "half.jsonl: 5 of 10 rows" in message and "data.max_bad_row_frac" in message
    assert "lines 2 (math-verify extracts nothing" in message


def test_invalid_utf8_line_is_a_skipped_row_not_a_failed_load(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"problem": f"What is {i} + π?", "answer": f"{i} + \\pi"},
                       ensure_ascii=False).encode() for i in range(40)]
    lines = [b"\xef\xbb\xbf" + good[0], *good[1:20], b'{"problem": "caf\xe9", "answer": "1"}',
             *good[20:]]  # a BOM on line 1; line 21 is Latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(name="mixed", source=str(path), holdout_size=0, max_bad_row_frac=0.05)
    train, _, report = load_problems(cfg)
    assert report.bad_rows == ((21, "not valid UTF-8 (byte 17)"),)
    assert len(train) == 40 and train[0].problem == "What is 0 + π?"


def test_invalid_json_reports_where_on_the_line(tmp_path):
    rows = [{"problem": f"Q{i}?", "answer": "1"} for i in range(50)]
    rows.insert(9, '{"problem": "Q?", "answer": 1,}')
    cfg = DataConfig(source=_write_jsonl(tmp_path / "comma.jsonl", rows), holdout_size=0,
                     max_bad_row_frac=0.05)
    (line, why), = load_problems(cfg)[2].bad_rows
    assert line == 10 and why.startswith("not valid JSON (") and "column 31" in why


def test_a_corrupt_parquet_file_is_one_line_naming_the_source(tmp_path):
    path = tmp_path / "cut.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError) as error:
        load_problems(DataConfig(source=str(path), holdout_size=0))
    message = str(error.value)
    assert message.startswith(f"data.source={str(path)!r} is not a readable Parquet file")
    assert "\n" not in message


def test_data_model_and_resume_errors_print_one_line_and_exit_2(capsys, tmp_path):
    # what `python -m tandem.train` / `tandem.evaluate` wrap their run in
    from tandem.checkpoint import find_resume
    from tandem.models import ModelNotFoundError, load_tokenizer, resolve_model

    def exit_line(run) -> str:
        with pytest.raises(SystemExit) as done, user_errors():
            run()
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    bad = _write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"])
    assert "bad.jsonl: 2 of 2 rows" in exit_line(
        lambda: load_problems(DataConfig(source=bad, holdout_size=0)))
    assert "trainer.resume=" in exit_line(lambda: find_resume(str(tmp_path), tmp_path))
    assert "does not exist" in exit_line(lambda: resolve_model(str(tmp_path / "nowhere")))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert "no tokenizer loads from" in exit_line(lambda: load_tokenizer(str(bare)))
    assert issubclass(ModelNotFoundError, FileNotFoundError)  # callers that catch it still do
    with pytest.raises(KeyError), user_errors():  # a bug stays a traceback
        raise KeyError("not the user's input")


def test_gsm8k_answer_format_takes_the_text_after_the_marks(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"5 * 250 = 1250.\n#### 1,2{i}0"} for i in range(99)]
    rows.append({"question": "Q?", "answer": "no final answer marks"})
    source = _write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    cfg = DataConfig(source=source, problem_field="question", answer_format="gsm8k",
                     holdout_size=0, max_bad_row_frac=0.05)
    train, _, report = load_problems(cfg)
    assert train[3].answer == "1230"
    assert [n for n, _ in report.bad_rows] == [100]


def test_boxed_answer_format_takes_the_last_balanced_box(tmp_path):
    rows = [
        {"problem": "P1", "solution": "First \\boxed{1}, then \\boxed{\\frac{3}{\\sqrt{4}}}."},
        {"problem": "P2", "solution": "So $x = \\boxed{ 42 }$"},
        {"problem": "P3", "solution": "no box at all"},
        {"problem": "P4", "solution": "\\boxed{2} and broken \\boxed{\\frac{1}{2}"},
    ]
    source = _write_jsonl(tmp_path / "math.jsonl", rows)
    cfg = DataConfig(source=source, answer_field="solution", answer_format="boxed",
                     holdout_size=0, max_bad_row_frac=0.5)
    train, _, report = load_problems(cfg)
    assert [p.answer for p in train] == ["\\frac{3}{\\sqrt{4}}", "42"]
    assert [n for n, _ in report.bad_rows] == [3, 4]


def test_numeric_answers_become_strings(tmp_path):
    rows = [{"problem": "A", "answer": 70}, {"problem": "B", "answer": 70.0},
            {"problem": "C", "answer": 0.5}, {"problem": "D", "answer": True}]
    source = _write_jsonl(tmp_path / "n.jsonl", rows)
    cfg = DataConfig(source=source, holdout_size=0, max_bad_row_frac=0.5)
    train, _, report = load_problems(cfg)
    assert [p.answer for p in train] == ["70", "70", "0.5"]
    assert [n for n, _ in report.bad_rows] == [4]


def test_parquet_loads(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["What is 2 + 2?", "What is 3 * 3?", ""],
                             "answer": ["4", "9", "1"]}), path)
    cfg = DataConfig(name="pq", source=str(path), problem_field="question", holdout_size=0,
                     max_bad_row_frac=0.5)
    train, _, report = load_problems(cfg)
    assert [(p.uid, p.answer) for p in train] == [("pq/0", "4"), ("pq/1", "9")]
    assert [n for n, _ in report.bad_rows] == [2]
    with pytest.raises(DataError, match=r"data.problem_field='problem'.*columns"):
        load_problems(DataConfig(source=str(path), holdout_size=0))


def test_dataset_id_without_the_datasets_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_problems(DataConfig(source="openai/gsm8k", subset="main"))


def test_a_dataset_id_that_does_not_load_names_source_subset_and_split(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", offline, raising=False)
    with pytest.raises(DataError) as error:
        load_problems(DataConfig(source="org/set", subset="main", split="test"))
    assert str(error.value).startswith("data.source='org/set' (data.subset='main', data.split="
                                       "'test') does not load: ConnectionError: Couldn't reach")
    assert "\n" not in str(error.value)


def test_holdout_larger_than_the_data_names_the_field(tmp_path):
    # a generated set's size is known at compose time; a file's only once it is read
    with pytest.raises(ConfigError, match="data.holdout_size=50 .* data.num_generated=50"):
        DataConfig(source="generated:arithmetic", num_generated=50, holdout_size=50)
    source = _write_jsonl(tmp_path / "three.jsonl",
                          [{"problem": f"{i} + 1?", "answer": str(i + 1)} for i in range(3)])
    with pytest.raises(DataError, match="data.holdout_size=3 leaves no training rows"):
        load_problems(DataConfig(source=source, holdout_size=3))


# ----------------------------------------------------------------------------- hold-out


def test_holdout_is_the_rows_pandas_sample_draws_from_the_usable_rows(tmp_path):
    # The authors' split: DataFrame.sample(n=1000, random_state=0) over the rows left after
    # their filter, in file order; here the usable rows (malformed ones are skipped first).
    import pandas as pd

    source, _ = _jsonl_with_bad_rows(tmp_path, good=300)
    cfg = DataConfig(name="mine", source=source, holdout_size=40, max_bad_row_frac=0.05)
    train, holdout, _ = load_problems(cfg)
    usable = pd.DataFrame({"uid": [p.uid for p in sorted(
        train + holdout, key=lambda p: int(p.uid.split("/")[1]))]})
    assert len(usable) == 300
    drawn = usable.sample(n=40, random_state=0)["uid"].tolist()
    assert [p.uid for p in holdout] == drawn  # the same rows, in the order pandas draws them
    assert [p.uid for p in train] == usable.drop(
        usable.sample(n=40, random_state=0).index)["uid"].tolist()

    other = DataConfig(name="mine", source=source, holdout_size=40, max_bad_row_frac=0.05,
                       holdout_seed=7)
    assert [p.uid for p in load_problems(other)[1]] == usable.sample(
        n=40, random_state=7)["uid"].tolist()


def test_holdout_rows_match_pandas_at_the_papers_size():
    import pandas as pd

    frame = pd.DataFrame({"row": range(40309)})  # DeepScaleR's usable rows
    assert holdout_rows(40309, 1000, 0) == frame.sample(n=1000, random_state=0).index.tolist()


def test_holdout_does_not_move_with_the_stream():
    cfg = DataConfig(source="generated:arithmetic", num_generated=400, holdout_size=40)
    train, holdout, _ = load_problems(cfg)
    train_ids, holdout_ids = {p.uid for p in train}, {p.uid for p in holdout}
    assert not train_ids & holdout_ids and len(train_ids | holdout_ids) == 400
    stream = PromptStream(train, batch_size=16, seed=3)
    _take(stream, 30)  # past the first epoch
    assert load_problems(cfg)[1] == holdout


# ----------------------------------------------------------------------------- the stream


def test_shuffle_is_deterministic_per_seed_and_differs_across_seeds():
    problems = _problems(50)
    first = _take(PromptStream(problems, batch_size=8, seed=0), 12)
    assert first == _take(PromptStream(problems, batch_size=8, seed=0), 12)
    assert first != _take(PromptStream(problems, batch_size=8, seed=1), 12)
    assert [u for b in first for u in b][:50] != [p.uid for p in problems], "not shuffled"


def test_each_epoch_visits_every_problem_once_in_a_new_order():
    problems = _problems(10)
    stream = PromptStream(problems, batch_size=3, seed=5)
    flat = [u for batch in _take(stream, 10) for u in batch]  # 30 = exactly 3 epochs
    epochs = [flat[i:i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == sorted(p.uid for p in problems) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream.epoch == 3


def test_state_dict_round_trip_replays_the_same_batches_across_epochs():
    problems = _problems(10)
    stream = PromptStream(problems, batch_size=4, seed=2)
    _take(stream, 2)  # position 8 of epoch 0
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint stores it
    assert (state["epoch"], state["position"]) == (0, 8)
    expected = _take(stream, 5)  # ends epoch 0, runs through epoch 1 into epoch 2

    resumed = PromptStream(problems, batch_size=4, seed=2)
    resumed.load_state_dict(state)
    assert _take(resumed, 5) == expected
    assert resumed.epoch == stream.epoch == 2


def test_load_state_dict_rejects_another_seed_or_other_problems():
    state = PromptStream(_problems(10), batch_size=4, seed=2).state_dict()
    with pytest.raises(DataError, match="seed=2"):
        PromptStream(_problems(10), batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="holdout_size"):
        PromptStream(_problems(11), batch_size=4, seed=2).load_state_dict(state)


# ----------------------------------------------------------------------------- prompts


def test_format_prompt_uses_the_chat_template_and_the_instruction(tokenizer):
    ids = format_prompt(tokenizer, "What is 17 + 25?", PAPER_INSTRUCTION)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n")
    assert f"What is 17 + 25? {PAPER_INSTRUCTION}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    generation_prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(generation_prompt):] == generation_prompt
    assert tokenizer.decode(format_prompt(tokenizer, "Hi?", "")).count("Hi?<|im_end|>") == 1


def test_format_prompt_keeps_the_problem_text_as_written(tokenizer, tmp_path):
    # The authors' prompt is problem + " " + instruction with nothing stripped.
    source = _write_jsonl(tmp_path / "p.jsonl", [{"problem": "What is 2 + 2?\n", "answer": "4"}])
    (problem,), _, _ = load_problems(DataConfig(source=source, holdout_size=0))
    text = tokenizer.decode(format_prompt(tokenizer, problem.problem, PAPER_INSTRUCTION))
    assert f"What is 2 + 2?\n {PAPER_INSTRUCTION}<|im_end|>" in text


def test_format_prompt_turns_thinking_off_where_the_template_reads_enable_thinking(tokenizer):
    from copy import deepcopy

    # Qwen3's hybrid template, reduced to its generation prompt: an empty thinking block when
    # enable_thinking is false, thinking mode otherwise.
    hybrid = deepcopy(tokenizer)
    hybrid.chat_template = tokenizer.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' }}",
        "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
        "enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
    assert hybrid.chat_template != tokenizer.chat_template
    text = hybrid.decode(format_prompt(hybrid, "What is 1 + 1?", PAPER_INSTRUCTION))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain = tokenizer.decode(format_prompt(tokenizer, "What is 1 + 1?", PAPER_INSTRUCTION))
    assert plain.endswith("<|im_start|>assistant\n")  # a template without it: unchanged


def test_format_prompt_without_a_chat_template_says_what_to_use(tokenizer):
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        format_prompt(plain, "What is 1 + 1?", PAPER_INSTRUCTION)


def test_long_prompts_are_dropped_and_counted_not_truncated(tokenizer):
    short = Problem("t/0", "What is 1 + 1?", "2")
    long = Problem("t/1", "What is " + " + ".join(["1"] * 200) + "?", "200")
    limit = len(format_prompt(tokenizer, short.problem, PAPER_INSTRUCTION))
    kept, dropped = drop_long_prompts([short, long], tokenizer, PAPER_INSTRUCTION, limit)
    assert kept == [short] and dropped == ["t/1"]


def test_the_drill_is_164_distinct_facts_and_its_holdout_is_disjoint():
    facts = drill_facts()
    assert len(facts) == len({row["problem"] for row in facts}) == 164
    for row in facts:  # the gold answer is the expression's value
        expression = row["problem"].removeprefix("What is ").removesuffix("?")
        assert str(_evaluate(expression)) == row["answer"]
    assert generate_drill(164, seed=0) != facts and sorted(map(str, generate_drill(164, 0))) \
        == sorted(map(str, facts))
    cfg = DataConfig(source="generated:drill", num_generated=164, holdout_size=48)
    train, holdout, _ = load_problems(cfg)
    held = {p.problem for p in holdout}
    assert len(held) == 48 and held.isdisjoint(p.problem for p in train)
    assert len(train) == 164 - 48
    with pytest.raises(DataError, match="num_generated <= 164"):
        load_problems(DataConfig(source="generated:drill", num_generated=165))
