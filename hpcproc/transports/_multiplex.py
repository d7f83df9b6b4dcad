"""Shared mechanics: lightweight connections multiplexed over one link per peer.

Every built-in transport reduces to a :class:`Link`: one reliable, ordered,
message-preserving pipe between two endpoints (a TCP socket, a pair of shared-memory
rings, MPI point-to-point traffic, a UCX endpoint, or a direct call in memory). This
module turns links into the full :mod:`~hpcproc.transports.base` contract: connection
ids, ``ConnectionOpened`` / ``Received`` / ``ConnectionClosed`` events, bundle failure,
self-connections, endpoint close, and the ``break_connection`` fault hook (the optional
:class:`~hpcproc.transports.faults.FaultInjection` interface). Writing it
once is what makes every transport fail the same way.

A transport subclasses :class:`MultiplexedEndPoint` (implementing :meth:`_open_link`
and optionally :meth:`_release`) and :class:`Link` (implementing ``send_control``,
``send_data``, ``close`` and ``abort``). Its receive path calls the endpoint's
``_on_open`` / ``_on_data`` / ``_on_close`` methods, and a link that breaks calls its
:meth:`Link.fail` (the one link-failure path of every transport), always on the event
loop thread (a progress thread must hop with ``call_soon_threadsafe``).

Links stay up until the endpoint closes or the bundle fails, even when no connection
is open: re-opening a connection to a recent peer then costs one control message.

Heartbeats (Erlang's ``net_ticktime``). A link that breaks without the operating
system noticing (a switch port, a cable, a firewall that drops packets, a host or a
process that hangs) closes no socket, so nothing would ever report it. Each endpoint
therefore runs one timer every ``tick`` seconds (:func:`tick_period`: the transport's
``tick`` option, else ``HPCPROC_TICK``, else :data:`DEFAULT_TICK`) over the links
whose class sets :attr:`Link.heartbeat`:

* a link on which nothing was sent since the previous round gets a ``TICK`` control
  message (:meth:`Link.send_tick`: sent only if that needs no waiting, never queued
  behind data, so ticks never block or delay a send and a busy link sends none);
* a link on which nothing at all arrived (the transport sets :attr:`Link.heard` on
  every batch of bytes it reads: a message, part of a large frame, a tick) during
  :data:`TICKS_TO_LOSS` consecutive rounds is failed with :meth:`Link.fail`: the
  bundle fails as for any broken link (``CONNECTION_LOST`` here; the peer, if it is
  alive, sees its link end or declares this side lost the same way).

A peer is thus declared lost between 4 and 5 ticks after the last thing it sent
(60-75 s at the default 15 s). Rounds are counted, not clock time, so a late timer
(a stalled local loop) cannot make a live peer look silent: the readiness callbacks
that read what arrived meanwhile run before the timer. A peer whose event loop is
blocked (by user code that never awaits) for more than about 4 ticks sends nothing
and is lost, as a hung Erlang node is. ``tick=0`` turns heartbeats off.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Container, Sequence

from .._loops import get_running_loop
from .base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    Connection,
    ConnectionClosed,
    ConnectionId,
    ConnectionOpened,
    EndPoint,
    EndPointAddress,
    EndPointClosed,
    EndPointClosedError,
    ErrorEvent,
    Event,
    EventError,
    EventErrorCode,
    Received,
    Reliability,
    SendError,
    SendErrorCode,
    Transport,
    TransportError,
)
from .faults import FaultInjection

log = logging.getLogger("hpcproc.transports")

# ``Received(conn_id, frames)`` through the frozen dataclass's ``__init__`` costs about
# twice as much as filling its two slots directly; the receive path makes one per
# message.
_new_object = object.__new__
_set_received_conn_id = Received.__dict__["conn_id"].__set__
_set_received_frames = Received.__dict__["frames"].__set__


def new_received(conn_id: ConnectionId, frames: Sequence[memoryview]) -> Received:
    """``Received(conn_id, frames)``, made faster."""
    event: Received = _new_object(Received)
    _set_received_conn_id(event, conn_id)
    _set_received_frames(event, frames)
    return event


#: Bound on the graceful part of closing a link; after it the link is aborted.
LINK_CLOSE_TIMEOUT = 5.0

#: Heartbeat period (seconds) when neither the ``tick`` option nor ``HPCPROC_TICK`` is set.
DEFAULT_TICK = 15.0
#: A link silent for this many consecutive heartbeat rounds is lost.
TICKS_TO_LOSS = 4
#: The environment variable read by :func:`tick_period`.
TICK_ENV = "HPCPROC_TICK"


def tick_period(tick: float | None = None) -> float:
    """The heartbeat period in seconds: ``tick``, else ``$HPCPROC_TICK``, else 15.

    0 turns heartbeats off (a silent partition is then never detected).

    Raises:
        ValueError: the value is negative, not finite, or not a number (naming where
            it came from and what to set instead).
    """
    source = "the tick option"
    value: object = tick
    if tick is None:
        raw = os.environ.get(TICK_ENV, "").strip()
        if not raw:
            return DEFAULT_TICK
        source = f"{TICK_ENV}={raw!r}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(
                f"{source} is not a number of seconds; set it to e.g. 15 (0 turns heartbeats off)"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{source} must be a number of seconds, not {value!r}")
    period = float(value)
    if not math.isfinite(period) or period < 0:
        raise ValueError(
            f"{source} must be a finite number of seconds >= 0 (0 turns heartbeats off), "
            f"not {value!r}"
        )
    return period


class Kind(enum.IntEnum):
    """Message kinds on a link (the multiplexing protocol shared by all transports)."""

    OPEN = 1
    DATA = 2
    CLOSE = 3
    #: A heartbeat: carries nothing, delivers nothing; its arrival is a sign of life.
    TICK = 4


class Link(ABC):
    """One reliable, ordered, message-preserving pipe to one remote endpoint.

    The transport implements the four abstract methods; the attributes below belong to
    :class:`MultiplexedEndPoint` (bookkeeping of the bundle this link carries).

    A transport whose links can fail silently opts into heartbeats (module docstring)
    by setting :attr:`heartbeat`, implementing :meth:`send_tick`, setting
    :attr:`heard` whenever bytes arrive, and ignoring received ``TICK`` messages.
    """

    #: Whether the endpoint's heartbeat watches this link (class attribute).
    heartbeat = False

    def __init__(self, remote: EndPointAddress, owner: MultiplexedEndPoint) -> None:
        self.remote = remote
        #: The endpoint this link belongs to (whose bundle it carries).
        self.owner = owner
        #: False once the link failed or was closed; set by the endpoint core only.
        self.alive = True
        #: sender's connection id -> local ConnectionId, for open incoming connections.
        self.incoming: dict[int, ConnectionId] = {}
        #: open outgoing connections carried by this link.
        self.outgoing: dict[int, OutgoingConnection] = {}
        #: Something arrived since the last heartbeat round (set by the transport).
        self.heard = True
        #: Something was sent since the last heartbeat round (set by the core).
        self.sent = False
        #: Consecutive heartbeat rounds in which nothing arrived.
        self.silent_rounds = 0

    @abstractmethod
    def send_control(self, kind: Kind, conn_id: int) -> None:
        """Queue an OPEN or CLOSE message; never blocks, ordered with ``send_data``.

        Errors are not raised: a link that cannot send reports itself down through
        :meth:`fail`.
        """

    @abstractmethod
    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        """Send a DATA message; return once ``frames`` may be reused.

        Raises any exception when the link is broken; the caller maps it to
        ``SendError(FAILED)``.
        """

    def send_now(self, conn_id: int, frames: Sequence[Buffer]) -> bool:
        """Send a DATA message at once if that needs no waiting; False if not sent.

        An optional fast path: ``True`` means the message went out as by
        :meth:`send_data` (``frames`` may be reused); ``False`` means nothing was sent
        and the caller awaits :meth:`send_data`. Raises as :meth:`send_data` does. The
        default never sends.
        """
        return False

    def send_tick(self) -> None:
        """Send a ``TICK`` control message if that needs no waiting; else do nothing.

        Called by the heartbeat (only for links whose :attr:`heartbeat` is set) when
        nothing else was sent for a whole tick. Never blocks, never queues the tick
        behind data (a link with a send backlog is not idle, and its peer sees the
        bytes arrive), never raises: a link that cannot send reports itself down
        through :meth:`fail`. The default sends nothing.
        """
        return None

    @abstractmethod
    async def close(self) -> None:
        """Flush queued messages, then close so that the peer sees the link end."""

    def fail(self, reason: str) -> None:
        """The link broke (or must be dropped): fail its bundle, then abort it.

        The one way every transport takes a broken link down: the owner reports
        ``CONNECTION_LOST`` (when the bundle carried connections) and fails its
        outgoing connections (:meth:`MultiplexedEndPoint._on_link_down`), then
        :meth:`abort` releases the link so that the peer sees it end. Idempotent.
        """
        self.owner._on_link_down(self, reason)
        self.abort()

    @abstractmethod
    def abort(self) -> None:
        """Tear the link down at once (fault path); the peer must notice eventually."""


class _State(enum.Enum):
    OPEN = 0
    CLOSED = 1
    FAILED = 2


class OutgoingConnection(Connection):
    """A lightweight connection; a thin handle on the link carrying it."""

    __slots__ = ("_endpoint", "_id", "_link", "_state")

    def __init__(self, endpoint: MultiplexedEndPoint, link: Link, conn_id: int) -> None:
        self._endpoint = endpoint
        self._link = link
        self._id = conn_id
        self._state = _State.OPEN

    @property
    def remote_address(self) -> EndPointAddress:
        return self._link.remote

    async def send(self, frames: Sequence[Buffer]) -> None:
        if self._state is not _State.OPEN:
            if self._state is _State.CLOSED:
                raise SendError(SendErrorCode.CLOSED, "connection was closed locally")
            raise SendError(SendErrorCode.FAILED, f"connection to {self._link.remote!r} was lost")
        link = self._link
        link.sent = True
        try:
            if not link.send_now(self._id, frames):
                await link.send_data(self._id, frames)
        except TransportError:
            raise
        except Exception as exc:
            raise self._bundle_failed(exc) from exc

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        """Send at once if that needs no waiting (the link's ``send_now``); False if
        nothing was sent and the caller must ``await send``. Raises as ``send`` does."""
        if self._state is not _State.OPEN:
            return False  # send raises the right error
        link = self._link
        link.sent = True
        try:
            return link.send_now(self._id, frames)
        except TransportError:
            raise
        except Exception as exc:
            raise self._bundle_failed(exc) from exc

    def _bundle_failed(self, exc: Exception) -> SendError:
        """Fail the bundle after a send broke on the link; the error for the caller."""
        # Part of the message may be on the link already: the only safe way on is to
        # fail the whole bundle, on both sides (network-transport's semantics).
        link = self._link
        # Logged: the peer may be alive and well, and only this side knows why its
        # connections broke (a peer that goes away is reported as lost, not here).
        log.warning("dropping link to %r: a send failed: %r", link.remote, exc)
        link.fail(f"send failed: {exc!r}")
        return SendError(SendErrorCode.FAILED, f"connection to {link.remote!r} was lost")

    def _fail(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.FAILED

    async def close(self) -> None:
        if self._state is not _State.OPEN:
            # A failed connection closed by its owner now reports the owner's close.
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        link = self._link
        if link.outgoing.pop(self._id, None) is not None and link.alive:
            link.send_control(Kind.CLOSE, self._id)


class EventQueue:
    """The endpoint's single event queue.

    Unbounded by design: the transport contract has no way to refuse an event, so
    back-pressure is applied where data enters (the link's flow control) and the
    process layer drains this queue continuously.
    """

    __slots__ = ("_done", "_held", "_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._done = False
        #: While True, put does not wake waiters (a receive_nowait caller takes events).
        self._held = False

    def __len__(self) -> int:
        """Events queued and not yet received (lets a polling transport spin until one)."""
        return len(self._items)

    def put(self, event: Event) -> None:
        self._items.append(event)
        if self._held:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def get(self) -> Event:
        while not self._items:
            if self._done:
                raise EndPointClosedError()
            waiter = get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                # Pass a wake-up we may have consumed on to the next waiter.
                if waiter.done() and not waiter.cancelled() and self._items:
                    self.put_wakeup()
                raise
        event = self._items.popleft()
        if isinstance(event, EndPointClosed):
            self._done = True
            # Wake every other waiter so that it raises too.
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
        elif self._items:
            self.put_wakeup()
        return event

    def pop_ready(self, *, overtake: bool = False) -> Event | None:
        """The next event if one is queued and nobody waits before us, else None.

        :meth:`get` without a coroutine, for callers that just polled for an event.
        With ``overtake``, a caller waiting in :meth:`get` does not stop it (that
        caller, woken for nothing, waits again). Never returns ``EndPointClosed``,
        which only :meth:`get` hands out.
        """
        items = self._items
        if not items or (self._waiters and not overtake):
            return None
        event = items.popleft()
        if type(event) is EndPointClosed:
            items.appendleft(event)  # get's bookkeeping: every later receive raises
            return None
        return event

    def put_wakeup(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _LoopbackLink(Link):
    """The link an endpoint uses to connect to itself: events go straight to its queue."""

    def __init__(self, endpoint: MultiplexedEndPoint) -> None:
        super().__init__(endpoint.address, endpoint)
        self._endpoint = endpoint

    def send_control(self, kind: Kind, conn_id: int) -> None:
        if kind is Kind.OPEN:
            self._endpoint._on_open(self, conn_id)
        else:
            self._endpoint._on_close(self, conn_id)

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        # Copy: the caller may reuse its buffers once send returns.
        self._endpoint._on_data(self, conn_id, [memoryview(bytearray(f)) for f in frames])

    async def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Pending:
    """A link establishment under way and how many ``connect`` calls wait for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[Link]) -> None:
        self.task = task
        self.waiters = 0


def _cancelling() -> bool:
    """Whether the running task was asked to stop (``Task.cancelling``, Python 3.11+;
    always False before)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())


class MultiplexedEndPoint(EndPoint):
    """An endpoint built from links; see the module docstring."""

    #: The class of the connections :meth:`connect` opens (a transport may specialise
    #: ``send_nowait``).
    _connection_class: type[OutgoingConnection] = OutgoingConnection

    #: Whether the transport's receive path hands data to receivers (set_receiver):
    #: one whose polling ends when ``_handed_over`` grows, as it ends on an event.
    _hands_over = False

    #: Whether this endpoint's own polls yield on crowded CPUs (see ``_busy_poll``);
    #: off for the sub-endpoints of a routing endpoint (:meth:`_polled_by_router`).
    _yield_polls = True

    def __init__(self, address: EndPointAddress) -> None:
        self._address = address
        self._events = EventQueue()
        self._links: dict[EndPointAddress, Link] = {}
        self._pending: dict[EndPointAddress, _Pending] = {}
        self._next_conn_id = itertools.count(1)
        self._next_incoming_id = itertools.count(1)
        self._closed = False
        #: Set by the owning transport so that a closed endpoint is forgotten.
        self._forget: Callable[[], object] | None = None
        #: Cache of :meth:`_polled_links`; None: recompute (the links changed).
        self._polled: list[Link] | None = None
        #: Heartbeat period (s), 0 for none; set from the transport's by ``_add_endpoint``.
        self._tick = DEFAULT_TICK
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        #: Incoming connections whose data goes to a receiver (see set_receiver).
        self._receivers: dict[ConnectionId, Callable[[Sequence[memoryview]], None]] = {}
        #: How many messages went to receivers: a poll for an event ends when it grows.
        self._handed_over = 0

    # ------------------------------------------------------------------ transport hooks

    @abstractmethod
    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        """Establish (or find, after a crossed connect) the link to ``remote``.

        Called only when no live link to ``remote`` exists and no other call for it is
        pending. Must raise :class:`ConnectError` with the right code. The returned
        link is registered by the caller.

        It runs in a task of its own, shared by every ``connect`` waiting for this
        peer, and is cancelled when all of them were cancelled or timed out: it must
        then release whatever it acquired (sockets, segments) and let the peer see a
        failed handshake, never an exception of its own in the event loop.
        """

    async def _release(self) -> None:
        """Release transport resources (listeners, segments) after links are closed."""

    def _pollable(self, link: Link) -> bool:
        """Hook: whether polling ``link`` in place can find a reply (its peer runs in
        another process). The default polls none."""
        return False

    def _polled_links(self) -> list[Link]:
        """The live links :meth:`_pollable` accepts; cached until the links change."""
        links = self._polled
        if links is None:
            links = self._polled = [
                link for link in self._links.values() if link.alive and self._pollable(link)
            ]
        return links

    def _register_link(self, link: Link) -> None:
        """Make ``link`` the live link to ``link.remote`` (for links a peer opened).

        A previous live link to the same peer is taken down first: the peer opened a
        new bundle, so the old one is dead (it may not have noticed yet).
        """
        old = self._links.get(link.remote)
        if old is not None and old is not link:
            if old.incoming or old.outgoing:
                log.warning(
                    "dropping link to %r: the peer opened a new one (it saw the old one fail)",
                    link.remote,
                )
            old.fail("peer opened a new bundle")
        self._links[link.remote] = link
        self._polled = None
        if link.heartbeat and self._heartbeat_timer is None and self._tick > 0:
            self._heartbeat_timer = asyncio.get_running_loop().call_later(
                self._tick, self._heartbeat
            )

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        """One heartbeat round over the watched links (module docstring); re-arms
        itself while any is left."""
        self._heartbeat_timer = None
        if self._closed:
            return
        watched = False
        for link in list(self._links.values()):
            if not link.heartbeat or not link.alive:
                continue
            if link.heard:
                link.heard = False
                link.silent_rounds = 0
            else:
                link.silent_rounds += 1
                if link.silent_rounds >= TICKS_TO_LOSS:
                    log.warning(
                        "lost %r: nothing arrived for %d ticks of %g s (network partition, "
                        "or the peer hangs)",
                        link.remote,
                        link.silent_rounds,
                        self._tick,
                    )
                    link.fail(
                        f"peer silent for {link.silent_rounds} ticks of {self._tick:g} s "
                        "(network partition, or the peer hangs)"
                    )
                    continue
            watched = True
            if link.sent:
                link.sent = False
            else:
                link.send_tick()
        if watched and not self._closed:
            self._heartbeat_timer = asyncio.get_running_loop().call_later(
                self._tick, self._heartbeat
            )

    # ------------------------------------------------------------------ receive path

    def _on_open(self, link: Link, conn_id: int) -> None:
        if not link.alive or self._closed:
            return
        local = next(self._next_incoming_id)
        link.incoming[conn_id] = local
        self._events.put(ConnectionOpened(local, Reliability.RELIABLE_ORDERED, link.remote))

    def _on_data(self, link: Link, conn_id: int, frames: Sequence[memoryview]) -> None:
        local = link.incoming.get(conn_id)
        if local is None or not link.alive:
            if link.alive and not self._closed:
                self._protocol_violation(link, f"data on unknown connection {conn_id}")
            return
        if self._receivers and not self._events._items:
            receiver = self._receivers.get(local)
            if receiver is not None:
                self._handed_over += 1
                receiver(frames)  # see EndPoint.set_receiver
                return
        self._events.put(new_received(local, frames))

    def _on_close(self, link: Link, conn_id: int) -> None:
        local = link.incoming.pop(conn_id, None)
        if local is None or not link.alive:
            if link.alive and not self._closed:
                self._protocol_violation(link, f"close of unknown connection {conn_id}")
            return
        self._receivers.pop(local, None)
        self._events.put(ConnectionClosed(local))

    def _protocol_violation(self, link: Link, reason: str) -> None:
        log.warning("dropping link to %r: protocol violation: %s", link.remote, reason)
        link.fail(f"protocol violation: {reason}")

    def _on_link_down(self, link: Link, reason: str) -> None:
        """The link failed or the peer closed it: fail the bundle (idempotent)."""
        if not link.alive:
            return
        link.alive = False
        self._polled = None
        if self._links.get(link.remote) is link:
            del self._links[link.remote]
        had_connections = bool(link.incoming or link.outgoing)
        for conn in link.outgoing.values():
            conn._fail()
        link.outgoing.clear()
        if self._receivers:
            for local in link.incoming.values():
                self._receivers.pop(local, None)
        link.incoming.clear()
        if had_connections and not self._closed:
            log.debug("connection to %r lost: %s", link.remote, reason)
            self._events.put(
                ErrorEvent(EventError(EventErrorCode.CONNECTION_LOST, reason, link.remote))
            )

    # ------------------------------------------------------------------ EndPoint API

    @property
    def address(self) -> EndPointAddress:
        return self._address

    async def receive(self) -> Event:
        return await self._events.get()

    def set_receiver(
        self, conn_id: ConnectionId, receiver: Callable[[Sequence[memoryview]], None] | None
    ) -> bool:
        if not self._hands_over:
            return False
        if receiver is None:
            self._receivers.pop(conn_id, None)
            return True
        if self._closed or not any(conn_id in link.incoming.values() for link in self._links.values()):
            return False  # not an open incoming connection (closed or lost already)
        self._receivers[conn_id] = receiver
        return True

    def receive_nowait(self) -> Event | None:
        """The next event if one can be had without suspending, else None.

        For a consumer that runs beside a task waiting in :meth:`receive` (a process
        waiting for a reply takes it itself instead of waiting for the dispatcher):
        takes a queued event, or polls the links in place for a bounded time while
        the event loop has nothing else to run (the transport's ``_poll_idle``).
        Events are taken in order, whoever takes them. Never returns
        ``EndPointClosed`` (``receive`` reports the close). Never blocks longer than
        the transport's polling budget.
        """
        events = self._events
        # Waiters in receive are not woken for events this call takes: holding the
        # queue saves them a wake-up for nothing (and the loop an iteration).
        events._held = True
        try:
            event = events.pop_ready(overtake=True) if events._items else None
            if event is None and self._poll_idle():
                event = events.pop_ready(overtake=True)
        finally:
            events._held = False
            if events._items:
                events.put_wakeup()
        return event

    def _polled_by_router(self) -> None:
        """This endpoint is a routing endpoint's sub-endpoint: on crowded CPUs its own
        polls do not yield (a yielding poll of one sub-endpoint would let the other's
        messages wait); the routing endpoint polls both (:meth:`_looker`)."""
        self._yield_polls = False
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.yields = False

    def _queued_event(self) -> Event | None:
        """:meth:`receive_nowait` without its poll: the next queued event, if any
        (never ``EndPointClosed``). For a routing endpoint that polled the links
        itself (:meth:`_looker`)."""
        events = self._events
        if not events._items:
            return None
        events._held = True
        try:
            return events.pop_ready(overtake=True)
        finally:
            events._held = False
            if events._items:
                events.put_wakeup()

    def _looker(self) -> Callable[[], object] | None:
        """Hook for a routing endpoint that polls its sub-endpoints together on
        crowded CPUs: a function that takes, without waiting, whatever the polled
        links hold now (events are queued, or data handed to receivers), called
        many times in a row; :meth:`_done_looking` must follow the last call (the
        function may leave the links in a state only that restores). None (the
        default) when this endpoint cannot be polled so, with nothing changed: the
        routing endpoint then does not poll on crowded CPUs."""
        return None

    def _done_looking(self) -> None:
        """Hook: the calls of a :meth:`_looker` function are over."""

    def _own_handles(self) -> Container[object]:
        """Hook: the handles of this endpoint's own polling that may be ready on the
        loop (no reason not to poll); none by default."""
        return ()

    def _poll_idle(self) -> bool:
        """Hook: poll the links in place, bounded, while the loop is idle.

        Returns True if an event may have been queued. The default does not poll.
        """
        return False

    async def connect(
        self,
        address: EndPointAddress,
        *,
        reliability: Reliability = Reliability.RELIABLE_ORDERED,
        timeout: float | None = None,
    ) -> Connection:
        if self._closed:
            raise ConnectError(ConnectErrorCode.FAILED, "endpoint is closed")
        if not isinstance(address, bytes):
            raise ConnectError(
                ConnectErrorCode.FAILED, f"address must be bytes, not {type(address).__name__}"
            )
        address = EndPointAddress(address)
        link = self._links.get(address)
        if link is None:
            link = await self._get_link(address, timeout)
            if self._closed:
                raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
            if not link.alive:
                # The new bundle failed before we could use it; that is this
                # connect's failure, not a reason to reconnect behind the caller.
                raise ConnectError(
                    ConnectErrorCode.FAILED, f"link to {address!r} failed while connecting"
                )
        conn_id = next(self._next_conn_id)
        conn = self._connection_class(self, link, conn_id)
        link.outgoing[conn_id] = conn
        link.send_control(Kind.OPEN, conn_id)
        return conn

    async def _get_link(self, address: EndPointAddress, timeout: float | None) -> Link:
        """Wait for the link to ``address``, joining an establishment under way.

        Establishment runs in its own task so that cancelling one caller (or its
        timeout) does not fail the others; it is cancelled when no caller waits any
        more.
        """
        pending = self._pending.get(address)
        if pending is None:
            pending = _Pending(
                asyncio.get_running_loop().create_task(self._establish(address, timeout))
            )
            self._pending[address] = pending
            pending.task.add_done_callback(lambda task: self._establish_done(address, task))
        pending.waiters += 1
        try:
            if timeout is None:
                return await asyncio.shield(pending.task)
            try:
                return await asyncio.wait_for(asyncio.shield(pending.task), timeout)
            except asyncio.TimeoutError:
                raise ConnectError(
                    ConnectErrorCode.TIMEOUT, f"no answer from {address!r} within {timeout} s"
                ) from None
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.task.done():
                pending.task.cancel()
                # Forget it now: a connect arriving before the cancellation lands must
                # start afresh, not join a task that will end cancelled.
                if self._pending.get(address) is pending:
                    del self._pending[address]

    async def _establish(self, address: EndPointAddress, timeout: float | None) -> Link:
        existing = self._links.get(address)
        if existing is not None:
            # The peer connected to us (a crossed connect) before this task ran.
            return existing
        if address == self._address:
            link: Link = _LoopbackLink(self)
        else:
            try:
                link = await self._open_link(address, timeout)
            except Exception:
                if _cancelling():
                    # Told to stop (every caller left, or asyncio.run is shutting down),
                    # but the transport's own error came first (asyncio.wait_for returns
                    # a result that raced its cancellation): end cancelled as asked, so
                    # that no error nobody waits for is reported ("unhandled exception
                    # during asyncio.run() shutdown").
                    raise asyncio.CancelledError from None
                raise
        if self._closed:
            link.abort()
            raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
        if link.alive and self._links.get(address) is not link:
            self._register_link(link)
        return link

    def _establish_done(self, address: EndPointAddress, task: asyncio.Task[Link]) -> None:
        pending = self._pending.get(address)
        if pending is not None and pending.task is task:
            del self._pending[address]
        if not task.cancelled():
            # Every waiter may have left (cancelled or timed out): mark it retrieved.
            task.exception()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        links = list(self._links.values())
        self._links.clear()
        self._polled = None
        for link in links:
            for conn_id, conn in list(link.outgoing.items()):
                # Not CLOSED: the caller closed the endpoint, not this connection, and
                # network-transport reports SendFailed for it.
                conn._state = _State.FAILED
                link.send_control(Kind.CLOSE, conn_id)
            link.outgoing.clear()
            link.incoming.clear()
            link.alive = False
        self._receivers.clear()
        try:
            if links:
                await asyncio.wait_for(
                    asyncio.gather(*(link.close() for link in links), return_exceptions=True),
                    LINK_CLOSE_TIMEOUT,
                )
        except (asyncio.TimeoutError, Exception) as exc:
            log.debug("graceful close of links failed: %r", exc)
        finally:
            for link in links:
                link.abort()
            try:
                await self._release()
            finally:
                if self._forget is not None:
                    self._forget()
                self._events.put(EndPointClosed())

    # ------------------------------------------------------------------ fault hook

    def _break(self, remote: EndPointAddress) -> None:
        link = self._links.get(remote)
        if link is None:
            return
        self._on_link_down(link, "connection broken by break_connection")
        link.abort()


class MultiplexedTransport(Transport, FaultInjection):
    """Keeps the transport's endpoints; closes them all; routes ``break_connection``."""

    def __init__(self, *, tick: float | None = None) -> None:
        self._endpoints: dict[EndPointAddress, MultiplexedEndPoint] = {}
        self._closed = False
        #: Heartbeat period of the endpoints (:func:`tick_period`); a subclass with a
        #: ``tick`` option sets it from that.
        self._tick = tick_period(tick)

    def _add_endpoint(self, endpoint: MultiplexedEndPoint) -> None:
        endpoint._tick = self._tick
        address = endpoint.address
        self._endpoints[address] = endpoint
        endpoint._forget = lambda: self._endpoints.pop(address, None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)

    async def break_connection(self, local: EndPointAddress, remote: EndPointAddress) -> None:
        endpoint = self._endpoints.get(EndPointAddress(local))
        if endpoint is None:
            raise ValueError(f"{local!r} is not an endpoint of this transport")
        endpoint._break(EndPointAddress(remote))
