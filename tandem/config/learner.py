"""`learner`: how the learner lays out and computes a micro-batch. Like the rest of the schema
(schema.py), defaults live here and every check names the field to change.

The learner's budgets and memory switches that came before this section (micro_batch_tokens,
logprob_chunk_tokens, activation_checkpointing, meta_init) stay under `trainer` so that
existing scripts keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.config.checks import check_choice

CPU_COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class LearnerConfig:
    """The learner's micro-batch layout and CPU compute precision."""

    packing: bool = False
    """Padding-free micro-batches: a micro-batch's episodes are concatenated into one row,
    positions restart at each episode and attention stays within it (flash-attn's varlen
    kernel on GPU, SDPA episode by episode on CPU), and
    trainer.micro_batch_tokens counts real tokens instead of episodes x the longest. Same loss
    as padding (tandem/learner/batching.py). From verl's use_remove_padding and OpenRLHF's
    --packing_samples; TRL's padding_free."""

    cpu_compute_dtype: str = "float32"
    """Precision of the learner's matmuls on CPU: float32, or bfloat16 under torch.autocast
    (decoder and output head in bf16; the log-softmax, master weights, AdamW state and
    gradient reduction stay fp32). Old log-probs, the reference model and `score` use the
    same compute, so ratios compare like with like. bfloat16 needs a CPU with AVX512-BF16 or
    AMX (avx512_bf16 / amx_bf16 in /proc/cpuinfo; bf16 on aarch64): elsewhere bf16 is
    emulated, many times slower, and the learner refuses it at start. Ignored on GPU, which
    always computes in bf16 (FSDP2 MixedPrecisionPolicy). The GPU recipe of verl, OpenRLHF
    and TRL (bf16 compute, fp32 masters) carried to CPUs with bf16 units
    (docs/loss.md, "Precision")."""

    def __post_init__(self) -> None:
        check_choice(self.cpu_compute_dtype, CPU_COMPUTE_DTYPES, "learner.cpu_compute_dtype")
