"""The turn channel: rollout driver <-> engine actor over a ZMQ socket (msgpack).

Both ends live here: `TurnChannel` runs in the driver, `ChannelServer` on the engine actor's
event loop. The driver imports this module, so it imports no vLLM.

Security (Ray authenticates its own ports, not this one):
- Each server has a random 32-byte key, handed to drivers only through the Ray call that
  returns its address (`ChannelTicket`). Every message carries an HMAC-SHA256 of its bytes under
  that key, the sending channel's random nonce and a sequence number: a peer without the key is
  refused before anything is decoded, and a recorded message cannot be replayed. Replies are
  signed too. (ZMQ CURVE would also do, but needs a ZAP handler thread per engine; payloads are
  token ids, which need no secrecy.)
- A driver that shares the engine's network namespace (same kernel, same `/proc/self/ns/net`)
  gets a loopback address; others get the node's IP.
- Every call is type- and size-checked (`_Call`); a bad one is answered with an error, never
  allowed to stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tandem.alternation import StopRule
from tandem.engine.api import Sampling, Segment

if TYPE_CHECKING:  # the engine imports this module
    from tandem.engine.rollout_engine import RolloutEngine

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_MESSAGE_BYTES = 512 * 2**20
"""Larger messages are dropped by ZMQ (which disconnects the sender); the driver splits its
calls into messages below this."""
MAX_IDS = 2**22  # token ids per call: beyond any model's context
_MAC = 32  # HMAC-SHA256
_NONCE = 16
_HEADER = _NONCE + 8 + _MAC  # nonce, sequence number (big-endian), MAC
_REMEMBERED_CHANNELS = 4096  # nonces whose last sequence number the server keeps (replays)

# msgpack on the wire. A call: (call id, method, session id, new ids, stop, sampling), a reply:
# (call id, segment, error); call id -1 answers a whole message that could not be read. Each
# message is a list of them. The constraints are checked by msgspec as it decodes.
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Method = Literal["turn", "generate", "close_session"]
_Call = tuple[int, Method, Annotated[str, msgspec.Meta(max_length=256)],
              Annotated[list[TokenId], msgspec.Meta(max_length=MAX_IDS)],
              StopRule | None, Sampling | None]
_Reply = tuple[int, Segment | None, str | None]
_REPLY, _REFUSED = b"reply", b"refused"  # the server's two message kinds


@dataclass(frozen=True)
class ChannelTicket:
    """What a driver needs to use an engine's channel; travels only inside a Ray call."""

    address: str
    key: bytes


def loopback_scope() -> str | None:
    """Who can reach this process over loopback: the kernel's boot id and this process's network
    namespace. Equal scopes share 127.0.0.1; None (not Linux) never does."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return None


def _sign(key: bytes, kind: bytes, nonce: bytes, payload: bytes) -> bytes:
    return hmac.digest(key, kind + nonce + payload, "sha256")


class ChannelServer:
    """The engine's end of `TurnChannel`s: runs each call as a task on the engine's event loop
    and sends the replies ready in one loop iteration (the turns one engine step finished) to
    each driver as one message. Listens on loopback and/or `node_host`, as drivers ask
    (`ticket`); answers only messages signed with its key."""

    def __init__(self, engine: RolloutEngine, node_host: str) -> None:
        self._engine = engine
        self._node_host = node_host
        self.key = secrets.token_bytes(32)
        self._socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + _HEADER)
        self._addresses: dict[str, str] = {}  # host -> address bound there
        self._calls = msgspec.msgpack.Decoder(_Call)
        self._encoder = msgspec.msgpack.Encoder()
        self._sequence: OrderedDict[bytes, int] = OrderedDict()  # nonce -> last seen
        self._outbox: dict[tuple[bytes, bytes], list[_Reply]] = {}  # (driver, nonce) -> replies
        self._tasks: set[asyncio.Future] = set()  # the loop keeps only weak references
        self.refused = 0  # messages without a valid signature, or replayed
        self._serving = asyncio.ensure_future(self._serve())

    def ticket(self, driver_scope: str | None) -> ChannelTicket:
        """The address for a driver with this `loopback_scope()` (loopback if it is ours, else
        the node's IP; each bound on first use) and the key."""
        host = LOOPBACK if driver_scope is not None and driver_scope == loopback_scope() \
            else self._node_host
        if host not in self._addresses:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
            self._addresses[host] = f"tcp://{host}:{port}"
        return ChannelTicket(self._addresses[host], self.key)

    async def _serve(self) -> None:
        """Consumes every message; waits only for the next one. A message is answered (or
        refused) here or by the tasks it starts, and nothing it holds can end this loop."""
        while True:
            driver, *frames = await self._socket.recv_multipart()
            try:
                nonce, payload = self._open(frames)
            except _Refused as refusal:
                self._refuse(driver, str(refusal))
                continue
            try:
                raws = msgspec.msgpack.decode(payload, type=list[msgspec.Raw])
            except msgspec.DecodeError as error:
                self._reply(driver, nonce, (-1, None, f"malformed channel message: {error}"))
                continue
            for raw in raws:
                try:
                    call = self._calls.decode(raw)
                except msgspec.DecodeError as error:  # ValidationError too
                    self._reply(driver, nonce, (_call_id(raw), None,
                                                f"malformed channel call: {error}"))
                    continue
                task = asyncio.ensure_future(self._answer(driver, nonce, *call))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _open(self, frames: list[bytes]) -> tuple[bytes, bytes]:
        """(nonce, payload) of a signed, fresh message; else raises `_Refused`."""
        if len(frames) != 2 or len(frames[0]) != _HEADER:
            raise _Refused("not a signed turn-channel message")
        header, payload = frames
        nonce, sequence, mac = header[:_NONCE], header[_NONCE:-_MAC], header[-_MAC:]
        if not hmac.compare_digest(mac, _sign(self.key, b"q" + sequence, nonce, payload)):
            raise _Refused("bad signature: this client does not hold the engine's channel key")
        number = int.from_bytes(sequence, "big")
        if number <= self._sequence.get(nonce, -1):
            raise _Refused(f"replayed message (sequence number {number})")
        self._sequence[nonce] = number
        self._sequence.move_to_end(nonce)
        if len(self._sequence) > _REMEMBERED_CHANNELS:
            self._sequence.popitem(last=False)
        return nonce, payload

    def _refuse(self, driver: bytes, reason: str) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("turn channel: refused %d message(s) so far; the last: %s",
                        self.refused, reason)
        self._socket.send_multipart([driver, _REFUSED, reason.encode()])

    async def _answer(self, driver: bytes, nonce: bytes, call_id: int, method: str,
                      session_id: str, new_ids: list[int], stop: StopRule | None,
                      sampling: Sampling | None) -> None:
        segment, error = None, None
        try:
            if method != "close_session" and (stop is None or sampling is None):
                raise ValueError(f"channel call {method} needs a stop rule and sampling")
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
        self._reply(driver, nonce, (call_id, segment, error))

    def _reply(self, driver: bytes, nonce: bytes, reply: _Reply) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.setdefault((driver, nonce), []).append(reply)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        if self._socket.closed:
            return
        for (driver, nonce), replies in outbox.items():
            payload = self._encoder.encode(replies)
            self._socket.send_multipart([driver, _REPLY, _sign(self.key, b"r", nonce, payload),
                                         payload])

    def close(self) -> None:
        self._serving.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._socket.close(linger=0)


class _Refused(Exception):
    """A message the server does not read: unsigned, wrongly signed or replayed."""


def _call_id(raw: msgspec.Raw) -> int:
    """The call id of a call that failed validation, if it has a readable one (-1 if not)."""
    try:
        head = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return -1
    if isinstance(head, list) and head and type(head[0]) is int:
        return head[0]
    return -1


class TurnChannel:
    """A rollout driver's line to one engine actor: `turn`, `close_session` and `generate` as on
    `RolloutEngine`, over the socket of `RolloutEngine.open_channel`'s ticket instead of a Ray
    call each.

    Calls made in one event-loop iteration travel as one message. Use one channel from one event
    loop and `close()` it there. If the engine's process dies, its pending and later calls raise
    (no waiting for a timeout); so do they if the engine refuses the channel's key.
    """

    def __init__(self, ticket: ChannelTicket) -> None:
        self.address = ticket.address
        self._key = ticket.key
        self._nonce = secrets.token_bytes(_NONCE)
        self._sequence = itertools.count()
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socket.connect(ticket.address)
        self._decoder = msgspec.msgpack.Decoder(list[_Reply])
        self._encoder = msgspec.msgpack.Encoder()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[tuple] = []
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
            self._send(outbox)

    def _send(self, calls: list[tuple]) -> None:
        """Sign and send `calls`, split into messages the server accepts."""
        payload = self._encoder.encode(calls)
        if len(payload) > MAX_MESSAGE_BYTES and len(calls) > 1:
            self._send(calls[:len(calls) // 2])
            self._send(calls[len(calls) // 2:])
            return
        if len(payload) > MAX_MESSAGE_BYTES:
            self._resolve(calls[0][0], None, f"a {calls[0][1]} call of {len(payload)} bytes is "
                                             f"over the channel's {MAX_MESSAGE_BYTES}")
            return
        sequence = next(self._sequence).to_bytes(8, "big")
        mac = _sign(self._key, b"q" + sequence, self._nonce, payload)
        self._socket.send_multipart([self._nonce + sequence + mac, payload])

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            if frames[0] == _REFUSED and len(frames) == 2:
                self._fail(RuntimeError(
                    f"the engine at {self.address} refused this channel's messages "
                    f"({frames[1].decode(errors='replace')}); ask its open_channel again"))
                return
            if (len(frames) != 3 or frames[0] != _REPLY or not hmac.compare_digest(
                    frames[1], _sign(self._key, b"r", self._nonce, frames[2]))):
                log.warning("turn channel to %s: dropped a reply without a valid signature",
                            self.address)
                continue
            for call_id, segment, error in self._decoder.decode(frames[2]):
                if call_id == -1:  # the engine could not read a whole message of ours
                    for pending in list(self._pending):
                        self._resolve(pending, None, error)
                else:
                    self._resolve(call_id, segment, error)

    def _resolve(self, call_id: int, segment: Segment | None, error: str | None) -> None:
        future = self._pending.get(call_id)
        if future is None or future.done():  # the caller gave up (timeout)
            return
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
