"""`make gpu-check`: every GPU-only check in one run, one PASS/FAIL/SKIP line each.

    python -m bench.gpu_check               # on a GPU machine: about 10 minutes on one GPU
    python -m bench.gpu_check --dry-run     # anywhere: what would run, and why a check skips

The CPU suite never exercises the CUDA paths, and the GPU machines lent to this project have
torch but neither Ray nor vLLM, and no network. So each check runs as plain Python where it
can, and one that needs what the machine lacks is skipped with the reason, never failed:

- `gpu tests`: the tests marked `gpu` (`pytest -m gpu`: the CUDA IPC and NCCL transport ends,
  the learner's peak memory on a Qwen3-0.6B-shaped model, packed micro-batches through
  flash-attn's varlen kernel); needs pytest, and hydra-core,
  omegaconf and transformers (pure-Python wheels a session can carry) as tandem's config and
  learner do;
- `push qwen3-0.6b`, `push qwen3-4b`: bench/weight_sync_gpu.py over CUDA IPC (and NCCL with
  two GPUs), bf16 buckets from fp32 masters; goal: a 4B push < 0.5 s;
- `learner bf16`: one FSDP2 Learner rank on a Qwen3-0.6B-shaped stand-in (random weights,
  the kit's tokenizer), bf16 compute, flash-attn when installed; tokens/s and peak memory;
- `make smoke`: 5 colocated tandem steps with vLLM and Ray; needs both, and a model the
  machine has (`--smoke-model DIR`, or Qwen3-0.6B in the Hugging Face cache).

Each check runs in a child process under its own deadline (`--budget-s` in all, shared in
order). Exit status: 1 if any check failed, else 0 (all skipped is 0: a CPU machine is fine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Machine:
    """What this machine offers the checks."""

    gpus: int
    has: frozenset[str]  # importable modules among OPTIONAL
    network: bool = False

    @staticmethod
    def probe() -> Machine:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            gpus = 0
        return Machine(gpus, frozenset(m for m in OPTIONAL
                                       if importlib.util.find_spec(m) is not None))


OPTIONAL = ("pytest", "hydra", "omegaconf", "transformers", "ray", "vllm", "flash_attn")
TANDEM = ("hydra", "omegaconf", "transformers")  # what importing tandem's config and learner needs


@dataclass(frozen=True)
class Check:
    """One check: a child command, the share of the budget it may use, and a reader of its
    output that returns (passed, figure)."""

    name: str
    needs: tuple[str, ...]  # modules besides torch with CUDA
    command: Callable[[argparse.Namespace, Machine], list[str]]
    read: Callable[[str, int], tuple[bool, str]]
    budget_share: float
    min_gpus: int = 1


def gpu_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files with a `gpu` mark: only these are collected, since the others import Ray
    or vLLM at the top, which the GPU machines lack."""
    return sorted(str(path.relative_to(ROOT)) for path in tests.rglob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())


def _pytest_result(output: str, code: int) -> tuple[bool, str]:
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)",
                                                                 line)]
    figure = summary[-1].strip("= ") if summary else "no pytest summary"
    return code == 0, figure


def push_figure(output: str, model: str) -> tuple[bool, str]:
    """(passed, figure) of one model's lines from bench.weight_sync_gpu: the 4B goal is a
    push under 0.5 s; smaller models only have to run."""
    lines = [line for line in output.splitlines() if line.startswith(f"{model} over ")]
    if not lines:
        return False, "no push line"
    seconds = [float(m.group(1)) for line in lines
               if (m := re.search(r": ([\d.]+) s per push", line))]
    figure = "; ".join(re.sub(r" \(median of.*", "", line) for line in lines)
    return (bool(seconds) and (model != "qwen3-4b" or max(seconds) < 0.5)), figure


def _push(model: str) -> Check:
    def command(args, machine):
        transports = ["cuda_ipc"] + (["nccl"] if machine.gpus >= 2 else [])
        return [sys.executable, "-m", "bench.weight_sync_gpu", "--models", model,
                "--transports", *transports, "--pushes", "3"]

    return Check(f"push {model}", (), command,
                 lambda output, code: push_figure(output, model) if code == 0 else
                 (False, f"exit {code}"), 0.15 if model == "qwen3-0.6b" else 0.2)


def _learner_result(output: str, code: int) -> tuple[bool, str]:
    rows = [line for line in output.splitlines() if line.startswith("LEARNER ")]
    if code or not rows:
        return False, f"exit {code}"
    row = json.loads(rows[-1].removeprefix("LEARNER "))
    ok = all(map(lambda v: v == v and abs(v) != float("inf"), (row["loss"], row["tokens_per_s"])))
    return ok, (f"{row['tokens_per_s']:.0f} tokens/s, peak {row['peak_gib']:.2f} GiB, "
                f"attention {row['attention']}, loss {row['loss']:.4f}")


def _smoke_command(args, machine) -> list[str]:
    # make smoke's two commands without its `install` prerequisite (pip needs the network)
    run_dir = ROOT / "runs" / "smoke" / time.strftime("gpu-check-%Y%m%d-%H%M%S")
    model = f" model.senior.path={args.smoke_model}" if args.smoke_model else ""
    return ["bash", "-c",
            f"{sys.executable} -m tandem.train experiment=smoke_gpu hydra.run.dir={run_dir} "
            f"trainer.total_steps={args.smoke_steps}{model} && "
            f"{sys.executable} -m tandem.output.smoke {run_dir} --steps {args.smoke_steps}"]


def _smoke_result(output: str, code: int) -> tuple[bool, str]:
    verdict = [line for line in output.splitlines() if "PASS" in line or "FAIL" in line]
    return code == 0, verdict[-1].strip() if verdict else f"exit {code}"


CHECKS = (
    Check("gpu tests", ("pytest", *TANDEM),
          lambda args, machine: [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                 "no:cacheprovider", *gpu_test_files()],
          _pytest_result, 0.25),
    _push("qwen3-0.6b"),
    _push("qwen3-4b"),
    Check("learner bf16", TANDEM,
          lambda args, machine: [sys.executable, "-m", "bench.gpu_learner"],
          _learner_result, 0.15),
    Check("make smoke", (*TANDEM, "ray", "vllm"), _smoke_command, _smoke_result, 0.25),
)


def skip_reason(check: Check, machine: Machine, args: argparse.Namespace) -> str | None:
    """Why `check` cannot run here, or None."""
    if machine.gpus < check.min_gpus:
        return "no CUDA GPU visible to torch"
    missing = [m for m in check.needs if m not in machine.has]
    if missing:
        return f"{', '.join(missing)} not installed"
    if check.name == "make smoke" and not (args.smoke_model or machine.network):
        return ("no model: pass --smoke-model DIR (a local Qwen3-0.6B, say); this machine has no "
                "network for the hub")
    return None


def _env() -> dict[str, str]:
    # this checkout first, then whatever the caller carried (pure-Python wheels, say)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_check(check: Check, args: argparse.Namespace, machine: Machine,
              timeout_s: float) -> tuple[str, str]:
    """(PASS | FAIL, figure) of one check run in a child process."""
    command = check.command(args, machine)
    started = time.perf_counter()
    # its own process group: a check past its deadline goes with every process it spawned
    # (spawned ranks holding GPU memory would spoil the checks after it)
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "FAIL", f"over its {timeout_s:.0f} s deadline"
    passed, figure = check.read(output, process.returncode)
    if not passed and args.verbose:
        print(output[-4000:], file=sys.stderr)
    return ("PASS" if passed else "FAIL"), f"{figure} ({time.perf_counter() - started:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run nothing: print each check as it would run or skip")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--smoke-model", help="a local model directory for make smoke")
    parser.add_argument("--smoke-steps", type=int, default=5)
    parser.add_argument("--network", action="store_true",
                        help="the hub is reachable (make smoke may download Qwen3-0.6B)")
    parser.add_argument("--only", nargs="+", help="run only these checks (by name)")
    parser.add_argument("--verbose", action="store_true", help="print a failed check's output")
    args = parser.parse_args(argv)
    machine = Machine.probe()
    if args.network:
        machine = Machine(machine.gpus, machine.has, network=True)
    print(f"gpu-check: {machine.gpus} GPU(s); installed: "
          f"{', '.join(sorted(machine.has)) or 'none of ' + ', '.join(OPTIONAL)}", flush=True)
    deadline = time.monotonic() + args.budget_s
    failed = False
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        reason = skip_reason(check, machine, args)
        if reason is not None:
            print(f"SKIP {check.name}: {reason}", flush=True)
            continue
        timeout_s = min(args.budget_s * check.budget_share, deadline - time.monotonic())
        if args.dry_run:
            print(f"RUN  {check.name}: would run `{' '.join(check.command(args, machine))}` "
                  f"within {timeout_s:.0f} s (dry run)", flush=True)
            continue
        if timeout_s < 10:
            print(f"SKIP {check.name}: the {args.budget_s:.0f} s budget is spent", flush=True)
            continue
        verdict, figure = run_check(check, args, machine, timeout_s)
        failed |= verdict == "FAIL"
        print(f"{verdict} {check.name}: {figure}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
