"""Scaling: rollout throughput with 1 vs 2 engine replicas per role, and the training step
time against group size and response length.

    python -m bench.scaling          # 3 repeats; groups 2 4 8 x 64 tokens, group 4 x 32 64 128
    python -m bench.scaling --quick  # 1 repeat, 32 tokens; groups 2 and 4 (bench.all --quick)

What is compared, and how it is kept fair:

- Replicas. A two-node local Ray cluster (`ray.cluster_utils.Cluster`: a head and a second
  node, each with logical CPUs) serves the tandem rollout (p = 0.5, step schedule) with 1, then
  2, engine replicas per role (`cluster.senior.replicas`, `cluster.junior.replicas`), placed the
  way a run places them (`runtime.placement.reserve` with `cluster.num_nodes=2`: the engines
  spread over both nodes). Both runs roll out the same prompts, group size, response budget and
  temperature through `tandem.rollout.Rollout` (bench/rollout.py's helpers), on eager engines
  pinned to the same machine cores, after one warm-up rollout; figures are medians of
  `--repeats`. Prints `rollout 2/1 replicas: X` (tokens/s with 2 replicas / with 1).
- Step time. tandem's real training loop (`tandem.train.train`, as bench/vs_trl.py runs it: a
  fresh process per point, one senior and one junior engine, the FSDP2 learner, the weight
  push) on the tiny kit model at p = 0.5 (step schedule), against group size and response
  length, one axis at a time through the center (`--group-size`, `--tokens`): each point is a
  fresh training run, minutes on 2 CPU cores. Medians over `--steps` steps after `--warmup`
  warm-up steps (engine start, model load and the first, slow batch are outside every figure),
  `--prompts` prompts a step. Prints a table of seconds per step
  (rollout, train, total) and `step s/token largest/smallest group: Y`, the seconds per
  generated token at the largest group size over the smallest (< 1: a bigger batch amortises
  the step's fixed costs).

On a CPU machine every figure is relative. The two nodes are one machine: its cores are all the
replicas get, so 2 replicas per role put two engines on each core where 1 put one, and no
speed-up is expected there; the ratio shows that the mechanics work (episodes spread over
replicas on both nodes) and what the extra engines cost. On a GPU cluster each replica gets its
own device, and the ratio is the speed-up. Absolute seconds depend on the machine and its load
(docs/BENCHMARKS.md): name the CPU model and the load average beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.cluster_utils import Cluster

from bench.rollout import MODELS, PROBLEMS, _config, _measure, _prompts
from bench.vs_trl import Workload, measure
from tandem.alternation import Boundaries
from tandem.config.compose import CONF_DIR
from tandem.models import load_tokenizer, resolve_model
from tandem.rollout import engine_settings
from tandem.runtime.engines import shutdown_engines, start_engines
from tandem.runtime.placement import reserve

STEP_SCHEDULE = ("algorithm.schedule=step", "algorithm.handoff_p=0.5")
ENGINE_START_S = 900.0


def rollout_with_replicas(replicas: int, args: argparse.Namespace) -> dict[str, float]:
    """Median rollout figures with `replicas` engines per role on the connected Ray cluster."""
    preset = MODELS[args.model]
    path = str(resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").path))
    tokenizer = load_tokenizer(path)
    boundaries = Boundaries.from_tokenizer(tokenizer)
    config = _config(preset, path, args, *STEP_SCHEDULE, "cluster.num_nodes=2",
                     f"cluster.senior.replicas={replicas}", f"cluster.junior.replicas={replicas}",
                     "cluster.enforce_eager=true")
    placement = reserve(config.cluster, timeout_s=120)
    engines: dict[str, list] = {"senior": [], "junior": []}
    try:
        first_core = 0  # as Actors.start counts them: seniors first, wrapping around the cores
        for role, options in (("senior", placement.senior), ("junior", placement.junior)):
            settings = engine_settings(config, path, role, boundaries, first_core)
            engines[role] = start_engines(settings, options, ENGINE_START_S)
            first_core += replicas * getattr(config.cluster, role).cpus
        nodes = set(ray.get([engine.node_id.remote() for group in engines.values()
                             for engine in group], timeout=60))
        prompts = _prompts(tokenizer)

        async def measure() -> dict:
            await _measure(config, engines, tokenizer, prompts, solo=False, repeats=1)  # warm-up
            return await _measure(config, engines, tokenizer, prompts, solo=False,
                                  repeats=args.repeats)

        figures = asyncio.run(measure())
    finally:
        for group in engines.values():
            if group:
                shutdown_engines(group)
        placement.remove()
    return {**figures, "nodes": len(nodes)}


def replica_table(results: dict[int, dict], args: argparse.Namespace) -> str:
    """One row per replica count."""
    lines = [f"rollout: {len(PROBLEMS)} prompts x {args.group_size} episodes, <= {args.tokens} "
             f"tokens, T={args.temperature}, p=0.5, step schedule, {args.model} model, median "
             f"of {args.repeats} after 1 warm-up; a two-node local Ray cluster on one machine",
             f"{'replicas/role':>13} {'engines':>7} {'nodes':>5} {'tok/s':>8} {'tok/ep':>7} "
             f"{'both busy':>9}  runs"]
    for replicas, row in results.items():
        lines.append(f"{replicas:>13} {2 * replicas:>7} {row['nodes']:>5} "
                     f"{row['rollout/tokens_per_s']:8.1f} "
                     f"{row['rollout/response_tokens_mean']:7.1f} "
                     f"{row['rollout/both_engines_busy_frac']:9.2f}  "
                     + " ".join(f"{v:.0f}" for v in row["runs"]))
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    """Seconds per step by (group size, response length): rows carry `group_size`, `tokens`
    and bench.vs_trl's figures (`step_s`, `rollout_s`, `train_s`, `generated_tokens`)."""
    lines = [f"{'group':>5} {'tokens':>6} {'gen tok':>7} {'rollout s':>9} {'train s':>7} "
             f"{'total s':>7} {'ms/gen tok':>10}"]
    for row in rows:
        lines.append(f"{row['group_size']:>5} {row['tokens']:>6} {row['generated_tokens']:7.0f} "
                     f"{row['rollout_s']:9.2f} {row['train_s']:7.2f} {row['step_s']:7.2f} "
                     f"{1000 * row['step_s'] / row['generated_tokens']:10.2f}")
    return "\n".join(lines)


def headlines(replicas: dict[int, dict], steps: list[dict], tokens: int) -> list[str]:
    """The `name: value` lines bench.all reads (a figure is left out when not measured);
    the step figure compares group sizes at `tokens` response tokens."""
    lines = []
    if 1 in replicas and 2 in replicas:
        ratio = replicas[2]["rollout/tokens_per_s"] / replicas[1]["rollout/tokens_per_s"]
        lines.append(f"rollout 2/1 replicas: {ratio:.2f}")
    by_group = sorted((row for row in steps if row["tokens"] == tokens),
                      key=lambda row: row["group_size"])
    if len(by_group) > 1:
        ratio = _seconds_per_token(by_group[-1]) / _seconds_per_token(by_group[0])
        lines.append(f"step s/token largest/smallest group: {ratio:.2f}")
    return lines


def _seconds_per_token(row: dict) -> float:
    return row["step_s"] / row["generated_tokens"]


def step_times(args: argparse.Namespace) -> list[dict]:
    """bench.vs_trl's tandem run for every (group size, response length), each in a fresh
    process; its figures with `group_size` and `tokens`."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as logs:
        for group_size, tokens in step_points(args.group_sizes, args.lengths,
                                              (args.group_size, args.tokens)):
            work = Workload(model=args.model, prompts=args.prompts, group_size=group_size,
                            tokens=tokens, warmup=args.warmup, steps=args.steps,
                            seed=args.seed, overrides=STEP_SCHEDULE)
            print(f"step time: group {group_size}, {tokens} tokens ...", flush=True)
            figures = measure("tandem p=0.5", work, Path(logs))
            rows.append({"group_size": group_size, "tokens": tokens, **figures})
    return rows


def step_points(group_sizes: list[int], lengths: list[int], center: tuple[int, int]
                ) -> list[tuple[int, int]]:
    """(group size, response length) points: each group size at the center's length, then
    each other length at the center's group size. One axis at a time: a full grid costs a
    fresh training run (minutes on 2 CPU cores) per point."""
    center_group, center_tokens = center
    points = [(group_size, center_tokens) for group_size in group_sizes]
    points += [(center_group, tokens) for tokens in lengths if (center_group, tokens) not in points]
    return points


def rollout_replicas(args: argparse.Namespace) -> dict[int, dict]:
    """Both replica counts on one two-node local Ray cluster, started and stopped here."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.node_cpus})
    try:
        cluster.add_node(num_cpus=args.node_cpus)
        ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
        return {replicas: rollout_with_replicas(replicas, args) for replicas in (1, 2)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 32-token rollouts, step time at groups 2 and 4 x 32 "
                             "tokens, 1 measured step")
    parser.add_argument("--model", default="tiny", choices=list(MODELS))
    parser.add_argument("--parts", nargs="+", default=["replicas", "steps"],
                        choices=["replicas", "steps"])
    parser.add_argument("--tokens", type=int, default=64,
                        help="response budget of the rollouts; the step points' center")
    parser.add_argument("--group-size", type=int, default=4,
                        help="group size of the rollouts; the step points' center")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per training step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--node-cpus", type=int, default=4, help="logical CPUs of each node")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.temperature, args.kv_gib = 0.6, 0.5  # what bench.rollout's _config reads
    if args.quick:
        args.repeats, args.tokens, args.steps = 1, 32, 1
        args.group_sizes, args.lengths = [2, 4], [32]

    # the training runs first: each child starts a local Ray of its own
    steps = step_times(args) if "steps" in args.parts else []
    if steps:
        print(f"\nstep time: {args.model} model, {args.prompts} prompts x group, p=0.5, step "
              f"schedule, median of {args.steps} step(s) after {args.warmup} warm-up\n"
              + step_table(steps), flush=True)
    replicas = rollout_replicas(args) if "replicas" in args.parts else {}
    if replicas:
        print("\n" + replica_table(replicas, args))
    print()
    for line in headlines(replicas, steps, args.tokens):
        print(line)


if __name__ == "__main__":
    main()
