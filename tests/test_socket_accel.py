"""The tcp transport's compiled socket read (``hpcproc/transports/_socket_accel.c``):
its contract on real sockets, and that plain tcp links use it unless it is turned off
(``HPCPROC_SOCKET_ACCEL=0``; ``make test`` runs the tcp tests again that way, so the
``recv_into`` fallback passes the same conformance suite)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import itertools
import logging
import os
import random
import select
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from hpcproc.transports import ConnectionOpened, Received, tcp
from hpcproc.transports._multiplex import Kind

from ._compiled import require_compiled

accel: ModuleType | None
try:
    from hpcproc.transports import _socket_accel as accel
except ImportError:  # built without a compiler
    accel = None


@pytest.fixture
def compiled() -> ModuleType:
    return require_compiled(accel, "hpcproc.transports._socket_accel", "the compiled socket read")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of stream sockets, the reading one non-blocking."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    with reader, writer:
        yield reader, writer


def test_plain_links_read_with_it_unless_turned_off(compiled: ModuleType) -> None:
    turned_off = os.environ.get(tcp.ACCEL_ENV, "1").strip() == "0"
    assert tcp.ACCELERATED is not turned_off
    link = tcp._TcpLink
    expected = link._recv_buffered if turned_off else link._recv_buffered_nowait
    assert link._read_buffered is expected
    # The TLS link reads through its SSL object, never from the descriptor.
    assert tcp._TlsLink._recv_buffered is link._recv_buffered


def test_nothing_to_read_is_minus_one_not_an_exception(
    compiled: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    reader, _ = pair
    buf = bytearray(16)
    assert compiled.recv_nowait(reader.fileno(), buf, 0) == -1
    assert buf == bytearray(16)


def test_reads_what_is_there_at_the_offset(
    compiled: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    reader, writer = pair
    writer.sendall(b"hello")
    buf = bytearray(b"." * 10)
    assert compiled.recv_nowait(reader.fileno(), buf, 3) == 5
    assert buf == bytearray(b"...hello..")
    # At most what fits after the offset; the rest stays in the socket.
    writer.sendall(b"abcdef")
    small = bytearray(4)
    assert compiled.recv_nowait(reader.fileno(), small, 1) == 3
    assert small == bytearray(b"\0abc")
    assert compiled.recv_nowait(reader.fileno(), small, 0) == 3
    assert small[:3] == bytearray(b"def")
    assert compiled.recv_nowait(reader.fileno(), small, 0) == -1


def test_a_numpy_array_is_a_buffer_too(
    compiled: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    np = pytest.importorskip("numpy")
    reader, writer = pair
    writer.sendall(bytes(range(8)))
    arr = np.zeros(8, dtype=np.uint8)
    assert compiled.recv_nowait(reader.fileno(), arr, 0) == 8
    assert arr.tolist() == list(range(8))


def test_end_of_stream_is_zero(
    compiled: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    reader, writer = pair
    writer.sendall(b"x")
    writer.shutdown(socket.SHUT_WR)
    buf = bytearray(8)
    assert compiled.recv_nowait(reader.fileno(), buf, 0) == 1
    assert compiled.recv_nowait(reader.fileno(), buf, 0) == 0


def test_a_reset_connection_raises_oserror(compiled: ModuleType) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            accepted.setblocking(False)
            # SO_LINGER 0: close() sends a reset instead of a FIN.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            client.send(b"lost")
            client.close()
            with pytest.raises(ConnectionResetError):
                for _ in range(3):  # (the bytes sent first may be read before the reset)
                    ready, _, _ = select.select([accepted], [], [], 10)
                    assert ready, "the reset did not arrive within 10 s"
                    compiled.recv_nowait(accepted.fileno(), bytearray(8), 0)


def test_bad_arguments_are_refused_with_what_is_wrong(
    compiled: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    reader, _ = pair
    fd = reader.fileno()
    with pytest.raises(ValueError, match="offset 9 leaves no room in the buffer of 8 bytes"):
        compiled.recv_nowait(fd, bytearray(8), 9)
    # No room at all: a read of nothing would look like the end of the stream.
    with pytest.raises(ValueError, match="offset 8 leaves no room"):
        compiled.recv_nowait(fd, bytearray(8), 8)
    with pytest.raises(ValueError, match="offset -1"):
        compiled.recv_nowait(fd, bytearray(8), -1)
    with pytest.raises(ValueError, match="-3 is not a file descriptor"):
        compiled.recv_nowait(-3, bytearray(8), 0)
    with pytest.raises(BufferError, match="not writable"):
        compiled.recv_nowait(fd, b"read-only", 0)
    with pytest.raises(TypeError):
        compiled.recv_nowait(fd, "text", 0)
    with pytest.raises(TypeError, match="3 arguments"):
        compiled.recv_nowait(fd, bytearray(8))
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            compiled.recv_nowait(r, bytearray(8), 0)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


def test_a_tcp_link_reads_its_messages_through_it(
    compiled: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages over a real tcp link arrive through the compiled read where it is in
    use (and through ``recv_into`` only where it is turned off)."""
    monkeypatch.setenv("HPCPROC_COOKIE", "socket-accel-test")
    calls: list[int] = []
    real = tcp._recv_nowait

    def counting(fd: int, buffer: Any, offset: int) -> int:
        calls.append(fd)
        assert real is not None
        return real(fd, buffer, offset)

    monkeypatch.setattr(tcp, "_recv_nowait", counting if real is not None else None)

    async def main() -> list[bytes]:
        transport = tcp.create_transport(host="127.0.0.1")
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await a.connect(b.address)
            for i in range(3):
                await conn.send([b"message %d" % i])
            got = []
            while len(got) < 3:
                event = await b.receive()
                if isinstance(event, Received):
                    got.append(b"".join(bytes(f) for f in event.frames))
            return got
        finally:
            await transport.close()

    got = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == [b"message 0", b"message 1", b"message 2"]
    assert bool(calls) is tcp.ACCELERATED


# ------------------------------------------------------------------------------ Reader
#
# The compiled poll of an endpoint's one plain link against the link's Python path
# (``_TcpEndPoint._poll_links``, the reference) on the same bytes: a raw peer writes
# wire messages into a real link, whose reads the test drives itself (the link's reader
# callback is taken off the event loop, so that nothing else reads its socket).

from .test_tcp import COOKIE, RawPeer, _control, _data_message  # noqa: E402

WAIT = 10.0


def _pending(fd: int) -> int:
    """Bytes waiting in socket ``fd``."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class _Driven:
    """A tcp endpoint with one link, to a raw peer, whose reads the test makes."""

    def __init__(self, transport: tcp.TcpTransport, endpoint: Any, peer: RawPeer) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.peer = peer
        [self.link] = endpoint._polled_links()
        asyncio.get_running_loop().remove_reader(self.link._fd)

    @classmethod
    async def open(cls, conns: int = 3) -> _Driven:
        transport = tcp.create_transport(host="127.0.0.1")
        try:
            endpoint = await transport.new_endpoint()
            port = transport.port
            assert port is not None
            peer = await RawPeer.open(port)
            src = b"tcp://127.0.0.1:9/raw/1"
            assert await peer.authenticate(src, bytes(endpoint.address)) is tcp._Status.ACCEPT
            peer.writer.write(b"".join(_control(Kind.OPEN, c) for c in range(1, conns + 1)))
            for _ in range(conns):  # they also prove the link is registered and read
                event = await asyncio.wait_for(endpoint.receive(), WAIT)
                assert isinstance(event, ConnectionOpened), event
        except BaseException:
            await transport.close()
            raise
        return cls(transport, endpoint, peer)

    async def close(self) -> None:
        if not self.link._dead:  # its reads back on the loop: it sees the peer go
            asyncio.get_running_loop().add_reader(self.link._fd, self.link._on_readable)
        self.peer.writer.close()
        await self.transport.close()

    def write(self, data: bytes) -> None:
        """Put ``data`` into the link's socket (whole: waits until it is all there)."""
        before = _pending(self.link._fd)
        self.peer.writer.write(data)
        assert not self.peer.writer.transport.get_write_buffer_size(), "not sent at once"
        deadline = time.monotonic() + WAIT
        while _pending(self.link._fd) < before + len(data):  # loopback: bounded
            assert time.monotonic() < deadline, "the bytes did not arrive"

    def pump(self, step: Any) -> list[bool]:
        """Call ``step`` until the link's socket is drained: what each call returned."""
        results = []
        for _ in range(10000):
            if self.link._dead or not _pending(self.link._fd):
                return results
            results.append(step())
        raise AssertionError("the step did not drain the socket")

    def taken(self) -> list[tuple[str, int, list[bytes]]]:
        """The events queued since the last call, as comparable tuples."""
        out = []
        while self.endpoint._events._items:
            event = self.endpoint._events._items.popleft()
            if isinstance(event, Received):
                out.append(("data", event.conn_id, [bytes(f) for f in event.frames]))
            else:
                out.append((type(event).__name__, getattr(event, "conn_id", 0), []))
        return out


def _driven(body: Callable[[_Driven], Awaitable[None]]) -> None:
    async def main() -> None:
        driven = await _Driven.open()
        try:
            await body(driven)
        finally:
            await driven.close()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.fixture
def cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCPROC_COOKIE", COOKIE)


@pytest.fixture
def reading(compiled: ModuleType) -> ModuleType:
    """The compiled module, set up as tcp.py sets it up (which it does not where it is
    turned off: these tests make their Readers themselves)."""
    compiled.init(Received, int(Kind.DATA), tcp.DIRECT_MIN, tcp._SEND_NOW_MAX)
    return compiled


def test_one_plain_link_is_polled_by_a_reader_unless_turned_off(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        step = d.endpoint._poll_step()
        if tcp.ACCELERATED:
            assert type(step) is reading.Reader
            assert d.endpoint._poll_step() is step  # made once per set of links
        else:
            assert step == d.endpoint._poll_links

    _driven(body)


def test_reader_hands_small_messages_over_as_events_in_order(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        assert reader() is True  # nothing there: polled, nothing handed over
        messages = [(1 + i % 3, [b"m%d" % i * (i + 1)]) for i in range(50)]
        messages.append((2, [b""]))  # an empty frame is a frame too
        d.write(b"".join(_data_message(c, f) for c, f in messages))
        assert set(d.pump(reader)) == {True}
        # Incoming ids are numbered from 1 in the order the peer opened them.
        assert d.taken() == [("data", c, f) for c, f in messages]
        assert d.link._start == d.link._end  # all parsed
        assert d.link.heard is True

    _driven(body)


def test_received_frames_are_copies_not_views_of_the_link_buffer(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        d.write(_data_message(1, [b"keep me"]))
        d.pump(reader)
        [event] = list(d.endpoint._events._items)
        d.link._buf[:] = bytes(len(d.link._buf))  # the buffer is reused for the next read
        assert bytes(event.frames[0]) == b"keep me"

    _driven(body)


def test_reader_hands_over_to_a_receiver_and_ends_the_poll(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        got: list[list[bytes]] = []
        assert d.endpoint.set_receiver(2, lambda frames: got.append([bytes(f) for f in frames]))
        before = d.endpoint._handed_over
        d.write(_data_message(2, [b"to the receiver"]) + _data_message(1, [b"an event"]))
        assert d.pump(reader) == [False]  # a hand-over ends a poll as an event does
        assert got == [[b"to the receiver"]]
        assert d.endpoint._handed_over == before + 1
        assert d.taken() == [("data", 1, [b"an event"])]
        # While an event waits, messages for a receiver queue behind it (order).
        d.write(_data_message(1, [b"first"]) + _data_message(2, [b"second"]))
        assert d.pump(reader) == [True]
        assert got == [[b"to the receiver"]]
        assert d.taken() == [("data", 1, [b"first"]), ("data", 2, [b"second"])]

    _driven(body)


def test_a_receiver_that_closes_the_link_stops_the_reader(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        got: list[bytes] = []

        def receiver(frames: Any) -> None:
            got.append(bytes(frames[0]))
            d.link.abort()

        assert d.endpoint.set_receiver(1, receiver)
        d.write(_data_message(1, [b"last"]) + _data_message(1, [b"never"]))
        assert reader() is False
        assert got == [b"last"]
        assert reader() is False  # a dead link: nothing to poll

    _driven(body)


def _mixed_stream(rng: random.Random) -> list[bytes]:
    """Messages of every shape the link parses, ticks among them."""
    parts = []
    for _ in range(300):
        kind = rng.randrange(6)
        conn = rng.randrange(1, 4)
        if kind == 0:
            parts.append(_data_message(conn, [rng.randbytes(rng.randrange(0, 300))]))
        elif kind == 1:
            frames = [rng.randbytes(rng.randrange(0, 100)) for _ in range(rng.randrange(0, 4))]
            parts.append(_data_message(conn, frames))
        elif kind == 2:
            parts.append(_data_message(conn, [rng.randbytes(tcp.DIRECT_MIN + rng.randrange(9))]))
        elif kind == 3:
            parts.append(tcp._TICK)
        else:
            parts.append(_data_message(conn, [rng.randbytes(rng.randrange(1000, 9000))]))
    return parts


@pytest.mark.parametrize(("seed", "wait"), [(1, 0.0), (2, 0.0), (3, 0.001), (4, 0.001)])
def test_reader_delivers_what_the_python_path_delivers_however_bytes_arrive(
    reading: ModuleType, cookie: None, seed: int, wait: float
) -> None:
    """The same stream, cut at the same random points, through the Reader and through
    _poll_links: the same events, in the same order (a large frame cut short is left
    to the link's parse at once, or after a wait for its rest)."""
    rng = random.Random(seed)
    messages = _mixed_stream(rng)
    stream = b"".join(messages)
    # Mostly between messages (a read then starts on a message, where the Reader takes
    # it), some anywhere (a message cut short: the link's parse goes on with it).
    ends = list(itertools.accumulate(len(m) for m in messages))[:-1]
    cuts = sorted(set(rng.sample(ends, 150) + rng.sample(range(1, len(stream)), 60)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def events_through(make_step: Callable[[_Driven], Any]) -> list[Any]:
        out: list[Any] = []

        async def body(d: _Driven) -> None:
            step = make_step(d)
            for chunk in chunks:
                d.write(chunk)
                d.pump(step)
                out.extend(d.taken())
            assert not d.link._dead

        _driven(body)
        return out

    by_reader = events_through(lambda d: reading.Reader(d.link, d.endpoint, wait))
    by_python = events_through(lambda d: d.endpoint._poll_links)
    assert len(by_python) >= 200
    assert by_reader == by_python


def test_more_than_the_buffer_holds_arrives_whole_and_in_order(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        d.link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        messages = [_data_message(1, [b"%06d" % i * 100]) for i in range(600)]  # ~370 KB
        for i in range(0, len(messages), 50):
            d.write(b"".join(messages[i : i + 50]))
        assert _pending(d.link._fd) > tcp.RECV_BUFFER
        d.pump(reader)
        assert d.taken() == [("data", 1, [b"%06d" % i * 100]) for i in range(600)]

    _driven(body)


def test_a_large_frame_is_received_straight_into_a_pooled_buffer(
    reading: ModuleType, cookie: None
) -> None:
    np = pytest.importorskip("numpy")

    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, WAIT)
        d.link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        got: list[Any] = []
        assert d.endpoint.set_receiver(3, got.append)
        big = np.random.default_rng(5).integers(0, 256, tcp.POOL_MIN + 3, dtype=np.uint8)
        stream = _data_message(3, [big.tobytes()]) + _data_message(3, [b"after"])
        for i in range(0, len(stream), 64 << 10):  # all of it waits in the socket
            d.write(stream[i : i + (64 << 10)])
        # More than the link's buffer: the rest comes from the socket, into the frame;
        # the buffer was full, so the link reads on (and finds the next message).
        assert d.pump(reader) == [False]
        assert [bytes(f[0]) for f in got] == [big.tobytes(), b"after"]
        assert d.link._state == 0 and d.link._pool._out == 1  # a pooled buffer, lent
        got.clear()
        assert d.link._pool._out == 0  # back in the pool once dropped

    _driven(body)


def test_a_large_frame_cut_short_is_truncated_as_the_link_reports_it(
    reading: ModuleType, cookie: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")

    async def body(d: _Driven) -> None:
        reader = reading.Reader(d.link, d.endpoint, WAIT)
        message = _data_message(1, [bytes(tcp.DIRECT_MIN * 2)])
        d.write(message[: tcp.DIRECT_MIN])
        d.peer.writer.close()
        await d.peer.writer.wait_closed()  # (the link's reads are off the loop meanwhile)
        assert reader() is True
        assert d.link._dead
        assert [kind for kind, _, _ in d.taken()] == ["ErrorEvent"]  # the bundle is lost

    _driven(body)
    assert any("truncated frame" in r.getMessage() for r in caplog.records)


_BAD_INPUT = {
    "unknown connection": (_data_message(42, [b"sneaky"]), "unknown connection 42"),
    "unknown kind": (_control(99, 1), "unknown message kind 99"),
    "oversize frame": (
        tcp._ONE_FRAME_HEADER.pack(Kind.DATA, 1, 1, tcp.DEFAULT_MAX_MESSAGE + 1),
        "exceeds the limit",
    ),
}


@pytest.mark.parametrize("bad", sorted(_BAD_INPUT))
@pytest.mark.parametrize("through", ["reader", "python"])
def test_reader_leaves_bad_input_to_the_link_which_drops_the_peer(
    reading: ModuleType,
    cookie: None,
    caplog: pytest.LogCaptureFixture,
    bad: str,
    through: str,
) -> None:
    """Bad input after a good message: the good one delivered, the peer dropped with
    the reason logged, and nothing raised to the poll (as on the Python path)."""
    caplog.set_level(logging.WARNING, logger="hpcproc.transports")
    data, reason = _BAD_INPUT[bad]

    async def body(d: _Driven) -> None:
        step = reading.Reader(d.link, d.endpoint, 0.0) if through == "reader" else None
        d.write(_data_message(1, [b"good"]) + data)
        assert d.pump(step or d.endpoint._poll_links) == [True]
        assert d.taken()[0] == ("data", 1, [b"good"])
        assert d.link._dead

    _driven(body)
    assert any(reason in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("through", ["reader", "python"])
def test_a_receivers_oserror_fails_the_link_as_a_failed_read_does(
    reading: ModuleType, cookie: None, through: str
) -> None:
    async def body(d: _Driven) -> None:
        reasons: list[str] = []
        d.link.fail = reasons.append  # type: ignore[method-assign]

        def receiver(frames: Any) -> None:
            raise ConnectionResetError(errno.ECONNRESET, "from the receiver")

        assert d.endpoint.set_receiver(1, receiver)
        step = reading.Reader(d.link, d.endpoint, 0.0) if through == "reader" else None
        d.write(_data_message(1, [b"x"]))
        assert (step or d.endpoint._poll_links)() is False  # it was handed over
        assert reasons == ["receive failed: [Errno 104] from the receiver"]

        def broken(frames: Any) -> None:
            raise ZeroDivisionError("a bug in the receiver")

        assert d.endpoint.set_receiver(2, broken)
        d.write(_data_message(2, [b"y"]))
        with pytest.raises(ZeroDivisionError):  # not a read's error: raised
            (step or d.endpoint._poll_links)()

    _driven(body)


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_reader_reports_the_end_of_the_stream_as_the_link_does(
    reading: ModuleType, cookie: None, how: str
) -> None:
    async def body(d: _Driven) -> None:
        reasons: list[str] = []
        d.link.fail = reasons.append  # type: ignore[method-assign]
        reader = reading.Reader(d.link, d.endpoint, 0.0)
        if how == "reset":  # SO_LINGER 0: close() sends a reset instead of a FIN.
            sock = d.peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            d.peer.writer.transport.abort()
        else:
            d.peer.writer.close()
        await d.peer.writer.wait_closed()  # (the link's reads are off the loop meanwhile)
        ready, _, _ = select.select([d.link._fd], [], [], WAIT)
        assert ready, "the end of the stream did not arrive"
        assert reader() is True
        expected = "peer closed the link" if how == "closed" else "receive failed: [Errno 104]"
        assert len(reasons) == 1 and reasons[0].startswith(expected), reasons

    _driven(body)


def test_reader_refuses_what_is_not_a_link(reading: ModuleType) -> None:
    with pytest.raises(TypeError, match="3"):
        reading.Reader(object(), object())
    with pytest.raises(ValueError, match="wait_s must be 0 to 60 seconds, not -1"):
        reading.Reader(object(), object(), -1)
    with pytest.raises(AttributeError):
        reading.Reader(object(), object(), 0.0)


def test_init_refuses_an_event_type_without_the_slots(compiled: ModuleType) -> None:
    with pytest.raises(TypeError, match="not a type"):
        compiled.init(object(), int(Kind.DATA), tcp.DIRECT_MIN, tcp._SEND_NOW_MAX)
    with pytest.raises(TypeError, match="no conn_id and frames slots"):
        compiled.init(int, int(Kind.DATA), tcp.DIRECT_MIN, tcp._SEND_NOW_MAX)
    with pytest.raises(ValueError, match="not a byte"):
        compiled.init(Received, 256, tcp.DIRECT_MIN, tcp._SEND_NOW_MAX)


# ------------------------------------------------------------------------------ Sender
#
# The compiled send_now of a plain link against the Python method (the reference), on
# the same real link: the bytes the raw peer reads, and what each leaves to send_data.


def _frames_of_every_kind() -> list[Any]:
    np = pytest.importorskip("numpy")
    return [
        b"bytes",
        bytearray(b"a bytearray"),
        memoryview(b"a memoryview slice")[2:9],
        np.arange(6, dtype=np.float64),
        np.arange(12, dtype=np.int32).reshape(3, 4),
        b"",
        bytes(range(256)) * (tcp._SEND_NOW_MAX // 256),  # the largest it sends itself
    ]


def test_sender_puts_on_the_wire_what_send_now_does(reading: ModuleType, cookie: None) -> None:
    async def body(d: _Driven) -> None:
        sender = reading.Sender(d.link)
        for frame in _frames_of_every_kind():
            for send in (sender, functools.partial(tcp._TcpLink.send_now, d.link)):
                assert send(7, [frame]) is True
                want = tcp._ONE_FRAME_SIZE + memoryview(frame).nbytes
                got = await asyncio.wait_for(d.peer.reader.readexactly(want), WAIT)
                assert got == _data_message(7, [bytes(memoryview(frame))])

    _driven(body)


def test_sender_leaves_to_send_data_what_send_now_leaves(reading: ModuleType, cookie: None) -> None:
    np = pytest.importorskip("numpy")

    async def body(d: _Driven) -> None:
        sender = reading.Sender(d.link)
        python = functools.partial(tcp._TcpLink.send_now, d.link)
        for frames in (
            [],
            [b"two", b"frames"],
            [bytes(tcp._SEND_NOW_MAX + 1)],
            [np.arange(10, dtype=np.uint8)[::2]],  # not contiguous
        ):
            assert sender(1, frames) is False
            if len(frames) != 1 or memoryview(frames[0]).c_contiguous:
                assert python(1, frames) is False
        d.link._wq.append(tcp._Write([memoryview(b"queued")], None))  # a backlog: in order
        assert sender(1, [b"x"]) is python(1, [b"x"]) is False
        d.link._wq.clear()
        d.link.abort()
        assert sender(1, [b"x"]) is python(1, [b"x"]) is False
        assert _pending(d.peer.writer.get_extra_info("socket").fileno()) == 0

    _driven(body)


def test_what_the_kernel_does_not_take_is_queued_as_a_copy(
    reading: ModuleType, cookie: None
) -> None:
    async def body(d: _Driven) -> None:
        sender = reading.Sender(d.link)
        d.link._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frame = bytearray(b"%08d" % 0 * (tcp._SEND_NOW_MAX // 8))
        sent = []
        while not d.link._wq:  # until the socket's buffer is full and a part waits
            frame[:8] = b"%08d" % len(sent)
            assert sender(1, [frame]) is True
            sent.append(bytes(frame))
            assert len(sent) < 1000, "the socket never filled up"
        frame[:] = bytes(len(frame))  # the caller's buffer is free at once
        # The queue drains into the socket as the peer reads: everything, in order.
        for i, want in enumerate(sent):
            got = await asyncio.wait_for(
                d.peer.reader.readexactly(tcp._ONE_FRAME_SIZE + len(want)), WAIT
            )
            assert got == _data_message(1, [want]), f"message {i} of {len(sent)}"

    _driven(body)


def test_sender_raises_the_failed_sends_oserror(reading: ModuleType, cookie: None) -> None:
    async def body(d: _Driven) -> None:
        sender = reading.Sender(d.link)
        sock = d.peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        d.peer.writer.transport.abort()
        await d.peer.writer.wait_closed()
        select.select([d.link._fd], [], [], WAIT)  # the reset is there
        with pytest.raises(OSError) as info:
            for _ in range(3):  # (a first send may still go out before the reset is seen)
                sender(1, [b"lost"])
        assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
        with pytest.raises(TypeError, match=r"\(conn_id, frames\)"):
            sender(1)
        with pytest.raises(OverflowError):
            sender(-1, [b"x"])

    _driven(body)


def test_plain_links_send_through_it_unless_turned_off(reading: ModuleType, cookie: None) -> None:
    async def body(d: _Driven) -> None:
        sender = vars(d.link).get("send_now")  # shadows the method where it is in use
        assert type(sender) is reading.Sender if tcp.ACCELERATED else sender is None

    _driven(body)
