"""Peak CUDA memory of the smoke preset's learner step (`experiment=smoke_gpu`), chunked
log-probs against one chunk per micro-batch. Skipped without CUDA (marked gpu)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from tandem.config.compose import compose
from tandem.learner.rank import Learner
from tandem.models import ModelNotFoundError, resolve_model
from tandem.testkit import full_batch

GIB = 2**30
# Qwen3-0.6B's shape (the smoke preset's model), for a random-weight stand-in when the real
# one is not on the machine: memory depends on the shape, not on the weights.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def _smoke_model(tiny_model_dir, tmp_path) -> str:
    try:
        return str(resolve_model(compose(["experiment=smoke_gpu"]).model.senior.path))
    except ModelNotFoundError:
        stand_in = tmp_path / "qwen3-0.6b-shape"
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B))
        model.to(torch.bfloat16).save_pretrained(stand_in)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(stand_in)
        return str(stand_in)


def _peak(model_dir: str, chunk: int) -> dict[str, float]:
    config = compose(["experiment=smoke_gpu", f"model.senior.path={model_dir}",
                      f"trainer.logprob_chunk_tokens={chunk}"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    learner = Learner(config, model_dir, 0, 1, "127.0.0.1", port)
    try:
        vocab = learner.model.get_output_embeddings().weight.shape[0]
        batch = full_batch(config, min(vocab, len(learner.tokenizer)))
        params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
        metrics = learner.train_step(*batch)
        torch.cuda.synchronize()
        return {"peak_gib": metrics["memory/learner_peak_gib"],
                # fp32 weights, gradients and two AdamW moments: what any step holds
                "states_gib": 4 * params / GIB,
                "cached_after_gib": (torch.cuda.memory_reserved()
                                     - torch.cuda.memory_allocated()) / GIB,
                "micro_batch_tokens": config.trainer.micro_batch_tokens,
                "vocab": vocab, "loss": metrics["train/loss"]}
    finally:
        learner.close()
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_smoke_learner_step_keeps_no_whole_vocabulary_logits(tiny_model_dir, tmp_path,
                                                             record_property):
    model_dir = _smoke_model(tiny_model_dir, tmp_path)
    chunked = _peak(model_dir, chunk=1024)
    whole = _peak(model_dir, chunk=16384)  # one chunk per micro-batch: the unchunked cost
    record_property("learner_memory", json.dumps({"chunked": chunked, "whole": whole}))
    print("smoke learner step, peak CUDA memory:", json.dumps(
        {"chunk 1024": chunked, "one chunk per micro-batch": whole}))
    # the longest micro-batch's fp32 logits over the whole vocabulary, once
    episode = compose(["experiment=smoke_gpu"]).rollout
    tokens = episode.max_prompt_tokens // 2 + episode.max_response_tokens
    logits_gib = (chunked["micro_batch_tokens"] // tokens) * tokens * chunked["vocab"] * 4 / GIB
    assert chunked["peak_gib"] < whole["peak_gib"] - logits_gib, (chunked, whole)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-2, abs=1e-3)
    # the step handed its cache back: a colocated engine waking now finds the memory free
    assert chunked["cached_after_gib"] < 1.0, chunked
