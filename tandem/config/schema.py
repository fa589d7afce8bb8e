"""The one config schema: dataclasses that Hydra composes conf/ into (`compose.py`).

This file and the sections beside it (`cluster.py`: the topology, `model.py`, `evaluation.py`)
are the only places defaults live. YAML files under conf/ carry values only, and Hydra rejects
any key they (or the command line) set that is not declared here. Range and cross-field checks
run in `__post_init__`, which OmegaConf calls when `compose.to_config` turns the composed
config into these dataclasses: every error names the field to change. Every float must be
finite; the run-wide checks (budgets against each model's context, the CPU KV cache against one
request) live in `fit.py`.

Self-pairing: `model.junior` defaults to interpolations of `model.senior`, so a run that
names only a senior gets the paper's set-up (the junior is the senior's starting checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.config import cpu, fit
from tandem.config.checks import (
    check,
    check_choice,
    check_finite,
    check_min,
    check_positive,
    check_range,
    looks_local,
    resolve_callable,
    unresolved,
)
from tandem.config.cluster import ClusterConfig
from tandem.config.evaluation import EvalConfig
from tandem.config.export import ExportHubConfig
from tandem.config.learner import LearnerConfig
from tandem.config.model import ModelConfig, ModelSpec, engine_dtype  # noqa: F401 (ModelSpec: re-exported)

PAPER_INSTRUCTION = (
    "Solve the following math problem step by step. Put your final answer inside \\boxed{}, "
    "like \\boxed{42} or \\boxed{\\frac{1}{2}}."
)

SCHEDULES = ("word", "sentence", "step", "chunk", "alternate")
FIRST_WRITERS = ("senior", "junior", "random", "balanced")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
BASELINES = ("mean", "leave_one_out")
KL_ESTIMATORS = ("k1", "k2", "k3")
WORD_BOUNDARIES = ("paper", "wide")
OVERLONG_MODES = ("none", "filter", "soft_penalty")
ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
DATA_FILE_TYPES = (".jsonl", ".parquet")
# data.source=reasoning_gym:<task> (tandem.data reads it; the optional reasoning-gym package)
REASONING_GYM_PREFIX = "reasoning_gym:"
# reward.fn's default: math-verify on the last \boxed{} (the paper)
DEFAULT_REWARD_FN = "tandem.reward.builtin:boxed_answer"


@dataclass
class DataConfig:
    """Where training prompts come from and how rows map to (problem, answer)."""

    name: str = "arithmetic"
    """The set's name: the conf/data/ preset's, a prefix of every problem's uid, and how
    `eval.benchmarks` refers to the composed set."""
    source: str = "generated:arithmetic"
    """`generated:arithmetic` (offline, ours), `reasoning_gym:<task>` (offline, the optional
    reasoning-gym package), a local .jsonl/.parquet file, or a dataset id."""
    subset: str | None = None
    """Dataset configuration name (e.g. gsm8k's `main`)."""
    split: str = "train"
    """Dataset split of a dataset id (a local file is read whole)."""
    problem_field: str = "problem"
    """Column (JSON key) holding the problem text."""
    answer_field: str = "answer"
    """Column (JSON key) holding the reference answer, read as `answer_format` says."""
    answer_format: str = "plain"
    """plain | gsm8k (answer after `####`) | boxed (last \\boxed{} of a worked solution)."""
    num_generated: int = 2000
    """Rows in a `generated:` or `reasoning_gym:` set."""
    generator_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of a `reasoning_gym:` task's config (e.g. basic_arithmetic's
    `max_digits`), passed to `reasoning_gym.create_dataset`; our `generated:` sets take none.
    The seed and size are ours: rows are always drawn with seed 0, `data.num_generated` of them."""
    holdout_size: int = 100
    """Rows held out from training for validation (see `holdout_seed`)."""
    holdout_seed: int = 0
    """Seed of the hold-out draw, which is pandas' `DataFrame.sample(n=holdout_size,
    random_state=holdout_seed)` over the usable rows in file order: with 0, DeepScaleR's hold-out
    is the authors' 1,000 rows. Not the run seed, so runs of any seed validate on the same rows."""
    instruction: str = PAPER_INSTRUCTION
    """Appended to each problem before the chat template (the paper's suffix)."""
    max_bad_row_frac: float = 0.01
    """More malformed rows than this fraction is an error; fewer are skipped and reported."""
    drop_answers: list[str] = field(default_factory=list)
    """Evaluation only: benchmark rows whose reference answer is one of these are left out
    (answers the verifier cannot grade, as the reference evaluation drops them from AMC24/25)."""

    def __post_init__(self) -> None:
        check(bool(self.source), "data.source is empty")
        check_choice(self.answer_format, ANSWER_FORMATS, "data.answer_format")
        check(bool(self.problem_field), "data.problem_field is empty")
        check(bool(self.answer_field), "data.answer_field is empty")
        check_min(self.num_generated, 1, "data.num_generated")
        self._check_generator_args()
        check_min(self.holdout_size, 0, "data.holdout_size")
        check(0 <= self.holdout_seed < 2**32,
               f"data.holdout_seed must be in [0, 2**32) (a numpy seed), got {self.holdout_seed}")
        check_range(self.max_bad_row_frac, 0, 1, "data.max_bad_row_frac")
        if self.source.startswith(("generated:", REASONING_GYM_PREFIX)):
            check(self.holdout_size < self.num_generated,
                  f"data.holdout_size={self.holdout_size} leaves no training rows of the "
                  f"data.num_generated={self.num_generated} generated ones; lower "
                  "data.holdout_size or raise data.num_generated")
        if looks_local(self.source) or self.source.endswith(DATA_FILE_TYPES):
            self._check_file()

    def _check_file(self) -> None:
        path = Path(self.source).expanduser()
        check(path.exists(), f"data.source={self.source!r} does not exist")
        check(path.is_file() and path.suffix in DATA_FILE_TYPES,
              f"data.source={self.source!r} is not a .jsonl or .parquet file; convert it (one "
              "JSON object a line), or give a dataset id or generated:arithmetic")

    def _check_generator_args(self) -> None:
        # The task's name and its config's fields are checked when the rows are drawn
        # (tandem.data, before any engine starts): importing reasoning-gym takes seconds.
        if not self.source.startswith(REASONING_GYM_PREFIX):
            check(not self.generator_args,
                  f"data.generator_args={self.generator_args} is only read by a reasoning_gym:"
                  f"<task> source, not data.source={self.source!r}; remove it")
            return
        check(bool(self.source.removeprefix(REASONING_GYM_PREFIX)),
              f"data.source={self.source!r} names no task; e.g. reasoning_gym:basic_arithmetic")
        for key in ("seed", "size"):
            check(key not in self.generator_args,
                  f"data.generator_args.{key} is set by tandem (seed 0, size "
                  "data.num_generated); remove it and set data.num_generated for the size")


@dataclass
class AlgorithmConfig:
    """Tandem GRPO: who writes which segment, and the masked loss."""

    name: str = "tandem"
    """tandem, or grpo (solo: the same code path with handoff_p = 1, senior first)."""
    schedule: str = "word"
    """Segment boundaries: word | sentence | step (`\\n\\n`) | chunk | alternate."""
    handoff_p: float = 0.5
    """Probability that the senior writes the next segment (re-drawn at each boundary)."""
    max_gap_tokens: int = 32
    """Force a re-draw after this many tokens without a boundary (paper's K)."""
    word_boundaries: str = "paper"
    """Re-draw points of the word schedule: paper (tokens that start with a space, the
    authors' set: byte-level BPE "Ġ" tokens) | wide (also tokens that start with a newline,
    tab, \\r or another whitespace control character)."""
    chunk_tokens: int = 32
    """Segment length of the chunk schedule."""
    first_writer: str = "random"
    """Writer of each episode's first segment: senior | junior | random (paper: random; the
    senior with probability handoff_p) | balanced (the same chance per episode, but exactly
    handoff_p x group_size of each group start with the senior, rounded by one draw: the two
    engines split the first segments evenly; no rollout speed-up measured on 2 CPU cores)."""
    group_size: int = 8
    """Episodes per prompt; advantages are relative within a group."""
    clip_ratio: float = 0.2
    """PPO clip epsilon (lower side; also upper unless clip_ratio_high is set)."""
    clip_ratio_high: float | None = None
    """Upper clip (DAPO's clip-higher); None = symmetric."""
    dual_clip_c: float | None = None
    """Dual-clip PPO (Ye et al. 2020): a token with a negative advantage loses at most -A * c,
    however large its ratio; None = off (the paper's verl trainer uses 3.0)."""
    scale_by_std: bool = True
    """Divide advantages by the group std (GRPO); false = Dr. GRPO."""
    baseline: str = "mean"
    """Group baseline: mean (GRPO) or leave_one_out (RLOO)."""
    loss_agg: str = "token_mean"
    """token_mean (paper) | seq_mean_token_mean | seq_mean_token_sum."""
    kl_coef: float = 0.0
    """KL penalty toward a frozen reference (0 in the paper)."""
    kl_estimator: str = "k3"
    """Estimator of the KL toward the reference (Schulman's k1 | k2 | k3); used when kl_coef > 0."""
    entropy_coef: float = 0.0
    """Entropy bonus on senior-written tokens, subtracted from the loss (0 in the paper)."""
    junior_token_weight: float = 0.0
    """Policy-gradient weight of junior-written tokens (0 in the paper)."""
    junior_kl_coef: float = 0.0
    """Auxiliary KL toward the junior on junior positions, lambda_jun (0 in the paper)."""
    tis_cap: float = 0.0
    """Truncated importance sampling cap on learner/rollout ratios; 0 = off."""
    # DAPO (Yu et al. 2025, arXiv 2503.14476); not in the paper's set-up, so off by default
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (no signal) and roll out more prompts until the
    batch holds trainer.prompts_per_step groups with signal. From DAPO (arXiv 2503.14476,
    section 3.2) as verl's algorithm.filter_groups; TRL's GRPOTrainer has no such switch."""
    dynamic_sampling_max_draws: int = 10
    """Batches of prompts drawn per step at most, the first included (verl's
    max_num_gen_batches); past it the batch is filled up with no-signal groups (counted)."""
    overlong: str = "none"
    """Episodes cut off by the response budget: none (the paper) | filter (no weight in the
    loss) | soft_penalty (DAPO's length term on the reward over the last
    overlong_buffer_tokens of the budget); tandem/overlong.py. From DAPO (section 3.4:
    overlong filtering, soft overlong punishment), as verl's reward_model.overlong_buffer; TRL's
    mask_truncated_completions is filter."""
    overlong_buffer_tokens: int = 512
    """soft_penalty: L_cache, the tokens before rollout.max_response_tokens where the penalty
    ramps from 0 to -overlong_penalty_factor (DAPO: 4096 of 20480)."""
    overlong_penalty_factor: float = 1.0
    """soft_penalty: the penalty at the budget's end (verl's overlong_buffer.penalty_factor)."""

    def __post_init__(self) -> None:
        check_choice(self.name, ("tandem", "grpo"), "algorithm.name")
        check_choice(self.schedule, SCHEDULES, "algorithm.schedule")
        check_choice(self.first_writer, FIRST_WRITERS, "algorithm.first_writer")
        check_choice(self.baseline, BASELINES, "algorithm.baseline")
        check_choice(self.loss_agg, LOSS_AGGREGATIONS, "algorithm.loss_agg")
        check_choice(self.kl_estimator, KL_ESTIMATORS, "algorithm.kl_estimator")
        check_choice(self.word_boundaries, WORD_BOUNDARIES, "algorithm.word_boundaries")
        check_range(self.handoff_p, 0, 1, "algorithm.handoff_p")
        check_min(self.max_gap_tokens, 1, "algorithm.max_gap_tokens")
        check_min(self.chunk_tokens, 1, "algorithm.chunk_tokens")
        check(self.group_size >= 2,
               f"algorithm.group_size must be >= 2 (GRPO compares episodes within a group), "
               f"got {self.group_size}")
        check_range(self.clip_ratio, 0, 1, "algorithm.clip_ratio", open_low=True,
                    open_high=True)
        if self.clip_ratio_high is not None:
            check_positive(self.clip_ratio_high, "algorithm.clip_ratio_high")
        if self.dual_clip_c is not None:
            check_finite(self.dual_clip_c, "algorithm.dual_clip_c")
            check(self.dual_clip_c > 1.0,
                   f"algorithm.dual_clip_c must be > 1 (or null = off), got {self.dual_clip_c}")
        for name in ("kl_coef", "entropy_coef", "junior_token_weight", "junior_kl_coef",
                     "tis_cap"):
            check_min(getattr(self, name), 0, f"algorithm.{name}")
        self._check_dapo()
        if self.name == "grpo":
            check(self.handoff_p == 1.0 and self.first_writer == "senior",
                   "algorithm.name=grpo is solo GRPO: it needs algorithm.handoff_p=1.0 and "
                   "algorithm.first_writer=senior (or use algorithm.name=tandem)")

    def _check_dapo(self) -> None:
        check_min(self.dynamic_sampling_max_draws, 1, "algorithm.dynamic_sampling_max_draws")
        check_choice(self.overlong, OVERLONG_MODES, "algorithm.overlong")
        check_min(self.overlong_buffer_tokens, 1, "algorithm.overlong_buffer_tokens")
        check_min(self.overlong_penalty_factor, 0, "algorithm.overlong_penalty_factor")


@dataclass
class RolloutConfig:
    """Sampling for training episodes."""

    temperature: float = 1.0
    """Sampling temperature of training episodes, both writers (paper: 0.6); the learner's
    log-probs divide the logits by it too."""
    top_p: float = 1.0
    """Nucleus sampling of training episodes (1 = off)."""
    top_k: int = -1
    """-1 = off."""
    max_prompt_tokens: int = 1024
    """Longer prompts are dropped and counted, not truncated."""
    max_response_tokens: int = 3000
    """One budget shared by senior and junior over the whole episode."""
    enable_prefix_caching: bool = True
    """vLLM's prefix cache in both engines: a turn re-sent as a new request skips recomputing
    the blocks it shares with the episode so far."""
    reproducible_sampling: bool = False
    """Episodes depend only on the seed, step and episode, not on which episodes share an engine
    step: a segment is one request with its own seed (no streaming session: a turn re-sends its
    context, which the prefix cache spares recomputing), no chunked prefill. Off: only the
    hand-off draws are reproducible."""

    def __post_init__(self) -> None:
        check_finite(self.temperature, "rollout.temperature")
        check(self.temperature > 0,
               f"rollout.temperature must be > 0 (GRPO needs sampled groups), "
               f"got {self.temperature}")
        check_range(self.top_p, 0, 1, "rollout.top_p", open_low=True)
        check(self.top_k == -1 or self.top_k >= 1,
               f"rollout.top_k must be -1 (off) or >= 1, got {self.top_k}")
        check_min(self.max_prompt_tokens, 1, "rollout.max_prompt_tokens")
        check_min(self.max_response_tokens, 1, "rollout.max_response_tokens")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up."""

    lr: float = 1e-6
    """AdamW learning rate, reached after warmup_steps."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    warmup_steps: int = 0
    """Optimizer updates over which the learning rate rises linearly to lr (0 = none)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = no clipping."""

    def __post_init__(self) -> None:
        # AdamW accepts lr=inf, weight_decay=inf and eps=0, then trains on nan weights; it
        # refuses a nan lr or beta only once the learner starts, minutes in
        check_positive(self.lr, "optim.lr")
        check_min(self.weight_decay, 0, "optim.weight_decay")
        check(len(self.betas) == 2, f"optim.betas must be two values, got {list(self.betas)}")
        for index, beta in enumerate(self.betas):
            check_range(beta, 0, 1, f"optim.betas[{index}]", open_high=True)
        check_positive(self.eps, "optim.eps")
        check_min(self.warmup_steps, 0, "optim.warmup_steps")
        check_min(self.grad_clip, 0, "optim.grad_clip")


@dataclass
class TrainerConfig:
    """Step counts, batch shapes, checkpoints and logging."""

    total_steps: int | None = None
    """None = run `epochs` passes over the training prompts."""
    epochs: int = 2
    """Passes over the training prompts when total_steps is None (paper: 2)."""
    prompts_per_step: int = 16
    """Prompts drawn per step; each gets algorithm.group_size episodes."""
    mini_batch_prompts: int = 8
    """Prompts per optimizer update; prompts_per_step / mini_batch_prompts updates a step."""
    micro_batch_tokens: int = 16384
    """Token budget of one forward/backward micro-batch (per learner rank): episodes x the
    longest, padding included; with learner.packing, real tokens."""
    logprob_chunk_tokens: int = 1024
    """Response positions whose fp32 logits exist at once when computing log-probs and
    entropies (the output head runs chunk by chunk, recomputed in backward): bounds the head's
    memory at a few [chunk, vocab] fp32 tensors whatever micro_batch_tokens is."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in backward: less memory, ~30% more compute."""
    meta_init: bool = True
    """Build the senior on the meta device, shard it, then read only each rank's shard from
    the safetensors files (tandem/learner/loading.py), so no rank ever holds the whole fp32
    model; the meta-device init of torchtitan and verl. false: every rank loads the whole model
    with from_pretrained, then shards it (needed for checkpoints that only transformers' key
    conversions can read, e.g. fused MoE experts)."""
    save_every: int = 20
    """Checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in <run dir>/checkpoints; older ones are deleted (0 = keep all)."""
    val_every: int = 20
    """Validate every this many steps (0 = never)."""
    val_before_train: bool = True
    """Also validate the starting senior (logged as step 0) when val_every > 0."""
    resume: str = "none"
    """none | auto (latest checkpoint in the run directory; start fresh if there is none) |
    a checkpoint path (<run dir>/checkpoints/step_NNNNNN)."""
    stop_grace_s: float | None = None
    """After SIGTERM/SIGINT the step in progress may finish for this long; a step still in its
    rollout, reward or validation then is given up (nothing of it reached the learners) and
    the last completed step is checkpointed. None: always finish the step. Keep it below a
    scheduler's kill delay (Slurm --signal lead time, RAY_JOB_STOP_WAIT_TIME_S)."""
    restart_on_learner_failure: bool = False
    """A learner rank that dies: false ends the run naming the last checkpoint; true starts a
    new learner group from that checkpoint and goes on (the batches after it come again, in
    the same order)."""
    max_learner_restarts: int = 3
    """Learner-group restarts over the run; one more rank failure ends it."""
    off_policy: bool = False
    """One-step off-policy: the rollout of step k+1 runs while the learner trains on step k,
    with weights one step old (episodes record their weight version)."""
    save_episodes_every: int = 0
    """Write every episode of every N-th step (token ids, author mask, log-probs, text, reward)
    to <run dir>/episodes/step_N.jsonl, to read who wrote what (0 = never)."""
    export_final: bool = True
    """Write the trained senior as a Hugging Face directory (<run dir>/senior) at the end."""
    export_every: int = 0
    """Also write the senior as a Hugging Face directory (safetensors, config, generation
    config, tokenizer) to <run dir>/exports/step_N every this many steps and at the last step,
    atomically (0 = never). Peers: transformers' save_steps, verl's save_hf_model."""
    export_keep: int = 0
    """Newest exports kept in <run dir>/exports; older ones are deleted (0 = keep all)."""
    export_hub: ExportHubConfig = field(default_factory=ExportHubConfig)
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory, beside metrics.jsonl."""
    wandb: bool = False
    """Log to Weights & Biases too (`pip install -e '.[wandb]'`); without the package the run
    warns and goes on."""
    wandb_project: str = "tandem"
    """The W&B project of the run (with trainer.wandb)."""

    def __post_init__(self) -> None:
        if self.total_steps is not None:
            check(self.total_steps >= 1,
                   f"trainer.total_steps must be >= 1 (or null), got {self.total_steps}")
        check_min(self.epochs, 1, "trainer.epochs")
        if self.stop_grace_s is not None:
            check_positive(self.stop_grace_s, "trainer.stop_grace_s")
        check_min(self.max_learner_restarts, 0, "trainer.max_learner_restarts")
        check_min(self.prompts_per_step, 1, "trainer.prompts_per_step")
        check(self.mini_batch_prompts >= 1
               and self.prompts_per_step % self.mini_batch_prompts == 0,
               f"trainer.mini_batch_prompts={self.mini_batch_prompts} must divide "
               f"trainer.prompts_per_step={self.prompts_per_step}")
        check_min(self.micro_batch_tokens, 1, "trainer.micro_batch_tokens")
        check_min(self.logprob_chunk_tokens, 1, "trainer.logprob_chunk_tokens")
        for name in ("save_every", "val_every", "save_episodes_every", "keep_checkpoints",
                     "export_every", "export_keep"):
            check_min(getattr(self, name), 0, f"trainer.{name}")
        check(self.export_hub.repo_id is None or self.export_every > 0,
              f"trainer.export_hub.repo_id={self.export_hub.repo_id!r} pushes the periodic "
              "exports, which are off: set trainer.export_every > 0")
        check(bool(self.resume), "trainer.resume is empty: use none, auto or a checkpoint path")


@dataclass
class RewardConfig:
    """math-verify on the team's last \\boxed{} answer, in a pool of processes."""

    num_workers: int = 2
    """Grading processes; a batch's verdicts are computed in parallel."""
    timeout_s: float = 5.0
    """A verification still running after this is killed and scored 0 (counted)."""
    max_answer_chars: int = 1000
    """Longer boxed answers are not handed to sympy (counted as parse errors)."""
    answer_from: str = "boxed"
    """boxed (the paper: the last \\boxed{}) | boxed_or_number (the last number when nothing
    is boxed: for small models that never box, like the CPU demo's 135M model)."""
    fn: str = DEFAULT_REWARD_FN
    """The training reward, package.module:callable with the signature (problem, response,
    gold answer, metadata dict) -> (reward, verdict string), run in the reward pool under
    timeout_s; one that raises or hangs scores 0 and is counted. Built-ins in
    tandem.reward.builtin: boxed_answer (math-verify, the paper), boxed_answer_and_format,
    boxed_answer_length_penalty (docs/data-and-reward.md). Peers: TRL's reward_funcs, verl's
    custom_reward_function.path / name."""
    boxes: str = "last"
    """Which boxes are the answer: last (the paper: the last outermost box) | final (every box
    of the paragraph holding the last one, joined with ", ": multi-part answers, as
    math-verify's own extraction reads them)."""

    def __post_init__(self) -> None:
        check_choice(self.boxes, ("last", "final"), "reward.boxes")
        if self.fn != DEFAULT_REWARD_FN:  # the built-in default imports sympy: skip it here
            resolve_callable(self.fn, "reward.fn")
        check_min(self.num_workers, 1, "reward.num_workers")
        check_positive(self.timeout_s, "reward.timeout_s")
        check_min(self.max_answer_chars, 1, "reward.max_answer_chars")
        check_choice(self.answer_from, ("boxed", "boxed_or_number"), "reward.answer_from")


@dataclass
class TandemConfig:
    """A whole run. Compose with Hydra (conf/config.yaml) or `compose.compose([...overrides])`."""

    seed: int = 0
    """Data order, hand-off draws and engine sampling (the hold-out has data.holdout_seed)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_min(self.seed, 0, "seed")
        flags = cpu.cpu_flags() if self.cluster.device == "cpu" else ""  # read once, CPU only
        for role in ("senior", "junior"):
            spec = getattr(self.model, role)
            if not unresolved(spec.dtype):  # `auto` for this run's device, before the fit
                spec.dtype = engine_dtype(spec.dtype, self.cluster.device, flags)
            fit.check_budgets(self, role)
            fit.check_kv_cache(self, role)
        check(self.algorithm.overlong != "soft_penalty" or self.algorithm.overlong_buffer_tokens
              < self.rollout.max_response_tokens,
              f"algorithm.overlong_buffer_tokens={self.algorithm.overlong_buffer_tokens} must be "
              f"below rollout.max_response_tokens={self.rollout.max_response_tokens} (the "
              "penalty ramps over the budget's last tokens); lower it")
        check(not (self.trainer.off_policy and self.cluster.colocated),
               "trainer.off_policy=true overlaps rollout with training, but cluster.colocated="
               "true puts the engines to sleep while the learner trains; use one of them")

    @property
    def engine_context(self) -> int:
        """max_model_len of every engine: the longest training or evaluation request."""
        return max(self.rollout.max_prompt_tokens + max(self.rollout.max_response_tokens,
                                                        self.eval.max_response_tokens),
                   self.eval.context_tokens or 0)
