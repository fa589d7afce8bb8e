"""Learner throughput: the FSDP2 Learner (world size 1) vs a plain transformers step.

    python -m bench.learner                 # tiny model and SmolLM2-135M
    python -m bench.learner --models tiny   # just the tiny one

Both sides train on the same episodes with the same loss, micro-batches and AdamW; the plain
side is what a researcher would write by hand (no FSDP, no process group). Each variant runs
in its own process so peak memory is its own. Prints tokens/s of each, peak memory, and the
ratio last (`learner/plain: X`, goal >= 0.9 at world size 1).
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

from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.learner import batching
from tandem.learner.logprobs import TokenLogprobs, token_logprobs
from tandem.learner.rank import Learner
from tandem.loss import grpo_loss
from tandem.models import resolve_model

MODELS = {"tiny": "tiny", "smollm2": "smollm2_135m"}


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


def _config(preset: str, path: str, args):
    local = [f"model.senior.path={path}", "model.senior.max_context=null"] if path else []
    return compose([
        f"model@model.senior={preset}", *local, f"seed={args.seed}",
        "rollout.max_prompt_tokens=256", "rollout.max_response_tokens=256",
        "eval.max_response_tokens=256", f"algorithm.group_size={args.group_size}",
        f"trainer.prompts_per_step={args.groups}", f"trainer.mini_batch_prompts={args.groups}",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "optim.lr=1e-6",
    ])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_learner(config, path, batch, steps, queue):
    learner = Learner(config, path, rank=0, world_size=1, master_addr="127.0.0.1",
                      master_port=_free_port())
    learner.train_step(*batch)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        learner.train_step(*batch)
    elapsed = time.perf_counter() - started
    learner.close()
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


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


def parse_batch_args(description: str, prompt_tokens: int,
                     response_tokens: int) -> argparse.Namespace:
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
    return parser.parse_args()


def main() -> None:
    args = parse_batch_args(__doc__.splitlines()[0], prompt_tokens=64, response_tokens=128)

    ratios = []
    for name in args.models:
        preset = MODELS[name]
        path = str(resolve_model(_config(preset, None, args).model.senior.path))
        vocab = AutoConfig.from_pretrained(path).vocab_size
        config = _config(preset, path, args)
        batch = episodes(vocab, args.groups, args.group_size, args.prompt_tokens,
                         args.response_tokens, args.seed)
        tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in batch[0]) * args.steps
        learner_s, learner_kb = _measure(_run_learner, config, path, batch, args.steps)
        plain_s, plain_kb = _measure(_run_plain, config, path, batch, args.steps)
        ratio = (tokens / learner_s) / (tokens / plain_s)
        ratios.append((name, ratio))
        print(f"{name}: {len(batch[0])} episodes x {args.prompt_tokens}+{args.response_tokens} "
              f"tokens, {args.steps} steps, device cpu, torch threads {torch.get_num_threads()}")
        print(f"  learner (FSDP2, world 1): {tokens / learner_s:8.1f} tokens/s  "
              f"peak RSS {learner_kb / 2**20:.2f} GiB")
        print(f"  plain transformers:       {tokens / plain_s:8.1f} tokens/s  "
              f"peak RSS {plain_kb / 2**20:.2f} GiB")
    for name, ratio in ratios:
        print(f"learner/plain {name}: {ratio:.2f}")
    print(f"learner/plain: {ratios[-1][1]:.2f}")


if __name__ == "__main__":
    main()
