"""`learner`: how the learner lays out and computes a micro-batch. Like the rest of the schema
(schema.py), defaults live here and every check names the field to change.

The learner's budgets and memory switches that came before this section (micro_batch_tokens,
logprob_chunk_tokens, activation_checkpointing, meta_init) stay under `trainer` so that
existing scripts keep working.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LearnerConfig:
    """The learner's micro-batch layout."""

    packing: bool = False
    """Padding-free micro-batches: a micro-batch's episodes are concatenated into one row,
    positions restart at each episode and attention stays within it (flash-attn's varlen
    kernel on GPU, a block-diagonal causal mask with SDPA on CPU), and
    trainer.micro_batch_tokens counts real tokens instead of episodes x the longest. Same loss
    as padding (tandem/learner/batching.py). From verl's use_remove_padding and OpenRLHF's
    --packing_samples; TRL's padding_free."""
