"""Shared-memory transport: endpoints on one host, linked through ``memfd`` mappings.

Design
------
Each endpoint listens on a Unix ``SOCK_SEQPACKET`` socket in the abstract namespace
(nothing appears in the file system or in ``/dev/shm``). A link between two endpoints
is one such socket plus two rings (:mod:`hpcproc.transports._shm_ring`), one per
direction; each side creates the ring it writes to with ``memfd_create``, seals its
size and passes the descriptor over the socket (``SCM_RIGHTS``).

* Frames smaller than ``inline_threshold`` are copied into the ring and out again on
  the receiving side (two small copies cost less than mapping anything).
* Larger frames (and every frame of a message too big for the ring) are copied once
  into a *segment*: a sealed ``memfd`` from the sender's per-link pool, passed to the
  receiver once and mapped by it for the life of the link. The receiver gets writable
  memoryviews over the segment itself, so a numpy array is copied exactly once end to
  end. The segment returns to the sender's pool when the receiver has dropped every
  view of that message (a finalizer on the numpy array the views are cut from clears
  the segment's busy bit); until then the sender uses another one. The busy word
  counts the segment's uses, so the sender can tell a segment the receiver handed back
  from one whose word something else cleared: it then drops the link rather than
  write over a message the receiver may still hold. The pools of an
  endpoint's links hold at most ``max_pool_bytes`` together (``HPCPROC_SHM_POOL_BYTES``,
  default 256 MiB) and ``max_pool_segments`` per link; beyond that a one-shot segment
  is used, which the kernel frees once the receiver's views are gone. A pooled
  segment unused for ``pool_idle_s`` (``HPCPROC_POOL_IDLE_S``, default 5 s) is
  dropped on both sides (:mod:`~hpcproc.transports._idle_pool`: one timer per
  endpoint, not per message), so memory returns to the system once messages stop.
* The socket carries only wake-ups, segment descriptors and the handshake. A consumer
  polls its rings from the event loop for up to twice ``busy_poll_us`` after the
  last message (a callback that re-schedules itself: the loop keeps running), then
  announces that it sleeps; producers write one wake-up byte only then.
* ``receive`` on an empty queue polls the rings in place for up to ``busy_poll_us``
  when no other callback is ready, so that a reply is taken without a trip through
  the event loop (epoll, a future, a task switch), which is most of the cost of a
  small round trip from asyncio (:mod:`~hpcproc.transports._busy_poll`: fair, off
  when the CPUs are oversubscribed, on the standard event loop only). Both polls
  adapt their budget the same way: it shrinks when they run out (a busy machine, an
  idle peer) and grows back when a message comes soon after.
* The socket is the death detector: it closes when the peer process exits, even by
  ``SIGKILL``. The survivor drains what the peer published, reports
  ``CONNECTION_LOST`` and drops its mappings; the kernel frees the memory when the
  last mapping goes. A peer that hangs (stopped, or its event loop blocked) closes
  nothing: heartbeats (:mod:`._multiplex`) report it. A link idle for a tick carries
  a ``TICK`` record in its ring (skipped when records wait for ring space), and a
  link from which no record arrived for 4 ticks is lost.
* Peers must run under the same user id: the acceptor reads the dialer's credentials
  from the socket (``SO_PEERCRED``) and refuses and logs any other uid, and the
  dialer checks the acceptor's likewise (:class:`ConnectError` naming both uids).
  No cookie is needed: a process of the same user could read the cookie file
  anyway, and the memfds are only passed over the authenticated socket.
* A child made by ``fork`` shares its parent's rings and segments: it must not use
  the parent's endpoints. Received messages it inherits are its copies: dropping
  them hands nothing back (the parent may still hold them).

Addresses are ``b"shm:<hostname>:<boot id>:<socket name>"``; connecting to an address
of another host (or another boot) fails with ``ConnectError(NOT_FOUND)``.

Linux only (``memfd_create``, abstract Unix sockets). Memory ordering relies on a
full barrier (see :mod:`~hpcproc.transports._shm_ring`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import socket
import struct
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, cast

import numpy as np

if not sys.platform.startswith("linux"):
    raise ImportError("the shm transport needs Linux (memfd_create, abstract Unix sockets)")

from ._busy_poll import LATE, PROBE_MIN, Budget, IdlePoller, check_budget
from ._dialing import CROSS_WAIT, CrossedConnects
from ._idle_pool import IdleTrimmer, env_bytes, idle_seconds
from ._multiplex import (
    Kind,
    Link,
    MultiplexedEndPoint,
    MultiplexedTransport,
    OutgoingConnection,
    _new_object,
    _set_received_conn_id,
    _set_received_frames,
    _State,
)
from ._shm_ring import HEAD_WORD as _HEAD_WORD
from ._shm_ring import (
    HEADER_SIZE,
    OUT_OF_LINE,
    REC,
    SEGREF,
    RingError,
    RingReader,
    RingWriter,
    check_ring,
    init_ring,
)
from .base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    EndPoint,
    EndPointAddress,
    EndPointClosed,
    Event,
    NewEndPointError,
    NewEndPointErrorCode,
    Received,
    SendError,
    SendErrorCode,
)

__all__ = ["DEFAULT_INLINE_THRESHOLD", "ShmTransport", "address_host", "create_transport"]

log = logging.getLogger("hpcproc.transports.shm")

_PREFIX = b"shm:"
_VERSION = 2  # 2: the segment busy word counts uses
#: Bound on an incoming handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Bytes before a segment's data: the busy word (see _TxSegment).
SEG_HEADER = 64
#: Frames below this go through the ring (copied in and out), larger ones through a
#: segment (copied once). Measured here (bench transport, quiet, against mpi4py): with
#: 8 KiB a 32 KiB round trip took 1.67-1.78x mpi4py's, with 64 KiB 1.29-1.30x, larger
#: sizes alike (0.9-1.1x) either way; 128 KiB gave nothing more.
DEFAULT_INLINE_THRESHOLD = 64 * 1024
_SEG_ALIGN = 64
_SEG_GRANULE = 1 << 20
#: The links poll their rings (through the loop) this many ``busy_poll_us`` at most.
_SPIN_FACTOR = 2
#: ... and at least this long (s).
_SPIN_MIN = 10e-6

_MSG_WAKE = b"W"
_MSG_SPACE = b"S"
_NEWSEG = struct.Struct("<cxxxxxxxQQQ")  # b"N", seg_id, size, oneshot
_DROPSEG = struct.Struct("<cxxxxxxxQ")  # b"D", seg_id
_HELLO = struct.Struct("<cxxxI")  # b"H" (or b"R": replace), version; then the address
_HELLO_NEW = b"H"
#: The dialer holds no link to the acceptor, so the acceptor's live link is stale.
_HELLO_REPLACE = b"R"
_WELCOME = b"A"
#: Both sides are dialing and the acceptor's address is smaller: its link wins.
_REJECT_CROSSED = b"RX"
#: The acceptor already holds a live link from or to the dialer (a crossed connect
#: that completed first); the dialer uses that link, or replaces it if it has none.
_REJECT_LIVE = b"RL"
_REJECT_CLOSED = b"RC"
#: Why a link went down when its peer's end of the socket closed (EOF, or a reset).
_PEER_CLOSED = "peer closed the link or died"
_PEERCRED = struct.Struct("3i")
_MAX_MSG = 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_NAME_RE = re.compile(rb"[A-Za-z0-9._-]{1,100}")


# --------------------------------------------------------------------------- host, memfd


@lru_cache(maxsize=1)
def _host_identity() -> tuple[bytes, bytes]:
    """(hostname, boot id): together they name one running kernel."""
    host = socket.gethostname().encode().replace(b":", b"_") or b"localhost"
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = b"unknown-boot"
    return host, boot


def _parse_address(address: bytes) -> tuple[bytes, bytes, bytes]:
    parts = address.split(b":")
    if (
        len(parts) != 4
        or parts[0] + b":" != _PREFIX
        or not parts[1]
        or not parts[2]
        or not _NAME_RE.fullmatch(parts[3])
    ):
        raise ConnectError(ConnectErrorCode.FAILED, f"not a shared-memory address: {address!r}")
    return parts[1], parts[2], parts[3]


def address_host(address: bytes) -> tuple[str, str]:
    """(hostname, boot id) of the host whose endpoint ``address`` is.

    Two endpoints can be linked only when these are equal: ranks on different hosts
    may still share a file system (and so ``/dev/shm``), which proves nothing.

    Raises:
        ConnectError: ``FAILED``, ``address`` is not a shared-memory address.
    """
    host, boot, _ = _parse_address(bytes(address))
    return host.decode(errors="replace"), boot.decode(errors="replace")


def _new_memfd(name: str, size: int, *, populate: bool) -> tuple[mmap.mmap, int]:
    """A sealed (fixed-size) anonymous shared file of ``size`` bytes: (mapping, fd).

    The caller closes ``fd`` once it has passed it to the peer; the mapping stays.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        return mmap.mmap(fd, size, flags=flags), fd
    except BaseException:
        os.close(fd)
        raise


def _map_peer_memfd(fd: int, size: int | None, *, populate: bool) -> mmap.mmap:
    """Map a descriptor a peer passed; it must be sealed against shrinking.

    Without the seal the peer could truncate the file and make this process fault
    (SIGBUS) when it reads. Raises :class:`RingError` for a bad descriptor.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        actual = os.fstat(fd).st_size
    except OSError as exc:
        raise RingError(f"peer passed an unusable descriptor: {exc}") from exc
    if not seals & fcntl.F_SEAL_SHRINK:
        raise RingError("peer passed a shared file that is not sealed against shrinking")
    if size is not None and actual != size:
        raise RingError(f"peer's shared file has {actual} bytes, announced {size}")
    if actual <= 0:
        raise RingError("peer passed an empty shared file")
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(fd, actual, flags=flags)


def _send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors passed with it (non-blocking)."""
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MSG, _FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return data, fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _recv_async(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Wait for one message on a non-blocking socket (handshake only)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[bytes, list[int]]] = loop.create_future()

    def ready() -> None:
        if fut.done():
            return
        try:
            fut.set_result(_recv(sock))
        except BlockingIOError:
            pass
        except OSError as exc:
            fut.set_exception(exc)

    loop.add_reader(sock.fileno(), ready)
    try:
        result = await fut
    except BaseException:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            _close_fds(fut.result()[1])
        raise
    finally:
        loop.remove_reader(sock.fileno())
    return result


def _peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return int(pid)


def _other_user(sock: socket.socket) -> str | None:
    """Why the socket's peer may not link with us (another user), or None."""
    pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    mine = os.getuid()
    if uid == mine:
        return None
    return (
        f"it runs as another user (pid {pid}, uid {uid}; this process: uid {mine}); the"
        " shm transport links processes of one Unix user only (checked with SO_PEERCRED):"
        " run every rank as the same user, or use tcp"
    )


def _as_bytes(frame: Buffer) -> memoryview:
    view = frame if type(frame) is memoryview else memoryview(frame)  # type: ignore[arg-type]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    elif not view.contiguous:
        view = memoryview(view.tobytes())
    return view


# --------------------------------------------------------------------------- segments


#: The busy word's use count wraps to 1 after this (see _TxSegment).
_MAX_USE = (1 << 31) - 1
#: This process. A child made by ``fork`` inherits the segments' mappings and the
#: receivers' :class:`_RxSegment` objects, with the callbacks that hand a segment
#: back: the child dropping its copy of a message must not hand the segment back
#: while this process still holds the message (the sender would write over it).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _busy_word(mm: mmap.mmap) -> memoryview:
    """The segment's busy word, as a one-item view that reads and writes it whole.

    The word has one writer at a time: the sender sets it before it hands the segment
    over, the receiver clears its busy bit when done (see :class:`_TxSegment`). The
    other process reads the word while this one writes it, so a write must be
    one store. ``struct.pack_into`` is not: it zero-fills its bytes, then writes the
    value, and a reader in another process saw 0 in about 1 % of its reads. A
    receiver's release (zero-fill, then the cleared word) could so show "free"
    between its two stores; the sender took the segment and marked it busy; the
    release's second store then wiped that mark, and the sender later wrote over a
    message the receiver still held (seen twice in about 260 stress jobs).
    """
    return memoryview(mm)[:4].cast("I")


class _TxSegment:
    """A segment of the sender's pool.

    Its busy word is ``use << 1 | 1`` while the receiver holds the message of the
    segment's ``use``-th use (1, 2, ...), and ``use << 1`` once the receiver has
    handed it back. Any other value means that something other than the two sides'
    protocol wrote it (or that the sender's mapping no longer shows the shared
    memory): :meth:`is_free` raises :class:`RingError` then, instead of calling the
    segment free and writing over a message the receiver may still hold. (A plain
    0/1 flag cannot tell a foreign zero from a release.)
    """

    __slots__ = ("mm", "seg_id", "size", "use", "used", "view", "word")

    def __init__(self, seg_id: int, mm: mmap.mmap, size: int) -> None:
        self.seg_id = seg_id
        self.size = size
        self.mm = mm
        self.view = memoryview(mm)
        self.word = _busy_word(mm)
        #: How many messages went through it (wrapping; its busy word's upper bits).
        self.use = 0
        #: When a message last went through it (``time.monotonic``).
        self.used = time.monotonic()

    def is_free(self) -> bool:
        """Whether the receiver handed the last message back.

        Raises:
            RingError: the busy word holds neither expected value.
        """
        word: int = self.word[0]
        free = self.use << 1
        if word == free:
            return True
        if word == free | 1:
            return False
        raise RingError(
            f"segment {self.seg_id}'s busy word reads {word:#x}, expected {free:#x} "
            f"(handed back) or {free | 1:#x} (held by the receiver): something else "
            "wrote to the segment, or its mapping changed"
        )

    def mark_busy(self) -> None:
        use = self.use + 1 if self.use < _MAX_USE else 1
        self.use = use
        self.word[0] = use << 1 | 1

    def close(self) -> None:
        self.word.release()
        self.view.release()
        self.mm.close()


class _RxSegment:
    """A peer's segment as mapped here; views of one message at a time."""

    __slots__ = ("busy", "lent", "mm", "oneshot", "pid", "seg_id", "size", "watch", "word")

    def __init__(self, seg_id: int, mm: mmap.mmap, size: int, oneshot: bool) -> None:
        self.pid = _pid
        self.seg_id = seg_id
        self.mm = mm
        self.size = size
        self.oneshot = oneshot
        self.busy = False
        self.word = _busy_word(mm)
        #: The busy word as the sender set it for the current message.
        self.lent = 0
        #: A weak reference to the array the current message's views are cut from;
        #: its callback hands the segment back. (One per segment, as one message at a
        #: time uses it: cheaper than a ``weakref.finalize`` per message.)
        self.watch: weakref.ref[Any] | None = None

    def lend(self, base: np.ndarray[Any, Any]) -> None:
        """The current message's views are cut from ``base``: busy until it is gone.

        Raises:
            RingError: the sender did not mark the segment busy (see _TxSegment).
        """
        word: int = self.word[0]
        if not word & 1:
            raise RingError(f"segment {self.seg_id} came without its busy mark (word {word:#x})")
        self.lent = word
        self.busy = True
        self.watch = weakref.ref(base, self._dropped)

    def _dropped(self, ref: weakref.ref[Any]) -> None:
        if ref is self.watch:
            self.watch = None
            self.release()

    def release(self) -> None:
        """Every view of the current message is gone: hand the segment back.

        Not in a child made by ``fork`` (see ``_pid``): its views are copies of the
        parent's, which may still hold the message.
        """
        self.busy = False
        if self.pid != _pid:
            return
        word: int = self.word[0]
        if word != self.lent:
            # Only the sender's protocol writes the word, and not while we hold it.
            log.warning(
                "segment %d's busy word changed while its message was held: %#x, set "
                "%#x: something else wrote to the segment",
                self.seg_id,
                word,
                self.lent,
            )
        self.word[0] = self.lent & ~1


# --------------------------------------------------------------------------- link


class _Queued:
    """A record waiting for ring space (kept in order behind earlier ones)."""

    __slots__ = ("conn_id", "done", "kind", "lengths", "parts", "rec_len", "size")

    def __init__(
        self,
        kind: int,
        conn_id: int,
        rec_len: int,
        lengths: tuple[int, ...],
        parts: list[memoryview | tuple[int, int]],
        done: asyncio.Future[None] | None,
    ) -> None:
        self.kind = kind
        self.conn_id = conn_id
        self.rec_len = rec_len
        self.size = (rec_len + 7) & ~7
        self.lengths = lengths
        self.parts = parts
        self.done = done


class _ShmLink(Link):
    """A socket plus one ring per direction; see the module docstring."""

    heartbeat = True

    def __init__(
        self,
        endpoint: _ShmEndPoint,
        remote: EndPointAddress,
        sock: socket.socket,
        tx: mmap.mmap,
        rx: mmap.mmap,
    ) -> None:
        super().__init__(remote, endpoint)
        opts = endpoint._opts
        self._endpoint = endpoint
        self._loop = endpoint._loop
        self._sock = sock
        self._fd = sock.fileno()
        #: The peer's pid as this process sees it (0: in a pid namespace this one
        #: cannot see), and whether the peer endpoint lives in another process.
        self._peer_pid = _peer_pid(sock)
        self._remote_process = self._peer_pid != os.getpid()
        #: The pid :meth:`start` counted in the process's crowding (0: none).
        self._counted_pid = 0
        self._writer = RingWriter(tx, len(tx) - HEADER_SIZE)
        self._reader = RingReader(rx, check_ring(rx))
        self._max_record = self._writer.capacity // 4
        self._threshold: int = opts["inline_threshold"]
        self._spin = Budget(_SPIN_FACTOR * opts["busy_poll_us"] * 1e-6, _SPIN_MIN)
        self._slept_at = 0.0
        #: Start (wall and CPU time) of the current polling period, 0.0 outside one.
        self._spin_started = 0.0
        self._spin_cpu = 0.0
        self._max_pool: int = opts["max_pool_segments"]
        self._queue: deque[_Queued] = deque()
        #: New segments' notices (message, descriptor) that the socket had no room
        #: for; the queue's records wait behind them (:meth:`_notify`).
        self._notices: deque[tuple[bytes, int]] = deque()
        self._pool: list[_TxSegment] = []
        self._next_seg = 1
        self._rx_segments: dict[int, _RxSegment] = {}
        self._polling = False
        self._handle: asyncio.Handle | None = None
        self._spin_until = 0.0
        self._down = False
        self._draining = False
        self._rings_closed = False
        #: Why the peer went away, noticed in the middle of a drain.
        self._gone: str | None = None
        self._flushed: asyncio.Future[None] | None = None
        self._events = endpoint._events
        self._receivers = endpoint._receivers
        # The drain's callbacks, bound once: three bound method objects less per drain
        # (8 B raw round trip 4.83 -> 4.48 us, 5 interleaved pairs).
        self._drain_callbacks = (self._deliver, self._deliver_inline, self._deliver_segment)

    def start(self) -> None:
        """Start receiving (after the link is registered with its endpoint)."""
        if self._down:
            return
        if self._remote_process:
            # A peer bound within this process's CPUs may make them crowded (see
            # Crowding.peer_linked).
            self._counted_pid = self._endpoint._poller.crowding.count_link(self._peer_pid)
        self._loop.add_reader(self._fd, self._on_readable)
        self._progress()

    # ------------------------------------------------------------------ sending

    def send_control(self, kind: Kind, conn_id: int) -> None:
        if self._down:
            return
        try:
            if not self._queue:
                off = self._writer.reserve(REC.size)
                if off >= 0:
                    self._writer.write(off, REC.size, kind, conn_id, (), [])
                    self._publish()
                    return
            self._enqueue(_Queued(kind, conn_id, REC.size, (), [], None))
        except RingError as exc:
            self._violation(str(exc))

    def send_tick(self) -> None:
        # Into the ring if it has room and nothing is queued; else skipped (a queue
        # means the peer has not drained the ring: the tick would prove nothing new).
        if self._down or self._queue:
            return
        try:
            off = self._writer.reserve(REC.size)
            if off >= 0:
                self._writer.write(off, REC.size, Kind.TICK, 0, (), [])
                self._publish()
        except RingError as exc:
            self._violation(str(exc))
        except ValueError:  # the mapping was closed under us (torn down)
            pass

    def send_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        # One small byte frame and room in the ring: written and published in one call.
        if self._down or self._queue:
            return False
        if len(frames) != 1:
            return len(frames) == 2 and self._send_pair_now(conn_id, frames)
        frame = frames[0]
        if type(frame) is bytes:  # a serialized header: no view to make, nothing to check
            n = len(frame)
        else:
            frame = frame if type(frame) is memoryview else memoryview(frame)  # type: ignore[arg-type]
            n = frame.nbytes
            if frame.format != "B" or frame.ndim != 1 or not frame.contiguous:
                return False
        if n >= self._threshold:
            return self._send_pair_now(conn_id, frames)
        try:
            sent = self._writer.send_one(conn_id, frame, n)
        except RingError as exc:
            raise self._corrupt(exc) from exc
        except ValueError:  # the mapping was closed under us (torn down)
            raise ConnectionError("shared-memory link is down") from None
        if sent == 2:
            self._signal(_MSG_WAKE)
        return sent > 0

    def _send_pair_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        """``send_now`` of one large frame, or of a small frame and another one (the
        process layer's header and payload): in one call, a large frame copied into a
        free pooled segment and referred to from the ring, small ones into the ring.

        :meth:`_send_data` does the same for any message, with the bookkeeping of the
        general case (many frames, segments to create or to pick by best fit), which
        costs more than the copy up to a few hundred KiB. False (nothing sent) when the
        shape differs, or no pooled segment is free and large enough.
        """
        threshold = self._threshold
        last = _as_bytes(frames[-1])
        n = last.nbytes
        seg: _TxSegment | None = None
        if n >= threshold:
            limit = 4 * n + _SEG_GRANULE  # as _segment_for: no far larger segment
            try:
                for seg in self._pool:
                    if n <= seg.size <= limit and seg.is_free():
                        break
                else:
                    return False
            except RingError as exc:
                raise self._corrupt(exc) from exc
            tail: memoryview | tuple[int, int] = (seg.seg_id, 0)
            tail_len, tail_bytes = n | OUT_OF_LINE, SEGREF.size
        elif len(frames) == 1:
            return False  # send_now's own case
        else:
            tail, tail_len, tail_bytes = last, n, n
        if len(frames) == 2:
            head = _as_bytes(frames[0])
            if head.nbytes >= threshold:
                return False
            lengths: tuple[int, ...] = (head.nbytes, tail_len)
            parts: list[memoryview | tuple[int, int]] = [head, tail]
            rec_len = REC.size + 16 + head.nbytes + tail_bytes
        else:
            lengths, parts = (tail_len,), [tail]
            rec_len = REC.size + 8 + tail_bytes
        writer = self._writer
        try:
            off = writer.reserve((rec_len + 7) & ~7)
            if off < 0:
                return False
            if seg is not None:
                seg.mark_busy()
                seg.view[SEG_HEADER : SEG_HEADER + n] = last
            writer.write(off, rec_len, Kind.DATA, conn_id, lengths, parts)
        except RingError as exc:
            raise self._corrupt(exc) from exc
        except ValueError:  # the mapping was closed under us (torn down)
            raise ConnectionError("shared-memory link is down") from None
        if seg is not None:
            seg.used = time.monotonic()
            self._endpoint._trimmer.touch()
        self._publish()
        return True

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        if self._down:
            raise ConnectionError("shared-memory link is down")
        try:
            await self._send_data(conn_id, frames)
        except RingError as exc:
            raise self._corrupt(exc) from exc

    async def _send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        views = [_as_bytes(f) for f in frames]
        threshold = self._threshold
        sizes = [v.nbytes for v in views]
        inline = [n < threshold for n in sizes]
        payload = sum(n if small else SEGREF.size for n, small in zip(sizes, inline, strict=True))
        rec_len = REC.size + 8 * len(views) + payload
        if rec_len > self._max_record:
            inline = [False] * len(views)
            rec_len = REC.size + (8 + SEGREF.size) * len(views)
            if rec_len > self._max_record:
                raise SendError(
                    SendErrorCode.FAILED,
                    f"a message of {len(views)} frames does not fit the shared-memory ring "
                    f"(ring_size {self._writer.capacity} bytes)",
                )
        if all(inline):
            lengths = tuple(sizes)
            parts: list[memoryview | tuple[int, int]] = list(views)
        else:
            lengths, parts = self._place_out_of_line(views, sizes, inline)
        if not self._queue and not self._notices:
            off = self._writer.reserve((rec_len + 7) & ~7)
            if off >= 0:
                self._writer.write(off, rec_len, Kind.DATA, conn_id, lengths, parts)
                self._publish()
                return
        done = self._loop.create_future()
        self._enqueue(_Queued(Kind.DATA, conn_id, rec_len, lengths, parts, done))
        await done

    def _place_out_of_line(
        self, views: list[memoryview], sizes: list[int], inline: list[bool]
    ) -> tuple[tuple[int, ...], list[memoryview | tuple[int, int]]]:
        """Copy the large frames into one segment; return the record's lengths and parts."""
        total = 0
        for n, small in zip(sizes, inline, strict=True):
            if not small:
                total += (n + _SEG_ALIGN - 1) & ~(_SEG_ALIGN - 1)
        seg = self._segment_for(total)
        seg.mark_busy()
        lengths: list[int] = []
        parts: list[memoryview | tuple[int, int]] = []
        off = 0
        sview = seg.view
        for view, n, small in zip(views, sizes, inline, strict=True):
            if small:
                lengths.append(n)
                parts.append(view)
            else:
                start = SEG_HEADER + off
                sview[start : start + n] = view
                lengths.append(n | OUT_OF_LINE)
                parts.append((seg.seg_id, off))
                off += (n + _SEG_ALIGN - 1) & ~(_SEG_ALIGN - 1)
        if seg not in self._pool:
            seg.close()  # one-shot: the receiver's mapping keeps the memory
        return tuple(lengths), parts

    def _segment_for(self, nbytes: int) -> _TxSegment:
        endpoint = self._endpoint
        endpoint._trimmer.touch()
        best: _TxSegment | None = None
        for seg in self._pool:
            if seg.size >= nbytes and (best is None or seg.size < best.size) and seg.is_free():
                best = seg
        if best is not None and best.size <= 4 * nbytes + _SEG_GRANULE:
            best.used = time.monotonic()
            return best
        size = max(_SEG_GRANULE, (nbytes + _SEG_GRANULE - 1) & ~(_SEG_GRANULE - 1))
        cap = endpoint._max_pool_bytes
        if len(self._pool) >= self._max_pool or endpoint._pool_bytes + size > cap:
            # Make room: free segments go, smallest first, until the new one fits.
            for victim in sorted((s for s in self._pool if s.is_free()), key=lambda s: s.size):
                if len(self._pool) < self._max_pool and endpoint._pool_bytes + size <= cap:
                    break
                if not self._drop_segment(victim):
                    break
        mm, fd = _new_memfd("hpcproc-shm-segment", SEG_HEADER + size, populate=True)
        seg = _TxSegment(self._next_seg, mm, size)
        self._next_seg += 1
        oneshot = len(self._pool) >= self._max_pool or endpoint._pool_bytes + size > cap
        try:
            self._notify(_NEWSEG.pack(b"N", seg.seg_id, size, oneshot), fd)
        except BaseException:
            seg.close()
            raise
        if not oneshot:
            self._pool.append(seg)
            endpoint._pool_bytes += size
        return seg

    def _notify(self, msg: bytes, fd: int) -> None:
        """Pass a new segment's descriptor to the peer; takes ``fd`` over.

        When the socket has no room (the peer has not read it for a while: it
        computes, or waits for its CPU, while messages keep coming), the notice waits
        in :attr:`_notices`, sent as soon as there is room, and the queue's records
        wait behind it (:meth:`_pump`), the record that refers to the segment among
        them: the peer must not meet a reference to a segment it was not given. The
        sender's ``send`` then waits, as for ring space. (A full socket used to fail
        the send, and with it the bundle: seen after 278 unread 256 KiB messages.)

        Raises:
            OSError: the socket failed (the bundle fails with the send).
        """
        if not self._notices:
            try:
                _send_fd(self._sock, msg, fd)
            except BlockingIOError:
                pass
            except BaseException:
                os.close(fd)
                raise
            else:
                os.close(fd)
                return
        self._notices.append((msg, fd))
        if len(self._notices) == 1:
            self._loop.add_writer(self._fd, self._send_notices)

    def _send_notices(self) -> None:
        """The socket has room: send the waiting notices, then the queued records."""
        notices = self._notices
        while notices and not self._down:
            msg, fd = notices[0]
            try:
                _send_fd(self._sock, msg, fd)
            except BlockingIOError:
                return
            except OSError as exc:
                self._socket_failed(exc)
                return
            notices.popleft()
            os.close(fd)
        self._loop.remove_writer(self._fd)
        self._pump()

    def _drop_segment(self, seg: _TxSegment) -> bool:
        """Give a free pooled segment back: the peer unmaps it, then so do we.

        False (the segment stays pooled) when the socket has no room for the notice
        now: the peer would keep its mapping, and the memory, for the link's life.
        """
        try:
            self._sock.send(_DROPSEG.pack(b"D", seg.seg_id))
        except BlockingIOError:
            return False
        except OSError:
            pass  # a broken socket: the peer unmaps everything on teardown
        self._pool.remove(seg)
        self._endpoint._pool_bytes -= seg.size
        seg.close()
        return True

    def trim_pool(self, cutoff: float) -> bool:
        """Drop free segments unused since ``cutoff``; whether any segment is left."""
        if self._down:
            return False
        try:
            idle = [s for s in self._pool if s.used < cutoff and s.is_free()]
        except RingError as exc:
            self._violation(str(exc))
            return False
        for seg in idle:
            self._drop_segment(seg)
        return bool(self._pool)

    def _enqueue(self, item: _Queued) -> None:
        self._queue.append(item)
        if len(self._queue) == 1:
            self._pump()

    def _pump(self) -> None:
        """Write queued records while the ring has room; sleep on the consumer if not."""
        if self._notices:
            return  # _send_notices pumps once they are sent
        writer = self._writer
        queue = self._queue
        wrote = False
        try:
            while queue and not self._down:
                item = queue[0]
                off = writer.reserve(item.size)
                if off < 0:
                    writer.start_waiting()
                    off = writer.reserve(item.size)
                    if off < 0:
                        break
                    writer.stop_waiting()
                writer.write(off, item.rec_len, item.kind, item.conn_id, item.lengths, item.parts)
                wrote = True
                queue.popleft()
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
        except RingError as exc:
            self._violation(str(exc))
            return
        if wrote:
            self._publish()
        if not queue and self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)

    def _publish(self) -> None:
        try:
            wake = self._writer.publish()
        except ValueError:  # the mapping was closed under us (torn down)
            return
        if wake:
            self._signal(_MSG_WAKE)

    def _signal(self, msg: bytes) -> None:
        try:
            self._sock.send(msg)
        except BlockingIOError:
            pass  # the peer has unread signals already; it will look at the ring
        except OSError:
            pass  # the reader notices the broken socket

    # ------------------------------------------------------------------ receiving

    def _on_readable(self) -> None:
        # One message per call: the reader is level-triggered and comes back for more.
        if not self._read_socket(once=True):
            return
        self._reader.wake()
        if self._slept_at:
            # Woken soon after giving up: spinning longer would have caught it.
            if time.perf_counter() - self._slept_at < LATE * self._spin.maximum:
                self._spin.grow()
            self._slept_at = 0.0
        if not self._polling:
            self._progress()

    def _read_socket(self, *, once: bool = False) -> bool:
        """Handle pending socket messages (or one); False when the link went down."""
        sock = self._sock
        while not self._down:
            try:
                data, fds = _recv(sock)
            except BlockingIOError:
                return True
            except OSError as exc:
                self._socket_failed(exc)
                return False
            try:
                if not data:
                    self._peer_gone(_PEER_CLOSED)
                    return False
                tag = data[:1]
                if tag == _MSG_WAKE:
                    pass
                elif tag == _MSG_SPACE:
                    self._pump()
                elif tag == b"N" and len(data) == _NEWSEG.size and len(fds) == 1:
                    _, seg_id, size, oneshot = _NEWSEG.unpack(data)
                    if seg_id in self._rx_segments or size > 1 << 40:
                        raise RingError(f"bad new segment {seg_id} of {size} bytes")
                    mm = _map_peer_memfd(fds[0], SEG_HEADER + size, populate=True)
                    self._rx_segments[seg_id] = _RxSegment(seg_id, mm, size, bool(oneshot))
                elif tag == b"D" and len(data) == _DROPSEG.size:
                    self._rx_segments.pop(_DROPSEG.unpack(data)[1], None)
                else:
                    raise RingError(f"unexpected link message {data[:8]!r}")
            except (RingError, OSError, ValueError) as exc:
                self._violation(str(exc))
                return False
            finally:
                if fds:
                    _close_fds(fds)
            if once:
                return True
        return False

    def _progress(self) -> None:
        """Drain the ring; keep polling a while after the last record, then sleep.

        The polling time adapts between 10 us and twice ``busy_poll_us``: it halves
        whenever it ran out without a record and doubles when a wake-up comes soon
        after (:class:`~hpcproc.transports._busy_poll.Budget`). When
        the process did not get a CPU to itself while polling (the CPUs are
        oversubscribed, and the peer may be the one waiting for ours), the endpoint
        stops polling for a while and sleeps at once.
        """
        if self._polling:  # (not when called directly, to start)
            self._polling = False
            self._endpoint._spinning -= self._remote_process
        if self._down:
            return
        reader = self._reader
        if reader.pending() and (self._drain() or self._down):
            if self._down:
                return
            now = time.perf_counter()
            self._spin_until = now + self._spin.value
            if not self._spin_started:
                self._spin_started = now
                self._spin_cpu = time.thread_time()
        else:
            now = time.perf_counter()
            poller = self._endpoint._poller
            if (now >= self._spin_until or poller.polling_off(now)) and reader.sleep():
                self._slept_at = now
                self._spin.shrink()
                started, self._spin_started = self._spin_started, 0.0
                wall = now - started
                if started and wall > PROBE_MIN:
                    poller.probed(now, time.thread_time() - self._spin_cpu < wall / 2)
                return
        if not self._down:
            self._schedule()

    def _schedule(self) -> None:
        """Run :meth:`_progress` on the loop's next pass; the endpoint counts the
        callbacks of its polled links that wait there (see ``_busy_wait``)."""
        self._polling = True
        self._endpoint._spinning += self._remote_process
        self._handle = self._loop.call_soon(self._progress)

    def _drain_unless_down(self) -> bool:
        """:meth:`_drain` if the link is up; False (nothing more to poll) if down, or
        when a message went to a receiver (as an event would end the poll)."""
        if self._down:
            return False
        endpoint = self._endpoint
        handed_over = endpoint._handed_over
        self._drain()
        return endpoint._handed_over == handed_over

    def _drain(self) -> int:
        """Deliver what the ring holds; the link may go down while it runs.

        Delivery can re-enter this link (a protocol violation aborts it, a segment
        lookup reads the socket and may find its end), so tearing the rings down and
        handling the peer's departure wait until the parse is over. A drain inside
        another returns 0 at once: the reader saves its position only when its drain
        returns, so a nested one would deliver the records in flight again.
        """
        if self._draining:
            return 0
        self._draining = True
        error = None
        try:
            n = self._reader.drain(*self._drain_callbacks)
        except RingError as exc:
            n = 0
            error = str(exc)
        finally:
            self._draining = False
        if n:
            self.heard = True  # the heartbeat's sign of life
        if error is not None:
            self._violation(error)
        if self._down:
            self._close_rings()
        elif self._gone is not None:
            self._peer_gone(self._gone)
        elif n and self._reader.producer_waiting():
            self._signal(_MSG_SPACE)
        return n

    def _deliver_inline(self, conn_id: int, frames: list[memoryview]) -> bool:
        """A DATA record whose frames are all inline (the ring's fast path)."""
        local = self.incoming.get(conn_id)
        if local is None or not self.alive:
            self._endpoint._on_data(self, conn_id, frames)  # the core's error handling
            return self.alive and not self._down
        events = self._events
        if self._receivers and not events._items:
            receiver = self._receivers.get(local)
            if receiver is not None:
                self._endpoint._handed_over += 1
                receiver(frames)  # see EndPoint.set_receiver
                return not self._down
        # new_received and the queue's put written out: two frames less per message.
        event = _new_object(Received)
        _set_received_conn_id(event, local)
        _set_received_frames(event, frames)
        events._items.append(event)
        if events._waiters and not events._held:
            events.put_wakeup()
        return not self._down

    def _deliver_segment(
        self, conn_id: int, head: memoryview | None, seg_id: int, off: int, n: int
    ) -> bool:
        """A DATA record of one frame held in a segment, after an inline ``head`` frame
        or alone (the ring reports these apart from other records)."""
        ref = (seg_id, off, n)
        frames: list[Any] = [ref] if head is None else [head, ref]
        # The general path: a segment costs far more than its one lookup and call.
        return self._deliver(Kind.DATA, conn_id, frames)

    def _deliver(self, kind: Kind, conn_id: int, frames: list[Any]) -> bool:
        endpoint = self._endpoint
        if kind is Kind.DATA:
            for frame in frames:
                if type(frame) is tuple:
                    frames = self._resolve(frames)
                    break
            endpoint._on_data(self, conn_id, frames)
        elif kind is Kind.OPEN:
            endpoint._on_open(self, conn_id)
        elif kind is Kind.CLOSE:
            endpoint._on_close(self, conn_id)
        # A TICK only proves life (``heard``, set by ``_drain``).
        return self.alive and not self._down

    def _resolve(self, frames: list[Any]) -> list[memoryview]:
        """Turn segment references into views of the segments; check every bound."""
        bases: dict[int, np.ndarray[Any, Any]] = {}
        out: list[memoryview] = []
        for frame in frames:
            if type(frame) is not tuple:
                out.append(frame)
                continue
            seg_id, off, n = frame
            seg = self._rx_segments.get(seg_id)
            if seg is None:
                # Its descriptor was sent before the record; it may still be queued.
                self._read_socket()
                seg = self._rx_segments.get(seg_id)
                if seg is None:
                    raise RingError(f"record refers to unknown segment {seg_id}")
            if off > seg.size or n > seg.size - off:
                raise RingError(
                    f"frame of {n} bytes at {off} is beyond segment {seg_id} of {seg.size} bytes"
                )
            base = bases.get(seg_id)
            if base is None:
                if seg.busy:
                    raise RingError(
                        f"segment {seg_id} reused before the receiver released it (busy "
                        f"word {seg.word[0]:#x}, {seg.lent:#x} when lent)"
                    )
                base = np.frombuffer(seg.mm, np.uint8, count=seg.size, offset=SEG_HEADER)
                seg.lend(base)
                bases[seg_id] = base
                if seg.oneshot:
                    del self._rx_segments[seg_id]
            out.append(memoryview(base[off : off + n]))  # type: ignore[arg-type]
        return out

    # ------------------------------------------------------------------ failure, close

    def _violation(self, reason: str) -> None:
        if self._down:
            return
        if self.alive:
            self._endpoint._protocol_violation(self, f"corrupt shared memory: {reason}")
        else:
            log.warning("dropping link to %r: %s", self.remote, reason)
        self._teardown()

    def _corrupt(self, exc: RingError) -> ConnectionError:
        """Drop the link for ``exc`` (corrupt shared memory); the error a send raises."""
        self._violation(str(exc))
        return ConnectionError(f"shared-memory link is down: {exc}")

    def _socket_failed(self, exc: OSError) -> None:
        if isinstance(exc, ConnectionResetError):
            # The peer closed its end while it held bytes it had not read (a wake-up
            # we sent as it closed, cleanly or not): the kernel resets the connection
            # instead of giving EOF. A peer gone, as EOF says; not a failure to warn
            # about (every run of the process benchmark over shm warned so).
            log.debug("link to %r: the peer reset its socket: %s", self.remote, exc)
            self._peer_gone(_PEER_CLOSED)
            return
        # Logged, unlike EOF (which a clean close gives too): only this side can say
        # why a link to a live peer broke.
        log.warning("link to %r: its socket failed: %s", self.remote, exc)
        self._peer_gone(f"link socket failed: {exc}")

    def _peer_gone(self, reason: str) -> None:
        if self._down:
            return
        if self._draining:
            self._gone = reason
            return
        self._gone = None
        self._drain()
        if not self._down:
            self.fail(reason)

    async def close(self) -> None:
        if self._down:
            return
        if self._queue:
            self._flushed = self._loop.create_future()
            await self._flushed
        self._teardown()

    def abort(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Release everything at once; the peer sees the socket close."""
        if self._down:
            return
        self._down = True
        if self._counted_pid:
            self._endpoint._poller.crowding.peer_unlinked(self._counted_pid)
            self._counted_pid = 0
        self._loop.remove_reader(self._fd)
        if self._notices:
            self._loop.remove_writer(self._fd)
            for _, fd in self._notices:
                os.close(fd)
            self._notices.clear()
        self._sock.close()
        queue, self._queue = self._queue, deque()
        for item in queue:
            if item.done is not None and not item.done.done():
                item.done.set_exception(ConnectionError("shared-memory link is down"))
        if self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)
        for seg in self._pool:
            self._endpoint._pool_bytes -= seg.size
            seg.close()
        self._pool.clear()
        # Views handed to the application keep their segments mapped until dropped.
        self._rx_segments.clear()
        if not self._draining:
            self._close_rings()

    def _close_rings(self) -> None:
        if self._rings_closed:
            return
        self._rings_closed = True
        for ring in (self._writer, self._reader):
            ring.release()
            with contextlib.suppress(BufferError):  # a view escaped: GC unmaps it
                ring.mm.close()


# --------------------------------------------------------------------------- endpoint


_OPEN = _State.OPEN


class _ShmConnection(OutgoingConnection):
    """A connection whose ``send_nowait`` writes one small pickle into the ring itself."""

    __slots__ = ()

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        # OutgoingConnection.send_nowait and the link's send_now written out for one
        # pickle below the inline threshold (the process layer's small message): a
        # call less per message. Anything else, a full ring or an error takes the
        # general path (which meets the same error again and reports it).
        link: _ShmLink = self._link  # type: ignore[assignment]
        if self._state is _OPEN and len(frames) == 1 and not link._down and not link._queue:
            frame = frames[0]
            if type(frame) is bytes and len(frame) < link._threshold:
                try:
                    sent = link._writer.send_one(self._id, frame, len(frame))
                except (RingError, ValueError):
                    sent = 0
                if sent:
                    link.sent = True
                    if sent == 2:
                        link._signal(_MSG_WAKE)
                    return True
        return OutgoingConnection.send_nowait(self, frames)


class _ShmEndPoint(MultiplexedEndPoint):
    _connection_class = _ShmConnection
    _hands_over = True  # the links hand data to receivers (see EndPoint.set_receiver)
    #: :meth:`_looker`'s answer, and the links it was made for.
    _looks: tuple[list[_ShmLink], Callable[[], None]] | None = None

    def __init__(
        self,
        transport: ShmTransport,
        address: EndPointAddress,
        listener: socket.socket,
        opts: dict[str, Any],
    ) -> None:
        super().__init__(address)
        self._transport = transport
        self._listener = listener
        self._opts = opts
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()
        #: Dials in progress and dials waiting for the winner of a crossed connect.
        self._crossing = CrossedConnects()
        #: Polls in ``receive``; its starvation record also stops the links' spin.
        self._poller = IdlePoller(self._loop, opts["busy_poll_us"], yields=self._yield_polls)
        #: How many of the loop's ready callbacks are the polls of this endpoint's
        #: polled links (``_ShmLink._schedule``): when the ready queue holds no more,
        #: a receive may poll (no need to build the set of their handles each time).
        self._spinning = 0
        #: Bytes in the segment pools of all links together, at most ``max_pool_bytes``.
        self._pool_bytes = 0
        self._max_pool_bytes: int = opts["max_pool_bytes"]
        self._trimmer = IdleTrimmer(opts["pool_idle_s"], self._trim_pools)
        self._loop.add_reader(listener.fileno(), self._on_acceptable)

    def _trim_pools(self, cutoff: float) -> bool:
        kept = False
        for link in list(self._links.values()):
            kept = cast(_ShmLink, link).trim_pool(cutoff) or kept
        return kept

    async def receive(self) -> Event:
        """See :meth:`EndPoint.receive`; may first poll the rings for a moment.

        When no event is queued and no other callback of the event loop is ready, the
        rings are polled in place for up to ``busy_poll_us`` (adapting like the
        links' spin), so that a quick reply is taken without a trip through the
        event loop. This can delay other I/O of the loop by that much.
        """
        events = self._events
        poller = self._poller
        if events._items or not poller.enabled:
            return await events.get()
        gave_up = self._busy_wait()
        if not gave_up:
            event = events.pop_ready()
            return event if event is not None else await events.get()
        event = await events.get()
        # A reply a little too late for the poll: poll longer (sleeping costs a wake-up
        # system call on the peer, often more than the poll); a long silence: shorter.
        poller.adapt(gave_up)
        return event

    def receive_nowait(self) -> Event | None:
        """As :meth:`MultiplexedEndPoint.receive_nowait`, with its ``_poll_idle`` and
        the queue's ``pop_ready`` written out: three calls less per message on the
        process layer's receive path."""
        events = self._events
        items = events._items
        events._held = True  # see MultiplexedEndPoint.receive_nowait
        try:
            if not items and self._poller.enabled:
                self._busy_wait()
            event = items.popleft() if items else None
            if type(event) is EndPointClosed:
                items.appendleft(event)  # only receive reports the close
                event = None
        finally:
            events._held = False
            if items and events._waiters:
                events.put_wakeup()
        return event

    def _pollable(self, link: Link) -> bool:
        # A peer in this process answers only when the loop runs: polling cannot help.
        return type(link) is _ShmLink and link._remote_process

    def _looker(self) -> Callable[[], object]:
        """See :meth:`MultiplexedEndPoint._looker`: drains the rings that hold
        records (the readers say they are awake meanwhile: no wake-ups are sent)."""
        # (Annotations, not typing.cast, and the look made once per set of links:
        # called on every wait of a routed receive on crowded CPUs.)
        # (_polled_links' cache read here: a call less per wait.)
        links: list[_ShmLink] = self._polled or self._polled_links()  # type: ignore[assignment]
        for link in links:
            link._reader.wake()
        looks = self._looks
        if looks is not None and looks[0] is links:
            return looks[1]

        def look() -> None:
            for link in links:
                if not link._down and link._reader.pending():
                    link._drain()

        self._looks = (links, look)
        return look

    def _done_looking(self) -> None:
        # The links' own poll decides when their readers sleep again (as after
        # _busy_wait).
        links: list[_ShmLink] = self._polled or self._polled_links()  # type: ignore[assignment]
        for link in links:
            if not link._down and not link._polling:
                link._schedule()

    def _spin_handles(self) -> set[asyncio.Handle | None]:
        """The ready-queue handles of the links' own polling (no reason not to poll)."""
        links: list[_ShmLink] = self._polled or self._polled_links()  # type: ignore[assignment]
        return {link._handle for link in links if link._polling}

    _own_handles = _spin_handles

    def _busy_wait(self) -> float:
        """Poll the rings until an event is queued; the time it gave up, or 0.0.

        Does nothing when callbacks other than the links' own polling are ready, and
        counts the poller's turn (a fair turn for the loop is no poll).
        """
        # (An annotation, not typing.cast: a call less per message.)
        # (_polled_links' cache read here: a call less per message.)
        links: list[_ShmLink] | None = self._polled  # type: ignore[assignment]
        if links is None:
            links = self._polled_links()  # type: ignore[assignment]
        if not links:
            return 0.0
        poller = self._poller
        start = time.perf_counter()
        if not poller.turn(start, links[0]._handle, self._spinning):
            return 0.0
        items = self._events._items
        gave_up = 0.0
        keep = links  # the links kept awake
        if len(links) == 1:
            link = links[0]
            reader = link._reader
            reader.wake()
            words = reader.words
            # The first look needs no clock: a reply is often there already.
            handed_over = self._handed_over
            if words[_HEAD_WORD] != reader.tail and not link._down:
                link._drain()
            if not items and self._handed_over == handed_over:
                # No closure here: a cell variable would slow every use of it above.
                gave_up = poller.poll_counter(
                    items, words, _HEAD_WORD, reader, link._drain_unless_down, start
                )
                now = time.perf_counter()
            else:
                now = start  # no spin: the first look's time will do
        else:
            # Only the links that deliver are kept awake (their own poll scheduled,
            # its time extended); the others are looked at, not woken, and sleep once
            # their own poll runs out: waking every link on every receive, and
            # keeping every link's poll on the loop, cost each receive a pass over
            # all of them (63 idle links: an 8 B round trip took 14-15 us against 3.7
            # with none; closing note). A link asleep may still be drained here; its
            # peer then sends a wake-up, read on the loop.
            hot: list[_ShmLink] = []

            def poll_once() -> bool:
                handed_over = self._handed_over
                for link in links:
                    if link._reader.pending() and not link._down:
                        link._drain()
                        hot.append(link)
                return self._handed_over == handed_over

            gave_up = poller.poll(items, poll_once, start)
            if not hot:
                return gave_up
            now = time.perf_counter()
            keep = hot
            for link in hot:
                link._reader.wake()
        for link in keep:
            if not link._down:
                if not gave_up:
                    link._spin_until = now + link._spin.value
                if not link._polling:
                    link._schedule()
        return gave_up

    def _new_ring(self) -> tuple[mmap.mmap, int]:
        size: int = self._opts["ring_size"]
        mm, fd = _new_memfd("hpcproc-shm-ring", HEADER_SIZE + size, populate=True)
        init_ring(mm, size)
        return mm, fd

    # ------------------------------------------------------------------ connecting

    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        host, boot, name = _parse_address(remote)
        my_host, my_boot = _host_identity()
        if (host, boot) != (my_host, my_boot):
            raise ConnectError(
                ConnectErrorCode.NOT_FOUND,
                f"{remote!r} is an endpoint on host {host.decode(errors='replace')} "
                f"(boot {boot.decode(errors='replace')}), not on this host "
                f"({my_host.decode(errors='replace')}); the shm transport only connects "
                "endpoints on one host: use the tcp or ucx transport for peers on other hosts",
            )
        hello = _HELLO_NEW
        # Crossed connects are resolved as tcp's and ucx's are (_dialing.CrossedConnects:
        # the link dialed from the smaller address wins; the loser waits for it, then
        # looks again and dials again), except for a dial into a live link: see _accept.
        with self._crossing.dialing_to(remote):
            while True:
                outcome = await self._dial(remote, name, hello)
                if isinstance(outcome, Link):
                    return outcome
                existing = self._links.get(remote)
                if outcome == _REJECT_CROSSED and (existing is None or not existing.alive):
                    await self._crossing.wait_for_arrival(remote, CROSS_WAIT)
                    existing = self._links.get(remote)
                if existing is not None and existing.alive:
                    return existing
                # _REJECT_LIVE: the peer holds a live link with us that we do not
                # have (it is stale), so replace it; after a crossing, dial again.
                hello = _HELLO_REPLACE if outcome == _REJECT_LIVE else _HELLO_NEW

    async def _dial(self, remote: EndPointAddress, name: bytes, hello: bytes) -> Link | bytes:
        """One connection attempt: the new link, or the peer's refusal
        (``_REJECT_CROSSED`` or ``_REJECT_LIVE``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        tx: mmap.mmap | None = None
        try:
            try:
                await self._loop.sock_connect(sock, b"\0" + name)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ConnectError(
                    ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}"
                ) from exc
            other = _other_user(sock)
            if other is not None:
                raise ConnectError(ConnectErrorCode.FAILED, f"endpoint {remote!r} refused: {other}")
            tx, tx_fd = self._new_ring()
            try:
                _send_fd(sock, _HELLO.pack(hello, _VERSION) + bytes(self.address), tx_fd)
            finally:
                os.close(tx_fd)
            data, fds = await _recv_async(sock)
            try:
                if data in (_REJECT_CROSSED, _REJECT_LIVE):
                    sock.close()
                    tx.close()
                    return data
                if data != _WELCOME or len(fds) != 1:
                    raise ConnectError(
                        ConnectErrorCode.NOT_FOUND, f"endpoint {remote!r} is closing or closed"
                    )
                rx = _map_peer_memfd(fds[0], None, populate=True)
            finally:
                _close_fds(fds)
            try:
                link = _ShmLink(self, remote, sock, tx, rx)
            except RingError:
                rx.close()
                raise
        except ConnectError:
            self._discard(sock, tx)
            raise
        except RingError as exc:
            self._discard(sock, tx)
            log.warning("refusing link to %r: %s", remote, exc)
            raise ConnectError(
                ConnectErrorCode.FAILED, f"bad handshake from {remote!r}: {exc}"
            ) from exc
        except OSError as exc:
            self._discard(sock, tx)
            raise ConnectError(ConnectErrorCode.FAILED, f"connecting to {remote!r}: {exc}") from exc
        except BaseException:
            self._discard(sock, tx)
            raise
        if self._closed:
            link.abort()
            raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
        self._loop.call_soon(link.start)
        return link

    @staticmethod
    def _discard(sock: socket.socket, tx: mmap.mmap | None) -> None:
        sock.close()
        if tx is not None and not tx.closed:
            tx.close()

    # ------------------------------------------------------------------ accepting

    def _on_acceptable(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("shm endpoint %r: accept failed: %s", self.address, exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._accept(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _accept(self, conn: socket.socket) -> None:
        tx: mmap.mmap | None = None
        rx: mmap.mmap | None = None
        remote = EndPointAddress(b"?")
        link: _ShmLink | None = None
        try:
            other = _other_user(conn)
            if other is not None:
                log.warning("shm endpoint %r: refused a peer: %s", self.address, other)
                conn.close()
                return
            data, fds = await asyncio.wait_for(_recv_async(conn), HANDSHAKE_TIMEOUT)
            try:
                if len(data) <= _HELLO.size or len(fds) != 1:
                    raise RingError(f"bad hello {data[:16]!r} with {len(fds)} descriptors")
                tag, version = _HELLO.unpack_from(data)
                if tag not in (_HELLO_NEW, _HELLO_REPLACE) or version != _VERSION:
                    raise RingError(f"bad hello tag {tag!r} version {version}")
                remote = EndPointAddress(data[_HELLO.size :])
                try:
                    _parse_address(remote)
                except ConnectError as exc:
                    raise RingError(str(exc)) from None
                if self._closed:
                    conn.send(_REJECT_CLOSED)
                    conn.close()
                    return
                existing = self._links.get(remote)
                if tag == _HELLO_NEW and existing is not None and existing.alive:
                    # A crossed connect whose other half completed first: keep the
                    # bundle that may already carry connections. Not tcp's rule
                    # (_dialing.DialingEndPoint._accept), under which a dial from the
                    # smaller address replaces the live link: here the dialer reuses
                    # the live link, or replaces it if it holds none (_HELLO_REPLACE).
                    conn.send(_REJECT_LIVE)
                    conn.close()
                    return
                if self._crossing.keeps_own_dial(remote, self.address):
                    conn.send(_REJECT_CROSSED)
                    conn.close()
                    return
                rx = _map_peer_memfd(fds[0], None, populate=True)
            finally:
                _close_fds(fds)
            tx, tx_fd = self._new_ring()
            try:
                link = _ShmLink(self, remote, conn, tx, rx)
            finally:
                if link is None:
                    os.close(tx_fd)
            try:
                _send_fd(conn, _WELCOME, tx_fd)
            finally:
                os.close(tx_fd)
        except BaseException as exc:
            if isinstance(exc, (RingError, OSError, asyncio.TimeoutError)):
                log.warning("shm endpoint %r: refused link from %r: %s", self.address, remote, exc)
            if link is not None:
                link.abort()
            else:
                conn.close()
                for mm in (tx, rx):
                    if mm is not None:
                        mm.close()
            if isinstance(exc, (RingError, OSError, asyncio.TimeoutError)):
                return
            raise
        self._register_link(link)
        link.start()
        self._crossing.arrived(remote)

    async def _release(self) -> None:
        self._trimmer.cancel()
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for task in list(self._handshakes):
            task.cancel()
        self._crossing.fail_waiters(ConnectError(ConnectErrorCode.FAILED, "endpoint closed"))


# --------------------------------------------------------------------------- transport


class ShmTransport(MultiplexedTransport):
    """Endpoints of processes on one host, linked through shared memory.

    Options (all per link):
        ring_size: bytes of each direction's ring (a power of two >= 64 KiB).
        inline_threshold: frames at least this long go through a shared segment
            (one copy) instead of the ring (two copies); default
            :data:`DEFAULT_INLINE_THRESHOLD`, at most ``ring_size / 8``.
        busy_poll_us: how long ``receive`` may poll in place when nothing else is
            ready (0 disables it); see :meth:`_ShmEndPoint.receive`. A consumer
            keeps polling its rings (through the event loop) for up to twice this
            after its last message before it sleeps.
        max_pool_segments: pooled segments per link direction.
        max_pool_bytes: bytes of pooled segments per endpoint, all links together
            (default ``$HPCPROC_SHM_POOL_BYTES``, else 256 MiB); a message that does
            not fit goes through a one-shot segment, freed once its receiver drops it.
        pool_idle_s: a pooled segment unused this long is returned to the system
            (default ``$HPCPROC_POOL_IDLE_S``, else 5 s).
        tick: heartbeat period in seconds (default ``HPCPROC_TICK``, else 15; 0: off).
            The socket already reports a peer process that exits (even by
            ``SIGKILL``); ticks add a peer that hangs (stopped, or its event loop
            blocked) for 4 ticks, which is then lost (``CONNECTION_LOST``). An idle
            link carries a ``TICK`` record in its ring every tick.

    Raises:
        ValueError: an option is out of range (the message names it).
    """

    def __init__(
        self,
        *,
        ring_size: int = 1 << 20,
        inline_threshold: int | None = None,
        busy_poll_us: float = 100.0,
        max_pool_segments: int = 8,
        max_pool_bytes: int | None = None,
        pool_idle_s: float | None = None,
        tick: float | None = None,
    ) -> None:
        if not hasattr(os, "memfd_create"):
            raise NotImplementedError("the shm transport needs Linux (memfd_create)")
        if ring_size < 1 << 16 or ring_size & (ring_size - 1):
            raise ValueError(f"ring_size must be a power of two >= 64 KiB, not {ring_size}")
        if inline_threshold is None:
            inline_threshold = min(DEFAULT_INLINE_THRESHOLD, ring_size // 8)
        if not 0 <= inline_threshold <= ring_size // 8:
            raise ValueError(
                f"inline_threshold must be in [0, ring_size/8], not {inline_threshold}"
            )
        check_budget(busy_poll_us)
        if max_pool_segments < 0:
            raise ValueError(f"max_pool_segments must not be negative, not {max_pool_segments}")
        super().__init__(tick=tick)
        self._opts: dict[str, Any] = {
            "ring_size": ring_size,
            "inline_threshold": inline_threshold,
            "busy_poll_us": busy_poll_us,
            "max_pool_segments": max_pool_segments,
            "max_pool_bytes": env_bytes("HPCPROC_SHM_POOL_BYTES", max_pool_bytes, 256 << 20),
            "pool_idle_s": idle_seconds(pool_idle_s),
        }

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        host, boot = _host_identity()
        name = b"hpcproc-shm-%d-%s" % (os.getpid(), secrets.token_hex(8).encode())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.setblocking(False)
            listener.bind(b"\0" + name)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            code = (
                NewEndPointErrorCode.INSUFFICIENT_RESOURCES
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                else NewEndPointErrorCode.FAILED
            )
            raise NewEndPointError(code, f"cannot listen: {exc}") from exc
        address = EndPointAddress(b"%s%s:%s:%s" % (_PREFIX, host, boot, name))
        endpoint = _ShmEndPoint(self, address, listener, self._opts)
        self._add_endpoint(endpoint)
        return endpoint


def create_transport(**options: Any) -> ShmTransport:
    """Registry factory for ``shm``; see :class:`ShmTransport` for the options."""
    return ShmTransport(**options)
