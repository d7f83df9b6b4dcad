"""TCP transport: one authenticated socket per pair of endpoints.

Every transport object owns one listening socket; its endpoints are told apart by an
id carried in the address, ``b"tcp://HOST:PORT/INSTANCE/ID"`` (``INSTANCE`` is random
per transport object, so an address never routes to an endpoint of a later transport
that reuses the port). All lightweight connections between two endpoints share one
socket, a :class:`~hpcproc.transports._multiplex.Link` carrying the byte layout of
:mod:`~hpcproc.transports._wire`.

Links are established by the handshake of :mod:`~hpcproc.transports._dialing`
(challenge-response on the cookie, then the acceptor's decision, which also resolves
crossed connects), with the magic ``b"HPCPTCP\\x02"``. Its link parameters
(``extra_X``, 12 bytes) say who the process is for a peer on the same host: 8 bytes
that are equal for two processes exactly when they share the host and the pid
namespace, and the pid; a link to such a peer counts its CPUs for the crowding of
:mod:`~hpcproc.transports._busy_poll` (:meth:`Crowding.peer_linked`). (The dialer
sends its own with its proof, before the acceptor has proved the cookie: a pid and a
digest are what a listener that is not an hpcproc peer could learn.) A losing socket
is closed before any link message is read from it.

I/O design, chosen by measurement on Python 3.11. A ping-pong through asyncio streams
(``readexactly`` / ``write`` + ``drain``) reached 0.24-0.36 GB/s at 16 MiB where the
same loop on non-blocking sockets driven by the event loop reached 0.70-0.82 GB/s
(same run, loaded 2-core machine; 8-byte round trips were within noise of each
other): streams copy every byte once more into their buffer. A
``BufferedProtocol`` receives as well as the direct path (its ``get_buffer`` is a
``recv_into``), but on 3.11 its transport's ``writelines`` joins its arguments and
``write`` copies whatever the kernel does not take at once (most of a 16 MiB frame)
into its own buffer. This module therefore drives non-blocking sockets directly
from the event loop (``add_reader`` / ``add_writer``), which is what
``BufferedProtocol`` does for receive, and adds what asyncio lacks for send:

* sends gather header and frames into one ``sendmsg`` (no concatenation), tried at
  once from ``send`` (a small message costs one system call and no task switch);
  what the kernel does not take waits in a queue of views on the caller's buffers,
  and ``send`` awaits it (back-pressure; ``send`` returns once the buffers are free);
* receive parses small messages out of one coalescing buffer (one ``recv_into``
  fills it with as many messages as have arrived) and reads the body of a large
  frame with ``recv_into`` straight into that frame's own buffer (recycled from a
  pool once the receiver drops it, see :class:`_FramePool`); while such a frame
  arrives, ``SO_RCVLOWAT`` asks the kernel to wake the loop only once up to 4 MiB
  more are there (measured: 15-25 % less CPU per 16 MiB round trip, hence fewer
  lost turns on a busy machine), and is back at 1 byte before any header is read.

What bounds small-message latency is the event loop itself: every message costs each
side a readiness callback, a future and a task switch (two loop iterations), and on
the virtual machines measured here waking a process asleep in ``epoll_wait`` costs
about 50 us each way (the ``socket-asyncio`` baseline of ``python -m bench transport``
measures that floor without any transport logic). So ``receive`` on an empty queue
first polls the links' sockets in place for up to ``busy_poll_us`` while the event
loop has nothing else to run (:mod:`~hpcproc.transports._busy_poll`: adaptive, fair,
off when the CPUs are oversubscribed, and never for links to endpoints of this same
process, which can only answer once the loop runs). Most reads of such a poll find
nothing, which ``socket.recv_into`` reports by raising ``BlockingIOError`` (about
0.9 us a read here); plain links read with the optional compiled ``recv_nowait``
(``_socket_accel.c``, built at install where a compiler exists) instead, which
returns -1 (0.2 us): a turn of the poll that is shorter finds the reply sooner.

The same compiled module does a spinning receiver's whole turn on an endpoint's one
plain link (its ``Reader``: the read, and the hand-over of one-frame messages as
:meth:`_TcpLink._parse` and ``_on_data`` do, a large frame's rest received straight
into it; anything else left to them) and a plain link's ``send_now`` (its
``Sender``). The Python methods stay the reference, and run where the module is not
built or ``HPCPROC_SOCKET_ACCEL=0``. Measured (a raw ping-pong here): the Python from
a read that brings a message to the event's return cost 1.8 us a hop of an 8 B round
trip of 13.6 us, send_now's 0.5 us, and at 256 KiB the frame's parse, its turns and
low-water marks about 8 us a hop of 90 us; in C, 10.25 and 73 us (a minimal spinning
socket loop: 9.5 and 65).

With ``tls`` (:mod:`hpcproc.tls`), every socket runs mutual TLS 1.3 before the
handshake above, which then runs inside it; the TLS link sits beside the plain one (see
the TLS section below), so plain tcp keeps its fast paths unchanged.

Heartbeats (:mod:`._multiplex`): a link idle for a tick gets a 16-byte ``TICK``
message, written only when its write queue is empty (a link with a backlog is not
idle, and its peer sees the bytes arrive); every ``recv`` that returns bytes, part of
a large frame included, counts as a sign of life (one attribute store per batch). A
peer from which nothing arrived for 4 ticks is lost: what detects a partition or a
hung host, which close no socket (TCP's own keepalive would take hours by default).

Bad input from a peer (a wrong cookie, garbage, a truncated frame, an oversize
length, an unknown kind, data on an unopened connection) drops that peer's socket
with a ``logging.warning`` naming the peer and the reason; every length is checked
before anything is allocated from it, and a peer that does not finish the handshake
within ``handshake_timeout`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import select
import socket
import ssl
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final, TypeVar, cast

import numpy as np

from .._host import local_pid, process_identity
from ..tls import TlsConfig, describe_tls_error, tls_config
from ._busy_poll import IdlePoller, check_budget
from ._dialing import (
    HELLO,
    DialingEndPoint,
    DialingTransport,
    HandshakeError,
    HandshakeFormat,
    HostAddress,
    SetupChannel,
    Status,
    handshake_context,
    parse_host_address,
    resolve,
)
from ._idle_pool import IdleTrimmer, env_bytes, idle_seconds
from ._multiplex import Kind, Link, tick_period
from ._wire import PREFIX, WireError, as_bytes_view, encode_header, parse_lengths, parse_prefix
from .base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    EndPoint,
    EndPointAddress,
    Event,
    NewEndPointError,
    NewEndPointErrorCode,
    Received,
    SendError,
    SendErrorCode,
)

__all__ = ["DEFAULT_MAX_MESSAGE", "TcpTransport", "create_transport", "parse_address"]

log = logging.getLogger("hpcproc.transports.tcp")

#: Default bound on one message (sum of its frames) accepted from a peer.
DEFAULT_MAX_MESSAGE = 1 << 30
#: Most frames per message; the length table must fit the coalescing buffer.
MAX_FRAMES = 8192
#: Size of the coalescing receive buffer.
RECV_BUFFER = 256 * 1024
#: Frame bodies at least this large are received straight into their own buffer.
DIRECT_MIN = 64 * 1024
#: Frames up to this size may be sent by ``send_now`` (a partial write copies the rest).
_SEND_NOW_MAX = 64 * 1024
#: Frames at least this large get recycled buffers (see :class:`_FramePool`).
POOL_MIN = 1 << 20
_PREFIX_SIZE = PREFIX.size
#: Linux IOV_MAX: most buffers in one sendmsg.
_IOV_MAX = 1024
#: Largest SO_RCVLOWAT set while a large frame arrives (fewer, larger wake-ups).
_LOWAT_MAX = 4 << 20
#: Bound on reads per readiness callback, so one busy peer cannot starve the loop.
_READS_PER_WAKEUP = 64

#: Environment variable: ``0`` reads and sends in Python (``socket.recv_into``,
#: ``_parse``, ``send_now``) even where ``_socket_accel.c`` was built.
ACCEL_ENV: Final = "HPCPROC_SOCKET_ACCEL"


def _compiled() -> ModuleType | None:
    """The compiled socket module, set up; None where it was not built or is turned off."""
    if os.environ.get(ACCEL_ENV, "1").strip() == "0":
        return None
    try:
        from . import _socket_accel
    except ImportError:  # built without a compiler: recv_into does the reads
        return None
    _socket_accel.init(Received, int(Kind.DATA), DIRECT_MIN, _SEND_NOW_MAX)
    return _socket_accel


_accel = _compiled()
_recv_nowait: Callable[[int, Buffer, int], int] | None = (
    None if _accel is None else _accel.recv_nowait
)
#: The compiled poll of an endpoint's one plain link, ``Reader(link, endpoint, wait_s)``:
#: see :meth:`_TcpEndPoint._poll_step`.
_Reader: Callable[[_TcpLink, _TcpEndPoint, float], Callable[[], bool]] | None = (
    None if _accel is None else _accel.Reader
)
#: The compiled ``send_now`` of a plain link, ``Sender(link)``: see :class:`_TcpLink`.
_Sender: Callable[[_TcpLink], Callable[[int, Sequence[Buffer]], bool]] | None = (
    None if _accel is None else _accel.Sender
)
#: Whether plain links read and send through the compiled module.
ACCELERATED: Final = _accel is not None


#: The handshake's magic; its last byte is the handshake's version (2: with ``_WHO``).
_MAGIC = b"HPCPTCP\x02"
#: The link parameters: this process's :func:`~hpcproc._host.process_identity`.
_WHO = struct.Struct("!8sI")
_FORMAT = HandshakeFormat("tcp", _MAGIC, _WHO.size, log)
# The names the raw-protocol tests speak the handshake with.
_HELLO = HELLO
_Status = Status
_context = handshake_context

_R = TypeVar("_R")

#: A parsed tcp endpoint address.
TcpAddress = HostAddress


def parse_address(address: bytes) -> TcpAddress:
    """Parse ``b"tcp://HOST:PORT/INSTANCE/ID"`` (``HOST`` may be ``[v6-address]``).

    Raises:
        ValueError: the address is malformed.
    """
    return parse_host_address(address, _FORMAT.scheme)


def _who() -> bytes:
    """This process's link parameters (read per handshake: a forked child has its own
    pid)."""
    return _WHO.pack(*process_identity())


def _same_host_pid(extra: bytes) -> int:
    """The pid of the peer whose link parameters are ``extra`` where it is another
    process of this host and pid namespace, else 0."""
    return local_pid(*_WHO.unpack(extra))


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "<unknown peer>"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class _SocketChannel(SetupChannel["_TcpEndPoint"]):
    """A connected socket during the handshake; ``remote`` is set on the dialing side."""

    def __init__(
        self, transport: TcpTransport, sock: socket.socket, remote: EndPointAddress | None = None
    ) -> None:
        self._transport = transport
        self._sock = sock
        self._remote = remote
        self._loop = asyncio.get_running_loop()
        self._owned = False
        self.peer = f"peer {_peer_name(sock)}"
        self.extra = _who()

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            got = await self._loop.sock_recv_into(self._sock, view[pos:])
            if got == 0:
                if buf.startswith(_TLS_ALERT):
                    raise HandshakeError(_PLAIN_TO_TLS)
                raise HandshakeError(f"connection closed after {pos} of {n} handshake bytes")
            pos += got
        return bytes(buf)

    def drop(self) -> None:
        if not self._owned and self._sock.fileno() >= 0:
            self._sock.close()

    def link(self, endpoint: _TcpEndPoint, remote: EndPointAddress, peer_extra: bytes) -> Link:
        return _TcpLink(
            endpoint, remote, self._sock, self._transport._max_message, _same_host_pid(peer_extra)
        )

    async def start(self, link: Link, first: bytes = b"") -> None:
        assert isinstance(link, _TcpLink)
        self._owned = True
        link.start(first)

    async def refuse(self, reply: bytes) -> None:
        try:
            await self.send(reply)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        finally:
            self.drop()

    def dial_error(self, exc: Exception, *, answered: bool) -> ConnectError | None:
        if isinstance(exc, HandshakeError):
            return ConnectError(
                ConnectErrorCode.FAILED,
                f"{self._remote!r} refused the handshake (wrong cookie, or not an hpcproc "
                f"tcp endpoint): {exc}",
            )
        if isinstance(exc, OSError):
            return ConnectError(
                ConnectErrorCode.FAILED, f"handshake with {self._remote!r} failed: {exc}"
            )
        return None


#: A TLS alert record's first bytes: what a TLS endpoint answers a plain HELLO with.
_TLS_ALERT = b"\x15\x03"
#: A fatal TLS alert "protocol_version", as a TLS endpoint answers a plain peer.
_TLS_PROTOCOL_ALERT = b"\x15\x03\x03\x00\x02\x02\x46"
_PLAIN_TO_TLS = (
    "the peer answered with a TLS alert: it requires TLS and this side does not use it"
    " (start every rank with --tls, or none)"
)


def _alloc(n: int) -> memoryview:
    """A fresh writable buffer for a small received frame."""
    return memoryview(bytearray(n))


class _FramePool:
    """Recycles the buffers of large received frames once their receiver drops them.

    A fresh multi-megabyte buffer costs the kernel a page fault and a page of zeroes
    per page on first touch (about 1 ms per 16 MiB here, 15 % of a 16 MiB round trip
    on loopback), and the allocator hands such buffers back to the system on free.
    So frames of at least :data:`POOL_MIN` bytes are views of pooled buffers (size
    classes of powers of two): when the last reference to a frame goes (the frame,
    or an array rebuilt over it), a finalizer returns its buffer here. The receiver
    still owns the frame exclusively while it holds it; at most ``limit`` bytes
    (``$HPCPROC_TCP_POOL_BYTES``, default 256 MiB) are kept idle, and a buffer unused
    for ``idle_s`` (``$HPCPROC_POOL_IDLE_S``) goes back to the system
    (:mod:`~hpcproc.transports._idle_pool`), so memory returns to where it was once
    the application dropped its messages. Finalizers may run on any thread; list
    operations are atomic.
    """

    def __init__(self, limit: int | None = None, idle_s: float | None = None) -> None:
        self._limit = env_bytes("HPCPROC_TCP_POOL_BYTES", limit, 256 << 20)
        self._idle = 0
        #: Lent-out buffers not yet returned (keeps the trimmer armed).
        self._out = 0
        self._free: dict[int, list[tuple[np.ndarray, float]]] = {}
        self._trimmer = IdleTrimmer(idle_seconds(idle_s), self._trim)

    def get(self, n: int) -> memoryview:
        if n < POOL_MIN:
            return memoryview(np.empty(n, dtype=np.uint8))  # type: ignore[arg-type]
        size = 1 << (n - 1).bit_length()
        free = self._free.get(size)
        try:
            base = free.pop()[0] if free else None
        except IndexError:  # emptied by another thread meanwhile
            base = None
        if base is None:
            base = np.empty(size, dtype=np.uint8)
        else:
            self._idle -= size
        self._out += 1
        self._trimmer.touch()
        view = base[:n]
        weakref.finalize(view, self._put, base)
        return memoryview(view)  # type: ignore[arg-type]

    def _put(self, base: np.ndarray) -> None:
        self._out -= 1
        if self._idle + base.size <= self._limit:
            self._idle += base.size
            self._free.setdefault(base.size, []).append((base, time.monotonic()))

    def _trim(self, cutoff: float) -> bool:
        """Drop buffers idle since before ``cutoff``; whether the timer is still needed."""
        for size, free in list(self._free.items()):
            keep = [item for item in free if item[1] >= cutoff]
            self._idle -= size * (len(free) - len(keep))
            free[:] = keep
        return self._idle > 0 or self._out > 0

    def close(self) -> None:
        self._trimmer.cancel()
        self._free.clear()
        self._idle = 0


_ONE_FRAME_HEADER = struct.Struct(PREFIX.format + "Q")
_ONE_FRAME_SIZE = _ONE_FRAME_HEADER.size
_DATA = int(Kind.DATA)
_TICK = PREFIX.pack(Kind.TICK, 0, 0)


class _Write:
    """A queued message: views still to send and the sender waiting for them."""

    __slots__ = ("bufs", "fut", "index")

    def __init__(self, bufs: list[Buffer], fut: asyncio.Future[None] | None) -> None:
        self.bufs = bufs
        self.index = 0
        self.fut = fut

    def detach(self) -> None:
        """Copy the unsent bytes so the sender's buffers are free (sender cancelled)."""
        self.bufs = [memoryview(bytes(b)) for b in self.bufs[self.index :]]
        self.index = 0


class _TcpLink(Link):
    """One authenticated socket to one remote endpoint."""

    heartbeat = True

    def __init__(
        self,
        endpoint: _TcpEndPoint,
        remote: EndPointAddress,
        sock: socket.socket,
        max_message: int,
        peer_pid: int = 0,
    ) -> None:
        super().__init__(remote, endpoint)
        self._ep = endpoint
        #: The peer's pid where it is another process of this host (else 0), and the
        #: pid :meth:`start` counted in the process's crowding (0: none).
        self._peer_pid = peer_pid
        self._counted_pid = 0
        self._pool = endpoint._transport._pool
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = _peer_name(sock)
        #: The peer lives in this process: polling its socket cannot find a reply.
        self._in_process = _instance_of(remote) in _LOCAL_INSTANCES
        self._loop = asyncio.get_running_loop()
        self._max_message = max_message
        self._dead = False
        # send side
        self._wq: deque[_Write] = deque()
        self._writing = False
        self._drained: asyncio.Future[None] | None = None
        self._eof: asyncio.Future[None] = self._loop.create_future()
        # receive side
        self._buf = bytearray(RECV_BUFFER)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._state = 0  # 0: prefix, 1: length table, 2: frame bodies
        self._nframes = 0
        self._cid = 0
        self._frames: list[memoryview] = []
        self._fi = 0
        self._fpos = 0
        self._lowat = 1
        if _Sender is not None and type(self) is _TcpLink:
            # send_now in C (the method below is the reference): the same checks,
            # header and sendmsg, 0.4-0.5 us less per message (closing note).
            self.send_now = _Sender(self)  # type: ignore[method-assign,assignment]

    def start(self, first: bytes = b"") -> None:
        """Queue ``first`` (the handshake's last bytes) ahead of everything, start reading."""
        if first:
            self._push(memoryview(first), None)
        if self._peer_pid and not self._dead:
            # A peer bound within this process's CPUs may make them crowded (see
            # Crowding.peer_linked).
            self._counted_pid = self._ep._idle_poller().crowding.count_link(self._peer_pid)
        self._loop.add_reader(self._fd, self._on_readable)

    # ------------------------------------------------------------------ send side

    def send_control(self, kind: Kind, conn_id: int) -> None:
        if self._dead:
            return
        self._push(memoryview(PREFIX.pack(kind, 0, conn_id)), None)

    def send_tick(self) -> None:
        # Only on an empty write queue (a link with a backlog is not idle, and its peer
        # sees the bytes arrive). ``_push`` tries the socket at once and queues only
        # what the kernel did not take, so that the stream stays whole.
        if not self._dead and not self._wq:
            self._push(memoryview(_TICK), None)

    def _push(self, view: memoryview, fut: asyncio.Future[None] | None) -> None:
        if not self._wq:
            try:
                sent = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.fail(f"send failed: {exc}")
                return
            if sent == len(view):
                return
            view = memoryview(bytes(view[sent:]))
        self._wq.append(_Write([view], fut))
        self._want_write()

    def send_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        # One small frame and nothing queued: one sendmsg, no coroutine. A partial
        # write (full socket buffer) queues a copy of the rest, so the caller's frame
        # is free at once either way.
        if self._dead or self._wq or len(frames) != 1:
            return False
        frame = frames[0]
        view = frame if type(frame) is bytes else as_bytes_view(frame)
        n = len(view)
        if n > _SEND_NOW_MAX:
            return False
        header = _ONE_FRAME_HEADER.pack(Kind.DATA, 1, conn_id, n)
        try:
            sent = self._sock.sendmsg([header, view])
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(header) + n:
            return True
        self._queue_rest(b"".join([header, view])[sent:])
        return True

    def _queue_rest(self, rest: bytes) -> None:
        """What the kernel did not take of a message ``send_now`` sent: queued (a copy)."""
        self._wq.append(_Write([memoryview(rest)], None))
        self._want_write()

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        if self._dead:
            raise ConnectionError(f"link to {self.remote!r} is down")
        views: list[Buffer] = []
        lengths: list[int] = []
        for frame in frames:
            if type(frame) is bytes or type(frame) is bytearray:
                views.append(frame)
                lengths.append(len(frame))
            else:
                view = as_bytes_view(frame)
                views.append(view)
                lengths.append(len(view))
        total = sum(lengths)
        if len(views) > MAX_FRAMES or total > self._max_message:
            raise SendError(
                SendErrorCode.FAILED,
                f"message of {len(views)} frames / {total} bytes exceeds the limits "
                f"({MAX_FRAMES} frames, {self._max_message} bytes); nothing was sent",
            )
        header = encode_header(Kind.DATA, conn_id, lengths)
        bufs = [header, *views]
        if not self._wq and len(bufs) <= _IOV_MAX:
            try:
                sent = self._sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == total + len(header):
                return
            entry = _Write(bufs, self._loop.create_future())
            self._consume_entry(entry, sent)
        else:
            entry = _Write(bufs, self._loop.create_future())
        self._wq.append(entry)
        self._want_write()
        assert entry.fut is not None
        try:
            await entry.fut
        except asyncio.CancelledError:
            if not entry.fut.done() and not self._dead:
                entry.detach()  # the message must still go out whole
            raise

    def _sent(self, n: int) -> None:
        """``n`` bytes of the write queue went out: finish the writes they complete."""
        wq = self._wq
        while wq:
            entry = wq[0]
            n = self._consume_entry(entry, n)
            if entry.index < len(entry.bufs):
                return
            wq.popleft()
            if entry.fut is not None and not entry.fut.done():
                entry.fut.set_result(None)

    def _writes_done(self) -> None:
        """Stop watching for writability once the queue is empty; wake ``close``."""
        if not self._wq and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    @staticmethod
    def _consume_entry(entry: _Write, n: int) -> int:
        """Advance ``entry`` by up to ``n`` sent bytes; return the bytes left over."""
        bufs = entry.bufs
        i = entry.index
        while i < len(bufs) and n:
            size = len(bufs[i])  # type: ignore[arg-type]
            if size <= n:
                n -= size
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[n:]  # type: ignore[arg-type]
                n = 0
        while i < len(bufs) and not len(bufs[i]):  # type: ignore[arg-type]
            i += 1
        entry.index = i
        return n

    def _want_write(self) -> None:
        if not self._writing and not self._dead:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        wq = self._wq
        while wq and not self._dead:
            bufs: list[Buffer] = []
            for entry in wq:
                bufs.extend(entry.bufs[entry.index :])
                if len(bufs) >= _IOV_MAX:
                    del bufs[_IOV_MAX:]
                    break
            try:
                sent = self._sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.fail(f"send failed: {exc}")
                return
            self._sent(sent)
        self._writes_done()

    # ------------------------------------------------------------------ receive side

    def _on_readable(self) -> None:
        sock = self._sock
        try:
            for _ in range(_READS_PER_WAKEUP):
                if self._dead:
                    return
                if self._state == 2 and self._start == self._end:
                    frame = self._frames[self._fi]
                    want = len(frame) - self._fpos
                    if want >= DIRECT_MIN:
                        n = self._recv_frame(sock, frame)
                        if n == 0:
                            return
                        if n < want:
                            # Wake up only once a good part of the rest is here.
                            self._set_lowat(min(want - n, _LOWAT_MAX))
                            return
                        continue
                if self._lowat != 1:
                    self._set_lowat(1)
                self._make_room()
                space = len(self._buf) - self._end
                if self._read_buffered(sock) < space:
                    return  # the socket is drained (or closed: 0; nothing there: -1)
        except (WireError, OSError) as exc:
            self._read_error(exc)

    def _read_error(self, exc: Exception) -> None:
        """What reading and parsing do with ``exc`` raised meanwhile (here, and for the
        compiled Reader, which hands such errors over): nothing for a read that would
        block, the peer dropped for bad input, the link failed for a failed read (or a
        receiver's ``OSError``); any other exception is raised again."""
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return
        if isinstance(exc, WireError):
            self._bad_peer(str(exc))
        elif isinstance(exc, OSError):
            self._read_failed(exc)
        else:
            raise exc

    def _read_failed(self, exc: OSError) -> None:
        """A read of the socket raised ``exc``: the link is down."""
        self.fail(f"receive failed: {exc}")

    def _recv_frame(self, sock: socket.socket, frame: memoryview) -> int:
        """Receive straight into the large frame being filled; the bytes received
        (0: the peer closed, handled here). May raise as ``recv_into`` does."""
        n = sock.recv_into(frame[self._fpos :])
        if n == 0:
            self._on_eof()
            return 0
        self._fpos += n
        self._parse()
        return n

    def _recv_buffered(self, sock: socket.socket) -> int:
        """Receive into the buffer after its unparsed bytes and parse; the bytes
        received (0: the peer closed, handled here). May raise as ``recv_into`` does
        (``BlockingIOError``: nothing was there)."""
        n = sock.recv_into(self._mv[self._end :])
        if n == 0:
            self._on_eof()
            return 0
        self._end += n
        self._parse()
        return n

    def _recv_buffered_nowait(self, sock: socket.socket) -> int:
        """:meth:`_recv_buffered` through the compiled read: -1, not an exception, when
        nothing was there. Raises ``OSError`` as ``recv_into`` does otherwise."""
        n = _recv_nowait(self._fd, self._buf, self._end)  # type: ignore[misc]
        if n <= 0:
            if n == 0:
                self._on_eof()
            return n
        self._end += n
        self._parse()
        return n

    # The plain link's reads: from its socket's descriptor, which stays open (and cannot
    # be reused by another socket) until abort() has set _dead. The TLS link reads
    # through its SSL object, with _recv_buffered.
    _read_buffered = _recv_buffered_nowait if ACCELERATED else _recv_buffered

    def _make_room(self) -> None:
        """Empty the receive buffer, or move its unparsed tail (at most one partial
        header) to the front when too little room is left after it."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < DIRECT_MIN:
            pending = self._end - self._start
            self._mv[:pending] = self._mv[self._start : self._end]
            self._start, self._end = 0, pending

    def _set_lowat(self, n: int) -> None:
        if n != self._lowat:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n

    def _parse(self) -> None:
        """Dispatch every whole message in the buffer; keep the partial one's state."""
        self.heard = True  # bytes arrived: the heartbeat's sign of life
        buf = self._buf
        ep = self._ep
        while not self._dead:
            start = self._start
            avail = self._end - start
            if self._state == 0:
                if avail < _PREFIX_SIZE:
                    return
                if avail >= _ONE_FRAME_SIZE:
                    # Fast path: a whole small DATA message of one frame, one unpack.
                    raw, nframes, cid, n = _ONE_FRAME_HEADER.unpack_from(buf, start)
                    if (
                        raw == _DATA
                        and nframes == 1
                        and n <= avail - _ONE_FRAME_SIZE
                        and n < DIRECT_MIN
                        and n <= self._max_message
                    ):
                        start += _ONE_FRAME_SIZE
                        self._start = start + n
                        ep._on_data(self, cid, [memoryview(buf[start : start + n])])
                        continue
                kind, nframes, cid = parse_prefix(buf, max_frames=MAX_FRAMES, offset=start)
                start += _PREFIX_SIZE
                self._start = start
                if nframes == 0:
                    if kind is Kind.DATA:
                        ep._on_data(self, cid, [])
                    elif kind is Kind.OPEN:
                        ep._on_open(self, cid)
                    elif kind is Kind.CLOSE:
                        ep._on_close(self, cid)
                    # A TICK only proves life, which reading it did (``heard``).
                    continue
                self._nframes, self._cid = nframes, cid
                self._state = 1
                avail -= _PREFIX_SIZE
            if self._state == 1:
                nframes = self._nframes
                need = 8 * nframes
                if avail < need:
                    return
                lengths = parse_lengths(buf, nframes, max_message=self._max_message, offset=start)
                start += need
                avail -= need
                total = sum(lengths)
                if total <= avail and total < DIRECT_MIN:
                    # The whole (small) message is here: slice its frames out.
                    frames = []
                    for n in lengths:
                        frames.append(memoryview(buf[start : start + n]))
                        start += n
                    self._start = start
                    self._state = 0
                    ep._on_data(self, self._cid, frames)
                    continue
                self._start = start
                alloc = self._pool.get
                self._frames = [alloc(n) if n >= DIRECT_MIN else _alloc(n) for n in lengths]
                self._fi = self._fpos = 0
                self._state = 2
            mv = self._mv
            frames = self._frames
            nframes = self._nframes
            while self._fi < nframes:
                frame = frames[self._fi]
                take = min(len(frame) - self._fpos, self._end - self._start)
                if take > 0:
                    frame[self._fpos : self._fpos + take] = mv[self._start : self._start + take]
                    self._start += take
                    self._fpos += take
                if self._fpos < len(frame):
                    return
                self._fi += 1
                self._fpos = 0
            self._state = 0
            self._frames = []
            ep._on_data(self, self._cid, frames)

    def _on_eof(self) -> None:
        if not self._eof.done():
            self._eof.set_result(None)
        if self._state != 0 or self._start != self._end:
            self._bad_peer("connection closed in the middle of a message (truncated frame)")
        else:
            self.fail("peer closed the link")

    def _bad_peer(self, reason: str) -> None:
        if self._dead:
            return
        if self.alive:
            log.warning("tcp: dropping peer %s (%r): %s", self._peer, bytes(self.remote), reason)
        self.fail(f"protocol violation: {reason}")

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        if self._dead:
            return
        if self._wq:
            self._drained = self._loop.create_future()
            await self._drained
        if self._dead:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        # The peer closes its side on our end-of-stream; reading until then (and
        # discarding, as the link is no longer alive) avoids a reset that could
        # destroy data the peer has not read yet.
        await self._eof
        self.abort()

    def abort(self) -> None:
        if self._dead:
            return
        self._dead = True
        if self._counted_pid:
            self._ep._idle_poller().crowding.peer_unlinked(self._counted_pid)
            self._counted_pid = 0
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._sock.close()
        error = ConnectionError(f"link to {self.remote!r} is down")
        for entry in self._wq:
            if entry.fut is not None and not entry.fut.done():
                entry.fut.set_exception(error)
                entry.fut.exception()  # the sender may have been cancelled
        self._wq.clear()
        for fut in (self._drained, self._eof):
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._frames = []


# ---------------------------------------------------------------------------- TLS
#
# With TLS on, a link's socket is an ssl.SSLSocket (non-blocking, TLS 1.3, see
# hpcproc.tls), driven from the event loop like the plain one. The plain fast paths
# above stay as they are; the TLS link overrides what differs: an SSLSocket has no
# sendmsg (small pieces are joined into one TLS record, a large frame is encrypted
# straight from the caller's buffer), "would block" is SSLWantRead/WriteError, one
# recv_into returns at most one TLS record (16 KiB; a large frame is still decrypted
# straight into its own buffer), and decrypted bytes may wait inside the TLS object
# where no readiness event reports them, so reading goes on until the TLS layer says
# it needs more from the socket.

#: Small pieces (headers, small frames) joined into one TLS record up to this size.
_TLS_JOIN = 64 * 1024
#: Bound on TLS records read per readiness callback (16 KiB each: 16 MiB).
_TLS_READS_PER_WAKEUP = 1024
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


def _show(address: EndPointAddress) -> str:
    return bytes(address).decode("ascii", "replace")


class _TlsRefused(HandshakeError):
    """The TLS handshake failed (message from :func:`~hpcproc.tls.describe_tls_error`)."""


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _tls_io(sock: ssl.SSLSocket, op: Callable[[], _R]) -> _R:
    """Run ``op`` on the non-blocking TLS socket, waiting whenever TLS needs to."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return op()
        except ssl.SSLWantReadError:
            await _wait_fd(loop, sock.fileno(), writable=False)
        except ssl.SSLWantWriteError:
            await _wait_fd(loop, sock.fileno(), writable=True)


async def _tls_handshake(sock: ssl.SSLSocket, peer: str) -> None:
    """The TLS handshake; a failure raises :class:`_TlsRefused` naming why."""
    try:
        await _tls_io(sock, sock.do_handshake)
    except OSError as exc:  # ssl.SSLError included
        raise _TlsRefused(describe_tls_error(exc, peer)) from exc


class _TlsChannel(_SocketChannel):
    """A TLS socket during the cookie handshake, which runs inside TLS.

    The dialer passes a socket whose TLS handshake it completed (in ``_open_channel``,
    under the connect timeout); the acceptor passes the accepted plain socket and its
    context, and the TLS handshake runs before the first read, so under the handshake
    timeout. A plain hpcproc peer is recognised by its first bytes and answered with a
    TLS alert, which it reports (see ``_SocketChannel.recv``).
    """

    _sock: ssl.SSLSocket

    def __init__(
        self,
        transport: TcpTransport,
        sock: socket.socket,
        remote: EndPointAddress | None = None,
        *,
        server: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(transport, sock, remote)
        self._server = server

    async def _secure(self) -> None:
        if self._server is None:
            return
        raw: socket.socket = self._sock
        await _wait_fd(self._loop, raw.fileno(), writable=False)
        if raw.recv(len(_MAGIC), socket.MSG_PEEK) == _MAGIC:
            # Read what it sent first, so that closing does not reset the alert away.
            with contextlib.suppress(OSError):
                raw.recv(1 << 16)
                raw.send(_TLS_PROTOCOL_ALERT)
                raw.shutdown(socket.SHUT_WR)
            raise HandshakeError(
                "the peer speaks plain tcp and this endpoint requires TLS (start every rank"
                " with --tls, or none)"
            )
        self._sock = self._server.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self._server = None
        await _tls_handshake(self._sock, "the peer")

    async def send(self, data: bytes) -> None:
        await self._secure()
        sock = self._sock
        view = memoryview(data)
        try:
            while view:
                view = view[await _tls_io(sock, functools.partial(sock.send, view)) :]
        except ssl.SSLError as exc:
            raise _TlsRefused(describe_tls_error(exc, self._who())) from exc

    async def recv(self, n: int) -> bytes:
        await self._secure()
        sock = self._sock
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        try:
            while pos < n:
                got = await _tls_io(sock, functools.partial(sock.recv_into, view[pos:], n - pos))
                if got == 0:
                    raise HandshakeError(f"connection closed after {pos} of {n} handshake bytes")
                pos += got
        except ssl.SSLError as exc:
            raise _TlsRefused(describe_tls_error(exc, self._who())) from exc
        return bytes(buf)

    def _who(self) -> str:
        return "the peer" if self._remote is None else _show(self._remote)

    def link(self, endpoint: _TcpEndPoint, remote: EndPointAddress, peer_extra: bytes) -> Link:
        return _TlsLink(
            endpoint, remote, self._sock, self._transport._max_message, _same_host_pid(peer_extra)
        )

    def dial_error(self, exc: Exception, *, answered: bool) -> ConnectError | None:
        if isinstance(exc, _TlsRefused):
            log.warning("tcp: %s", exc)
            return ConnectError(ConnectErrorCode.FAILED, str(exc))
        return super().dial_error(exc, answered=answered)


class _TlsLink(_TcpLink):
    """A :class:`_TcpLink` over TLS (see the section comment above)."""

    _sock: ssl.SSLSocket

    def start(self, first: bytes = b"") -> None:
        super().start(first)
        # The cookie handshake's reads may have left link bytes inside the TLS object.
        self._loop.call_soon(self._on_readable)

    def _tls_send(self, data: Buffer) -> int:
        try:
            return self._sock.send(data)
        except _WOULD_BLOCK:
            return 0

    def _push(self, view: memoryview, fut: asyncio.Future[None] | None) -> None:
        self._wq.append(_Write([view], fut))
        self._on_writable()
        if self._wq:
            self._want_write()

    def send_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        if self._dead or self._wq or len(frames) != 1:
            return False
        view = as_bytes_view(frames[0])
        if len(view) > _SEND_NOW_MAX:
            return False
        # One record; what TLS does not take at once is queued as a copy.
        self._push(
            memoryview(_ONE_FRAME_HEADER.pack(Kind.DATA, 1, conn_id, len(view)) + view), None
        )
        return True

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        if self._dead:
            raise ConnectionError(f"link to {self.remote!r} is down")
        views = [as_bytes_view(frame) for frame in frames]
        lengths = [len(v) for v in views]
        total = sum(lengths)
        if len(views) > MAX_FRAMES or total > self._max_message:
            raise SendError(
                SendErrorCode.FAILED,
                f"message of {len(views)} frames / {total} bytes exceeds the limits "
                f"({MAX_FRAMES} frames, {self._max_message} bytes); nothing was sent",
            )
        entry = _Write([encode_header(Kind.DATA, conn_id, lengths), *views], None)
        self._wq.append(entry)
        self._on_writable()
        if entry.index == len(entry.bufs):
            return
        entry.fut = self._loop.create_future()
        self._want_write()
        try:
            await entry.fut
        except asyncio.CancelledError:
            if not entry.fut.done() and not self._dead:
                entry.detach()  # the message must still go out whole
            raise

    def _on_writable(self) -> None:
        wq = self._wq
        while wq and not self._dead:
            # The next piece: a large buffer as it is, else small ones joined (the
            # same bytes from the same place if TLS asks for a retry, as it requires).
            first = wq[0].bufs[wq[0].index]
            data: Buffer = first
            if len(first) < _TLS_JOIN:  # type: ignore[arg-type]
                pieces: list[Buffer] = []
                size = 0
                for entry in wq:
                    for buf in entry.bufs[entry.index :]:
                        n = len(buf)  # type: ignore[arg-type]
                        if pieces and (size + n > _TLS_JOIN or n >= _TLS_JOIN):
                            break
                        pieces.append(buf)
                        size += n
                    else:
                        continue
                    break
                if len(pieces) > 1:
                    data = b"".join(pieces)  # type: ignore[arg-type]
            try:
                sent = self._sock.send(data)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self.fail(f"send failed: {exc}")
                return
            self._sent(sent)
        self._writes_done()

    def _on_readable(self) -> None:
        sock = self._sock
        try:
            for _ in range(_TLS_READS_PER_WAKEUP):
                if self._dead:
                    return
                if self._state == 2 and self._start == self._end:
                    frame = self._frames[self._fi]
                    if len(frame) - self._fpos >= DIRECT_MIN:
                        if self._recv_frame(sock, frame) == 0:
                            return
                        continue
                self._make_room()
                if self._recv_buffered(sock) == 0:
                    return
            if not self._dead and sock.pending():
                self._loop.call_soon(self._on_readable)
        except _WOULD_BLOCK:
            return
        except WireError as exc:
            self._bad_peer(str(exc))
        except ssl.SSLError as exc:
            self.fail(f"TLS error: {exc}")
        except OSError as exc:
            self.fail(f"receive failed: {exc}")

    async def close(self) -> None:
        if self._dead:
            return
        if self._wq:
            self._drained = self._loop.create_future()
            await self._drained
        if self._dead:
            return
        # The socket's own shutdown (SSLSocket.shutdown would drop the TLS state that
        # the reads until end-of-stream below still need); see _TcpLink.close.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        await self._eof
        self.abort()


#: Instance ids of the live transports of this process (see ``_TcpLink._in_process``).
_LOCAL_INSTANCES: set[bytes] = set()


def _instance_of(address: bytes) -> bytes | None:
    try:
        return parse_address(address).instance
    except ValueError:
        return None


class _TcpEndPoint(DialingEndPoint["TcpTransport"]):
    _poller: IdlePoller | None = None
    #: :meth:`_looker`'s answer, and the links it was made for.
    _looks: tuple[list[Link], Callable[[], None] | None] | None = None
    _hands_over = True  # its polls end on a message handed over (see _poll_links)

    #: :meth:`_poll_step`'s answer, and the links it was made for.
    _steps: tuple[list[Link], Callable[[], bool]] | None = None

    async def receive(self) -> Event:
        """See :meth:`EndPoint.receive`; may first poll the links (module docstring)."""
        return await self._idle_poller().receive(self._events, self._poll_step())

    def _poll_idle(self) -> bool:
        poller = self._poller or self._idle_poller()
        return poller.poll_now(self._events, self._poll_step())

    def _poll_step(self) -> Callable[[], bool]:
        """A poll's turn: :meth:`_poll_links`; for one plain link where the compiled
        module is built, its ``Reader``, which does the same with the common case (the
        link waits for the next message, and one-frame messages arrive: a large frame's
        rest is received straight into it for up to ``busy_poll_us``) in C; for several
        plain links, :meth:`_look_links`, which reads only the readable ones. Made once
        per set of links."""
        links = self._polled or self._polled_links()
        steps = self._steps
        if steps is not None and steps[0] is links:
            return steps[1]
        step: Callable[[], bool] = self._poll_links
        if _Reader is not None and len(links) == 1 and type(links[0]) is _TcpLink:
            # (Its wait for a large frame's rest is bounded to a minute, as it takes it.)
            wait = min(self._transport._busy_poll_us * 1e-6, 60.0)
            step = _Reader(links[0], self, wait)
        elif len(links) > 1 and self._looker() is not None:
            # A read of every link per turn is a system call each, most of them
            # EAGAIN: with 63 idle links beside the one that answers, an 8 B round
            # trip took 44.5-45.4 us against 8.9 with none (closing note).
            step = self._look_links
        self._steps = (links, step)
        return step

    def _idle_poller(self) -> IdlePoller:
        poller = self._poller
        if poller is None:
            poller = self._poller = IdlePoller(
                asyncio.get_running_loop(), self._transport._busy_poll_us, yields=self._yield_polls
            )
            poller.yield_look = self._look_links
        return poller

    def _pollable(self, link: Link) -> bool:
        return (type(link) is _TcpLink or type(link) is _TlsLink) and not link._in_process

    def _looker(self) -> Callable[[], object] | None:
        """See :meth:`MultiplexedEndPoint._looker`: one ``poll(2)`` of the links'
        sockets, then a read of those that are readable (rather than a read of every
        link, most of which fail with ``EAGAIN``: a system call each). None with a
        TLS link, whose decrypted records wait in user space, where ``poll(2)`` does
        not see them. Made once per set of links."""
        links = self._polled or self._polled_links()  # the cache read here: a call less
        looks = self._looks
        if looks is not None and looks[0] is links:
            return looks[1]
        look: Callable[[], None] | None = None
        if all(type(link) is _TcpLink for link in links):
            # (Not epoll, whose look costs the same with any number of sockets, 0.22
            # us against 0.28-2.74 for poll(2) with 1-64: its round trips were 0.5-1
            # us slower with 2-6 links, and no faster with 64.)
            fds = select.poll()
            by_fd: dict[int, _TcpLink] = {}
            for link in links:
                fd = cast(_TcpLink, link)._sock.fileno()
                if fd >= 0:
                    fds.register(fd, select.POLLIN)
                    by_fd[fd] = cast(_TcpLink, link)
            ready = fds.poll

            def look() -> None:
                for fd, _ in ready(0):
                    link = by_fd.get(fd)
                    if link is not None and not link._dead:
                        link._on_readable()

        self._looks = (links, look)
        return look

    def _look_links(self) -> bool:
        """:meth:`_poll_links` through :meth:`_looker` (for a poll that yields: many
        looks that find nothing)."""
        look = self._looker()
        if look is None:
            return self._poll_links()
        if not self._polled:
            return False
        handed_over = self._handed_over
        look()
        return self._handed_over == handed_over

    def _poll_links(self) -> bool:
        """Read what the links hold; False when there was nothing to poll, or a
        message went to a receiver (which ends a poll as an event does)."""
        polled = False
        handed_over = self._handed_over
        link: _TcpLink
        links = self._polled
        for link in links if links is not None else self._polled_links():  # type: ignore[assignment]
            if not link._dead:
                link._on_readable()
                polled = True
        return polled and self._handed_over == handed_over

    async def _open_channel(self, remote: EndPointAddress, target: TcpAddress) -> _SocketChannel:
        family, proto, sockaddr = await resolve(target)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
        except OSError as exc:
            raise _connect_error(exc, remote) from exc
        try:
            _tune(sock)
            try:
                await asyncio.get_running_loop().sock_connect(sock, sockaddr)
            except OSError as exc:
                raise _connect_error(exc, remote) from exc
        except BaseException:
            sock.close()
            raise
        tls = self._transport._tls_client
        if tls is None:
            return _SocketChannel(self._transport, sock, remote)
        return await _secure_dial(self._transport, tls, sock, remote)


async def _secure_dial(
    transport: TcpTransport, context: ssl.SSLContext, sock: socket.socket, remote: EndPointAddress
) -> _TlsChannel:
    """Wrap a connected socket in TLS and run the TLS handshake as the client.

    Raises:
        ConnectError: ``FAILED``, naming why TLS failed (also logged).
    """
    try:
        tls = context.wrap_socket(sock, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        await _tls_handshake(tls, _show(remote))
    except _TlsRefused as exc:
        tls.close()
        log.warning("tcp: %s", exc)
        raise ConnectError(ConnectErrorCode.FAILED, str(exc)) from exc.__cause__
    except BaseException:
        tls.close()
        raise
    return _TlsChannel(transport, tls, remote)


def _connect_error(exc: OSError, remote: EndPointAddress) -> ConnectError:
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(ConnectErrorCode.NOT_FOUND, f"nothing listens at {remote!r}")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        return ConnectError(ConnectErrorCode.INSUFFICIENT_RESOURCES, f"{exc} ({remote!r})")
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET):
        return ConnectError(ConnectErrorCode.NOT_FOUND, f"{exc} ({remote!r})")
    return ConnectError(ConnectErrorCode.FAILED, f"connect to {remote!r} failed: {exc}")


class TcpTransport(DialingTransport[_TcpEndPoint]):
    """Endpoints reachable over TCP; see the module docstring for the protocol.

    Args:
        host: interface to bind (default loopback).
        port: port to bind (0: any free port).
        advertised_host: host name or address peers should dial (default: ``host``,
            or this machine's name when ``host`` is a wildcard).
        max_message: largest message (sum of frames) accepted from or sent to a peer.
        connect_timeout: bound on ``connect`` when the caller gives no timeout.
        handshake_timeout: a peer that has not finished authenticating by then is
            dropped.
        cookie: the shared secret; default :func:`~hpcproc.auth.load_cookie`.
        busy_poll_us: how long ``receive`` may poll the sockets in place while the
            event loop is idle (0 disables; see the module docstring).
        tls: mutual TLS on every link (:mod:`hpcproc.tls`): ``True`` finds this node's
            files from ``tls_cert`` / ``tls_key`` / ``tls_ca`` / ``tls_dir`` or the
            ``HPCPROC_TLS_*`` variables, or pass a :class:`~hpcproc.tls.TlsConfig`.
            Giving any ``tls_*`` option turns TLS on too. A TLS endpoint and a plain
            one refuse each other (both sides say so).
        tls_cert, tls_key, tls_ca, tls_dir: paths, see :func:`hpcproc.tls.tls_config`.
        tick: heartbeat period in seconds (default ``HPCPROC_TICK``, else 15; 0: off).
            An idle link carries a 16-byte ``TICK`` every tick; a peer from which
            nothing arrived for 4 ticks is lost (``CONNECTION_LOST``): this is what
            detects a partition or a hung host, which close no socket. See
            :mod:`~hpcproc.transports._multiplex`.

    Raises:
        CookieError: no cookie was given and the cookie file is unsafe or unusable.
        TlsError: TLS is asked for and its files are missing or do not load.
        ValueError: ``tick`` (or ``HPCPROC_TICK``) is not a number of seconds >= 0.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertised_host: str | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        connect_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        cookie: bytes | str | None = None,
        busy_poll_us: float = 100.0,
        tls: bool | TlsConfig = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        tls_dir: str | None = None,
        tick: float | None = None,
    ) -> None:
        check_budget(busy_poll_us)
        if not isinstance(tls, TlsConfig) and (tls or tls_cert or tls_key or tls_ca or tls_dir):
            tls = tls_config(cert=tls_cert, key=tls_key, ca=tls_ca, directory=tls_dir)
        #: This node's TLS files, or ``None`` without TLS.
        self.tls = tls if isinstance(tls, TlsConfig) else None
        self._tls_client = None if self.tls is None else self.tls.client_context()
        self._tls_server = None if self.tls is None else self.tls.server_context()
        super().__init__(
            _FORMAT,
            cookie=cookie,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
        )
        self._tick = tick_period(tick)
        self._host = host
        self._port = port
        if advertised_host is None:
            advertised_host = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        self._advertised = advertised_host
        self._max_message = max_message
        self._busy_poll_us = busy_poll_us
        _LOCAL_INSTANCES.add(self._instance)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._pool = _FramePool()

    @property
    def port(self) -> int | None:
        """The bound port, once the first endpoint exists."""
        return self._listener.getsockname()[1] if self._listener is not None else None

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        if self._listener is None:
            self._listen()
        assert self._listener is not None
        return self._new_dialing_endpoint(
            self._advertised,
            self.port or 0,
            lambda address, endpoint_id: _TcpEndPoint(self, address, endpoint_id),
        )

    def _listen(self) -> None:
        try:
            infos = socket.getaddrinfo(
                self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
        except OSError as exc:
            raise NewEndPointError(
                NewEndPointErrorCode.FAILED, f"cannot listen on {self._host}: {exc}"
            ) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            code = (
                NewEndPointErrorCode.INSUFFICIENT_RESOURCES
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EADDRINUSE)
                else NewEndPointErrorCode.FAILED
            )
            raise NewEndPointError(
                code, f"cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc
        self._listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, listener: socket.socket) -> None:
        # Not loop.sock_accept: its reader callback (CPython 3.11) accepts even when the
        # future it answers was cancelled in the same loop pass (this loop cancelled as
        # the transport closes), and fails on that future: InvalidStateError, logged
        # with a traceback, and the accepted socket leaks (seen when a job ended on a
        # signal; tests/test_tcp.py). Waiting for readability and accepting here keeps
        # the accept in this task, which a cancel stops before or after it, not during.
        loop = asyncio.get_running_loop()
        fd = listener.fileno()
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                await _wait_fd(loop, fd, writable=False)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("tcp: cannot accept connections: %s", exc)
                    await asyncio.sleep(0.1)  # out of descriptors: let some close
                    continue
                log.warning("tcp: listener failed: %s", exc)
                return
            try:
                _tune(sock)
            except OSError as exc:
                log.warning("tcp: dropping peer %s: %s", _peer_name(sock), exc)
                sock.close()
                continue
            if self._tls_server is None:
                self._admit(_SocketChannel(self, sock))
            else:
                self._admit(_TlsChannel(self, sock, server=self._tls_server))

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        _LOCAL_INSTANCES.discard(self._instance)
        self._pool.close()
        accepting = () if self._accept_task is None else (self._accept_task,)
        await self._cancel_handshakes(*accepting)
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def create_transport(**options: object) -> TcpTransport:
    """Registry factory for ``tcp``; ``options`` are :class:`TcpTransport`'s arguments."""
    return TcpTransport(**options)  # type: ignore[arg-type]
