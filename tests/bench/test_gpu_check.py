"""make gpu-check on a machine without what a check needs: every check skips, saying why."""

from __future__ import annotations

import argparse
import sys

from bench.gpu_check import (
    CHECKS,
    Check,
    Machine,
    gpu_test_files,
    main,
    push_figure,
    run_check,
    skip_reason,
)

ARGS = argparse.Namespace(smoke_model=None, smoke_steps=5)
ARGS_RUN = argparse.Namespace(smoke_model=None, smoke_steps=5, verbose=False)


def test_dry_run_here_lists_every_check_once_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(Machine, "probe", staticmethod(lambda: Machine(0, frozenset())))
    assert main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = [line for line in lines[1:] if line.split()[0] in ("SKIP", "RUN", "PASS", "FAIL")]
    assert [line.split(":")[0].split(" ", 1)[1].strip() for line in verdicts] == [
        check.name for check in CHECKS]
    assert all(line.startswith("SKIP") and "no CUDA GPU" in line for line in verdicts)


def test_a_gpu_machine_without_ray_or_vllm_skips_only_the_smoke():
    tandem = {"hydra", "omegaconf", "transformers"}
    machine = Machine(1, frozenset({"pytest", *tandem}))
    reasons = {check.name: skip_reason(check, machine, ARGS) for check in CHECKS}
    assert reasons["make smoke"] == "ray, vllm not installed"
    assert [name for name, reason in reasons.items() if reason is None] == [
        "gpu tests", "push qwen3-0.6b", "push qwen3-4b", "learner bf16"]
    no_pytest = Machine(1, frozenset(tandem))
    assert skip_reason(CHECKS[0], no_pytest, ARGS) == "pytest not installed"
    with_both = Machine(1, frozenset({"ray", "vllm", *tandem}))
    assert "--smoke-model" in skip_reason(CHECKS[-1], with_both, ARGS)


def test_dry_run_on_a_gpu_names_the_commands_within_the_budget(capsys, monkeypatch):
    monkeypatch.setattr(Machine, "probe", staticmethod(lambda: Machine(1, frozenset())))
    assert main(["--dry-run", "--budget-s", "600"]) == 0
    out = capsys.readouterr().out
    assert "RUN  push qwen3-4b: would run `" in out and "--transports cuda_ipc --pushes 3`" in out
    assert "within 120 s (dry run)" in out  # 4B: a fifth of the budget
    assert "SKIP gpu tests: pytest, hydra, omegaconf, transformers not installed" in out
    assert "SKIP learner bf16: hydra, omegaconf, transformers not installed" in out


def test_the_4b_push_passes_only_under_half_a_second():
    line = ("qwen3-4b over cuda_ipc: 8.04 GB bf16 in 8 buckets of <= 1024 MiB: {s} s per push, "
            "40.0 GB/s (median of 3: 0.2, 0.2, 0.2 s)")
    assert push_figure(line.format(s="0.201"), "qwen3-4b")[0]
    assert not push_figure(line.format(s="0.701"), "qwen3-4b")[0]
    assert push_figure(line.format(s="0.701").replace("4b", "0.6b"), "qwen3-0.6b")[0]
    assert push_figure("", "qwen3-4b") == (False, "no push line")


def test_a_check_reports_its_figure_and_one_past_its_deadline_fails():
    learner_line = ('print(\'LEARNER {"tokens_per_s": 5000.0, "peak_gib": 9.5, "loss": 0.01, '
                    '"attention": "flash_attention_2"}\')')
    fast = Check("learner bf16", (), lambda args, machine: [sys.executable, "-c", learner_line],
                 CHECKS[3].read, 1.0)
    verdict, figure = run_check(fast, ARGS_RUN, Machine(1, frozenset()), timeout_s=120)
    assert verdict == "PASS", figure
    assert figure.startswith("5000 tokens/s, peak 9.50 GiB, attention flash_attention_2")
    slow = Check("slow", (), lambda args, machine: [sys.executable, "-c",
                                                    "import time; time.sleep(60)"],
                 CHECKS[3].read, 1.0)
    assert run_check(slow, ARGS_RUN, Machine(1, frozenset()), timeout_s=1) == (
        "FAIL", "over its 1 s deadline")


def test_the_gpu_tests_are_found_by_their_mark():
    files = gpu_test_files()
    assert "tests/transport/test_gpu_transport.py" in files
    assert "tests/learner/test_learner_memory.py" in files
    assert all(path.startswith("tests/") for path in files)
