"""``teststreams``: a transport written to the abstract methods of ``base.py`` only.

It exists to prove that the contract in :mod:`hpcproc.transports.base` is the whole of
what the layers above need: it uses nothing private of ``hpcproc.transports`` (no
``_multiplex``, no link helpers), overrides neither ``send_nowait`` nor
``receive_nowait`` (the ABCs' defaults apply) and does not implement the optional
fault-injection interface. It is installed as its own distribution and found through
the ``hpcproc.transports`` entry point, as a third party's transport would be. It is
correct, not fast: asyncio streams over TCP, one socket per bundle.

Protocol
--------
An address is ``teststreams/<host>/<port>/<nonce hex>``: each endpoint listens on its
own port, and the random nonce tells a live endpoint from a later one that reuses the
port (``NOT_FOUND``).

Between two endpoints there is at most one live socket (the bundle), and only the
endpoint with the smaller address dials it, so crossed connects cannot make two. The
other endpoint asks for one: it sends a *callback* request on a short-lived socket,
and the smaller endpoint dials back (or reports the bundle it has) before answering.
A dial always starts a new bundle: the acceptor fails any older bundle with the same
peer (``CONNECTION_LOST`` if it carried connections). Bundles are numbered by their
dialer; a callback names the last bundle its sender saw, so that a bundle the sender
has already dropped is replaced and a newer one is not.

A dial or callback starts with ``MAGIC, kind (u8), target nonce (8 bytes), bundle id
(u64), address length (u16), sender address``; the answer is one status byte. On a
bundle socket, each message is ``kind (u8), sender's connection id (u64)``, and for
``DATA`` also ``frame count (u32), frame lengths (u64 each), frames``. Every length is
checked against a bound before it is used.

Closing an endpoint sends ``CLOSE`` for its outgoing connections, half-closes each
bundle socket and reads until the peer has read everything and dropped its end (so no
reset discards what the peer has not read yet), bounded by :data:`CLOSE_TIMEOUT`. A
failed bundle is aborted, which the peer sees as a reset or an end of stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import struct
from collections.abc import Awaitable, Sequence

from hpcproc.transports.base import (
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
    SendErrorCode,
    Transport,
)

__all__ = ["StreamsTransport", "create_transport"]

PREFIX = b"teststreams"
MAGIC = b"HPTS1"
#: Bound on the handshake of a dial or a callback request.
HANDSHAKE_TIMEOUT = 30.0
#: Bound on the graceful part of closing an endpoint; afterwards sockets are aborted.
CLOSE_TIMEOUT = 5.0
#: Bounds on what a peer may announce.
MAX_ADDRESS = 256
MAX_FRAMES = 1 << 20
MAX_FRAME = 1 << 34

_HELLO = struct.Struct("!5sB8sQH")
_HEAD = struct.Struct("!BQ")
_COUNT = struct.Struct("!I")


class _Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


class _Request(enum.IntEnum):
    DIAL = 1
    CALLBACK = 2


class _Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    FAILED = 2


class _ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


def _parse(address: bytes) -> tuple[str, int, bytes]:
    """``(host, port, nonce)`` of a teststreams address.

    Raises:
        ConnectError(FAILED): ``address`` is not one.
    """
    parts = bytes(address).split(b"/")
    try:
        if len(parts) != 4 or parts[0] != PREFIX:
            raise ValueError("not a teststreams address")
        host = parts[1].decode("ascii")
        port = int(parts[2])
        nonce = bytes.fromhex(parts[3].decode("ascii"))
        if not host or not 0 < port < 65536 or len(nonce) != 8:
            raise ValueError("bad host, port or nonce")
    except ValueError as exc:
        raise ConnectError(
            ConnectErrorCode.FAILED, f"malformed teststreams address {bytes(address)!r}: {exc}"
        ) from None
    return host, port, nonce


def _view(frame: Buffer) -> memoryview:
    """``frame`` as a flat byte view; TypeError if it is not a buffer."""
    view = memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


class _State(enum.Enum):
    OPEN = 0
    CLOSED = 1
    FAILED = 2


class _Bundle:
    """The one socket between two endpoints (``writer`` None: a self-connection)."""

    def __init__(
        self,
        endpoint: _EndPoint,
        remote: EndPointAddress,
        ident: int,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | None,
    ) -> None:
        self.endpoint = endpoint
        self.remote = remote
        self.ident = ident
        self.reader = reader
        self.writer = writer
        self.alive = True
        #: sender's connection id -> this endpoint's ConnectionId
        self.incoming: dict[int, ConnectionId] = {}
        self.outgoing: dict[int, _Connection] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.reader is not None:
            self.task = asyncio.get_running_loop().create_task(self._read())

    def send_control(self, kind: _Kind, conn_id: int) -> None:
        if self.writer is None:
            if kind is _Kind.OPEN:
                self.endpoint._on_open(self, conn_id)
            else:
                self.endpoint._on_close(self, conn_id)
        elif not self.writer.is_closing():
            self.writer.write(_HEAD.pack(kind, conn_id))

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        views = [_view(frame) for frame in frames]
        if self.writer is None:
            # Copies: the caller may reuse its buffers once send returns.
            self.endpoint._on_data(self, conn_id, [memoryview(bytearray(v)) for v in views])
            return
        header = _HEAD.pack(_Kind.DATA, conn_id) + _COUNT.pack(len(views))
        lengths = struct.pack(f"!{len(views)}Q", *(v.nbytes for v in views))
        # One bytes object: the stream transport may keep what it cannot send at once.
        self.writer.write(b"".join([header, lengths, *views]))
        await self.writer.drain()

    async def _read(self) -> None:
        assert self.reader is not None
        reader = self.reader
        endpoint = self.endpoint
        try:
            while True:
                kind, conn_id = _HEAD.unpack(await reader.readexactly(_HEAD.size))
                if kind == _Kind.DATA:
                    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
                    if count > MAX_FRAMES:
                        raise _ProtocolError(f"{count} frames announced")
                    lengths = struct.unpack(f"!{count}Q", await reader.readexactly(8 * count))
                    if any(length > MAX_FRAME for length in lengths):
                        raise _ProtocolError(f"a frame of {max(lengths)} bytes announced")
                    frames = [
                        memoryview(bytearray(await reader.readexactly(length)))
                        for length in lengths
                    ]
                    endpoint._on_data(self, conn_id, frames)
                elif kind == _Kind.OPEN:
                    endpoint._on_open(self, conn_id)
                elif kind == _Kind.CLOSE:
                    endpoint._on_close(self, conn_id)
                else:
                    raise _ProtocolError(f"unknown message kind {kind}")
        except asyncio.IncompleteReadError:
            reason = "the peer closed the connection"
        except (OSError, _ProtocolError) as exc:
            reason = f"connection failed: {exc!r}"
        endpoint._bundle_down(self, reason)

    def half_close(self) -> None:
        """Send what is queued, then end our direction; the peer reads to the end."""
        if self.writer is not None and not self.writer.is_closing():
            with contextlib.suppress(OSError):
                if self.writer.can_write_eof():
                    self.writer.write_eof()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


class _Connection(Connection):
    def __init__(self, endpoint: _EndPoint, bundle: _Bundle, conn_id: int) -> None:
        self._endpoint = endpoint
        self._bundle = bundle
        self._id = conn_id
        self.state = _State.OPEN

    @property
    def remote_address(self) -> EndPointAddress:
        return self._bundle.remote

    async def send(self, frames: Sequence[Buffer]) -> None:
        if self.state is _State.CLOSED:
            raise SendError(SendErrorCode.CLOSED, "connection was closed locally")
        bundle = self._bundle
        if self.state is _State.FAILED or not bundle.alive:
            raise SendError(SendErrorCode.FAILED, f"connection to {bundle.remote!r} was lost")
        try:
            await bundle.send_data(self._id, frames)
        except Exception as exc:
            # Part of the message may be on the wire: only failing the whole bundle,
            # on both sides, keeps the contract.
            self._endpoint._bundle_down(bundle, f"send failed: {exc!r}")
            raise SendError(
                SendErrorCode.FAILED, f"connection to {bundle.remote!r} was lost"
            ) from exc

    async def close(self) -> None:
        if self.state is not _State.OPEN:
            self.state = _State.CLOSED
            return
        self.state = _State.CLOSED
        bundle = self._bundle
        if bundle.outgoing.pop(self._id, None) is not None and bundle.alive:
            bundle.send_control(_Kind.CLOSE, self._id)


class _Pending:
    """A bundle being established, and how many callers wait for it."""

    def __init__(self, future: asyncio.Future[_Bundle]) -> None:
        self.future = future
        self.task: asyncio.Task[None] | None = None
        self.waiters = 0

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.future.cancel()


def _retrieve(future: asyncio.Future[_Bundle]) -> None:
    if not future.cancelled():
        future.exception()


class _EndPoint(EndPoint):
    def __init__(self, transport: StreamsTransport, host: str) -> None:
        self._transport = transport
        self._host = host
        self._nonce = os.urandom(8)
        self._address = EndPointAddress(b"")
        self._server: asyncio.AbstractServer | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._closed = False
        self._finished = False
        self._bundles: dict[EndPointAddress, _Bundle] = {}
        self._pending: dict[EndPointAddress, _Pending] = {}
        #: The last bundle id seen from each peer that dials us.
        self._seen: dict[EndPointAddress, int] = {}
        self._loopback: _Bundle | None = None
        self._ids = itertools.count(1)
        self._incoming_ids = itertools.count(1)
        self._handshakes: set[asyncio.Task[None]] = set()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self._address = EndPointAddress(
            b"/".join([PREFIX, self._host.encode(), b"%d" % port, self._nonce.hex().encode()])
        )

    @property
    def address(self) -> EndPointAddress:
        return self._address

    # ------------------------------------------------------------------ events

    async def receive(self) -> Event:
        if self._finished:
            raise EndPointClosedError()
        event = await self._events.get()
        if isinstance(event, EndPointClosed):
            # Put it back for any other receiver, which then raises.
            self._events.put_nowait(event)
            if self._finished:
                raise EndPointClosedError()
            self._finished = True
        return event

    def _on_open(self, bundle: _Bundle, conn_id: int) -> None:
        if not bundle.alive or self._closed:
            return
        if conn_id in bundle.incoming:
            self._violation(bundle, f"connection {conn_id} opened twice")
            return
        local = next(self._incoming_ids)
        bundle.incoming[conn_id] = local
        self._events.put_nowait(
            ConnectionOpened(local, Reliability.RELIABLE_ORDERED, bundle.remote)
        )

    def _on_data(self, bundle: _Bundle, conn_id: int, frames: list[memoryview]) -> None:
        if not bundle.alive or self._closed:
            return
        local = bundle.incoming.get(conn_id)
        if local is None:
            self._violation(bundle, f"data on unknown connection {conn_id}")
            return
        self._events.put_nowait(Received(local, frames))

    def _on_close(self, bundle: _Bundle, conn_id: int) -> None:
        if not bundle.alive or self._closed:
            return
        local = bundle.incoming.pop(conn_id, None)
        if local is None:
            self._violation(bundle, f"close of unknown connection {conn_id}")
            return
        self._events.put_nowait(ConnectionClosed(local))

    def _violation(self, bundle: _Bundle, reason: str) -> None:
        self._bundle_down(bundle, f"protocol violation: {reason}")

    def _bundle_down(self, bundle: _Bundle, reason: str) -> None:
        """Fail ``bundle`` (idempotent): its connections die, the peer sees it end."""
        if not bundle.alive:
            bundle.abort()
            return
        bundle.alive = False
        if self._bundles.get(bundle.remote) is bundle:
            del self._bundles[bundle.remote]
        if self._loopback is bundle:
            self._loopback = None
        had_connections = bool(bundle.incoming or bundle.outgoing)
        for conn in bundle.outgoing.values():
            if conn.state is _State.OPEN:
                conn.state = _State.FAILED
        bundle.outgoing.clear()
        bundle.incoming.clear()
        bundle.abort()
        if had_connections and not self._closed:
            self._events.put_nowait(
                ErrorEvent(EventError(EventErrorCode.CONNECTION_LOST, reason, bundle.remote))
            )

    def _register(self, bundle: _Bundle) -> None:
        old = self._bundles.get(bundle.remote)
        if old is not None and old is not bundle:
            self._bundle_down(old, "the peer started a new bundle")
        self._bundles[bundle.remote] = bundle
        bundle.start()

    # ------------------------------------------------------------------ connect

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
        if address == self._address:
            if self._loopback is None:
                self._loopback = _Bundle(self, address, 0, None, None)
            bundle = self._loopback
        else:
            _parse(address)
            found = self._bundles.get(address)
            bundle = found if found is not None else await self._bundle_to(address, timeout)
            if self._closed:
                raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
            if not bundle.alive:
                raise ConnectError(
                    ConnectErrorCode.FAILED, f"the bundle to {address!r} failed while connecting"
                )
        conn_id = next(self._ids)
        conn = _Connection(self, bundle, conn_id)
        bundle.outgoing[conn_id] = conn
        bundle.send_control(_Kind.OPEN, conn_id)
        return conn

    async def _bundle_to(self, remote: EndPointAddress, timeout: float | None) -> _Bundle:
        """Wait for a live bundle to ``remote``, joining an establishment under way.

        Establishment runs apart from the callers, so that cancelling one of them does
        not fail the others; it is cancelled when none waits any more.
        """
        pending = self._pending.get(remote)
        if pending is None or pending.future.done():
            pending = self._establish(remote)
        pending.waiters += 1
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
            except asyncio.TimeoutError:
                raise ConnectError(
                    ConnectErrorCode.TIMEOUT, f"no answer from {remote!r} within {timeout} s"
                ) from None
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.future.done():
                pending.cancel()
                # Forget it now: a connect arriving before the cancellation lands must
                # start afresh, not join an establishment that ends cancelled.
                if self._pending.get(remote) is pending:
                    del self._pending[remote]

    def _establish(self, remote: EndPointAddress) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())
        self._pending[remote] = pending

        def done(future: asyncio.Future[_Bundle]) -> None:
            _retrieve(future)
            if self._pending.get(remote) is pending:
                del self._pending[remote]

        pending.future.add_done_callback(done)
        work = self._dial(remote) if self._address < remote else self._request(remote)
        pending.task = loop.create_task(self._settle(pending, work))
        return pending

    async def _settle(self, pending: _Pending, work: Awaitable[_Bundle | None]) -> None:
        try:
            bundle = await work
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if bundle is not None and not pending.future.done():
            pending.future.set_result(bundle)

    async def _open(
        self, remote: EndPointAddress, request: _Request, ident: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A socket to ``remote`` that has sent ``request``; its status was OK."""
        host, port, nonce = _parse(remote)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), HANDSHAKE_TIMEOUT
            )
        except ConnectionRefusedError:
            raise ConnectError(ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}") from None
        except asyncio.TimeoutError:
            raise ConnectError(ConnectErrorCode.TIMEOUT, f"{remote!r} does not answer") from None
        except OSError as exc:
            raise ConnectError(ConnectErrorCode.FAILED, f"cannot reach {remote!r}: {exc}") from exc
        try:
            address = bytes(self._address)
            writer.write(_HELLO.pack(MAGIC, request, nonce, ident, len(address)) + address)
            status = (await asyncio.wait_for(reader.readexactly(1), HANDSHAKE_TIMEOUT))[0]
        except BaseException as exc:
            writer.transport.abort()
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectError(
                    ConnectErrorCode.TIMEOUT, f"{remote!r} did not answer the handshake"
                ) from None
            if isinstance(exc, (OSError, asyncio.IncompleteReadError)):
                raise ConnectError(
                    ConnectErrorCode.FAILED, f"handshake with {remote!r} failed: {exc!r}"
                ) from exc
            raise
        if status != _Status.OK:
            writer.transport.abort()
            if status == _Status.NOT_FOUND:
                raise ConnectError(ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}")
            raise ConnectError(ConnectErrorCode.FAILED, f"{remote!r} refused the connection")
        return reader, writer

    async def _dial(self, remote: EndPointAddress) -> _Bundle:
        ident = next(self._ids)
        reader, writer = await self._open(remote, _Request.DIAL, ident)
        bundle = _Bundle(self, remote, ident, reader, writer)
        if self._closed:
            bundle.abort()
            raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
        self._register(bundle)
        return bundle

    async def _request(self, remote: EndPointAddress) -> None:
        """Ask ``remote`` (the smaller address) to dial us; accepting resolves the wait."""
        _, writer = await self._open(remote, _Request.CALLBACK, self._seen.get(remote, 0))
        writer.close()
        pending = self._pending.get(remote)
        if pending is not None and not pending.future.done():
            raise ConnectError(
                ConnectErrorCode.FAILED, f"{remote!r} reported a bundle that failed at once"
            )

    # ------------------------------------------------------------------ accept

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handshakes.add(task)
        try:
            await self._handshake(reader, writer)
        except (asyncio.CancelledError, Exception):
            writer.transport.abort()
        finally:
            self._handshakes.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readexactly(_HELLO.size), HANDSHAKE_TIMEOUT)
        magic, request, nonce, ident, length = _HELLO.unpack(head)
        if magic != MAGIC or length > MAX_ADDRESS:
            raise _ProtocolError("not a teststreams handshake")
        remote = EndPointAddress(
            await asyncio.wait_for(reader.readexactly(length), HANDSHAKE_TIMEOUT)
        )
        _parse(remote)
        if self._closed or nonce != self._nonce:
            writer.write(bytes([_Status.NOT_FOUND]))
            writer.close()
            return
        if request == _Request.DIAL and remote < self._address:
            bundle = _Bundle(self, remote, ident, reader, writer)
            self._seen[remote] = ident
            writer.write(bytes([_Status.OK]))
            self._register(bundle)
            pending = self._pending.get(remote)
            if pending is not None and not pending.future.done():
                pending.future.set_result(bundle)
        elif request == _Request.CALLBACK and self._address < remote:
            status = await self._serve_callback(remote, ident)
            writer.write(bytes([status]))
            writer.close()
        else:
            raise _ProtocolError(f"request {request} from {remote!r} breaks the dialing rule")

    async def _serve_callback(self, remote: EndPointAddress, seen: int) -> _Status:
        bundle = self._bundles.get(remote)
        if bundle is not None:
            if bundle.ident > seen:
                return _Status.OK  # newer than what the peer saw: it has it, or will
            self._bundle_down(bundle, "the peer dropped the bundle")
        try:
            await self._bundle_to(remote, HANDSHAKE_TIMEOUT)
        except ConnectError as exc:
            return _Status.NOT_FOUND if exc.code is ConnectErrorCode.NOT_FOUND else _Status.FAILED
        return _Status.OK

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._endpoints.discard(self)
        if self._server is not None:
            self._server.close()
        for pending in list(self._pending.values()):
            pending.cancel()
        for task in list(self._handshakes):
            task.cancel()
        bundles = list(self._bundles.values())
        self._bundles.clear()
        if self._loopback is not None:
            bundles.append(self._loopback)
            self._loopback = None
        for bundle in bundles:
            for conn_id, conn in bundle.outgoing.items():
                # FAILED, not CLOSED: the owner closed the endpoint, not the connection.
                conn.state = _State.FAILED
                if bundle.writer is not None:
                    bundle.send_control(_Kind.CLOSE, conn_id)
            bundle.outgoing.clear()
            bundle.incoming.clear()
            bundle.alive = False
            bundle.half_close()
        try:
            tasks = [bundle.task for bundle in bundles if bundle.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        finally:
            for bundle in bundles:
                bundle.abort()
            self._events.put_nowait(EndPointClosed())


class StreamsTransport(Transport):
    """Endpoints listening on ``host`` (loopback by default), one port each."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._endpoints: set[_EndPoint] = set()
        self._closed = False

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        endpoint = _EndPoint(self, self._host)
        try:
            await endpoint._start()
        except OSError as exc:
            raise NewEndPointError(
                NewEndPointErrorCode.FAILED, f"cannot listen on {self._host}: {exc}"
            ) from exc
        self._endpoints.add(endpoint)
        return endpoint

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoints = list(self._endpoints)
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)


def create_transport(*, host: str = "127.0.0.1") -> StreamsTransport:
    """The entry point's factory: a teststreams transport listening on ``host``."""
    return StreamsTransport(host)
