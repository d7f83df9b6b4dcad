"""MPI transport: lightweight connections over mpi4py point-to-point messages.

Registered as ``mpi``. For clusters whose fastest network is only reachable through
MPI: ``srun --mpi=pmi2 python -m hpcproc.run --transport mpi app:main``.

Addresses
---------
An endpoint address is ``b"mpi:<rank>:<endpoint id>"``: the rank in the transport's
communicator and an id unique within that rank's process for its lifetime (ids are
never reused, so a closed endpoint stays ``NOT_FOUND``). Several endpoints per rank
work, which is also what lets the conformance suite run in a single rank: endpoints of
one process talk to each other through real MPI self-messages.

Communicator
------------
The transport never uses the caller's communicator directly: the first transport
created in a process duplicates it (``COMM_WORLD`` unless ``comm=`` is given) and every
later transport on the same communicator shares that duplicate. **The first
``create_transport`` for a communicator is therefore collective over it**, like any
MPI library's initialisation; every rank must create one. It also gathers who every
rank is (host, pid namespace and pid, one ``allgather``): a link to a rank of this
host counts that rank's CPUs for the crowding of :mod:`~hpcproc.transports._busy_poll`.

Wire protocol
-------------
All traffic uses one tag on the duplicate. Each link message starts with a 32-byte
envelope (``kind flags pad nframes src_ep dst_ep generation conn_id``, little endian)
and one 8-byte length per frame. A message whose frames total at most ``inline_max``
bytes travels as one MPI message (envelope, lengths and frames joined): one eager send,
one receive. Larger messages send the envelope, then each frame as its own MPI message
straight from the caller's buffer (``Isend`` of the frame itself, never pickled); the
receiver reads the lengths from the envelope and posts an ``Irecv`` per frame into a
buffer of exactly that size, which is then handed to the receiver as the frame (no
copy; large buffers are pooled numpy arrays, see below). MPI's non-overtaking rule
(same source, communicator and tag) keeps the envelope and frames of a sender in
order; a lock keeps envelope and frames of one message contiguous when several threads
send. Every length read from the wire is checked (frame count, total size, envelope
size) before anything is allocated, and every frame's received length against its
declared one (a sender that breaks either is dropped).

Connections, bundles and generations
------------------------------------
The multiplexing (connection ids, events, bundle failure, endpoint close) is the shared
core of :mod:`._multiplex`; this module provides one :class:`Link` per pair of
endpoints. A link is created by a HELLO/ACCEPT handshake (which is also how ``connect``
learns ``NOT_FOUND``) and carries a *generation* chosen by the initiator. Every message
carries its generation and is dropped unless it matches the live link, so after
``break_connection`` (or any bundle failure) nothing of the old bundle is delivered, and
a new ``connect`` starts a new bundle with a new generation. Taking a link down (fault
hook, endpoint close, protocol violation) sends DOWN, so the peer reports
``CONNECTION_LOST`` too. Crossed connects (both sides connecting at once) resolve to the
link of the endpoint with the smaller (rank, id).

Progress: polling integrated with the event loop, not a progress thread
----------------------------------------------------------------------
Chosen by measurement (two ranks, 8-byte ping-pong, mpich wheel, 2-core machine;
raw ``Send``/``Recv`` 2.5 us): a progress thread blocked in ``Mprobe`` handing
messages to the loop with ``call_soon_threadsafe`` gave 73 us per round trip (every
message pays a thread wake-up and a self-pipe wake-up of the loop, and MPICH's
blocking calls spin, so the thread competes with the loop for the cores); a loop
callback that polls ``Improbe`` gave 20 us; polling from the awaiting coroutine itself
gave 4 us. So all MPI calls happen on the event-loop thread, in three places:

* ``receive``, and any wait for a send to complete or a connect to be answered, first
  spins on the progress function for at most ``busy_poll_us`` microseconds, but only
  when no other task or callback of the loop is runnable, so spinning never delays
  other tasks: it replaces a trip round the loop (:mod:`~hpcproc.transports._busy_poll`:
  the receive's budget adapts, it lets the loop run now and then, on oversubscribed
  CPUs a receive polls by yielding the CPU between two probes and other waits do not
  spin, and it never spins on an event loop other than asyncio's);
* a *pump* callback polls on every loop iteration while there is traffic or pending
  work (and for ``hot_window`` seconds after the last activity; then it too spins up to
  ``busy_poll_us`` when nothing else is runnable, or, on crowded CPUs, gives the CPU
  away with ``sched_yield`` on each pass), and every ``idle_interval`` seconds when
  idle, so an idle node costs almost no CPU;
* sends are posted directly by ``send`` (``Isend`` + ``Test``). A message of one frame
  up to ``inline_max`` bytes is copied into the MPI message, so ``send`` returns once it
  is posted, without suspending, whether or not MPI completed it yet (completion is
  then tracked like a control message's); beyond 64 such sends outstanding, ``send``
  waits for completion (back-pressure). Other messages return once MPI completed them.

Frames of 32 KiB or more that travel apart from their envelope are received into
pooled numpy arrays (in power-of-two size classes, at most ``recv_pool_bytes``): an
array is reused only once the receiver dropped every view of it, which CPython's
reference count tells exactly; fresh memory would cost a page fault and kernel zeroing
per page, about as much as the transfer itself. An array unused for
``HPCPROC_POOL_IDLE_S`` seconds (default 5) is freed
(:mod:`~hpcproc.transports._idle_pool`).

What bounds the figures (measured here, two ranks, noisy shared 2-core machine): raw
``Send``/``Recv`` makes an 8-byte round trip in 2.2-2.4 us. The benchmark's
``asyncio-floor`` baseline (``bench/baselines/mpi.py``) makes the same MPI calls as
this transport (``Isend`` + ``Test``; ``Improbe`` + ``Recv``) from an ``async`` send
and an ``async`` spinning receive, with one lock and one dictionary lookup per
message and nothing else: it takes 6.4-7 us, already about 3x raw mpi4py. In Python
this transport takes 10-12 us: it also checks the link's generation and the
connection, keeps the endpoint's event queue, and spins only while the loop is idle. A
spinning receiver takes a small message for its own endpoint straight into its queue
(:meth:`_Engine.take_one`), and ``send`` of one small frame posts it in one call
(``_MpiLink.send_now``). Where the optional compiled part was built (``_mpi_accel.c``,
at install where a C compiler exists; ``HPCPROC_MPI_ACCEL=0`` turns it off), those
two paths and the spinning receive's loop of turns run in C, with the same checks and
still through mpi4py: 7.1-7.8 us, 1.1-1.15x the floor. A one-frame message of up to
``inline_max`` bytes is copied behind its envelope, and at 32 KiB a buffer written just
before it is sent travels much slower here (a raw mpi4py ping-pong, ``Send`` and
``Improbe`` + ``Recv``: 21-22 us a round trip when each sender first writes its 32 KiB
buffer, 9.3-9.9 us when it does not): the transport's 32 KiB round trip takes 23-27 us
against the benchmark's mpi4py 13-14 us, whose buffers are never written (separate
frames, which copy nothing, take 29-31 us: a second message, and MPI's rendezvous).
Large frames are received into pooled buffers, so a
receiver that drops each message before the next reuses one buffer and a 16 MiB round
trip runs at raw speed; alternating between buffers costs UCX registrations (raw
mpi4py alternating two receive buffers drops from 12 to 7 GB/s here). A spinning
receiver that takes the envelope of a message of separate frames of up to 1 MiB in all
waits for those frames on their own requests (for up to ``busy_poll_us``) and hands the
message over itself, as it does a small one (:meth:`_Engine._take_direct`). With the
compiled part, a one-frame message takes that path in C (its pooled buffer, the frame's
receive, the wait, the hand-over), and so does the spin of a sender waiting for its
frame's completion (``Spinner.spin``): the Python of those paths cost about 10 us of a
256 KiB round trip of 66 us (raw mpi4py making the same calls: 48), which now takes
53-58 us.

Calls may come from several threads when several event loops use MPI endpoints, so they
are serialised by a lock, and MPI must provide ``MPI_THREAD_SERIALIZED`` or better
(mpi4py's default initialisation asks for ``MPI_THREAD_MULTIPLE``); this is checked when
the transport is created.

Failures MPI cannot report, and bounded shutdown
------------------------------------------------
MPI has no failure notification: if a rank dies, its peers are not told (under
``mpiexec`` and ``srun`` the launcher usually kills the whole job instead). Small sends
to a dead rank complete eagerly and are lost, large sends never complete, and a connect
waits for an answer until its timeout (``connect_timeout`` when the caller gives none).
Detecting a dead node is the job of the launcher-level node monitor, which sees the
process or host go away and lets the process layer fail the bundle. What the transport
guarantees is that nothing waits forever on a silent peer: ``send`` waits only while
the link is up and at most ``send_timeout`` (then the bundle fails; MPI cannot retract
a posted send, so a peer that resumes may still receive that message, before its
``CONNECTION_LOST``), a link's graceful
close is bounded by the core's ``LINK_CLOSE_TIMEOUT``
and then aborted (its pending sends fail), and closing the last endpoint drains
outstanding requests for at most ``drain_timeout`` seconds. Send requests still
outstanding after that are never cancelled (cancelling a send would desynchronise the
receiver's envelope/frame stream); they are kept, with their buffers, and abandoned.
Frame receives stay posted so the stream stays in step if the peer resumes.

Heartbeats (:mod:`._multiplex`): a link idle for a tick (``HPCPROC_TICK``, default
15 s; this transport has no ``tick`` option) carries a frameless ``TICK`` envelope,
posted like any control message (an eager ``Isend``, never awaited); any message of
the link's generation counts as a sign of life. A rank that stops progressing MPI (a
hung or stopped process, or one that died while the launcher let the job run) is so
lost after 4 silent ticks, which MPI itself would never report. MPI's non-overtaking
order puts a tick behind a large frame still in flight, and the receiver counts a
message only once it is whole: a single frame must take less than 4 ticks to arrive.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import itertools
import logging
import operator
import os
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np

from .._host import local_pid, process_identity
from .._loops import running_loop
from ..mpi_init import import_mpi
from ._busy_poll import FAIR_STREAK, PROBE_MIN, IdlePoller, check_budget
from ._idle_pool import IdleTrimmer, idle_seconds
from ._multiplex import (
    Kind,
    Link,
    MultiplexedEndPoint,
    MultiplexedTransport,
    OutgoingConnection,
    _State,
    new_received,
)
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
    TransportError,
)

if TYPE_CHECKING:
    from mpi4py import MPI

    from ._mpi_accel import Sender, Spinner

__all__ = [
    "MpiTransport",
    "MpiUnavailableError",
    "create_transport",
]

log = logging.getLogger("hpcproc.transports.mpi")

_PREFIX = b"mpi:"
_TAG = 0x4850  # "HP"; the only tag the transport uses on its own communicator
_ENVELOPE = struct.Struct("<BBHIIIQQ")  # kind flags pad nframes src_ep dst_ep gen conn_id
_LEN = struct.Struct("<Q")
#: An envelope with a one-frame length table: the common small message, one unpack.
_ONE = struct.Struct(_ENVELOPE.format + "Q")
_NFRAMES = struct.Struct("<I")
_NFRAMES_AT = 4  # offset of nframes in the envelope
_FLAG_INLINE = 1
#: Separate frames this large are received into pooled arrays (_BufferPool): fresh
#: memory for every 256 KiB frame made its round trip 2.88x mpi4py's, pooled 1.62x
#: (medians of 6 interleaved runs of the transport benchmark).
_POOL_MIN = 32 << 10
#: Arrays of one size class that ``_BufferPool.take`` looks at, at most.
_POOL_SCAN = 8
#: Envelopes (with inline frames) and separate frames up to this size are received
#: into a bytearray, which zero-fills; larger ones (below _POOL_MIN, or envelopes)
#: into uninitialised numpy memory (an allocation costs more than zeroing a few KiB,
#: less than zeroing more).
_ZERO_FILL_MAX = 16 << 10
#: DATA messages of separate frames up to this size in all are received directly by a
#: spinning receiver (``_Engine._take_direct``); larger ones take longer to copy than
#: the receiver's spin budget.
_DIRECT_MAX = 1 << 20

DEFAULT_INLINE_MAX = 32 * 1024
DEFAULT_BUSY_POLL_US = 200.0
DEFAULT_HOT_WINDOW = 0.01
DEFAULT_IDLE_INTERVAL = 0.001
DEFAULT_CONNECT_TIMEOUT = 60.0
DEFAULT_DRAIN_TIMEOUT = 5.0
DEFAULT_MAX_FRAMES = 1 << 16
DEFAULT_MAX_MESSAGE = 1 << 32
DEFAULT_RECV_POOL_BYTES = 256 << 20
DEFAULT_SEND_TIMEOUT = 120.0

_ADDRESS_CACHE = 4096  # peers whose address bytes an endpoint keeps
_POLL_BATCH = 64  # envelopes taken per progress call, so one call stays short
#: Small sends outstanding beyond which ``send`` waits for completion (back-pressure).
_MAX_UNTRACKED = 64


class _Msg(enum.IntEnum):
    """Message kinds on the wire: the core's three, plus link management."""

    OPEN = Kind.OPEN
    DATA = Kind.DATA
    CLOSE = Kind.CLOSE
    HELLO = 4  # open a link with generation g
    ACCEPT = 5  # link g accepted
    REFUSE = 6  # no such endpoint
    CROSSED = 7  # both sides connected at once; use the link the other side opened
    DOWN = 8  # link g is dead (closed, broken, or a protocol violation)
    TICK = 9  # link g is alive (a heartbeat on an idle link; see _multiplex)


class MpiUnavailableError(TransportError):
    """MPI cannot be used by this transport (thread level too low, finalized)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


def format_address(rank: int, endpoint_id: int) -> EndPointAddress:
    """The address of endpoint ``endpoint_id`` on ``rank``."""
    return EndPointAddress(b"%s%d:%d" % (_PREFIX, rank, endpoint_id))


def parse_address(address: bytes) -> tuple[int, int]:
    """``(rank, endpoint id)`` from an address.

    Raises:
        ValueError: not an MPI transport address.
    """
    if not address.startswith(_PREFIX):
        raise ValueError(f"not an mpi address: {address!r}")
    parts = address[len(_PREFIX) :].split(b":")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 10 for p in parts):
        raise ValueError(f"malformed mpi address: {address!r}")
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------- engine


class _SendOp:
    """Completion of the MPI sends of one message; ``future`` is set when all are done."""

    __slots__ = ("future", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, remaining: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.remaining = remaining


#: One received link message: ``(src rank, kind, src_ep, dst_ep, generation, conn_id,
#: frames)``. A plain tuple: it is built for every message on the hot path.
_Inbound = tuple[int, int, int, int, int, int, list[memoryview]]


class _Partial:
    """A DATA message whose frames are still being received."""

    __slots__ = ("msg", "remaining")

    def __init__(self, msg: _Inbound, remaining: int) -> None:
        self.msg = msg
        self.remaining = remaining


class _Direct(NamedTuple):
    """A DATA message whose frames :meth:`_Engine._take_direct` is to receive."""

    src_ep: int
    gen: int
    conn_id: int
    lengths: list[int]


class _ProtocolError(Exception):
    pass


def _frame_of_another_length(length: int, received: int) -> str:
    """Why a sender is dropped whose frame of ``length`` bytes (by its envelope) arrived
    with ``received``."""
    return f"a frame of {length} bytes by its envelope arrived with {received}"


class _Pooled:
    """One pooled array and when it was last handed out (``time.monotonic``)."""

    __slots__ = ("array", "used")

    def __init__(self, array: np.ndarray[Any, Any], used: float) -> None:
        self.array = array
        self.used = used


class _BufferPool:
    """Receive buffers for large frames, reused once nothing but the pool refers to them.

    A large frame is received into (a view of) a pooled numpy array and handed to the
    receiver as a view of it; the array is reused only when every view of it, and
    everything built on them (arrays rebuilt by the serializer, for instance), is
    gone, which CPython's reference count tells exactly. Reusing warm memory avoids
    the page faults and kernel zeroing of a fresh allocation, which cost about as much
    as the transfer itself. At most ``limit`` bytes are pooled; beyond that frames get
    fresh arrays that the pool does not keep.

    Arrays come in size classes (powers of two), so frames of varying lengths share
    them. ``take`` is O(1): it looks at no more than :data:`_POOL_SCAN` arrays of the
    frame's class, the first ones of its list, so a receiver that drops each message
    before the next gets the same array every time (alternating buffers costs MPI
    memory registrations). Arrays a receiver holds for long move to the back of the
    list once a ``take`` found them all held.
    """

    def __init__(self, limit: int, lock: threading.RLock) -> None:
        self.limit = limit
        self.classes: dict[int, deque[_Pooled]] = {}
        #: Bytes of the arrays in the pool (held by a receiver or not).
        self.total = 0
        self._lock = lock
        self._trimmer = IdleTrimmer(idle_seconds(), self._trim)

    def take(self, length: int) -> np.ndarray[Any, Any]:
        """``length`` bytes of an array nobody else refers to (caller holds the lock)."""
        if running_loop() is not None:
            self._trimmer.touch()
        size = 1 << (length - 1).bit_length()
        pooled = self.classes.get(size)
        if pooled is None:
            pooled = self.classes[size] = deque()
        n = len(pooled)
        for i in range(n if n < _POOL_SCAN else _POOL_SCAN):
            entry = pooled[i]
            # 2: the entry's reference and getrefcount's argument; nobody else's.
            if sys.getrefcount(entry.array) == 2:
                entry.used = time.monotonic()
                return entry.array if length == size else entry.array[:length]
        if n > _POOL_SCAN:
            pooled.rotate(-_POOL_SCAN)  # the next take looks at others first
        if self.total + size > self.limit:
            self._evict(self.total + size - self.limit)
        array = np.empty(size, dtype=np.uint8)
        if self.total + size <= self.limit:
            pooled.appendleft(_Pooled(array, time.monotonic()))
            self.total += size
        return array if length == size else array[:length]

    def _evict(self, wanted: int) -> None:
        """Free at least ``wanted`` bytes of arrays nobody holds, if there are so many.

        Looks at the first :data:`_POOL_SCAN` arrays of each class only (there are a
        few dozen classes at most), so that a full pool whose arrays are all held
        does not cost a scan of all of them per frame.
        """
        for size, pooled in self.classes.items():
            n = len(pooled)
            for i in reversed(range(n if n < _POOL_SCAN else _POOL_SCAN)):
                if sys.getrefcount(pooled[i].array) == 2:
                    del pooled[i]
                    self.total -= size
                    wanted -= size
                    if wanted <= 0:
                        return

    def _trim(self, cutoff: float) -> bool:
        """Free arrays nobody holds that were last used before ``cutoff``.

        Without this, the pool kept up to ``limit`` bytes resident for the life of
        the process after the application dropped every message (issue 15).
        """
        with self._lock:
            for size, pooled in list(self.classes.items()):
                keep = deque(e for e in pooled if e.used >= cutoff or sys.getrefcount(e.array) > 2)
                self.total -= size * (len(pooled) - len(keep))
                if keep:
                    self.classes[size] = keep
                else:
                    del self.classes[size]
            return bool(self.classes)


class _Engine:
    """All MPI traffic of one process on one (duplicated) communicator.

    Shared by every transport on that communicator. Every method that calls MPI holds
    ``lock``; endpoint callbacks run outside it, on the endpoint's loop.
    """

    def __init__(self, mpi: Any, comm: MPI.Comm, options: _Options) -> None:
        self.MPI = mpi
        self.comm: MPI.Comm = comm.Dup()
        self.comm.Set_errhandler(mpi.ERRORS_RETURN)
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        #: Per rank, its pid where it is another process of this host and pid
        #: namespace, else 0: a link to it counts its CPUs for the crowding (see
        #: Crowding.peer_linked). Collective, as the Dup above.
        self.local_pids: list[int] = [
            local_pid(space, pid) for space, pid in self.comm.allgather(process_identity())
        ]
        self.options = options
        self.lock = threading.RLock()
        self.endpoints: dict[int, _MpiEndPoint] = {}
        self.next_endpoint_id = itertools.count(1)
        self.next_gen = itertools.count(1)
        self._status = mpi.Status()
        self._byte = mpi.BYTE
        self._any_source = mpi.ANY_SOURCE
        # Outstanding sends: request i belongs to op i (None for control messages).
        self._send_reqs: list[MPI.Request] = []
        self._send_ops: list[_SendOp | None] = []
        # Outstanding frame receives: request i fills a frame of message i, of the
        # length its envelope declared; statuses are filled by Testsome (reused).
        self._recv_reqs: list[MPI.Request] = []
        self._recv_msgs: list[_Partial] = []
        self._recv_lens: list[int] = []
        self._recv_statuses: list[MPI.Status] = []
        # Per source rank, messages in arrival order, delivered once complete.
        self._inbound: dict[int, deque[_Inbound | _Partial]] = {}
        self._poisoned: set[int] = set()
        self._pumps: dict[asyncio.AbstractEventLoop, _Pump] = {}
        #: When progress last moved anything (``time.monotonic``); pumps stay hot after.
        self.last_activity = time.monotonic()
        self._envelopes: dict[int, struct.Struct] = {}
        self._pool = _BufferPool(options.recv_pool_bytes, self.lock)
        #: How long :meth:`_take_direct` waits for a frame on its own (seconds).
        self._direct_wait = options.busy_poll_us * 1e-6
        self.closed = False

    # ------------------------------------------------------------------ sending

    def _envelope(self, nframes: int) -> struct.Struct:
        env = self._envelopes.get(nframes)
        if env is None:
            env = struct.Struct(f"<BBHIIIQQ{nframes}Q")
            if nframes <= 16:
                self._envelopes[nframes] = env
        return env

    def post_control(
        self, dest: int, kind: _Msg, src_ep: int, dst_ep: int, gen: int, conn_id: int
    ) -> None:
        """Send a frameless message; never blocks (completion is tracked by progress)."""
        data = _ENVELOPE.pack(kind, 0, 0, 0, src_ep, dst_ep, gen, conn_id)
        with self.lock:
            if self.closed:
                return
            req = self.comm.Isend([data, self._byte], dest, _TAG)
            if not req.Test():
                self._send_reqs.append(req)
                self._send_ops.append(None)

    def post_data(
        self,
        dest: int,
        src_ep: int,
        dst_ep: int,
        gen: int,
        conn_id: int,
        frames: Sequence[Buffer],
        loop: asyncio.AbstractEventLoop,
        inline_max: int,
    ) -> _SendOp | None:
        """Post a DATA message; ``None`` if already complete, else its pending op.

        Raises:
            MPI.Exception: the MPI library refused the send.
        """
        if len(frames) == 1:
            # One large contiguous frame (an array), sent apart: without the lists
            # and the datatype argument of the general case.
            frame = frames[0]
            view = frame if type(frame) is memoryview else memoryview(frame)  # type: ignore[arg-type]
            length = view.nbytes
            if length > inline_max and view.c_contiguous:
                if view.ndim != 1 or view.format != "B":
                    view = view.cast("B")
                head = _ONE.pack(_DATA, 0, 0, 1, src_ep, dst_ep, gen, conn_id, length)
                with self.lock:
                    if self.closed:
                        raise ConnectionError("mpi transport engine is shut down")
                    comm = self.comm
                    sent_head = comm.Isend(head, dest, _TAG)
                    return self._track((sent_head, comm.Isend(view, dest, _TAG)), loop)
        views = [memoryview(f) for f in frames]
        lengths = [v.nbytes for v in views]
        n = len(views)
        total = sum(lengths)
        inline = total <= inline_max
        head = self._envelope(n).pack(
            _DATA, _FLAG_INLINE if inline else 0, 0, n, src_ep, dst_ep, gen, conn_id, *lengths
        )
        byte = self._byte
        with self.lock:
            if self.closed:
                raise ConnectionError("mpi transport engine is shut down")
            if inline:
                data = b"".join([head, *[v if v.c_contiguous else v.tobytes() for v in views]])
                req = self.comm.Isend([data, byte], dest, _TAG)
                if req.Test():
                    return None
                op = _SendOp(loop, 1)
                self._send_reqs.append(req)
                self._send_ops.append(op)
                return op
            reqs = [self.comm.Isend([head, byte], dest, _TAG)]
            for v in views:
                if not v.c_contiguous:
                    v = memoryview(v.tobytes())
                elif v.ndim != 1 or v.format != "B":
                    v = v.cast("B")
                reqs.append(self.comm.Isend([v, byte], dest, _TAG))
            return self._track(reqs, loop)

    def _track(
        self, reqs: Sequence[MPI.Request], loop: asyncio.AbstractEventLoop
    ) -> _SendOp | None:
        """The op of the send requests ``reqs`` that a ``Test`` each finds still
        pending, tracked until progress completes them; None if none is (caller holds
        the lock)."""
        pending = [r for r in reqs if not r.Test()]
        if not pending:
            return None
        op = _SendOp(loop, len(pending))
        self._send_reqs.extend(pending)
        self._send_ops.extend([op] * len(pending))
        return op

    # ------------------------------------------------------------------ progress

    def progress(self, batch: bool = True, endpoint: _MpiEndPoint | None = None) -> bool:
        """Test outstanding requests, take new envelopes, dispatch; True if anything moved.

        With ``batch`` false, at most one new envelope is taken (a caller waiting for
        one event wants it as soon as it is there). With ``endpoint`` (the caller runs
        on its loop), a small DATA message for it goes straight to its event queue.
        Never blocks. Must be called on an event-loop thread.
        """
        with self.lock:
            if self.closed:
                return False
            if not (self._send_reqs or self._recv_reqs):
                # The common idle case (spinning in receive): one probe, no allocation.
                message = self.comm.Improbe(self._any_source, _TAG, self._status)
                if message is None:
                    return False
                done: list[_SendOp] = []
                ready: list[_Inbound] = []
                self._take(message, ready, endpoint)
            else:
                done = []
                ready = []
                if self._send_reqs:
                    self._test_sends(done)
                if self._recv_reqs:
                    self._test_recvs(ready)
                message = self.comm.Improbe(self._any_source, _TAG, self._status)
                if message is None:
                    if not (done or ready):
                        return False
                else:
                    self._take(message, ready, endpoint)
            if message is not None and batch:
                self._poll(ready)
            if ready:
                loop = endpoint.loop if endpoint is not None else running_loop()
                ready = self._sort_out(ready, loop)
        self.last_activity = time.monotonic()
        for op in done:
            _set_result(op.loop, op.future)
        for msg in ready:
            self._route(msg)
        return True

    def busy(self) -> bool:
        """Whether requests are outstanding (the pump then keeps polling every iteration)."""
        return bool(self._send_reqs or self._recv_reqs)

    def _test_sends(self, done: list[_SendOp]) -> None:
        indices = self.MPI.Request.Testsome(self._send_reqs)
        if not indices:
            return
        finished = set(indices)
        for i in indices:
            op = self._send_ops[i]
            if op is not None:
                op.remaining -= 1
                if op.remaining == 0:
                    done.append(op)
        self._send_reqs = [r for i, r in enumerate(self._send_reqs) if i not in finished]
        self._send_ops = [o for i, o in enumerate(self._send_ops) if i not in finished]

    def _test_recvs(self, ready: list[_Inbound]) -> None:
        """Complete the frame receives that are done, and release their messages.

        A frame whose length differs from what its envelope declared breaks the
        protocol (only a buggy peer sends one): shorter, its buffer would hold stale
        bytes past what was sent; longer, MPI truncates it (an error in its status).
        Its sender is poisoned, and nothing of the message is delivered.
        """
        reqs = self._recv_reqs
        statuses = self._recv_statuses
        while len(statuses) < len(reqs):
            statuses.append(self.MPI.Status())
        try:
            indices = self.MPI.Request.Testsome(reqs, statuses)
            failed = False
        except self.MPI.Exception as exc:
            if exc.Get_error_class() != self.MPI.ERR_IN_STATUS:
                raise
            indices = self._completed_in_error(reqs)
            failed = True
        if not indices:
            return
        finished = set(indices)
        sources: set[int] = set()
        lengths, byte, poisoned = self._recv_lens, self._byte, self._poisoned
        for k, i in enumerate(indices):
            partial = self._recv_msgs[i]
            src = partial.msg[0]
            partial.remaining -= 1
            if src in poisoned:
                continue
            status = statuses[k]
            if failed and (error := status.Get_error()) != self.MPI.SUCCESS:
                self._poison(src, self._frame_failed(lengths[i], error))
            elif (received := status.Get_count(byte)) != lengths[i]:
                self._poison(src, _frame_of_another_length(lengths[i], received))
            elif partial.remaining == 0:
                sources.add(src)
        self._recv_reqs = [r for i, r in enumerate(reqs) if i not in finished]
        self._recv_msgs = [m for i, m in enumerate(self._recv_msgs) if i not in finished]
        self._recv_lens = [n for i, n in enumerate(lengths) if i not in finished]
        for src in sources - poisoned:
            self._release_in_order(src, ready)

    def _completed_in_error(self, reqs: list[MPI.Request]) -> list[int]:
        """The indices of the requests that a ``Testsome`` which raised
        ``MPI_ERR_IN_STATUS`` completed, ascending: the order of the statuses it
        filled, each with its error field (only then set: read it only then).

        MPICH sets every completed request to null, a failed one too. Open MPI leaves
        a failed one as it was (not null, complete, its error in its status): it is
        freed here, so that the next ``Testsome`` does not report it again. A request
        that completed without an error since is left for the next ``Testsome``
        (its status is not among these).
        """
        mpi = self.MPI
        status = mpi.Status()
        completed = []
        for i, req in enumerate(reqs):
            if req == mpi.REQUEST_NULL:
                completed.append(i)
                continue
            try:
                failed = req.Get_status(status) and status.Get_error() != mpi.SUCCESS
            except mpi.Exception:
                failed = True
            if failed:
                req.Free()
                completed.append(i)
        return completed

    def _release_in_order(self, src: int, ready: list[_Inbound]) -> None:
        queue = self._inbound[src]
        while queue:
            head = queue[0]
            if type(head) is _Partial:
                if head.remaining:
                    return
                queue.popleft()
                ready.append(head.msg)
            else:
                ready.append(queue.popleft())  # type: ignore[arg-type]

    def _poll(self, ready: list[_Inbound]) -> None:
        comm, status, source = self.comm, self._status, self._any_source
        for _ in range(_POLL_BATCH):
            message = comm.Improbe(source, _TAG, status)
            if message is None:
                return
            self._take(message, ready)

    def take_one(self, endpoint: _MpiEndPoint) -> bool:
        """``progress(False)`` for a receiver spinning on ``endpoint`` (on its loop):
        first what other threads took for it, then one probe, a small DATA message for
        it going straight to its event queue (or its receiver). False once the engine
        is shut down, or a message went to one of the endpoint's receivers (which ends
        a poll as an event does: see ``EndPoint.set_receiver``)."""
        handed_over = endpoint._handed_over
        if endpoint._inbox:
            endpoint._drain_inbox()
            return endpoint._handed_over == handed_over
        if self._send_reqs or self._recv_reqs:  # read unlocked: only a hint
            self.progress(False, endpoint)
            return not self.closed and endpoint._handed_over == handed_over
        # progress(False, endpoint)'s idle case written out: this runs once per turn
        # of the spin, and a frame less per turn is a reply seen sooner.
        with self.lock:
            if self.closed:
                return False
            message = self.comm.Improbe(self._any_source, _TAG, self._status)
            if message is None:
                return True
            ready: list[_Inbound] = []
            self._take(message, ready, endpoint)
            if ready:
                ready = self._sort_out(ready, endpoint.loop)
        self.last_activity = time.monotonic()
        for msg in ready:
            self._route(msg)
        return endpoint._handed_over == handed_over

    def _sort_out(
        self, ready: list[_Inbound], loop: asyncio.AbstractEventLoop | None
    ) -> list[_Inbound]:
        """Called with the lock held, in the order messages were taken: the messages
        of ``ready`` that the caller, on ``loop``, hands to their endpoints itself once
        the lock is released (and those for no endpoint).

        Every other message goes to its endpoint's inbox, which that endpoint's own
        loop drains in order. A message is handed over directly only while its
        endpoint's inbox is empty, so messages reach an endpoint in the order they
        were taken even when threads of several event loops make progress.
        """
        mine = []
        endpoints = self.endpoints
        for msg in ready:
            endpoint = endpoints.get(msg[3])
            if endpoint is None or (endpoint.loop is loop and not endpoint._inbox):
                mine.append(msg)
                continue
            inbox = endpoint._inbox
            inbox.append(msg)
            if len(inbox) == 1:
                _call_soon_threadsafe(endpoint.loop, endpoint._drain_inbox)
        return mine

    def _take(
        self, message: MPI.Message, ready: list[_Inbound], endpoint: _MpiEndPoint | None = None
    ) -> None:
        """Receive the envelope that ``message`` (just probed into ``_status``) holds.

        A small DATA message for ``endpoint`` (whose loop is running) is delivered to
        it directly instead of being added to ``ready``, and one of separate frames
        up to ``_DIRECT_MAX`` bytes is received at once (:meth:`_take_direct`),
        unless ``ready`` holds messages already (taken earlier: they are routed
        first, in order).
        """
        status, byte = self._status, self._byte
        src = status.Get_source()
        size = status.Get_count(byte)
        # bytearray zero-fills: beyond a few KiB, uninitialised numpy memory is cheaper.
        buf: Any = bytearray(size) if size < _ZERO_FILL_MAX else np.empty(size, np.uint8)
        message.Recv([buf, byte])
        if src in self._poisoned:
            return
        if (
            endpoint is not None
            and not ready
            and _deliver_inline is not None
            and _deliver_inline(endpoint, buf, src, self.options.max_message, self._inbound)
        ):
            # The fast path of _taken and _deliver_data's, in C: a DATA message of one
            # inline frame for a live link and open connection of endpoint.
            return
        self._taken(src, buf, ready, endpoint)

    def _taken(
        self, src: int, buf: Any, ready: list[_Inbound], endpoint: _MpiEndPoint | None
    ) -> None:
        """:meth:`_take` once the envelope ``buf`` from ``src`` (not poisoned) was
        received (the compiled ``take_one`` calls it for what it does not take itself)."""
        size = len(buf)
        if size >= _ONE.size:
            # Fast path: a DATA message of one inline frame (same checks as _parse).
            kind, flags, _, nframes, src_ep, dst_ep, gen, conn_id, length = _ONE.unpack_from(buf)
            if (
                kind == _DATA
                and nframes == 1
                and flags & _FLAG_INLINE
                and size == _ONE.size + length
                and length <= self.options.max_message
                and not self._inbound.get(src)
            ):
                frames = [memoryview(buf)[_ONE.size :]]
                if (
                    endpoint is None
                    or ready
                    or dst_ep != endpoint.endpoint_id
                    or endpoint._inbox
                    or not endpoint._deliver_data(src, src_ep, gen, conn_id, frames)
                ):
                    ready.append((src, kind, src_ep, dst_ep, gen, conn_id, frames))
                return
            if (
                endpoint is not None
                and not ready
                and kind == _DATA
                and nframes == 1
                and not flags & _FLAG_INLINE
                and size == _ONE.size
                and length <= self.options.max_message
                and self._direct_to(endpoint, src, dst_ep, length)
            ):
                self._take_direct(src, src_ep, gen, conn_id, [length], ready, endpoint)
                return
        try:
            msg = self._parse(src, buf, None if ready else endpoint)
        except _ProtocolError as exc:
            self._poison(src, str(exc))
            return
        if isinstance(msg, _Direct):
            assert endpoint is not None
            self._take_direct(src, msg.src_ep, msg.gen, msg.conn_id, msg.lengths, ready, endpoint)
            return
        queue = self._inbound.get(src)
        if queue is None:
            queue = self._inbound[src] = deque()
        if type(msg) is tuple and not queue:
            ready.append(msg)
        else:
            queue.append(msg)

    def _direct_to(self, endpoint: _MpiEndPoint, src: int, dst_ep: int, total: int) -> bool:
        """Whether ``endpoint``'s spinning receiver takes a message of separate frames
        (``total`` bytes) from ``src`` for endpoint ``dst_ep`` itself
        (:meth:`_take_direct`): it is for that endpoint, small enough to copy within the
        spin budget, and nothing of ``src`` waits before it (in the endpoint's inbox or
        this engine's queue of ``src``)."""
        return (
            total <= _DIRECT_MAX
            and dst_ep == endpoint.endpoint_id
            and not endpoint._inbox
            and not self._inbound.get(src)
        )

    def _take_direct(
        self,
        src: int,
        src_ep: int,
        gen: int,
        conn_id: int,
        lengths: list[int],
        ready: list[_Inbound],
        endpoint: _MpiEndPoint,
    ) -> None:
        """Receive the frames of a DATA message for ``endpoint``, whose receiver spins
        on its loop, and hand it over as :meth:`_take` does a small one.

        The sender posted the frames with their envelope, so they are in flight: this
        waits for them on their own requests, in order, for up to the receiver's spin
        budget, instead of going through the outstanding-receive bookkeeping that
        other frames take (a 256 KiB frame's round trip of the raw transport: 83
        against 65-72 us; the benchmark's ratio to mpi4py 1.81 against 1.42). Frames
        not complete by then join that bookkeeping, in order. Each frame's length is
        checked as :meth:`_test_recvs` checks it.
        """
        targets = [self._frame_target(length) for length in lengths]
        frames = [memoryview(target) for target in targets]
        comm, byte = self.comm, self._byte
        reqs = [comm.Irecv([target, byte], src, _TAG) for target in targets]
        status = self._status
        perf_counter = time.perf_counter
        deadline = perf_counter() + self._direct_wait
        done = 0
        problem = None
        try:
            while done < len(reqs):
                if reqs[done].Test(status):
                    if (received := status.Get_count(byte)) != lengths[done]:
                        problem = _frame_of_another_length(lengths[done], received)
                        done += 1
                        break
                    done += 1
                elif perf_counter() >= deadline:
                    break
        except self.MPI.Exception as exc:
            problem = self._direct_failed(reqs[done], lengths[done], exc)
            done += 1
        if (
            done == len(reqs)
            and problem is None
            and endpoint._deliver_data(src, src_ep, gen, conn_id, frames)
        ):
            return
        self._direct_settle(
            (src, _DATA, src_ep, endpoint.endpoint_id, gen, conn_id, frames),
            reqs,
            lengths,
            done,
            problem,
            ready,
        )

    def _direct_failed(self, req: MPI.Request, length: int, exc: Any) -> str:
        """Why a sender is dropped whose frame (``length`` bytes by its envelope) a
        direct receive ``req`` was taking when its ``Test`` raised ``exc`` (an
        ``MPI.Exception``); frees ``req`` where the library kept it (Open MPI)."""
        if req != self.MPI.REQUEST_NULL:
            req.Free()
        return self._frame_failed(length, exc.Get_error_code())

    def _direct_settle(
        self,
        msg: _Inbound,
        reqs: list[MPI.Request],
        lengths: list[int],
        done: int,
        problem: str | None,
        ready: list[_Inbound],
    ) -> None:
        """The end of a direct receive of ``msg`` (:meth:`_take_direct`) that did not
        hand it over: its frames' receives ``reqs`` from the ``done``-th on join the
        outstanding-receive bookkeeping, in order (completed there, or cancelled when
        ``problem``, why a frame failed, poisons its sender); a message whose frames
        all arrived joins ``ready`` (its connection was not found: :meth:`_route`
        deals with it)."""
        if done == len(reqs) and problem is None:
            ready.append(msg)
            return
        # The rest joins the bookkeeping: completed there, or cancelled by _poison.
        partial = _Partial(msg, len(reqs) - done)
        for i in range(done, len(reqs)):
            self._await_frame(reqs[i], partial, lengths[i])
        src = msg[0]
        if problem is not None:
            self._poison(src, problem)
        else:
            self._inbound.setdefault(src, deque()).append(partial)

    def _took_one_direct(
        self,
        msg: _Inbound,
        req: MPI.Request,
        length: int,
        outcome: int | Exception | None,
        ready: list[_Inbound],
    ) -> None:
        """:meth:`_direct_settle` for the compiled spinner, which takes a one-frame
        message directly (``_mpi_accel.c``: :meth:`_take_direct` but its end) and hands
        it over itself when it can: ``outcome`` is what the frame's receive ``req``
        came to, the byte count received (complete), None (still in flight at the
        deadline) or the ``MPI.Exception`` its ``Test`` raised."""
        if outcome is None:
            done, problem = 0, None
        elif isinstance(outcome, int):
            done = 1
            problem = None if outcome == length else _frame_of_another_length(length, outcome)
        else:
            done, problem = 1, self._direct_failed(req, length, outcome)
        self._direct_settle(msg, [req], [length], done, problem, ready)

    def _frame_failed(self, length: int, error: int) -> str:
        """Why a sender is dropped whose frame of ``length`` bytes (by its envelope)
        completed with MPI error ``error``."""
        reason = self.MPI.Get_error_string(error).strip()
        return f"a frame of {length} bytes by its envelope failed ({reason}; longer than declared?)"

    def _await_frame(self, req: MPI.Request, msg: _Partial, length: int) -> None:
        """Track the receive ``req`` of a frame of ``length`` bytes of ``msg`` until
        progress completes it (:meth:`_test_recvs`; caller holds the lock)."""
        self._recv_reqs.append(req)
        self._recv_msgs.append(msg)
        self._recv_lens.append(length)

    def _frame_target(self, length: int) -> Any:
        """A buffer for a separate frame of ``length`` bytes (caller holds the lock)."""
        if length >= _POOL_MIN:
            return self._pool.take(length)
        if length >= _ZERO_FILL_MAX:
            # Uninitialised, as in _take: bytearray's zero fill cost 5-10 us of a 256
            # KiB frame's hop, for bytes MPI overwrites at once (raw transport round
            # trip, 8 interleaved runs: median 135 against 145 us).
            return np.empty(length, np.uint8)
        return bytearray(length)

    def _parse(
        self, src: int, buf: Any, endpoint: _MpiEndPoint | None = None
    ) -> _Inbound | _Partial | _Direct:
        """The message of envelope ``buf`` from ``src``: whole (inline or frameless),
        or awaiting its frames, whose receives are posted. With ``endpoint`` (a
        spinning receiver on its loop, nothing taken before), a DATA message of
        separate frames for it, up to ``_DIRECT_MAX`` bytes, if nothing of its sender
        waits before it, is left to :meth:`_take_direct` (nothing posted).

        Raises:
            _ProtocolError: the envelope breaks the protocol.
        """
        size = len(buf)
        if size < _ENVELOPE.size:
            raise _ProtocolError(f"short envelope of {size} bytes")
        nframes: int = _NFRAMES.unpack_from(buf, _NFRAMES_AT)[0]
        if nframes > self.options.max_frames:
            raise _ProtocolError(f"{nframes} frames, more than the limit")
        table_end = _ENVELOPE.size + _LEN.size * nframes
        if size < table_end:
            raise _ProtocolError("envelope shorter than its length table")
        # One unpack for the envelope and its length table.
        kind, flags, _, _, src_ep, dst_ep, gen, conn_id, *lengths = self._envelope(
            nframes
        ).unpack_from(buf)
        if kind not in _KINDS:
            raise _ProtocolError(f"unknown message kind {kind}")
        if nframes and kind != _Msg.DATA:
            raise _ProtocolError(f"{_Msg(kind).name} message carries {nframes} frames")
        total = sum(lengths)
        if total > self.options.max_message:
            raise _ProtocolError(f"message of {total} bytes exceeds the limit")
        frames: list[memoryview] = []
        if flags & _FLAG_INLINE or not nframes:
            if size != table_end + total:
                raise _ProtocolError("inline message size does not match its lengths")
            view = memoryview(buf)
            pos = table_end
            for length in lengths:
                frames.append(view[pos : pos + length])
                pos += length
            return (src, kind, src_ep, dst_ep, gen, conn_id, frames)
        if size != table_end:
            raise _ProtocolError("envelope of a multi-message DATA carries bytes")
        if endpoint is not None and self._direct_to(endpoint, src, dst_ep, total):
            return _Direct(src_ep, gen, conn_id, lengths)
        msg = _Partial((src, kind, src_ep, dst_ep, gen, conn_id, frames), nframes)
        for length in lengths:
            target = self._frame_target(length)
            self._await_frame(self.comm.Irecv([target, self._byte], src, _TAG), msg, length)
            frames.append(memoryview(target))
        return msg

    def _poison(self, src: int, reason: str) -> None:
        """A peer broke the protocol: its stream cannot be resynchronised; drop it."""
        log.error("mpi rank %d broke the link protocol (%s); dropping its traffic", src, reason)
        self._poisoned.add(src)
        self._inbound.pop(src, None)
        # Its frames still awaited will not be delivered: cancelled, they complete
        # (in _test_recvs) instead of staying outstanding, or matching its next sends.
        for req, partial in zip(self._recv_reqs, self._recv_msgs, strict=True):
            if partial.msg[0] == src and req:  # (not null: not completed yet)
                req.Cancel()
        for endpoint in list(self.endpoints.values()):
            _call_on(endpoint.loop, endpoint._drop_rank, src, f"protocol violation: {reason}")

    def _route(self, msg: _Inbound) -> None:
        """Hand ``msg`` to its endpoint (on that endpoint's loop; see :meth:`_sort_out`)."""
        endpoint = self.endpoints.get(msg[3])
        if endpoint is None:
            src, kind, src_ep, dst_ep, gen, _, _ = msg
            if kind == _Msg.HELLO:
                self.post_control(src, _Msg.REFUSE, dst_ep, src_ep, gen, 0)
            elif kind == _Msg.ACCEPT:
                self.post_control(src, _Msg.DOWN, dst_ep, src_ep, gen, 0)
            return
        endpoint._handle(msg)

    # ------------------------------------------------------------------ endpoints, pumps

    def add_endpoint(self, endpoint: _MpiEndPoint) -> None:
        self.endpoints[endpoint.endpoint_id] = endpoint
        pump = self._pumps.get(endpoint.loop)
        if pump is None:
            pump = self._pumps[endpoint.loop] = _Pump(self, endpoint.loop)
        pump.users += 1
        pump.poke()

    def pump_for(self, loop: asyncio.AbstractEventLoop) -> _Pump | None:
        return self._pumps.get(loop)

    async def remove_endpoint(self, endpoint: _MpiEndPoint) -> None:
        """Forget ``endpoint``; when it was the last one, drain for a bounded time."""
        self.endpoints.pop(endpoint.endpoint_id, None)
        pump = self._pumps.get(endpoint.loop)
        if pump is not None:
            pump.users -= 1
            if pump.users <= 0:
                pump.stop()
                del self._pumps[endpoint.loop]
        if not self.endpoints:
            await self.drain(self.options.drain_timeout)

    async def drain(self, timeout: float) -> bool:
        """Progress until no request is outstanding, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            self.progress()
            await asyncio.sleep(0)
        if self.busy():
            log.warning(
                "mpi transport: %d send(s) and %d frame receive(s) still outstanding after "
                "%.1f s; abandoning them (the peer rank is gone or not progressing)",
                len(self._send_reqs),
                len(self._recv_reqs),
                timeout,
            )
            return False
        return True

    def shutdown(self) -> None:
        """At interpreter exit, before MPI_Finalize: bounded drain, then stop using MPI."""
        with self.lock:
            deadline = time.monotonic() + self.options.drain_timeout
            while self.busy() and time.monotonic() < deadline:
                self.progress()
            self.closed = True


class _Options:
    __slots__ = (
        "busy_poll_us",
        "connect_timeout",
        "drain_timeout",
        "hot_window",
        "idle_interval",
        "inline_max",
        "max_frames",
        "max_message",
        "recv_pool_bytes",
        "send_timeout",
    )

    def __init__(
        self,
        *,
        inline_max: int,
        busy_poll_us: float,
        hot_window: float,
        idle_interval: float,
        connect_timeout: float,
        drain_timeout: float,
        max_frames: int,
        max_message: int,
        recv_pool_bytes: int,
        send_timeout: float,
    ) -> None:
        self.send_timeout = send_timeout
        self.inline_max = inline_max
        self.recv_pool_bytes = recv_pool_bytes
        self.busy_poll_us = busy_poll_us
        self.hot_window = hot_window
        self.idle_interval = idle_interval
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self.max_frames = max_frames
        self.max_message = max_message


_KINDS = frozenset(int(k) for k in _Msg)
# Plain ints for the hot path (comparing with enum members costs attribute lookups).
_OPEN, _DATA, _CLOSE = int(_Msg.OPEN), int(_Msg.DATA), int(_Msg.CLOSE)


def _set_result(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    if running_loop() is loop:
        if not future.done():
            future.set_result(None)
    else:
        _call_soon_threadsafe(loop, _set_result, loop, future)


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    if running_loop() is loop:
        fn(*args)
    else:
        _call_soon_threadsafe(loop, fn, *args)


def _call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any
) -> None:
    # A loop that is gone has no endpoint left to tell (its callers stopped waiting).
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class _Pump:
    """Polls the engine from one event loop: every iteration while hot, else on a timer.

    While hot and nothing else is runnable, one call spins for up to ``busy_poll_us``:
    the loop would otherwise only go round to poll again. On crowded CPUs it gives the
    CPU away instead (``sched_yield``), once per pass.
    """

    def __init__(self, engine: _Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.users = 0
        self.handle: asyncio.Handle | None = None
        self.timer = False
        self.stopped = False
        self.poller = IdlePoller(loop, engine.options.busy_poll_us)

    def hot_handle(self) -> asyncio.Handle | None:
        """The handle of the next poll if it runs on the next iteration."""
        return None if self.timer else self.handle

    def poke(self) -> None:
        """Activity is expected: poll on the next loop iteration."""
        self.engine.last_activity = time.monotonic()
        if self.stopped:
            return
        if self.handle is not None:
            if not self.timer:
                return
            self.handle.cancel()
        self.handle = self.loop.call_soon(self._run)
        self.timer = False

    def stop(self) -> None:
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _run(self) -> None:
        self.handle = None
        if self.stopped:
            return
        engine = self.engine
        options = engine.options
        try:
            moved = engine.progress()
            if not moved and time.monotonic() - engine.last_activity < options.hot_window:
                # Crowded CPUs: this pass round the loop is all the polling done, and
                # the CPU goes to whoever else can run (the rank we wait for, often).
                self.poller.spin(engine.progress, yield_when_crowded=True)
        except Exception:
            log.exception("mpi transport: progress failed")
        if self.stopped:
            return
        if engine.busy() or time.monotonic() - engine.last_activity < options.hot_window:
            self.handle = self.loop.call_soon(self._run)
            self.timer = False
        else:
            self.handle = self.loop.call_later(options.idle_interval, self._run)
            self.timer = True


_engines: dict[int, _Engine] = {}
_engines_lock = threading.Lock()


def _engine_for(mpi: Any, comm: MPI.Comm | None, options: _Options) -> _Engine:
    base = mpi.COMM_WORLD if comm is None else comm
    key = base.py2f()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            if not _engines:
                # Registered after mpi4py's own exit hook, so it runs before MPI_Finalize.
                atexit.register(_shutdown_all)
            engine = _engines[key] = _Engine(mpi, base, options)
        return engine


def _shutdown_all() -> None:
    for engine in list(_engines.values()):
        try:
            engine.shutdown()
        except Exception:
            log.exception("mpi transport: shutdown failed")


# --------------------------------------------------------------------------- links


class _MpiLink(Link):
    """The link to one remote endpoint, identified by its generation."""

    heartbeat = True

    def __init__(
        self,
        endpoint: _MpiEndPoint,
        remote: EndPointAddress,
        rank: int,
        remote_ep: int,
        gen: int,
    ) -> None:
        super().__init__(remote, endpoint)
        self.endpoint = endpoint
        self.rank = rank
        self.remote_ep = remote_ep
        self.gen = gen
        #: True once DOWN was sent or received: nothing more goes out on this link.
        self.finished = False
        self.inflight: set[asyncio.Future[None]] = set()
        #: Where built, send_now's work in C (``_mpi_accel.c``).
        self._sender: Sender | None = _accel.Sender(self) if ACCELERATED else None
        #: The pid :meth:`count_peer` counted in the process's crowding (0: none).
        self._counted_pid = 0

    def count_peer(self) -> None:
        """Now that the link is live: tell the process's crowding the peer's CPUs,
        where the peer is another process of this host (see Crowding.peer_linked)."""
        if not self._counted_pid and not self.finished:
            pid = self.endpoint.engine.local_pids[self.rank]
            self._counted_pid = self.endpoint._poller.crowding.count_link(pid)

    def _uncount_peer(self) -> None:
        if self._counted_pid:
            self.endpoint._poller.crowding.peer_unlinked(self._counted_pid)
            self._counted_pid = 0

    def send_control(self, kind: Kind, conn_id: int) -> None:
        if self.finished:
            return
        ep = self.endpoint
        try:
            ep.engine.post_control(
                self.rank, _Msg(kind), ep.endpoint_id, self.remote_ep, self.gen, conn_id
            )
        except Exception as exc:
            self.fail(f"send failed: {exc!r}")

    def send_tick(self) -> None:
        # A frameless eager Isend, never awaited (completion is tracked by progress).
        if self.finished:
            return
        ep = self.endpoint
        try:
            ep.engine.post_control(
                self.rank, _Msg.TICK, ep.endpoint_id, self.remote_ep, self.gen, 0
            )
        except Exception as exc:
            self.fail(f"send failed: {exc!r}")

    def send_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        """Post a DATA message of one small contiguous frame, copied into the MPI
        message; False (nothing posted) for anything else, or when too many sends are
        outstanding (``send_data`` then waits).

        The caller may reuse the frame as soon as the send is posted: completion is
        tracked like a control message's.

        Raises:
            ConnectionError: the engine is shut down.
            MPI.Exception: the MPI library refused the send.
        """
        if self.finished:
            return False
        sender = self._sender
        if sender is not None:
            return sender(conn_id, frames)  # the rest, in C
        if len(frames) != 1:
            return False
        frame = frames[0]
        view = frame if type(frame) is memoryview else memoryview(frame)  # type: ignore[arg-type]
        ep = self.endpoint
        n = view.nbytes
        if n > ep.opts.inline_max or not view.c_contiguous:
            return False
        engine = ep.engine
        # bytes + a contiguous buffer of any format: one copy of its bytes.
        data = (
            _ONE.pack(
                _DATA, _FLAG_INLINE, 0, 1, ep.endpoint_id, self.remote_ep, self.gen, conn_id, n
            )
            + view
        )
        with engine.lock:
            if engine.closed:
                raise ConnectionError("mpi transport engine is shut down")
            reqs = engine._send_reqs
            if len(reqs) >= _MAX_UNTRACKED:
                return False
            req = engine.comm.Isend(data, self.rank, _TAG)
            if not req.Test():
                reqs.append(req)
                engine._send_ops.append(None)
        return True

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        if self.finished:
            raise ConnectionError("link is down")
        ep = self.endpoint
        op = ep.engine.post_data(
            self.rank,
            ep.endpoint_id,
            self.remote_ep,
            self.gen,
            conn_id,
            frames,
            ep.loop,
            ep.opts.inline_max,
        )
        if op is None:
            return
        future = op.future
        # Spin for the completion in this task first: most sends complete within the
        # budget, and then need no task, timer or trip round the loop that the bounded
        # wait below costs (asyncio.wait_for wraps a coroutine in a task): a 256 KiB
        # round trip of the raw transport measured 124-132 us before, 96-101 us after.
        inflight = self.inflight  # (failed at once if the link goes down meanwhile)
        inflight.add(future)
        if ep._spin(future):
            inflight.discard(future)
            future.result()  # (the send's error, if it failed)
            return
        future.add_done_callback(inflight.discard)
        try:
            await asyncio.wait_for(ep._wait(future, spun=True), ep.opts.send_timeout)
        except asyncio.TimeoutError:
            # A peer rank that stopped progressing (or died: MPI cannot tell).
            raise ConnectionError(
                f"send to {self.remote!r} not completed within {ep.opts.send_timeout} s"
            ) from None

    async def close(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._uncount_peer()
        ep = self.endpoint
        ep.engine.post_control(self.rank, _Msg.DOWN, ep.endpoint_id, self.remote_ep, self.gen, 0)
        if self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            ep = self.endpoint
            try:
                ep.engine.post_control(
                    self.rank, _Msg.DOWN, ep.endpoint_id, self.remote_ep, self.gen, 0
                )
            except Exception as exc:
                log.debug("could not send DOWN to %r: %r", self.remote, exc)
        self._uncount_peer()
        self._fail_inflight()

    def _fail_inflight(self) -> None:
        for future in list(self.inflight):
            if not future.done():
                future.set_exception(ConnectionError("link to peer is down"))
                future.exception()
        self.inflight.clear()


#: Environment variable: ``0`` sends and hands over small messages in Python even where
#: the compiled paths (``_mpi_accel.c``) were built.
ACCEL_ENV: Final = "HPCPROC_MPI_ACCEL"


def _compiled() -> Any:
    """The compiled module, ready for use, or None where it was not built or is turned
    off (:meth:`_Engine._take` and :meth:`_MpiLink.send_now` then do its work)."""
    if os.environ.get(ACCEL_ENV, "1").strip() == "0":
        return None
    try:
        from . import _mpi_accel
    except ImportError:  # built without a compiler
        return None
    _mpi_accel.init(
        _MpiLink,
        Received,
        _TAG,
        _MAX_UNTRACKED,
        FAIR_STREAK,
        PROBE_MIN,
        _DIRECT_MAX,
        _POOL_MIN,
        _set_result,
    )
    # The C has the wire layout and the envelope size classes compiled in.
    _mpi_accel.check_layout(_ONE.size, _DATA, _FLAG_INLINE, _ZERO_FILL_MAX)
    return _mpi_accel


_accel = _compiled()
#: Whether small messages are sent, and handed over to a spinning receiver, in C.
ACCELERATED: Final = _accel is not None
_deliver_inline: Callable[[Any, Any, int, int, Any], bool] | None = (
    _accel.deliver_inline if ACCELERATED else None
)


class _PendingConnect:
    __slots__ = ("future", "gen", "link")

    def __init__(self, link: _MpiLink, future: asyncio.Future[_MpiLink]) -> None:
        self.link = link
        self.gen = link.gen
        self.future = future


_CONN_OPEN = _State.OPEN


class _MpiConnection(OutgoingConnection):
    """A connection whose ``send_nowait`` posts one small message itself."""

    __slots__ = ()

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        # OutgoingConnection.send_nowait and the link's send_now written out for the
        # process layer's small message: two calls less per message.
        link = self._link
        # (Not an _MpiLink: a connection of an endpoint to itself.)
        if type(link) is _MpiLink and self._state is _CONN_OPEN and not link.finished:
            sender = link._sender
            if sender is not None:
                link.sent = True
                try:
                    return sender(self._id, frames)  # (what it does not send, nothing can now)
                except TransportError:
                    raise
                except Exception as exc:
                    raise self._bundle_failed(exc) from exc
            # Without the compiled sender: one pickle of at most inline_max bytes, no
            # memoryview. Anything else takes the general path.
            frame = frames[0] if len(frames) == 1 else None
            if type(frame) is bytes:
                ep = link.endpoint
                n = len(frame)
                if n <= ep.opts.inline_max:
                    engine = ep.engine
                    data = (
                        _ONE.pack(
                            _DATA, _FLAG_INLINE, 0, 1, ep.endpoint_id, link.remote_ep,
                            link.gen, self._id, n,
                        )
                        + frame
                    )  # fmt: skip
                    with engine.lock:
                        reqs = engine._send_reqs
                        if not engine.closed and len(reqs) < _MAX_UNTRACKED:
                            link.sent = True
                            try:
                                req = engine.comm.Isend(data, link.rank, _TAG)
                                if not req.Test():
                                    reqs.append(req)
                                    engine._send_ops.append(None)
                            except Exception as exc:
                                raise self._bundle_failed(exc) from exc
                            return True
        return OutgoingConnection.send_nowait(self, frames)


class _MpiEndPoint(MultiplexedEndPoint):
    _connection_class = _MpiConnection
    _hands_over = True  # its polls (take_one) end on a message handed over

    def __init__(
        self,
        engine: _Engine,
        endpoint_id: int,
        loop: asyncio.AbstractEventLoop,
        opts: _Options,
    ) -> None:
        super().__init__(format_address(engine.rank, endpoint_id))
        self.engine = engine
        self.opts = opts
        self.endpoint_id = endpoint_id
        self.loop = loop
        self._key = (engine.rank, endpoint_id)
        self._connecting: dict[EndPointAddress, _PendingConnect] = {}
        self._addresses: dict[tuple[int, int], EndPointAddress] = {}
        #: Messages for this endpoint that another loop's thread took, in order
        #: (guarded by the engine's lock; see ``_Engine._sort_out``).
        self._inbox: deque[_Inbound] = deque()
        self._poller = IdlePoller(loop, opts.busy_poll_us)
        #: The poller gave the loop its turn (see :meth:`receive`).
        self._fair_turn = False
        #: The engine's one-probe step, called as ``take_one(self)`` every turn of a spin.
        self._take_one: Callable[[_MpiEndPoint], bool] = engine.take_one
        #: Where built, that step and the poll's loop of turns in C (``_mpi_accel.c``).
        self._spinner: Spinner | None = None
        if ACCELERATED:
            self._take_one = self._spinner = _accel.Spinner(engine, self)

    # ------------------------------------------------------------------ waiting

    def _spin(self, future: asyncio.Future[Any]) -> bool:
        """Spin on progress for up to ``busy_poll_us`` if no other task is runnable,
        until ``future`` is done; whether it is. Never suspends."""
        if not future.done():
            engine = self.engine
            poller = self._poller
            if poller.enabled:
                pump = engine.pump_for(self.loop)
                hot = pump.hot_handle() if pump is not None else None
                spinner = self._spinner
                if spinner is not None:
                    # (poller.spin(step, hot) with the step below, its loop in C.)
                    return spinner.spin(poller, future, self, hot)
                progress = engine.progress

                def step() -> bool:
                    progress()
                    return future.done()

                poller.spin(step, hot)
        return future.done()

    async def _wait(self, future: asyncio.Future[Any], spun: bool = False) -> Any:
        """:meth:`_spin` (unless the caller ``spun`` already), then let the pump wake us."""
        if not (future.done() if spun else self._spin(future)):
            pump = self.engine.pump_for(self.loop)
            if pump is not None:
                pump.poke()
        return await future

    async def receive(self) -> Event:
        """The next event; with none queued and no other task runnable, first spins on
        MPI progress for up to ``busy_poll_us`` (much faster than a trip round the
        loop)."""
        events = self._events
        gave_up = 0.0 if events._items else self._idle_poll()
        if self._fair_turn:
            # The poller's turn for the rest of the loop (timers, I/O): one pass round
            # the loop, then poll again, rather than sleeping until the pump wakes us.
            self._fair_turn = False
            await asyncio.sleep(0)
            gave_up = 0.0 if events._items else self._idle_poll()
        event = events.pop_ready()
        if event is not None:
            return event
        event = await events.get()
        self._poller.adapt(gave_up)
        return event

    def _poll_idle(self) -> bool:
        items = self._events._items
        if not items:
            self._idle_poll()
        return bool(items)

    def _idle_poll(self) -> float:
        """Spin on MPI progress while the loop is idle, until an event is queued or the
        budget runs out: the time it gave up, or 0.0."""
        poller = self._poller
        if self._closed or not poller.enabled:
            return 0.0
        pump = self.engine.pump_for(self.loop)
        hot = pump.hot_handle() if pump is not None else None
        spinner = self._spinner
        if spinner is not None:
            # (poller.turn_and_poll(..., self._take_one, ...), its loop in C.)
            gave_up = spinner.poll(poller, self._events._items, self, hot)
        else:
            gave_up = poller.turn_and_poll(self._events._items, self._take_one, self, hot)
        if gave_up < 0:
            self._fair_turn = True
            return 0.0
        return gave_up

    def _drain_inbox(self) -> None:
        """Handle, in order, the messages another loop's thread took for this endpoint
        (runs on this endpoint's loop)."""
        lock = self.engine.lock
        inbox = self._inbox
        while True:
            with lock:
                if not inbox:
                    return
                msgs = list(inbox)
                inbox.clear()
            for msg in msgs:
                self._handle(msg)

    def _deliver_data(
        self, src: int, src_ep: int, gen: int, conn_id: int, frames: list[memoryview]
    ) -> bool:
        """Queue a DATA message on a live link and open connection: what
        :meth:`_handle` and the core's ``_on_data`` do, in one call (the spinning
        receiver's hot path). False, having done nothing, for anything else (an old
        generation, an unknown connection...), which :meth:`_handle` then deals with."""
        remote = self._addresses.get((src, src_ep))
        link = self._links.get(remote) if remote is not None else None
        if type(link) is not _MpiLink or link.gen != gen or not link.alive:
            return False
        local = link.incoming.get(conn_id)
        if local is None:
            return False
        link.heard = True  # the heartbeat's sign of life
        if self._receivers and not self._events._items:
            receiver = self._receivers.get(local)
            if receiver is not None:
                self._handed_over += 1
                receiver(frames)  # see EndPoint.set_receiver
                return True
        self._events.put(new_received(local, frames))
        return True

    # ------------------------------------------------------------------ connecting

    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        try:
            rank, remote_ep = parse_address(remote)
        except ValueError as exc:
            raise ConnectError(ConnectErrorCode.FAILED, str(exc)) from None
        engine = self.engine
        if rank >= engine.size:
            raise ConnectError(
                ConnectErrorCode.NOT_FOUND,
                f"no rank {rank} in a communicator of {engine.size} ranks",
            )
        link = _MpiLink(self, remote, rank, remote_ep, next(engine.next_gen))
        pending = _PendingConnect(link, self.loop.create_future())
        self._connecting[remote] = pending
        try:
            engine.post_control(rank, _Msg.HELLO, self.endpoint_id, remote_ep, link.gen, 0)
            bound = self.opts.connect_timeout if timeout is None else None
            if bound is None:
                return await self._wait(pending.future)  # type: ignore[no-any-return]
            try:
                return await asyncio.wait_for(self._wait(pending.future), bound)  # type: ignore[no-any-return]
            except asyncio.TimeoutError:
                raise ConnectError(
                    ConnectErrorCode.TIMEOUT,
                    f"no answer from {remote!r} within {bound} s (rank {rank} is not "
                    "progressing MPI, or is gone)",
                ) from None
        finally:
            if self._connecting.get(remote) is pending:
                del self._connecting[remote]

    # ------------------------------------------------------------------ receive path

    def _handle(self, msg: _Inbound) -> None:
        """Dispatch one message from the engine (on this endpoint's loop)."""
        src, kind, src_ep, _, gen, conn_id, frames = msg
        remote = self._addresses.get((src, src_ep))
        if remote is None:
            remote = format_address(src, src_ep)
            if len(self._addresses) < _ADDRESS_CACHE:
                self._addresses[(src, src_ep)] = remote
        if kind <= _CLOSE:
            link = self._links.get(remote)
            if type(link) is not _MpiLink or link.gen != gen:
                return  # a message of an old bundle, or for a closed endpoint
            link.heard = True  # the heartbeat's sign of life
            if kind == _DATA:
                self._on_data(link, conn_id, frames)
            elif kind == _OPEN:
                self._on_open(link, conn_id)
            else:
                self._on_close(link, conn_id)
        elif kind == _Msg.TICK:
            link = self._links.get(remote)
            if type(link) is _MpiLink and link.gen == gen:
                link.heard = True
        elif kind == _Msg.HELLO:
            self._on_hello(remote, src, src_ep, gen)
        elif kind == _Msg.DOWN:
            link = self._links.get(remote)
            if isinstance(link, _MpiLink) and link.gen == gen:
                link.finished = True
                link.fail("peer closed or broke the bundle")
        else:
            self._on_reply(remote, kind, src, src_ep, gen)

    def _on_hello(self, remote: EndPointAddress, src: int, src_ep: int, gen: int) -> None:
        engine = self.engine
        if self._closed:
            engine.post_control(src, _Msg.REFUSE, self.endpoint_id, src_ep, gen, 0)
            return
        if remote in self._connecting and self._key < (src, src_ep):
            engine.post_control(src, _Msg.CROSSED, self.endpoint_id, src_ep, gen, 0)
            return
        link = _MpiLink(self, remote, src, src_ep, gen)
        self._register_link(link)
        link.count_peer()
        engine.post_control(src, _Msg.ACCEPT, self.endpoint_id, src_ep, gen, 0)

    def _on_reply(
        self, remote: EndPointAddress, kind: int, src: int, src_ep: int, gen: int
    ) -> None:
        pending = self._connecting.get(remote)
        if pending is None or pending.gen != gen or pending.future.done():
            if kind == _Msg.ACCEPT:
                # We gave up waiting (timeout, close): tell the peer to drop the link.
                self.engine.post_control(src, _Msg.DOWN, self.endpoint_id, src_ep, gen, 0)
            return
        if kind == _Msg.ACCEPT:
            if self._closed:
                pending.link.abort()
                pending.future.set_exception(
                    ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
                )
                return
            # Register now, not when the connecting task resumes: the peer may
            # already be sending on this link.
            self._register_link(pending.link)
            pending.link.count_peer()
            pending.future.set_result(pending.link)
        elif kind == _Msg.REFUSE:
            pending.future.set_exception(
                ConnectError(ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}")
            )
        else:  # CROSSED: the peer's HELLO (sent before this reply) made our link.
            link = self._links.get(remote)
            if not isinstance(link, _MpiLink):
                pending.future.set_exception(
                    ConnectError(ConnectErrorCode.FAILED, f"crossed connect to {remote!r} lost")
                )
            else:
                pending.future.set_result(link)

    def _drop_rank(self, rank: int, reason: str) -> None:
        for link in list(self._links.values()):
            if isinstance(link, _MpiLink) and link.rank == rank:
                link.fail(reason)

    async def _release(self) -> None:
        for pending in list(self._connecting.values()):
            if not pending.future.done():
                pending.future.set_exception(
                    ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
                )
                pending.future.exception()
        self._connecting.clear()
        await self.engine.remove_endpoint(self)


# --------------------------------------------------------------------------- transport


class MpiTransport(MultiplexedTransport):
    """Endpoints over MPI point-to-point messages; see the module docstring."""

    def __init__(self, engine: _Engine, opts: _Options) -> None:
        super().__init__()
        self._engine = engine
        self._opts = opts

    @property
    def rank(self) -> int:
        """This process's rank in the transport's communicator."""
        return self._engine.rank

    @property
    def size(self) -> int:
        """The number of ranks in the transport's communicator."""
        return self._engine.size

    async def new_endpoint(self) -> EndPoint:
        """Create an endpoint bound to the running event loop.

        Raises:
            NewEndPointError(FAILED): the transport is closed.
        """
        if self._closed or self._engine.closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        engine = self._engine
        endpoint = _MpiEndPoint(
            engine, next(engine.next_endpoint_id), asyncio.get_running_loop(), self._opts
        )
        self._add_endpoint(endpoint)
        engine.add_endpoint(endpoint)
        return endpoint


def _size_option(name: str, value: object, least: int) -> int:
    """``value`` as an int from ``least`` to 2**64 - 1 (what a frame length can say).

    Raises:
        ValueError: it is not an integer (``operator.index``) in that range.
    """
    try:
        size = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        size = -1
    if not least <= size < 1 << 64:
        raise ValueError(f"{name} must be an int from {least} to 2**64 - 1, not {value!r}")
    return size


def create_transport(
    *,
    comm: MPI.Comm | None = None,
    inline_max: int = DEFAULT_INLINE_MAX,
    busy_poll_us: float = DEFAULT_BUSY_POLL_US,
    hot_window: float = DEFAULT_HOT_WINDOW,
    idle_interval: float = DEFAULT_IDLE_INTERVAL,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_message: int = DEFAULT_MAX_MESSAGE,
    recv_pool_bytes: int = DEFAULT_RECV_POOL_BYTES,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> MpiTransport:
    """Registry factory for ``mpi``.

    The first call for a communicator (``comm``, default ``COMM_WORLD``) in a process
    duplicates it, which is collective: every rank must make that call.

    Options of this transport: ``inline_max`` (messages up to this many bytes travel
    as one MPI message), ``busy_poll_us`` (how long a waiting
    ``receive``/``send``/``connect`` polls MPI before yielding, when no other task is
    runnable; 0 disables it), ``connect_timeout``
    (bound on a connect given no timeout), ``send_timeout`` (a send whose MPI requests
    do not complete within it fails the bundle: the peer stopped progressing or died).
    Options of the process-wide engine, taken from the first call for a communicator:
    ``hot_window`` and ``idle_interval`` (pump polling), ``drain_timeout`` (bound on
    draining at close and exit), ``max_frames`` and ``max_message`` (limits on what a
    peer may announce), ``recv_pool_bytes`` (pooled receive buffers for large frames).

    Raises:
        ValueError: ``inline_max`` is not an int from 0, or ``max_message`` not one
            from 1, to 2**64 - 1 (the bytes a frame's length field can say).
        ImportError: mpi4py is missing (``pip install hpcproc[mpi]``).
        MpiUnavailableError: MPI is finalized, or provides a thread level below
            ``MPI_THREAD_SERIALIZED``.
    """
    check_budget(busy_poll_us)
    # Checked here, not where used: an odd value would otherwise surface as an error
    # at the first connect (in C, which reads both as 64-bit unsigned ints).
    inline_max = _size_option("inline_max", inline_max, 0)
    max_message = _size_option("max_message", max_message, 1)
    mpi = import_mpi()
    if mpi.Is_finalized():
        raise MpiUnavailableError("MPI is already finalized")
    if not mpi.Is_initialized():
        mpi.Init_thread(mpi.THREAD_SERIALIZED)
    provided = mpi.Query_thread()
    if provided < mpi.THREAD_SERIALIZED:
        names = {
            mpi.THREAD_SINGLE: "MPI_THREAD_SINGLE",
            mpi.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
        }
        raise MpiUnavailableError(
            f"the mpi transport needs MPI_THREAD_SERIALIZED or better, but MPI was "
            f"initialised with {names.get(provided, provided)}; initialise MPI with "
            f"MPI_THREAD_MULTIPLE (mpi4py's default: mpi4py.rc.thread_level = 'multiple')"
        )
    options = _Options(
        inline_max=inline_max,
        busy_poll_us=busy_poll_us,
        hot_window=hot_window,
        idle_interval=idle_interval,
        connect_timeout=connect_timeout,
        drain_timeout=drain_timeout,
        max_frames=max_frames,
        max_message=max_message,
        recv_pool_bytes=recv_pool_bytes,
        send_timeout=send_timeout,
    )
    return MpiTransport(_engine_for(mpi, comm, options), options)
