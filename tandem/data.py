"""Training prompts: rows from a file, a dataset id or our generator -> (problem, answer) -> ids.

- `data.source` is `generated:<name>` (offline, `GENERATORS` in tandem/sources.py),
  `reasoning_gym:<task>` (offline, the optional reasoning-gym package; `data.generator_args`
  configure the task), a local `.jsonl` / `.parquet` file, or a Hugging Face dataset id (needs
  the optional `datasets` library).
- Each row maps to a `Problem` through `data.problem_field` / `data.answer_field`; the answer
  is normalised by `data.answer_format` (plain | gsm8k | boxed). Malformed rows are skipped,
  counted and listed in a warning; more than `data.max_bad_row_frac` of them is a `DataError`.
- `data.holdout_size` rows are held out as pandas' `DataFrame.sample(n=holdout_size,
  random_state=data.holdout_seed)` draws them from the usable rows in file order, the authors'
  split (CSSLab/Tandem-RLVR, `data/build_deepscaler.py`: seed 0), in the order drawn. Neither
  the run seed nor the stream's position moves it, so every run validates on the same rows.
- `PromptStream` yields endless batches, one seeded permutation per epoch; its `state_dict`
  goes into checkpoints so a resumed run neither replays nor skips prompts.
- Prompt = problem + " " + `data.instruction` (a space, as the authors' build_deepscaler.py
  appends its suffix; the problem text as the row has it, not stripped), as one user turn
  through the tokenizer's chat template with `enable_thinking=False` (the authors' evaluation
  route: Qwen3's hybrid templates then open no thinking block; other templates ignore it).

Row numbers in reports and uids: 1-based line numbers for JSONL (what an editor shows),
0-based row indices for everything else (what `table[i]` / `dataset[i]` takes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.config.schema import REASONING_GYM_PREFIX, DataConfig, TandemConfig
from tandem.models import load_tokenizer, resolve_model
from tandem.reward import gold_error
from tandem.sources import (  # noqa: F401 (re-exported: part of this module's API)
    GENERATED_PREFIX,
    BadRow,
    DataError,
    read_rows,
    reasoning_gym_rows,
)

log = logging.getLogger(__name__)

_LISTED_ROWS = 20


@dataclass(frozen=True)
class Problem:
    """One math problem with its reference answer (a string math-verify can parse)."""

    uid: str  # f"{data.name}/{row number}", stable across runs and seeds
    problem: str
    answer: str


@dataclass(frozen=True)
class LoadReport:
    """What `load_problems` read, skipped and split."""

    source: str
    unit: str  # "line" (JSONL, 1-based) or "row" (0-based)
    total_rows: int
    bad_rows: tuple[tuple[int, str], ...]  # (row number, reason)
    num_train: int
    num_holdout: int


def load_problems(cfg: DataConfig) -> tuple[list[Problem], list[Problem], LoadReport]:
    """Read `cfg.source` and return (train, holdout, report). Train keeps file order; the
    hold-out is in the order `holdout_rows` draws it.

    Raises DataError when the source cannot be read, has too many malformed rows, or leaves
    no training rows after the hold-out.
    """
    rows, unit = read_rows(cfg)
    if cfg.source.startswith((GENERATED_PREFIX, REASONING_GYM_PREFIX)):
        fields = ("problem", "answer", "plain")  # a generator's rows, whatever data.* says
    else:
        fields = (cfg.problem_field, cfg.answer_field, cfg.answer_format)
    problems, bad = [], []
    for number, record in rows:
        try:
            problem, answer = _parse_row(record, *fields)
        except BadRow as why:
            bad.append((number, str(why)))
            continue
        problems.append(Problem(uid=f"{cfg.name}/{number}", problem=problem, answer=answer))
    _check_bad_rows(cfg, unit, len(rows), bad)
    if cfg.holdout_size >= len(problems):
        raise DataError(f"data.holdout_size={cfg.holdout_size} leaves no training rows: "
                        f"{cfg.source} has {len(problems)} usable rows; lower data.holdout_size")
    drawn = holdout_rows(len(problems), cfg.holdout_size, cfg.holdout_seed)
    held = set(drawn)
    train = [p for i, p in enumerate(problems) if i not in held]
    holdout = [problems[i] for i in drawn]
    report = LoadReport(cfg.source, unit, len(rows), tuple(bad), len(train), len(holdout))
    log.info("data: %s (%s) %d rows, %d malformed, %d train / %d held out (holdout_seed %d)",
             cfg.name, cfg.source, len(rows), len(bad), len(train), len(holdout),
             cfg.holdout_seed)
    return train, holdout, report


def holdout_rows(num_rows: int, size: int, seed: int) -> list[int]:
    """The positions pandas' `DataFrame.sample(n=size, random_state=seed)` picks out of
    `num_rows` rows (a default index), in the order it returns them.

    pandas turns an int `random_state` into numpy's legacy `RandomState(seed)` and samples
    without replacement with `choice(num_rows, size, replace=False)`, which is the head of
    `permutation(num_rows)`. numpy keeps that legacy stream fixed (NEP 19), so this needs no
    pandas and gives the authors' split on any version; tests check it against pandas itself.
    """
    return np.random.RandomState(seed).permutation(num_rows)[:size].tolist()


def _check_bad_rows(cfg: DataConfig, unit: str, total: int, bad: list[tuple[int, str]]) -> None:
    if total == 0:
        raise DataError(f"{cfg.source} has no rows; point data.source at a non-empty data set")
    if not bad:
        return
    listed = ", ".join(f"{n} ({why})" for n, why in bad[:_LISTED_ROWS])
    more = f", ... ({len(bad) - _LISTED_ROWS} more)" if len(bad) > _LISTED_ROWS else ""
    frac = len(bad) / total
    if frac > cfg.max_bad_row_frac:
        raise DataError(
            f"{cfg.source}: {len(bad)} of {total} rows are malformed ({frac:.1%} > "
            f"data.max_bad_row_frac={cfg.max_bad_row_frac}); {unit}s {listed}{more}. Fix the "
            "data, check data.problem_field / data.answer_field / data.answer_format, or raise "
            "data.max_bad_row_frac")
    log.warning("data: skipped %d of %d malformed rows in %s; %ss %s%s",
                len(bad), total, cfg.source, unit, listed, more)


# ----------------------------------------------------------------------------- one row


def _parse_row(record: object, problem_field: str, answer_field: str,
               answer_format: str) -> tuple[str, str]:
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"a {type(record).__name__}, not an object")
    problem = record.get(problem_field)
    if problem is None:
        raise BadRow(f"missing {problem_field!r}")
    if not isinstance(problem, str):
        raise BadRow(f"{problem_field!r} is a {type(problem).__name__}, not a string")
    if not problem.strip():
        raise BadRow(f"empty {problem_field!r}")
    answer = _extract_answer(_answer_text(record.get(answer_field), answer_field), answer_format)
    if not answer:
        raise BadRow(f"empty answer in {answer_field!r}")
    why = gold_error(answer)  # here, not at the first episode that draws the row
    if why:
        raise BadRow(why)
    return problem, answer  # the text as written: the authors' prompts do not strip it


def _answer_text(value: object, field: str) -> str:
    if value is None:
        raise BadRow(f"missing {field!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # OlympiadBench's final_answer: a list of the answer's parts
    # numbers.* also admits numpy scalars; a bool is no answer
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    raise BadRow(f"{field!r} is a {type(value).__name__}, not a string or number")


def _extract_answer(text: str, answer_format: str) -> str:
    if answer_format == "plain":
        return text.strip()
    elif answer_format == "gsm8k":
        if "####" not in text:
            raise BadRow("no '####' in a gsm8k answer")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "boxed":
        return _last_boxed(text).strip()
    else:
        raise ValueError(f"unknown data.answer_format: {answer_format!r}")


def _last_boxed(text: str) -> str:
    """Inside of the last \\boxed{...}, braces balanced: \\boxed{\\frac{1}{2}} -> \\frac{1}{2}."""
    start = text.rfind("\\boxed{")
    if start == -1:
        raise BadRow("no \\boxed{} in the solution")
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):i]
    # never fall back to an earlier box: that would grade against the wrong answer
    raise BadRow("unbalanced braces in the last \\boxed{}")


# ----------------------------------------------------------------------------- prompts


def prompt_text(problem: str, instruction: str) -> str:
    """The user turn: the problem, a space, then the instruction (none when it is empty)."""
    return f"{problem} {instruction}" if instruction else problem


def _render(tokenizer, problem: str, instruction: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                        "template; use an instruct/chat model for model.senior.path")
    messages = [{"role": "user", "content": prompt_text(problem, instruction)}]
    # Qwen3's hybrid templates read enable_thinking (False: an empty thinking block, no
    # thinking mode), as the authors' evaluation renders every prompt; others ignore it.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


def format_prompt(tokenizer, problem: str, instruction: str) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant's generation prompt."""
    # render then encode without special tokens: the template already writes any BOS it wants
    return tokenizer(_render(tokenizer, problem, instruction), add_special_tokens=False)[
        "input_ids"]


def drop_long_prompts(problems: list[Problem], tokenizer, instruction: str,
                      max_prompt_tokens: int) -> tuple[list[Problem], list[str]]:
    """(kept, dropped uids): prompts over `max_prompt_tokens` are dropped, never truncated."""
    texts = [_render(tokenizer, p.problem, instruction) for p in problems]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept = [p for p, t in zip(problems, ids, strict=True) if len(t) <= max_prompt_tokens]
    dropped = [p.uid for p, t in zip(problems, ids, strict=True) if len(t) > max_prompt_tokens]
    if dropped:
        log.warning("data: dropped %d of %d prompts longer than rollout.max_prompt_tokens=%d "
                    "(first: %s)", len(dropped), len(problems), max_prompt_tokens,
                    ", ".join(dropped[:_LISTED_ROWS]))
    return kept, dropped


# ----------------------------------------------------------------------------- the stream


def _permutation(n: int, key: str) -> list[int]:
    # Only random.random() under a str seed: Python keeps both reproducible across versions
    # (numpy and random.shuffle do not promise that), so a checkpoint resumes the same order.
    rng = random.Random(key)
    keys = [rng.random() for _ in range(n)]
    return sorted(range(n), key=keys.__getitem__)


class PromptStream:
    """Endless batches of training problems: a seeded permutation per epoch, no barrier
    between epochs (a batch may end one epoch and start the next)."""

    def __init__(self, problems: list[Problem], batch_size: int, seed: int):
        if not problems:
            raise DataError("no training problems to stream; check data.source and "
                            "data.holdout_size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._problems = list(problems)
        self.batch_size = batch_size
        self.seed = seed
        uids = "\n".join(p.uid for p in self._problems).encode()
        self._fingerprint = hashlib.sha256(uids).hexdigest()[:16]
        self._start(epoch=0, position=0)

    def _start(self, epoch: int, position: int) -> None:
        self._epoch, self._position = epoch, position
        self._order = _permutation(len(self._problems), f"tandem.data/shuffle/{self.seed}/{epoch}")

    @property
    def epoch(self) -> int:
        """Completed passes over the training problems (the epoch the next batch starts in)."""
        return self._epoch

    def next_batch(self) -> list[Problem]:
        """The next `batch_size` problems."""
        batch = []
        for _ in range(self.batch_size):
            batch.append(self._problems[self._order[self._position]])
            if self._position + 1 == len(self._problems):
                self._start(self._epoch + 1, 0)
            else:
                self._position += 1
        return batch

    def __iter__(self) -> PromptStream:
        return self

    __next__ = next_batch

    def state_dict(self) -> dict:
        """JSON-serialisable position; `load_state_dict` of it replays the same next batches."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_problems": len(self._problems), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; raises DataError if the seed or problems changed."""
        if state["seed"] != self.seed:
            raise DataError(f"the checkpoint's prompt stream was seeded with {state['seed']}, "
                            f"this run with {self.seed}; resume with seed={state['seed']}")
        if (state["num_problems"], state["fingerprint"]) != (len(self._problems),
                                                             self._fingerprint):
            raise DataError(
                f"the checkpoint streamed {state['num_problems']} other training problems than "
                f"this run's {len(self._problems)}: data.* (source, holdout_size, "
                "num_generated) or rollout.max_prompt_tokens changed; restore them to resume")
        if not 0 <= state["position"] < len(self._problems):
            raise DataError(f"prompt stream position {state['position']} is out of range")
        self._start(int(state["epoch"]), int(state["position"]))


@dataclass
class Prompts:
    """Training and held-out problems with their prompt ids in each engine's tokens."""

    train: list[Problem]
    holdout: list[Problem]
    senior_tokenizer: Any
    junior_tokenizer: Any | None  # None when the junior shares the senior's tokenizer
    instruction: str

    def ids(self, problems: list[Problem]) -> tuple[list[list[int]], list[list[int]] | None]:
        senior = [format_prompt(self.senior_tokenizer, p.problem, self.instruction)
                  for p in problems]
        if self.junior_tokenizer is None:
            return senior, None
        return senior, [format_prompt(self.junior_tokenizer, p.problem, self.instruction)
                        for p in problems]


def load_prompts(config: TandemConfig) -> tuple[Prompts, str, str]:
    """Training and held-out problems, tokenizers and the two resolved model directories of a
    run: long prompts dropped, the hold-out cut to `eval.val_problems`."""
    train, holdout, _ = load_problems(config.data)  # first: a data error needs no model built
    senior_dir = str(resolve_model(config.model.senior.path))
    junior_dir = str(resolve_model(config.model.junior.path))
    senior_tok = load_tokenizer(senior_dir)
    junior_tok = load_tokenizer(junior_dir)
    cross = junior_tok.get_vocab() != senior_tok.get_vocab()
    limit = config.rollout.max_prompt_tokens
    train, _ = drop_long_prompts(train, senior_tok, config.data.instruction, limit)
    holdout, _ = drop_long_prompts(holdout, senior_tok, config.data.instruction, limit)
    if config.eval.val_problems is not None:
        holdout = holdout[:config.eval.val_problems]
    prompts = Prompts(train, holdout, senior_tok, junior_tok if cross else None,
                      config.data.instruction)
    return prompts, senior_dir, junior_dir
