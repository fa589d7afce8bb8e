"""TRL's side of `bench.vs_trl`: the same GRPO work through TRL's `GRPOTrainer`.

Runs in its own process (started by `bench.vs_trl`, which samples its memory), prints one
`RESULT {json}` line. What it is handed mirrors tandem's config knob for knob; the mapping:

- prompts_per_step P, group_size G -> generation_batch_size P*G, num_generations G;
- mini_batch_prompts = P (one update a step) -> per_device_train_batch_size P*G,
  gradient_accumulation_steps 1, steps_per_generation 1, num_iterations 1;
- max_response_tokens, temperature, top_p, top_k -1 -> max_completion_length, temperature,
  top_p, top_k 0 (off);
- loss_agg token_mean, clip_ratio, kl_coef 0, scale_by_std -> loss_type "dapo" (token mean over
  the batch), epsilon, beta 0 (no reference model), scale_rewards "group";
- AdamW lr, betas, eps, weight_decay, grad_clip, no warm-up -> the same values, a constant
  schedule;
- activation_checkpointing, the fp32 CPU learner -> gradient_checkpointing, bf16 false;
- the reward, tandem's math-verify RewardPool -> a reward function calling the same pool.

Prompts: the problems tandem's `PromptStream` draws for the same seed, in the same order
(`shuffle_dataset=False`), as chat messages TRL renders with the same template. On CPU TRL
generates with transformers `generate` on its own fp32 training model (its vLLM modes need
CUDA). No hub, no saving: a local model object, an in-memory `datasets.Dataset`,
`report_to="none"`, `save_strategy="no"`.

Timing: a step is `on_step_begin` -> `on_step_end` of the Trainer; rollout is TRL's own
profiled `transformers.generate` block; learner = step - `_generate_and_score_completions`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from tandem.config.schema import TandemConfig
from tandem.data import PromptStream, load_prompts, prompt_text
from tandem.models import load_causal_lm
from tandem.reward import RewardPool


def grpo_config_kwargs(config: TandemConfig, steps: int) -> dict:
    """GRPOConfig keyword arguments equal to `config`'s GRPO step (one update per step)."""
    algorithm, optim, trainer = config.algorithm, config.optim, config.trainer
    if trainer.mini_batch_prompts != trainer.prompts_per_step:
        raise ValueError("the TRL side maps one update per step: set trainer.mini_batch_prompts "
                         "= trainer.prompts_per_step")
    if algorithm.loss_agg != "token_mean" or algorithm.kl_coef or algorithm.entropy_coef:
        raise ValueError("the TRL side maps token_mean, no KL and no entropy bonus only")
    completions = trainer.prompts_per_step * algorithm.group_size
    return dict(
        max_steps=steps, num_generations=algorithm.group_size,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1,
        max_completion_length=config.rollout.max_response_tokens,
        temperature=config.rollout.temperature, top_p=config.rollout.top_p,
        top_k=max(config.rollout.top_k, 0),
        beta=0.0, epsilon=algorithm.clip_ratio, loss_type="dapo",
        scale_rewards="group" if algorithm.scale_by_std else "none",
        mask_truncated_completions=False,
        learning_rate=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1], adam_epsilon=optim.eps, max_grad_norm=optim.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=trainer.activation_checkpointing, bf16=False, fp16=False,
        use_cpu=not torch.cuda.is_available(), seed=config.seed, shuffle_dataset=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )


class _Clock(TrainerCallback):
    """Wall time of each optimizer step, as the Trainer sees it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._started)


def _trainer_class():
    """GRPOTrainer that records, per generation, its wall time and real token counts."""
    from trl import GRPOTrainer  # why here: importing trl imports vllm when installed (slow)
    from trl.extras import profiling

    generate_s: list[float] = []
    original = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration: float) -> None:
        if self.name.endswith(".transformers.generate"):
            generate_s.append(duration)
        original(self, duration)

    profiling.ProfilingContext._log_metrics = log_metrics

    class TimedGRPOTrainer(GRPOTrainer):
        generations: list[dict] = []

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            self.generations.append({
                "seconds": time.perf_counter() - started,
                "generate_s": generate_s[-1] if generate_s else float("nan"),
                "prompt_tokens": int(output["prompt_mask"].sum()),
                "completion_tokens": int(output["completion_mask"].sum())})
            return output

    return TimedGRPOTrainer


def run(config: TandemConfig, warmup: int, steps: int) -> dict[str, float]:
    """`warmup + steps` TRL GRPO steps on `config`'s model and prompts; medians of the last
    `steps`."""
    from trl import GRPOConfig

    prompts, senior_dir, _ = load_prompts(config)
    stream = PromptStream(prompts.train, config.trainer.prompts_per_step, config.seed)
    problems = [p for _ in range(warmup + steps) for p in stream.next_batch()]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": prompt_text(p.problem, prompts.instruction)}],
         "answer": p.answer} for p in problems])
    tokenizer = prompts.senior_tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(senior_dir, "float32")
    reward_cfg = config.reward
    clock = _Clock()
    with RewardPool(reward_cfg.num_workers, reward_cfg.timeout_s, reward_cfg.max_answer_chars,
                    reward_cfg.answer_from) as pool, tempfile.TemporaryDirectory() as out:

        def reward(completions, answer, **_):
            # conversational prompts: each completion is [{"role": "assistant", "content": ...}]
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [v.reward for v in pool.score(texts, list(answer))]

        trainer_cls = _trainer_class()
        trainer = trainer_cls(
            model=model, reward_funcs=[reward], processing_class=tokenizer,
            train_dataset=dataset, callbacks=[clock],
            args=GRPOConfig(output_dir=out, **grpo_config_kwargs(config, warmup + steps)))
        trainer.train()
    measured = list(zip(clock.steps, trainer_cls.generations, strict=True))[warmup:]
    step_s = [s for s, _ in measured]
    generated = [g["completion_tokens"] for _, g in measured]
    learner_tokens = [g["prompt_tokens"] + g["completion_tokens"] for _, g in measured]
    learner_s = [s - g["seconds"] for s, g in measured]
    return {
        "step_s": statistics.median(step_s),
        "rollout_s": statistics.median(g["generate_s"] for _, g in measured),
        "train_s": statistics.median(learner_s),
        "generated_tokens": statistics.median(generated),
        "rollout_tokens_per_s": statistics.median(
            g["completion_tokens"] / g["generate_s"] for _, g in measured),
        "learner_tokens_per_s": statistics.median(
            t / s for t, s in zip(learner_tokens, learner_s, strict=True)),
        "torch_threads": torch.get_num_threads(),
    }


def main(config: TandemConfig, warmup: int, steps: int) -> None:
    print("RESULT " + json.dumps(run(config, warmup, steps)), flush=True)
