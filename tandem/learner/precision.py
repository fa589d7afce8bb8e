"""The learner's compute precision on CPU.

On GPU FSDP2's MixedPrecisionPolicy runs the senior in bf16 over fp32 master weights
(rank.shard_model). On CPU `learner.cpu_compute_dtype=bfloat16` does the same through
`torch.autocast`: the decoder's and the output head's matmuls run in bf16, their backward
too, while the parameters, their gradients, AdamW's state and any gradient reduction stay
fp32; the head's logits are cast to fp32 before the log-softmax (logprobs.TokenLogprobs), as
on GPU. Autocast rather than a CPU MixedPrecisionPolicy because one CPU rank is not wrapped in
FSDP at all (shard_model), and autocast covers world size 1 and gloo ranks alike.

bf16 pays only on CPUs with bf16 units (AVX512-BF16, AMX; BF16 on aarch64): elsewhere oneDNN
emulates it and a matmul is several to a hundred times slower than fp32, so the learner
refuses it there (`compute_dtype`; the flags come from tandem/config/cpu.py).
"""

from __future__ import annotations

import torch

from tandem.config.checks import ConfigError
from tandem.config.cpu import has_bf16_units


def compute_dtype(setting: str, device: str, flags: str) -> torch.dtype | None:
    """The autocast dtype of the learner's forward for `learner.cpu_compute_dtype`; None runs
    it as the parameters are stored (fp32 on CPU; on GPU FSDP2 casts to bf16 itself)."""
    if device != "cpu" or setting == "float32":
        return None
    elif setting == "bfloat16":
        if not has_bf16_units(flags):
            raise ConfigError(
                "learner.cpu_compute_dtype=bfloat16, but this CPU has no bf16 matmul units "
                "(none of avx512_bf16, amx_bf16, bf16 in /proc/cpuinfo): bf16 would be emulated "
                "and slower than fp32. Set learner.cpu_compute_dtype=float32")
        return torch.bfloat16
    raise ValueError(f"unknown learner.cpu_compute_dtype: {setting!r}")
