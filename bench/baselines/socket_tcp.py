"""Raw TCP socket ping-pong with the framing effort of the tcp transport.

Each message is an 8-byte length followed by the payload, sent with one ``sendmsg``
(gather) and received with ``recv_into`` into preallocated buffers; TCP_NODELAY is set.
The echo side needs no plan: the length prefix tells it what to read.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from .._pair import Peer
from .._timing import Step, plan, time_steps

_LEN = struct.Struct("<Q")
_STOP = (1 << 64) - 1


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    n = len(view)
    while pos < n:
        got = sock.recv_into(view[pos:])
        if got == 0:
            raise ConnectionError("peer closed")
        pos += got


def _sendmsg_all(sock: socket.socket, bufs: list[memoryview]) -> None:
    while bufs:
        sent = sock.sendmsg(bufs)
        while bufs and sent >= len(bufs[0]):
            sent -= len(bufs[0])
            bufs.pop(0)
        if bufs and sent:
            bufs[0] = bufs[0][sent:]


def role(peer: Peer) -> dict[str, list[float]] | None:
    """Role 0 times the plan in ``peer.params``; role 1 echoes until told to stop."""
    if peer.role == 1:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            peer.publish("port", listener.getsockname()[1])
            conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header = bytearray(_LEN.size)
            hview = memoryview(header)
            buf = memoryview(bytearray(0))
            while True:
                _recv_exactly(conn, hview)
                (n,) = _LEN.unpack(header)
                if n == _STOP:
                    return None
                if len(buf) < n:
                    buf = memoryview(bytearray(n))
                _recv_exactly(conn, buf[:n])
                _sendmsg_all(conn, [hview, buf[:n]])
    steps = [Step(**s) for s in peer.params["steps"]] if "steps" in peer.params else plan(True)
    sock = socket.create_connection(("127.0.0.1", peer.lookup("port")))
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def prepare(size: int) -> Callable[[], None]:
            header = memoryview(_LEN.pack(size))
            payload = memoryview(bytearray(size))
            rheader = memoryview(bytearray(_LEN.size))
            rpayload = memoryview(bytearray(size))

            def one() -> None:
                _sendmsg_all(sock, [header, payload])
                _recv_exactly(sock, rheader)
                _recv_exactly(sock, rpayload)

            return one

        result = time_steps(steps, prepare, peer.turn)
        sock.sendall(_LEN.pack(_STOP))
    return result
