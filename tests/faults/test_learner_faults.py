"""A learner rank killed for real mid-run: restarted from the last checkpoint, then given up.

Tiny models, five steps, a checkpoint every two. The learner rank's process is SIGKILLed as
step 3's update begins: with `trainer.restart_on_learner_failure=true` a new learner group
loads step 2's checkpoint and the run goes on, drawing exactly the batches an uninterrupted
run draws. Killed again in step 5 with `trainer.max_learner_restarts=1`, the run ends naming
the checkpoint to resume from (step 4).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray

from tandem.config.compose import compose

pytestmark = pytest.mark.slow

KILLED_AT = (3, 5)
"""The updates (weight versions) whose learner rank is killed just before they run."""


def test_a_dead_learner_restarts_from_the_checkpoint_then_the_run_stops(
        tiny_model_dir, tmp_path, ray_cluster, monkeypatch):
    from tandem.data import PromptStream, load_prompts
    from tandem.driver import LearnerFailure
    from tandem.runtime.actors import Actors
    from tandem.testkit import tiny_run
    from tandem.train import train

    original = Actors.train
    killed: list[int] = []

    def train_with_faults(self, episodes, advantages, version):
        if version in KILLED_AT and version not in killed:
            killed.append(version)
            rank = self.learners.ranks[0]
            pid = ray.get(rank.__ray_call__.remote(lambda actor: os.getpid()))
            os.kill(pid, signal.SIGKILL)
        return original(self, episodes, advantages, version)

    monkeypatch.setattr(Actors, "train", train_with_faults)
    config = compose([
        *tiny_run(tiny_model_dir, tiny_model_dir), "rollout.max_response_tokens=16",
        "trainer.total_steps=5", "trainer.save_every=2", "trainer.keep_checkpoints=0",
        "trainer.save_episodes_every=1", "trainer.restart_on_learner_failure=true",
        "trainer.max_learner_restarts=1", "seed=17",
    ])
    run = tmp_path / "run"
    with pytest.raises(LearnerFailure, match="max_learner_restarts=1") as stopped:
        train(config, run)

    assert killed == [3, 5]
    assert "step_000004" in str(stopped.value) and "trainer.resume=auto" in str(stopped.value)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["faults/learner_restarts"] for row in rows] == [0, 0, 1, 0]

    # the batches trained on are those of an uninterrupted run: none skipped, none replayed
    prompts, _, _ = load_prompts(config)
    stream = PromptStream(prompts.train, 2, config.seed)
    for step in (1, 2, 3, 4):
        expected, _ = prompts.ids(stream.next_batch())
        episodes = [json.loads(line) for line in
                    (run / "episodes" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        trained = [e["prompt_ids"] for e in episodes if e["group"] == 0][:1] + [
            e["prompt_ids"] for e in episodes if e["group"] == 1][:1]
        assert trained == expected, step
