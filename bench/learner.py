"""Learner throughput: the FSDP2 Learner (world size 1) vs a plain transformers step, and the
learner in fp32 vs bf16 compute (learner.cpu_compute_dtype) against the CPU's matmul peak.

    python -m bench.learner                 # tiny model and SmolLM2-135M
    python -m bench.learner --models tiny   # just the tiny one
    python -m bench.learner --models tiny --emulated-bf16   # bf16 even without bf16 units

Both sides train on the same episodes with the same loss, micro-batches and AdamW; the plain
side is what a researcher would write by hand (no FSDP, no process group). Each variant runs
in its own process so peak memory is its own. Prints tokens/s of each, peak memory, and the
ratios last (`learner/plain: X`, goal >= 0.9 at world size 1; `learner bf16/fp32: X`).

Achieved GFLOP/s use the usual training estimate 6 x parameters x tokens (forward 2, backward
4; no attention term, no recompute): the matmul work a step cannot avoid. The peak is the best
of a few square torch.matmul in fp32 and bf16 measured in the same run. On a CPU without bf16
units (no avx512_bf16 / amx_bf16) the learner refuses bf16 and the bf16 row says so, unless
--emulated-bf16 measures it anyway (the learner's CPU check skipped in the bench process).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import socket
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tandem.config import cpu
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner import batching
from tandem.learner.logprobs import TokenLogprobs, token_logprobs
from tandem.learner.rank import Learner
from tandem.loss import grpo_loss
from tandem.models import resolve_model

MODELS = {"tiny": "tiny", "smollm2": "smollm2_135m"}
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def episodes(vocab: int, groups: int, group_size: int, prompt: int, response: int,
             seed: int = 0) -> tuple[list[Episode], list[float]]:
    """Random co-written episodes of fixed lengths (lengths, not text, set the cost)."""
    rng = random.Random(seed)
    out, advantages = [], []
    for group in range(groups):
        prompt_ids = [rng.randrange(100, vocab) for _ in range(prompt)]
        for _ in range(group_size):
            authors = [int(rng.random() < 0.5) for _ in range(response)]
            out.append(Episode(prompt_ids=prompt_ids,
                               response_ids=[rng.randrange(100, vocab) for _ in range(response)],
                               author_mask=authors, logprobs=[-2.0] * response, group=group))
            advantages.append(rng.uniform(-1, 1))
    return out, advantages


def _config(preset: str, path: str, args, dtype: str = "float32"):
    local = [f"model.senior.path={path}", "model.senior.max_context=null"] if path else []
    return compose([
        f"model@model.senior={preset}", *local, f"seed={args.seed}",
        "rollout.max_prompt_tokens=256", "rollout.max_response_tokens=256",
        "eval.max_response_tokens=256", f"algorithm.group_size={args.group_size}",
        f"trainer.prompts_per_step={args.groups}", f"trainer.mini_batch_prompts={args.groups}",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "optim.lr=1e-6",
        f"learner.cpu_compute_dtype={dtype}",
    ])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of the best of repeated [size, size] @ [size, size] products in `dtype` (at
    least 3, for about `seconds`), on all of torch's threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < seconds:
        started = time.perf_counter()
        torch.matmul(a, b)
        elapsed = time.perf_counter() - started
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * size**3 / best / 1e9


def _run_learner(config, path, batch, steps, emulate, queue):
    if emulate:  # measure bf16 on a CPU the learner would refuse it on (bench only)
        cpu.cpu_flags = lambda: "avx512_bf16"
    learner = Learner(config, path, rank=0, world_size=1, master_addr="127.0.0.1",
                      master_port=_free_port())
    learner.train_step(*batch)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        learner.train_step(*batch)
    elapsed = time.perf_counter() - started
    params = sum(p.numel() for p in learner.model.parameters())  # tied head counted once
    learner.close()
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, params))


def _run_plain(config, path, batch, steps, queue):
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    policy = TokenLogprobs(model, config.trainer.logprob_chunk_tokens)  # the learner's head
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    episodes_, advantages = batch
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in episodes_]
    plan = batching.split_by_token_budget(list(range(len(episodes_))), lengths,
                                          config.trainer.micro_batch_tokens)
    micros = [batching.collate([episodes_[i] for i in m], [advantages[i] for i in m], 0)
              for m in plan]

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = sum(m.senior_tokens for m in micros)
        for micro in micros:
            logprobs, _ = token_logprobs(policy, micro, config.rollout.temperature)
            loss, _ = grpo_loss(logprobs, old_logprobs=logprobs.detach(),
                                advantages=micro.advantages, response_mask=micro.response_mask,
                                author_mask=micro.author_mask, algorithm=config.algorithm)
            (loss * micro.senior_tokens / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _measure(target, *args) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get(timeout=3600)
    process.join(timeout=60)
    return result


def batch_parser(description: str, prompt_tokens: int,
                 response_tokens: int) -> argparse.ArgumentParser:
    """The learner benchmarks' command line: models, steps and the batch's shape."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--response-tokens", type=int, default=response_tokens)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    parser = batch_parser(__doc__.splitlines()[0], prompt_tokens=64, response_tokens=128)
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="measure bf16 compute on a CPU without bf16 units too")
    args = parser.parse_args()

    flags = cpu.cpu_flags()
    bf16_units = cpu.has_bf16_units(flags)
    bf16_skipped = not bf16_units and not args.emulated_bf16
    units = sorted(cpu.BF16_FLAGS & set(flags.split())) or ["none"]
    peaks = {dtype: matmul_peak(getattr(torch, dtype)) for dtype in DTYPES}
    print(f"cpu bf16 units: {', '.join(units)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for dtype, peak in peaks.items():
        print(f"matmul peak {SHORT[dtype]} GFLOP/s: {peak:.1f}")

    ratios, precisions = [], []
    for name in args.models:
        preset = MODELS[name]
        path = str(resolve_model(_config(preset, None, args).model.senior.path))
        vocab = AutoConfig.from_pretrained(path).vocab_size
        config = _config(preset, path, args)
        batch = episodes(vocab, args.groups, args.group_size, args.prompt_tokens,
                         args.response_tokens, args.seed)
        tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in batch[0]) * args.steps
        learner_s, learner_kb, params = _measure(_run_learner, config, path, batch, args.steps,
                                                 False)
        plain_s, plain_kb = _measure(_run_plain, config, path, batch, args.steps)
        bf16 = None
        if not bf16_skipped:
            bf16 = _measure(_run_learner, _config(preset, path, args, "bfloat16"), path, batch,
                            args.steps, not bf16_units)
        ratio = (tokens / learner_s) / (tokens / plain_s)
        ratios.append((name, ratio))
        print(f"{name}: {len(batch[0])} episodes x {args.prompt_tokens}+{args.response_tokens} "
              f"tokens, {args.steps} steps, device cpu, torch threads {torch.get_num_threads()}")
        print(f"  learner (FSDP2, world 1): {tokens / learner_s:8.1f} tokens/s  "
              f"peak RSS {learner_kb / 2**20:.2f} GiB")
        print(f"  plain transformers:       {tokens / plain_s:8.1f} tokens/s  "
              f"peak RSS {plain_kb / 2**20:.2f} GiB")
        flops = 6 * params * tokens  # the whole run's training matmul work (estimate)
        print(f"  {'learner fp32:':<26}{tokens / learner_s:8.1f} tokens/s  "
              f"{flops / learner_s / 1e9:7.1f} GFLOP/s = "
              f"{flops / learner_s / 1e9 / peaks['float32']:.0%} of the fp32 matmul peak "
              f"({params / 1e6:.1f}M parameters)")
        if bf16 is None:
            print("  learner bf16:             refused: this CPU has no bf16 units "
                  "(--emulated-bf16 measures it anyway)")
            continue
        bf16_s, bf16_kb, _ = bf16
        label = "learner bf16:" if bf16_units else "learner bf16 (emulated):"
        print(f"  {label:<26}{tokens / bf16_s:8.1f} tokens/s  "
              f"{flops / bf16_s / 1e9:7.1f} GFLOP/s = "
              f"{flops / bf16_s / 1e9 / peaks['bfloat16']:.0%} of the bf16 matmul peak  "
              f"peak RSS {bf16_kb / 2**20:.2f} GiB")
        precisions.append((name, learner_s / bf16_s))
    for name, ratio in ratios:
        print(f"learner/plain {name}: {ratio:.2f}")
    print(f"learner/plain: {ratios[-1][1]:.2f}")
    for name, ratio in precisions:
        print(f"learner bf16/fp32 {name}: {ratio:.2f}")
    if precisions:
        print(f"learner bf16/fp32: {precisions[-1][1]:.2f}")
    else:
        print("learner bf16/fp32: not measured (no bf16 units; see --emulated-bf16)")


if __name__ == "__main__":
    main()
