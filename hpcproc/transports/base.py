"""The transport contract: endpoints, lightweight connections, events and errors.

This is hpcproc's analogue of Haskell's ``network-transport``. Every transport
(``inmemory``, ``tcp``, ``shm``, ``mpi``, ``ucx``) implements these three ABCs and is
checked by the same conformance suite (:mod:`hpcproc.testing.conformance`).

Vocabulary
----------
*Endpoint*
    A heavyweight communication end (a socket, a shared-memory region, an MPI rank
    slot). It has an :class:`EndPointAddress` that peers use to connect, and one event
    queue (:meth:`EndPoint.receive`) that reports everything that happens to it.
*Connection*
    A lightweight, unidirectional, message-oriented, reliable and ordered channel from
    one endpoint to another. Thousands of them between two endpoints must be cheap.
*Bundle*
    All connections between two endpoints, in both directions. A bundle fails as a
    unit: this is what lets the process layer treat "disconnect" as "failure".

What a transport implements
---------------------------
Every call the layers above (the process layer, ``hpcproc.run``, the testing tools)
make on a transport is declared here, and nothing else is called:
:meth:`Transport.new_endpoint` and :meth:`Transport.close`; :attr:`EndPoint.address`,
:meth:`EndPoint.receive`, :meth:`EndPoint.receive_nowait`, :meth:`EndPoint.connect`
and :meth:`EndPoint.close`; :attr:`Connection.remote_address`, :meth:`Connection.send`,
:meth:`Connection.send_nowait` and :meth:`Connection.close`. The abstract methods are
the whole of what a transport must write; the non-blocking calls (``send_nowait``,
``receive_nowait``) have defaults that defer to the blocking ones, and a transport
overrides them only to be faster. Fault injection for tests is a separate, optional
interface (:mod:`hpcproc.transports.faults`). A third-party transport registers its
factory under the ``hpcproc.transports`` entry-point group (see
:mod:`hpcproc.transports`).

Guarantees every transport gives
--------------------------------
* A message is a sequence of frames; the receiver gets the same frames with the same
  boundaries, including empty frames.
* Ordering holds per connection, not across connections.
* :class:`ConnectionOpened` precedes every :class:`Received` of its connection, and
  :class:`ConnectionClosed` follows every one of them.
* Bundle failure: when the link between endpoints A and B breaks, A gets exactly one
  ``ErrorEvent(CONNECTION_LOST, B)`` (if the bundle carried an open connection in
  either direction); afterwards no old connection between them carries anything:
  outgoing sends raise ``SendError(FAILED)`` and incoming connections from B are
  implicitly closed (no ``ConnectionClosed`` follows for them). B eventually sees
  ``CONNECTION_LOST(A)`` too. A transport never reconnects by itself: a new
  :meth:`EndPoint.connect` starts a new bundle.
* Closing an endpoint closes its outgoing connections gracefully (peers see
  ``ConnectionClosed``) and peers that had connections to it see
  ``CONNECTION_LOST``. Locally ``EndPointClosed`` is the last event; afterwards
  ``receive`` raises :class:`EndPointClosedError`, ``send`` raises
  ``SendError(FAILED)`` and ``connect`` raises ``ConnectError(FAILED)``.
* A send that fails part-way (a frame that is not a buffer, an I/O error) fails the
  bundle: the sender gets ``SendError(FAILED)`` and both sides see
  ``CONNECTION_LOST``; a new ``connect`` starts a new bundle.
* A silent failure is detected. A peer cut off without the operating system noticing
  (a partition, a switch port, a hung host or process: no FIN, no RST, no error)
  would otherwise never be reported, so transports whose links can fail silently
  exchange heartbeats, like Erlang's ``net_ticktime``: a link on which nothing was
  sent for a tick (``HPCPROC_TICK`` seconds, default 15, or the transport's ``tick``
  option; 0 turns them off) carries a tick, and a peer from which nothing at all
  arrived for 4 ticks is lost as a bundle failure: ``CONNECTION_LOST`` on each side
  that is still running (each detects it by the same silence), so the process layer's
  monitors and links fire with ``DiedDisconnect``. Detection takes 4 to 5 ticks after
  the last thing the peer sent (60-75 s by default). Ticks are never queued behind
  data and never delay a send; any traffic counts as a sign of life, so a busy link
  sends none. A process whose event loop is blocked for more than about 4 ticks sends
  nothing and is lost too. The built-in network and shared-memory transports (tcp,
  ucx, shm, mpi) do this; ``inmemory``, whose endpoints share one process, needs none.
* Cancelling a ``connect`` (or its timeout) leaves no connection behind and does not
  affect other ``connect`` calls to the same peer.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # The buffer-protocol type (collections.abc.Buffer on Python >= 3.12); numpy
    # arrays, bytes, bytearray, memoryview and mmap all satisfy it.
    from typing_extensions import Buffer
else:
    Buffer = object

__all__ = [
    "Buffer",
    "ConnectError",
    "ConnectErrorCode",
    "Connection",
    "ConnectionClosed",
    "ConnectionId",
    "ConnectionOpened",
    "EndPoint",
    "EndPointAddress",
    "EndPointClosed",
    "EndPointClosedError",
    "ErrorEvent",
    "Event",
    "EventError",
    "EventErrorCode",
    "NewEndPointError",
    "NewEndPointErrorCode",
    "Received",
    "Reliability",
    "SendError",
    "SendErrorCode",
    "Transport",
    "TransportError",
    "address_scheme",
]

#: Anything a transport accepts as a frame is a ``Buffer``: an object exposing the
#: buffer protocol.

#: Identifies one incoming connection within the receiving endpoint. Ids are unique per
#: endpoint for its lifetime (they are never reused, even across bundles).
ConnectionId = int


class EndPointAddress(bytes):
    """The routable, serialisable address of an endpoint.

    It is plain bytes (so it can be sent in messages and compared), whose layout is
    private to the transport that made it. Peers only pass it back to ``connect``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"EndPointAddress({bytes(self)!r})"


class Reliability(enum.Enum):
    """Delivery guarantee requested for a connection.

    Every built-in transport delivers ``RELIABLE_ORDERED`` whatever is requested (a
    stronger guarantee is always allowed); the field is kept so that the process
    layer's requests are explicit and so that third-party transports can do less work
    for weaker requests.
    """

    RELIABLE_ORDERED = "reliable_ordered"
    RELIABLE_UNORDERED = "reliable_unordered"
    UNRELIABLE = "unreliable"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Received:
    """One whole message on incoming connection ``conn_id``.

    ``frames`` have the boundaries the sender gave. They belong to the receiver: no
    transport touches them after delivery, so arrays may be rebuilt over them.
    """

    conn_id: ConnectionId
    frames: Sequence[memoryview]


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    """A peer opened connection ``conn_id`` towards this endpoint."""

    conn_id: ConnectionId
    reliability: Reliability
    remote_address: EndPointAddress


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed ``conn_id``; it follows every ``Received`` of that connection."""

    conn_id: ConnectionId


@dataclass(frozen=True, slots=True)
class EndPointClosed:
    """The last event of a locally closed endpoint; ``receive`` raises afterwards."""


class EventErrorCode(enum.Enum):
    """What an :class:`ErrorEvent` reports."""

    #: The endpoint itself failed; it is unusable and will deliver nothing more.
    ENDPOINT_FAILED = "endpoint_failed"
    #: The whole transport failed; every endpoint of it is unusable.
    TRANSPORT_FAILED = "transport_failed"
    #: The bundle to ``remote_address`` broke (peer died, closed, or the network
    #: failed). Every connection between the two endpoints, both directions, is dead.
    CONNECTION_LOST = "connection_lost"


@dataclass(frozen=True, slots=True)
class EventError:
    """Details of an asynchronous failure."""

    code: EventErrorCode
    message: str
    remote_address: EndPointAddress | None = None


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An asynchronous failure; see :class:`EventErrorCode` for what each means."""

    error: EventError


Event = Received | ConnectionOpened | ConnectionClosed | EndPointClosed | ErrorEvent


# --------------------------------------------------------------------------- errors


class TransportError(Exception):
    """Base class of every error a transport raises.

    Subclasses carry a ``code`` chosen by what the caller must do differently.
    """

    code: enum.Enum | None = None

    def __init__(self, code: enum.Enum | None, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        base = super().__str__()
        return f"[{self.code.name}] {base}" if self.code is not None else base


class ConnectErrorCode(enum.Enum):
    #: No endpoint at that address (never existed, or closed). Do not retry blindly.
    NOT_FOUND = "not_found"
    #: The peer did not answer within the timeout; retrying may succeed.
    TIMEOUT = "timeout"
    #: Out of sockets, memory, ring slots... Free resources, then retry.
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    #: Anything else: malformed address, authentication refused, local endpoint closed.
    FAILED = "failed"


class ConnectError(TransportError):
    """:meth:`EndPoint.connect` failed; ``code`` is a :class:`ConnectErrorCode`."""

    code: ConnectErrorCode

    def __init__(self, code: ConnectErrorCode, message: str) -> None:
        super().__init__(code, message)


class SendErrorCode(enum.Enum):
    #: You closed this connection; nothing was sent.
    CLOSED = "closed"
    #: The bundle failed (peer or network broke it, or this send could not complete),
    #: or this connection's endpoint was closed; nothing more will be delivered.
    FAILED = "failed"


class SendError(TransportError):
    """:meth:`Connection.send` failed; ``code`` is a :class:`SendErrorCode`."""

    code: SendErrorCode

    def __init__(self, code: SendErrorCode, message: str) -> None:
        super().__init__(code, message)


class NewEndPointErrorCode(enum.Enum):
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    FAILED = "failed"


class NewEndPointError(TransportError):
    """:meth:`Transport.new_endpoint` failed."""

    code: NewEndPointErrorCode

    def __init__(self, code: NewEndPointErrorCode, message: str) -> None:
        super().__init__(code, message)


class EndPointClosedError(TransportError):
    """``receive`` was called on an endpoint after its ``EndPointClosed`` event."""

    def __init__(self, message: str = "endpoint is closed") -> None:
        super().__init__(None, message)


# --------------------------------------------------------------------------- ABCs


class Connection(ABC):
    """A lightweight, unidirectional, reliable, ordered connection to one endpoint."""

    @property
    @abstractmethod
    def remote_address(self) -> EndPointAddress:
        """The address this connection was opened to."""

    @abstractmethod
    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message made of ``frames``.

        Returns once the transport no longer needs the caller's buffers (they may be
        reused or mutated); it does not imply delivery. May block while the transport
        applies back-pressure. Messages on one connection are delivered in order.

        Raises:
            SendError(CLOSED): this connection was closed locally.
            SendError(FAILED): the bundle failed or this endpoint was closed; the
                message is not delivered. A send that cannot complete (a frame that is
                not a buffer, an I/O error part-way) fails the whole bundle, as a
                network fault would: both sides see ``CONNECTION_LOST``.
        """

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        """Send one message at once if that needs no waiting; False if nothing was sent.

        The non-blocking form of :meth:`send`, for callers on a fast path: ``True``
        means the message went out exactly as by :meth:`send` (same ordering with the
        connection's other messages, ``frames`` may be reused); ``False`` means nothing
        was sent and the caller must ``await send(frames)`` instead (which also raises
        the error of a closed or failed connection). Never blocks, never suspends.

        The default says "could not send now", so a transport that implements only
        :meth:`send` works unchanged, one trip round the event loop slower.

        Raises:
            SendError: as :meth:`send` does, for a send that began and failed (the
                bundle fails as it would there).
        """
        return False

    @abstractmethod
    async def close(self) -> None:
        """Close the connection; idempotent, never raises for a broken bundle.

        Messages already sent are delivered before the peer's ``ConnectionClosed``.
        """


_SCHEME = re.compile(rb"([A-Za-z][A-Za-z0-9+._-]*)[:/]")


def address_scheme(address: bytes) -> str:
    """The scheme an address starts with: its leading name before the first ``:`` or
    ``/`` (``b"tcp://h:1/x/0"`` -> ``"tcp"``, ``b"mpi:3:0"`` -> ``"mpi"``); ``"?"``
    when it has none."""
    match = _SCHEME.match(bytes(address))
    return match[1].decode("ascii") if match else "?"


class EndPoint(ABC):
    """A heavyweight endpoint: one address, one event queue, many connections."""

    @property
    @abstractmethod
    def address(self) -> EndPointAddress:
        """The address peers connect to."""

    @abstractmethod
    async def receive(self) -> Event:
        """Wait for the next event of this endpoint.

        All connections and all errors share this one queue; events of one connection
        are in order. Blocks until an event is available.

        Raises:
            EndPointClosedError: the endpoint's ``EndPointClosed`` event was already
                delivered.
        """

    def receive_nowait(self) -> Event | None:
        """The next event if one can be had without suspending, else ``None``.

        The non-blocking form of :meth:`receive`, for a consumer running beside a task
        that waits in :meth:`receive` (a process waiting for a reply takes it itself
        instead of waiting for the dispatcher). Events are taken in order, whoever
        takes them: an event returned here is never returned by :meth:`receive`.
        Never returns :class:`EndPointClosed` (:meth:`receive` reports the close) and
        never raises for a closed endpoint. Never suspends; a transport may poll its
        links in place for a short bounded time while the event loop has nothing else
        to run.

        The default returns ``None`` (nothing at once), so a transport that implements
        only :meth:`receive` works unchanged: every event goes through ``receive``.
        """
        return None

    def set_receiver(
        self, conn_id: ConnectionId, receiver: Callable[[Sequence[memoryview]], None] | None
    ) -> bool:
        """Ask that the data of incoming connection ``conn_id`` be handed to
        ``receiver(frames)`` as it arrives instead of queued as :class:`Received`
        events (``None``: queue it again); whether the endpoint will.

        An optimisation for a consumer that would act on those events at once (the
        process layer: a message into a mailbox): no event object, no queue, no task
        woken. Guaranteed when True is returned:

        * order: ``receiver`` is called only while no event is queued; data arriving
          while one is (of any connection) is queued as ``Received`` as before, and
          a transport may queue any of it anyway. A consumer that handles each event
          as it takes it therefore sees the data of every connection, and all
          events, in the order the endpoint got them;
        * ``receiver`` is called on the event loop's thread, from within the
          endpoint's own progress (or from :meth:`receive_nowait`); it must not block
          or raise, and the frames stay valid as a ``Received`` event's do;
        * ``ConnectionClosed`` and errors are still queued; the endpoint forgets the
          receiver when the connection closes or is lost.

        The default returns False and changes nothing: every event is queued.
        """
        return False

    def transport_for(self, address: EndPointAddress) -> str:
        """The name of the transport that carries connections to ``address``.

        For introspection (``hp.get_node_stats()``, ``--dry-run``): a composite
        endpoint (:mod:`hpcproc.transports.routing`) names the sub-transport it picks
        for that peer. Never connects, never blocks, never raises for a malformed
        address. The default is the address's scheme (``b"tcp://..."`` -> ``"tcp"``,
        ``b"shm:..."`` -> ``"shm"``), or ``"?"`` when it has none.
        """
        return address_scheme(address)

    @abstractmethod
    async def connect(
        self,
        address: EndPointAddress,
        *,
        reliability: Reliability = Reliability.RELIABLE_ORDERED,
        timeout: float | None = None,
    ) -> Connection:
        """Open a new lightweight connection to ``address``.

        Connecting to oneself is allowed. The first connection to a peer (or the first
        after a bundle failure) establishes a new bundle; later ones reuse it.

        Raises:
            ConnectError(NOT_FOUND): no endpoint at ``address`` (unknown or closed).
            ConnectError(TIMEOUT): no answer within ``timeout`` seconds.
            ConnectError(INSUFFICIENT_RESOURCES): out of local or remote resources.
            ConnectError(FAILED): malformed address, authentication failure, this
                endpoint is closed, or any other failure.
        """

    @abstractmethod
    async def close(self) -> None:
        """Close the endpoint gracefully; idempotent.

        Outgoing connections are closed (peers see ``ConnectionClosed``), peers with
        connections to this endpoint see ``CONNECTION_LOST``, and ``EndPointClosed``
        is queued as the last local event. Resources are released even when the
        graceful part fails.
        """


class Transport(ABC):
    """A factory of endpoints sharing one network backend.

    Fault injection (making a bundle fail on purpose, for tests) is not part of this
    interface: a transport that supports it also implements
    :class:`hpcproc.transports.faults.FaultInjection`.
    """

    @abstractmethod
    async def new_endpoint(self) -> EndPoint:
        """Create a new endpoint.

        Raises:
            NewEndPointError: could not create it (see its code).
        """

    @abstractmethod
    async def close(self) -> None:
        """Close every endpoint of this transport and release the backend; idempotent."""
