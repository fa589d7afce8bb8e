"""The driver's pure parts: checkpoint discovery, validation protocols, smoke check."""

from __future__ import annotations

import json
import math

import pytest

from tandem import checkpoint as ckpt
from tandem.compose import compose
from tandem.evaluate import protocol_config
from tandem.output.smoke import check, timing_table
from tandem.train import total_steps


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
    from tandem.config import ConfigError

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
