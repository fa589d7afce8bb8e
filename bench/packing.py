"""Learner throughput and peak memory, padded vs packed micro-batches (learner.packing).

    python -m bench.packing                 # tiny model and SmolLM2-135M
    python -m bench.packing --models tiny   # just the tiny one

Both sides are the same Learner (FSDP2 code path, world size 1, fp32 on CPU) on the same
episodes, same loss, AdamW and `trainer.micro_batch_tokens`; only `learner.packing` differs.
Episodes have the lengths RL gives (responses from an eighth of the budget to all of it,
prompts of different lengths), which is what padding wastes compute on. Each side runs in
its own process (peak RSS is its own) and times `--steps` steps after one warm-up step;
tokens/s counts real tokens (prompt + response) on both sides. Prints both and ends with
`learner packed/padded: X` (tokens/s of the last model).

Note the budget means different things: padded, a micro-batch holds count x longest <= budget
tokens of padded rectangle; packed, the sum of real lengths <= budget, so a packed micro-batch
holds more episodes and the step runs fewer, larger forwards.
"""

from __future__ import annotations

import random

import torch
from transformers import AutoConfig

from bench.learner import MODELS, _measure, _run_learner, batch_parser
from tandem.config.compose import compose
from tandem.episode import Episode
from tandem.models import resolve_model


def varied_episodes(vocab: int, groups: int, group_size: int, prompt: int, response: int,
                    seed: int = 0) -> tuple[list[Episode], list[float]]:
    """Random co-written episodes: prompts of prompt/2..prompt tokens (one per group),
    responses of response/8..response tokens."""
    rng = random.Random(seed)
    out, advantages = [], []
    for group in range(groups):
        prompt_ids = [rng.randrange(100, vocab) for _ in range(rng.randint(prompt // 2, prompt))]
        for _ in range(group_size):
            length = rng.randint(max(1, response // 8), response)
            out.append(Episode(prompt_ids=prompt_ids,
                               response_ids=[rng.randrange(100, vocab) for _ in range(length)],
                               author_mask=[int(rng.random() < 0.5) for _ in range(length)],
                               logprobs=[-2.0] * length, group=group))
            advantages.append(rng.uniform(-1, 1))
    return out, advantages


def _config(preset: str, path: str | None, args, packing: bool):
    local = [f"model.senior.path={path}", "model.senior.max_context=null"] if path else []
    return compose([
        f"model@model.senior={preset}", *local, f"seed={args.seed}",
        f"rollout.max_prompt_tokens={args.prompt_tokens}",
        f"rollout.max_response_tokens={args.response_tokens}",
        f"eval.max_response_tokens={args.response_tokens}",
        f"algorithm.group_size={args.group_size}", f"trainer.prompts_per_step={args.groups}",
        f"trainer.mini_batch_prompts={args.groups}",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}", "optim.lr=1e-6",
        f"learner.packing={str(packing).lower()}",
    ])


def main() -> None:
    args = batch_parser(__doc__.splitlines()[0], prompt_tokens=96,
                        response_tokens=256).parse_args()

    ratios = []
    for name in args.models:
        preset = MODELS[name]
        path = str(resolve_model(_config(preset, None, args, False).model.senior.path))
        vocab = AutoConfig.from_pretrained(path).vocab_size
        batch = varied_episodes(vocab, args.groups, args.group_size, args.prompt_tokens,
                                args.response_tokens, args.seed)
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in batch[0]]
        tokens = sum(lengths) * args.steps
        print(f"{name}: {len(lengths)} episodes, {min(lengths)}-{max(lengths)} tokens "
              f"(mean {sum(lengths) / len(lengths):.0f}), micro-batch budget "
              f"{args.micro_batch_tokens}, {args.steps} steps, cpu, torch threads "
              f"{torch.get_num_threads()}")
        rates = {}
        for packing in (False, True):
            seconds, peak_kb, _ = _measure(_run_learner, _config(preset, path, args, packing),
                                           path, batch, args.steps, False)
            rates[packing] = tokens / seconds
            label = "packed" if packing else "padded"
            print(f"  {label}: {rates[packing]:8.1f} tokens/s  peak RSS {peak_kb / 2**20:.2f} GiB")
        ratios.append((name, rates[True] / rates[False]))
    for name, ratio in ratios:
        print(f"learner packed/padded {name}: {ratio:.2f}")
    print(f"learner packed/padded: {ratios[-1][1]:.2f}")


if __name__ == "__main__":
    main()
