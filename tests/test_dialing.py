"""Promises of the shared dialing logic (:mod:`hpcproc.transports._dialing`).

The TCP and UCX suites run it over real sockets and UCX endpoints; these tests pin
down its own rules where a real network cannot steer the order of events: the
address grammar, the handshake flow over an in-process byte pipe, and the
crossed-connect decision and retry loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from hpcproc.transports._dialing import (
    FLAG_REPLACE,
    HELLO,
    DialingEndPoint,
    DialingTransport,
    HandshakeError,
    HandshakeFormat,
    HostAddress,
    SetupChannel,
    Status,
    accept_handshake,
    dial_handshake,
    format_host_address,
    parse_host_address,
)
from hpcproc.transports._multiplex import Kind, Link, MultiplexedEndPoint
from hpcproc.transports.base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    EndPoint,
    EndPointAddress,
)

T = TypeVar("T")
WAIT = 10.0
LOG = logging.getLogger("hpcproc.transports.test_dialing")
FORMAT = HandshakeFormat("pipe", b"HPCPPIP\x01", 8, LOG)
A = EndPointAddress(b"pipe://h:1/i/1")
B = EndPointAddress(b"pipe://h:1/i/2")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), WAIT)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("host", "port", "instance", "ident"),
    [("node01", 4000, b"ab12", 1), ("10.0.0.7", 65535, b"x", 42), ("fe80::1", 1, b"i", 7)],
)
def test_formatted_address_parses_back_to_its_parts(
    host: str, port: int, instance: bytes, ident: int
) -> None:
    address = format_host_address(b"tcp://", host, port, instance, ident)
    assert parse_host_address(address, b"tcp://") == HostAddress(host, port, instance, ident)


@pytest.mark.parametrize(
    "address",
    [
        b"ucx://h:1/i/1",
        b"tcp://h/i/1",
        b"tcp://:1/i/1",
        b"tcp://h:1//1",
        b"tcp://h:1/i/x",
        b"tcp://h:0/i/1",
        b"tcp://h:65536/i/1",
        b"tcp://h:-1/i/1",
    ],
)
def test_malformed_or_foreign_address_raises_value_error(address: bytes) -> None:
    with pytest.raises(ValueError):
        parse_host_address(address, b"tcp://")


# --------------------------------------------------------------------------- handshake


class PipeChannel(SetupChannel[Any]):
    """One end of an in-process byte pipe (the handshake part of a channel only)."""

    def __init__(self, inbox: asyncio.StreamReader, extra: bytes) -> None:
        self._inbox = inbox
        self.peer_inbox: asyncio.StreamReader | None = None
        self.extra = extra
        #: Everything this end sent.
        self.sent = bytearray()
        self.dial_errors: list[tuple[Exception, bool]] = []

    @staticmethod
    def pair(extra_a: bytes = b"A" * 8, extra_b: bytes = b"B" * 8) -> tuple[PipeChannel, ...]:
        a = PipeChannel(asyncio.StreamReader(), extra_a)
        b = PipeChannel(asyncio.StreamReader(), extra_b)
        a.peer_inbox, b.peer_inbox = b._inbox, a._inbox
        return a, b

    async def send(self, data: bytes) -> None:
        assert self.peer_inbox is not None
        self.sent += data
        self.peer_inbox.feed_data(data)

    async def recv(self, n: int) -> bytes:
        try:
            return await self._inbox.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise HandshakeError(f"closed after {len(exc.partial)} of {n} bytes") from None

    def drop(self) -> None:
        assert self.peer_inbox is not None
        self.peer_inbox.feed_eof()

    def link(self, endpoint: Any, remote: EndPointAddress, peer_extra: bytes) -> Link:
        raise NotImplementedError

    async def start(self, link: Link, first: bytes = b"") -> None:
        raise NotImplementedError

    async def refuse(self, reply: bytes) -> None:
        await self.send(reply)
        self.drop()

    def dial_error(self, exc: Exception, *, answered: bool) -> ConnectError | None:
        self.dial_errors.append((exc, answered))
        return ConnectError(ConnectErrorCode.FAILED, f"answered={answered}: {exc}")


async def _acceptor(channel: PipeChannel, cookie: bytes, status: Status) -> bytes:
    hello = await accept_handshake(channel, FORMAT, cookie)
    await channel.send(hello.reply(status, channel.extra))
    return hello.extra


def test_handshake_authenticates_both_sides_and_exchanges_link_parameters() -> None:
    async def main() -> None:
        dialer, acceptor = PipeChannel.pair()
        accepted = asyncio.ensure_future(_acceptor(acceptor, b"cookie", Status.CROSSED_PENDING))
        status, extra = await dial_handshake(dialer, FORMAT, b"cookie", A, B, FLAG_REPLACE)
        assert status is Status.CROSSED_PENDING
        assert extra == b"B" * 8
        assert await accepted == b"A" * 8

    run(main)


def test_wrong_cookie_fails_on_both_sides_by_name_after_the_peer_answered() -> None:
    async def main() -> None:
        dialer, acceptor = PipeChannel.pair()
        accepted = asyncio.ensure_future(accept_handshake(acceptor, FORMAT, b"right"))
        dialing = asyncio.ensure_future(dial_handshake(dialer, FORMAT, b"wrong", A, B, 0))
        with pytest.raises(HandshakeError, match="authentication failed") as refused:
            await accepted
        assert repr(A) in str(refused.value) and "HPCPROC_COOKIE" in str(refused.value)
        acceptor.drop()  # what the acceptor's transport does with a failed handshake
        with pytest.raises(ConnectError) as info:
            await dialing
        assert info.value.code is ConnectErrorCode.FAILED
        # Told so by the acceptor, not left to guess from a closed pipe.
        assert "authentication failed" in str(info.value), info.value
        assert repr(B) in str(info.value) and "HPCPROC_COOKIE" in str(info.value)
        assert "~/.hpcproc/cookie" in str(info.value)
        assert dialer.dial_errors == []

    run(main)


def test_acceptor_with_wrong_proof_is_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def impostor(channel: PipeChannel) -> None:
        await channel.recv(HELLO.size + len(A) + len(B))
        await channel.send(b"n" * 32)
        await channel.recv(32 + 8)
        await channel.send(b"p" * 32 + bytes([Status.ACCEPT]) + b"t" * 8)

    async def main() -> None:
        dialer, acceptor = PipeChannel.pair()
        task = asyncio.ensure_future(impostor(acceptor))
        with pytest.raises(ConnectError, match="failed authentication") as info:
            await dial_handshake(dialer, FORMAT, b"cookie", A, B, 0)
        assert info.value.code is ConnectErrorCode.FAILED
        await task

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        run(main)
    assert any("failed authentication" in r.getMessage() for r in caplog.records)


def test_unknown_status_from_an_authenticated_acceptor_fails_the_dial() -> None:
    async def odd_acceptor(channel: PipeChannel) -> None:
        hello = await accept_handshake(channel, FORMAT, b"cookie")
        await channel.send(hello.proof + b"\x09" + channel.extra)

    async def main() -> None:
        dialer, acceptor = PipeChannel.pair()
        accepted = asyncio.ensure_future(odd_acceptor(acceptor))
        with pytest.raises(ConnectError, match="unknown status 9") as info:
            await dial_handshake(dialer, FORMAT, b"cookie", A, B, 0)
        assert info.value.code is ConnectErrorCode.FAILED
        await accepted

    run(main)


def test_silent_close_before_the_nonce_is_a_dial_error_not_yet_answered() -> None:
    async def main() -> None:
        dialer, acceptor = PipeChannel.pair()
        acceptor.drop()
        with pytest.raises(ConnectError, match="answered=False"):
            await dial_handshake(dialer, FORMAT, b"cookie", A, B, 0)

    run(main)


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (HELLO.pack(b"NOTHPCP!", b"n" * 32, 0, 3, 3) + b"srcdst", "bad handshake magic"),
        (
            HELLO.pack(FORMAT.magic[:-1] + b"\x09", b"n" * 32, 0, 3, 3) + b"srcdst",
            "version 9 of the hpcproc pipe handshake and this endpoint version 1: run one",
        ),
        (HELLO.pack(FORMAT.magic, b"n" * 32, 0, 0, 3) + b"dst", "out of range"),
        (HELLO.pack(FORMAT.magic, b"n" * 32, 0, 3, 1025), "out of range"),
        (HELLO.pack(FORMAT.magic, b"n" * 32, 0, 3, 3) + b"sr", "closed after"),
    ],
)
def test_acceptor_refuses_a_bad_hello_before_revealing_anything(hello: bytes, reason: str) -> None:
    async def main() -> None:
        peer, acceptor = PipeChannel.pair()
        await peer.send(hello)
        peer.drop()
        with pytest.raises(HandshakeError, match=reason):
            await accept_handshake(acceptor, FORMAT, b"cookie")
        assert acceptor.sent == b""  # not even a nonce went out

    run(main)


# --------------------------------------------------------------------------- crossing


class StubLink(Link):
    """A link that carries nothing (the decision only registers or discards it)."""

    def __init__(self, remote: EndPointAddress, owner: MultiplexedEndPoint) -> None:
        super().__init__(remote, owner)
        self.aborted = False

    def send_control(self, kind: Kind, conn_id: int) -> None:
        pass

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        pass

    async def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


Script = Callable[[int], Awaitable[tuple[Status, Link | None]]]


class ScriptedEndPoint(DialingEndPoint["ScriptedTransport"]):
    """Each dial attempt's outcome comes from ``script(flags)``."""

    script: Script

    async def _open_channel(self, remote: EndPointAddress, target: HostAddress) -> Any:
        raise NotImplementedError

    async def _dial_once(
        self, remote: EndPointAddress, target: HostAddress, flags: int
    ) -> tuple[Status, Link | None]:
        return await self.script(flags)


class ScriptedTransport(DialingTransport[ScriptedEndPoint]):
    def __init__(self) -> None:
        super().__init__(FORMAT, cookie=b"c", connect_timeout=WAIT, handshake_timeout=WAIT)

    async def new_endpoint(self) -> EndPoint:
        return self._new_dialing_endpoint(
            "h", 1, lambda address, ident: ScriptedEndPoint(self, address, ident)
        )


async def _endpoint_pair() -> tuple[ScriptedTransport, ScriptedEndPoint, ScriptedEndPoint]:
    transport = ScriptedTransport()
    first = await transport.new_endpoint()
    second = await transport.new_endpoint()
    assert isinstance(first, ScriptedEndPoint) and isinstance(second, ScriptedEndPoint)
    assert first.address < second.address
    return transport, first, second


def test_simultaneous_dials_are_accepted_at_exactly_one_side() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()
        small._dialing[large.address] = 1
        large._dialing[small.address] = 1
        # The larger address's dial loses; the smaller one's is accepted.
        assert (
            small._accept(StubLink(large.address, small), large.address, 0)
            is Status.CROSSED_PENDING
        )
        assert large._accept(StubLink(small.address, large), small.address, 0) is Status.ACCEPT
        assert small.address not in small._links
        assert large._links[small.address].remote == small.address
        await transport.close()

    run(main)


def test_dial_into_a_live_link_is_crossed_live_unless_replace_or_smaller() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()
        old = StubLink(large.address, small)
        small._register_link(old)
        assert (
            small._accept(StubLink(large.address, small), large.address, 0) is Status.CROSSED_LIVE
        )
        assert small._links[large.address] is old
        new = StubLink(large.address, small)
        assert small._accept(new, large.address, FLAG_REPLACE) is Status.ACCEPT
        assert small._links[large.address] is new and old.aborted
        # From the smaller address, a dial always starts a new bundle.
        large._register_link(old := StubLink(small.address, large))
        assert (
            large._accept(new := StubLink(small.address, large), small.address, 0) is Status.ACCEPT
        )
        assert large._links[small.address] is new and old.aborted
        await transport.close()

    run(main)


def test_closed_endpoint_answers_not_found() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()
        await small.close()
        assert small._accept(StubLink(large.address, small), large.address, 0) is Status.NOT_FOUND
        assert transport._find(small.address) is None
        assert transport._find(large.address) is large
        await transport.close()

    run(main)


def test_crossed_pending_dialer_takes_the_peers_link_when_it_arrives() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()
        attempts: list[int] = []
        arrived = StubLink(small.address, large)

        async def script(flags: int) -> tuple[Status, Link | None]:
            attempts.append(flags)
            # The winner's link arrives while this dial waits for it.
            asyncio.get_running_loop().call_soon(lambda: large._accept(arrived, small.address, 0))
            return Status.CROSSED_PENDING, None

        large.script = script
        link = await large._open_link(small.address, WAIT)
        assert link is arrived
        assert attempts == [0]
        assert not large._dialing and not large._arrivals
        await transport.close()

    run(main)


def test_crossed_live_dialer_retries_once_with_replace() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()
        attempts: list[int] = []
        made = StubLink(large.address, small)

        async def script(flags: int) -> tuple[Status, Link | None]:
            attempts.append(flags)
            return (Status.ACCEPT, made) if flags & FLAG_REPLACE else (Status.CROSSED_LIVE, None)

        small.script = script
        assert await small._open_link(large.address, WAIT) is made
        assert attempts == [0, FLAG_REPLACE]
        await transport.close()

    run(main)


def test_not_found_and_timeout_become_connect_errors_with_their_codes() -> None:
    async def main() -> None:
        transport, small, large = await _endpoint_pair()

        async def missing(flags: int) -> tuple[Status, Link | None]:
            return Status.NOT_FOUND, None

        async def silent(flags: int) -> tuple[Status, Link | None]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        small.script = missing
        with pytest.raises(ConnectError) as info:
            await small._open_link(large.address, WAIT)
        assert info.value.code is ConnectErrorCode.NOT_FOUND
        small.script = silent
        with pytest.raises(ConnectError) as info:
            await small._open_link(large.address, 0.01)
        assert info.value.code is ConnectErrorCode.TIMEOUT
        with pytest.raises(ConnectError) as info:
            await small._open_link(EndPointAddress(b"tcp://h:1/i/1"), WAIT)
        assert info.value.code is ConnectErrorCode.FAILED
        assert not small._dialing
        await transport.close()

    run(main)
