"""Per-peer routing: shared memory to peers on this host, the network to the others.

A routing endpoint is made of two sub-endpoints of two other transports: a *local*
one (``shm``) and a *network* one (``tcp``, ``ucx`` or ``mpi``). Its address carries
both sub-addresses and this host's identity (:func:`hpcproc._host.host_identity`:
host name, boot id, network namespace). :meth:`RoutingEndPoint.connect` compares the
peer's host identity with its own: the same host goes over the local sub-endpoint,
any other host over the network one. Every connection to a given peer therefore runs
over one sub-transport, so the contract's bundle semantics carry over unchanged: a
failure of the shared-memory link to one peer is ``CONNECTION_LOST`` for that peer
only. The process layer never knows this transport exists; it is a transport like the
others and passes the same conformance suite.

It is written against :mod:`hpcproc.transports.base` alone (its sub-transports could
be third-party ones).

How the receiver learns who connected
-------------------------------------
A sub-endpoint reports incoming connections with the peer's *sub*-address, while the
layer above must see the peer's routing address (its node id). So the first message
on every connection is a hello carrying the sender's routing address. The receiving
side holds back ``ConnectionOpened`` until that hello has arrived and then reports it
with the routing address; the hello itself is never delivered. It costs one message
per connection, none per message. A connection closed before its hello is dropped
silently (the peer's ``connect`` did not complete).

Connection ids are the local sub-endpoint's own ids, so its events pass through
unchanged, and the network sub-endpoint's ids plus 2**62: unique for the endpoint's
lifetime, and increasing as each sub-endpoint's are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .._host import host_identity
from .._loops import get_running_loop
from ._busy_poll import IdlePoller
from ._multiplex import MultiplexedEndPoint
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
    NewEndPointError,
    NewEndPointErrorCode,
    Received,
    Reliability,
    SendError,
    Transport,
    address_scheme,
)
from .faults import FaultInjection, require_fault_injection

__all__ = ["RoutingEndPoint", "RoutingTransport", "create_transport", "parse_address"]

log = logging.getLogger(__name__)

#: ``_poll_both``'s answer when it did not poll.
_NOT_POLLED = object()

_PREFIX = b"route:"
_HELLO = b"hpcproc-route-hello/1"
#: Index of each sub-endpoint (also the low bit of routed connection ids).
LOCAL, NETWORK = 0, 1


def _field(data: bytes, pos: int) -> tuple[bytes, int]:
    colon = data.index(b":", pos)
    size = int(data[pos:colon])
    end = colon + 1 + size
    if size < 0 or end > len(data):
        raise ValueError("field overruns the address")
    return data[colon + 1 : end], end


def format_address(host: str, local: bytes, network: bytes) -> EndPointAddress:
    """``route:<len>:<host><len>:<local address><len>:<network address>``."""
    parts = [host.encode(), local, network]
    return EndPointAddress(_PREFIX + b"".join(b"%d:%s" % (len(p), p) for p in parts))


def parse_address(address: bytes) -> tuple[str, EndPointAddress, EndPointAddress]:
    """``(host identity, local sub-address, network sub-address)`` of a routing address.

    Raises:
        ConnectError(FAILED): ``address`` is not a routing address.
    """
    try:
        if not address.startswith(_PREFIX):
            raise ValueError("no route: prefix")
        host, pos = _field(address, len(_PREFIX))
        local, pos = _field(address, pos)
        network, pos = _field(address, pos)
        if pos != len(address) or not host or not local or not network:
            raise ValueError("wrong number of fields")
        return host.decode(), EndPointAddress(local), EndPointAddress(network)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConnectError(
            ConnectErrorCode.FAILED, f"not a routing address ({exc}): {address!r}"
        ) from None


class RoutingConnection(Connection):
    """A connection over the sub-transport chosen for its peer."""

    __slots__ = ("_conn", "_remote")

    def __init__(self, conn: Connection, remote: EndPointAddress) -> None:
        self._conn = conn
        self._remote = remote
        # The sub-connection's own send_nowait, looked up before the method below: a
        # call less per message (the method says what it does, for subclasses too).
        self.send_nowait = conn.send_nowait  # type: ignore[method-assign]

    @property
    def remote_address(self) -> EndPointAddress:
        return self._remote

    async def send(self, frames: Sequence[Buffer]) -> None:
        await self._conn.send(frames)

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        return self._conn.send_nowait(frames)

    async def close(self) -> None:
        await self._conn.close()


class RoutingEndPoint(EndPoint):
    """Two sub-endpoints behind one address and one event queue; see the module."""

    def __init__(
        self, subs: tuple[EndPoint, EndPoint], host: str, *, separate_hosts: bool = False
    ) -> None:
        self._subs = subs
        self._host = host
        #: Testing: treat every other endpoint as another host (all over the network).
        self._separate_hosts = separate_hosts
        self._address = format_address(host, subs[LOCAL].address, subs[NETWORK].address)
        #: The sub-endpoint whose data came last: the one ``receive_nowait`` polls.
        self._hot = LOCAL
        #: Events translated but not yet handed out.
        self._queue: deque[Event] = deque()
        #: One task per sub-endpoint that waits in its ``receive`` and queues what it
        #: gets (started by the first ``receive`` here; see _pump).
        self._pumps: list[asyncio.Task[None] | None] = [None, None]
        #: Set by a pump when it queued something or ended; awaited by ``receive``.
        self._waiter: asyncio.Future[None] | None = None
        #: What a pump raised (other than the sub-endpoint's close), for ``receive``.
        self._pump_error: BaseException | None = None
        #: Sub-endpoints that reported EndPointClosed.
        self._sub_closed = [False, False]
        self._closed_reported = False
        self._closing = False
        #: Per sub-endpoint: conn id -> (reliability, peer sub-address), waiting for
        #: its hello.
        self._held: list[dict[ConnectionId, tuple[Reliability, bytes]]] = [{}, {}]
        #: Per sub-endpoint: conn id -> peer sub-address, for connections announced.
        self._open: list[dict[ConnectionId, bytes]] = [{}, {}]
        #: (sub, peer sub-address) -> peer routing address.
        self._peers: dict[tuple[int, bytes], EndPointAddress] = {}
        #: On crowded CPUs this endpoint polls both sub-endpoints by yielding
        #: (:meth:`_poll_both`), through the local one's poller; their own polls do
        #: not yield then. None where either cannot be polled so.
        self._both_poller: IdlePoller | None = None
        #: ``_poll_both``'s look at both, and the two sub-endpoint looks it calls
        #: (made again when either changes: their links changed).
        self._both_look: tuple[object, object, Callable[[], bool]] | None = None
        #: How many messages both sub-endpoints had handed to receivers when the
        #: current ``_poll_both`` began (its look stops when that grows).
        self._handed_at_poll = 0
        for sub in subs:
            if isinstance(sub, MultiplexedEndPoint):
                sub._polled_by_router()
        local, network = subs
        if isinstance(local, MultiplexedEndPoint) and isinstance(network, MultiplexedEndPoint):
            poller = getattr(local, "_poller", None)
            if isinstance(poller, IdlePoller) and poller.enabled:
                self._both_poller = poller

    @property
    def address(self) -> EndPointAddress:
        return self._address

    @property
    def sub_endpoints(self) -> tuple[EndPoint, EndPoint]:
        """``(local, network)``."""
        return self._subs

    def route(self, address: EndPointAddress) -> tuple[int, EndPointAddress]:
        """``(sub-endpoint index, sub-address)`` that a connection to ``address`` uses.

        Raises:
            ConnectError(FAILED): ``address`` is not a routing address.
        """
        host, local, network = parse_address(address)
        same = host == self._host and (not self._separate_hosts or address == self._address)
        return (LOCAL, local) if same else (NETWORK, network)

    def transport_for(self, address: EndPointAddress) -> str:
        """The sub-transport that carries connections to ``address`` (``"shm"`` for a
        peer on this host, the network transport's name otherwise), as its
        sub-endpoint names it; ``"route"`` for an address that is not a routing one."""
        try:
            sub, sub_address = self.route(address)
        except ConnectError:
            return address_scheme(address)
        return self._subs[sub].transport_for(sub_address)

    # ------------------------------------------------------------------ connect

    async def connect(
        self,
        address: EndPointAddress,
        *,
        reliability: Reliability = Reliability.RELIABLE_ORDERED,
        timeout: float | None = None,
    ) -> Connection:
        if self._closing:
            raise ConnectError(ConnectErrorCode.FAILED, "endpoint is closed")
        sub, sub_address = self.route(address)
        conn = await self._subs[sub].connect(sub_address, reliability=reliability, timeout=timeout)
        self._peers[(sub, bytes(sub_address))] = EndPointAddress(address)
        try:
            await conn.send([_HELLO, self._address])
        except BaseException as exc:
            await asyncio.shield(conn.close())
            if isinstance(exc, SendError):
                raise ConnectError(
                    ConnectErrorCode.FAILED, f"connection to {address!r} failed: {exc}"
                ) from exc
            raise
        return RoutingConnection(conn, EndPointAddress(address))

    # ------------------------------------------------------------------ events

    def _translate(self, sub: int, event: Event) -> Event | None:
        """The event to report for ``event`` of sub-endpoint ``sub``; None for none."""
        if type(event) is Received:
            conn_id = event.conn_id
            if conn_id in self._open[sub]:
                # The local sub-endpoint's ids are ours: its events pass unchanged.
                return event if sub == LOCAL else Received(conn_id + _NETWORK_IDS, event.frames)
            held = self._held[sub].pop(conn_id, None)
            if held is None:
                return None  # a connection of a lost bundle, or one we refused
            frames = event.frames
            if len(frames) != 2 or bytes(frames[0]) != _HELLO:
                log.warning("connection from %r did not start with a routing hello", held[1])
                return None
            peer = EndPointAddress(bytes(frames[1]))
            self._open[sub][conn_id] = held[1]
            self._peers[(sub, held[1])] = peer
            return ConnectionOpened(_routed(sub, conn_id), held[0], peer)
        if type(event) is ConnectionOpened:
            self._held[sub][event.conn_id] = (event.reliability, bytes(event.remote_address))
            return None
        if type(event) is ConnectionClosed:
            if self._open[sub].pop(event.conn_id, None) is not None:
                return ConnectionClosed(_routed(sub, event.conn_id))
            self._held[sub].pop(event.conn_id, None)
            return None
        if type(event) is ErrorEvent:
            error = event.error
            if error.code is not EventErrorCode.CONNECTION_LOST or error.remote_address is None:
                return event
            lost = bytes(error.remote_address)
            # The bundle's incoming connections are implicitly closed (the contract).
            for table in (self._open[sub], self._held[sub]):
                for conn_id in [c for c, v in table.items() if _peer_of(v) == lost]:
                    del table[conn_id]
            lost_peer = self._peers.get((sub, lost))
            if lost_peer is None:
                return None  # nothing of that bundle was ever visible above
            return ErrorEvent(EventError(error.code, error.message, lost_peer))
        if type(event) is EndPointClosed:
            self._sub_closed[sub] = True
            return None
        return event

    def receive_nowait(self) -> Event | None:
        """See :meth:`EndPoint.receive_nowait`: a queued event, else what the
        sub-endpoint that delivered last hands out without suspending.

        Only that one sub-endpoint may poll in place (``receive_nowait`` of shm and
        tcp polls their links while the loop is idle): polling the other one after it
        would spin a second budget while the reply, most likely on the first, waits
        unread (a same-host process round trip measured 20 us routed against 16 us
        over plain shm before). The other sub-endpoint's events are not lost: its
        pump (waiting in its ``receive``) takes them on the loop's next turn, and
        until the pumps run (before the first ``receive``) it is asked here too.
        """
        queue = self._queue
        if queue:
            return queue.popleft()
        poller = self._both_poller
        # (The crowding's cached answer, which the sub-endpoints' polls keep fresh:
        # no clock read here while the CPUs are not crowded.)
        if poller is not None and poller.crowding.crowded:
            event = self._poll_both(poller)
            if event is not _NOT_POLLED:
                return event  # type: ignore[return-value]
        # What the pumps queued is older than anything a sub-endpoint hands out now.
        # Beside a pump waiting in a sub-endpoint's receive, taking events is allowed:
        # the contract hands each out once, in order, whoever takes it.
        hot = self._hot
        closed = self._sub_closed
        if not closed[hot]:
            if hot == LOCAL:
                # _take(LOCAL)'s common case written out: a call less per receive.
                event = self._subs[LOCAL].receive_nowait()
                if event is not None:
                    if type(event) is Received and event.conn_id in self._open[LOCAL]:
                        return event
                    event = self._translate(LOCAL, event)
                    if event is None:
                        event = self._take(LOCAL)
            else:
                event = self._take(hot)
            if event is not None:
                return event
            if queue:  # a sub-endpoint's receiver queued data here (see set_receiver)
                return queue.popleft()
        other = 1 - hot
        if self._pumps[other] is None and not closed[other]:
            event = self._take(other)
            if event is not None:
                self._hot = other
                return event
        return None

    def _poll_both(self, poller: IdlePoller) -> Event | object | None:
        """On crowded CPUs: poll both sub-endpoints' links by yielding
        (:meth:`IdlePoller.poll_looking`), then the next event if one came (None if
        none, or if the data went to a receiver). :data:`_NOT_POLLED` when the CPUs
        are not crowded, or either sub-endpoint cannot be polled so now."""
        # (Called on every wait of a receive on crowded CPUs, with 4 ranks on 2 CPUs
        # 1.5 times per all-to-all round: no typing.cast, no call to the crowding's
        # cached answer, and the look at both made once, not a closure per wait. Both
        # sub-endpoints are MultiplexedEndPoints where _both_poller is set.)
        local: MultiplexedEndPoint
        network: MultiplexedEndPoint
        local, network = self._subs  # type: ignore[assignment]
        now = time.perf_counter()
        c = poller.crowding
        closed = self._sub_closed
        if not (c.crowded if now < c.next_check else c(now)) or closed[LOCAL] or closed[NETWORK]:
            return _NOT_POLLED
        # The network's first: a None answer leaves no trace, while a function
        # answer must be followed by _done_looking (the shm looker marks its readers
        # awake, so that no wake-ups are sent; left so, its rings would go unread).
        look_network = network._looker()
        if look_network is None:
            return _NOT_POLLED
        look_local = local._looker()
        if look_local is None:
            network._done_looking()
            return _NOT_POLLED
        both = self._both_look
        if both is None or both[0] is not look_local or both[1] is not look_network:
            both = self._both_look = (
                look_local,
                look_network,
                self._make_look(look_local, look_network),
            )
        queue = self._queue
        self._handed_at_poll = local._handed_over + network._handed_over
        # Held, as in receive_nowait: the pumps waiting in the sub-endpoints' receive
        # are not woken for the events taken here.
        local._events._held = network._events._held = True
        try:
            polled = poller.poll_looking(both[2], now, local._own_handles)
        finally:
            local._events._held = network._events._held = False
            local._done_looking()
            network._done_looking()
        if not polled:
            return _NOT_POLLED
        local_items = local._events._items
        network_items = network._events._items
        if not (queue or local_items or network_items):
            return None  # the common end: the data went to receivers
        event: Event | None = queue.popleft() if queue else None
        for sub, endpoint in ((LOCAL, local), (NETWORK, network)):
            events = endpoint._events
            if event is None and events._items:
                event = self._take_queued(sub)
                if event is not None:
                    self._hot = sub
            if events._items and events._waiters:
                events.put_wakeup()  # what is left goes to the pump
        return event

    def _make_look(
        self, look_local: Callable[[], object], look_network: Callable[[], object]
    ) -> Callable[[], bool]:
        """:meth:`_poll_both`'s one look at both sub-endpoints' links: True (stop)
        once an event is queued here or in either, or either handed a message to a
        receiver since the poll began."""
        local: MultiplexedEndPoint
        network: MultiplexedEndPoint
        local, network = self._subs  # type: ignore[assignment]
        queue = self._queue
        local_items = local._events._items
        network_items = network._events._items

        def look() -> bool:
            look_local()
            look_network()
            return bool(
                queue
                or local_items
                or network_items
                or local._handed_over + network._handed_over != self._handed_at_poll
            )

        return look

    def _take_queued(self, sub: int) -> Event | None:
        """:meth:`_take` of what sub-endpoint ``sub`` has queued, without its poll."""
        endpoint: MultiplexedEndPoint = self._subs[sub]  # type: ignore[assignment]
        while (event := endpoint._queued_event()) is not None:
            out = self._translate(sub, event)
            if out is not None:
                return out
        return None

    def set_receiver(
        self, conn_id: ConnectionId, receiver: Callable[[Sequence[memoryview]], None] | None
    ) -> bool:
        """See :meth:`EndPoint.set_receiver`: asked of the sub-endpoint that carries
        ``conn_id``. Its data is handed over only while this endpoint's own queue is
        empty too; while the pumps hold events here, it is queued behind them."""
        sub = NETWORK if conn_id >= _NETWORK_IDS else LOCAL
        sub_id = conn_id - _NETWORK_IDS if sub == NETWORK else conn_id
        if receiver is None:
            return self._subs[sub].set_receiver(sub_id, None)
        if sub_id not in self._open[sub]:
            return False  # not an open connection of ours (closed, lost or refused)
        queue = self._queue

        def receive(frames: Sequence[memoryview]) -> None:
            if queue:
                queue.append(Received(conn_id, frames))  # behind what the pumps queued
                self._wake()
            else:
                receiver(frames)

        return self._subs[sub].set_receiver(sub_id, receive)

    def _take(self, sub: int) -> Event | None:
        """The next event of sub-endpoint ``sub`` to report, taken without suspending."""
        endpoint = self._subs[sub]
        if sub == LOCAL:
            # The same-host fast path: the local sub-endpoint's data events pass
            # unchanged (its connection ids are ours), with no allocation.
            open_ = self._open[LOCAL]
            while (event := endpoint.receive_nowait()) is not None:
                if type(event) is Received and event.conn_id in open_:
                    return event
                out = self._translate(LOCAL, event)
                if out is not None:
                    return out
            return None
        while (event := endpoint.receive_nowait()) is not None:
            out = self._translate(sub, event)
            if out is not None:
                return out
        return None

    async def _pump(self, sub: int) -> None:
        """Wait in sub-endpoint ``sub``'s ``receive`` and queue the translated events,
        until it is closed.

        Why one long-lived task per sub-endpoint rather than one per wait: the task
        that waits is the same from one event to the next, as when the node's
        dispatcher waits in a plain endpoint, so a sub-endpoint that polls while the
        loop is idle (shm, tcp) finds it idle, and a process waiting for a reply
        polls it in place (measured: a same-host process round trip of 73 us with a
        task per wait, against 15 us over plain shm).
        """
        endpoint = self._subs[sub]
        try:
            while not self._sub_closed[sub]:
                try:
                    event = await endpoint.receive()
                except EndPointClosedError:
                    self._sub_closed[sub] = True
                    return
                out = self._translate(sub, event)
                if out is not None:
                    if type(out) is Received:
                        self._hot = sub
                    self._queue.append(out)
                    self._wake()
                # Neither is held while waiting: a large message's buffers are freed as
                # soon as its receiver lets go of them.
                del event, out
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._pump_error = exc
        finally:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> Event:
        while True:
            event = self.receive_nowait()
            if event is not None:
                return event
            if self._pump_error is not None:
                # Raised on every call, not once: that sub-endpoint's pump is gone, and
                # a later call would otherwise wait for ever on what it no longer takes.
                raise self._pump_error
            if all(self._sub_closed):
                if self._closed_reported:
                    raise EndPointClosedError()
                self._closed_reported = True
                return EndPointClosed()
            for sub in (LOCAL, NETWORK):
                if self._pumps[sub] is None and not self._sub_closed[sub]:
                    self._pumps[sub] = asyncio.ensure_future(self._pump(sub))
            waiter = self._waiter = get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        errors: list[BaseException] = []
        for endpoint in self._subs:
            try:
                await endpoint.close()
            except Exception as exc:  # both are closed whatever one of them does
                errors.append(exc)
        if errors:
            log.debug("closing a sub-endpoint failed: %r", errors)

    def cancel_pending(self) -> None:
        """Stop the pumps (the endpoint is being discarded)."""
        for task in self._pumps:
            if task is not None:
                task.cancel()
        self._pumps = [None, None]


#: Added to the network sub-endpoint's connection ids (the local one's pass unchanged).
_NETWORK_IDS = 1 << 62


def _routed(sub: int, conn_id: ConnectionId) -> ConnectionId:
    """The id reported above for ``conn_id`` of sub-endpoint ``sub``: the local
    sub-endpoint's own, the network one's plus :data:`_NETWORK_IDS`."""
    return conn_id if sub == LOCAL else conn_id + _NETWORK_IDS


def _peer_of(value: bytes | tuple[Reliability, bytes]) -> bytes:
    return value[1] if isinstance(value, tuple) else value


class RoutingTransport(Transport, FaultInjection):
    """Shared memory between endpoints of one host, a network transport otherwise.

    It implements :class:`~hpcproc.transports.faults.FaultInjection` by breaking the
    bundle on the sub-transport that carries it (which must implement it too).

    Args:
        local: the transport for peers on this host (``shm``), or its registry name.
        network: the transport for peers on other hosts, or its registry name.
        separate_hosts: testing only: route every connection but self-connections
            over ``network``, as if each endpoint ran on a host of its own.
        local_options, network_options: options for the sub-transports created by
            name.
    """

    def __init__(
        self,
        local: Transport | str = "shm",
        network: Transport | str = "tcp",
        *,
        separate_hosts: bool = False,
        local_options: dict[str, Any] | None = None,
        network_options: dict[str, Any] | None = None,
    ) -> None:
        from . import create

        self._local = create(local, **(local_options or {})) if isinstance(local, str) else local
        self._network = (
            create(network, **(network_options or {})) if isinstance(network, str) else network
        )
        self._separate_hosts = separate_hosts
        self._endpoints: list[RoutingEndPoint] = []
        self._closed = False

    @property
    def sub_transports(self) -> tuple[Transport, Transport]:
        """``(local, network)``."""
        return self._local, self._network

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        local = await self._local.new_endpoint()
        try:
            network = await self._network.new_endpoint()
        except BaseException:
            await local.close()
            raise
        endpoint = RoutingEndPoint(
            (local, network), host_identity(), separate_hosts=self._separate_hosts
        )
        self._endpoints.append(endpoint)
        return endpoint

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for endpoint in self._endpoints:
            await endpoint.close()
        try:
            await self._local.close()
        finally:
            await self._network.close()
        # After the sub-transports closed, the endpoints' last events are queued;
        # pending sub-receives of endpoints nobody reads any more are dropped.
        for endpoint in self._endpoints:
            if endpoint._closed_reported:
                endpoint.cancel_pending()

    async def break_connection(self, local: EndPointAddress, remote: EndPointAddress) -> None:
        endpoint = next((e for e in self._endpoints if e.address == local), None)
        if endpoint is None:
            raise ValueError(f"{local!r} is not an endpoint of this transport")
        sub, sub_remote = endpoint.route(remote)
        faults = require_fault_injection(self.sub_transports[sub])
        await faults.break_connection(endpoint.sub_endpoints[sub].address, sub_remote)


def create_transport(
    local: Transport | str = "shm", network: Transport | str = "tcp", **options: Any
) -> RoutingTransport:
    """Registry factory for ``shm+tcp`` and its kin; ``options`` go to
    :class:`RoutingTransport`, except unknown ones, which go to the network transport."""
    own = {k: options.pop(k) for k in ("separate_hosts", "local_options") if k in options}
    network_options = {**options.pop("network_options", {}), **options}
    return RoutingTransport(local, network, network_options=network_options, **own)


def create_shm_tcp(**options: Any) -> RoutingTransport:
    """``shm+tcp``: shared memory on this host, tcp to the others."""
    return create_transport("shm", "tcp", **options)


def create_shm_ucx(**options: Any) -> RoutingTransport:
    """``shm+ucx``: shared memory on this host, UCX to the others."""
    return create_transport("shm", "ucx", **options)


def create_shm_mpi(**options: Any) -> RoutingTransport:
    """``shm+mpi``: shared memory on this host, MPI to the others."""
    return create_transport("shm", "mpi", **options)
