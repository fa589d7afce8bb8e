"""Peak memory (RSS) of one CPU learner step at `trainer.micro_batch_tokens`, per code tree.

    python bench/learner_memory.py                          # this checkout, chunked
    python bench/learner_memory.py --code /path/to/old/checkout --code . --chunk 1024 4096

Each variant runs in a fresh process (one learner rank, gloo, world size 1) with that tree
first on PYTHONPATH, so an older checkout (before chunked log-probs) measures the old path.
The child loads the model, runs a small warm-up step (AdamW's moments exist from then on),
resets the kernel's peak-RSS mark (/proc/self/clear_refs), trains one step of `--episodes`
co-written episodes filling one micro-batch, and reports VmRSS before the step, VmHWM during it
and their difference: what the step itself adds. tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.all import cpu_model


def status_gib(field: str) -> float:
    """A /proc/self/status memory field in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 2**30
    raise RuntimeError(f"{field} not in /proc/self/status")



def _episodes(vocab: int, count: int, prompt: int, response: int, seed: int = 0):
    from tandem.episode import Episode

    rng = random.Random(seed)
    episodes, advantages = [], []
    for index in range(count):
        group = index // 4
        episodes.append(Episode(
            prompt_ids=[rng.randrange(100, vocab) for _ in range(prompt)],
            response_ids=[rng.randrange(100, vocab) for _ in range(response)],
            author_mask=[rng.randrange(2) for _ in range(response)],
            logprobs=[-2.0] * response, group=group))
        advantages.append(rng.uniform(-1, 1))
    return episodes, advantages


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import torch

    import tandem
    from tandem.config.compose import compose
    from tandem.learner.rank import Learner
    from tandem.models import resolve_model

    torch.set_num_threads(args.threads)
    response = args.micro_batch_tokens // args.episodes - args.prompt_tokens
    overrides = [
        f"model@model.senior={args.model}", "model.senior.max_context=null",
        f"rollout.max_prompt_tokens={args.prompt_tokens}",
        f"rollout.max_response_tokens={response}", f"eval.max_response_tokens={response}",
        "algorithm.group_size=4", f"trainer.prompts_per_step={args.episodes // 4}",
        f"trainer.mini_batch_prompts={args.episodes // 4}",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "optim.lr=1e-6",
    ]
    if args.chunk:
        overrides.append(f"trainer.logprob_chunk_tokens={args.chunk}")
    path = str(resolve_model(compose(overrides).model.senior.path))
    config = compose(overrides + [f"model.senior.path={path}"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    learner = Learner(config, path, 0, 1, "127.0.0.1", port)
    vocab = learner.model.get_output_embeddings().weight.shape[0]
    learner.train_step(*_episodes(vocab, args.episodes, 8, 8, seed=1))  # AdamW moments
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_gib("VmRSS")
    started = time.perf_counter()
    metrics = learner.train_step(*_episodes(vocab, args.episodes, args.prompt_tokens, response))
    elapsed = time.perf_counter() - started
    peak = status_gib("VmHWM")
    learner.close()
    print(json.dumps({
        "code": str(Path(tandem.__file__).parent.parent), "chunk": args.chunk or "n/a",
        "model": args.model, "vocab": vocab, "micro_batch_tokens": args.micro_batch_tokens,
        "rss_before_gib": round(before, 3), "peak_gib": round(peak, 3),
        "step_adds_gib": round(peak - before, 3), "step_s": round(elapsed, 1),
        "loss": metrics["train/loss"], "cpu": cpu_model(), "threads": args.threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", nargs="+", action="extend", default=None,
                        help="checkout(s) whose tandem to measure (default: this one)")
    parser.add_argument("--chunk", nargs="+", type=int, default=None,
                        help="trainer.logprob_chunk_tokens values (only for trees that have "
                             "it; an older tree runs once without)")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.chunk = args.chunk[0] if args.chunk else None
        child(args)
        return
    here = Path(__file__).resolve().parent.parent
    for code in args.code or [str(here)]:
        tree = Path(code).resolve()
        chunked = "logprob_chunk_tokens" in (tree / "tandem/config/schema.py").read_text()
        for chunk in (args.chunk or [None]) if chunked else [None]:
            command = [sys.executable, __file__, "--child", "--model", args.model,
                       "--micro-batch-tokens", str(args.micro_batch_tokens),
                       "--episodes", str(args.episodes), "--prompt-tokens",
                       str(args.prompt_tokens), "--threads", str(args.threads)]
            if chunk:
                command += ["--chunk", str(chunk)]
            env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
            result = subprocess.run(command, env=env, capture_output=True, text=True,
                                    check=False)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode or not lines:
                print(result.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {tree} chunk={chunk} failed ({result.returncode})")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
