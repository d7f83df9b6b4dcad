"""The tcp transport's compiled socket read (``hpcproc/transports/_socket_accel.c``):
its contract on real sockets, and that plain tcp links use it unless it is turned off
(``HPCPROC_SOCKET_ACCEL=0``; ``make test`` runs the tcp tests again that way, so the
``recv_into`` fallback passes the same conformance suite)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from hpcproc.transports import Received, tcp

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
