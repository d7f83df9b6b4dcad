"""A node: one endpoint, a dispatcher, a node controller and the processes it runs.

Routing. Every message between two processes on different nodes travels on one
lightweight connection per (sender, receiver) pair, opened on the sender's first
``send`` and reused; its first message starts with a bind frame naming both ends
(:mod:`._control`). Controller traffic (spawn, link, monitor, registry, kill/exit,
death notifications) uses one more connection per pair of nodes, fed by a FIFO queue
so that posting a control message never blocks. The dispatcher task reads the
endpoint's single event queue and delivers each message into its process's mailbox;
messages for processes that have ended are dropped.

Failure. A transport reports ``CONNECTION_LOST(peer)`` once per bundle; the node then
fires every link and monitor its processes hold on the peer's processes (and on the
peer itself) with ``DiedDisconnect``. A process-pair connection that fails is marked
broken in the sending process and further sends on that pair are dropped until the
sender calls ``reconnect``, so a receiver always sees a prefix of what one sender sent
per connection. A node that closes kills its processes, reports them dead with
``DiedNodeDown`` and sends ``NodeDown`` to every node that watches it.

Everything here runs on the event loop thread of the node; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import pickle
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from . import _control as ctl
from ._channels import ChanMessage, SendPort
from ._copying import copy_message
from ._errors import NodeUnreachableError, ProcessRegistrationException, SpawnError
from ._ids import MonitorRef, NodeId, Pid
from ._info import NodeStats, ProcessInfo
from ._logger import LOGGER_NAME, LogRecord, logger_main, stderr_sink
from ._process import Kill, Process, new_process
from ._signals import (
    DiedDisconnect,
    DiedException,
    DiedNodeDown,
    DiedNormal,
    DiedReason,
    DiedUnknownId,
    NodeLinkException,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessExitException,
    ProcessLinkException,
    ProcessMonitorNotification,
)
from .serialization import SerializationError, deserialize, dumps, serialize
from .transports.base import (
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    EndPointClosed,
    EndPointClosedError,
    ErrorEvent,
    Event,
    EventError,
    EventErrorCode,
    Received,
    Transport,
    TransportError,
)

__all__ = ["BROKEN", "Node", "ProcessKilledError"]

log = logging.getLogger("hpcproc")

_COROUTINE = types.CoroutineType
#: Marks a process-pair connection lost until ``reconnect``.
BROKEN: Any = object()
#: Bound on establishing a controller connection to another node.
CONTROL_CONNECT_TIMEOUT = 30.0
#: The watcher lid of the registry's monitors of remote processes registered here
#: (process lids start at 1).
_REGISTRY_LID = 0
#: Bound on each graceful step of ``Node.close``.
CLOSE_STEP_TIMEOUT = 5.0


class ProcessKilledError(Exception):
    """``Node.run``'s process was killed (``kill``, node close) before returning."""


class _Incoming:
    """What an incoming connection carries; bound by its first message."""

    __slots__ = ("dest", "kind", "node")

    def __init__(self, node: NodeId) -> None:
        self.node = node
        self.kind = 0
        self.dest = 0


class _ControlOut:
    """Outgoing controller traffic to one node: a FIFO of serialized control messages,
    drained by one task."""

    __slots__ = ("bound", "conn", "dead", "queue", "task", "waiter")

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()
        self.conn: Any = None
        self.bound = False
        self.dead = False
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


def fn_name(fn: Any) -> str:
    """``module.qualname`` of a function, for error messages."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def _process_done(proc: Process) -> None:
    proc.node._on_exit(proc)


def notification(ref: MonitorRef, reason: DiedReason) -> Any:
    """The monitor message for ``ref`` (process, node or port monitor)."""
    target = ref.target
    if type(target) is SendPort:
        return PortMonitorNotification(ref, target, reason)
    if type(target) is NodeId:
        return NodeMonitorNotification(ref, target, reason)
    return ProcessMonitorNotification(ref, target, reason)


class Node:
    """A node: runs processes and connects them to the processes of other nodes.

    ``Node(transport)`` creates its endpoint from ``transport`` when started;
    ``Node(endpoint)`` uses an existing endpoint. Either way the node owns the endpoint
    and closes it in :meth:`close` (the transport stays the caller's). Use it as
    ``async with Node(transport) as node:`` or call :meth:`start` and :meth:`close`.

    ``log_sink`` receives each formatted ``say`` line of this node's logger
    (default: standard error).
    """

    def __init__(
        self,
        transport_or_endpoint: Transport | EndPoint,
        *,
        log_sink: Callable[[str], object] | None = None,
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
        self._procs: dict[int, Process] = {}
        self._lids = itertools.count(1)
        self._names: dict[str, Pid] = {}
        #: name -> the registry's monitor of the remote process registered as name,
        #: and back: the name is dropped when the monitor fires.
        self._name_refs: dict[str, MonitorRef] = {}
        self._ref_names: dict[MonitorRef, str] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._control: dict[NodeId, _ControlOut] = {}
        #: node -> {watch key: watcher lid} for watches our processes hold there.
        #: keys: MonitorRef, ("link", lid, target Pid), ("nodelink", lid).
        self._watched: dict[NodeId, dict[Any, int]] = {}
        #: watcher lid -> [(node, key)] of its entries in _watched (pruned lazily).
        self._watches_of: dict[int, list[tuple[NodeId, Any]]] = {}
        self._node_watchers: set[NodeId] = set()
        #: req -> (node, future, error class, hook run as the reply is handled)
        self._requests: dict[
            int,
            tuple[NodeId, asyncio.Future[Any], type[Exception], Callable[[Any], None] | None],
        ] = {}
        self._reqs = itertools.count(1)
        self._refs = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        #: The endpoint's ``receive_nowait`` if it has one (see :meth:`poll_inline`).
        self._receive_nowait: Callable[[], Event | None] | None = None
        self._started = False
        self._closing = False
        self._closed: asyncio.Event | None = None

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
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._dispatcher = self._loop.create_task(self._dispatch(), name="hpcproc-dispatcher")
        self._receive_nowait = getattr(self._endpoint, "receive_nowait", None)
        logger = self._spawn(logger_main, (self._log_sink,))
        self._register(LOGGER_NAME, logger.pid, replace=False)
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
            for nid in list(self._node_watchers):
                self._post(nid, ctl.NodeDown())
            outs = list(self._control.values())
            for out in outs:
                out.dead = True
                out.wake()
            drains = [out.task for out in outs if out.task is not None]
            if drains:
                await asyncio.wait(drains, timeout=CLOSE_STEP_TIMEOUT)
            for task in drains:
                task.cancel()
            for _, fut, _, _ in self._requests.values():
                if not fut.done():
                    fut.set_exception(NodeUnreachableError("local node closed"))
            self._requests.clear()
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

    def _check_open(self) -> None:
        if not self._started:
            raise RuntimeError("Node is not started: use `async with Node(...)` or `await start()`")
        if self._closing:
            raise RuntimeError("Node is closed")

    def _bg(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ spawning

    def spawn_local(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Pid:
        """Start ``fn(*args)`` as a process on this node and return its pid at once.

        ``args`` are passed as they are (not copied). The process starts running at the
        caller's next await.

        Raises:
            SpawnError: ``fn`` is not an ``async def`` function or raised when called.
            RuntimeError: the node is not started or is closed.
        """
        return self._spawn(fn, args).pid

    async def run(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run ``fn(*args)`` as a process on this node and return its result.

        The module-level API (``hp.send``, ``hp.spawn``...) works inside ``fn``.

        Raises:
            SpawnError: as for :meth:`spawn_local`.
            ProcessKilledError: the process was killed before it returned.
            Exception: whatever ``fn`` raised.
        """
        proc = self._spawn(fn, args)
        await asyncio.wait({proc})
        if proc.cancelled():
            reason = self._death_reason(proc)
            raise ProcessKilledError(f"{fn_name(fn)} was killed: {reason!r}")
        return proc.result()

    def _spawn(self, fn: Any, args: tuple[Any, ...], watch: Any = None) -> Process:
        if self._closing or not self._started:
            self._check_open()
        try:
            coro = fn(*args)
        except Exception as exc:
            raise SpawnError(
                f"{fn_name(fn)} raised while starting on node {self._node_id}: {exc!r}"
            ) from exc
        if type(coro) is not _COROUTINE and not inspect.iscoroutine(coro):
            raise SpawnError(
                f"{fn_name(fn)} is not an async function (it returned "
                f"{type(coro).__name__}) on node {self._node_id}"
            )
        assert self._node_id is not None and self._loop is not None
        lid = next(self._lids)
        pid = tuple.__new__(Pid, (self._node_id, lid))
        proc = new_process(coro, self, pid, self._loop)
        if watch is not None:
            if type(watch) is MonitorRef and watch.target is None:
                watch = MonitorRef(pid, watch.watcher, watch.n)
            proc._watchers = {watch: None}
        self._procs[lid] = proc
        proc.add_done_callback(_process_done)
        return proc

    async def spawn(
        self,
        node: NodeId,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
        _watch: Any = None,
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
        if node == self._node_id:
            return self._spawn(fn, args, _watch).pid
        self._check_open()
        name = fn_name(fn)
        try:
            fn_blob = dumps(fn)
            args_blob = dumps(args)
        except Exception as exc:
            raise SpawnError(
                f"cannot pickle {name} or its arguments for node {node}: {exc!r}"
            ) from exc
        watcher: Pid | None = None
        ref: MonitorRef | None = None
        on_ok: Callable[[Any], None] | None = None
        if type(_watch) is MonitorRef:
            ref, watcher = _watch, _watch.watcher
            self._watch_remote(node, ref, ref.watcher.lid)

            def on_ok(pid: Any) -> None:
                assert ref is not None
                self._rekey_remote(node, ref, MonitorRef(pid, ref.watcher, ref.n))

        elif _watch is not None:
            watcher = _watch
            wlid = _watch.lid

            def on_ok(pid: Any) -> None:
                # Registered as the reply is handled, before any Died can be.
                self._watch_remote(node, ("link", wlid, pid), wlid)

        try:
            pid: Pid = await self._request(
                node,
                lambda req: ctl.SpawnReq(req, name, fn_blob, args_blob, watcher, ref is None, ref),
                SpawnError,
                on_ok=on_ok,
            )
        except BaseException:
            if ref is not None:
                self._unwatch_remote(node, ref)
            raise
        return pid

    # ------------------------------------------------------------------ deaths

    def _death_reason(self, proc: Process) -> DiedReason:
        if proc.cancelled():
            sig = proc._signal
            if isinstance(sig, Kill):
                return DiedNodeDown() if sig.node_down else DiedException(sig.text)
            if sig is not None:
                return DiedException(f"{type(sig).__name__}: {sig}")
            return DiedException("cancelled")
        exc = proc.exception()
        if exc is None:
            return DiedNormal()
        log.debug("process %r died: %r", proc.pid, exc)
        return DiedException(f"{type(exc).__name__}: {exc}")

    def _on_exit(self, proc: Process) -> None:
        pid = proc.pid
        lid = pid[1]
        self._procs.pop(lid, None)
        if proc._names:
            for name in proc._names:
                if self._names.get(name) == pid:
                    del self._names[name]
        if proc._conns:
            conns = [c for c in proc._conns.values() if c is not BROKEN]
            if conns and not self._closing:
                self._bg(_close_all(conns))
        if self._watches_of and lid in self._watches_of:
            self._drop_watches_of(proc)
        if proc._watchers:
            reason = self._death_reason(proc)
            for key in proc._watchers:
                self._notify(pid, reason, key)
        elif not proc.cancelled() and proc.exception() is not None:
            log.debug("process %r died: %r", pid, proc.exception())

    def _notify(self, target: Pid, reason: DiedReason, key: Any) -> None:
        """Tell the watcher behind ``key`` (a MonitorRef or a linker's Pid) of a death."""
        watcher: Pid = key.watcher if type(key) is MonitorRef else key
        if watcher.node == self._node_id:
            self._deliver_death(watcher.lid, target, reason, key)
        else:
            self._post(
                watcher.node,
                ctl.Died(target, reason, watcher, key if type(key) is MonitorRef else None),
            )

    def _deliver_death(self, wlid: int, target: Any, reason: DiedReason, key: Any) -> None:
        proc = self._procs.get(wlid)
        if proc is None:
            if wlid == _REGISTRY_LID:
                self._registered_died(key)
            return
        if type(key) is MonitorRef:
            proc.deliver(notification(key, reason))
        elif type(key) is tuple and key[0] == "nodelink":
            proc.signal(NodeLinkException(target, reason))
        elif not reason.normal:
            proc.signal(ProcessLinkException(target, reason))

    def _node_lost(self, nid: NodeId, reason: DiedReason) -> None:
        """Communication with ``nid`` failed (or it closed): fire every watch on it."""
        for cid in [c for c, st in self._incoming.items() if st.node == nid]:
            del self._incoming[cid]
        out = self._control.pop(nid, None)
        if out is not None:
            out.dead = True
            out.queue.clear()
            out.wake()
            if out.conn is not None:
                self._bg(out.conn.close())
        self._node_watchers.discard(nid)
        for req, (rnid, fut, _, _) in list(self._requests.items()):
            if rnid == nid:
                del self._requests[req]
                if not fut.done():
                    fut.set_exception(NodeUnreachableError(f"lost connection to node {nid}"))
        watches = self._watched.pop(nid, None)
        if not watches:
            return
        for key, wlid in watches.items():
            if type(key) is MonitorRef:
                if key.target is None:
                    continue  # a spawn_monitor still waiting: its spawn fails instead
                self._deliver_death(wlid, key.target, reason, key)
            elif key[0] == "nodelink":
                self._deliver_death(wlid, nid, reason, key)
            else:
                self._deliver_death(wlid, key[2], reason, key)

    # ------------------------------------------------------------------ links, monitors

    def _watch_remote(self, nid: NodeId, key: Any, wlid: int) -> None:
        watches = self._watched.get(nid)
        if watches is None:
            watches = self._watched[nid] = {}
        watches[key] = wlid
        mine = self._watches_of.get(wlid)
        if mine is None:
            mine = self._watches_of[wlid] = []
        elif len(mine) >= 32:
            # Drop entries of watches that have fired or been removed meanwhile.
            mine[:] = [(n, k) for n, k in mine if k in self._watched.get(n, ())]
        mine.append((nid, key))

    def _rekey_remote(self, nid: NodeId, old: MonitorRef, new: MonitorRef) -> None:
        """Replace the watch ``old`` (a spawn_monitor ref without a target yet) by
        ``new``, which names the spawned pid, in both indexes, so that an unmonitor
        sent when the watcher ends names the pid."""
        # Equal keys (same watcher and number): pop first, or the dict keeps ``old``.
        self._unwatch_remote(nid, old)
        wlid = new.watcher.lid
        watches = self._watched.setdefault(nid, {})
        watches[new] = wlid
        mine = self._watches_of.setdefault(wlid, [])
        mine[:] = [(n, k) for n, k in mine if k is not old]
        mine.append((nid, new))

    def _drop_watches_of(self, proc: Process) -> None:
        """``proc`` ended: forget its remote watches and tell the targets' nodes."""
        for nid, key in self._watches_of.pop(proc.pid.lid, ()):
            watches = self._watched.get(nid)
            if watches is None or watches.pop(key, None) is None:
                continue
            if not watches:
                del self._watched[nid]
            if type(key) is MonitorRef and type(key.target) is not NodeId:
                target = key.target.owner if type(key.target) is SendPort else key.target
                self._post(nid, ctl.UnmonitorReq(key, target))
            elif type(key) is tuple and key[0] == "link":
                self._post(nid, ctl.UnlinkReq(proc.pid, key[2]))

    def _unwatch_remote(self, nid: NodeId, key: Any) -> None:
        watches = self._watched.get(nid)
        if watches is not None:
            watches.pop(key, None)
            if not watches:
                del self._watched[nid]

    def link(self, proc: Process, target: Pid) -> None:
        """``proc`` links to ``target``; see :func:`hpcproc.link`."""
        if target.node == self._node_id:
            tp = self._procs.get(target.lid)
            if tp is None:
                raise ProcessLinkException(target, DiedUnknownId())
            _add_watch(tp, proc.pid)
        else:
            self._watch_remote(target.node, ("link", proc.pid.lid, target), proc.pid.lid)
            self._post(target.node, ctl.LinkReq(proc.pid, target))

    def unlink(self, proc: Process, target: Pid) -> None:
        """Undo :meth:`link`; no exception for ``target`` is raised afterwards."""
        if target.node == self._node_id:
            tp = self._procs.get(target.lid)
            if tp is not None and tp._watchers is not None:
                tp._watchers.pop(proc.pid, None)
        else:
            self._unwatch_remote(target.node, ("link", proc.pid.lid, target))
            self._post(target.node, ctl.UnlinkReq(proc.pid, target))

    def monitor(self, proc: Process, target: Pid | SendPort[Any]) -> MonitorRef:
        """``proc`` monitors ``target`` (a pid, or the owner of a send port)."""
        ref = MonitorRef(target, proc.pid, next(self._refs))
        pid = target.owner if type(target) is SendPort else target
        assert type(pid) is Pid
        if pid.node == self._node_id:
            tp = self._procs.get(pid.lid)
            if tp is None:
                proc.deliver(notification(ref, DiedUnknownId()))
            else:
                _add_watch(tp, ref)
        else:
            self._watch_remote(pid.node, ref, proc.pid.lid)
            self._post(pid.node, ctl.MonitorReq(ref, pid))
        return ref

    def unmonitor(self, proc: Process, ref: MonitorRef) -> None:
        """Undo :meth:`monitor`; a notification for ``ref`` already queued is removed."""
        target = ref.target
        if type(target) is NodeId:
            self._unwatch_remote(target, ref)
        else:
            pid = target.owner if type(target) is SendPort else target
            if pid.node == self._node_id:
                tp = self._procs.get(pid.lid)
                if tp is not None and tp._watchers is not None:
                    tp._watchers.pop(ref, None)
            else:
                self._unwatch_remote(pid.node, ref)
                self._post(pid.node, ctl.UnmonitorReq(ref, pid))
        mb = proc._mailbox
        if mb:
            for i, msg in enumerate(mb):
                if getattr(msg, "ref", None) == ref and type(msg) in (
                    ProcessMonitorNotification,
                    NodeMonitorNotification,
                    PortMonitorNotification,
                ):
                    del mb[i]
                    break

    async def monitor_node(self, proc: Process, nid: NodeId) -> MonitorRef:
        """``proc`` gets a NodeMonitorNotification when ``nid`` goes away.

        Returns once ``nid`` acknowledged the watch (so its close will be reported as
        ``DiedNodeDown``) or the watch already fired (unreachable: ``DiedDisconnect``).
        """
        ref = MonitorRef(nid, proc.pid, next(self._refs))
        if nid != self._node_id:
            self._watch_remote(nid, ref, proc.pid.lid)
            await self._watch_node(nid)
        return ref

    async def link_node(self, proc: Process, nid: NodeId) -> None:
        """``proc`` gets NodeLinkException raised when ``nid`` goes away (see monitor_node)."""
        if nid != self._node_id:
            self._watch_remote(nid, ("nodelink", proc.pid.lid), proc.pid.lid)
            await self._watch_node(nid)

    async def _watch_node(self, nid: NodeId) -> None:
        # Unreachable: the watch has already fired with DiedDisconnect.
        with contextlib.suppress(NodeUnreachableError):
            await self._request(nid, lambda req: ctl.NodeWatch(req), NodeUnreachableError)

    # ------------------------------------------------------------------ kill, exit

    def kill(self, sender: Pid | None, target: Pid, reason: str) -> None:
        """Kill ``target`` (uncatchable); it dies with ``DiedException``."""
        text = f"killed-by={sender!r},reason={reason}"
        if target.node == self._node_id:
            tp = self._procs.get(target.lid)
            if tp is not None:
                tp.signal(Kill(text))
        else:
            self._post(target.node, ctl.Kill(target, text))

    def exit(self, sender: Pid | None, target: Pid, reason: Any) -> None:
        """Raise ``ProcessExitException(sender, reason)`` in ``target``."""
        if target.node == self._node_id:
            tp = self._procs.get(target.lid)
            if tp is not None:
                tp.signal(ProcessExitException(sender, copy_message(reason)))
        else:
            self._post(target.node, ctl.Exit(target, sender, reason))

    # ------------------------------------------------------------------ registry

    def _register(self, name: str, pid: Pid | None, replace: bool) -> None:
        old = self._names.get(name)
        if pid is None:
            if old is None:
                raise ProcessRegistrationException(f"no process is registered as {name!r}")
            self._drop_name(name, old)
            return
        if old is not None and not replace:
            raise ProcessRegistrationException(f"{name!r} is already registered to {old!r}")
        tp: Process | None = None
        if pid.node == self._node_id:
            tp = self._procs.get(pid.lid)
            if tp is None:
                raise ProcessRegistrationException(
                    f"cannot register {name!r}: {pid!r} is not alive"
                )
        if old is not None:
            self._drop_name(name, old)
        self._names[name] = pid
        if tp is not None:
            if tp._names is None:
                tp._names = []
            tp._names.append(name)
        else:
            # A process of another node: monitor it from here, so that its name is
            # dropped when it dies or its node is lost (as for a local process).
            assert self._node_id is not None
            ref = MonitorRef(pid, Pid(self._node_id, _REGISTRY_LID), next(self._refs))
            self._name_refs[name] = ref
            self._ref_names[ref] = name
            self._watch_remote(pid.node, ref, _REGISTRY_LID)
            self._post(pid.node, ctl.MonitorReq(ref, pid))

    def _drop_name(self, name: str, pid: Pid) -> None:
        del self._names[name]
        if pid.node == self._node_id:
            tp = self._procs.get(pid.lid)
            if tp is not None and tp._names and name in tp._names:
                tp._names.remove(name)
            return
        ref = self._name_refs.pop(name, None)
        if ref is not None:
            del self._ref_names[ref]
            self._unwatch_remote(pid.node, ref)
            self._post(pid.node, ctl.UnmonitorReq(ref, pid))

    def _registered_died(self, ref: Any) -> None:
        """The registry's monitor ``ref`` fired: drop the name it watched."""
        name = self._ref_names.pop(ref, None) if type(ref) is MonitorRef else None
        if name is not None:
            del self._name_refs[name]
            del self._names[name]

    def register(self, name: str, pid: Pid, *, replace: bool = False) -> None:
        """Register ``name`` for ``pid`` on this node.

        Raises:
            ProcessRegistrationException: the name is taken (and not ``replace``), or
                ``pid`` is a local process that is not alive.
        """
        self._register(name, pid, replace)

    def unregister(self, name: str) -> None:
        """Remove ``name``. Raises ProcessRegistrationException if it is not registered."""
        self._register(name, None, False)

    def whereis(self, name: str) -> Pid | None:
        """The pid registered as ``name`` on this node, or None."""
        return self._names.get(name)

    async def whereis_remote(self, node: NodeId, name: str, timeout: float | None) -> Pid | None:
        """``whereis`` on ``node``; None if unknown or no answer within ``timeout``.

        Raises:
            NodeUnreachableError: the node could not be reached.
        """
        if node == self._node_id:
            return self.whereis(name)
        try:
            pid: Pid | None = await self._request(
                node, lambda req: ctl.WhereIs(req, name), NodeUnreachableError, timeout
            )
        except asyncio.TimeoutError:
            return None
        return pid

    async def register_remote(
        self, node: NodeId, name: str, pid: Pid | None, replace: bool
    ) -> None:
        """``register`` (or, with ``pid=None``, ``unregister``) on ``node``.

        Raises:
            ProcessRegistrationException: as for :meth:`register` on that node.
            NodeUnreachableError: the node could not be reached.
        """
        if node == self._node_id:
            self._register(name, pid, replace)
            return
        await self._request(
            node, lambda req: ctl.Register(req, name, pid, replace), ProcessRegistrationException
        )

    def nsend_remote(self, node: NodeId, name: str, msg: Any) -> None:
        """Send ``msg`` to whatever is registered as ``name`` on ``node`` (dropped if none)."""
        if node == self._node_id:
            self._deliver_named(name, copy_message(msg))
        else:
            self._post(node, ctl.NSend(name, msg))

    def _deliver_named(self, name: str, msg: Any) -> None:
        pid = self._names.get(name)
        if pid is not None:
            self._deliver_to(pid, msg)

    def _deliver_to(self, pid: Pid, msg: Any) -> None:
        """Deliver an already-private ``msg``; a remote ``pid`` is reached via its controller."""
        if pid.node == self._node_id:
            tp = self._procs.get(pid.lid)
            if tp is not None:
                tp.deliver(msg)
        else:
            self._post(pid.node, ctl.Deliver(pid, msg))

    def say(self, proc: Process, text: str) -> None:
        """Log ``text`` through the process registered as ``logger`` here (never blocks)."""
        assert self._node_id is not None
        self._deliver_named(LOGGER_NAME, LogRecord(time.time(), self._node_id, proc.pid, text))

    # ------------------------------------------------------------------ introspection

    def process_info(self, pid: Pid) -> ProcessInfo | None:
        """A snapshot of local process ``pid``, or None if it is not alive."""
        tp = self._procs.get(pid.lid) if pid.node == self._node_id else None
        if tp is None:
            return None
        watchers = tp._watchers or {}
        return ProcessInfo(
            pid=pid,
            node=pid.node,
            registered_names=tuple(tp._names or ()),
            message_queue_length=len(tp._mailbox or ()),
            linked_by=tuple(k for k in watchers if type(k) is Pid),
            monitored_by=tuple(k for k in watchers if type(k) is MonitorRef),
        )

    def stats(self) -> NodeStats:
        """A snapshot of this node's counters."""
        assert self._node_id is not None
        monitors = links = 0
        for proc in self._procs.values():
            if proc._watchers:
                for k in proc._watchers:
                    if type(k) is MonitorRef:
                        monitors += 1
                    else:
                        links += 1
        return NodeStats(
            self._node_id, len(self._procs), len(self._names), monitors, links, len(self._incoming)
        )

    async def get_process_info(self, pid: Pid) -> ProcessInfo | None:
        """:meth:`process_info` on the pid's node. Raises NodeUnreachableError."""
        if pid.node == self._node_id:
            return self.process_info(pid)
        info: ProcessInfo | None = await self._request(
            pid.node, lambda req: ctl.GetInfo(req, pid), NodeUnreachableError
        )
        return info

    async def get_node_stats(self, node: NodeId) -> NodeStats:
        """:meth:`stats` of ``node``. Raises NodeUnreachableError."""
        if node == self._node_id:
            return self.stats()
        stats: NodeStats = await self._request(
            node, lambda req: ctl.GetStats(req), NodeUnreachableError
        )
        return stats

    # ------------------------------------------------------------------ sending

    def send_local(self, pid: Pid, msg: Any) -> None:
        """Deliver ``msg`` (already copied as needed) to local ``pid``; dropped if dead."""
        tp = self._procs.get(pid.lid)
        if tp is not None:
            tp.deliver(msg)

    async def send_remote(self, proc: Process, pid: Pid, msg: Any) -> None:
        """Send ``msg`` from ``proc`` to ``pid`` on another node, on their pair connection.

        Opens the connection on first use. If opening or sending fails, the pair is
        marked broken and this and later messages are dropped until ``reconnect``.

        Raises:
            SerializationError: ``msg`` cannot be pickled.
        """
        conns = proc._conns
        if conns is None:
            conns = proc._conns = {}
        conn = conns.get(pid)
        if conn is BROKEN:
            return
        frames = serialize(msg)
        if conn is None:
            assert self._endpoint is not None
            try:
                conn = await self._endpoint.connect(pid.node.address)
            except TransportError as exc:
                log.debug("cannot connect %r -> %r: %r", proc.pid, pid, exc)
                conns[pid] = BROKEN
                return
            conns[pid] = conn
            frames = [ctl.bind_frame(pid.lid, proc.pid.lid), *frames]
        try:
            await conn.send(frames)
        except TransportError as exc:
            self._send_failed(proc, pid, conn, exc)

    def send_remote_nowait(self, proc: Process, pid: Pid, msg: Any) -> bool:
        """:meth:`send_remote` when the connection is open and the message can go out
        without waiting; False (nothing sent) when it must be awaited instead.

        Raises:
            SerializationError: ``msg`` cannot be pickled.
        """
        conns = proc._conns
        conn = conns.get(pid) if conns is not None else None
        if conn is None or conn is BROKEN:
            return False
        frames = serialize(msg)
        try:
            return bool(conn.send_nowait(frames))
        except TransportError as exc:
            self._send_failed(proc, pid, conn, exc)
            return True  # dropped, as send_remote drops it

    def _send_failed(self, proc: Process, pid: Pid, conn: Any, exc: TransportError) -> None:
        """The pair connection broke: drop messages to ``pid`` until ``reconnect``."""
        log.debug("send %r -> %r failed: %r", proc.pid, pid, exc)
        assert proc._conns is not None
        proc._conns[pid] = BROKEN
        self._bg(conn.close())

    def reconnect(self, proc: Process, pid: Pid) -> None:
        """Forget ``proc``'s (possibly broken) connection to ``pid``: the next send reopens it."""
        if proc._conns is None:
            return
        conn = proc._conns.pop(pid, None)
        if conn is not None and conn is not BROKEN:
            self._bg(conn.close())

    # ------------------------------------------------------------------ control out

    def _post(self, nid: NodeId, msg: Any) -> None:
        """Queue a control message for ``nid``'s controller; never blocks, FIFO per node.

        The message is serialized now, so the receiver gets it as it is at this call
        (copy semantics, as for ``send``).

        Raises:
            SerializationError: ``msg`` cannot be pickled (nothing is queued).
        """
        if nid == self._node_id:
            assert self._loop is not None
            self._loop.call_soon(self._on_control, nid, msg)
            return
        out = self._control.get(nid)
        if out is None and self._closing and not isinstance(msg, ctl.NodeDown | ctl.Died):
            return
        frames = serialize(msg)
        if out is None:
            out = self._control[nid] = _ControlOut()
            assert self._loop is not None
            out.task = self._loop.create_task(self._drain(nid, out))
        elif not out.queue and out.bound and out.conn is not None and not out.dead:
            # Nothing queued before it and the connection is open: send it now if that
            # needs no waiting, saving the drain task a wake-up (a round of the loop).
            try:
                if out.conn.send_nowait(frames):
                    return
            except TransportError as exc:
                log.debug("control send to %s failed: %r", nid, exc)
                # Not delivered: the drain task opens a new bundle and sends it there.
                conn, out.conn = out.conn, None
                self._bg(conn.close())
        out.queue.append(frames)
        out.wake()

    async def _drain(self, nid: NodeId, out: _ControlOut) -> None:
        assert self._loop is not None and self._endpoint is not None
        try:
            while True:
                while out.queue:
                    frames = out.queue[0]
                    if not await self._send_control(nid, out, frames):
                        if self._control.get(nid) is out:
                            self._node_lost(nid, DiedDisconnect())
                        return
                    if out.queue:
                        out.queue.popleft()
                if out.dead:
                    return
                out.waiter = self._loop.create_future()
                await out.waiter
                out.waiter = None
        finally:
            if out.conn is not None:
                conn, out.conn = out.conn, None
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing control connection failed: %r", exc)

    async def _send_control(self, nid: NodeId, out: _ControlOut, frames: list[Any]) -> bool:
        assert self._endpoint is not None
        for _ in range(2):
            if out.conn is None:
                try:
                    out.conn = await self._endpoint.connect(
                        nid.address, timeout=CONTROL_CONNECT_TIMEOUT
                    )
                except TransportError as exc:
                    log.debug("cannot reach node %s: %r", nid, exc)
                    return False
                out.bound = False
            try:
                if out.bound:
                    await out.conn.send(frames)
                else:
                    await out.conn.send([ctl.bind_frame(), *frames])
                    out.bound = True
                return True
            except TransportError as exc:
                # Not delivered (SendError): retry once on a new bundle.
                log.debug("control send to %s failed: %r", nid, exc)
                out.conn = None
        return False

    async def _request(
        self,
        nid: NodeId,
        make: Callable[[int], Any],
        error: type[Exception],
        timeout: float | None = None,
        on_ok: Callable[[Any], None] | None = None,
    ) -> Any:
        self._check_open()
        assert self._loop is not None
        req = next(self._reqs)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._requests[req] = (nid, fut, error, on_ok)
        try:
            try:
                self._post(nid, make(req))
            except SerializationError as exc:
                raise error(f"cannot send the request to node {nid}: {exc}") from exc
            # As a process waiting in receive does: take the reply (and whatever comes
            # before it) from the endpoint ourselves while the loop is otherwise idle.
            poll = self.poll_inline
            while not fut.done() and poll():
                pass
            if timeout is None or fut.done():
                return await fut
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._requests.pop(req, None)

    # ------------------------------------------------------------------ dispatcher

    async def _dispatch(self) -> None:
        assert self._endpoint is not None
        endpoint = self._endpoint
        handle = self.handle_event
        while True:
            try:
                event = await endpoint.receive()
            except EndPointClosedError:
                return
            if type(event) is EndPointClosed:
                return
            handle(event)

    def handle_event(self, event: Event) -> None:
        """Act on one endpoint event (never ``EndPointClosed``); never raises.

        Run by the dispatcher task, and by a process waiting in ``receive`` that took
        the event itself (:meth:`poll_inline`): events are handled in the order the
        endpoint hands them out, whoever takes them.
        """
        try:
            kind = type(event)
            if kind is Received:
                st = self._incoming.get(event.conn_id)  # type: ignore[union-attr]
                if st is None:
                    return
                frames = event.frames  # type: ignore[union-attr]
                if st.kind == 0:
                    st.kind, st.dest, _ = ctl.parse_bind(frames[0])
                    frames = frames[1:]
                if st.kind == ctl.PROCESS:
                    proc = self._procs.get(st.dest)
                    if proc is not None:
                        proc.deliver(deserialize(frames))
                else:
                    self._on_control(st.node, deserialize(frames))
            elif kind is ConnectionOpened:
                self._incoming[event.conn_id] = _Incoming(NodeId(event.remote_address))  # type: ignore[union-attr]
            elif kind is ConnectionClosed:
                self._incoming.pop(event.conn_id, None)  # type: ignore[union-attr]
            elif kind is ErrorEvent:
                self._on_error(event.error)  # type: ignore[union-attr]
        except Exception:
            log.exception("hpcproc dispatcher: dropping a malformed or failing event")

    def poll_inline(self) -> bool:
        """Take and handle one event without suspending, if the endpoint has one soon.

        Called by a process about to wait in ``receive``: when the event loop has
        nothing else to run, the transport polls its links in place for a bounded
        time (as the dispatcher's ``receive`` would), and the reply the process waits
        for is delivered without a trip round the event loop. True if an event was
        handled.
        """
        poll = self._receive_nowait
        if poll is None:
            return False
        event = poll()
        if event is None:
            return False
        self.handle_event(event)
        return True

    def _on_error(self, error: EventError) -> None:
        if error.code is EventErrorCode.CONNECTION_LOST and error.remote_address is not None:
            self._node_lost(NodeId(error.remote_address), DiedDisconnect())
            return
        log.error("hpcproc node %s: transport failure: %s", self._node_id, error.message)
        for nid in list(self._watched) + list(self._control):
            self._node_lost(nid, DiedDisconnect())

    # ------------------------------------------------------------------ controller

    def _reply(self, nid: NodeId, req: int, ok: bool, value: Any) -> None:
        self._post(nid, ctl.Reply(req, ok, value))

    def _on_control(self, nid: NodeId, msg: Any) -> None:
        """Handle one control message from node ``nid`` (also used for self-posts)."""
        kind = type(msg)
        if kind is ctl.Died:
            key = msg.ref if msg.ref is not None else ("link", msg.watcher.lid, msg.target)
            watches = self._watched.get(msg.target.node)
            if watches is not None and watches.pop(key, None) is not None:
                if not watches:
                    del self._watched[msg.target.node]
                self._deliver_death(msg.watcher.lid, msg.target, msg.reason, key)
        elif kind is ctl.Reply:
            entry = self._requests.pop(msg.req, None)
            if entry is not None and not entry[1].done():
                if msg.ok:
                    if entry[3] is not None:
                        entry[3](msg.value)
                    entry[1].set_result(msg.value)
                else:
                    entry[1].set_exception(entry[2](msg.value))
        elif kind is ctl.SpawnReq:
            self._on_spawn(nid, msg)
        elif kind is ctl.LinkReq or kind is ctl.MonitorReq:
            key = msg.ref if kind is ctl.MonitorReq else msg.watcher
            tp = self._procs.get(msg.target.lid) if msg.target.node == self._node_id else None
            if tp is None:
                self._notify(msg.target, DiedUnknownId(), key)
            else:
                _add_watch(tp, key)
        elif kind is ctl.UnlinkReq or kind is ctl.UnmonitorReq:
            key = msg.ref if kind is ctl.UnmonitorReq else msg.watcher
            tp = self._procs.get(msg.target.lid)
            if tp is not None and tp._watchers is not None:
                tp._watchers.pop(key, None)
        elif kind is ctl.NodeWatch:
            self._node_watchers.add(nid)
            self._reply(nid, msg.req, True, None)
        elif kind is ctl.NodeDown:
            self._node_lost(nid, DiedNodeDown())
        elif kind is ctl.Kill:
            self._kill_text(msg.target, msg.text)
        elif kind is ctl.Exit:
            self.exit(msg.sender, msg.target, msg.reason)
        elif kind is ctl.NSend:
            self._deliver_named(msg.name, msg.msg)
        elif kind is ctl.Deliver:
            self._deliver_to(msg.target, msg.msg)
        elif kind is ctl.WhereIs:
            self._reply(nid, msg.req, True, self._names.get(msg.name))
        elif kind is ctl.Register:
            try:
                self._register(msg.name, msg.pid, msg.replace)
            except ProcessRegistrationException as exc:
                self._reply(nid, msg.req, False, f"on node {self._node_id}: {exc}")
            else:
                self._reply(nid, msg.req, True, None)
        elif kind is ctl.GetInfo:
            self._reply(nid, msg.req, True, self.process_info(msg.pid))
        elif kind is ctl.GetStats:
            self._reply(nid, msg.req, True, self.stats())
        else:
            log.warning("hpcproc node %s: unknown control message %r", self._node_id, kind)

    def _kill_text(self, target: Pid, text: str) -> None:
        tp = self._procs.get(target.lid)
        if tp is not None:
            tp.signal(Kill(text))

    def _on_spawn(self, nid: NodeId, msg: ctl.SpawnReq) -> None:
        where = f"on node {self._node_id}"
        try:
            fn = pickle.loads(msg.fn_blob)
        except Exception as exc:
            self._reply(nid, msg.req, False, f"cannot load function {msg.fn_name} {where}: {exc!r}")
            return
        try:
            args = pickle.loads(msg.args_blob)
        except Exception as exc:
            self._reply(
                nid, msg.req, False, f"cannot load the arguments of {msg.fn_name} {where}: {exc!r}"
            )
            return
        watch: Any = msg.ref if msg.ref is not None else (msg.watcher if msg.link else None)
        try:
            proc = self._spawn(fn, args, watch)
        except (SpawnError, RuntimeError) as exc:
            self._reply(nid, msg.req, False, str(exc))
            return
        self._reply(nid, msg.req, True, proc.pid)

    # ------------------------------------------------------------------ channels

    async def send_chan(self, proc: Process, port: SendPort[Any], msg: Any, copy: bool) -> None:
        """Send ``msg`` on ``port`` from ``proc`` (same pair connection as ``send``)."""
        owner = port.owner
        if owner.node == self._node_id:
            self.send_local(owner, ChanMessage(port.port_id, copy_message(msg) if copy else msg))
        else:
            await self.send_remote(proc, owner, ChanMessage(port.port_id, msg))


def _add_watch(proc: Process, key: Any) -> None:
    if proc._watchers is None:
        proc._watchers = {}
    proc._watchers[key] = None


async def _close_all(conns: list[Any]) -> None:
    for conn in conns:
        try:
            await conn.close()
        except Exception as exc:
            log.debug("closing a connection failed: %r", exc)
