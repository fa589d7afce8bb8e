"""The turn channel's guard (`tandem.engine.channel`): a ChannelServer/TurnChannel pair on
loopback with a recording stand-in for the engine, no vLLM. A peer without the engine's key
changes nothing; a malformed message gets an error and the channel goes on serving."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from tandem.alternation import StopRule
from tandem.engine import channel as wire
from tandem.engine.api import Sampling, Segment
from tandem.engine.channel import ChannelServer, ChannelTicket, TurnChannel, loopback_scope

RULE, GREEDY = StopRule(max_tokens=4), Sampling(temperature=0.0)
WAIT = 10  # seconds; every answer here comes in milliseconds


class Engine:
    """Stands in for RolloutEngine: records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def turn(self, session_id, new_ids, stop, sampling):
        self.calls.append(("turn", session_id, new_ids))
        return Segment([len(new_ids)], [-0.5], "stop", 1, 0)

    async def generate(self, prompt_ids, stop, sampling):
        self.calls.append(("generate", prompt_ids))
        return Segment([7], [-0.1], "stop", 1, 0)

    async def close_session(self, session_id):
        self.calls.append(("close_session", session_id))


def serve(test):
    """Run `test(engine, server, ticket)` on a fresh event loop with a loopback server."""
    async def main():
        engine = Engine()
        server = ChannelServer(engine, "127.0.0.1")
        try:
            return await asyncio.wait_for(test(engine, server, server.ticket(loopback_scope())),
                                          WAIT)
        finally:
            server.close()

    return asyncio.run(main())


class Peer:
    """A raw ZMQ client: sends any frames, reads the server's answer."""

    def __init__(self, address: str) -> None:
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.connect(address)

    async def ask(self, *frames: bytes) -> list[bytes]:
        await self.socket.send_multipart(list(frames))
        return await self.socket.recv_multipart()

    def close(self) -> None:
        self.socket.close(linger=0)


def signed(key: bytes, nonce: bytes, sequence: int, payload: bytes) -> list[bytes]:
    """A message as a TurnChannel frames it."""
    number = sequence.to_bytes(8, "big")
    return [nonce + number + wire._sign(key, b"q" + number, nonce, payload), payload]


def replies(frames: list[bytes]) -> list:
    assert frames[0] == b"reply", frames
    return msgspec.msgpack.decode(frames[2])


async def good_client_is_served(engine, ticket, session="ok"):
    channel = TurnChannel(ticket)
    try:
        segment = await channel.turn(session, [1, 2, 3], RULE, GREEDY)
        await channel.close_session(session)
    finally:
        channel.close()
    assert segment.token_ids == [3]
    assert engine.calls[-2:] == [("turn", session, [1, 2, 3]), ("close_session", session)]


def test_a_client_without_the_key_is_refused_and_changes_nothing():
    async def test(engine, server, ticket):
        intruder = TurnChannel(ChannelTicket(ticket.address, b"\0" * 32))
        with pytest.raises(RuntimeError, match="refused.*bad signature"):
            await intruder.close_session("0-0-senior")
        with pytest.raises(RuntimeError, match="refused"):  # the channel stays broken
            await intruder.turn("0-0-senior", [1], RULE, GREEDY)
        intruder.close()
        peer = Peer(ticket.address)
        payload = msgspec.msgpack.encode([(0, "close_session", "0-0-senior", [], None, None)])
        for frames in ([payload], [b"x" * 56, payload], signed(b"\1" * 32, b"n" * 16, 0, payload)):
            kind, reason = await peer.ask(*frames)
            assert kind == b"refused" and reason
        peer.close()
        assert engine.calls == [] and server.refused == 4
        await good_client_is_served(engine, ticket)

    serve(test)


def test_a_recorded_message_cannot_be_replayed():
    async def test(engine, server, ticket):
        peer = Peer(ticket.address)
        message = signed(ticket.key, b"n" * 16, 5,
                         msgspec.msgpack.encode([(0, "turn", "s", [4], RULE, GREEDY)]))
        assert replies(await peer.ask(*message))[0][0] == 0
        kind, reason = await peer.ask(*message)
        assert kind == b"refused" and b"replayed" in reason
        peer.close()
        assert engine.calls == [("turn", "s", [4])]

    serve(test)


def test_a_malformed_message_gets_an_error_and_the_channel_keeps_serving():
    async def test(engine, server, ticket):
        peer = Peer(ticket.address)
        nonce, sequence = b"m" * 16, iter(range(100))

        async def ask(calls_or_bytes, answers=1):
            payload = (calls_or_bytes if isinstance(calls_or_bytes, bytes)
                       else msgspec.msgpack.encode(calls_or_bytes))
            got = replies(await peer.ask(*signed(ticket.key, nonce, next(sequence), payload)))
            while len(got) < answers:  # replies ready in later loop iterations come later
                got += replies(await peer.socket.recv_multipart())
            return got

        [(call_id, segment, error)] = await ask(b"\xc1 not msgpack")
        assert call_id == -1 and segment is None and "malformed channel message" in error
        [(call_id, _, error)] = await ask({"not": "a list"})
        assert call_id == -1 and "malformed" in error
        # each bad call is answered under its own id; the good one beside them still runs
        answers = await ask([
            (1, "exec", "s", [], None, None),  # unknown method
            (2, "turn", "s", [-5], RULE, GREEDY),  # not a token id
            (3, "turn", "s" * 300, [1], RULE, GREEDY),  # session id too long
            (4, "turn", "s", [1], {"max_tokens": 0}, GREEDY),  # an invalid stop rule
            (5, "turn", "s", [1], None, None),  # a turn needs its stop rule and sampling
            ["garbage"],
            (6, "generate", "", [1, 2], RULE, GREEDY),
        ], answers=7)
        errors = {call_id: error for call_id, _, error in answers}
        assert errors.pop(6) is None
        assert set(errors) == {1, 2, 3, 4, 5, -1} and all(errors.values())
        assert "exec" in errors[1] and "max_tokens" in errors[4] and "stop rule" in errors[5]
        peer.close()
        assert engine.calls == [("generate", [1, 2])]
        await good_client_is_served(engine, ticket)

    serve(test)


def test_a_driver_splits_calls_into_messages_the_server_accepts(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 300)  # the server is made after this

    async def test(engine, server, ticket):
        channel = TurnChannel(ticket)
        try:
            segments = await asyncio.gather(*(channel.turn(f"s{i}", list(range(40)), RULE,
                                                           GREEDY) for i in range(6)))
            assert [s.token_ids for s in segments] == [[40]] * 6
            with pytest.raises(RuntimeError, match="over the channel's 300"):
                await channel.turn("big", list(range(400)), RULE, GREEDY)
            assert len(engine.calls) == 6
        finally:
            channel.close()

    serve(test)


def test_a_driver_on_this_machine_gets_loopback_others_the_node_address():
    async def test(engine, server, ticket):
        assert ticket.address.startswith("tcp://127.0.0.1:") and len(ticket.key) == 32
        assert server.ticket(loopback_scope()) == ticket  # bound once
        assert loopback_scope() is not None  # Linux: boot id and network namespace
        other = ChannelServer(engine, "127.0.0.2")  # stands for the node's IP
        try:
            remote = other.ticket("another-machine")
            assert remote.address.startswith("tcp://127.0.0.2:")
            assert other.ticket(None).address == remote.address
            assert other.ticket(loopback_scope()).address.startswith("tcp://127.0.0.1:")
            await good_client_is_served(engine, remote)
        finally:
            other.close()

    serve(test)
