"""The turn channel: rollout driver <-> engine actor over a ZMQ socket (msgpack).

Both ends live here: `TurnChannel` runs in the driver, `ChannelServer` on the engine actor's
event loop. The driver imports this module, so it imports no vLLM."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tandem.alternation import StopRule
from tandem.engine.api import Sampling, Segment

if TYPE_CHECKING:  # the engine imports this module
    from tandem.engine.rollout_engine import RolloutEngine

# msgpack on the wire. A call: (call id, method, session id, new ids, stop, sampling), a reply:
# (call id, segment, error). Each message is a list of them.
_Call = tuple[int, str, str, list[int], StopRule | None, Sampling | None]
_Reply = tuple[int, Segment | None, str | None]


class ChannelServer:
    """The engine's end of `TurnChannel`s: runs each call as a task on the engine's event loop
    and sends the replies ready in one loop iteration (the turns one engine step finished) to
    each driver as one message. It listens on `host` (the engine's node IP, for drivers on
    other nodes; loopback for one process) without authentication, like Ray's own ports."""

    def __init__(self, engine: RolloutEngine, host: str) -> None:
        self._engine = engine
        self._socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.address = f"tcp://{host}:{self._socket.bind_to_random_port(f'tcp://{host}')}"
        self._decoder = msgspec.msgpack.Decoder(list[_Call])
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox: dict[bytes, list[_Reply]] = {}
        self._tasks: set[asyncio.Future] = set()  # the loop keeps only weak references
        self._serving = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
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
                      new_ids: list[int], stop: StopRule | None,
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

    async def turn(self, session_id: str, new_ids: Sequence[int], stop: StopRule,
                   sampling: Sampling) -> Segment:
        return await self._call("turn", session_id, list(new_ids), stop, sampling)

    async def close_session(self, session_id: str) -> None:
        await self._call("close_session", session_id, [], None, None)

    async def generate(self, prompt_ids: Sequence[int], stop: StopRule,
                       sampling: Sampling) -> Segment:
        return await self._call("generate", "", list(prompt_ids), stop, sampling)

    def _call(self, method: str, *args: Any) -> asyncio.Future:
        if self._broken is not None:
            raise self._broken
        receiver = self._tasks[0]
        if receiver.done() or receiver.cancelling():  # the loop is closing: no reply would come
            raise RuntimeError(f"the channel to {self.address} stopped receiving")
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

