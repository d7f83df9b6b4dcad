"""A node: one endpoint, the processes it runs, and the parts that connect them.

The node keeps the lifecycle (start, close), the process table and the dispatcher,
and wires together one object per concern:

=====================  ==========================================================
``node.spawner``       starting processes here and on other nodes (:mod:`._spawning`)
``node.watches``       links, monitors, node watches; telling watchers of deaths
                       (:mod:`._watches`)
``node.registry``      names of processes (:mod:`._registry`)
``node.remote``        outgoing traffic: process-pair connections and the control
                       queue to each node (:mod:`._remote`)
``node.incoming``      incoming traffic: connections from other nodes, their
                       messages to processes or the controller (:mod:`._incoming`)
``node.controller``    incoming control messages (a dispatch table by message type)
                       and requests to other nodes (:mod:`._controller`)
=====================  ==========================================================

The dispatcher task reads the endpoint's single event queue and hands each event to
``node.incoming``: a message on a process-pair connection goes into its process's
mailbox (dropped if the process has ended), one on a controller connection to the
controller. A process waiting in ``receive`` may take events from the endpoint itself
(``node.incoming.poll_inline``); they are handled in the order the endpoint hands them
out, whoever takes them.

Failure. A transport reports ``CONNECTION_LOST(peer)`` once per bundle; the node then
fires every link and monitor its processes hold on the peer's processes (and on the
peer itself) with ``DiedDisconnect`` (:meth:`Node.node_lost`). A node that closes
kills its processes, reports them dead with ``DiedNodeDown`` and sends ``NodeDown`` to
every node that watches it.

Everything here runs on the event loop thread of the node; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import _control as ctl
from ._channels import ChanMessage, SendPort
from ._controller import Controller
from ._copying import copy_message
from ._host import host_name
from ._ids import MonitorRef, NodeId, Pid
from ._incoming import Incoming
from ._introspection import Introspection
from ._logger import LOGGER_NAME, LogRecord, logger_main, stderr_sink
from ._process import Kill, Process
from ._registry import Registry
from ._remote import BROKEN, RemoteSender
from ._signals import (
    DiedDisconnect,
    DiedException,
    DiedReason,
    ProcessExitException,
    ProcessTerminationException,
)
from ._spawning import Spawner, fn_name
from ._watches import Watches
from .transports.base import (
    EndPoint,
    EndPointClosed,
    EndPointClosedError,
    EventError,
    EventErrorCode,
    Transport,
    TransportError,
)

__all__ = ["BROKEN", "Node", "ProcessKilledError"]

log = logging.getLogger("hpcproc")

#: Bound on each graceful step of ``Node.close``.
CLOSE_STEP_TIMEOUT = 5.0


#: This host's name, as log records carry it.
_HOSTNAME = host_name().split(".")[0]

#: The values of ``Node(crash_reports=...)``.
_CRASH_REPORTS = ("unwatched", "always", "never")


class ProcessKilledError(Exception):
    """``Node.run``'s process was killed (``kill``, node close) before returning."""


class Node:
    """A node: runs processes and connects them to the processes of other nodes.

    ``Node(transport)`` creates its endpoint from ``transport`` when started;
    ``Node(endpoint)`` uses an existing endpoint. Either way the node owns the endpoint
    and closes it in :meth:`close` (the transport stays the caller's). Use it as
    ``async with Node(transport) as node:`` or call :meth:`start` and :meth:`close`.

    ``log_sink`` receives each formatted ``say`` line of this node's logger
    (default: standard error).

    ``crash_reports`` says when a process that dies of an exception (other than
    ``terminate()``) logs a crash report (its pid, function, reason and traceback)
    through this node's logger: ``"unwatched"`` (default) when no link or monitor is
    told of the death, ``"always"``, or ``"never"``.

    The attributes ``spawner``, ``watches``, ``registry``, ``remote``, ``incoming``
    and ``controller`` are the node's parts (see the module docstring), for the process
    layer's own use.
    """

    def __init__(
        self,
        transport_or_endpoint: Transport | EndPoint,
        *,
        log_sink: Callable[[str], object] | None = None,
        crash_reports: str = "unwatched",
    ) -> None:
        self._transport: Transport | None = None
        self._endpoint: EndPoint | None = None
        self._node_id: NodeId | None = None
        if isinstance(transport_or_endpoint, EndPoint):
            self._endpoint = transport_or_endpoint
            self._node_id = NodeId(transport_or_endpoint.address)
        elif isinstance(transport_or_endpoint, Transport):
            self._transport = transport_or_endpoint
        else:
            raise TypeError(
                f"Node needs a Transport or an EndPoint, not {type(transport_or_endpoint).__name__}"
            )
        self._log_sink = log_sink or stderr_sink
        if crash_reports not in _CRASH_REPORTS:
            raise ValueError(
                f"crash_reports={crash_reports!r}: use one of {', '.join(_CRASH_REPORTS)}"
            )
        self._crash_reports = crash_reports
        #: The live processes of this node by local id.
        self._procs: dict[int, Process] = {}
        #: ``local_process(lid)``: the live process with local id ``lid``, or None
        #: (the process table's ``get``, bound: no Python frame on the local send path).
        self.local_process: Callable[[int], Process | None] = self._procs.get
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        #: What made the node close itself (see :attr:`failure`), and that close's
        #: task (kept referenced).
        self._failure: BaseException | None = None
        self._failed_close: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._closed: asyncio.Event | None = None
        self.spawner = Spawner(self, self._procs, self._process_exited)
        self.watches = Watches(self, self._procs)
        self.registry = Registry(self, self._procs)
        self.remote = RemoteSender(self)
        self.controller = Controller(self)
        self.incoming = Incoming(self, self._procs, self._on_error)
        self.introspection = Introspection(self, self._procs, self.incoming.connections)

    # ------------------------------------------------------------------ lifecycle

    @property
    def node_id(self) -> NodeId:
        """This node's id (its endpoint address).

        Raises:
            RuntimeError: the node was given a transport and is not started yet.
        """
        if self._node_id is None:
            raise RuntimeError("Node is not started: use `async with Node(...)` or `await start()`")
        return self._node_id

    @property
    def endpoint(self) -> EndPoint:
        """The transport endpoint this node owns (available once started)."""
        if self._endpoint is None:
            raise RuntimeError("Node is not started")
        return self._endpoint

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the node runs on (available once started)."""
        if self._loop is None:
            raise RuntimeError("Node is not started")
        return self._loop

    async def start(self) -> Node:
        """Create the endpoint if needed, start the dispatcher and the logger; idempotent.

        Raises:
            NewEndPointError: the transport could not create an endpoint.
        """
        if self._started:
            return self
        if self._endpoint is None:
            assert self._transport is not None
            self._endpoint = await self._transport.new_endpoint()
            self._node_id = NodeId(self._endpoint.address)
        if self._started:  # a concurrent start() finished first
            return self
        assert self._node_id is not None
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._dispatcher = self._loop.create_task(self._dispatch(), name="hpcproc-dispatcher")
        self.incoming.open(self._endpoint)
        self.spawner.open(self._node_id, self._loop)
        logger = self.spawner.spawn_local(logger_main, (self._log_sink,))
        self.registry.register(LOGGER_NAME, logger.pid)
        return self

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (called by anyone)."""
        if self._closed is None:
            raise RuntimeError("Node is not started")
        await self._closed.wait()

    @property
    def failure(self) -> BaseException | None:
        """The error that made this node close itself, else None: its endpoint
        reported that it failed (``ENDPOINT_FAILED``, ``TRANSPORT_FAILED``), or its
        ``receive`` raised what the transport contract does not allow (a bug below
        the process layer), so that nothing more could reach the node. Logged at
        critical level when it happened."""
        return self._failure

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._closing

    async def close(self) -> None:
        """Stop every process and close the endpoint; idempotent, never raises.

        Every process is killed; watchers of them are told ``DiedNodeDown`` (locally
        and on other nodes), nodes monitoring this one get ``NodeDown``, queued control
        messages are flushed (each step bounded by ``CLOSE_STEP_TIMEOUT``), then the
        endpoint is closed and pending remote requests fail with
        :class:`NodeUnreachableError`.

        Safe to call from one of this node's own processes: the closing runs in its
        own task, so it completes although the caller is killed by it.
        """
        if self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._closing = True
        self.spawner.shut()
        if not self._started:
            return
        assert self._loop is not None
        await asyncio.shield(self._loop.create_task(self._close()))

    async def _close(self) -> None:
        assert self._closed is not None
        try:
            procs = list(self._procs.values())
            for proc in procs:
                proc.signal(Kill("node closed", node_down=True))
            if procs:
                await asyncio.wait(procs, timeout=CLOSE_STEP_TIMEOUT)
            for nid in list(self.watches.node_watchers):
                self.remote.post(nid, ctl.NodeDown())
            await self.remote.flush(CLOSE_STEP_TIMEOUT)
            self.controller.fail_requests(None, "local node closed")
            if self._background:
                await asyncio.wait(list(self._background), timeout=CLOSE_STEP_TIMEOUT)
            if self._endpoint is not None:
                try:
                    await asyncio.wait_for(self._endpoint.close(), CLOSE_STEP_TIMEOUT)
                except (asyncio.TimeoutError, Exception) as exc:
                    log.debug("closing endpoint failed: %r", exc)
            if self._dispatcher is not None:
                await asyncio.wait({self._dispatcher}, timeout=CLOSE_STEP_TIMEOUT)
                self._dispatcher.cancel()
            for task in list(self._background):
                task.cancel()
        finally:
            self._closed.set()

    def check_open(self) -> None:
        """Raise RuntimeError unless the node is started and not closing."""
        if not self._started:
            raise RuntimeError("Node is not started: use `async with Node(...)` or `await start()`")
        if self._closing:
            raise RuntimeError("Node is closed")

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task the node waits for (bounded) when it closes."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ processes

    def spawn_local(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Pid:
        """Start ``fn(*args)`` as a process on this node and return its pid at once.

        ``args`` are passed as they are (not copied). The process starts running at the
        caller's next await.

        Raises:
            SpawnError: ``fn`` is not an ``async def`` function or raised when called.
            RuntimeError: the node is not started or is closed.
        """
        return self.spawner.spawn_local(fn, args).pid

    async def run(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run ``fn(*args)`` as a process on this node and return its result.

        The module-level API (``hp.send``, ``hp.spawn``...) works inside ``fn``.

        Raises:
            SpawnError: as for :meth:`spawn_local`.
            ProcessKilledError: the process was killed before it returned.
            Exception: whatever ``fn`` raised.
        """
        proc = self.spawner.spawn_local(fn, args)
        proc.caller_told = True  # the outcome is ours to return or raise
        await asyncio.wait({proc})
        if proc.cancelled():
            raise ProcessKilledError(f"{fn_name(fn)} was killed: {proc.died_reason()!r}")
        return proc.result()

    async def spawn(
        self,
        node: NodeId,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
        _watch: MonitorRef | Pid | None = None,
    ) -> Pid:
        """Start ``fn(*args)`` on ``node`` (this one or another) and return its pid.

        For another node, ``fn`` and ``args`` are pickled (``serialization.dumps``):
        an importable function travels by reference, a lambda or closure by value.

        Raises:
            SpawnError: ``fn`` or ``args`` cannot be pickled, or the remote node could
                not load ``fn``, or ``fn`` is not async or raised when called. The
                message names the function and the node.
            NodeUnreachableError: the node could not be reached or closed.
        """
        return await self.spawner.spawn(node, fn, args, _watch)

    def process(self, pid: Pid) -> Process | None:
        """The live local process ``pid``, or None (ended, or of another node)."""
        return self._procs.get(pid.lid) if pid.node == self._node_id else None

    def _process_exited(self, proc: Process) -> None:
        """Done callback of every process: forget it and tell whoever must know."""
        self._procs.pop(proc.pid[1], None)
        proc.release_body()
        if proc.names:
            self.registry.process_ended(proc)
        # Its watchers first: a death notice goes on the pair connection to its
        # watcher where there is one, which is closed after it.
        self.watches.process_ended(proc)
        if proc.conns:
            self.remote.process_ended(proc)
        if proc.children:
            for task in list(proc.children):
                task.cancel()
        if (
            self._crash_reports != "never"
            and not proc.cancelled()
            and proc.exception() is not None
            and (not (proc.watchers or proc.caller_told) or self._crash_reports == "always")
            and type(proc.exception()) is not ProcessTerminationException
        ):
            self._crash_report(proc)

    def _crash_report(self, proc: Process) -> None:
        """Log, through this node's logger, that ``proc`` died of an exception."""
        reason = proc.died_reason()
        assert isinstance(reason, DiedException)
        told = "" if not proc.watchers else " (its watchers were told)"
        text = (
            f"crash report: process {proc.pid} running {proc.body_name()} died of "
            f"{reason.reason}{told}\n{reason.traceback.rstrip()}"
        )
        self.registry.deliver(
            LOGGER_NAME, LogRecord(time.time(), self.node_id, proc.pid, text, _HOSTNAME)
        )

    def send_local(self, pid: Pid, msg: Any) -> None:
        """Deliver ``msg`` (already copied as needed) to local ``pid``; dropped if dead."""
        tp = self._procs.get(pid[1])  # pid.lid
        if tp is not None:
            tp.deliver(msg)

    def deliver_to(self, pid: Pid, msg: Any) -> None:
        """Deliver an already-private ``msg``; a remote ``pid`` is reached via its controller."""
        if pid.node == self._node_id:
            self.send_local(pid, msg)
        else:
            self.remote.post(pid.node, ctl.Deliver(pid, msg))

    # ------------------------------------------------------------------ dispatcher

    async def _dispatch(self) -> None:
        assert self._endpoint is not None
        endpoint = self._endpoint
        handle = self.incoming.handle_event
        while True:
            try:
                event = await endpoint.receive()
            except EndPointClosedError:
                return
            except Exception as exc:
                if self._closing:
                    log.debug("receive failed while the node closes: %r", exc)
                    return
                # The endpoint broke its contract (its receive raised something else
                # than EndPointClosedError): nothing more reaches this node, and its
                # requests would wait for replies forever.
                self._fail(exc, "receiving failed", traceback=True)
                return
            if type(event) is EndPointClosed:
                return
            handle(event)
            # Not held while waiting for the next one: a large message's buffers are
            # freed as soon as its receiver lets go of them.
            del event

    def _fail(self, failure: BaseException, what: str, *, traceback: bool) -> None:
        """This node can receive nothing more: it closes itself, loudly (a critical
        log, with ``failure``'s traceback if asked; :attr:`failure`), so that its
        processes are killed, its peers see it go, and no request waits for a reply
        nobody will read."""
        log.critical(
            "hpcproc node %s: %s; closing the node",
            self._node_id,
            what,
            exc_info=failure if traceback else None,
        )
        self._failure = failure
        self._failed_close = closing = self.loop.create_task(self.close())
        closing.add_done_callback(_log_close_failure)

    def _on_error(self, error: EventError) -> None:
        if error.code is EventErrorCode.CONNECTION_LOST and error.remote_address is not None:
            self.node_lost(NodeId(error.remote_address), DiedDisconnect())
            return
        # ENDPOINT_FAILED or TRANSPORT_FAILED: the endpoint will deliver nothing more.
        for nid in list(self.watches.remote) + self.remote.nodes():
            self.node_lost(nid, DiedDisconnect())
        if not self._closing:
            self._fail(
                TransportError(error.code, error.message),
                f"transport failure: {error.message}",
                traceback=False,
            )

    def node_lost(self, nid: NodeId, reason: DiedReason) -> None:
        """Communication with ``nid`` failed (or it closed): drop its connections, fail
        the requests to it and fire every watch on it with ``reason``."""
        self.incoming.drop_node(nid)
        self.remote.drop_node(nid)
        self.remote.break_pairs(nid, self._procs.values())
        self.controller.fail_requests(nid, f"lost connection to node {nid}")
        self.watches.node_lost(nid, reason)

    # ------------------------------------------------------------------ kill, exit

    def kill(self, sender: Pid | None, target: Pid, reason: str) -> ctl.KillReq | None:
        """Kill local ``target`` (uncatchable); it dies with ``DiedException``.

        A remote ``target`` is not signalled here: the request for its node is
        returned, for the caller to send (``RemoteSender.send_signal`` or ``post``).
        """
        text = f"killed-by={sender!r},reason={reason}"
        if target.node != self._node_id:
            return ctl.KillReq(target, text)
        tp = self._procs.get(target.lid)
        if tp is not None:
            tp.signal(Kill(text))
        return None

    def exit(self, sender: Pid | None, target: Pid, reason: Any) -> ctl.Exit | None:
        """Raise ``ProcessExitException(sender, reason)`` in local ``target``; for a
        remote one, return the request for its node, as :meth:`kill` does.

        Raises:
            SerializationError: ``reason`` cannot be copied (local ``target``).
        """
        if target.node != self._node_id:
            return ctl.Exit(target, sender, reason)
        tp = self._procs.get(target.lid)
        if tp is not None:
            tp.signal(ProcessExitException(sender, copy_message(reason)))
        return None

    # ------------------------------------------------------------------ registry

    def register(self, name: str, pid: Pid, *, replace: bool = False) -> None:
        """Register ``name`` for ``pid`` on this node.

        Raises:
            ProcessRegistrationException: the name is taken (and not ``replace``), or
                ``pid`` is a local process that is not alive.
        """
        self.registry.register(name, pid, replace)

    def unregister(self, name: str) -> None:
        """Remove ``name``. Raises ProcessRegistrationException if it is not registered."""
        self.registry.register(name, None)

    def whereis(self, name: str) -> Pid | None:
        """The pid registered as ``name`` on this node, or None."""
        return self.registry.whereis(name)

    async def whereis_remote(self, node: NodeId, name: str, timeout: float | None) -> Pid | None:
        """``whereis`` on ``node``; None if unknown or no answer within ``timeout``.

        Raises:
            NodeUnreachableError: the node could not be reached.
        """
        return await self.registry.whereis_remote(node, name, timeout)

    async def register_remote(
        self, node: NodeId, name: str, pid: Pid | None, replace: bool
    ) -> None:
        """``register`` (or, with ``pid=None``, ``unregister``) on ``node``.

        Raises:
            ProcessRegistrationException: as for :meth:`register` on that node.
            NodeUnreachableError: the node could not be reached.
        """
        await self.registry.register_remote(node, name, pid, replace)

    def nsend_remote(self, node: NodeId, name: str, msg: Any) -> None:
        """Send ``msg`` to whatever is registered as ``name`` on ``node`` (dropped if none).

        Raises:
            SerializationError: ``msg`` cannot be pickled (another ``node``).
        """
        if node == self._node_id:
            self.registry.deliver(name, copy_message(msg))
        else:
            self.remote.post(node, ctl.NSend(name, msg))

    def say(self, proc: Process, text: str) -> None:
        """Log ``text`` through the process registered as ``logger`` here (never blocks)."""
        self.registry.deliver(
            LOGGER_NAME, LogRecord(time.time(), self.node_id, proc.pid, text, _HOSTNAME)
        )

    # ------------------------------------------------------------------ sending

    async def send_chan(self, proc: Process, port: SendPort[Any], msg: Any, copy: bool) -> None:
        """Send ``msg`` on ``port`` from ``proc`` (same pair connection as ``send``)."""
        owner = port.owner
        if owner.node == self._node_id:
            self.send_local(owner, ChanMessage(port.port_id, copy_message(msg) if copy else msg))
        else:
            await self.remote.send(proc, owner, ChanMessage(port.port_id, msg))


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("closing the failed node failed", exc_info=task.exception())
