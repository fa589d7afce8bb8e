"""Peak memory (RSS) per learner rank while the senior loads: from_pretrained on every rank
then fully_shard (trainer.meta_init=false) against meta-device init (trainer.meta_init=true).

    python bench/learner_init_memory.py                      # SmolLM2-135M, 2 ranks
    python bench/learner_init_memory.py --model tiny --world-size 2

For each variant, `--world-size` fresh processes (gloo, one thread each) build a `Learner`
together, then train one small step. Each rank resets its peak-RSS mark after its imports
(/proc/self/clear_refs) and reports VmHWM (the peak so far) at three points: once its weights
are in place (sharded; for meta init, read), once the learner is built (meta init checks the
head through an FSDP forward there), and after the step (AdamW's moments exist); plus VmRSS
before, RssAnon after the build (the file pages safetensors maps are not the model's memory)
and the bytes of its own parameter shards. One line per rank and variant, then the peaks side
by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.all import cpu_model
from bench.learner_memory import status_gib
from tandem.config.compose import compose
from tandem.learner import loading
from tandem.learner import rank as learner_rank
from tandem.learner.rank import Learner
from tandem.models import resolve_model
from tandem.testkit import full_batch

GIB = 2**30




def _overrides(model: str, world_size: int) -> list[str]:
    return [f"model@model.senior={model}", "model.senior.max_context=null",
            "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
            "eval.max_response_tokens=64", f"cluster.learner.world_size={world_size}",
            "algorithm.group_size=2", "trainer.prompts_per_step=2",
            "trainer.mini_batch_prompts=2", "trainer.micro_batch_tokens=512"]


def _mark_after(module, name: str, marks: dict[str, float]) -> None:
    """Record the peak RSS each time `module.name` returns (the last call wins)."""
    original = getattr(module, name)

    def marked(*args, **kwargs):
        result = original(*args, **kwargs)
        marks["loaded"] = status_gib("VmHWM")
        return result

    setattr(module, name, marked)


def child(args: argparse.Namespace) -> None:
    """One rank of one variant; prints one JSON line."""
    torch.set_num_threads(1)
    overrides = _overrides(args.model, args.world_size)
    path = str(resolve_model(compose(overrides).model.senior.path))
    config = compose(overrides + [f"model.senior.path={path}",
                                  f"trainer.meta_init={args.meta_init}"])
    marks: dict[str, float] = {}
    # weights are in place once sharded (from_pretrained) or once read (meta init)
    _mark_after(learner_rank, "shard_model", marks)
    _mark_after(loading, "load_weights", marks)
    Path("/proc/self/clear_refs").write_text("5")  # peak mark := current RSS
    before = status_gib("VmRSS")
    started = time.perf_counter()
    learner = Learner(config, path, args.rank, args.world_size, "127.0.0.1", args.port)
    elapsed = time.perf_counter() - started
    built, anon = status_gib("VmHWM"), status_gib("RssAnon")
    shard = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes
                for p in learner.model.parameters())
    learner.train_step(*full_batch(config, vocab=len(learner.tokenizer)))
    row = {"meta_init": args.meta_init, "rank": args.rank, "world_size": args.world_size,
           "rss_before_gib": round(before, 3), "peak_loaded_gib": round(marks["loaded"], 3),
           "peak_built_gib": round(built, 3), "peak_step_gib": round(status_gib("VmHWM"), 3),
           "anon_built_gib": round(anon, 3), "own_shard_gib": round(shard / GIB, 3),
           "init_s": round(elapsed, 1)}
    learner.close()
    print(json.dumps(row), flush=True)


def _variant(args: argparse.Namespace, meta_init: str) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ranks = [subprocess.Popen(
        [sys.executable, __file__, "--child", "--model", args.model, "--world-size",
         str(args.world_size), "--rank", str(rank), "--port", str(port), "--meta-init",
         meta_init], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(args.world_size)]
    rows = []
    for rank, process in enumerate(ranks):
        out, err = process.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if process.returncode or not lines:
            print(err[-3000:], file=sys.stderr)
            raise SystemExit(f"meta_init={meta_init} rank {rank} failed ({process.returncode})")
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--meta-init", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    path = resolve_model(compose(_overrides(args.model, args.world_size)).model.senior.path)
    print(f"model {args.model} ({path}), {args.world_size} ranks, CPU: {cpu_model()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    before, after = _variant(args, "false"), _variant(args, "true")
    for old, new in zip(before, after, strict=True):
        print(f"rank {old['rank']} peak RSS, from_pretrained -> meta init (GiB): weights in "
              f"place {old['peak_loaded_gib']:.2f} -> {new['peak_loaded_gib']:.2f}; learner "
              f"built {old['peak_built_gib']:.2f} -> {new['peak_built_gib']:.2f}; after one "
              f"step {old['peak_step_gib']:.2f} -> {new['peak_step_gib']:.2f}. RSS before "
              f"{old['rss_before_gib']:.2f}, own fp32 shard {new['own_shard_gib']:.2f}, build "
              f"{old['init_s']} s -> {new['init_s']} s", flush=True)

if __name__ == "__main__":
    main()
