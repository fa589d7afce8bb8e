"""One FSDP2 learner rank on CUDA, bf16 compute: tokens/s and peak memory (bench.gpu_check).

    python -m bench.gpu_learner                       # Qwen3-0.6B-shaped stand-in
    python -m bench.gpu_learner --model /path/to/Qwen3-0.6B

The CPU suite trains in fp32 over gloo; on a GPU the Learner casts to bf16 for compute
(FSDP2's MixedPrecisionPolicy) over NCCL and uses flash-attn when it is installed. Neither
path runs on CPU. Without a model on the machine (no network), a random-weight model of
Qwen3-0.6B's shape with the kit's tokenizer stands in: speed and memory depend on the shape,
not on the weights. Trains `--steps` steps after a warm-up on `experiment=smoke_gpu`'s batch
shape (prompts_per_step x group_size episodes of half the prompt budget plus the whole
response budget) and prints one `LEARNER {json}` line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from tandem.config.compose import compose
from tandem.learner.rank import CUDA_ATTENTION, Learner
from tandem.models import resolve_model
from tandem.testkit import full_batch

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def stand_in(directory: Path) -> str:
    """A random Qwen3-0.6B-shaped model with the kit's tiny tokenizer, saved in bf16."""
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B))
    model.to(torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model("kit:tiny")).save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model directory (default: a stand-in)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_learner needs CUDA; the CPU learner's benchmark is "
                         "python -m bench.learner")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or stand_in(Path(scratch) / "qwen3-0.6b-shape")
        config = compose(["experiment=smoke_gpu", f"model.senior.path={model_dir}",
                          "model.senior.max_context=null"])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        learner = Learner(config, model_dir, 0, 1, "127.0.0.1", port)
        try:
            vocab = min(learner.model.get_output_embeddings().weight.shape[0],
                        len(learner.tokenizer))
            episodes, advantages = full_batch(config, vocab)
            learner.train_step(episodes, advantages)  # warm-up: kernels, allocator, AdamW
            steps = [learner.train_step(episodes, advantages) for _ in range(args.steps)]
        finally:
            learner.close()
    print("LEARNER " + json.dumps({
        "tokens_per_s": statistics.median(s["perf/learner_tokens_per_s"] for s in steps),
        "peak_gib": max(s.get("memory/learner_peak_gib", float("nan")) for s in steps),
        "loss": steps[-1]["train/loss"], "attention": CUDA_ATTENTION,
        "gpu": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
