"""TCP-specific promises: authentication, bad input, crossing, back-pressure, errors.

The transport-independent semantics are in ``test_transport_conformance.py``. Every
bad-input test runs against a live endpoint that keeps serving a good connection
throughout, and checks it still does afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

import hpcproc as hp
from hpcproc.auth import CookieError, Handshake
from hpcproc.transports import (
    ConnectError,
    ConnectErrorCode,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    EndPointAddress,
    ErrorEvent,
    Event,
    Received,
    create,
)
from hpcproc.transports._multiplex import Kind
from hpcproc.transports._wire import PREFIX, encode_header
from hpcproc.transports.tcp import (
    _HELLO,
    _MAGIC,
    _WHO,
    MAX_FRAMES,
    TcpTransport,
    _context,
    _same_host_pid,
    _Status,
    _who,
)

COOKIE = "test-cookie-for-tcp"
WAIT = 10.0
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCPROC_COOKIE", COOKIE)


def run(main: Callable[[], Awaitable[T]], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


async def next_event(endpoint: EndPoint) -> Event:
    return await asyncio.wait_for(endpoint.receive(), WAIT)


@dataclass
class Served:
    """A live server endpoint with one good client connection into it."""

    server: TcpTransport
    endpoint: EndPoint
    good: EndPoint
    conn: Connection
    #: Events the server endpoint saw that were not the good client's messages.
    others: list[Event]
    good_conn_id: int

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    async def check_good(self, payload: bytes = b"still-good") -> None:
        """The good connection still delivers, in order, to the live endpoint."""
        await asyncio.wait_for(self.conn.send([payload]), WAIT)
        while True:
            event = await next_event(self.endpoint)
            if isinstance(event, Received) and event.conn_id == self.good_conn_id:
                assert [bytes(f) for f in event.frames] == [payload]
                return
            assert not (
                isinstance(event, ErrorEvent) and event.error.remote_address == self.good.address
            ), event
            self.others.append(event)


@asynccontextmanager
async def served(**options: Any) -> AsyncIterator[Served]:
    server = TcpTransport(**options)
    client = TcpTransport()
    try:
        endpoint = await server.new_endpoint()
        good = await client.new_endpoint()
        conn = await good.connect(endpoint.address)
        opened = await next_event(endpoint)
        assert isinstance(opened, ConnectionOpened)
        state = Served(server, endpoint, good, conn, [], opened.conn_id)
        await state.check_good()
        yield state
        await state.check_good(b"good-at-the-end")
    finally:
        await client.close()
        await server.close()


class RawPeer:
    """A hand-driven TCP peer speaking (or breaking) the protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def authenticate(
        self, src: bytes, dst: bytes, cookie: bytes = COOKIE.encode()
    ) -> _Status:
        shake = Handshake(cookie, initiator=True, context=_context(src, dst))
        self.writer.write(_HELLO.pack(_MAGIC, shake.nonce, 0, len(src), len(dst)) + src + dst)
        nonce = await asyncio.wait_for(self.reader.readexactly(32), WAIT)
        self.writer.write(shake.proof(nonce) + bytes(_WHO.size))  # who: no process here
        reply = await asyncio.wait_for(self.reader.readexactly(33 + _WHO.size), WAIT)
        assert shake.verify(nonce, reply[:32])
        return _Status(reply[32])

    async def send_and_finish(self, data: bytes) -> None:
        """Send ``data``, close our sending side, and wait until the peer drops us."""
        self.writer.write(data)
        try:
            await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass  # dropped while we were still writing: also fine
        await self.dropped()

    async def dropped(self) -> None:
        """Wait for end-of-stream from the peer (it closed the socket)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), WAIT):
                pass
        except ConnectionError:
            pass
        finally:
            self.writer.close()


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- auth


def test_wrong_cookie_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served() as s:
            intruder = TcpTransport(cookie=b"not-the-cookie")
            try:
                bad = await intruder.new_endpoint()
                with pytest.raises(ConnectError) as info:
                    await bad.connect(s.endpoint.address)
                assert info.value.code is ConnectErrorCode.FAILED
            finally:
                await intruder.close()
            await s.check_good()
            assert not any(
                isinstance(e, ConnectionOpened) and e.remote_address == bad.address
                for e in s.others
            )

    run(main)
    assert any("authentication failed" in m for m in warnings_in(caplog))


def test_acceptor_with_wrong_cookie_is_refused_by_connecting_side() -> None:
    async def main() -> None:
        other = TcpTransport(cookie=b"different")
        mine = TcpTransport()
        try:
            target = await other.new_endpoint()
            me = await mine.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await me.connect(target.address)
            assert info.value.code is ConnectErrorCode.FAILED
        finally:
            await mine.close()
            await other.close()

    run(main)


def test_cookie_mismatch_fails_fast_on_both_sides_naming_the_peer_and_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a lost connection, not the timeout: both sides say authentication failed,
    name the other side and how to fix it. The timeouts are 600 s and the test's own
    bound 60 s, so a connect that waited for a timeout fails the test."""
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        theirs = TcpTransport(cookie=b"theirs", connect_timeout=600, handshake_timeout=600)
        mine = TcpTransport(cookie=b"mine", connect_timeout=600, handshake_timeout=600)
        try:
            target = await theirs.new_endpoint()
            me = await mine.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await asyncio.wait_for(me.connect(target.address), 60)
            assert info.value.code is ConnectErrorCode.FAILED
            text = str(info.value)
            assert "authentication failed" in text, text
            assert repr(target.address) in text, text
            assert f"127.0.0.1:{theirs.port}" in text, text
            assert "HPCPROC_COOKIE" in text and "~/.hpcproc/cookie" in text, text
        finally:
            await mine.close()
            await theirs.close()
        refusals = [m for m in warnings_in(caplog) if repr(me.address) in m]
        assert any("authentication failed" in m and "HPCPROC_COOKIE" in m for m in refusals), (
            warnings_in(caplog)
        )

    run(main, timeout=90)


async def _answer() -> int:
    return 1


def test_call_to_a_node_with_another_cookie_fails_saying_authentication_failed() -> None:
    """The process layer passes the reason on: not NodeUnreachableError('lost
    connection'), but the transport's authentication failure with the fix."""

    async def main() -> None:
        ours = hp.Node(TcpTransport(cookie=b"ours", connect_timeout=600))
        theirs = hp.Node(TcpTransport(cookie=b"theirs", connect_timeout=600))
        async with ours, theirs:

            async def caller() -> str:
                with pytest.raises(hp.NodeUnreachableError) as info:
                    await hp.call(theirs.node_id, _answer)
                return str(info.value)

            text = await asyncio.wait_for(ours.run(caller), 60)
        assert "authentication failed" in text and "HPCPROC_COOKIE" in text, text
        assert str(theirs.node_id.address) in text or repr(theirs.node_id.address) in text, text

    run(main, timeout=90)


def test_cookie_file_readable_by_others_is_refused_with_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cookie"
    path.write_text("secret\n")
    path.chmod(0o644)
    monkeypatch.delenv("HPCPROC_COOKIE", raising=False)
    monkeypatch.setenv("HPCPROC_COOKIE_FILE", str(path))
    with pytest.raises(CookieError, match="chmod 600"):
        create("tcp")


def test_missing_cookie_file_is_created_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "home" / ".hpcproc" / "cookie"
    monkeypatch.delenv("HPCPROC_COOKIE", raising=False)
    monkeypatch.setenv("HPCPROC_COOKIE_FILE", str(path))

    async def main() -> None:
        first, second = create("tcp"), create("tcp")  # the second reads the first's file
        try:
            a, b = await first.new_endpoint(), await second.new_endpoint()
            conn = await a.connect(b.address)
            await conn.send([b"shared cookie"])
            assert isinstance(await next_event(b), ConnectionOpened)
            event = await next_event(b)
            assert isinstance(event, Received) and bytes(event.frames[0]) == b"shared cookie"
        finally:
            await first.close()
            await second.close()

    run(main)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().strip()


def test_a_peers_pid_counts_only_where_it_names_another_process_of_this_host() -> None:
    """The handshake's link parameters name the peer process; its pid is used (to read
    its CPUs) only when both share the host and the pid namespace, and never our own."""
    mine = _who()
    space, pid = _WHO.unpack(mine)
    assert pid == os.getpid()
    assert _same_host_pid(_WHO.pack(space, 4242)) == 4242
    assert _same_host_pid(mine) == 0  # this very process
    assert _same_host_pid(_WHO.pack(bytes(8), 4242)) == 0  # another host or pid namespace
    assert _same_host_pid(bytes(_WHO.size)) == 0  # a peer that names no process


# --------------------------------------------------------------------------- bad input


def _data_message(conn_id: int, frames: list[bytes]) -> bytes:
    return encode_header(Kind.DATA, conn_id, [len(f) for f in frames]) + b"".join(frames)


def _control(kind: int, conn_id: int, nframes: int = 0) -> bytes:
    return PREFIX.pack(kind, nframes, conn_id)


def _pre_auth_garbage(rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:  # anything at all
        return rng.randbytes(rng.randint(1, 400))
    if choice == 1:  # the right magic, then noise
        return _MAGIC + rng.randbytes(rng.randint(0, 400))
    if choice == 2:  # a plausible hello with absurd address lengths
        return _HELLO.pack(
            _MAGIC, rng.randbytes(32), 0, rng.randint(1025, 65535), rng.randint(0, 65535)
        )
    # a well-formed hello, then a random "proof"
    src, dst = b"tcp://127.0.0.1:1/fuzz/1", b"tcp://127.0.0.1:2/fuzz/2"
    return (
        _HELLO.pack(_MAGIC, rng.randbytes(32), 0, len(src), len(dst))
        + src
        + dst
        + rng.randbytes(rng.randint(0, 64))
    )


def _post_auth_garbage(rng: random.Random, max_message: int) -> bytes:
    choice = rng.randrange(8)
    opened = _control(Kind.OPEN, 7)
    if choice == 0:  # unknown kind
        kind = rng.choice([0, *range(4, 256)])
        return PREFIX.pack(kind, rng.randrange(4), rng.getrandbits(64)) + rng.randbytes(
            rng.randint(0, 100)
        )
    if choice == 1:  # more frames than allowed
        return _control(Kind.DATA, 7, rng.randint(MAX_FRAMES + 1, 2**32 - 1))
    if choice == 2:  # oversize length table
        n = rng.randint(1, 4)
        lengths = [rng.randint(max_message + 1, 2**64 - 1) for _ in range(n)]
        return opened + encode_header(Kind.DATA, 7, lengths)
    if choice == 3:  # truncated frame, then end of stream
        body = rng.randbytes(rng.randint(2, 5000))
        message = _data_message(7, [body])
        return opened + message[: rng.randint(PREFIX.size, len(message) - 1)]
    if choice == 4:  # data on a connection never opened
        return _data_message(rng.randint(8, 1000), [rng.randbytes(rng.randint(0, 50))])
    if choice == 5:  # close of a connection never opened
        return _control(Kind.CLOSE, rng.randint(8, 1000))
    if choice == 6:  # a control message carrying frames
        return _control(rng.choice([Kind.OPEN, Kind.CLOSE]), 7, rng.randint(1, 10))
    # valid traffic, then noise
    return (
        opened
        + _data_message(7, [b"ok"])
        + bytes([rng.choice([0, *range(4, 256)])])
        + rng.randbytes(rng.randint(15, 200))
    )


def test_fuzzed_inputs_are_each_refused_without_harming_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """120 seeded random inputs: 60 before authentication, 60 after it."""
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")
    rng = random.Random(20240611)
    max_message = 1 << 20

    async def main() -> None:
        async with served(max_message=max_message) as s:
            dst = bytes(s.endpoint.address)
            for i in range(120):
                before = len(warnings_in(caplog))
                peer = await RawPeer.open(s.port)
                if i < 60:
                    await peer.send_and_finish(_pre_auth_garbage(rng))
                else:
                    src = b"tcp://127.0.0.1:9/fuzz/%d" % i
                    assert await peer.authenticate(src, dst) is _Status.ACCEPT
                    await peer.send_and_finish(_post_auth_garbage(rng, max_message))
                await s.check_good(b"after input %d" % i)
                new = warnings_in(caplog)[before:]
                assert new, f"input {i} was not refused with a logged reason"
            # Nothing an unauthenticated peer sent reached the endpoint.
            for event in s.others:
                if isinstance(event, ConnectionOpened):
                    assert b"/fuzz/" in event.remote_address
                    assert int(event.remote_address.rsplit(b"/", 1)[1]) >= 60

    run(main)


def test_oversize_length_prefix_is_refused_before_allocating(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served(max_message=1 << 20) as s:
            peer = await RawPeer.open(s.port)
            status = await peer.authenticate(b"tcp://127.0.0.1:9/big/1", bytes(s.endpoint.address))
            assert status is _Status.ACCEPT
            # 2**62 bytes: allocating it would fail loudly with MemoryError.
            await peer.send_and_finish(
                _control(Kind.OPEN, 1) + encode_header(Kind.DATA, 1, [1 << 62])
            )
            await s.check_good()

    run(main)
    assert any("exceeds the limit" in m for m in warnings_in(caplog))


def test_truncated_frame_is_refused_and_never_delivered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served() as s:
            peer = await RawPeer.open(s.port)
            src = b"tcp://127.0.0.1:9/trunc/1"
            assert await peer.authenticate(src, bytes(s.endpoint.address)) is _Status.ACCEPT
            message = _data_message(1, [b"x" * 1000])
            await peer.send_and_finish(_control(Kind.OPEN, 1) + message[:-10])
            await s.check_good()
            opened = [e for e in s.others if isinstance(e, ConnectionOpened)]
            assert [e.remote_address for e in opened] == [src]
            assert not any(
                isinstance(e, Received) and e.conn_id == opened[0].conn_id for e in s.others
            )

    run(main)
    assert any("truncated" in m for m in warnings_in(caplog))


def test_unknown_control_code_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served() as s:
            peer = await RawPeer.open(s.port)
            assert (
                await peer.authenticate(b"tcp://127.0.0.1:9/k/1", bytes(s.endpoint.address))
                is _Status.ACCEPT
            )
            await peer.send_and_finish(_control(9, 1))
            await s.check_good()

    run(main)
    assert any("unknown message kind 9" in m for m in warnings_in(caplog))


def test_data_on_unopened_connection_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served() as s:
            peer = await RawPeer.open(s.port)
            assert (
                await peer.authenticate(b"tcp://127.0.0.1:9/u/1", bytes(s.endpoint.address))
                is _Status.ACCEPT
            )
            await peer.send_and_finish(_data_message(42, [b"sneaky"]))
            await s.check_good()
            assert not any(isinstance(e, Received) for e in s.others)

    run(main)
    assert any("unknown connection 42" in m for m in warnings_in(caplog))


def test_silent_peer_is_dropped_after_handshake_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def main() -> None:
        async with served(handshake_timeout=0.2) as s:
            peer = await RawPeer.open(s.port)
            await peer.dropped()  # we send nothing; the server must hang up on us
            await s.check_good()

    run(main)
    assert any("no handshake within" in m for m in warnings_in(caplog))


# --------------------------------------------------------------------------- connect errors


def test_a_connection_arriving_as_the_accept_loop_is_cancelled_raises_nothing() -> None:
    """The accept loop is cancelled (the transport closes, say a job ending on a
    signal) in the very loop pass whose poll found the listener readable. Over
    ``loop.sock_accept`` (CPython 3.11), its reader callback then accepted anyway and
    set the cancelled future's result: ``InvalidStateError``, logged by the loop with
    a traceback, and the accepted socket leaked."""

    async def main() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        transport = TcpTransport()
        try:
            await transport.new_endpoint()
            await asyncio.sleep(0)  # the accept loop waits for a connection now
            accepting = transport._accept_task
            assert accepting is not None and transport.port is not None
            with socket.create_connection(("127.0.0.1", transport.port)):
                # Runs first in the next pass, whose poll finds the connection.
                loop.call_soon(accepting.cancel)
                for _ in range(3):
                    await asyncio.sleep(0)
            assert accepting.cancelled() or accepting.done()
        finally:
            await transport.close()
        return errors

    assert run(main) == []


def test_connect_without_listener_raises_not_found() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        transport = TcpTransport()
        try:
            endpoint = await transport.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await endpoint.connect(EndPointAddress(b"tcp://127.0.0.1:%d/abcd/1" % port))
            assert info.value.code is ConnectErrorCode.NOT_FOUND
        finally:
            await transport.close()

    run(main)


def test_connect_to_unknown_endpoint_id_raises_not_found() -> None:
    async def main() -> None:
        transport = TcpTransport()
        try:
            endpoint = await transport.new_endpoint()
            unknown = bytes(endpoint.address).rsplit(b"/", 1)[0] + b"/999"
            with pytest.raises(ConnectError) as info:
                await endpoint.connect(EndPointAddress(unknown))
            assert info.value.code is ConnectErrorCode.NOT_FOUND
            stale = bytes(endpoint.address).replace(transport._instance, b"00000000")
            with pytest.raises(ConnectError) as info:
                await endpoint.connect(EndPointAddress(stale))
            assert info.value.code is ConnectErrorCode.NOT_FOUND
        finally:
            await transport.close()

    run(main)


@pytest.mark.parametrize(
    "address",
    [b"udp://127.0.0.1:1/a/1", b"tcp://127.0.0.1/a/1", b"tcp://127.0.0.1:99999/a/1", b"tcp://"],
)
def test_malformed_address_raises_failed(address: bytes) -> None:
    async def main() -> None:
        transport = TcpTransport()
        try:
            endpoint = await transport.new_endpoint()
            with pytest.raises(ConnectError) as info:
                await endpoint.connect(EndPointAddress(address))
            assert info.value.code is ConnectErrorCode.FAILED
        finally:
            await transport.close()

    run(main)


def test_connect_to_silent_listener_raises_timeout() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts, never answers
            port = silent.getsockname()[1]
            transport = TcpTransport(connect_timeout=0.3)
            try:
                endpoint = await transport.new_endpoint()
                address = EndPointAddress(b"tcp://127.0.0.1:%d/abcd/1" % port)
                for timeout in (0.3, None):  # the caller's timeout, then the option
                    with pytest.raises(ConnectError) as info:
                        await endpoint.connect(address, timeout=timeout)
                    assert info.value.code is ConnectErrorCode.TIMEOUT
            finally:
                await transport.close()

    run(main)


# --------------------------------------------------------------------------- links


def _socket_pair_of(a: EndPoint, b: EndPoint) -> tuple[socket.socket, socket.socket]:
    link_a = a._links[b.address]  # type: ignore[attr-defined]
    link_b = b._links[a.address]  # type: ignore[attr-defined]
    return link_a._sock, link_b._sock


def test_crossed_connects_share_one_socket_and_lose_nothing() -> None:
    """A and B dial each other at once, 25 times: one socket each time, no failure."""

    async def main() -> None:
        one, two = TcpTransport(), TcpTransport()
        try:
            for round_ in range(25):
                a, b = await one.new_endpoint(), await two.new_endpoint()
                ab, ba = await asyncio.gather(a.connect(b.address), b.connect(a.address))
                sock_a, sock_b = _socket_pair_of(a, b)
                assert sock_a.getsockname() == sock_b.getpeername()
                assert sock_a.getpeername() == sock_b.getsockname()
                await ab.send([b"a->b %d" % round_])
                await ba.send([b"b->a %d" % round_])
                for endpoint, text in ((b, b"a->b %d" % round_), (a, b"b->a %d" % round_)):
                    opened = await next_event(endpoint)
                    assert isinstance(opened, ConnectionOpened), opened
                    got = await next_event(endpoint)
                    assert isinstance(got, Received) and bytes(got.frames[0]) == text, got
                await ab.close()
                await ba.close()
                assert isinstance(await next_event(b), ConnectionClosed)
                assert isinstance(await next_event(a), ConnectionClosed)
                await a.close()
                await b.close()
        finally:
            await one.close()
            await two.close()

    run(main)


def test_one_socket_carries_every_connection_between_two_endpoints() -> None:
    async def main() -> None:
        one, two = TcpTransport(), TcpTransport()
        try:
            a, b = await one.new_endpoint(), await two.new_endpoint()
            conns = [await a.connect(b.address) for _ in range(50)]
            back = [await b.connect(a.address) for _ in range(50)]
            assert len(a._links) == len(b._links) == 1  # type: ignore[attr-defined]
            for i, conn in enumerate(conns + back):
                await conn.send([b"%d" % i])
            seen = 0
            while seen < 100:
                event = await next_event(b if seen < 50 else a)
                if isinstance(event, Received):
                    seen += 1
        finally:
            await one.close()
            await two.close()

    run(main)


def test_send_waits_while_the_peer_does_not_read_then_delivers_whole() -> None:
    """Back-pressure: 96 MiB cannot fit in socket buffers, so send waits for the reader."""
    size = 96 << 20

    async def main() -> None:
        one, two = TcpTransport(max_message=1 << 30), TcpTransport(max_message=1 << 30)
        try:
            a, b = await one.new_endpoint(), await two.new_endpoint()
            conn = await a.connect(b.address)
            assert isinstance(await next_event(b), ConnectionOpened)
            link_b = b._links[a.address]  # type: ignore[attr-defined]
            loop = asyncio.get_running_loop()
            loop.remove_reader(link_b._fd)  # the receiver stops reading
            payload = bytearray(os.urandom(1 << 20)) * 96
            sending = asyncio.ensure_future(conn.send([b"small", payload]))
            for _ in range(200):  # give the sender every chance to finish
                await asyncio.sleep(0)
            assert not sending.done()
            loop.add_reader(link_b._fd, link_b._on_readable)  # reading resumes
            await asyncio.wait_for(sending, WAIT * 3)
            event = await asyncio.wait_for(b.receive(), WAIT * 3)
            assert isinstance(event, Received)
            assert bytes(event.frames[0]) == b"small"
            assert len(event.frames[1]) == size and event.frames[1] == payload
        finally:
            await one.close()
            await two.close()

    run(main)


def test_large_and_small_messages_interleave_in_order_on_many_connections() -> None:
    async def main() -> None:
        one, two = TcpTransport(), TcpTransport()
        try:
            a, b = await one.new_endpoint(), await two.new_endpoint()
            conns = [await a.connect(b.address) for _ in range(3)]
            rng = random.Random(7)
            sent: dict[int, list[list[bytes]]] = {i: [] for i in range(3)}

            async def sender(i: int) -> None:
                for k in range(30):
                    size = rng.choice([0, 1, 100, 70_000, 3_000_000])
                    frames = [struct.pack("<II", i, k), rng.randbytes(size), b""]
                    sent[i].append(frames)
                    await conns[i].send(frames)

            await asyncio.gather(*(sender(i) for i in range(3)))
            got: dict[int, list[list[bytes]]] = {}
            ids: dict[int, int] = {}
            while sum(len(v) for v in got.values()) < 90:
                event = await next_event(b)
                if isinstance(event, ConnectionOpened):
                    ids[event.conn_id] = len(ids)
                elif isinstance(event, Received):
                    got.setdefault(ids[event.conn_id], []).append([bytes(f) for f in event.frames])
            assert got == sent
        finally:
            await one.close()
            await two.close()

    run(main)


def test_received_large_frames_stay_intact_while_held() -> None:
    """Pooled receive buffers are reused only after the receiver drops the frame."""

    async def main() -> None:
        one, two = TcpTransport(), TcpTransport()
        try:
            a, b = await one.new_endpoint(), await two.new_endpoint()
            conn = await a.connect(b.address)
            assert isinstance(await next_event(b), ConnectionOpened)
            held = []
            for k in range(6):
                await conn.send([bytes([k]) * (3 << 20)])
                event = await next_event(b)
                assert isinstance(event, Received)
                if k % 2 == 0:
                    held.append((k, event.frames[0]))
                del event  # odd messages' buffers go back to the pool
            for k, frame in held:
                assert frame == bytes([k]) * (3 << 20)
        finally:
            await one.close()
            await two.close()

    run(main)


@pytest.mark.parametrize("dialer", ["larger", "smaller"])
def test_redial_over_a_link_the_peer_still_holds_starts_a_new_bundle(dialer: str) -> None:
    """A dropped its link to B without B noticing yet; A's next connect must succeed.

    When A's address is the larger one, B first answers as to a crossed connect; A,
    holding no link from B, then asks B to replace the stale link.
    """

    async def main() -> None:
        one, two = TcpTransport(), TcpTransport()
        try:
            x, y = await one.new_endpoint(), await two.new_endpoint()
            larger, smaller = (x, y) if x.address > y.address else (y, x)
            a, b = (larger, smaller) if dialer == "larger" else (smaller, larger)
            await a.connect(b.address)
            assert isinstance(await next_event(b), ConnectionOpened)
            stale = a._links.pop(b.address)  # type: ignore[attr-defined]
            stale.alive = False  # A forgets the link; B is not told
            try:
                conn = await asyncio.wait_for(a.connect(b.address), WAIT)
                await conn.send([b"new bundle"])
                lost = await next_event(b)
                assert isinstance(lost, ErrorEvent) and lost.error.remote_address == a.address
                assert isinstance(await next_event(b), ConnectionOpened)
                got = await next_event(b)
                assert isinstance(got, Received) and bytes(got.frames[0]) == b"new bundle"
            finally:
                stale.abort()
        finally:
            await one.close()
            await two.close()

    run(main)
