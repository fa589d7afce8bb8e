"""Streaming sessions: each episode's KV cache stays resident in the engine between turns.

Runs in the engine actor, on the engine's event loop. A turn then prefills only the other
writer's tokens since this engine's last turn. vLLM 0.32's streaming input: `AsyncLLM.generate`
fed by an async generator of `StreamingInput`s, DELTA outputs, n = 1, no stop strings; a turn
ends when `finish_reason` is set. vLLM keeps only tokens whose KV it computed, so each turn's
last sampled token is dropped inside the engine and the session re-sends it.

Parked sessions (stream open, no turn running) hold KV blocks that vLLM never preempts: past the
cache, minus room for one max-length request, or past the sequence slots, the least recently
used idle session is closed and reopened from its token ids at its next turn, instead of every
request waiting forever.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.engine.protocol import StreamingInput
from vllm.inputs.engine import tokens_input
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from tandem.engine.scheduler import REASON_BOUNDARY_DROPPED


@dataclass
class _Stream:
    """An open vLLM streaming request: the queue feeding it and the outputs coming back."""

    inputs: asyncio.Queue
    outputs: AsyncIterator[RequestOutput]


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


class Sessions:
    """The open sessions of one engine and the KV blocks the parked ones hold."""

    def __init__(self, llm: AsyncLLM, max_model_len: int) -> None:
        self._llm = llm
        self._max_model_len = max_model_len
        cache = llm.vllm_config.cache_config
        self.block_size = cache.block_size
        self.kv_blocks = cache.num_gpu_blocks - 1  # one is vLLM's null block
        # Keep room for one request of max_model_len and one sequence slot, or a request that
        # cannot get blocks waits forever.
        self._park_blocks_limit = self.kv_blocks - _ceil_div(max_model_len, self.block_size)
        self._park_seqs_limit = llm.vllm_config.scheduler_config.max_num_seqs - 1
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count()
        self._clock = itertools.count()
        self.parked_blocks = 0
        self._parked = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    async def turn(self, session_id: str, new_ids: Sequence[int],
                   params: SamplingParams) -> list[CompletionOutput]:
        """Append `new_ids` to the session (opening or reopening its stream) and run one turn
        under `params` (DELTA outputs); returns the turn's outputs, the last with its
        finish_reason. On any failure the session is closed."""
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
        if len(context) + 1 > self._max_model_len:
            raise ValueError(f"session {session_id!r} would hold {len(context)} tokens, but the "
                             f"engine's max_model_len is {self._max_model_len}")
        self._sessions[session_id] = session
        session.busy = True
        try:
            self._unpark(session)
            session.context = context
            if session.stream is None:
                session.stream = self._open_stream(session_id, params)
            session.stream.inputs.put_nowait(StreamingInput(
                prompt=tokens_input(context[computed:]), sampling_params=params))
            outputs: list[CompletionOutput] = []
            while not outputs or outputs[-1].finish_reason is None:
                output = await anext(session.stream.outputs, None)
                if output is None:
                    raise RuntimeError(f"vLLM ended session {session_id!r}'s stream mid-turn")
                outputs.append(output.outputs[0])
            if outputs[-1].finish_reason == "abort":
                raise RuntimeError(f"vLLM aborted session {session_id!r}'s turn")
            sampled = [token for out in outputs for token in out.token_ids]
            # the engine keeps KV for all but the last sampled token (a dropped one is not context)
            dropped = outputs[-1].stop_reason == REASON_BOUNDARY_DROPPED
            session.context += sampled[:len(sampled) - dropped]
            session.computed = len(session.context) - (0 if dropped else 1)
        except BaseException:
            self._sessions.pop(session_id, None)
            if session.stream is not None:
                # aclose() aborts the request in the engine (vLLM's generate handles GeneratorExit)
                asyncio.ensure_future(session.stream.outputs.aclose())
            raise
        finally:
            session.busy = False
        session.last_used = next(self._clock)
        await self._park(session)
        return outputs

    async def close(self, session_id: str) -> None:
        """End a session and free its KV blocks (they stay in the prefix cache)."""
        session = self._sessions.pop(session_id, None)
        if session is not None and session.stream is not None:
            self._unpark(session)
            await _close_stream(session.stream)

    async def close_all(self) -> None:
        for session_id in list(self._sessions):
            await self.close(session_id)

    async def close_streams(self) -> None:
        """Close every open stream but keep the sessions: each reopens from its token ids at its
        next turn (after a weight load, whose new weights the old KV does not match)."""
        for session in self._sessions.values():
            if session.stream is not None:
                await self._evict(session, for_space=False)

    def forget(self) -> None:
        """Drop every session without closing its stream (the engine is shutting down)."""
        self._sessions.clear()

    def _open_stream(self, session_id: str, params: SamplingParams) -> _Stream:
        inputs: asyncio.Queue = asyncio.Queue()

        async def stream():
            while (item := await inputs.get()) is not None:
                yield item

        # a reopened session gets a fresh request id: the old one may still be finishing
        request_id = f"session-{session_id}-{next(self._ids)}"
        return _Stream(inputs, self._llm.generate(stream(), params, request_id))

    def _unpark(self, session: _Session) -> None:
        if session.blocks:
            self.parked_blocks -= session.blocks
            self._parked -= 1
            session.blocks = 0

    async def _park(self, session: _Session) -> None:
        if session.stream is None or session.busy or session.blocks:
            return
        session.blocks = max(1, _ceil_div(session.computed, self.block_size))
        self.parked_blocks += session.blocks
        self._parked += 1
        while self.parked_blocks > self._park_blocks_limit or self._parked > self._park_seqs_limit:
            idle = [s for s in self._sessions.values() if s.blocks]
            if not idle:
                break
            await self._evict(min(idle, key=lambda s: s.last_used))

    async def _evict(self, session: _Session, for_space: bool = True) -> None:
        stream, session.stream = session.stream, None
        self._unpark(session)
        self.evictions += for_space
        await _close_stream(stream)


async def _close_stream(stream: _Stream) -> None:
    stream.inputs.put_nowait(None)
    # the end of the output stream confirms the engine released the request
    async for _ in stream.outputs:
        pass


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
