"""Stopping a run by signal: promptly during start-up, within `trainer.stop_grace_s` mid-step.

In-process runs of tiny models on the session's Ray cluster; the driver signals itself (the
handlers live in the main thread, where pytest runs the test) at a known moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tandem.config.compose import compose

pytestmark = pytest.mark.slow


def _config(senior: Path, junior: Path, *overrides: str):
    from tandem.testkit import tiny_run

    return compose([*tiny_run(senior, junior), "seed=13", *overrides])


def test_sigterm_during_start_up_stops_at_once(tiny_model_dir, tmp_path, ray_cluster,
                                               monkeypatch, caplog):
    """SIGTERM while the first engine starts: the run ends without waiting for the other
    actors, shuts down what it started and gives back every reserved CPU."""
    import ray

    from tandem.runtime import actors
    from tandem.train import train

    original = actors.launch_engines
    sent: list[float] = []

    def launch_engines(*args, **kwargs):
        if not sent:  # the first role's engines: signal 2 s into their start
            threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            sent.append(time.monotonic() + 2.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(actors, "launch_engines", launch_engines)
    caplog.set_level(logging.INFO, logger="tandem")
    free = ray.available_resources().get("CPU", 0)
    history = train(_config(tiny_model_dir, tiny_model_dir, "trainer.total_steps=2"),
                    tmp_path / "run")
    took = time.monotonic() - sent[0]

    assert history == []
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "SIGTERM during start-up" in caplog.text
    # Ray frees an ended actor's CPUs asynchronously: the run's own, and (more, not fewer)
    # those of an earlier test's actors still being released when `free` was read
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= free
    # the engines were killed mid-load: no EngineCore is left orphaned (reparented to init)
    while _orphaned_engine_cores() and time.monotonic() < deadline + 30:
        time.sleep(0.5)
    assert not _orphaned_engine_cores()
    print(f"start-up stopped {took:.1f} s after SIGTERM")


def _orphaned_engine_cores() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name", "ppid"])
            if (p.info["name"] or "").startswith("VLLM::EngineCor") and p.info["ppid"] == 1]


def test_a_step_past_the_grace_is_given_up_and_the_last_one_kept(tiny_model_dir, tmp_path,
                                                                 ray_cluster, monkeypatch,
                                                                 caplog):
    """SIGTERM in step 2's rollout, which then stalls: after trainer.stop_grace_s the step is
    given up and the run ends with step 1 checkpointed, ready to resume."""
    from tandem.checkpoint import complete_checkpoints
    from tandem.rollout import Rollout
    from tandem.train import train

    original = Rollout._call
    sent: list[float] = []

    async def call(self, engine, method, *args):
        if method == "turn" and args[0].startswith("1-") and not sent:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(600)  # a step far longer than the grace
        return await original(self, engine, method, *args)

    monkeypatch.setattr(Rollout, "_call", call)
    caplog.set_level(logging.INFO, logger="tandem")
    run = tmp_path / "run"
    history = train(_config(tiny_model_dir, tiny_model_dir, "trainer.total_steps=3",
                            "trainer.stop_grace_s=2"), run)
    took = time.monotonic() - sent[0]

    assert [row["step"] for row in history] == [1]
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [path.name for path in complete_checkpoints(run)] == ["step_000001"]
    assert "trainer.stop_grace_s=2" in caplog.text
    print(f"the stalled step was given up and step 1 kept {took:.1f} s after SIGTERM")
