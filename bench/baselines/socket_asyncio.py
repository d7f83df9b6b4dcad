"""The same socket ping-pong as :mod:`.socket_tcp`, driven by an asyncio event loop.

Not a target but a floor: it shows what asyncio alone costs per round trip (readiness
callbacks, futures, task switches) on top of blocking sockets, which bounds any
asyncio-native transport. The echo side reads in a readiness callback and answers
from it; the timing side sends with ``sendmsg`` and awaits ``loop.sock_recv_into``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

from .._pair import Peer
from .._timing import Step, atime_steps

_LEN = struct.Struct("<Q")
_STOP = (1 << 64) - 1


async def _recv_exactly(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    pos = 0
    while pos < len(view):
        got = await loop.sock_recv_into(sock, view[pos:])
        if got == 0:
            raise ConnectionError("peer closed")
        pos += got


async def _sendmsg_all(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, bufs: list[memoryview]
) -> None:
    try:
        sent = sock.sendmsg(bufs)
    except BlockingIOError:
        sent = 0
    for buf in bufs:
        if sent >= len(buf):
            sent -= len(buf)
            continue
        await loop.sock_sendall(sock, buf[sent:])
        sent = 0


async def role(peer: Peer) -> dict[str, list[float]] | None:
    """Role 0 times the plan; role 1 echoes until told to stop."""
    loop = asyncio.get_running_loop()
    if peer.role == 1:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            peer.publish("port", listener.getsockname()[1])
            listener.setblocking(False)
            conn, _ = await loop.sock_accept(listener)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            header = memoryview(bytearray(_LEN.size))
            buf = memoryview(bytearray(0))
            while True:
                await _recv_exactly(loop, conn, header)
                (n,) = _LEN.unpack(header)
                if n == _STOP:
                    return None
                if len(buf) < n:
                    buf = memoryview(bytearray(n))
                await _recv_exactly(loop, conn, buf[:n])
                await _sendmsg_all(loop, conn, [header, buf[:n]])
    steps = [Step(**s) for s in peer.params["steps"]]
    port = await peer.alookup("port")
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)

        def prepare(size: int) -> Callable[[], Awaitable[None]]:
            header = memoryview(_LEN.pack(size))
            payload = memoryview(bytearray(size))
            rheader = memoryview(bytearray(_LEN.size))
            rpayload = memoryview(bytearray(size))

            async def one() -> None:
                await _sendmsg_all(loop, sock, [header, payload])
                await _recv_exactly(loop, sock, rheader)
                await _recv_exactly(loop, sock, rpayload)

            return one

        result = await atime_steps(steps, prepare, peer.turn)
        await loop.sock_sendall(sock, _LEN.pack(_STOP))
    return result
