r"""Who writes the next segment: re-draw points, Bernoulli hand-off, authorship. Pure: no engines.

The rollout driver keeps one `Alternation` per episode and loops until EOS or the budget::

    rule = alternation.stop_rule(budget_left)   # how far the current writer may go in one request
    tokens = <the writer's engine samples under `rule`>
    turn = alternation.advance(tokens)          # tokens that stand, and whether the writer changed

**Re-draw points.** The writer is re-drawn right *after* a boundary token, which belongs to the
writer who sampled it (nothing sampled is discarded). Special tokens are never boundaries; token
texts are decoded once per tokenizer (`Boundaries`).

- word: with `algorithm.word_boundaries=paper` (the default), a token whose text starts with a
  space: byte-level BPE's "Ġ" tokens, exactly the authors' set (CSSLab/Tandem-RLVR,
  `train/assets/build_word_boundary_ids.py`: 53,021 ids for Qwen3), or SentencePiece's "▁".
  With `wide`, also a token that starts with any other whitespace: a newline, tab, `\r` or a
  whitespace control character: SmolLM2, which writes `\n` as its own token, gets 26 re-draw
  points instead of 22 on a three-sentence solution. Also forced once K = `max_gap_tokens`
  tokens passed since the last re-draw.
- sentence: a token whose text, less trailing whitespace and closing quotes or brackets, ends in
  . ! ? (or 。！？); also every step boundary. Tokens cannot see their neighbours, so decimal
  points ("3." "5") and abbreviations ("e.g.") are boundaries too.
- step and alternate: a token containing a blank line (`\n\n`, `\n \n`), or the *pair* rule for
  tokenizers that write `\n\n` as two tokens (SmolLM2, tiny-alt): a token starting with a newline
  right after one ending with a newline that is not itself a break. The pair rule sees response
  tokens only; a run of n newline tokens makes n - 1 boundaries.
- chunk: after every `chunk_tokens` tokens of the response.

K applies to the word schedule only. `alternate` never draws: the writer changes at every step
boundary. Why after the boundary token, not before it (discarding it so that the new writer
starts the word): the authors' sampler (CSSLab/Tandem-RLVR, `tandem_sampler.py`) re-draws after
a boundary token is emitted, so the paper's numbers come from this rule; discarding costs a
decode step per segment (~1/3 more steps for word at p = 0.5); and re-draw points are then a
function of the final tokens, which `replay` checks.

**Drawn ahead.** The draws do not depend on the text, so at each hand-off we draw how many of the
next re-draws keep the new writer: k with P(k >= j) = s^j, s = p for the senior and 1 - p for the
junior (k = inf when s = 1, 0 when s = 0). One request covers k re-draw points and the hand-off
comes right after the (k+1)-th: the same process as a fresh Bernoulli(p) at every re-draw point.
First writer: senior, junior, or random = senior with probability p (the paper's coin flip at
p = 0.5; solo GRPO at p = 1 always starts with the senior).

**K and runs.** A forced re-draw is a re-draw: it uses up one of the k, and every re-draw, kept or
not, restarts the gap count. Engines count boundaries, not gaps, so a word request is capped at
K - gap tokens: ending there with no boundary inside is the forced re-draw; ending there after a
kept boundary means the same writer goes on with a new request. With k = inf there is no cap.

**Early is fine, late is not.** `advance` finds the re-draw points in the returned tokens itself:
a request that stopped early (at any pair completion, at a budget cap) continues the same writer;
one that ran past its hand-off is cut back (`Turn.kept`).

Randomness: one `random.Random` per episode, seeded from (seed, step, episode index), so draws do
not depend on the order in which engines answer. Cross-tokenizer juniors: each writer's tokens are
read with its own `Boundaries`; `senior_authorship` maps co-written text to senior tokens.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from tandem.config.schema import SCHEDULES, AlgorithmConfig
from tandem.episode import JUNIOR, SENIOR, Episode

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
_LINE_END = re.compile(r"\n[ \t\r]*$")
_LINE_START = re.compile(r"[ \t\r]*\n")
_SENTENCE_END = tuple(".!?。！？")
_CLOSERS = "\"'”’»)]*_"
PAIR = ("line_end", "line_start")


def _ends_sentence(text: str) -> bool:
    return text.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_END)


@dataclass(frozen=True)
class Boundaries:
    """One tokenizer's token classes (token ids) that mark re-draw points."""

    word: frozenset[int]
    """Starts with a space: the paper's word boundaries (`algorithm.word_boundaries=paper`)."""
    word_wide: frozenset[int]
    """Starts with any whitespace (`algorithm.word_boundaries=wide`): `word` and more."""
    sentence: frozenset[int]
    step: frozenset[int]
    line_end: frozenset[int]
    """Ends with a newline and is not a step token: first half of a pair."""
    line_start: frozenset[int]
    """Starts with a newline: second half of a pair."""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Boundaries:
        """Decode every token once (a fast Hugging Face tokenizer) and classify it."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; load the "
                             "model's tokenizer.json with transformers' AutoTokenizer")
        # Decoded after an anchor token, so SentencePiece-style decoders keep a leading space.
        backend = tokenizer.backend_tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        prefix = backend.decode([anchor], skip_special_tokens=False)
        pairs = backend.decode_batch([[anchor, i] for i in range(len(tokenizer))],
                                     skip_special_tokens=False)
        texts = [text.removeprefix(prefix) for text in pairs]
        special = set(tokenizer.all_special_ids)
        special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}

        def pick(rule) -> frozenset[int]:
            return frozenset(i for i, t in enumerate(texts) if t and i not in special and rule(t))

        step = pick(_BLANK_LINE.search)
        return cls(word=pick(lambda t: t[0] == " "), word_wide=pick(lambda t: t[0].isspace()),
                   sentence=step | pick(_ends_sentence),
                   step=step, line_end=pick(_LINE_END.search) - step,
                   line_start=pick(_LINE_START.match))

    def token_sets(self) -> dict[str, tuple[int, ...]]:
        """The non-empty sets by name, for the engine (`EngineSettings.token_sets`)."""
        sets = {f.name: tuple(sorted(getattr(self, f.name))) for f in fields(self)}
        return {name: ids for name, ids in sets.items() if ids}


@dataclass(frozen=True)
class StopRule:
    """Where one request of the current writer must end at the latest.

    The hand-off comes right after the `boundaries`-th boundary of the request, counting tokens of
    `boundary_set` and completions of `pair` (a token of set B right after one of set A, the
    previous token possibly written by the other writer). An engine that stops at every pair
    completion stops early, which is allowed. No boundary rule (k = inf, chunk): `max_tokens`.
    The engine takes the rule as it is (`RolloutEngine.generate`, `turn`); every rule that is
    set applies, and whichever fires first ends the request.
    """

    max_tokens: int
    """min(shared budget left, the chunk's end, the forced re-draw K - gap)."""
    stop_ids: tuple[int, ...] = ()
    """Stop after any of these tokens (kept). Keep it short: it is a linear scan per token."""
    boundary_set: str | None = None
    """Name of a token set registered with the engine (`Boundaries.token_sets`)."""
    boundaries: int = 0
    """Stop at the k-th token of `boundary_set` sampled in this request (0 = rule off)."""
    keep_boundary: bool = True
    """False: the k-th boundary token is sampled but left out (the hand-off comes before it)."""
    pair: tuple[str, str] | None = None
    """(set A, set B): stop after a token of B that follows a token of A in the context."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"StopRule.max_tokens must be >= 1, got {self.max_tokens}")
        if (self.boundary_set is None) != (self.boundaries == 0) or self.boundaries < 0:
            raise ValueError("StopRule.boundary_set and boundaries (>= 1) go together, got "
                             f"{self.boundary_set!r} and {self.boundaries}")


@dataclass(frozen=True)
class Turn:
    """What `Alternation.advance` made of one request's tokens."""

    kept: int
    """Leading tokens that stand; any after the hand-off (an engine overshoot) are dropped."""
    handoff: bool
    """The writer changed after the kept tokens."""


def word_set(algorithm: AlgorithmConfig) -> str:
    """The `Boundaries` field (and engine token set) the word schedule re-draws after."""
    if algorithm.word_boundaries == "paper":
        return "word"
    elif algorithm.word_boundaries == "wide":
        return "word_wide"
    else:
        raise ValueError(f"unknown algorithm.word_boundaries: {algorithm.word_boundaries!r}")


class _RedrawPoints:
    """Walks a response token by token and says after which tokens the writer is re-drawn."""

    def __init__(self, algorithm: AlgorithmConfig) -> None:
        if algorithm.schedule not in SCHEDULES:
            raise ValueError(f"unknown algorithm.schedule: {algorithm.schedule!r}")
        self.schedule = algorithm.schedule
        self.max_gap = algorithm.max_gap_tokens
        self.chunk = algorithm.chunk_tokens
        self.word_set = word_set(algorithm)
        self.length = 0  # response tokens so far
        self.gap = 0  # tokens since the last re-draw
        self.after_line_end = False

    def after(self, token: int, boundaries: Boundaries) -> bool:
        self.length += 1
        self.gap += 1
        if self.schedule == "word":
            hit = token in getattr(boundaries, self.word_set) or self.gap >= self.max_gap
        elif self.schedule == "chunk":
            hit = self.length % self.chunk == 0
        else:  # sentence, step, alternate
            units = boundaries.sentence if self.schedule == "sentence" else boundaries.step
            hit = token in units or (self.after_line_end and token in boundaries.line_start)
        self.after_line_end = token in boundaries.line_end
        if hit:
            self.gap = 0
        return hit


def episode_rng(seed: int, step: int, episode: int) -> random.Random:
    """The draws of one episode; a str seed is hashed with SHA-512, the same in every process."""
    return random.Random(f"tandem/{seed}/{step}/{episode}")


def draw_first_writer(algorithm: AlgorithmConfig, rng: random.Random) -> int:
    if algorithm.first_writer == "senior":
        return SENIOR
    elif algorithm.first_writer == "junior":
        return JUNIOR
    elif algorithm.first_writer == "random":
        return SENIOR if rng.random() < algorithm.handoff_p else JUNIOR
    elif algorithm.first_writer == "balanced":
        raise ValueError("algorithm.first_writer=balanced is drawn for a whole group "
                         "(group_first_writers); pass each episode's writer as `first`")
    else:
        raise ValueError(f"unknown algorithm.first_writer: {algorithm.first_writer!r}")


def group_first_writers(handoff_p: float, group_size: int, rng: random.Random) -> list[int]:
    """First writers of one group's episodes, balanced: floor(p G) start with the senior, one
    more with probability frac(p G), the rest with the junior, in random order. Each episode
    still starts with the senior with probability p, as with `random`, but the group's (and
    so the step's) episodes split between the two engines by p exactly, not by coin flips."""
    exact = handoff_p * group_size
    whole = math.floor(exact + 1e-9)  # 0.7 x 10 is 7.000000000000001
    seniors = whole + (rng.random() < exact - whole)
    writers = [SENIOR] * seniors + [JUNIOR] * (group_size - seniors)
    rng.shuffle(writers)
    return writers


def first_writers(algorithm: AlgorithmConfig, seed: int, step: int, first_index: int,
                  groups: int, group_size: int) -> dict[int, int]:
    """Episode index -> first writer for `algorithm.first_writer=balanced` (episodes
    `first_index + group * group_size + member`); empty for the per-episode choices. Seeded
    by each group's first index, so a second batch of a step draws afresh."""
    if algorithm.first_writer != "balanced":
        return {}
    writers = {}
    for group in range(groups):
        start = first_index + group * group_size
        rng = random.Random(f"tandem/first/{seed}/{step}/{start}")
        for member, writer in enumerate(group_first_writers(algorithm.handoff_p, group_size,
                                                            rng)):
            writers[start + member] = writer
    return writers


def run_length(keep_p: float, rng: random.Random) -> float:
    """Consecutive re-draws that keep the writer, each with probability keep_p (inverse CDF)."""
    if keep_p >= 1.0:
        return math.inf
    if keep_p <= 0.0:
        return 0
    return math.floor(math.log1p(-rng.random()) / math.log(keep_p))


class Alternation:
    """Who writes next in one episode. `junior` boundaries only for a junior of another family."""

    def __init__(self, algorithm: AlgorithmConfig, rng: random.Random, senior: Boundaries,
                 junior: Boundaries | None = None, first: int | None = None) -> None:
        """`first`: the first writer drawn for the whole group (`first_writers`); None draws
        it here from `algorithm.first_writer`."""
        self._algorithm = algorithm
        self._rng = rng
        self._boundaries = {SENIOR: senior, JUNIOR: junior or senior}
        self._points = _RedrawPoints(algorithm)
        self.writer = draw_first_writer(algorithm, rng) if first is None else first
        self._keeps = self._draw_run()

    def _draw_run(self) -> float:
        if self._algorithm.schedule == "alternate":
            return 0
        p = self._algorithm.handoff_p
        return run_length(p if self.writer == SENIOR else 1.0 - p, self._rng)

    def stop_rule(self, budget_left: int) -> StopRule:
        """The rule for the current writer's next request, within `budget_left` tokens."""
        if budget_left < 1:
            raise ValueError(f"no response budget left ({budget_left}): the episode is over")
        if math.isinf(self._keeps):
            return StopRule(max_tokens=budget_left)
        n = int(self._keeps) + 1  # the hand-off comes after the n-th re-draw point
        points, schedule = self._points, self._algorithm.schedule
        if schedule == "chunk":
            size = self._algorithm.chunk_tokens
            return StopRule(max_tokens=min(budget_left, n * size - points.length % size))
        boundaries = self._boundaries[self.writer]
        name = {"word": points.word_set, "sentence": "sentence"}.get(schedule, "step")
        has_set = bool(getattr(boundaries, name))
        has_pair = schedule != "word" and bool(boundaries.line_end and boundaries.line_start)
        max_tokens = budget_left
        if schedule == "word":
            max_tokens = min(budget_left, points.max_gap - points.gap)
        return StopRule(max_tokens=max_tokens, boundary_set=name if has_set else None,
                        boundaries=n if has_set else 0, pair=PAIR if has_pair else None)

    def advance(self, token_ids: Sequence[int]) -> Turn:
        """Account for the tokens the current writer returned; re-draws and hands off as due."""
        boundaries = self._boundaries[self.writer]
        for i, token in enumerate(token_ids):
            if not self._points.after(token, boundaries):
                continue
            if self._keeps > 0:
                self._keeps -= 1
                continue
            self.writer = JUNIOR if self.writer == SENIOR else SENIOR
            self._keeps = self._draw_run()
            return Turn(kept=i + 1, handoff=True)
        return Turn(kept=len(token_ids), handoff=False)

    def hand_back(self, token_ids: Sequence[int]) -> None:
        """Account for a whole turn the current writer wrote outside the schedule, then give
        the next segment to the other writer with a fresh draw. A person in the junior's seat
        (tandem/studio) writes as much as they like in one turn: their re-draw points still
        count (the word schedule's gap, a `\\n\\n` pair split across the hand-off) but do not
        cut their text."""
        boundaries = self._boundaries[self.writer]
        for token in token_ids:
            self._points.after(token, boundaries)
        self.writer = JUNIOR if self.writer == SENIOR else SENIOR
        self._keeps = self._draw_run()


def redraw_points(response_ids: Sequence[int], algorithm: AlgorithmConfig,
                  boundaries: Boundaries) -> list[int]:
    """Positions i (0 < i < len) where the writer of token i was re-drawn."""
    points = _RedrawPoints(algorithm)
    n = len(response_ids)
    return [i + 1 for i, token in enumerate(response_ids)
            if points.after(token, boundaries) and i + 1 < n]


@dataclass(frozen=True)
class Replay:
    redraws: list[int]
    """Positions where the writer was re-drawn (`redraw_points`)."""
    handoffs: list[int]
    """Positions where the author changed: a subset of `redraws`."""


def replay(response_ids: Sequence[int], author_mask: Sequence[int], algorithm: AlgorithmConfig,
           boundaries: Boundaries) -> Replay:
    """Check that an episode changed writers only at re-draw points (and, for `alternate`, at
    every one); raise ValueError naming the positions otherwise. Same-tokenizer episodes only."""
    n = len(response_ids)
    if len(author_mask) != n:
        raise ValueError(f"{n} response tokens but {len(author_mask)} authors")
    redraws = redraw_points(response_ids, algorithm, boundaries)
    handoffs = [i for i in range(1, n) if author_mask[i] != author_mask[i - 1]]
    stray = sorted(set(handoffs) - set(redraws))
    if stray:
        raise ValueError(f"hand-offs at response positions {stray[:8]} are not re-draw points "
                         f"of the {algorithm.schedule} schedule")
    missed = sorted(set(redraws) - set(handoffs))
    if algorithm.schedule == "alternate" and missed:
        raise ValueError(f"alternate schedule kept the writer at step boundaries {missed[:8]}")
    first = {"senior": SENIOR, "junior": JUNIOR}.get(algorithm.first_writer)
    if n and first is not None and author_mask[0] != first:
        raise ValueError(f"first token written by {author_mask[0]}, but algorithm.first_writer="
                         f"{algorithm.first_writer}")
    return Replay(redraws=redraws, handoffs=handoffs)


def senior_authorship(pieces: Sequence[tuple[str, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Senior token ids of co-written text and each token's author: the writer of its first char.

    `pieces` are (text, author) in order. The whole text is re-encoded, so ids near a hand-off may
    differ from what the senior sampled there (their log-probs must then be re-scored).
    """
    text = "".join(piece for piece, _ in pieces)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = list(itertools.accumulate(len(piece) for piece, _ in pieces))
    last = len(pieces) - 1
    authors = [pieces[min(bisect.bisect_right(ends, start), last)][1]
               for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), authors


def tandem_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Senior share of tokens, hand-offs per episode, mean tokens per segment (an author run)."""
    tokens = sum(len(e.author_mask) for e in episodes)
    handoffs = sum(sum(a != b for a, b in itertools.pairwise(e.author_mask)) for e in episodes)
    segments = handoffs + sum(1 for e in episodes if e.author_mask)
    return {
        "tandem/senior_token_frac": sum(e.senior_tokens for e in episodes) / max(tokens, 1),
        "tandem/handoffs_per_episode": handoffs / max(len(episodes), 1),
        "tandem/segment_tokens_mean": tokens / max(segments, 1),
    }
