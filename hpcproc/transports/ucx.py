"""UCX transport over ``ucxx``: one authenticated UCX endpoint per pair of endpoints.

UCX reaches InfiniBand verbs, RoCE, shared memory (with zero-copy CMA/XPMEM) and CUDA
IPC through one API. ``UCX_TLS``, ``UCX_NET_DEVICES`` and every other ``UCX_*``
variable are read by UCX itself when a transport creates its context, so they pass
through unchanged (on a machine without an RDMA network, ``UCX_TLS=tcp,sm,self``;
UCX needs a socket-capable transport in the list for listener connections). ``ucxx``
is imported on first use; without it :func:`create_transport` raises ``ImportError``
naming ``pip install hpcproc[ucx]``.

Layout. Every transport object owns one UCX context, one worker and one listener
(kept after the transport closes, see :func:`_park`); its endpoints are told apart by
an id in the address,
``b"ucx://HOST:PORT/INSTANCE/ID"`` (``INSTANCE`` is random per transport object).
All lightweight connections between two endpoints share one UCX endpoint, a
:class:`~hpcproc.transports._multiplex.Link`.

Link set-up runs the handshake of :mod:`~hpcproc.transports._dialing` (the same
challenge-response and crossed-connect resolution as the TCP transport) over the UCX
stream API of the new UCX endpoint, with the magic ``b"HPCPUCX\\x01"``. Its link
parameters (``extra_X``, 8 bytes) are ``tag_X``, a random 64-bit UCX tag on which X
receives; nothing is received on it before the peer has proved the cookie, so nothing
an unauthenticated peer sends is delivered.

Link messages: the tag API, chosen by measurement. A message goes out as one *header*
tag message (the :mod:`~hpcproc.transports._wire` prefix and length table, a list of
device-memory frames, then the small frames copied inline) on tag ``t``, followed by
each large frame as its own tag message on tag ``t ^ 1``, sent from the caller's
memory (zero-copy; above ``UCX_RNDV_THRESH`` UCX uses rendezvous, i.e. CMA or RDMA
straight into the receiver's buffer). The receiver keeps one header receive posted
into a reusable buffer; on a header it posts, in order, one receive per large frame
into a buffer allocated for that frame's final size (``numpy.empty``, or device memory
for frames the sender marked as CUDA), and delivers messages strictly in header
order. Tag matching keeps per-tag order from one sender, so frame ``k`` of the
``n``-th message lands in the ``k``-th receive posted for it.

Why tags, by measurement (two processes, one small message per round trip, the three
APIs interleaved in one run on the low-level ucxx API with this module's progress
engine, ``UCX_TLS=tcp,sm,self``, a loaded 2-core machine): tag 114-121 us, active
messages 110-117 us, stream with the three receives a framed message needs
(prefix, length table, body) 135-138 us. Tags and AMs tie for small messages; tags
win on the rest: the receiver chooses every buffer (its final size, host or device,
posted before the data arrives so rendezvous lands in it directly), while AMs are
received into buffers of ucxx's registered allocator, one AM per frame, whose
completion order under rendezvous ucxx does not document. The stream API also pays
one request per header field.

Progress. ``ucxx``'s asyncio layer completes requests either by a progress thread
plus a notifier thread (two thread hops per message, GIL contention on a small
machine) or by spinning the event loop with ``asyncio.sleep(0)`` while any request is
pending, and a link always has a receive pending: an idle process would burn a core.
This module instead drives the worker from the event loop thread, in UCX's blocking
mode: the worker's event descriptor is registered with ``loop.add_reader``; each
wake-up progresses the worker, completes the finished requests (checked by their
``completed`` flag, no futures) and re-arms the worker; a slow timer progresses the
worker as a safety net against a missed wake-up. No thread is started; everything,
including the listener's and the UCX endpoints' error callbacks, runs on the event
loop thread. Measured against ucxx's own asyncio API in the same run (``python -m
bench transport --transport ucx``), this is several times faster for small messages.
The ``busy_poll`` option polls the worker on every loop iteration while a large
transfer is in flight; on UCX over TCP on a 2-core machine it halved the 16 MiB
bandwidth (0.14 against 0.35 GB/s), so it is off by default.

Failure. A UCX endpoint error (peer process died, network fault, peer aborted the
link) arrives through the endpoint's close callback and fails the bundle
(``CONNECTION_LOST``); a failed receive does the same. Closing a link is graceful: a
``CLOSE`` for connection id 0 (never a connection's id) marks the end of the link,
after everything sent before it; the peer answers it likewise and the UCX endpoint is
closed once both ends are known, bounded by the core's ``LINK_CLOSE_TIMEOUT``.
``abort`` closes the UCX endpoint at once, which the peer sees as an endpoint error.
A closed transport's listener is not destroyed (UCX crashes if a connection is being
accepted then, :func:`_park`): it accepts and closes the connection requests that
still arrive, so a dialer gets ``NOT_FOUND`` at once, until the process starts its
next UCX transport or exits.
A peer cut off without any error (a partition, a hung host) is found by the
heartbeats of :mod:`._multiplex`: an idle link carries a 16-byte ``TICK`` on the
header tag every tick (posted, never awaited; it may overtake a large frame on the
bulk tag), every completed header or frame receive counts as a sign of life, and a
link silent for 4 ticks is lost.

GPU memory: a frame exposing ``__cuda_array_interface__`` is sent as is (never
inline) and flagged in the header; the receiver allocates its buffer with CuPy (or
Numba when CuPy is missing) and delivers it as the frame object. This path needs a
GPU and a CUDA-enabled UCX (``UCX_TLS`` including ``cuda_copy``/``cuda_ipc``); it is
not exercised by the test suite.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import importlib
import logging
import os
import secrets
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ._dialing import (
    DialingEndPoint,
    DialingTransport,
    HandshakeFormat,
    HostAddress,
    SetupChannel,
    parse_host_address,
    resolve,
)
from ._multiplex import Kind, Link, tick_period
from ._wire import PREFIX, WireError, as_bytes_view, encode_header, parse_lengths, parse_prefix
from .base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    EndPoint,
    EndPointAddress,
    NewEndPointError,
    NewEndPointErrorCode,
    SendError,
    SendErrorCode,
)

__all__ = ["DEFAULT_MAX_MESSAGE", "UcxTransport", "create_transport", "parse_address"]

log = logging.getLogger("hpcproc.transports.ucx")

#: Default bound on one message (sum of its frames) accepted from or sent to a peer.
DEFAULT_MAX_MESSAGE = 1 << 30
#: Most frames per message (the header, with its tables, must fit HEADER_MAX).
MAX_FRAMES = 4096
#: Frames are copied into the header while the inline bytes stay within this budget.
INLINE_BUDGET = 8192
#: Size of the reusable header receive buffer (an upper bound on every header).
HEADER_MAX = PREFIX.size + 8 * MAX_FRAMES + 4 + 4 * MAX_FRAMES + INLINE_BUDGET
#: With ``busy_poll``, transfers at least this large make the engine poll until done.
POLL_MIN = 8192
#: Safety-net progress period (seconds) against a missed worker wake-up.
IDLE_PROGRESS = 0.25
#: Most progress rounds per loop callback before yielding to other tasks.
_ROUNDS = 64
#: Bound on closing one UCX endpoint (ns): UCX may wait for the peer's answer.
_CLOSE_PERIOD_NS = 100_000_000
#: Connection id that marks the end of a link in a CLOSE message.
_FIN = 0

_TAG = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_FORMAT = HandshakeFormat("ucx", b"HPCPUCX\x01", _TAG.size, log)


# --------------------------------------------------------------------------- ucxx


@dataclass(frozen=True)
class _Ucxx:
    """The parts of ucxx this module uses (imported once, on first use)."""

    api: ModuleType
    Array: Any
    Tag: Any
    TagMaskFull: Any


_ucxx: _Ucxx | None = None


def _load_ucxx() -> _Ucxx:
    """Import ucxx's low-level API.

    Raises:
        ImportError: ucxx is not installed; the message names the extra to install.
    """
    global _ucxx
    if _ucxx is None:
        # ucxx sets UCX_MEMTYPE_CACHE, which this UCX no longer reads; UCX would warn
        # about it on stdout (which peers and launchers parse) in every process.
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        try:
            import ucxx._lib.libucxx as api
            from ucxx._lib.arr import Array
            from ucxx.types import Tag, TagMaskFull
        except ImportError as exc:
            raise ImportError(
                "the ucx transport needs ucxx, which is not installed: pip install hpcproc[ucx]"
            ) from exc
        _ucxx = _Ucxx(api, Array, Tag, TagMaskFull)
    return _ucxx


# --------------------------------------------------------------------------- addresses


#: A parsed ucx endpoint address.
UcxAddress = HostAddress


def parse_address(address: bytes) -> UcxAddress:
    """Parse ``b"ucx://HOST:PORT/INSTANCE/ID"`` (``HOST`` may be ``[v6-address]``).

    Raises:
        ValueError: the address is malformed.
    """
    return parse_host_address(address, _FORMAT.scheme)


def _new_tag() -> int:
    """A random receive tag; its low bit is 0 (``tag | 1`` carries large frames)."""
    return secrets.randbits(64) & ~1


# --------------------------------------------------------------------------- progress


_Callback = Callable[[Any], None]


class _Engine:
    """One UCX context and worker, progressed from the event loop thread.

    Requests are registered with a callback that runs (on the loop thread) once the
    request has completed, successfully or not; see the module docstring.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, busy_poll: bool) -> None:
        ucxx = _load_ucxx()
        self.ucxx = ucxx
        api = ucxx.api
        self.loop = loop
        self.context = api.UCXContext(
            {}, feature_flags=(api.Feature.TAG, api.Feature.WAKEUP, api.Feature.STREAM)
        )
        self.worker = api.UCXWorker(
            self.context, enable_delayed_submission=False, enable_python_future=False
        )
        self.worker.init_blocking_progress_mode()
        self._fd: int = self.worker.epoll_file_descriptor
        self._pending: list[tuple[Any, _Callback, object]] = []
        self._scheduled = False
        self._polling = 0
        self._busy_poll = busy_poll
        self._closed = False
        self._in_run = False
        self._dirty = False
        #: The UCX listener (``UCXListener``), once the owner has started it.
        self.listener: Any = None
        #: The transport served; ``None`` once it closed (the engine is parked).
        self.owner: UcxTransport | None = None
        loop.add_reader(self._fd, self._run)
        self._timer: asyncio.TimerHandle | None = loop.call_later(IDLE_PROGRESS, self._tick)

    def watch(
        self, request: Any, callback: _Callback, *, bulk: bool = False, keep: object = None
    ) -> None:
        """Call ``callback(request)`` once ``request`` completes.

        ``keep`` (the request's buffer) stays referenced until then: UCX writes into
        or reads from it even if the request's owner gave up on it. With
        ``busy_poll``, ``bulk`` requests make the engine poll until they complete.
        """
        if bulk and self._busy_poll:
            self._polling += 1

            def done(req: Any, callback: _Callback = callback) -> None:
                self._polling -= 1
                callback(req)

            self._pending.append((request, done, keep))
        else:
            self._pending.append((request, callback, keep))
        self.kick()

    def kick(self) -> None:
        """Progress the worker soon (after posting work, or when polling).

        Inside a progress round (a completion callback posting the next receive)
        this only makes the round progress again before it re-arms the worker.
        """
        if self._in_run:
            self._dirty = True
        elif not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _tick(self) -> None:
        if self._closed:
            return
        self._timer = self.loop.call_later(IDLE_PROGRESS, self._tick)
        self._run()

    def _run(self) -> None:
        self._scheduled = False
        if self._closed or self._in_run:
            return
        worker = self.worker
        self._in_run = True
        try:
            for _ in range(_ROUNDS):
                self._dirty = False
                worker.progress()
                if self._pending:
                    self._reap()
                if self._closed:
                    return
                if self._polling:
                    break
                # Work posted by a callback may have completed at once: look again.
                if not self._dirty and worker.arm():
                    return
        finally:
            self._in_run = False
        self.kick()

    def _reap(self) -> None:
        done: list[tuple[Any, _Callback, object]] = []
        waiting: list[tuple[Any, _Callback, object]] = []
        for entry in self._pending:
            (done if entry[0].completed else waiting).append(entry)
        if not done:
            return
        self._pending = waiting
        for request, callback, _ in done:
            try:
                callback(request)
            except Exception:
                log.exception("ucx: request callback failed")

    def close(self) -> None:
        """Stop progressing; pending requests are dropped (their links are aborted)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        self._pending.clear()

    def progress_now(self) -> None:
        """One synchronous progress round (used while closing UCX endpoints)."""
        if not self._closed and not self._in_run:
            self._run()

    def park(self) -> None:
        """Serve no transport any more, but keep the listener (see :func:`_park`).

        Requests still pending belong to the owner's aborted links: dropped. While the
        loop runs, connection requests are still accepted and closed at once.
        """
        self.owner = None
        self._pending.clear()
        self._polling = 0


#: Engines of closed transports, listener included (see :func:`_park`).
_parked: list[_Engine] = []
_parked_at_exit_registered = False


def _park(engine: _Engine) -> None:
    """Keep a closed transport's engine, listener included, instead of destroying it.

    Destroying a UCX listener is unsafe while a connection to it is being accepted:
    UCX 1.21's TCP connection manager keeps a connection it accepted but whose first
    bytes it has not read yet pointing at its listener, listener destruction does not
    detach it, and UCX's async thread then calls through the freed listener when the
    bytes arrive (SIGSEGV with no Python frame). Peers dial a process while it closes
    (a rank's node gossips a lost node to every other rank at the end of a job), so
    the process keeps its listeners: a parked engine accepts and closes connection
    requests while its loop runs (dialers learn at once that nothing is there), is
    destroyed when this process starts its next UCX transport (:func:`_unpark_all`),
    and otherwise lives until the process exits (:func:`_keep_parked_at_exit`).
    """
    global _parked_at_exit_registered
    engine.park()
    _parked.append(engine)
    if not _parked_at_exit_registered:
        atexit.register(_keep_parked_at_exit)
        _parked_at_exit_registered = True


def _unpark_all() -> None:
    """Destroy the parked engines (a dial to their old ports now meets a refusal)."""
    while _parked:
        engine = _parked.pop()
        engine.close()
        # The last references: ucxx destroys the listener, then worker and context.
        engine.listener = None


def _keep_parked_at_exit() -> None:
    """Keep the parked listeners alive through interpreter shutdown.

    Clearing the modules would destroy them while peers may still dial: one more
    reference to each (never released) keeps the listener, which keeps its worker and
    context, until the process ends.
    """
    for engine in _parked:
        if engine.listener is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(engine.listener))
    _parked.clear()


async def _wait(engine: _Engine, request: Any, buffer: object, timeout: float) -> None:
    """Await one request (handshake and set-up only); raise its error."""
    if not request.completed:
        fut: asyncio.Future[None] = engine.loop.create_future()

        def done(_: Any) -> None:
            if not fut.done():
                fut.set_result(None)

        engine.watch(request, done, keep=buffer)
        await asyncio.wait_for(fut, timeout)
    request.check_error()


async def _stream_send(engine: _Engine, ep: Any, data: bytes, timeout: float) -> None:
    array = engine.ucxx.Array(data)
    await _wait(engine, ep.stream_send(array), array, timeout)


async def _stream_recv(engine: _Engine, ep: Any, n: int, timeout: float) -> bytes:
    array = engine.ucxx.Array(bytearray(n))
    await _wait(engine, ep.stream_recv(array), array, timeout)
    return bytes(array.obj)


def _close_ucx_endpoint(ep: Any) -> None:
    """Close a UCX endpoint at once (the peer sees an endpoint error)."""
    with contextlib.suppress(Exception):
        ep.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
    with contextlib.suppress(Exception):
        ep.remove_close_callback()


# --------------------------------------------------------------------------- frames


def _is_device(frame: object) -> bool:
    return hasattr(frame, "__cuda_array_interface__")


def _nbytes(payload: Any) -> int:
    return len(payload) if isinstance(payload, memoryview) else int(payload.nbytes)


def _inline_plan(lengths: Sequence[int], device: frozenset[int]) -> list[bool]:
    """Which frames travel inside the header; both sides compute the same plan."""
    used = 0
    plan = []
    for i, n in enumerate(lengths):
        inline = i not in device and used + n <= INLINE_BUDGET
        if inline:
            used += n
        plan.append(inline)
    return plan


def _device_empty(n: int) -> object:
    """A device buffer of ``n`` bytes for a received CUDA frame."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        cuda = importlib.import_module("numba.cuda")
        return cuda.device_array(n, dtype=np.uint8)
    return cupy.empty(n, dtype=cupy.uint8)


class _Incoming:
    """A received message whose large frames are still arriving."""

    __slots__ = ("conn_id", "control", "frames", "missing")

    def __init__(self, conn_id: int, control: Kind | None, frames: list[Any], missing: int):
        self.conn_id = conn_id
        self.control = control
        self.frames = frames
        self.missing = missing


# --------------------------------------------------------------------------- link


class _UcxLink(Link):
    """One authenticated UCX endpoint to one remote endpoint."""

    heartbeat = True

    def __init__(
        self,
        endpoint: _UcxEndPoint,
        remote: EndPointAddress,
        ep: Any,
        send_tag: int,
        recv_tag: int,
    ) -> None:
        super().__init__(remote, endpoint)
        self._ep_owner = endpoint
        self._ucx_ep = ep
        engine = endpoint._transport._engine
        assert engine is not None
        self._engine = engine
        ucxx = engine.ucxx
        self._Array = ucxx.Array
        self._send_header_tag = ucxx.Tag(send_tag)
        self._send_bulk_tag = ucxx.Tag(send_tag | 1)
        self._recv_header_tag = ucxx.Tag(recv_tag)
        self._recv_bulk_tag = ucxx.Tag(recv_tag | 1)
        self._mask = ucxx.TagMaskFull
        self._max_message = endpoint._transport._max_message
        self._dead = False
        self._fin_sent = False
        self._fin_received = False
        self._finished: asyncio.Future[None] = engine.loop.create_future()
        self._header = bytearray(HEADER_MAX)
        self._header_array = self._Array(self._header)
        self._inbox: deque[_Incoming] = deque()
        self._links = endpoint._transport._links

    def start(self) -> None:
        """Watch the UCX endpoint for errors and post the first header receive."""
        self._links.add(self)
        self._ucx_ep.set_close_callback(self._on_endpoint_error)
        self._post_header_recv()

    # ------------------------------------------------------------------ send side

    def _post_send(self, data: Any, tag: Any, bulk: bool) -> Any:
        """Post one tag send; return its request, or ``None`` if the link is down.

        The request's buffer (``data``) stays referenced until it completes.
        """
        if self._dead:
            return None
        array = data if isinstance(data, self._Array) else self._Array(data)
        try:
            request = self._ucx_ep.tag_send(array, tag)
        except Exception as exc:
            self.fail(f"send failed: {exc!r}")
            return None
        if request.completed:
            self._engine.kick()
            self._on_send_done(request)
        else:
            self._engine.watch(request, self._on_send_done, bulk=bulk, keep=array)
        return request

    def _on_send_done(self, request: Any) -> None:
        try:
            request.check_error()
        except Exception as exc:
            self.fail(f"send failed: {exc!r}")

    def send_control(self, kind: Kind, conn_id: int) -> None:
        if self._dead or self._fin_sent:
            return
        self._post_send(PREFIX.pack(kind, 0, conn_id), self._send_header_tag, False)

    def send_tick(self) -> None:
        # A 16-byte eager tag send on the header tag: posted, never awaited. It may
        # overtake a large frame still in flight on the bulk tag, which is harmless.
        self.send_control(Kind.TICK, 0)

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        if self._dead or self._fin_sent:
            raise ConnectionError(f"link to {self.remote!r} is down")
        payloads: list[Any] = []
        lengths: list[int] = []
        device: list[int] = []
        for i, frame in enumerate(frames):
            if _is_device(frame):
                array = self._Array(frame)
                payloads.append(array)
                lengths.append(array.nbytes)
                device.append(i)
            else:
                view = as_bytes_view(frame)
                payloads.append(view)
                lengths.append(len(view))
        total = sum(lengths)
        if len(payloads) > MAX_FRAMES or total > self._max_message:
            raise SendError(
                SendErrorCode.FAILED,
                f"message of {len(payloads)} frames / {total} bytes exceeds the limits "
                f"({MAX_FRAMES} frames, {self._max_message} bytes); nothing was sent",
            )
        parts = [encode_header(Kind.DATA, conn_id, lengths), _U32.pack(len(device))]
        if total <= INLINE_BUDGET and not device:
            # The common small message: one eager send, usually complete at once.
            parts.extend(payloads)
            request = self._post_send(b"".join(parts), self._send_header_tag, False)
            if request is not None and request.completed:
                self._check_sent([request])
                return
            requests = [request]
        else:
            parts.extend(_U32.pack(i) for i in device)
            bulk: list[Any] = []
            plan = _inline_plan(lengths, frozenset(device))
            for payload, inline in zip(payloads, plan, strict=True):
                (parts if inline else bulk).append(payload)
            requests = [self._post_send(b"".join(parts), self._send_header_tag, False)]
            requests.extend(
                self._post_send(payload, self._send_bulk_tag, _nbytes(payload) >= POLL_MIN)
                for payload in bulk
            )
        if self._dead:
            raise ConnectionError(f"link to {self.remote!r} is down")
        waiting = [r for r in requests if not r.completed]
        if not waiting:
            self._check_sent(requests)
            return
        await self._await_sends(waiting)
        self._check_sent(requests)

    async def _await_sends(self, requests: list[Any]) -> None:
        """Wait until UCX no longer needs the sender's buffers.

        Cancellation is deferred until then: the buffers are in UCX's hands and the
        caller may reuse them as soon as ``send`` ends, normally or not.
        """
        fut: asyncio.Future[None] = self._engine.loop.create_future()
        left = [len(requests)]

        def one_done(_: Any) -> None:
            left[0] -= 1
            if left[0] == 0 and not fut.done():
                fut.set_result(None)

        for request in requests:
            self._engine.watch(request, one_done, bulk=True)
        cancelled = False
        while True:
            try:
                await asyncio.shield(fut)
                break
            except asyncio.CancelledError:
                if fut.done() or self._dead:
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _check_sent(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                request.check_error()
            except Exception as exc:
                self.fail(f"send failed: {exc!r}")
                raise ConnectionError(f"link to {self.remote!r} is down") from exc
        if self._dead:
            raise ConnectionError(f"link to {self.remote!r} is down")

    # ------------------------------------------------------------------ receive side

    def _post_header_recv(self) -> None:
        if self._dead:
            return
        try:
            request = self._ucx_ep.tag_recv(self._header_array, self._recv_header_tag, self._mask)
        except Exception as exc:
            self.fail(f"receive failed: {exc!r}")
            return
        self._engine.watch(request, self._on_header, keep=self._header_array)

    def _on_header(self, request: Any) -> None:
        if self._dead:
            return
        try:
            request.check_error()
        except Exception as exc:
            self.fail(f"receive failed: {exc!r}")
            return
        self.heard = True  # the heartbeat's sign of life
        try:
            incoming = self._parse(self._header)
        except (WireError, struct.error) as exc:
            self._bad_peer(str(exc))
            return
        self._post_header_recv()
        self._inbox.append(incoming)
        self._deliver()

    def _parse(self, buf: bytearray) -> _Incoming:
        kind, nframes, conn_id = parse_prefix(memoryview(buf)[: PREFIX.size], max_frames=MAX_FRAMES)
        if kind is not Kind.DATA:
            return _Incoming(conn_id, kind, [], 0)
        pos = PREFIX.size
        lengths = parse_lengths(
            memoryview(buf)[pos : pos + 8 * nframes], nframes, max_message=self._max_message
        )
        pos += 8 * nframes
        (ndev,) = _U32.unpack_from(buf, pos)
        pos += 4
        if ndev > nframes:
            raise WireError(f"{ndev} device frames in a message of {nframes}")
        device = frozenset(struct.unpack_from(f"<{ndev}I", buf, pos))
        pos += 4 * ndev
        if any(i >= nframes for i in device):
            raise WireError("device frame index out of range")
        frames: list[Any] = []
        missing = 0
        incoming = _Incoming(conn_id, None, frames, 0)
        for i, (n, inline) in enumerate(zip(lengths, _inline_plan(lengths, device), strict=True)):
            if inline:
                frames.append(memoryview(buf[pos : pos + n]))
                pos += n
                continue
            target: Any = _device_empty(n) if i in device else np.empty(n, dtype=np.uint8)
            frames.append(target)
            missing += 1
            self._post_bulk_recv(target, n, incoming, i)
        incoming.missing = missing
        return incoming

    def _post_bulk_recv(self, target: Any, n: int, incoming: _Incoming, index: int) -> None:
        try:
            array = self._Array(target)
            request = self._ucx_ep.tag_recv(array, self._recv_bulk_tag, self._mask)
        except Exception as exc:
            self.fail(f"receive failed: {exc!r}")
            return

        def done(req: Any) -> None:
            if self._dead:
                return
            try:
                req.check_error()
            except Exception as exc:
                self.fail(f"receive failed: {exc!r}")
                return
            self.heard = True
            incoming.missing -= 1
            if isinstance(incoming.frames[index], np.ndarray):
                incoming.frames[index] = memoryview(incoming.frames[index])
            if incoming.missing == 0:
                self._deliver()

        self._engine.watch(request, done, bulk=n >= POLL_MIN, keep=array)

    def _deliver(self) -> None:
        ep = self._ep_owner
        inbox = self._inbox
        while inbox and inbox[0].missing == 0 and not self._dead:
            msg = inbox.popleft()
            if msg.control is None:
                ep._on_data(self, msg.conn_id, msg.frames)
            elif msg.control is Kind.OPEN:
                ep._on_open(self, msg.conn_id)
            elif msg.control is Kind.TICK:
                pass  # only proves life (``heard``, set by ``_on_header``)
            elif msg.conn_id == _FIN:
                self._on_fin()
            else:
                ep._on_close(self, msg.conn_id)

    def _on_fin(self) -> None:
        """The peer closed its side: everything it sent has been delivered."""
        self._fin_received = True
        self._ep_owner._on_link_down(self, "peer closed the link")
        if not self._fin_sent:
            self._send_fin()
        else:
            self._finish()

    def _send_fin(self) -> None:
        self.send_control(Kind.CLOSE, _FIN)
        self._fin_sent = True

    def _finish(self) -> None:
        if not self._finished.done():
            self._finished.set_result(None)

    def _on_endpoint_error(self, *_: object) -> None:
        # Called by ucxx from inside worker progress, holding the endpoint's callback
        # lock (removing the callback from here would deadlock): act on the next turn.
        self._engine.loop.call_soon(self._after_endpoint_error)

    def _after_endpoint_error(self) -> None:
        self._finish()
        if not self._dead:
            self.fail("UCX endpoint error (peer died, closed, or the network failed)")

    def _bad_peer(self, reason: str) -> None:
        if self._dead:
            return
        if self.alive:
            log.warning("ucx: dropping peer %r: %s", bytes(self.remote), reason)
        self.fail(f"protocol violation: {reason}")

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        if self._dead:
            return
        if not self._fin_sent:
            self._send_fin()
        if self._fin_received:
            # Our FIN answers theirs; give it a chance to leave before closing.
            self._engine.progress_now()
        else:
            await self._finished
        self.abort()

    def abort(self) -> None:
        if self._dead:
            return
        self._dead = True
        self._links.discard(self)
        self._finish()
        self._inbox.clear()
        ep, self._ucx_ep = self._ucx_ep, None
        if ep is not None:
            _close_ucx_endpoint(ep)
            self._engine.kick()


# --------------------------------------------------------------------------- endpoint


class _UcxChannel(SetupChannel["_UcxEndPoint"]):
    """A new UCX endpoint's stream API during the handshake.

    The UCX endpoint is one of the transport's loose ones (closed with it) until a
    link owns it. ``remote`` is set on the dialing side.
    """

    io_errors = (Exception,)

    def __init__(
        self, transport: UcxTransport, engine: _Engine, ep: Any, remote: EndPointAddress | None
    ) -> None:
        self._transport = transport
        self._engine = engine
        self._ep = ep
        self._remote = remote
        self._tag = _new_tag()
        self.extra = _TAG.pack(self._tag)
        if remote is not None:
            self.peer = f"peer {bytes(remote)!r}"
        transport._loose.add(ep)

    async def send(self, data: bytes) -> None:
        await _stream_send(self._engine, self._ep, data, self._transport._handshake_timeout)

    async def recv(self, n: int) -> bytes:
        return await _stream_recv(self._engine, self._ep, n, self._transport._handshake_timeout)

    def drop(self) -> None:
        self._transport._drop(self._ep)

    def link(self, endpoint: _UcxEndPoint, remote: EndPointAddress, peer_extra: bytes) -> Link:
        (their_tag,) = _TAG.unpack(peer_extra)
        return _UcxLink(endpoint, remote, self._ep, their_tag, self._tag)

    async def start(self, link: Link, first: bytes = b"") -> None:
        assert isinstance(link, _UcxLink)
        self._transport._loose.discard(self._ep)
        link.start()
        if first:
            await self.send(first)

    async def refuse(self, reply: bytes) -> None:
        try:
            await self.send(reply)
            # The dialer closes its UCX endpoint on a refusal; closing ours first could
            # discard the reply before it arrives. Its close fails this receive.
            with contextlib.suppress(Exception):
                await self.recv(1)
        finally:
            self.drop()

    def dial_error(self, exc: Exception, *, answered: bool) -> ConnectError | None:
        remote = self._remote
        t = self._transport._handshake_timeout
        if isinstance(exc, asyncio.TimeoutError):
            if answered:
                return ConnectError(
                    ConnectErrorCode.TIMEOUT, f"{remote!r} did not finish the handshake in {t} s"
                )
            return ConnectError(ConnectErrorCode.TIMEOUT, f"no answer from {remote!r} within {t} s")
        if answered:
            return ConnectError(
                ConnectErrorCode.FAILED,
                f"{remote!r} refused the handshake (wrong cookie, or not an hpcproc "
                f"ucx endpoint): {exc}",
            )
        return ConnectError(ConnectErrorCode.NOT_FOUND, f"nothing answers at {remote!r}: {exc}")


class _UcxEndPoint(DialingEndPoint["UcxTransport"]):
    # Data reaches the core's _on_data from the engine's loop callbacks (there is no
    # in-place poll to end), so handing it to receivers needs nothing more here.
    _hands_over = True  # see EndPoint.set_receiver

    async def _open_channel(self, remote: EndPointAddress, target: UcxAddress) -> _UcxChannel:
        engine = self._transport._engine
        assert engine is not None
        _, _, sockaddr = await resolve(target)
        try:
            ep = engine.ucxx.api.UCXEndpoint.create(engine.worker, sockaddr[0], target.port, True)
        except Exception as exc:
            raise ConnectError(
                ConnectErrorCode.NOT_FOUND, f"cannot reach {remote!r}: {exc}"
            ) from exc
        channel = _UcxChannel(self._transport, engine, ep, remote)
        engine.kick()
        return channel


# --------------------------------------------------------------------------- transport


class UcxTransport(DialingTransport[_UcxEndPoint]):
    """Endpoints reachable over UCX; see the module docstring for the protocol.

    Args:
        host: the host name or address peers dial to reach this transport's
            listener, which accepts on every interface (default: this machine's host
            name, so that ``create("ucx")`` works across the nodes of a cluster).
        port: listener port (0: any free port).
        max_message: largest message (sum of frames) accepted from or sent to a peer.
        connect_timeout: bound on ``connect`` when the caller gives no timeout.
        handshake_timeout: a peer that has not finished authenticating by then is
            dropped.
        cookie: the shared secret; default :func:`~hpcproc.auth.load_cookie`.
        busy_poll: progress the worker on every event-loop iteration while a large
            transfer is in flight, instead of waiting for the worker's wake-up. For
            networks that raise few events during a rendezvous; measured slower with
            UCX over TCP on a small shared machine (the poller competes with the
            peer for the cores), hence off by default.
        tick: heartbeat period in seconds (default ``HPCPROC_TICK``, else 15; 0: off).
            An idle link carries a 16-byte ``TICK`` tag message every tick; a peer
            from which nothing arrived for 4 ticks is lost (``CONNECTION_LOST``),
            whether or not UCX reports an endpoint error (UCX's own keepalive
            depends on the transport and version).

    Raises:
        ImportError: ucxx is not installed (``pip install hpcproc[ucx]``).
        CookieError: no cookie was given and the cookie file is unsafe or unusable.
        ValueError: ``tick`` (or ``HPCPROC_TICK``) is not a number of seconds >= 0.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 0,
        max_message: int = DEFAULT_MAX_MESSAGE,
        connect_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        cookie: bytes | str | None = None,
        busy_poll: bool = False,
        tick: float | None = None,
    ) -> None:
        _load_ucxx()
        super().__init__(
            _FORMAT,
            cookie=cookie,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
        )
        self._tick = tick_period(tick)
        self._busy_poll = busy_poll
        self._host = host if host is not None else socket.gethostname()
        self._port = port
        self._max_message = max_message
        self._engine: _Engine | None = None
        self._listen_port = 0
        #: UCX endpoints not (yet) owned by a link: closed when the transport closes.
        self._loose: set[Any] = set()
        #: Started links not yet aborted, including those whose bundle already
        #: failed but whose peer has not closed its side yet.
        self._links: set[_UcxLink] = set()

    @property
    def port(self) -> int | None:
        """The listener's port, once the first endpoint exists."""
        return self._listen_port or None

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        if self._engine is None:
            self._start()
        return self._new_dialing_endpoint(
            self._host,
            self._listen_port,
            lambda address, endpoint_id: _UcxEndPoint(self, address, endpoint_id),
        )

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        _unpark_all()
        try:
            engine = _Engine(loop, busy_poll=self._busy_poll)
        except Exception as exc:
            raise NewEndPointError(
                NewEndPointErrorCode.FAILED, f"cannot create a UCX worker: {exc}"
            ) from exc
        api = engine.ucxx.api
        try:
            listener = api.UCXListener.create(
                engine.worker, self._port, _on_conn_request, (engine,), deliver_endpoint=False
            )
        except Exception as exc:
            engine.close()
            code = (
                NewEndPointErrorCode.INSUFFICIENT_RESOURCES
                if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
                else NewEndPointErrorCode.FAILED
            )
            raise NewEndPointError(code, f"cannot listen on port {self._port}: {exc}") from exc
        engine.listener = listener
        engine.owner = self
        self._engine = engine
        self._listen_port = int(listener.port)

    # ------------------------------------------------------------------ accepting

    def _on_conn_request(self, engine: _Engine, ep: Any) -> None:
        self._admit(_UcxChannel(self, engine, ep, None))

    def _drop(self, ep: Any) -> None:
        if ep in self._loose:
            self._loose.discard(ep)
            _close_ucx_endpoint(ep)
            if self._engine is not None:
                self._engine.kick()

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        await self._cancel_handshakes()
        for ep in list(self._loose):
            self._drop(ep)
        for link in list(self._links):
            link.abort()
        engine = self._engine
        if engine is not None:
            # Let UCX process the endpoint closes now.
            engine.progress_now()
            _park(engine)
        self._engine = None


def _on_conn_request(conn_request: int, engine: _Engine) -> None:
    """ucxx's listener callback (on the loop thread, from worker progress)."""
    try:
        ep = engine.listener.create_endpoint_from_conn_request(conn_request, True)
    except Exception as exc:
        log.warning("ucx: cannot accept a connection request: %s", exc)
        return
    owner = engine.owner
    if owner is None or owner._closed:
        # A parked engine: accept and close, so that the dialer learns at once.
        _close_ucx_endpoint(ep)
        engine.kick()
        return
    owner._on_conn_request(engine, ep)


def create_transport(**options: Any) -> UcxTransport:
    """Registry factory for ``ucx``; ``options`` are :class:`UcxTransport`'s arguments.

    Raises:
        ImportError: ucxx is not installed (``pip install hpcproc[ucx]``).
    """
    return UcxTransport(**options)
