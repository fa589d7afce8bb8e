"""bench.vs_trl: TRL is handed tandem's step knob for knob, and the whole comparison runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vs_trl import Workload, per_token_ratio, report, tandem_figures, tandem_overrides
from tandem.config.compose import compose

ROOT = Path(__file__).resolve().parents[2]


def test_tandem_figures_are_medians_of_the_steps_after_warm_up():
    rows = [{"time/step": s, "time/rollout": s / 2, "time/train": 1.0, "time/push": 0.1,
             "rollout/response_tokens_mean": n, "rollout/tokens_per_s": 100.0 * s,
             "perf/learner_tokens_per_s": 50.0} for s, n in ((99.0, 1), (2.0, 30), (4.0, 32),
                                                              (3.0, 31))]
    figures = tandem_figures(rows, warmup=1, episodes=4)
    assert figures["step_s"] == 3.0 and figures["rollout_s"] == 1.5
    assert figures["generated_tokens"] == 31 * 4
    with pytest.raises(ValueError, match="warm-up"):
        tandem_figures(rows[:1], warmup=1, episodes=4)


def test_the_ratio_compares_seconds_per_generated_token():
    trl = {"step_s": 10.0, "generated_tokens": 100}
    tandem = {"step_s": 4.0, "generated_tokens": 80}
    assert per_token_ratio(trl, tandem) == pytest.approx((10 / 100) / (4 / 80))


def test_the_report_says_how_much_slower_a_tandem_step_is_than_trl_and_solo():
    """The figures of the 2026-12-01 SmolLM2 run: TRL 1.07x tandem solo's seconds per token,
    a tandem step (p = 0.5) 1.12x solo's (its goal is <= 1.1, so > 1 means slower)."""
    def run(step_s, tokens):
        return {"step_s": step_s, "rollout_s": 0.0, "train_s": 0.0, "generated_tokens": tokens,
                "rollout_tokens_per_s": 0.0, "learner_tokens_per_s": 0.0, "peak_gib": 0.0}

    text = report(Workload(model="smollm2"), {"tandem solo": run(125.24, 1598),
                                              "tandem p=0.5": run(139.25, 1588),
                                              "trl": run(114.14, 1366)})
    assert "trl/tandem step time (smollm2): 1.07 per generated token, 0.91 raw" in text
    assert "tandem p=0.5/solo step time (smollm2): 1.12 per generated token" in text


def test_trl_gets_tandems_batch_loss_and_optimizer():
    pytest.importorskip("trl")
    from trl import GRPOConfig

    from bench.trl_grpo import grpo_config_kwargs

    work = Workload(model="tiny", prompts=3, group_size=4, tokens=48, lr=2e-6)
    config = compose(tandem_overrides(work, "grpo"))
    args = GRPOConfig(output_dir="unused", **grpo_config_kwargs(config, steps=2))
    assert args.generation_batch_size == args.per_device_train_batch_size == 12
    assert args.num_generations == 4 and args.steps_per_generation == 1
    assert args.max_completion_length == 48 and args.temperature == work.temperature
    assert args.beta == 0.0 and args.loss_type == "dapo" and args.epsilon == 0.2
    assert args.learning_rate == 2e-6 and args.weight_decay == config.optim.weight_decay
    assert not args.bf16 and args.report_to == [] and args.save_strategy == "no"
    with pytest.raises(ValueError, match="mini_batch_prompts"):
        grpo_config_kwargs(compose([*tandem_overrides(work, "grpo"),
                                    "trainer.mini_batch_prompts=1"]), steps=2)


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_on_the_tiny_model(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "vs_trl.json"
    done = subprocess.run(
        # tandem at p = 0.5 runs the same loop (tests/test_train.py): left out to save minutes
        [sys.executable, "-m", "bench.vs_trl", "--models", "tiny", "--runs", "tandem solo",
         "trl", "--prompts", "2", "--group-size", "2", "--tokens", "16", "--warmup", "1",
         "--steps", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("trl/tandem step time: ") and float(last.split(": ")[1]) > 0
    results = json.loads(out.read_text())["results"]["tiny"]
    assert set(results) == {"tandem solo", "trl"}
    for figures in results.values():
        assert figures["step_s"] > 0 and figures["generated_tokens"] > 0
        assert figures["rollout_tokens_per_s"] > 0 and figures["learner_tokens_per_s"] > 0
        assert figures["peak_gib"] > 0
