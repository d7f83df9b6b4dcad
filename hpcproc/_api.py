"""The module-level process API (``hp.send``, ``hp.receive``, ``hp.spawn``...).

Every function here acts on the *current process* (found with
:func:`asyncio.current_task`) and raises :class:`~hpcproc.NotInProcessError` when
called outside one. Awaiting functions are where signals land: a link firing or an
``exit`` aimed at the caller is raised from them as ``ProcessLinkException`` /
``ProcessExitException``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from ._channels import ReceivePort, SendPort
from ._copying import copy_message
from ._ids import MonitorRef, NodeId, Pid
from ._info import NodeStats, ProcessInfo
from ._logger import LOGGER_NAME
from ._matching import Matcher, match_if
from ._process import current
from ._signals import ProcessMonitorNotification, ProcessTerminationException

__all__ = [
    "CallError",
    "call",
    "exit",
    "expect",
    "get_node_stats",
    "get_process_info",
    "kill",
    "link",
    "link_node",
    "monitor",
    "monitor_node",
    "new_chan",
    "nsend",
    "nsend_remote",
    "receive",
    "receive_chan",
    "reconnect",
    "redirect_logs",
    "register",
    "register_remote",
    "say",
    "self_node",
    "self_pid",
    "send",
    "send_chan",
    "spawn",
    "spawn_link",
    "spawn_local",
    "spawn_monitor",
    "terminate",
    "unlink",
    "unmonitor",
    "unregister",
    "unsafe_send",
    "whereis",
    "whereis_remote",
]

T = TypeVar("T")
ProcessFn = Callable[..., Coroutine[Any, Any, Any]]


# ---------------------------------------------------------------------- identity


def self_pid() -> Pid:
    """The current process's pid."""
    return current().pid


def self_node() -> NodeId:
    """The id of the node the current process runs on."""
    return current().node.node_id


# ---------------------------------------------------------------------- messages


async def send(pid: Pid, msg: Any) -> None:
    """Send ``msg`` to ``pid``; returns without waiting for the receiver.

    Messages from one process to another arrive in the order sent, as a prefix of what
    was sent: a message to a dead or unreachable process is dropped silently, and
    after the connection to ``pid``'s node failed every later message to ``pid`` is
    dropped until :func:`reconnect`. A local receiver gets a copy of a mutable
    ``msg`` (see :func:`unsafe_send`).

    Raises:
        SerializationError: ``msg`` cannot be pickled (remote ``pid``).
    """
    proc = current()
    node = proc.node
    if pid[0] is proc.pid[0]:  # pid.node; NodeIds are interned
        tp = node.local_process(pid[1])  # pid.lid
        if tp is not None:
            tp.deliver(copy_message(msg))
        return
    if proc.pending_signal is None and node.remote.send_nowait(proc, pid, msg):
        return
    # Process.guarded written out: one coroutine less per remote message.
    proc.in_call = True
    try:
        await node.remote.send(proc, pid, msg)
    except asyncio.CancelledError as exc:
        raise proc.convert_cancel(exc) from None
    finally:
        proc.in_call = False
        if proc.pending_signal is not None:
            proc.redeliver_soon()


async def unsafe_send(pid: Pid, msg: Any) -> None:
    """Like :func:`send`, but a local receiver gets ``msg`` itself, not a copy.

    Faster for large mutable messages; the sender must not mutate ``msg`` afterwards.
    Remote sends are unchanged (they always serialize).
    """
    proc = current()
    node = proc.node
    if pid[0] is proc.pid[0]:  # pid.node; NodeIds are interned
        node.send_local(pid, msg)
        return
    await proc.guarded(node.remote.send(proc, pid, msg))


def expect(
    type_: type | tuple[type, ...] = object, timeout: float | None = None
) -> Coroutine[Any, Any, Any]:
    """Take the oldest message that is an instance of ``type_``; others stay queued.

    Await the result. Waits up to ``timeout`` seconds (forever if None; ``0`` only
    looks at what is queued) and gives ``None`` when nothing matched in time.
    (A plain function returning the coroutine, so that a waiting process holds no
    extra frame.)
    """
    return current().receive((), timeout, type_)


def receive(*matchers: Matcher, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
    """Selective receive: await it for the result of the handler of the first match.

    Messages are examined in arrival order, each against ``matchers`` in order; the
    first message some matcher accepts is removed and passed to that matcher's
    handler (awaited if it is async). Unmatched messages stay in the mailbox, in
    order. Channel matchers (``match_chan``) are tried when no mailbox message matches.
    Gives ``None`` when nothing matched within ``timeout`` seconds (``0`` polls).

    Raises:
        ValueError: a ``match_chan`` port belongs to another process.
    """
    return current().receive(matchers, timeout)


# ---------------------------------------------------------------------- channels


def new_chan() -> tuple[SendPort[Any], ReceivePort[Any]]:
    """A new typed channel owned by the current process: ``(send_port, receive_port)``."""
    return current().new_chan()


async def send_chan(port: SendPort[T], msg: T) -> None:
    """Send ``msg`` on channel ``port``; same delivery guarantees as :func:`send`."""
    proc = current()
    await proc.guarded(proc.node.send_chan(proc, port, msg, True))


def receive_chan(
    port: ReceivePort[T], timeout: float | None = None
) -> Coroutine[Any, Any, T | None]:
    """The oldest message of ``port`` (owned by the current process); None on timeout.

    Await the result. (A plain function returning the coroutine, as :func:`expect`.)

    Raises:
        ValueError: ``port`` belongs to another process.
    """
    return current().receive_chan(port, timeout)


# ---------------------------------------------------------------------- spawning


async def spawn(node: NodeId, fn: ProcessFn, *args: Any) -> Pid:
    """Start ``fn(*args)`` as a process on ``node``; see :meth:`Node.spawn`.

    Raises:
        SpawnError: the function could not be loaded or started there (the message
            names the function and the node).
        NodeUnreachableError: ``node`` could not be reached.
    """
    proc = current()
    return await proc.guarded(proc.node.spawner.spawn(node, fn, args, None))


def spawn_local(fn: ProcessFn, *args: Any) -> Pid:
    """Start ``fn(*args)`` as a process on this node; returns at once.

    Raises:
        SpawnError: ``fn`` is not async or raised when called.
    """
    return current().node.spawner.spawn_local(fn, args).pid


async def spawn_link(node: NodeId, fn: ProcessFn, *args: Any) -> Pid:
    """:func:`spawn` and :func:`link` atomically (the link exists before ``fn`` runs)."""
    proc = current()
    return await proc.guarded(proc.node.spawner.spawn(node, fn, args, proc.pid))


async def spawn_monitor(node: NodeId, fn: ProcessFn, *args: Any) -> tuple[Pid, MonitorRef]:
    """:func:`spawn` and :func:`monitor` atomically; returns ``(pid, ref)``."""
    proc = current()
    node_obj = proc.node
    # The ref names the process, which has no pid yet: fill it in from the reply.
    ref = node_obj.watches.new_ref(None, proc.pid)
    pid = await proc.guarded(node_obj.spawner.spawn(node, fn, args, ref))
    return pid, MonitorRef(pid, proc.pid, ref.n)


_call_tags = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _CallResult:
    tag: int
    ok: bool
    value: Any


class CallError(Exception):
    """The process started by :func:`call` ended without returning a result."""


async def _call_main(caller: Pid, tag: int, fn: ProcessFn, args: tuple[Any, ...]) -> None:
    try:
        value = await fn(*args)
    except Exception as exc:
        await send(caller, _CallResult(tag, False, exc))
        return
    await send(caller, _CallResult(tag, True, value))


async def call(node: NodeId, fn: ProcessFn, *args: Any) -> Any:
    """Run ``fn(*args)`` in a new process on ``node`` and return its result.

    Raises:
        SpawnError / NodeUnreachableError: as for :func:`spawn`.
        Exception: what ``fn`` raised (re-raised here when it can be pickled).
        CallError: the process died without an answer (killed, disconnected...).
    """
    proc = current()
    tag = next(_call_tags)
    _, ref = await spawn_monitor(node, _call_main, proc.pid, tag, fn, args)
    got = await receive(
        match_if(lambda m: type(m) is _CallResult and m.tag == tag),
        match_if(lambda m: type(m) is ProcessMonitorNotification and m.ref == ref),
    )
    if type(got) is ProcessMonitorNotification:
        raise CallError(f"{fn!r} on node {node} ended without a result: {got.reason!r}")
    await unmonitor(ref)
    if got.ok:
        return got.value
    raise got.value


# ---------------------------------------------------------------------- failure


async def link(pid: Pid) -> None:
    """Link the current process to ``pid`` (unidirectional).

    When ``pid`` ends abnormally (exception, kill, disconnect, node down) the current
    process gets ``ProcessLinkException`` raised at its next awaiting API call. A dead
    or unknown ``pid`` raises it with ``DiedUnknownId`` (at once if local).
    """
    proc = current()
    proc.node.watches.link(proc, pid)
    proc.check_signal()


async def unlink(pid: Pid) -> None:
    """Remove the link to ``pid``; no link exception for it is raised afterwards."""
    proc = current()
    proc.node.watches.unlink(proc, pid)


async def monitor(pid: Pid | SendPort[Any]) -> MonitorRef:
    """Monitor ``pid`` (or a send port's owner); a notification message reports its end.

    The message is a ``ProcessMonitorNotification`` (``PortMonitorNotification`` for a
    port) with the reason; a dead or unknown pid gives ``DiedUnknownId`` at once.
    """
    proc = current()
    return proc.node.watches.monitor(proc, pid)


async def unmonitor(ref: MonitorRef) -> None:
    """Stop monitoring; a notification for ``ref`` already in the mailbox is removed."""
    proc = current()
    proc.node.watches.unmonitor(proc, ref)


async def monitor_node(node: NodeId) -> MonitorRef:
    """Get a ``NodeMonitorNotification`` when ``node`` closes or becomes unreachable."""
    proc = current()
    return await proc.guarded(proc.node.watches.monitor_node(proc, node))


async def link_node(node: NodeId) -> None:
    """Get ``NodeLinkException`` raised when ``node`` closes or becomes unreachable."""
    proc = current()
    await proc.guarded(proc.node.watches.link_node(proc, node))


# ---------------------------------------------------------------------- termination


async def kill(pid: Pid, reason: str) -> None:
    """Kill ``pid``: it cannot catch this and dies with ``DiedException`` naming ``reason``."""
    proc = current()
    proc.node.kill(proc.pid, pid, reason)
    if pid == proc.pid:
        await proc.guarded(asyncio.sleep(0))


async def exit(pid: Pid, reason: Any) -> None:
    """Raise ``ProcessExitException(self_pid(), reason)`` in ``pid`` (it may catch it).

    Raises:
        SerializationError: ``reason`` cannot be pickled (remote ``pid``).
    """
    proc = current()
    proc.node.exit(proc.pid, pid, reason)
    if pid == proc.pid:
        proc.check_signal()


def terminate() -> NoReturn:
    """End the current process (raises ``ProcessTerminationException``)."""
    current()
    raise ProcessTerminationException()


# ---------------------------------------------------------------------- registry


def register(name: str, pid: Pid) -> None:
    """Register ``name`` for ``pid`` on this node; the name is dropped when ``pid`` ends.

    Raises:
        ProcessRegistrationException: the name is taken or ``pid`` is not alive.
    """
    current().node.register(name, pid)


def unregister(name: str) -> None:
    """Remove ``name`` from this node's registry.

    Raises:
        ProcessRegistrationException: ``name`` is not registered.
    """
    current().node.unregister(name)


def whereis(name: str) -> Pid | None:
    """The pid registered as ``name`` on this node, or None."""
    return current().node.whereis(name)


async def nsend(name: str, msg: Any) -> None:
    """Send ``msg`` to the process registered as ``name`` here (dropped if none)."""
    proc = current()
    pid = proc.node.whereis(name)
    if pid is not None:
        await send(pid, msg)


async def whereis_remote(node: NodeId, name: str, timeout: float | None = None) -> Pid | None:
    """``whereis`` on ``node``: None if unknown or no answer within ``timeout``.

    Raises:
        NodeUnreachableError: ``node`` could not be reached.
    """
    proc = current()
    return await proc.guarded(proc.node.registry.whereis_remote(node, name, timeout))


async def nsend_remote(node: NodeId, name: str, msg: Any) -> None:
    """Send ``msg`` to the process registered as ``name`` on ``node`` (dropped if none).

    Raises:
        SerializationError: ``msg`` cannot be pickled (another ``node``).
    """
    current().node.nsend_remote(node, name, msg)


async def register_remote(node: NodeId, name: str, pid: Pid, *, replace: bool = False) -> None:
    """Register ``name`` for ``pid`` on ``node`` and wait until it took effect.

    Raises:
        ProcessRegistrationException: the name is taken there (and not ``replace``).
        NodeUnreachableError: ``node`` could not be reached.
    """
    proc = current()
    await proc.guarded(proc.node.registry.register_remote(node, name, pid, replace))


# ---------------------------------------------------------------------- misc


def say(text: str) -> None:
    """Log ``text`` (with timestamp, node and pid) through this node's logger process."""
    proc = current()
    proc.node.say(proc, str(text))


async def redirect_logs(node: NodeId) -> None:
    """Make ``node``'s ``say`` output go to this node's logger from now on."""
    proc = current()
    mine = proc.node.whereis(LOGGER_NAME)
    if mine is None:
        raise RuntimeError("this node has no logger process")
    await register_remote(node, LOGGER_NAME, mine, replace=True)


async def reconnect(pid: Pid) -> None:
    """Accept that messages to ``pid`` may have been lost, and send to it again.

    After a connection loss, sends from the current process to ``pid`` are dropped
    until this is called; the next send opens a new connection.
    """
    proc = current()
    proc.node.remote.reconnect(proc, pid)


async def get_process_info(pid: Pid) -> ProcessInfo | None:
    """A snapshot of ``pid`` (on any node), or None if it is not alive."""
    proc = current()
    return await proc.guarded(proc.node.get_process_info(pid))


async def get_node_stats(node: NodeId) -> NodeStats:
    """A snapshot of ``node``'s counters (processes, names, links, monitors)."""
    proc = current()
    return await proc.guarded(proc.node.get_node_stats(node))
