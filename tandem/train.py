"""`python -m tandem.train`: tandem GRPO, one loop from prompts to pushed weights.

Each step (`train` below, top to bottom):

1. the next batch of training problems (a seeded, resumable stream);
2. tandem rollout: `algorithm.group_size` episodes per problem, senior and frozen junior taking
   turns (rollout.py; both engines busy at once, no barrier between episodes);
3. reward: math-verify on the team's last \\boxed{} answer, in a killable process pool;
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
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tandem import checkpoint as ckpt
from tandem.alternation import Boundaries
from tandem.config.compose import CONF_DIR, config_for_app
from tandem.config.schema import TandemConfig
from tandem.episode import Episode
from tandem.output.tracking import RunLogger
from tandem.rollout import Rollout
from tandem.sweep import run_point

if TYPE_CHECKING:  # annotations only: these load torch or Ray, which `train` imports late
    from tandem.data import PromptStream
    from tandem.runtime.learners import Learners

log = logging.getLogger("tandem")

Rolled = tuple[list[Episode], dict[str, float], list[str]]
"""One step's rollout: its episodes, rollout metrics and the answers of its problems."""


class StopRequest:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
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


class Prefetch:
    """The rollouts the loop trains on, and every piece of off-policy state, in one place.

    Synchronous (`background=None`): `take` draws a batch and rolls it out now; `trained`
    pushes the new weights at once. Off-policy: `take` waits for this step's rollout (started
    during the previous step), pushes the weights owed, then starts the next step's rollout in
    the background thread unless this is the last step or a stop was requested.

    What waits for what: a push never lands while a rollout is in flight (owed weights wait for
    `take` or `flush`). Batches are drawn only here, in the driver thread, so `position` reads
    a stream nobody is advancing: off-policy, where it stood before the batch in flight.
    """

    def __init__(self, roll: Callable[[int, list[Any], int], Rolled],
                 push: Callable[[int], dict[str, float]], stream: PromptStream,
                 background: ThreadPoolExecutor | None, total: int, stop: StopRequest) -> None:
        self._roll, self._push, self._stream = roll, push, stream
        self._background, self._total, self._stop = background, total, stop
        self._in_flight: Future | None = None  # off-policy: the next step's rollout
        self._in_flight_from: dict | None = None  # the stream's position before its batch
        self._owed: int | None = None  # the version of trained weights not yet pushed
        self.served = 0  # the weight version the senior engines serve

    def take(self, step: int) -> Rolled:
        """Step `step`'s rollout; its metrics include those of a push it waited for."""
        if self._background is None:
            return self._roll(step, self._stream.next_batch(), self.served)
        if self._in_flight is None:  # the first step of this invocation
            self._start(step)
        episodes, metrics, answers = self._in_flight.result()
        self._in_flight = None
        metrics.update(self._push_owed())
        if step + 1 < self._total and self._stop.signal is None:
            self._start(step + 1)
        return episodes, metrics, answers

    def trained(self, version: int) -> dict[str, float]:
        """The learners hold weights `version` now: push them at once (synchronous) or when no
        rollout is in flight (off-policy); the metrics of a push made now."""
        self._owed = version
        return self._push_owed() if self._background is None else {}

    def flush(self) -> dict[str, float]:
        """Wait for the rollout in flight, then push the weights owed (validation needs the
        engines and the fresh weights)."""
        self.wait()
        return self._push_owed()

    def wait(self) -> None:
        """Wait for the rollout in flight, if any."""
        if self._in_flight is not None:
            self._in_flight.result()

    def position(self) -> dict:
        """Where a resumed run continues: the stream before the batch in flight, if any."""
        return self._stream.state_dict() if self._in_flight is None else self._in_flight_from

    def resume(self, position: dict, version: int) -> None:
        """Continue from a checkpoint: the stream at `position`, the senior engines serving the
        learners' restored weights as `version`."""
        self._stream.load_state_dict(position)
        self._owed = version
        self.flush()

    def _start(self, step: int) -> None:
        self._in_flight_from = self._stream.state_dict()
        self._in_flight = self._background.submit(self._roll, step, self._stream.next_batch(),
                                                  self.served)

    def _push_owed(self) -> dict[str, float]:
        if self._owed is None:
            return {}
        metrics = self._push(self._owed)
        self.served, self._owed = self._owed, None
        return metrics


def total_steps(config: TandemConfig, num_train: int) -> int:
    """`trainer.total_steps`, or `trainer.epochs` passes over the training problems."""
    if config.trainer.total_steps is not None:
        return config.trainer.total_steps
    return config.trainer.epochs * math.ceil(num_train / config.trainer.prompts_per_step)


def train(config: TandemConfig, run_dir: str | Path) -> list[dict[str, float]]:
    """Run tandem GRPO; returns the metrics logged for each step of this invocation."""
    # why here: `python -m tandem.train bad.key=1` fails before torch, Ray, vLLM and sympy load
    from tandem.advantage import group_advantages
    from tandem.data import PromptStream, load_prompts
    from tandem.evaluate import Validation
    from tandem.reward import RewardPool, reward_metrics
    from tandem.runtime.actors import Actors
    from tandem.runtime.cluster import connect

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = config.trainer
    ckpt.remove_partial(run_dir)  # what a killed or failed save left: never resumed from
    resume_from = ckpt.find_resume(trainer.resume, run_dir)
    start = ckpt.read_state(resume_from)["step"] if resume_from else 0
    prompts, senior_dir, junior_dir = load_prompts(config)
    total = total_steps(config, len(prompts.train))
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
        logger.stage(cleanup.enter_context(connect(config)))
        # after ray.init, which installs its own SIGTERM handler (exit at once)
        stop = cleanup.enter_context(StopRequest())
        boundaries = {"senior": Boundaries.from_tokenizer(prompts.senior_tokenizer),
                      "junior": Boundaries.from_tokenizer(prompts.junior_tokenizer
                                                          or prompts.senior_tokenizer)}
        actors = Actors.start(config, senior_dir, junior_dir, boundaries, logger.stage)
        cleanup.callback(actors.close)
        (run_dir / "topology.json").write_text(json.dumps(actors.nodes(), indent=2))
        rollout = Rollout(config, actors.senior, actors.junior, prompts.senior_tokenizer,
                          prompts.junior_tokenizer)

        def roll(step: int, batch: list[Any], weight_version: int) -> Rolled:
            ids, junior_ids = prompts.ids(batch)
            episodes, metrics = rollout.generate(ids, step, junior_ids,
                                                 weight_version=weight_version)
            return episodes, metrics, [p.answer for p in batch]

        prefetch = Prefetch(roll, actors.push_weights,
                            PromptStream(prompts.train, trainer.prompts_per_step, config.seed),
                            background if trainer.off_policy else None, total, stop)
        # the evaluation's protocols and code (tandem/evaluate.py), on the held-out problems
        validation = Validation(config, actors.senior, actors.junior, prompts.senior_tokenizer,
                                prompts.junior_tokenizer, prompts.holdout, prompts.instruction,
                                rewards)

        def run_validation(step: int) -> dict[str, float]:
            return validation.run(step, prefetch.served)

        if resume_from is not None:
            # the learners' weights, optimizer, schedule and RNG; the data position; the
            # senior engines serving the saved weights
            state = ckpt.read_state(resume_from)
            actors.learners.load_checkpoint(str(resume_from))
            prefetch.resume(state["stream"], state["step"])
            logger.stage(f"resumed from {resume_from}: step {start}, the senior engines serve "
                         "the saved weights")
        elif trainer.val_every and trainer.val_before_train and prompts.holdout:
            logger.log(0, run_validation(0))

        done = start
        for step in range(start, total):
            step_started = time.perf_counter()
            episodes, metrics, answers = prefetch.take(step)

            reward_started = time.perf_counter()
            verdicts = rewards.score([e.response_text for e in episodes],
                                     [answers[e.group] for e in episodes])
            metrics.update(reward_metrics(verdicts))
            metrics["time/reward"] = time.perf_counter() - reward_started

            advantages, advantage_stats = group_advantages([v.reward for v in verdicts],
                                                           config.algorithm)
            metrics.update(advantage_stats)

            actors.sleep_engines()
            train_started = time.perf_counter()
            metrics.update(actors.learners.train_step(episodes, advantages.tolist()))
            metrics["time/train"] = time.perf_counter() - train_started
            done = step + 1
            metrics.update(prefetch.trained(done))  # pushed now, or once no rollout runs
            metrics["rollout/weight_lag"] = step - sum(
                e.weight_version for e in episodes) / len(episodes)

            if trainer.val_every and done % trainer.val_every == 0 and prompts.holdout:
                metrics.update(prefetch.flush())  # validation needs the fresh weights
                metrics.update(run_validation(done))
            if trainer.save_episodes_every and done % trainer.save_episodes_every == 0:
                _save_episodes(run_dir, done, episodes, verdicts, advantages.tolist())
            metrics["time/step"] = time.perf_counter() - step_started
            logger.log(done, metrics)
            history.append({"step": done, **metrics})

            last = done == total or stop.signal is not None
            if last or (trainer.save_every and done % trainer.save_every == 0):
                if last:
                    prefetch.wait()  # a rollout in flight ends before the engines stop
                _save(run_dir, done, actors.learners, prefetch.position(), config)
                logger.stage(f"checkpoint: step {done} saved")
            if stop.signal is not None:
                logger.stage(f"stopped by {stop.signal} after step {done}; resume with "
                             f"trainer.resume=auto hydra.run.dir={run_dir}")
                break
        if trainer.export_final and done == total and stop.signal is None:
            actors.learners.export_hf(str(run_dir / "senior"))
            logger.stage(f"export: the trained senior is in {run_dir / 'senior'}")
    # the last line of a run that ended on its own (a stop that ran out of grace never gets here)
    log.info("shut down: engines, learners, reward workers and the Ray connection closed")
    return history


def _save_episodes(run_dir: Path, step: int, episodes: list[Episode], verdicts: list[Any],
                   advantages: list[float]) -> None:
    directory = run_dir / "episodes"
    directory.mkdir(exist_ok=True)
    with open(directory / f"step_{step:06d}.jsonl", "w") as out:
        for episode, verdict, advantage in zip(episodes, verdicts, advantages, strict=True):
            row = {"step": step, **asdict(episode), "reward": verdict.reward,
                   "verdict": verdict.status, "advantage": advantage}
            out.write(json.dumps(row) + "\n")


def _save(run_dir: Path, step: int, learners: Learners, stream_state: dict,
          config: TandemConfig) -> None:
    # atomic (tandem/checkpoint.py): the ranks write into a partial directory, renamed into
    # place once complete and synced; a failed save deletes it and raises CheckpointError
    ckpt.save(run_dir, step, lambda partial: learners.save_checkpoint(str(partial)),
              {"step": step, "stream": stream_state, "seed": config.seed})
    ckpt.prune(run_dir, config.trainer.keep_checkpoints)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:
        # a failed point is recorded in its run dir and the sweep goes on (tandem/sweep.py)
        run_point(lambda: _train_app(cfg), Path(hydra_config.runtime.output_dir),
                  list(hydra_config.overrides.task))
    else:
        _train_app(cfg)


def _train_app(cfg: DictConfig) -> None:
    config, run_dir = config_for_app(cfg)
    log.info("config ok: senior=%s junior=%s%s data=%s algorithm=%s(schedule=%s, handoff_p=%s) "
             "run dir %s", config.model.senior.path, config.model.junior.path,
             " (self-paired)" if config.model.self_paired else "", config.data.name,
             config.algorithm.name, config.algorithm.schedule, config.algorithm.handoff_p,
             run_dir)
    train(config, run_dir)


if __name__ == "__main__":
    main()
