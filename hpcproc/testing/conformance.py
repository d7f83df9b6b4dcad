"""The transport conformance suite: Haskell's network-transport-tests, ported.

Every scenario is an ``async def scenario(h: Harness) -> None`` written once against
the :mod:`hpcproc.transports.base` contract; a :class:`Harness` supplies the transport
under test (a factory, and its ``break_connection`` fault hook when the transport
implements :class:`~hpcproc.transports.faults.FaultInjection`) and bounds every wait.
A scenario raises :class:`ConformanceError` (an ``AssertionError``) when the transport
breaks the contract, and :class:`Unsupported` when the transport cannot run it (for
example a transport without endpoints in separate OS processes, or without the
fault-injection interface).

Running the suite against a transport, including a third-party one::

    from hpcproc.testing.conformance import SCENARIOS, Harness, TransportSpec

    spec = TransportSpec("mytransport", options={"port": 0}, two_process=True)
    for name, scenario in SCENARIOS.items():
        Harness(spec).run(scenario)

``Harness.run`` owns the event loop (it calls :func:`asyncio.run`), applies the spec's
environment for the duration, and always stops what the scenario started: echo
servers, peer processes (:mod:`hpcproc.testing.peer`) and transports, each within a
bound. An exception that reaches the event loop's handler (a failed callback, a task
whose exception nobody retrieved) fails the scenario too.

Scenario sizes are scaled down from network-transport-tests (10 000 pings there) so that
one transport's whole suite stays well under a minute on a small shared machine; they
are fields of :class:`TransportSpec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import os
import random
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from hpcproc import serialization
from hpcproc import transports as _registry
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
    EventErrorCode,
    NewEndPointError,
    Received,
    Reliability,
    SendError,
    SendErrorCode,
    Transport,
)
from hpcproc.transports.faults import FaultInjection, NoFaultInjectionError, require_fault_injection

from .peer import PeerProcess

__all__ = [
    "SCENARIOS",
    "ConformanceError",
    "Harness",
    "Scenario",
    "TransportSpec",
    "Unsupported",
]

T = TypeVar("T")
E = TypeVar("E", bound=Event)
Scenario = Callable[["Harness"], Awaitable[None]]

#: Every scenario by name, in the order of network-transport-tests, then the additions.
SCENARIOS: dict[str, Scenario] = {}

MiB = 1 << 20


class ConformanceError(AssertionError):
    """The transport under test broke its contract; the message says how."""


class Unsupported(Exception):
    """The transport under test cannot run this scenario; the message says why."""


def check(condition: object, message: str) -> None:
    """Raise :class:`ConformanceError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConformanceError(message)


def scenario(fn: Scenario) -> Scenario:
    """Register ``fn`` in :data:`SCENARIOS` under its own name."""
    SCENARIOS[fn.__name__] = fn  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class TransportSpec:
    """How to create one transport for the suite, and what it supports.

    ``factory`` defaults to ``hpcproc.transports.create(name, **options)``; the peer
    process (:mod:`hpcproc.testing.peer`) always uses the registry, so a transport that
    supports ``two_process`` must be registered (built in, by entry point, or with
    :func:`hpcproc.transports.register` in an imported module).
    """

    #: Registry name (``tcp``, ``shm``, ...).
    name: str
    #: Keyword options for the factory; JSON-serialisable when ``two_process``.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Environment variables set while a scenario runs, and in peer processes.
    env: Mapping[str, str] = field(default_factory=dict)
    #: Importable modules the transport needs (``mpi4py``, ``ucxx``): skip if missing.
    requires: tuple[str, ...] = ()
    #: Creates a transport; may return an awaitable. Default: the registry.
    factory: Callable[..., Transport | Awaitable[Transport]] | None = None
    #: Endpoints in two separate OS processes can reach each other.
    two_process: bool = False
    #: Why not, when ``two_process`` is false (the skip reason).
    two_process_reason: str = "the transport does not reach endpoints in other OS processes"
    #: Endpoints of two transport instances in one process can reach each other.
    separate_transports: bool = True
    #: Messages per ping-style scenario (network-transport-tests uses 10 000).
    pings: int = 100
    #: Tasks started (half of them cancelled) by the ``kill`` scenario.
    kill_tasks: int = 200
    #: Connections opened, used and closed by ``many_connections``.
    many_connections: int = 2000
    #: The large frame of ``frame_boundaries``.
    big_frame: int = 64 * MiB
    #: Bound on every single wait (an event, a connect, a send, a close).
    wait_timeout: float = 10.0
    #: Bound on a whole scenario.
    scenario_timeout: float = 90.0
    #: Bound on a peer process printing its address.
    peer_start_timeout: float = 30.0
    #: Seed of the random choices (``kill``, ``crossing``).
    seed: int = 20240611

    def unavailable(self) -> str | None:
        """Why this transport cannot be tested here (module or dependency missing).

        Returns ``None`` when it can. Only a missing transport module or a missing
        dependency listed in ``requires`` is a reason; any other import error is a bug
        and propagates.
        """
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{self.name}: optional dependency {module!r} is not installed"
        if self.factory is not None:
            return None
        try:
            _registry._resolve(self.name)
        except ModuleNotFoundError as exc:
            if exc.name == f"hpcproc.transports.{self.name}":
                return f"{self.name}: module {exc.name} does not exist (yet)"
            if exc.name is not None and exc.name.split(".")[0] in self.requires:
                return f"{self.name}: optional dependency {exc.name!r} is not installed"
            raise
        return None

    async def create(self) -> Transport:
        """A new transport as the spec describes."""
        made = (
            self.factory(**self.options)
            if self.factory is not None
            else _registry.create(self.name, **self.options)
        )
        if inspect.isawaitable(made):
            made = await made
        return made


class Harness:
    """Runs scenarios against the transport of ``spec`` and cleans up after them.

    All ``async`` helpers are bounded by ``spec.wait_timeout`` and raise
    :class:`ConformanceError` naming what they waited for when it runs out.
    """

    def __init__(self, spec: TransportSpec) -> None:
        self.spec = spec
        self.timeout = spec.wait_timeout
        self.pings = spec.pings
        self.rng = random.Random(spec.seed)
        self._transports: list[Transport] = []
        self._default: Transport | None = None
        self._owner: dict[EndPointAddress, Transport] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: list[PeerProcess] = []
        self._loop_errors: list[str] = []

    # ------------------------------------------------------------------ running

    def run(self, fn: Scenario) -> None:
        """Run one scenario in a fresh event loop; raise what it raised.

        Raises:
            Unsupported: the transport cannot run this scenario.
            ConformanceError: the transport broke its contract (or did not clean up).
        """
        saved = {key: os.environ.get(key) for key in self.spec.env}
        os.environ.update(self.spec.env)
        self._loop_errors.clear()
        self._transports.clear()
        self._default = None
        self._owner.clear()
        self._tasks.clear()
        self._peers.clear()
        try:
            asyncio.run(self._main(fn))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if self._loop_errors:
            raise ConformanceError(
                "errors reported to the event loop: " + "; ".join(self._loop_errors)
            )

    async def _main(self, fn: Scenario) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        try:
            try:
                await asyncio.wait_for(fn(self), self.spec.scenario_timeout)
            except asyncio.TimeoutError:
                raise ConformanceError(
                    f"scenario did not finish within {self.spec.scenario_timeout} s"
                ) from None
        except BaseException as exc:
            # Keep the scenario's failure; what cleanup found (say, a crashed echo
            # server that made the scenario wait) is often its cause.
            errors = await self._cleanup()
            if errors and hasattr(exc, "add_note"):
                exc.add_note(f"found while cleaning up: {errors!r}")
            raise
        errors = await self._cleanup()
        if errors:
            raise errors[0]

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        where = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self._loop_errors.append(f"{context.get('message')}: {exc!r}\n{where}")

    async def _cleanup(self) -> list[BaseException]:
        """Stop tasks, peers and transports (each bounded); return what went wrong."""
        errors: list[BaseException] = []
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception as exc:
                    errors.append(exc)
        for peer in self._peers:
            try:
                await peer.stop(self.timeout)
            except Exception as exc:
                errors.append(exc)
        for transport in reversed(self._transports):
            try:
                await asyncio.wait_for(transport.close(), self.timeout)
            except asyncio.TimeoutError:
                errors.append(
                    ConformanceError(f"transport.close() did not return within {self.timeout} s")
                )
            except Exception as exc:
                errors.append(exc)
        return errors

    # ------------------------------------------------------------------ resources

    async def transport(self) -> Transport:
        """A new transport (closed at the end of the scenario)."""
        transport = await self.wait(self.spec.create(), "creating a transport")
        self._transports.append(transport)
        return transport

    async def endpoint(self, transport: Transport | None = None) -> EndPoint:
        """A new endpoint of ``transport`` (default: one transport shared by the scenario)."""
        if transport is None:
            if self._default is None:
                self._default = await self.transport()
            transport = self._default
        endpoint = await self.wait(transport.new_endpoint(), "new_endpoint()")
        self._owner[endpoint.address] = transport
        return endpoint

    def require_separate_transports(self) -> None:
        if not self.spec.separate_transports:
            raise Unsupported(
                f"{self.spec.name}: endpoints of separate transports in one process "
                "cannot reach each other"
            )

    async def peer(self) -> PeerProcess:
        """An endpoint of this transport in a new OS process, running an echo server."""
        if not self.spec.two_process:
            raise Unsupported(f"{self.spec.name}: {self.spec.two_process_reason}")
        peer = await PeerProcess.start(
            self.spec.name,
            options=self.spec.options,
            env=self.spec.env,
            timeout=self.spec.peer_start_timeout,
        )
        self._peers.append(peer)
        return peer

    async def require_fault_injection(self) -> None:
        """Raise :class:`Unsupported` unless the transport under test implements
        :class:`~hpcproc.transports.faults.FaultInjection` (checked on the scenario's
        default transport, which this creates if needed)."""
        if self._default is None:
            self._default = await self.transport()
        if not isinstance(self._default, FaultInjection):
            raise Unsupported(
                f"{self.spec.name}: the transport does not implement the fault-injection"
                " interface hpcproc.transports.faults.FaultInjection (break_connection)"
            )

    async def break_connection(self, endpoint: EndPoint, remote: EndPointAddress) -> None:
        """The fault hook: make the bundle ``endpoint``<->``remote`` fail.

        Raises:
            Unsupported: the endpoint's transport does not implement
                :class:`~hpcproc.transports.faults.FaultInjection`.
        """
        try:
            faults = require_fault_injection(self._owner[endpoint.address])
        except NoFaultInjectionError as exc:
            raise Unsupported(f"{self.spec.name}: {exc}") from None
        await self.wait(faults.break_connection(endpoint.address, remote), "break_connection()")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task that is cancelled (and its errors raised) at cleanup."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def echo_server(self, transport: Transport | None = None) -> EndPointAddress:
        """An endpoint that echoes every message back on its own connection (as in
        network-transport-tests): it connects back on ``ConnectionOpened``, sends each
        ``Received`` message back, and closes on ``ConnectionClosed``."""
        endpoint = await self.endpoint(transport)
        self.spawn(echo(endpoint))
        return endpoint.address

    # ------------------------------------------------------------------ bounded waits

    async def wait(self, awaitable: Awaitable[T], what: str) -> T:
        """Await ``awaitable`` within the wait timeout."""
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except asyncio.TimeoutError:
            raise ConformanceError(f"{what} did not complete within {self.timeout} s") from None

    async def receive(self, endpoint: EndPoint) -> Event:
        return await self.wait(endpoint.receive(), f"receive() on {endpoint.address!r}")

    async def expect(self, endpoint: EndPoint, kind: type[E]) -> E:
        """The next event of ``endpoint``, which must be a ``kind``."""
        event = await self.receive(endpoint)
        check(isinstance(event, kind), f"expected {kind.__name__}, got {event!r}")
        return cast(E, event)

    async def expect_lost(self, endpoint: EndPoint, remote: EndPointAddress) -> None:
        """The next event of ``endpoint`` must be ``CONNECTION_LOST(remote)``."""
        event = await self.expect(endpoint, ErrorEvent)
        check(
            event.error.code is EventErrorCode.CONNECTION_LOST,
            f"expected CONNECTION_LOST, got {event!r}",
        )
        check(
            event.error.remote_address == remote,
            f"CONNECTION_LOST names {event.error.remote_address!r}, expected {remote!r}",
        )

    async def fails(
        self, awaitable: Awaitable[object], error: type[Exception], code: object = None
    ) -> None:
        """``awaitable`` must raise ``error`` (with ``code``, when given)."""
        try:
            result = await self.wait(awaitable, f"an operation expected to raise {error.__name__}")
        except error as exc:
            if code is not None:
                check(
                    getattr(exc, "code", None) is code,
                    f"expected {error.__name__}({code}), got {exc!r}",
                )
            return
        raise ConformanceError(f"expected {error.__name__}({code}), got result {result!r}")


async def echo(endpoint: EndPoint, on_error: Callable[[ErrorEvent], None] | None = None) -> None:
    """Serve ``endpoint`` as network-transport-tests' echo server until it closes.

    On ``CONNECTION_LOST`` the connections back to that peer are dropped (they are
    dead) and the server carries on; ``on_error`` sees every ``ErrorEvent``.
    """
    back: dict[ConnectionId, Connection] = {}
    while True:
        event = await endpoint.receive()
        if isinstance(event, ConnectionOpened):
            back[event.conn_id] = await endpoint.connect(event.remote_address)
        elif isinstance(event, Received):
            await back[event.conn_id].send(event.frames)
        elif isinstance(event, ConnectionClosed):
            await back.pop(event.conn_id).close()
        elif isinstance(event, ErrorEvent):
            if on_error is not None:
                on_error(event)
            lost = event.error.remote_address
            for conn_id, conn in list(back.items()):
                if conn.remote_address == lost:
                    del back[conn_id]
        else:
            return


def as_bytes(frames: Sequence[Buffer]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


async def collect(
    h: Harness, endpoint: EndPoint, events: int | None = None, *, connections: int | None = None
) -> dict[ConnectionId, list[list[bytes]]]:
    """Receive exactly ``events`` events, or until ``connections`` connections have
    closed; return each connection's messages by id.

    Every connection must open before its data, get nothing after it closes, and be
    closed by the end; no error or endpoint closure may occur.
    """
    opened: dict[ConnectionId, list[list[bytes]]] = {}
    closed: dict[ConnectionId, list[list[bytes]]] = {}
    count = 0
    while count != events and len(closed) != connections:
        count += 1
        event = await h.receive(endpoint)
        if isinstance(event, ConnectionOpened):
            check(
                event.conn_id not in opened and event.conn_id not in closed, f"id reused: {event!r}"
            )
            opened[event.conn_id] = []
        elif isinstance(event, Received):
            check(event.conn_id in opened, f"data on a connection not open: {event!r}")
            opened[event.conn_id].append(as_bytes(event.frames))
        elif isinstance(event, ConnectionClosed):
            check(event.conn_id in opened, f"close of a connection not open: {event!r}")
            closed[event.conn_id] = opened.pop(event.conn_id)
        else:
            raise ConformanceError(f"unexpected event {event!r}")
    check(not opened, f"connections left open: {sorted(opened)}")
    return dict(sorted(closed.items()))


async def ping(
    h: Harness, endpoint: EndPoint, server: EndPointAddress, pings: int, msg: bytes
) -> None:
    """network-transport-tests' ``ping``: round trips through an echo server."""
    conn = await h.wait(endpoint.connect(server), "connect()")
    opened = await h.expect(endpoint, ConnectionOpened)
    check(opened.remote_address == server, f"reply connection from {opened.remote_address!r}")
    check(opened.reliability is Reliability.RELIABLE_ORDERED, f"reliability of {opened!r}")
    for _ in range(pings):
        await h.wait(conn.send([msg]), "send()")
        reply = await h.expect(endpoint, Received)
        check(reply.conn_id == opened.conn_id, f"reply on {reply.conn_id}, not {opened.conn_id}")
        check(as_bytes(reply.frames) == [msg], f"reply {as_bytes(reply.frames)!r}, sent {msg!r}")
    await conn.close()
    closed = await h.expect(endpoint, ConnectionClosed)
    check(closed.conn_id == opened.conn_id, f"closed {closed.conn_id}, not {opened.conn_id}")


async def jitter(rng: random.Random) -> None:
    """Yield to the loop a random number of times, sometimes for a random instant.

    Not synchronisation: it spreads cancellations over connect, send and close.
    """
    for _ in range(rng.randrange(4)):
        await asyncio.sleep(0)
    if rng.random() < 0.2:
        await asyncio.sleep(rng.random() * 1e-3)


# =========================================================================== scenarios
# The network-transport-tests scenarios, in their order.


@scenario
async def ping_pong(h: Harness) -> None:
    """Round trips through an echo server arrive in order on the reply connection."""
    server = await h.echo_server()
    await ping(h, await h.endpoint(), server, h.pings, b"ping")


@scenario
async def endpoints(h: Harness) -> None:
    """Two endpoints pinging one server at once never see each other's replies."""
    server = await h.echo_server()
    clients = [await h.endpoint(), await h.endpoint()]
    await asyncio.gather(
        *(ping(h, c, server, h.pings, m) for c, m in zip(clients, [b"A", b"B"], strict=True))
    )


@scenario
async def connections(h: Harness) -> None:
    """Two connections of one endpoint, used at once, keep their messages apart."""
    server = await h.echo_server()
    endpoint = await h.endpoint()
    conn1 = await h.wait(endpoint.connect(server), "connect()")
    serv1 = (await h.expect(endpoint, ConnectionOpened)).conn_id
    conn2 = await h.wait(endpoint.connect(server), "connect()")
    serv2 = (await h.expect(endpoint, ConnectionOpened)).conn_id

    async def pinger(conn: Connection, msg: bytes) -> None:
        for _ in range(h.pings):
            await h.wait(conn.send([msg]), "send()")

    senders = [h.spawn(pinger(conn1, b"pingA")), h.spawn(pinger(conn2, b"pingB"))]
    expected = {serv1: [b"pingA"], serv2: [b"pingB"]}
    for _ in range(2 * h.pings):
        event = await h.expect(endpoint, Received)
        check(as_bytes(event.frames) == expected.get(event.conn_id), f"wrong echo {event!r}")
    await h.wait(asyncio.gather(*senders), "senders")


@scenario
async def close_one_connection(h: Harness) -> None:
    """Closing one connection leaves the other connection to the same peer working."""
    server = await h.echo_server()
    endpoint = await h.endpoint()
    conn1 = await h.wait(endpoint.connect(server), "connect()")
    serv1 = (await h.expect(endpoint, ConnectionOpened)).conn_id
    conn2 = await h.wait(endpoint.connect(server), "connect()")
    serv2 = (await h.expect(endpoint, ConnectionOpened)).conn_id

    async def pinger(conn: Connection, msg: bytes, count: int, close: bool) -> None:
        for _ in range(count):
            await h.wait(conn.send([msg]), "send()")
        if close:
            await conn.close()

    senders = [
        h.spawn(pinger(conn1, b"pingA", h.pings, True)),
        h.spawn(pinger(conn2, b"pingB", 2 * h.pings, False)),
    ]
    expected = {serv1: [b"pingA"], serv2: [b"pingB"]}
    received = 0
    serv1_closed = False
    while received < 3 * h.pings or not serv1_closed:
        event = await h.receive(endpoint)
        if isinstance(event, Received):
            check(as_bytes(event.frames) == expected.get(event.conn_id), f"wrong echo {event!r}")
            check(not (serv1_closed and event.conn_id == serv1), f"data after close: {event!r}")
            received += 1
        elif isinstance(event, ConnectionClosed) and event.conn_id == serv1:
            serv1_closed = True
        else:
            raise ConformanceError(f"unexpected event {event!r}")
    await h.wait(asyncio.gather(*senders), "senders")
    await ping_on(h, endpoint, conn2, serv2, b"still open")


async def ping_on(
    h: Harness, endpoint: EndPoint, conn: Connection, reply_id: ConnectionId, msg: bytes
) -> None:
    await h.wait(conn.send([msg]), "send()")
    event = await h.expect(endpoint, Received)
    check((event.conn_id, as_bytes(event.frames)) == (reply_id, [msg]), f"wrong echo {event!r}")


@scenario
async def close_one_direction(h: Harness) -> None:
    """After A closes its connection to B, B's connection to A still carries messages."""
    a = await h.endpoint()
    b = await h.endpoint()

    async def side_a() -> None:
        conn = await h.wait(a.connect(b.address), "connect()")
        cid = (await h.expect(a, ConnectionOpened)).conn_id
        for _ in range(h.pings):
            await h.wait(conn.send([b"ping"]), "send()")
        await conn.close()
        for _ in range(h.pings):
            event = await h.expect(a, Received)
            check(event.conn_id == cid and as_bytes(event.frames) == [b"pong"], f"{event!r}")
        check((await h.expect(a, ConnectionClosed)).conn_id == cid, "wrong connection closed")

    async def side_b() -> None:
        cid = (await h.expect(b, ConnectionOpened)).conn_id
        conn = await h.wait(b.connect(a.address), "connect()")
        for _ in range(h.pings):
            event = await h.expect(b, Received)
            check(event.conn_id == cid and as_bytes(event.frames) == [b"ping"], f"{event!r}")
        check((await h.expect(b, ConnectionClosed)).conn_id == cid, "wrong connection closed")
        for _ in range(h.pings):
            await h.wait(conn.send([b"pong"]), "send()")
        await conn.close()

    await asyncio.gather(side_a(), side_b())


@scenario
async def close_reopen(h: Harness) -> None:
    """A connection closed and opened again to the same peer delivers everything."""
    a = await h.endpoint()
    b = await h.endpoint()
    repeats = 2
    for i in range(repeats):
        conn = await h.wait(a.connect(b.address), "connect()")
        for j in range(h.pings):
            await h.wait(conn.send([b"ping%d/%d" % (i, j)]), "send()")
        await conn.close()
    streams = list((await collect(h, b, repeats * (h.pings + 2))).values())
    check(len(streams) == repeats, f"{len(streams)} connections, expected {repeats}")
    for i, stream in enumerate(streams):
        check(stream == [[b"ping%d/%d" % (i, j)] for j in range(h.pings)], f"stream {i} differs")


@scenario
async def parallel_connects(h: Harness) -> None:
    """Many concurrent connects to one peer each get their own connection."""
    server = await h.echo_server()
    endpoint = await h.endpoint()

    async def client(i: int) -> None:
        conn = await h.wait(endpoint.connect(server), "connect()")
        await h.wait(conn.send([b"ping%d" % i]), "send()")
        await h.wait(conn.send([b"ping%d" % i]), "send()")
        await conn.close()

    clients = [h.spawn(client(i)) for i in range(h.pings)]
    streams = await collect(h, endpoint, 4 * h.pings)
    await h.wait(asyncio.gather(*clients), "clients")
    check(len(streams) == h.pings, f"{len(streams)} reply connections, expected {h.pings}")
    for stream in streams.values():
        check(len(stream) == 2 and stream[0] == stream[1], f"messages mixed up: {stream!r}")
    check(len({tuple(s[0]) for s in streams.values()}) == h.pings, "a client's pings were lost")


@scenario
async def send_after_close(h: Harness) -> None:
    """Sending on a connection closed locally raises SendError(CLOSED)."""
    server = await h.echo_server()
    endpoint = await h.endpoint()
    for _ in range(max(1, h.pings // 5)):
        conn1 = await h.wait(endpoint.connect(server), "connect()")
        conn2 = await h.wait(endpoint.connect(server), "connect()")
        await conn2.close()
        await h.fails(conn2.send([b"ping2"]), SendError, SendErrorCode.CLOSED)
        await conn1.close()
        await h.fails(conn2.send([b"ping2"]), SendError, SendErrorCode.CLOSED)
        await h.fails(conn1.send([b"ping1"]), SendError, SendErrorCode.CLOSED)


@scenario
async def crossing(h: Harness) -> None:
    """A and B connecting to each other at the same moment both succeed, repeatedly."""
    a = await h.endpoint()
    b = await h.endpoint()
    rounds = 10

    async def connect_close(src: EndPoint, dst: EndPointAddress) -> None:
        conn = await h.wait(src.connect(dst, timeout=h.timeout), "crossed connect()")
        await conn.close()

    for _ in range(rounds):
        pair = [connect_close(a, b.address), connect_close(b, a.address)]
        h.rng.shuffle(pair)
        await asyncio.gather(*pair)
    for endpoint in (a, b):
        streams = await collect(h, endpoint, 2 * rounds)
        check(len(streams) == rounds, f"{len(streams)} connections arrived, expected {rounds}")


def interleaves(events: Sequence[object], streams: Sequence[Sequence[object]]) -> bool:
    """Whether ``events`` is an interleaving of ``streams``, each kept in order."""
    heads = [list(s) for s in streams]
    for event in events:
        for stream in heads:
            if stream and stream[0] == event:
                stream.pop(0)
                break
        else:
            return False
    return not any(heads)


@scenario
async def close_twice(h: Harness) -> None:
    """Closing a connection twice has no further effect."""
    server = await h.echo_server()
    endpoint = await h.endpoint()
    for _ in range(max(1, h.pings // 5)):
        conn1 = await h.wait(endpoint.connect(server), "connect()")
        conn2 = await h.wait(endpoint.connect(server), "connect()")
        await conn2.close()
        await conn2.close()
        await h.wait(conn1.send([b"ping"]), "send()")
        await conn1.close()
        await conn1.close()
        cid1 = (await h.expect(endpoint, ConnectionOpened)).conn_id
        cid2 = (await h.expect(endpoint, ConnectionOpened)).conn_id
        events = [await h.receive(endpoint) for _ in range(3)]
        # Frames are memoryviews: compare as bytes.
        normal: list[object] = [
            (e.conn_id, as_bytes(e.frames)) if isinstance(e, Received) else e for e in events
        ]
        expected: list[list[object]] = [
            [ConnectionClosed(cid2)],
            [(cid1, [b"ping"]), ConnectionClosed(cid1)],
        ]
        check(interleaves(normal, expected), f"events {events!r} do not match")


@scenario
async def connect_to_self(h: Harness) -> None:
    """An endpoint can connect to itself; the connection is like any other."""
    endpoint = await h.endpoint()
    conn = await h.wait(endpoint.connect(endpoint.address), "connect() to self")

    async def writer() -> None:
        for _ in range(h.pings):
            await h.wait(conn.send([b"ping"]), "send()")
        await conn.close()

    task = h.spawn(writer())
    opened = await h.expect(endpoint, ConnectionOpened)
    check(opened.remote_address == endpoint.address, f"opened from {opened.remote_address!r}")
    for _ in range(h.pings):
        event = await h.expect(endpoint, Received)
        check((event.conn_id, as_bytes(event.frames)) == (opened.conn_id, [b"ping"]), f"{event!r}")
    check((await h.expect(endpoint, ConnectionClosed)).conn_id == opened.conn_id, "wrong close")
    await h.wait(task, "writer")


@scenario
async def connect_to_self_twice(h: Harness) -> None:
    """Two self-connections used at once keep their messages apart."""
    endpoint = await h.endpoint()
    conns = [await h.wait(endpoint.connect(endpoint.address), "connect()") for _ in range(2)]

    async def writer(conn: Connection, msg: bytes) -> None:
        for _ in range(h.pings):
            await h.wait(conn.send([msg]), "send()")
        await conn.close()

    tasks = [h.spawn(writer(c, m)) for c, m in zip(conns, [b"pingA", b"pingB"], strict=True)]
    streams = list((await collect(h, endpoint, 2 * (h.pings + 2))).values())
    expected = [[[b"pingA"]] * h.pings, [[b"pingB"]] * h.pings]
    check(sorted(streams) == expected, "self-connections mixed up their messages")
    await h.wait(asyncio.gather(*tasks), "writers")


@scenario
async def close_self(h: Harness) -> None:
    """Self-connections stop working when their endpoint or transport closes."""
    transport = await h.transport()
    ep1 = await h.endpoint(transport)
    ep2 = await h.endpoint(transport)
    conn1 = await h.wait(ep1.connect(ep1.address), "connect()")
    conn2 = await h.wait(ep1.connect(ep1.address), "connect()")
    conn3 = await h.wait(ep2.connect(ep2.address), "connect()")
    await conn1.close()
    await h.fails(conn1.send([b"ping"]), SendError, SendErrorCode.CLOSED)
    await h.wait(ep1.close(), "endpoint close()")
    await h.fails(conn2.send([b"ping"]), SendError, SendErrorCode.FAILED)
    await h.fails(ep1.connect(ep1.address), ConnectError, ConnectErrorCode.FAILED)
    await h.wait(conn3.send([b"ping"]), "send() on the other endpoint")
    await h.wait(transport.close(), "transport close()")
    await h.fails(conn3.send([b"ping"]), SendError, SendErrorCode.FAILED)
    await h.fails(ep2.connect(ep2.address), ConnectError, ConnectErrorCode.FAILED)


@scenario
async def close_endpoint(h: Harness) -> None:
    """Closing an endpoint: peers see ConnectionClosed, and CONNECTION_LOST where they
    had connections to it; locally EndPointClosed, then send/connect fail."""
    server = await h.endpoint()

    # One outgoing connection, no incoming: the server sees a plain close, no error.
    client = await h.endpoint()
    await h.wait(client.connect(server.address), "connect()")
    await h.wait(client.close(), "endpoint close()")
    await h.expect(client, EndPointClosed)
    opened = await h.expect(server, ConnectionOpened)
    check(opened.remote_address == client.address, "opened from the wrong address")
    check((await h.expect(server, ConnectionClosed)).conn_id == opened.conn_id, "wrong close")

    # One outgoing and one incoming connection.
    client = await h.endpoint()
    conn = await h.wait(client.connect(server.address), "connect()")
    await h.wait(conn.send([b"ping"]), "send()")
    opened = await h.expect(server, ConnectionOpened)
    check(opened.remote_address == client.address, "opened from the wrong address")
    event = await h.expect(server, Received)
    check((event.conn_id, as_bytes(event.frames)) == (opened.conn_id, [b"ping"]), f"{event!r}")
    back = await h.wait(server.connect(client.address), "connect()")
    await h.wait(back.send([b"pong"]), "send()")
    reply_open = await h.expect(client, ConnectionOpened)
    check(reply_open.remote_address == server.address, "opened from the wrong address")
    reply = await h.expect(client, Received)
    check((reply.conn_id, as_bytes(reply.frames)) == (reply_open.conn_id, [b"pong"]), f"{reply!r}")

    await h.wait(client.close(), "endpoint close()")
    await h.expect(client, EndPointClosed)
    await h.fails(conn.send([b"ping2"]), SendError, SendErrorCode.FAILED)
    await h.wait(conn.close(), "close() of a failed connection")
    await h.fails(client.connect(server.address), ConnectError, ConnectErrorCode.FAILED)

    check((await h.expect(server, ConnectionClosed)).conn_id == opened.conn_id, "wrong close")
    await h.expect_lost(server, client.address)
    await h.fails(back.send([b"pong2"]), SendError, SendErrorCode.FAILED)


@scenario
async def close_transport(h: Harness) -> None:
    """Closing a transport closes all its endpoints, as closing each would."""
    h.require_separate_transports()
    server = await h.endpoint(await h.transport())
    transport = await h.transport()

    ep1 = await h.endpoint(transport)
    await h.wait(ep1.connect(server.address), "connect()")
    open1 = await h.expect(server, ConnectionOpened)
    check(open1.remote_address == ep1.address, "opened from the wrong address")

    ep2 = await h.endpoint(transport)
    conn = await h.wait(ep2.connect(server.address), "connect()")
    await h.wait(conn.send([b"ping"]), "send()")
    open2 = await h.expect(server, ConnectionOpened)
    check(open2.remote_address == ep2.address, "opened from the wrong address")
    event = await h.expect(server, Received)
    check((event.conn_id, as_bytes(event.frames)) == (open2.conn_id, [b"ping"]), f"{event!r}")
    back = await h.wait(server.connect(ep2.address), "connect()")
    await h.wait(back.send([b"pong"]), "send()")
    await h.expect(ep2, ConnectionOpened)
    await h.expect(ep2, Received)

    await h.wait(transport.close(), "transport close()")
    await h.expect(ep1, EndPointClosed)
    await h.expect(ep2, EndPointClosed)
    await h.fails(conn.send([b"ping2"]), SendError, SendErrorCode.FAILED)
    await h.wait(conn.close(), "close() of a failed connection")
    await h.fails(ep1.connect(server.address), ConnectError, ConnectErrorCode.FAILED)
    await h.fails(ep2.connect(server.address), ConnectError, ConnectErrorCode.FAILED)
    await h.fails(transport.new_endpoint(), NewEndPointError)

    events = [await h.receive(server) for _ in range(3)]
    closed = {e.conn_id for e in events if isinstance(e, ConnectionClosed)}
    lost = [e.error for e in events if isinstance(e, ErrorEvent)]
    check(closed == {open1.conn_id, open2.conn_id}, f"server saw {events!r}")
    check(
        len(lost) == 1
        and lost[0].code is EventErrorCode.CONNECTION_LOST
        and lost[0].remote_address == ep2.address,
        f"server saw {events!r}; expected CONNECTION_LOST only for the endpoint it sent to",
    )
    await h.fails(back.send([b"pong2"]), SendError, SendErrorCode.FAILED)


@scenario
async def connect_closed_endpoint(h: Harness) -> None:
    """Connecting to a closed endpoint raises ConnectError(NOT_FOUND)."""
    server = await h.endpoint()
    client = await h.endpoint()
    await h.wait(server.close(), "endpoint close()")
    await h.fails(client.connect(server.address), ConnectError, ConnectErrorCode.NOT_FOUND)


@scenario
async def exception_on_receive(h: Harness) -> None:
    """``receive`` after EndPointClosed raises EndPointClosedError (endpoint or transport)."""
    transport = await h.transport()
    ep1 = await h.endpoint(transport)
    await h.wait(ep1.close(), "endpoint close()")
    await h.expect(ep1, EndPointClosed)
    await h.fails(ep1.receive(), EndPointClosedError)
    ep2 = await h.endpoint(transport)
    await h.wait(transport.close(), "transport close()")
    await h.expect(ep2, EndPointClosed)
    await h.fails(ep2.receive(), EndPointClosedError)


@scenario
async def send_exception(h: Harness) -> None:
    """A send that fails part-way (a frame that is not a buffer) raises SendError(FAILED)
    and fails the bundle on both sides; a new connect starts a new bundle."""
    ep1 = await h.endpoint()
    ep2 = await h.endpoint()
    conn = await h.wait(ep1.connect(ep2.address), "connect()")
    await h.expect(ep2, ConnectionOpened)
    bad: list[Buffer] = [b"first frame is fine", cast(Buffer, object())]
    await h.fails(conn.send(bad), SendError, SendErrorCode.FAILED)
    await h.expect_lost(ep1, ep2.address)
    await h.expect_lost(ep2, ep1.address)
    await h.fails(conn.send([b"ping"]), SendError, SendErrorCode.FAILED)

    conn2 = await h.wait(ep1.connect(ep2.address), "connect() after the failure")
    await h.wait(conn2.send([b"ping"]), "send()")
    await conn2.close()
    opened = await h.expect(ep2, ConnectionOpened)
    event = await h.expect(ep2, Received)
    check((event.conn_id, as_bytes(event.frames)) == (opened.conn_id, [b"ping"]), f"{event!r}")
    check((await h.expect(ep2, ConnectionClosed)).conn_id == opened.conn_id, "wrong close")


@scenario
async def kill(h: Harness) -> None:
    """Tasks cancelled at random in connect, send or close leak no connection and do
    not disturb the others; both endpoints keep working."""
    t1 = await h.transport()
    t2 = await h.transport() if h.spec.separate_transports else t1
    ep1 = await h.endpoint(t1)
    ep2 = await h.endpoint(t2)
    rng = h.rng
    counts = {"opened": 0, "sending": 0, "sent": 0}

    async def worker() -> None:
        await jitter(rng)
        conn = await ep1.connect(ep2.address)
        counts["opened"] += 1
        try:
            await jitter(rng)
            counts["sending"] += 1
            await conn.send([b"ping"])
            counts["sent"] += 1
            await jitter(rng)
        finally:
            await conn.close()

    tasks = [h.spawn(worker()) for _ in range(h.spec.kill_tasks)]
    survivors = []
    for task in tasks:
        if rng.random() < 0.5:
            await jitter(rng)
            task.cancel()
        else:
            survivors.append(task)
    results = await h.wait(asyncio.gather(*tasks, return_exceptions=True), "workers")
    for result in results:
        if isinstance(result, Exception):
            raise ConformanceError(f"a worker failed: {result!r}") from result
    check(all(not t.cancelled() for t in survivors), "a task that was not cancelled was")

    opened = counts["opened"]
    # A send cancelled part-way may or may not deliver: wait for connections, not events.
    streams = await collect(h, ep2, connections=opened)
    pings = sum(len(s) for s in streams.values())
    check(len(streams) == opened, f"{len(streams)} connections arrived, {opened} were opened")
    check(
        counts["sent"] <= pings <= counts["sending"],
        f"{pings} pings arrived; {counts['sent']} sends returned, {counts['sending']} began",
    )
    # Anything still in flight now would be a leaked or phantom connection.
    conn = await h.wait(ep1.connect(ep2.address), "connect() after the cancellations")
    await h.wait(conn.send([b"after"]), "send()")
    await conn.close()
    streams = await collect(h, ep2, 3)
    check(list(streams.values()) == [[[b"after"]]], f"unexpected traffic: {streams!r}")


@scenario
async def cancel_connect(h: Harness) -> None:
    """Cancelling one of several concurrent connects to a new peer does not fail the
    others; cancelling all of them leaves the endpoints able to connect afresh."""
    a = await h.endpoint()
    b = await h.endpoint()
    loop = asyncio.get_running_loop()

    # Cancel the first of four connects while they all wait for the new link.
    tasks = [loop.create_task(a.connect(b.address)) for _ in range(4)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    await h.wait(asyncio.wait(tasks), "concurrent connects")
    for task in tasks[1:]:
        check(not task.cancelled(), "a connect that was not cancelled was")
        check(task.exception() is None, f"a concurrent connect failed: {task.exception()!r}")
    conns = [t.result() for t in tasks if not t.cancelled()]
    for conn in conns:
        await h.wait(conn.send([b"ping"]), "send()")
        await conn.close()
    streams = await collect(h, b, connections=len(conns))
    check(list(streams.values()) == [[[b"ping"]]] * len(conns), f"b saw {streams!r}")

    # Cancel every connect to a fresh peer: no connection, and a later connect works.
    c = await h.endpoint()
    tasks = [loop.create_task(a.connect(c.address)) for _ in range(3)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await h.wait(asyncio.wait(tasks), "cancelled connects")
    conns = [t.result() for t in tasks if not t.cancelled()]
    conn = await h.wait(a.connect(c.address), "connect() after cancelled connects")
    await h.wait(conn.send([b"after"]), "send()")
    for each in [*conns, conn]:
        await each.close()
    streams = await collect(h, c, connections=len(conns) + 1)
    check(
        sorted(streams.values()) == sorted([[]] * len(conns) + [[[b"after"]]]),
        f"c saw {streams!r}",
    )


@scenario
async def break_connection(h: Harness) -> None:
    """The fault hook fails the bundle on both sides: CONNECTION_LOST once each, old
    connections carry nothing more, and a new connect starts a new bundle."""
    await h.require_fault_injection()
    a = await h.endpoint()
    b = await h.endpoint()
    ab = await h.wait(a.connect(b.address), "connect()")
    ba = await h.wait(b.connect(a.address), "connect()")
    await h.wait(ab.send([b"a->b"]), "send()")
    await h.wait(ba.send([b"b->a"]), "send()")
    at_b = await h.expect(b, ConnectionOpened)
    await h.expect(b, Received)
    at_a = await h.expect(a, ConnectionOpened)
    await h.expect(a, Received)

    await h.break_connection(a, b.address)
    await h.expect_lost(a, b.address)
    await h.expect_lost(b, a.address)
    await h.fails(ab.send([b"old a->b"]), SendError, SendErrorCode.FAILED)
    await h.fails(ba.send([b"old b->a"]), SendError, SendErrorCode.FAILED)
    await ab.close()
    await ba.close()

    # New bundle, both directions; the next events are the new connections' only.
    ab2 = await h.wait(a.connect(b.address), "connect() after the break")
    await h.wait(ab2.send([b"new a->b"]), "send()")
    await ab2.close()
    streams = await collect(h, b, 3)
    check(list(streams.values()) == [[[b"new a->b"]]], f"b saw {streams!r}")
    check(at_b.conn_id not in streams, "a connection id was reused")
    ba2 = await h.wait(b.connect(a.address), "connect() after the break")
    await h.wait(ba2.send([b"new b->a"]), "send()")
    await ba2.close()
    streams = await collect(h, a, 3)
    check(list(streams.values()) == [[[b"new b->a"]]], f"a saw {streams!r}")
    check(at_a.conn_id not in streams, "a connection id was reused")


# --------------------------------------------------------------------------- additions


@scenario
async def frame_boundaries(h: Harness) -> None:
    """Frames keep their boundaries: zero frames, 0-byte, 1-byte and very large frames."""
    a = await h.endpoint()
    b = await h.endpoint()
    big = np.random.default_rng(1).integers(0, 256, h.spec.big_frame, dtype=np.uint8)
    big_view = big.data
    messages: list[list[bytes | memoryview]] = [
        [],
        [b""],
        [b"x"],
        [b"", b"", b""],
        [b"", b"x", b"", b"yz", b""],
        [big_view],
        [b"head", big_view[: h.spec.big_frame // 2], b""],
    ]
    conn = await h.wait(a.connect(b.address), "connect()")
    opened = await h.expect(b, ConnectionOpened)
    for message in messages:
        await h.wait(conn.send(message), "send()")
        event = await h.expect(b, Received)
        check(event.conn_id == opened.conn_id, "message on the wrong connection")
        sizes = [memoryview(f).nbytes for f in message]
        got = [memoryview(f).nbytes for f in event.frames]
        check(got == sizes, f"sent frames of {sizes} bytes, received {got}")
        for sent, received in zip(message, event.frames, strict=True):
            check(
                np.array_equal(np.frombuffer(sent, np.uint8), np.frombuffer(received, np.uint8)),
                "frame contents differ",
            )
    await conn.close()
    await h.expect(b, ConnectionClosed)


@scenario
async def received_frames_stay_intact(h: Harness) -> None:
    """Received frames belong to the receiver: frames kept, and arrays rebuilt over
    frames that were then dropped, are unchanged by the messages that follow."""
    a = await h.endpoint()
    b = await h.endpoint()
    conn = await h.wait(a.connect(b.address), "connect()")
    await h.expect(b, ConnectionOpened)
    size = 2 * MiB
    kept_frames: list[memoryview] = []
    kept_arrays: list[np.ndarray[Any, Any]] = []
    for i in range(16):
        if i % 2:
            await h.wait(conn.send([bytes([i]) * size]), "send()")
            kept_frames.append((await h.expect(b, Received)).frames[0])
        else:
            frames = serialization.serialize(np.full(size // 8, i, dtype=np.int64))
            await h.wait(conn.send(frames), "send()")
            kept_arrays.append(serialization.deserialize((await h.expect(b, Received)).frames))
    await conn.close()
    for i, frame in zip(range(1, 16, 2), kept_frames, strict=True):
        check(bytes(frame) == bytes([i]) * size, f"kept frame {i} was overwritten")
    for i, array in zip(range(0, 16, 2), kept_arrays, strict=True):
        check(bool((array == i).all()), f"array {i} rebuilt over a dropped frame was overwritten")


@scenario
async def send_buffers_reusable(h: Harness) -> None:
    """Once ``send`` returns the caller may overwrite its buffers; the message is intact."""
    a = await h.endpoint()
    b = await h.endpoint()
    conn = await h.wait(a.connect(b.address), "connect()")
    await h.expect(b, ConnectionOpened)
    for size in (16, 4 * MiB):
        buffer = bytearray(b"\x5a" * size)
        await h.wait(conn.send([buffer]), "send()")
        buffer[:] = b"\x00" * size
        event = await h.expect(b, Received)
        check(bytes(event.frames[0]) == b"\x5a" * size, f"the {size}-byte frame changed")
    await conn.close()


@scenario
async def burst_of_small_messages(h: Harness) -> None:
    """Thousands of small sends in a row (most complete at once, without suspending;
    later ones wait for room) arrive whole and in order, each buffer reusable as soon
    as its send returned."""
    a = await h.endpoint()
    b = await h.endpoint()
    conn = await h.wait(a.connect(b.address), "connect()")
    await h.expect(b, ConnectionOpened)
    count = 3000
    received: list[bytes] = []

    async def reader() -> None:
        while len(received) < count:
            event = await b.receive()
            if isinstance(event, Received):
                received.append(b"".join(bytes(f) for f in event.frames))

    task = asyncio.ensure_future(reader())
    buffer = bytearray(4000)
    expected = []
    for i in range(count):
        # About 6 MB in all, sent without yielding while sends complete at once:
        # enough to fill socket buffers and rings, so later sends must wait.
        size = 1 + (i * 1237) % 4000
        message = i.to_bytes(4, "little") * (size // 4 + 1)
        buffer[:size] = message[:size]
        await conn.send([memoryview(buffer)[:size]])
        buffer[:size] = b"\xee" * size  # the transport must have taken its copy
        expected.append(message[:size])
    await h.wait(task, "receiving the burst")
    check(len(received) == count, f"{len(received)} of {count} messages arrived")
    for i, (got, want) in enumerate(zip(received, expected, strict=True)):
        check(got == want, f"message {i} arrived as {got[:16]!r}..., not {want[:16]!r}...")
    await conn.close()


@scenario
async def malformed_address(h: Harness) -> None:
    """Connecting to a malformed address raises ConnectError(FAILED)."""
    endpoint = await h.endpoint()
    for address in (b"", b"\x00\xffnot an address\xfe", b"inmemory-" * 8):
        await h.fails(
            endpoint.connect(EndPointAddress(address)), ConnectError, ConnectErrorCode.FAILED
        )


@scenario
async def numpy_zero_copy(h: Harness) -> None:
    """A numpy array crosses without serializer copies: the sent frame is the array's
    memory and the rebuilt array shares memory with the received frame."""
    a = await h.endpoint()
    b = await h.endpoint()
    array = np.arange(1 << 17, dtype=np.float64).reshape(256, 512)
    frames = serialization.serialize({"array": array, "tag": "zero-copy"})
    check(len(frames) == 2, f"expected the array as one out-of-band frame, got {len(frames)}")
    check(np.shares_memory(array, np.asarray(frames[1])), "the serializer copied the array")
    conn = await h.wait(a.connect(b.address), "connect()")
    await h.wait(conn.send(frames), "send()")
    await conn.close()
    await h.expect(b, ConnectionOpened)
    event = await h.expect(b, Received)
    obj = serialization.deserialize(event.frames)
    check(obj["tag"] == "zero-copy" and np.array_equal(obj["array"], array), "array differs")
    check(
        np.shares_memory(obj["array"], np.asarray(event.frames[1])),
        "the rebuilt array does not share memory with the received frame",
    )


@scenario
async def many_connections(h: Harness) -> None:
    """Thousands of connections between two endpoints, opened, used and closed."""
    a = await h.endpoint()
    b = await h.endpoint()
    n = h.spec.many_connections

    async def opener() -> None:
        for i in range(n):
            conn = await h.wait(a.connect(b.address), "connect()")
            await h.wait(conn.send([b"%d" % i]), "send()")
            await conn.close()

    task = h.spawn(opener())
    streams = await collect(h, b, 3 * n)
    await h.wait(task, "opener")
    check(len(streams) == n, f"{len(streams)} connections arrived, {n} were opened")
    check(
        sorted(s[0][0] for s in streams.values()) == sorted(b"%d" % i for i in range(n)),
        "messages lost or misdelivered",
    )


# --------------------------------------------------------------------------- two processes


@scenario
async def peer_ping_pong(h: Harness) -> None:
    """Ping-pong with an endpoint in another OS process."""
    peer = await h.peer()
    await ping(h, await h.endpoint(), peer.address, h.pings, b"ping")


@scenario
async def peer_numpy_round_trip(h: Harness) -> None:
    """numpy arrays survive a round trip through another OS process, rebuilt there and
    here over the received frames."""
    peer = await h.peer()
    await peer.command("mode objects", h.timeout)
    endpoint = await h.endpoint()
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "f8": np.linspace(0.0, 1.0, 1 << 16).reshape(256, 256),
        "i4_strided": np.arange(1 << 16, dtype=np.int32)[::2],
        "c16": np.full(4096, 1 + 2j, dtype=np.complex128),
        "scalar": np.array(3.5),
        "small": np.arange(4, dtype=np.uint8),
    }
    conn = await h.wait(endpoint.connect(peer.address), "connect()")
    await h.expect(endpoint, ConnectionOpened)
    await h.wait(conn.send(serialization.serialize(arrays)), "send()")
    event = await h.expect(endpoint, Received)
    echoed, peer_shared = serialization.deserialize(event.frames)
    for key, array in arrays.items():
        check(echoed[key].dtype == array.dtype, f"{key}: dtype {echoed[key].dtype}")
        check(np.array_equal(echoed[key], array), f"{key}: contents differ")
    for key in ("f8", "c16"):
        check(peer_shared[key], f"{key}: the peer copied the array out of its frame")
        check(
            any(np.shares_memory(echoed[key], np.asarray(f)) for f in event.frames[1:]),
            f"{key}: the array was not rebuilt over the received frame",
        )
    await conn.close()


async def _peer_link(h: Harness) -> tuple[PeerProcess, EndPoint, Connection, ConnectionId]:
    """A peer, a local endpoint, a connection to the peer and the id of the peer's
    connection back (after one round trip)."""
    peer = await h.peer()
    endpoint = await h.endpoint()
    conn = await h.wait(endpoint.connect(peer.address), "connect()")
    opened = await h.expect(endpoint, ConnectionOpened)
    await ping_on(h, endpoint, conn, opened.conn_id, b"hello")
    return peer, endpoint, conn, opened.conn_id


@scenario
async def peer_close_reports_closed_then_lost(h: Harness) -> None:
    """A peer process that closes its transport gracefully: its connections here close
    (after their messages), then CONNECTION_LOST for the connections we had to it."""
    peer, endpoint, conn, reply_id = await _peer_link(h)
    await h.wait(conn.send([b"last"]), "send()")
    # Its echo first: the quit command travels on another channel (the peer's stdin)
    # and could otherwise reach the peer's event loop before the message does (the
    # peer then quits without echoing it, whatever the transport).
    event = await h.expect(endpoint, Received)
    check((event.conn_id, as_bytes(event.frames)) == (reply_id, [b"last"]), f"{event!r}")
    await peer.stop(h.timeout)
    check(peer.process.returncode == 0, f"peer exited with {peer.process.returncode}")
    check((await h.expect(endpoint, ConnectionClosed)).conn_id == reply_id, "wrong close")
    await h.expect_lost(endpoint, peer.address)
    await h.fails(conn.send([b"after"]), SendError, SendErrorCode.FAILED)


@scenario
async def peer_killed_reports_connection_lost(h: Harness) -> None:
    """A peer process killed with SIGKILL is reported as CONNECTION_LOST; sends fail."""
    peer, endpoint, conn, _ = await _peer_link(h)
    await peer.kill(h.timeout)
    await h.expect_lost(endpoint, peer.address)
    await h.fails(conn.send([b"ping"]), SendError, SendErrorCode.FAILED)


@scenario
async def peer_killed_connect_not_found(h: Harness) -> None:
    """Connecting to the endpoint of a killed process raises ConnectError(NOT_FOUND)."""
    peer, endpoint, _, _ = await _peer_link(h)
    await peer.kill(h.timeout)
    await h.expect_lost(endpoint, peer.address)
    await h.fails(endpoint.connect(peer.address), ConnectError, ConnectErrorCode.NOT_FOUND)


@scenario
async def peer_break_connection(h: Harness) -> None:
    """break_connection across processes: both sides see CONNECTION_LOST, from either
    side, and a new connect starts a new bundle."""
    await h.require_fault_injection()
    peer, endpoint, conn, _ = await _peer_link(h)
    here = endpoint.address.hex()

    await h.break_connection(endpoint, peer.address)
    await h.expect_lost(endpoint, peer.address)
    check(await peer.event(h.timeout) == f"lost {here}", "the peer did not see the break")
    await h.fails(conn.send([b"old"]), SendError, SendErrorCode.FAILED)
    await ping(h, endpoint, peer.address, 3, b"new bundle")

    conn = await h.wait(endpoint.connect(peer.address), "connect()")
    opened = await h.expect(endpoint, ConnectionOpened)
    await ping_on(h, endpoint, conn, opened.conn_id, b"before the peer breaks it")
    await peer.command(f"break {here}", h.timeout)
    check(await peer.event(h.timeout) == f"lost {here}", "the peer did not report its break")
    await h.expect_lost(endpoint, peer.address)
    await h.fails(conn.send([b"old"]), SendError, SendErrorCode.FAILED)
    await ping(h, endpoint, peer.address, 3, b"newer bundle")
