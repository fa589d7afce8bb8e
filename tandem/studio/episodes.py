"""A run's saved episodes, read for the studio a page at a time.

Training writes every co-written episode of every `trainer.save_episodes_every`-th step to
`<run dir>/episodes/step_N.jsonl` (tandem/driver.py `_save_episodes`): one JSON row per episode,
the `Episode` fields plus `step`, `reward`, `verdict` and `advantage`. The studio's co-write
sessions append rows of the same shape (with `author_mask` 2 for a person) to their own
`episodes/` file. A long run holds millions of tokens there, so nothing here reads a whole
run: a page streams the step files line by line, in step order, and stops once it has the
rows it was asked for.

Token texts come from the senior's tokenizer (`model.senior.path` in the run's config.yaml, or
`cowrite.json`'s `senior` for a studio directory): each token is decoded after a few tokens of
left context, so multi-byte characters and SentencePiece spaces come out as the reader sees them.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tandem.config.checks import InputError
from tandem.episode import AUTHOR_NAMES, SENIOR
from tandem.models import load_tokenizer

EPISODES_DIR = "episodes"
STEP_FILE = re.compile(r"^step_(\d+)\.jsonl$")
COWRITE_META = "cowrite.json"
"""A co-write directory's note of its senior model (the tokenizer its rows are in)."""
_CONTEXT_TOKENS = 4
"""Left context each token is decoded after: enough for a UTF-8 character split over tokens."""
MAX_PAGE = 200


class NoEpisodesError(InputError):
    """A directory the studio was given holds no saved episodes."""


@dataclass(frozen=True)
class EpisodeFilter:
    """Which rows a page shows; None = no bound."""

    step: int | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    min_senior: float | None = None
    """Senior share of the response tokens, 0..1."""
    max_senior: float | None = None
    text: str = ""
    """Case-insensitive substring of the response text."""

    def matches(self, row: dict[str, Any]) -> bool:
        reward = row.get("reward")
        if self.min_reward is not None and (reward is None or reward < self.min_reward):
            return False
        if self.max_reward is not None and (reward is None or reward > self.max_reward):
            return False
        share = senior_share(row["author_mask"])
        if self.min_senior is not None and share < self.min_senior:
            return False
        if self.max_senior is not None and share > self.max_senior:
            return False
        return not self.text or self.text.lower() in row.get("response_text", "").lower()


def senior_share(author_mask: list[int]) -> float:
    return sum(a == SENIOR for a in author_mask) / max(len(author_mask), 1)


def find_tokenizer_spec(run_dir: Path) -> str | None:
    """The model whose tokenizer a run's episodes are in: the run's senior, if it says."""
    config = run_dir / "config.yaml"
    if config.is_file():
        spec = OmegaConf.select(OmegaConf.load(config), "model.senior.path")
        if spec:
            return str(spec)
    meta = run_dir / COWRITE_META
    if meta.is_file():
        return json.loads(meta.read_text()).get("senior")
    return None


class RunEpisodes:
    """The saved episodes of one run directory, and the tokenizer to show them with.

    Raises `NoEpisodesError` (one line saying what to change) for a directory with no
    `episodes/step_N.jsonl`, and `InputError` when no tokenizer can be found for it."""

    def __init__(self, run_dir: str | Path, tokenizer: Any | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        if not self.run_dir.is_dir():
            raise NoEpisodesError(f"{run_dir} is not a directory; give the studio a run "
                                  "directory (hydra.run.dir of a training run)")
        if not self.step_files():
            raise NoEpisodesError(
                f"{self.run_dir} has no saved episodes (no {EPISODES_DIR}/step_N.jsonl); "
                "train with trainer.save_episodes_every=N to save them, or open another run")
        if tokenizer is None:
            spec = find_tokenizer_spec(self.run_dir)
            if spec is None:
                raise InputError(f"{self.run_dir}: neither config.yaml nor {COWRITE_META} names "
                                 "the senior model; pass --tokenizer <model dir or spec>")
            tokenizer = load_tokenizer(spec)
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return self.run_dir.name

    def step_files(self) -> dict[int, Path]:
        """Step -> its file, in step order (names only: no file is opened)."""
        directory = self.run_dir / EPISODES_DIR
        if not directory.is_dir():
            return {}
        found = {int(m.group(1)): p for p in directory.iterdir()
                 if (m := STEP_FILE.match(p.name)) and p.is_file()}
        return dict(sorted(found.items()))

    def _rows(self, step: int | None) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(step, line, row) for every row of one step or of all, streamed."""
        files = self.step_files()
        if step is not None and step not in files:
            raise InputError(f"{self.name}: no episodes saved at step {step}; saved steps: "
                             f"{', '.join(map(str, files)) or 'none'}")
        for number, path in files.items():
            if step is not None and number != step:
                continue
            with open(path) as lines:
                for line_no, line in enumerate(lines):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a write cut short by a kill: skip it
                        continue
                    yield number, line_no, row

    def page(self, filters: EpisodeFilter, offset: int = 0,
             limit: int = 20) -> dict[str, Any]:
        """Rows `offset`..`offset + limit` of those `filters` keeps, rendered, and whether
        more follow. Reads only as far as the last row shown plus one."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InputError(f"page limit must be 1..{MAX_PAGE} and offset >= 0, got "
                             f"limit={limit} offset={offset}")
        kept = (item for item in self._rows(filters.step) if filters.matches(item[2]))
        window = list(itertools.islice(kept, offset, offset + limit + 1))
        return {"rows": [self.render(*item) for item in window[:limit]],
                "offset": offset, "more": len(window) > limit}

    def group(self, step: int, group: int) -> list[dict[str, Any]]:
        """Every episode of one prompt's group at one step, side by side."""
        rows = [self.render(*item) for item in self._rows(step) if item[2].get("group") == group]
        if not rows:
            raise InputError(f"{self.name}: step {step} has no group {group}")
        return rows

    def render(self, step: int, line: int, row: dict[str, Any]) -> dict[str, Any]:
        """A row as the page shows it: each token's text with its author's name."""
        ids, authors = row["response_ids"], row["author_mask"]
        pieces = token_pieces(self.tokenizer, ids)
        handoffs = [i for i in range(1, len(authors)) if authors[i] != authors[i - 1]]
        return {
            "step": step, "line": line, "group": row.get("group", 0),
            "reward": row.get("reward"), "verdict": row.get("verdict"),
            "advantage": row.get("advantage"), "weight_version": row.get("weight_version"),
            "finish_reason": row.get("finish_reason"),
            "senior_share": senior_share(authors), "handoffs": handoffs,
            "problem": row.get("problem"), "answer": row.get("answer"),
            "prompt": self.tokenizer.decode(row.get("prompt_ids", []), skip_special_tokens=True),
            "tokens": [[text, AUTHOR_NAMES.get(a, str(a))]
                       for text, a in zip(pieces, authors, strict=True)],
        }


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text, decoded after up to `_CONTEXT_TOKENS` tokens of left context."""
    if not ids:
        return []
    windows = [ids[max(0, i - _CONTEXT_TOKENS):i + 1] for i in range(len(ids))]
    heads = [w[:-1] for w in windows]
    backend = tokenizer.backend_tokenizer
    whole = backend.decode_batch(windows, skip_special_tokens=False)
    before = backend.decode_batch(heads, skip_special_tokens=False)
    return [w[len(b):] if w.startswith(b) else w for w, b in zip(whole, before, strict=True)]
