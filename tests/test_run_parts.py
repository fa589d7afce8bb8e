"""The driver's pure parts: checkpoint discovery, the off-policy prefetch, validation protocols,
smoke check."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem import checkpoint as ckpt
from tandem.config.compose import compose
from tandem.data import Problem, PromptStream
from tandem.driver import total_steps
from tandem.dynamic_sampling import Scored
from tandem.evaluate import protocol_config
from tandem.output.smoke import check, timing_table
from tandem.prefetch import Prefetch
from tandem.stop import StopRequest


def _checkpoint(run_dir, step, complete=True):
    directory = ckpt.checkpoint_dir(run_dir, step)
    directory.mkdir(parents=True)
    if complete:
        ckpt.write_state(directory, {"step": step})
    return directory


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.find_resume("auto", tmp_path) is None  # nothing yet: start fresh
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # cut short by pre-emption: never resumed
    assert ckpt.find_resume("auto", tmp_path) == newest
    assert ckpt.find_resume("none", tmp_path) is None
    assert ckpt.find_resume(str(newest), tmp_path) == newest


def test_resume_path_errors_say_what_to_give(tmp_path):
    _checkpoint(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="is a run directory; give one of its"):
        ckpt.find_resume(str(tmp_path), tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_resume(str(tmp_path / "missing"), tmp_path)


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000003",
                                                                      "step_000004"]
    ckpt.prune(tmp_path, keep=0)  # 0 keeps all
    assert len(ckpt.complete_checkpoints(tmp_path)) == 2


class _Run:
    """A fake rollout and push recording what the driver asked for, and in which thread."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.threads: set[str] = set()

    def roll(self, step, batch, version):
        self.events.append(("roll", step, version))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.05)  # long enough that a push made mid-rollout would land inside it
        self.events.append(("rolled", step))
        return Scored([], [p.uid for p in batch], [], {"rollout/x": 1.0})  # uids as verdicts

    def push(self, version):
        self.events.append(("push", version))
        return {"time/push": 0.1}


def _stream() -> PromptStream:
    return PromptStream([Problem(f"p{i}", "", "") for i in range(10)], batch_size=2, seed=3)


def _loop(prefetch: Prefetch, steps: int) -> list[tuple]:
    """The training loop's calls: take, train, push owed weights; (uids, metrics) per step."""
    seen = []
    for step in range(steps):
        rolled = prefetch.take(step)
        rolled.metrics.update(prefetch.trained(step + 1))
        seen.append((rolled.verdicts, rolled.metrics))
    return seen


def test_synchronous_prefetch_samples_each_step_under_the_last_pushed_weights():
    run = _Run()
    seen = _loop(Prefetch(run.roll, run.push, _stream(), None, 3, StopRequest()), 3)
    assert [e for e in run.events if e[0] != "rolled"] == [
        ("roll", 0, 0), ("push", 1), ("roll", 1, 1), ("push", 2), ("roll", 2, 2), ("push", 3)]
    assert run.threads == {threading.main_thread().name}
    assert all(metrics["time/push"] == 0.1 for _, metrics in seen)
    fresh = _stream()
    assert [uids for uids, _ in seen] == [[p.uid for p in fresh.next_batch()] for _ in range(3)]


def test_off_policy_prefetch_runs_one_version_behind_and_never_pushes_mid_rollout():
    run = _Run()
    with ThreadPoolExecutor(1) as background:
        prefetch = Prefetch(run.roll, run.push, _stream(), background, 3, StopRequest())
        seen = _loop(prefetch, 3)
    assert run.events == [
        ("roll", 0, 0), ("rolled", 0),
        ("roll", 1, 0), ("rolled", 1), ("push", 1),  # step 1 rolled out while step 0 trained
        ("roll", 2, 1), ("rolled", 2), ("push", 2)]
    assert threading.main_thread().name not in run.threads
    assert ["time/push" in metrics for _, metrics in seen] == [False, True, True]
    fresh = _stream()  # batches drawn in order, once each
    assert [uids for uids, _ in seen] == [[p.uid for p in fresh.next_batch()] for _ in range(3)]


def test_off_policy_checkpoint_keeps_the_position_before_the_batch_in_flight():
    run = _Run()
    with ThreadPoolExecutor(1) as background:
        prefetch = Prefetch(run.roll, run.push, _stream(), background, 5, StopRequest())
        seen = _loop(prefetch, 2)  # step 2's rollout is in flight now
        prefetch.wait()
        position = prefetch.position()
        in_flight = prefetch.take(2).verdicts
    resumed = _stream()
    resumed.load_state_dict(position)
    assert [p.uid for p in resumed.next_batch()] == in_flight
    assert in_flight not in [uids for uids, _ in seen]


def test_flush_waits_for_the_rollout_in_flight_then_pushes():
    run = _Run()
    with ThreadPoolExecutor(1) as background:
        prefetch = Prefetch(run.roll, run.push, _stream(), background, 5, StopRequest())
        _loop(prefetch, 1)
        assert prefetch.flush() == {"time/push": 0.1} and prefetch.served == 1
        assert run.events[-3:] == [("roll", 1, 0), ("rolled", 1), ("push", 1)]
        assert prefetch.flush() == {}  # nothing owed twice


def test_a_stop_request_starts_no_further_rollout():
    run = _Run()
    stop = StopRequest()
    with ThreadPoolExecutor(1) as background:
        prefetch = Prefetch(run.roll, run.push, _stream(), background, 10, stop)
        _loop(prefetch, 2)  # step 2's rollout is in flight
        stop.signal = "SIGTERM"  # arrives while the driver waits for it
        prefetch.take(2)
        assert prefetch.position() == _stream_after(3)  # a checkpoint resumes at step 3
    assert [e[1] for e in run.events if e[0] == "roll"] == [0, 1, 2]


def _stream_after(batches: int) -> dict:
    stream = _stream()
    for _ in range(batches):
        stream.next_batch()
    return stream.state_dict()


def test_validation_protocols_are_solo_senior_and_strict_alternation():
    config = compose(["eval.max_response_tokens=77"])
    solo = protocol_config(config, "solo")
    assert (solo.algorithm.handoff_p, solo.algorithm.first_writer) == (1.0, "senior")
    handoff = protocol_config(config, "handoff")
    assert (handoff.algorithm.schedule, handoff.algorithm.first_writer) == ("alternate",
                                                                            "senior")
    assert solo.rollout.max_response_tokens == handoff.rollout.max_response_tokens == 77
    with pytest.raises(ValueError, match="unknown validation protocol"):
        protocol_config(config, "team")


def test_total_steps_from_epochs_when_not_given():
    config = compose(["trainer.total_steps=null", "trainer.epochs=2",
                      "trainer.prompts_per_step=16", "trainer.mini_batch_prompts=8"])
    assert total_steps(config, 100) == 2 * math.ceil(100 / 16)
    assert total_steps(compose(["trainer.total_steps=7"]), 100) == 7


def test_off_policy_and_colocated_do_not_mix():
    from tandem.config.checks import ConfigError

    with pytest.raises(ConfigError, match="trainer.off_policy"):
        compose(["cluster=single_gpu", "trainer.off_policy=true"])


def test_smoke_check_passes_a_good_run_and_names_each_problem():
    good = [{"step": s, "train/loss": 0.1, "time/push": 0.2, "tandem/senior_token_frac": 0.5,
             "time/step": 3.0} for s in (1, 2, 3)]
    assert check(good, 3) == []
    assert "| time/step | 3.00 | 3.00 |" in timing_table(good)
    bad = [dict(good[0], **{"train/loss": None}), {"step": 2, "train/loss": math.nan,
                                                    "tandem/senior_token_frac": 1.0}]
    problems = check(bad, 3)
    assert "2 steps logged, 3 planned" in problems
    assert any("step 1: train/loss is None" in p for p in problems)
    assert any("step 2: no weight push" in p for p in problems)
    assert json.dumps(problems)  # plain strings
