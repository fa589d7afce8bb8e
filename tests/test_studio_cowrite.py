"""Co-write turns with a real tiny senior engine: a person in the junior's seat."""

from __future__ import annotations

import asyncio
import json

import pytest
import ray

from tandem.alternation import StopRule
from tandem.benchmarks import load_benchmark
from tandem.engine.api import Sampling
from tandem.episode import HUMAN, SENIOR, Episode
from tandem.studio.cowrite import CowriteError
from tandem.studio.episodes import EpisodeFilter, RunEpisodes


@pytest.fixture
def room(studio_room):
    return studio_room


def test_senior_and_person_alternate_and_the_episode_is_saved_with_a_human_author(room):
    tokenizer = room.tokenizer
    problem = room.problem(None, "What is 7 - 3?", "4")
    session = asyncio.run(room.start(problem, schedule="word", handoff_p=0.0))
    first = list(session.response)
    # p = 0: the senior hands over at its first re-draw point, a word boundary (or K tokens)
    assert first and session.writer == "human" and session.authors == [SENIOR] * len(first)
    assert first[-1] in room.boundaries.word or len(first) == room.config.algorithm.max_gap_tokens

    asyncio.run(session.human_turn(" so x is 4"))
    human = tokenizer.encode(" so x is 4", add_special_tokens=False)
    assert session.response[len(first):len(first) + len(human)] == human
    after = session.response[len(first) + len(human):]
    assert after and session.authors[-len(after):] == [SENIOR] * len(after)
    # the person's tokens reached the senior as a junior turn does: its next segment is what
    # one greedy request over prompt + senior + person tokens writes
    alone = ray.get(room.engine.generate.remote(
        session.prompt_ids + first + human, StopRule(max_tokens=len(after)),
        Sampling(temperature=0.0)))
    assert alone.token_ids == after

    asyncio.run(session.end(" The answer is \\boxed{4}."))
    row = session.row
    saved = [json.loads(line) for line in
             (room.out_dir / "episodes" / "step_000000.jsonl").read_text().splitlines()]
    assert saved[-1] == json.loads(json.dumps(row))
    ending = tokenizer.encode(" The answer is \\boxed{4}.", add_special_tokens=False)
    assert row["author_mask"] == ([SENIOR] * len(first) + [HUMAN] * len(human)
                                  + [SENIOR] * len(after) + [HUMAN] * len(ending))
    assert row["segment_starts"] == [0, len(first), len(first) + len(human),
                                     len(first) + len(human) + len(after)]
    assert (row["reward"], row["verdict"], row["finish_reason"]) == (1.0, "correct", "eos")
    assert row["response_text"].endswith("\\boxed{4}.")
    episode = Episode(**{k: v for k, v in row.items() if k in Episode.__dataclass_fields__})
    assert episode.senior_tokens == len(first) + len(after)

    # tandem.evaluate reads the same file as a benchmark: the problems people co-wrote
    saved_file = room.out_dir / "episodes" / "step_000000.jsonl"
    problems = load_benchmark(str(saved_file), room.config).problems
    assert (problems[-1].problem, problems[-1].answer) == ("What is 7 - 3?", "4")

    shown = RunEpisodes(room.out_dir).page(EpisodeFilter(), limit=5)["rows"][-1]
    assert {author for _, author in shown["tokens"]} == {"senior", "human"}
    assert "".join(t for t, a in shown["tokens"] if a == "human") == " so x is 4 The answer is " \
        "\\boxed{4}."


def test_turns_out_of_order_and_bad_input_are_refused_with_what_to_change(room):
    with pytest.raises(CowriteError, match="answer too"):
        room.problem(None, "What is 2 + 2?", "")
    with pytest.raises(CowriteError, match="unknown schedule 'daily'"):
        asyncio.run(room.start(room.problem(None, "What is 2 + 2?", "4"), schedule="daily"))
    session = asyncio.run(room.start(room.problem(None, "What is 2 + 2?", "4"),
                                     schedule="alternate", first="human"))
    assert session.writer == "human" and session.response == []  # the person writes first
    with pytest.raises(CowriteError, match="write something, or press Finish"):
        asyncio.run(session.human_turn(""))
    with pytest.raises(CowriteError, match="tokens are left of the shared budget|only .* left"):
        asyncio.run(session.human_turn("4 " * 400))
    with pytest.raises(CowriteError, match="not the senior's turn"):
        asyncio.run(session.senior_turn())
    with pytest.raises(CowriteError, match="no co-write session 'nope'"):
        room.session("nope")
