"""The training driver: tandem GRPO, one loop from prompts to pushed weights.

Each step (`run` below, top to bottom):

1. the next batch of training problems (a seeded, resumable stream);
2. tandem rollout: `algorithm.group_size` episodes per problem, senior and frozen junior taking
   turns (rollout.py; both engines busy at once, no barrier between episodes);
3. reward: math-verify on the team's last \\boxed{} answer (or the `reward.fn` plug-in), in a
   killable process pool; with `algorithm.overlong=soft_penalty` a length term; with
   `algorithm.dynamic_sampling` 1-3 again on more problems until the batch's groups all carry
   signal (dynamic_sampling.py);
4. group-relative advantages (advantage.py);
5. the learner's GRPO update over senior-written tokens only (learner/, FSDP2);
6. push the new weights to the senior engines only (transport/); the junior never changes;
7. log one row of metrics.jsonl (+ TensorBoard); validate and checkpoint when due.

What waits for what. Synchronous mode (default): every phase waits for the previous one, so
the episodes of step k are sampled under the weights after step k-1 (on-policy). With
`trainer.off_policy=true` the rollout of step k+1 runs in a background thread while the
learner trains on step k; the push of step k's weights waits for that rollout to end (a push
never lands mid-episode), so episodes are one step stale and say so in `weight_version`.
`Prefetch` below holds all of that state; the loop reads the same in both modes.

Colocated topologies (`cluster.colocated`, one GPU shared) put the engines to sleep while the
learner trains and wake the senior's weights just for the push.

Pre-emption: SIGTERM or SIGINT lets the current step finish, writes a checkpoint and exits 0;
`trainer.resume=auto` (with the same `hydra.run.dir`) continues exactly where it stopped: the
same next batch, the same optimizer state, and the senior engines serving the saved weights.
Checkpoints are atomic and load without running code from the run directory
(tandem/checkpoint.py, tandem/learner/state.py). In a multirun (`-m`) a point that fails is
recorded in its run directory and the sweep goes on (tandem/sweep.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tandem import advantage, data, dynamic_sampling, evaluate, reward
from tandem import checkpoint as ckpt
from tandem.alternation import Boundaries
from tandem.config.schema import TandemConfig
from tandem.export import Exporter
from tandem.output.tracking import RunLogger
from tandem.prefetch import Prefetch
from tandem.rollout import EngineLost, Rollout
from tandem.runtime.actors import Actors, EngineFailure
from tandem.runtime.cluster import connect
from tandem.runtime.learners import Learners
from tandem.stop import StopRequest, stop_behind
from tandem.transport.base import WeightPushError

log = logging.getLogger("tandem")


def total_steps(config: TandemConfig, num_train: int) -> int:
    """`trainer.total_steps`, or `trainer.epochs` passes over the training problems."""
    if config.trainer.total_steps is not None:
        return config.trainer.total_steps
    return config.trainer.epochs * math.ceil(num_train / config.trainer.prompts_per_step)


def run(config: TandemConfig, run_dir: Path, resume_from: Path | None) -> list[dict[str, float]]:
    """Run tandem GRPO in `run_dir` (from the checkpoint `resume_from`, if any); returns the
    metrics logged for each step of this invocation. `tandem.train.train` is the entry."""
    trainer = config.trainer
    start = ckpt.read_state(resume_from)["step"] if resume_from else 0
    prompts, senior_dir, junior_dir = data.load_prompts(config)
    stream = data.PromptStream(prompts.train, trainer.prompts_per_step, config.seed)
    stream_start = stream.state_dict()  # where a learner restart without a checkpoint goes
    if resume_from is not None:  # changed data fails here, before Ray starts
        stream.load_state_dict(ckpt.read_state(resume_from)["stream"])
    total = total_steps(config, len(prompts.train))
    history: list[dict[str, float]] = []

    # exports (and their pushes) outlive the engines: a final push does not hold the cluster
    exporter = Exporter(run_dir, trainer, total,
                        lambda directory: actors.learners.export_hf(directory))
    with exporter, contextlib.ExitStack() as cleanup:
        logger = cleanup.enter_context(RunLogger(run_dir, config, total, start_step=start))
        rewards = cleanup.enter_context(reward.RewardPool.from_config(config.reward))
        background = cleanup.enter_context(ThreadPoolExecutor(1, thread_name_prefix="rollout"))
        logger.stage(f"data: {len(prompts.train)} training problems, {len(prompts.holdout)} for "
                     f"validation; {total} steps of {trainer.prompts_per_step} prompts x "
                     f"{config.algorithm.group_size}")
        logger.stage(cleanup.enter_context(connect(config)))
        # after ray.init, which installs its own SIGTERM handler (exit at once)
        stop = cleanup.enter_context(StopRequest(trainer.stop_grace_s))
        try:  # a stop now ends the run at once: nothing is trained yet
            boundaries = {"senior": Boundaries.from_tokenizer(prompts.senior_tokenizer),
                          "junior": Boundaries.from_tokenizer(prompts.junior_tokenizer
                                                              or prompts.senior_tokenizer)}
            actors = Actors.start(config, senior_dir, junior_dir, boundaries, logger.stage)
            cleanup.callback(actors.close)
            (run_dir / "topology.json").write_text(json.dumps(actors.nodes(), indent=2))
            # a dead or hung engine is restarted in place and its episodes re-run
            rollout = Rollout(config, actors.senior, actors.junior, prompts.senior_tokenizer,
                              prompts.junior_tokenizer, recover=actors.restart_engine)

            roll = dynamic_sampling.step_roll(config, prompts, stream, rollout, rewards)

            prefetch = Prefetch(roll, actors.push_weights, stream,
                                background if trainer.off_policy else None, total, stop)
            # the evaluation's protocols and code (tandem/evaluate.py), on the held-out problems
            validation = evaluate.Validation(
                config, actors.senior, actors.junior, prompts.senior_tokenizer,
                prompts.junior_tokenizer, prompts.holdout, prompts.instruction, rewards)

            def run_validation(step: int) -> dict[str, float]:
                return validation.run(step, prefetch.served)

            if resume_from is not None:
                # the learners' weights, optimizer, schedule and RNG; the data position; the
                # senior engines serving the saved weights
                state = _restore(resume_from, actors)
                prefetch.resume(state["stream"], state["step"])
                logger.stage(f"resumed from {resume_from}: step {start}, the senior engines serve "
                             "the saved weights")
            elif trainer.val_every and trainer.val_before_train and prompts.holdout:
                logger.log(0, run_validation(0))
        except Exception as error:
            stopped = stop_behind(error)
            if stopped is None:
                raise
            logger.stage(f"stopped: {stopped}; no step was trained, nothing to save")
            return history
        stop.starting = False

        done = saved = step = start
        restarted = 0.0  # learner restarts not yet logged
        try:
            while step < total:
                step_started = time.perf_counter()
                with stop.abandonable():  # nothing of the step has reached the learners
                    rolled = prefetch.take(step)  # rolled out and scored
                episodes, metrics = rolled.episodes, rolled.metrics

                advantages, advantage_stats = advantage.group_advantages(rolled.rewards,
                                                                         config.algorithm)
                metrics.update(advantage_stats)

                actors.sleep_engines()
                train_started = time.perf_counter()
                try:
                    metrics.update(actors.train(episodes, advantages.tolist(), step + 1))
                    metrics["time/train"] = time.perf_counter() - train_started
                    metrics.update(prefetch.trained(step + 1))  # now, or once no rollout runs
                except Exception as error:
                    if actors.learners_alive():
                        if isinstance(error, WeightPushError):
                            done = step + 1  # trained, not pushed: the checkpoint keeps it
                        raise
                    # a rank died: a new group goes on from the last checkpoint, or the run ends
                    step = done = saved = _restart_learners(error, run_dir, actors, prefetch,
                                                            stream_start, config, logger)
                    restarted += 1
                    continue
                done = step + 1
                metrics["rollout/weight_lag"] = step - sum(
                    e.weight_version for e in episodes) / len(episodes)

                if trainer.val_every and done % trainer.val_every == 0 and prompts.holdout:
                    metrics.update(prefetch.flush())  # validation needs the fresh weights
                    with stop.abandonable():  # the learners are done with the step
                        metrics.update(run_validation(done))
                if trainer.save_episodes_every and done % trainer.save_episodes_every == 0:
                    _save_episodes(run_dir, done, rolled, advantages.tolist())
                metrics.update(exporter.after_step(done))  # every trainer.export_every steps
                metrics["time/step"] = time.perf_counter() - step_started
                metrics["faults/learner_restarts"], restarted = restarted, 0.0
                logger.log(done, metrics)
                history.append({"step": done, **metrics})

                last = done == total or stop.signal is not None
                if last or (trainer.save_every and done % trainer.save_every == 0):
                    if last:
                        prefetch.wait()  # a rollout in flight ends before the engines stop
                    _save(run_dir, done, actors.learners, prefetch.position(), config)
                    saved = done
                    logger.stage(f"checkpoint: step {done} saved")
                if stop.signal is not None:
                    logger.stage(f"stopped by {stop.signal} after step {done}; resume with "
                                 f"trainer.resume=auto hydra.run.dir={run_dir}")
                    break
                step = done
        except (EngineFailure, EngineLost, WeightPushError) as failure:
            # the engines failed, not the learners: checkpoint what the learners hold
            where = _keep_last_step(run_dir, done, saved, actors.learners, prefetch, config)
            logger.stage(f"stopped: {failure}; {where}")
            raised = WeightPushError if isinstance(failure, WeightPushError) else EngineFailure
            raise raised(f"{failure}; {where}") from failure
        except Exception as error:
            stopped = stop_behind(error)
            if stopped is None:
                raise
            # the step given up never reached the learners (or they were done with it)
            where = _keep_last_step(run_dir, done, saved, actors.learners, prefetch, config)
            logger.stage(f"stopped: {stopped}; {where}")
            return history
        if done == total and stop.signal is None:
            if trainer.export_final:  # the last export's files when there is one
                logger.stage(f"export: the trained senior is in {exporter.final(done)}")
            exporter.ended()  # pushes still to make finish once the engines are closed
    # the last line of a run that ended on its own (a stop that ran out of grace never gets here)
    log.info("shut down: engines, learners, reward workers and the Ray connection closed")
    return history


class LearnerFailure(RuntimeError):
    """A learner rank died and the run may not (or may no longer) restart the group."""


def _restart_learners(error: Exception, run_dir: Path, actors: Any, prefetch: Prefetch,
                      stream_start: dict, config: TandemConfig, logger: RunLogger) -> int:
    """After a learner rank died: a new learner group from the last checkpoint, the stream
    where that checkpoint left it (the batches after it come again, in their order), the
    senior engines serving its weights. Returns the step to go on from. Without
    `trainer.restart_on_learner_failure`, or past `trainer.max_learner_restarts`, raises
    `LearnerFailure` naming the checkpoint to resume from."""
    trainer = config.trainer
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}"  # Ray's run for pages
    checkpoint = ckpt.find_resume("auto", run_dir)
    where = (f"the last checkpoint is {checkpoint}; resume with trainer.resume=auto "
             f"hydra.run.dir={run_dir}" if checkpoint else "no checkpoint was saved yet")
    if not trainer.restart_on_learner_failure:
        raise LearnerFailure(f"a learner rank died ({reason}); {where} (or set "
                             "trainer.restart_on_learner_failure=true)")
    if actors.learner_restarts >= trainer.max_learner_restarts:
        raise LearnerFailure(f"a learner rank died ({reason}) after {actors.learner_restarts} "
                             f"learner restart(s), the most trainer.max_learner_restarts="
                             f"{trainer.max_learner_restarts} allows; {where}")
    actors.restart_learners()
    state = {"step": 0, "stream": stream_start}
    if checkpoint is not None:
        state = _restore(checkpoint, actors)
    prefetch.restart(state["stream"], state["step"])
    logger.stage(f"learner restarted ({actors.learner_restarts} of trainer.max_learner_restarts"
                 f"={trainer.max_learner_restarts}) after a rank died ({reason}); going on from "
                 f"{checkpoint or 'the starting senior'} at step {state['step']}")
    return state["step"]


def _restore(checkpoint: Path, actors: Any) -> dict:
    """Load a checkpoint into the learners (weights, optimizer, schedule, RNG); its state
    (step, stream position)."""
    state = ckpt.read_state(checkpoint)
    actors.learners.load_checkpoint(str(checkpoint))
    actors.learned_version = state["step"]
    return state


def _keep_last_step(run_dir: Path, done: int, saved: int, learners: Learners,
                    prefetch: Prefetch, config: TandemConfig) -> str:
    """Checkpoint the last completed step unless it is saved already; where it is."""
    if done > saved:
        _save(run_dir, done, learners, prefetch.position(), config)
    if not done:
        return "no step was completed, nothing to save"
    return (f"step {done} is saved in {ckpt.checkpoint_dir(run_dir, done)}; resume with "
            f"trainer.resume=auto hydra.run.dir={run_dir}")


def _save_episodes(run_dir: Path, step: int, rolled: dynamic_sampling.Scored,
                   advantages: list[float]) -> None:
    directory = run_dir / "episodes"
    directory.mkdir(exist_ok=True)
    with open(directory / f"step_{step:06d}.jsonl", "w") as out:
        for episode, verdict, reward, advantage in zip(rolled.episodes, rolled.verdicts,
                                                       rolled.rewards, advantages, strict=True):
            row = {"step": step, **asdict(episode), "reward": reward,
                   "verdict": verdict.status, "advantage": advantage}
            out.write(json.dumps(row) + "\n")


def _save(run_dir: Path, step: int, learners: Learners, stream_state: dict,
          config: TandemConfig) -> None:
    # atomic (tandem/checkpoint.py): the ranks write into a partial directory, renamed into
    # place once complete and synced; a failed save deletes it and raises CheckpointError
    ckpt.save(run_dir, step, lambda partial: learners.save_checkpoint(str(partial)),
              {"step": step, "stream": stream_state, "seed": config.seed})
    ckpt.prune(run_dir, config.trainer.keep_checkpoints)
