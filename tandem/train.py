"""`python -m tandem.train`: tandem GRPO, one loop from prompts to pushed weights.

Each step (`train` below, top to bottom):

1. the next batch of training problems (a seeded, resumable stream);
2. tandem rollout: `algorithm.group_size` episodes per problem, senior and frozen junior taking
   turns (rollout.py; both engines busy at once, no barrier between episodes);
3. reward: math-verify on the team's last \\boxed{} answer, in a killable process pool;
4. group-relative advantages (advantage.py);
5. the learner's GRPO update over senior-written tokens only (learner.py, FSDP2);
6. push the new weights to the senior engines only (weight_sync.py); the junior never changes;
7. log one row of metrics.jsonl (+ TensorBoard); validate and checkpoint when due.

What waits for what. Synchronous mode (default): every phase waits for the previous one, so
the episodes of step k are sampled under the weights after step k-1 (on-policy). With
`trainer.off_policy=true` the rollout of step k+1 runs in a background thread while the
learner trains on step k; the push of step k's weights waits for that rollout to end (a push
never lands mid-episode), so episodes are one step stale and say so in `weight_version`.

Colocated topologies (`cluster.colocated`, one GPU shared) put the engines to sleep while the
learner trains and wake the senior's weights just for the push.

Pre-emption: SIGTERM or SIGINT lets the current step finish, writes a checkpoint and exits 0;
`trainer.resume=auto` (with the same `hydra.run.dir`) continues exactly where it stopped: the
same next batch, the same optimizer state, and the senior engines serving the saved weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tandem import checkpoint as ckpt
from tandem.config import CONF_DIR, ConfigError, TandemConfig, to_config
from tandem.runtime import actors as run_actors

log = logging.getLogger("tandem")


@dataclass
class Prompts:
    """Training and held-out problems with their prompt ids in each engine's tokens."""

    train: list[Any]
    holdout: list[Any]
    senior_tokenizer: Any
    junior_tokenizer: Any | None  # None when the junior shares the senior's tokenizer
    instruction: str

    def ids(self, problems: list[Any]) -> tuple[list[list[int]], list[list[int]] | None]:
        from tandem.data import format_prompt

        senior = [format_prompt(self.senior_tokenizer, p.problem, self.instruction)
                  for p in problems]
        if self.junior_tokenizer is None:
            return senior, None
        return senior, [format_prompt(self.junior_tokenizer, p.problem, self.instruction)
                        for p in problems]


class StopRequest:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(number).name
        log.warning("%s: finishing this step, then checkpointing and stopping "
                    "(send SIGINT again to stop now)", self.signal)

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def total_steps(config: TandemConfig, num_train: int) -> int:
    """`trainer.total_steps`, or `trainer.epochs` passes over the training problems."""
    if config.trainer.total_steps is not None:
        return config.trainer.total_steps
    return config.trainer.epochs * math.ceil(num_train / config.trainer.prompts_per_step)


def load_prompts(config: TandemConfig) -> tuple[Prompts, str, str]:
    """Problems, tokenizers and the two resolved model directories."""
    from tandem.data import drop_long_prompts, load_problems
    from tandem.models import load_tokenizer, resolve_model

    senior_dir = str(resolve_model(config.model.senior.path))
    junior_dir = str(resolve_model(config.model.junior.path))
    senior_tok = load_tokenizer(senior_dir)
    junior_tok = load_tokenizer(junior_dir)
    cross = junior_tok.get_vocab() != senior_tok.get_vocab()
    train, holdout, _ = load_problems(config.data, config.seed)
    limit = config.rollout.max_prompt_tokens
    train, _ = drop_long_prompts(train, senior_tok, config.data.instruction, limit)
    holdout, _ = drop_long_prompts(holdout, senior_tok, config.data.instruction, limit)
    if config.eval.val_problems is not None:
        holdout = holdout[:config.eval.val_problems]
    prompts = Prompts(train, holdout, senior_tok, junior_tok if cross else None,
                      config.data.instruction)
    return prompts, senior_dir, junior_dir


def train(config: TandemConfig, run_dir: str | Path) -> list[dict[str, float]]:
    """Run tandem GRPO; returns the metrics logged for each step of this invocation."""
    from tandem.advantage import group_advantages
    from tandem.alternation import Boundaries
    from tandem.data import PromptStream
    from tandem.evaluate import validate, validation_rollouts
    from tandem.output.tracking import RunLogger
    from tandem.reward import RewardPool, reward_metrics
    from tandem.rollout import Rollout
    from tandem.runtime.learners import fan_out
    from tandem.transport.base import make_transport

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer, cluster = config.trainer, config.cluster
    timeout = cluster.call_timeout_s
    resume_from = ckpt.find_resume(trainer.resume, run_dir)
    start = ckpt.read_state(resume_from)["step"] if resume_from else 0
    prompts, senior_dir, junior_dir = load_prompts(config)
    total = total_steps(config, len(prompts.train))
    stream = PromptStream(prompts.train, trainer.prompts_per_step, config.seed)
    history: list[dict[str, float]] = []

    with contextlib.ExitStack() as cleanup:
        logger = cleanup.enter_context(RunLogger(run_dir, config, total, start_step=start))
        rewards = cleanup.enter_context(RewardPool(
            config.reward.num_workers, config.reward.timeout_s, config.reward.max_answer_chars,
            config.reward.answer_from))
        background = cleanup.enter_context(ThreadPoolExecutor(1, thread_name_prefix="rollout"))
        logger.stage(f"data: {len(prompts.train)} training problems, {len(prompts.holdout)} for "
                     f"validation; {total} steps of {trainer.prompts_per_step} prompts x "
                     f"{config.algorithm.group_size}")
        started_ray, where = run_actors.connect(config)
        if started_ray:
            cleanup.callback(_ray_shutdown)
        # after ray.init, which installs its own SIGTERM handler (exit at once)
        stop = cleanup.enter_context(StopRequest())
        logger.stage(where)
        boundaries = {"senior": Boundaries.from_tokenizer(prompts.senior_tokenizer),
                      "junior": Boundaries.from_tokenizer(prompts.junior_tokenizer
                                                          or prompts.senior_tokenizer)}
        team = run_actors.start(config, senior_dir, junior_dir, boundaries, logger.stage)
        cleanup.callback(team.close)
        (run_dir / "topology.json").write_text(json.dumps(team.nodes(timeout), indent=2))
        transport = make_transport(cluster, config.model.senior.dtype)
        rollout = Rollout(config, team.senior, team.junior, prompts.senior_tokenizer,
                          prompts.junior_tokenizer)
        val_rollouts = validation_rollouts(config, team.senior, team.junior,
                                           prompts.senior_tokenizer, prompts.junior_tokenizer)
        val_prompts, val_junior_prompts = prompts.ids(prompts.holdout)
        val_answers = [p.answer for p in prompts.holdout]

        def run_validation(step: int) -> dict[str, float]:
            return validate(val_rollouts, val_prompts, val_junior_prompts, val_answers,
                            rewards, step, config.eval.val_samples, config.eval.pass_k,
                            rollout.weight_version)

        if resume_from is not None:
            _restore(resume_from, team, stream, transport, rollout, timeout)
            logger.stage(f"resumed from {resume_from}: step {start}, the senior engines serve "
                         "the saved weights")
        elif trainer.val_every and trainer.val_before_train and prompts.holdout:
            logger.log(0, run_validation(0))

        def roll(step: int, batch: list[Any]) -> tuple[list[Any], dict[str, float], list[str]]:
            ids, junior_ids = prompts.ids(batch)
            episodes, metrics = rollout.generate(ids, step, junior_ids)
            return episodes, metrics, [p.answer for p in batch]

        # Batches are drawn here, never in the rollout thread, so a checkpoint reads a stream
        # nobody is advancing. Off-policy: where the stream stood before the batch in flight.
        pending: Future | None = None  # off-policy: the next step's rollout, in flight
        in_flight_from: dict | None = None
        if trainer.off_policy and start < total:
            in_flight_from = stream.state_dict()
            pending = background.submit(roll, start, stream.next_batch())
        unpushed = False  # off-policy: trained weights wait until no rollout is in flight
        done = start
        for step in range(start, total):
            step_started = time.perf_counter()
            if pending is not None:
                episodes, metrics, answers = pending.result()
                if unpushed:
                    metrics.update(_push(transport, team, rollout, step, timeout))
                    unpushed = False
                pending = None
                if step + 1 < total and stop.signal is None:
                    in_flight_from = stream.state_dict()
                    pending = background.submit(roll, step + 1, stream.next_batch())
            else:
                episodes, metrics, answers = roll(step, stream.next_batch())

            reward_started = time.perf_counter()
            verdicts = rewards.score([e.response_text for e in episodes],
                                     [answers[e.group] for e in episodes])
            metrics.update(reward_metrics(verdicts))
            metrics["time/reward"] = time.perf_counter() - reward_started

            advantages, advantage_stats = group_advantages([v.reward for v in verdicts],
                                                           config.algorithm)
            metrics.update(advantage_stats)

            team.sleep_engines(timeout)
            train_started = time.perf_counter()
            metrics.update(fan_out(team.learners, "train_step", episodes, advantages.tolist(),
                                   timeout=timeout)[0])
            metrics["time/train"] = time.perf_counter() - train_started
            done = step + 1
            if trainer.off_policy:
                unpushed = True
            else:
                metrics.update(_push(transport, team, rollout, done, timeout))
            metrics["rollout/weight_lag"] = step - sum(
                e.weight_version for e in episodes) / len(episodes)

            if trainer.val_every and done % trainer.val_every == 0 and prompts.holdout:
                if pending is not None:
                    pending.result()  # validation needs the engines and the fresh weights
                if unpushed:
                    metrics.update(_push(transport, team, rollout, done, timeout))
                    unpushed = False
                metrics.update(run_validation(done))
            if trainer.save_episodes_every and done % trainer.save_episodes_every == 0:
                _save_episodes(run_dir, done, episodes, verdicts, advantages.tolist())
            metrics["time/step"] = time.perf_counter() - step_started
            logger.log(done, metrics)
            history.append({"step": done, **metrics})

            last = done == total or stop.signal is not None
            if last or (trainer.save_every and done % trainer.save_every == 0):
                if pending is not None and last:
                    pending.result()  # a rollout in flight ends before the engines stop
                _save(run_dir, done, team,
                      in_flight_from if pending is not None else stream.state_dict(), config,
                      timeout)
                logger.stage(f"checkpoint: step {done} saved")
            if stop.signal is not None:
                logger.stage(f"stopped by {stop.signal} after step {done}; resume with "
                             f"trainer.resume=auto hydra.run.dir={run_dir}")
                break
        if trainer.export_final and done == total and stop.signal is None:
            fan_out(team.learners, "export_hf", str(run_dir / "senior"), timeout=timeout)
            logger.stage(f"export: the trained senior is in {run_dir / 'senior'}")
    return history


def _push(transport: Any, team: run_actors.Actors, rollout: Any, version: int,
          timeout: float) -> dict[str, float]:
    team.wake_for_push(timeout)
    metrics = transport.push(team.learners, team.senior, version)
    team.wake_engines(timeout)
    rollout.weight_version = version
    return metrics


def _save_episodes(run_dir: Path, step: int, episodes: list[Any], verdicts: list[Any],
                   advantages: list[float]) -> None:
    import dataclasses

    directory = run_dir / "episodes"
    directory.mkdir(exist_ok=True)
    with open(directory / f"step_{step:06d}.jsonl", "w") as out:
        for episode, verdict, advantage in zip(episodes, verdicts, advantages, strict=True):
            row = {"step": step, **dataclasses.asdict(episode), "reward": verdict.reward,
                   "verdict": verdict.status, "advantage": advantage}
            out.write(json.dumps(row) + "\n")


def _ray_shutdown() -> None:
    import ray

    ray.shutdown()


def _save(run_dir: Path, step: int, team: run_actors.Actors, stream_state: dict,
          config: TandemConfig, timeout: float) -> None:
    from tandem.runtime.learners import fan_out

    directory = ckpt.checkpoint_dir(run_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    fan_out(team.learners, "save_checkpoint", str(directory), timeout=timeout)
    ckpt.write_state(directory, {"step": step, "stream": stream_state, "seed": config.seed})
    ckpt.prune(run_dir, config.trainer.keep_checkpoints)


def _restore(directory: Path, team: run_actors.Actors, stream: Any, transport: Any,
             rollout: Any, timeout: float) -> None:
    """Learner (weights, optimizer, schedule, RNG), data position, and the senior engines
    serving the saved weights."""
    from tandem.runtime.learners import fan_out

    state = ckpt.read_state(directory)
    fan_out(team.learners, "load_checkpoint", str(directory), timeout=timeout)
    stream.load_state_dict(state["stream"])
    _push(transport, team, rollout, state["step"], timeout)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        config = to_config(cfg)
    except ConfigError as error:
        print(f"tandem: config error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("config ok: senior=%s junior=%s%s data=%s algorithm=%s(schedule=%s, handoff_p=%s) "
             "run dir %s", config.model.senior.path, config.model.junior.path,
             " (self-paired)" if config.model.self_paired else "", config.data.name,
             config.algorithm.name, config.algorithm.schedule, config.algorithm.handoff_p,
             run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    train(config, run_dir)


if __name__ == "__main__":
    main()
