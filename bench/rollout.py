"""Rollout throughput: solo vs tandem on the same pair of engines and the same prompts.

    python -m bench.rollout                       # tiny model, then SmolLM2-135M
    python -m bench.rollout --models tiny --repeats 3
    python -m bench.rollout --models tiny --in-process    # no Ray, no driver hop: see below
    python -m bench.rollout --schedules step --balanced step

Self-paired (as in the paper): both engines serve the same model, each pinned to its own core.
Solo = the two engines split the episodes between them and each writes alone (handoff_p = 1);
tandem = every episode alternates between the two engines under one schedule. Both go
through `tandem.rollout.Rollout`, so the only difference is who writes which segment. Prints
the median tokens/s of each schedule and the ratio tandem/solo, ending with the lines
`tandem/solo step: X` and `tandem/solo word: Y`; `--json FILE` writes every ratio.
`--balanced step` also measures the step schedule with `algorithm.first_writer=balanced` (row
`step/balanced`; the others draw each episode's first writer by a coin, the paper's way).

`--in-process` builds both engines as plain `RolloutEngine`s in this process and drives them
directly: no Ray actors, no turn channel, no driver process between the engines. A hand-off then
costs only vLLM's own path out of one EngineCore and into the other, so the ratio it gives is
the most that taking the driver off the hand-off path (an engine handing the segment straight to
the other) could reach on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
from pathlib import Path

MODELS = {"tiny": "tiny", "smollm2": "smollm2_135m"}
SCHEDULES = ("step", "word", "sentence", "chunk", "alternate")
PROBLEMS = [
    "What is 17 + 25?", "Tom has 12 apples and buys 7 more. How many apples does he have?",
    "What is (6 + 9) * 4?", "Mei shares 36 cards equally among 4 friends. How many each?",
    "What is 81 - 46?", "What is 13 * 7?", "Ben has 40 coins and gives 15 away. How many left?",
    "What is 5 * 8 + 12?",
]


def _config(preset: str, path: str, args, *overrides: str):
    from tandem.config.compose import compose

    return compose([
        f"model@model.senior={preset}", f"model.senior.path={path}",
        "model.senior.max_context=null", "rollout.max_prompt_tokens=256",
        f"rollout.max_response_tokens={args.tokens}", f"eval.max_response_tokens={args.tokens}",
        f"rollout.temperature={args.temperature}", f"algorithm.group_size={args.group_size}",
        f"trainer.prompts_per_step={len(PROBLEMS)}", f"trainer.mini_batch_prompts={len(PROBLEMS)}",
        f"cluster.cpu_kvcache_gib={args.kv_gib}", "cluster.call_timeout_s=900", *overrides,
    ])


def _prompts(tokenizer) -> list[list[int]]:
    from tandem.data import format_prompt

    return [format_prompt(tokenizer, problem, "") for problem in PROBLEMS]


async def _measure(config, engines: dict, tokenizer, prompts, solo: bool, repeats: int) -> dict:
    from tandem.rollout import Rollout

    if solo:  # both engines write alone, splitting the groups between them
        rollout = Rollout(config, engines["senior"] + engines["junior"], engines["junior"],
                          tokenizer)
    else:
        rollout = Rollout(config, engines["senior"], engines["junior"], tokenizer)
    runs = [(await rollout.agenerate(prompts, step=repeat))[1] for repeat in range(repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["runs"] = [run["rollout/tokens_per_s"] for run in runs]
    return median


def bench_model(name: str, args) -> dict[str, float]:
    from omegaconf import OmegaConf

    from tandem.alternation import Boundaries
    from tandem.config.compose import CONF_DIR
    from tandem.engine.rollout_engine import RolloutEngine
    from tandem.models import load_tokenizer, resolve_model
    from tandem.rollout import engine_settings
    from tandem.runtime.engines import shutdown_engines, start_engines

    preset = MODELS[name]
    path = str(resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").path))
    tokenizer = load_tokenizer(path)
    boundaries = Boundaries.from_tokenizer(tokenizer)
    base = _config(preset, path, args)
    cores = os.cpu_count() or 1
    engines = {}
    try:
        for index, role in enumerate(("senior", "junior")):
            settings = [dataclasses.replace(s, seed=args.seed) for s in engine_settings(
                base, path, role, boundaries, first_core=index % cores)]
            engines[role] = ([RolloutEngine(s) for s in settings] if args.in_process
                             else start_engines(settings))

        async def measure_all() -> dict:  # one event loop: in-process engines are bound to it
            prompts = _prompts(tokenizer)
            await _measure(base, engines, tokenizer, prompts, solo=False, repeats=1)  # warm-up
            results = {"solo": await _measure(_config(preset, path, args, "algorithm=grpo"),
                                              engines, tokenizer, prompts, solo=True,
                                              repeats=args.repeats)}
            rows = [(s, "random") for s in args.schedules]
            rows += [(s, "balanced") for s in args.balanced]
            for schedule, first in rows:
                config = _config(preset, path, args, f"algorithm.schedule={schedule}",
                                 f"algorithm.handoff_p={args.p}",
                                 f"algorithm.max_gap_tokens={args.max_gap}",
                                 f"algorithm.first_writer={first}")
                row = schedule if first == "random" else f"{schedule}/{first}"
                results[row] = await _measure(config, engines, tokenizer, prompts, solo=False,
                                              repeats=args.repeats)
            return results

        results = asyncio.run(measure_all())
    finally:
        for group in engines.values():
            if args.in_process:
                for engine in group:
                    engine.shutdown()
            else:
                shutdown_engines(group)

    solo = results["solo"]["rollout/tokens_per_s"]
    episodes = len(PROBLEMS) * args.group_size
    print(f"\n{name}: {episodes} episodes x <= {args.tokens} tokens, T={args.temperature}, "
          f"p={args.p}, K={args.max_gap}, median of {args.repeats}, one core per engine"
          + (", both engines in this process (no Ray, no driver hop)" if args.in_process else ""))
    print(f"{'schedule':<14} {'tok/s':>8} {'ratio':>6} {'tok/ep':>7} {'req/ep':>7} "
          f"{'hand-offs':>9} {'senior':>7} {'both busy':>9} {'eng cpu':>7} {'tok/step':>8} "
          f"{'comp/gen':>8}  runs")
    ratios = {}
    for schedule, row in results.items():
        ratio = row["rollout/tokens_per_s"] / solo
        ratios[schedule] = ratio
        print(f"{schedule:<14} {row['rollout/tokens_per_s']:8.1f} {ratio:6.2f} "
              f"{row['rollout/response_tokens_mean']:7.1f} "
              f"{row['rollout/requests_per_episode']:7.1f} "
              f"{row['tandem/handoffs_per_episode']:9.1f} "
              f"{row['tandem/senior_token_frac']:7.2f} "
              f"{row['rollout/both_engines_busy_frac']:9.2f} "
              f"{row['rollout/engine_cpu_frac']:7.2f} "
              f"{row['rollout/generated_tokens_per_step']:8.1f} "
              f"{row['rollout/computed_per_generated_token']:8.2f}  "
              + " ".join(f"{v:.0f}" for v in row["runs"]))
    print("both busy: share of the time both roles had a call in flight (the driver's view); "
          "eng cpu: CPU time of the EngineCores / wall; tok/step: generated tokens per engine "
          "step; comp/gen: tokens computed (prefill + decode) per generated token")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--balanced", nargs="+", default=[], choices=SCHEDULES,
                        help="schedules to measure again with algorithm.first_writer=balanced")
    parser.add_argument("--max-gap", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="both engines in this process, driven directly (no Ray actors, no "
                             "turn channel): the ratio with no driver on the hand-off path")
    parser.add_argument("--json", type=Path,
                        help="also write {model: {schedule: tandem/solo}} here (bench.all)")
    args = parser.parse_args()

    import ray

    if args.in_process:
        ratios = {name: bench_model(name, args) for name in args.models}
    else:
        # address="local": never attach to a head some other process started with `ray start`
        ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False,
                 log_to_driver=True)
        try:
            ratios = {name: bench_model(name, args) for name in args.models}
        finally:
            ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(ratios, indent=2))
    print()
    headline = ("step", "word", "step/balanced")
    for name, by_schedule in ratios.items():
        for schedule in headline:
            if schedule in by_schedule:
                print(f"tandem/solo {schedule} ({name}): {by_schedule[schedule]:.2f}")
    last = ratios[args.models[-1]]
    for schedule in headline:
        if schedule in last:
            print(f"tandem/solo {schedule}: {last[schedule]:.2f}")


if __name__ == "__main__":
    main()
