"""The module-level process API (``hp.send``, ``hp.receive``, ``hp.spawn``...).

Every function here acts on the *current process* (the running task, or the process
a task it created acts for: see :mod:`hpcproc._process`) and raises
:class:`~hpcproc.NotInProcessError` when called outside one. A link firing or an
``exit`` aimed at the process is raised in its own task as ``ProcessLinkException`` /
``NodeLinkException`` / ``ProcessExitException`` at the await it is in (or arrives as
an ``ExitSignal`` message with :func:`trap_exits`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar, get_origin, overload

from ._channels import ChanMessage, ReceivePort, SendPort
from ._copying import copy_message
from ._ids import MonitorRef, NodeId, Pid
from ._info import NodeStats, ProcessInfo
from ._logger import LOGGER_NAME
from ._loops import running_loop
from ._matching import Matcher, identity, match_chan, match_if
from ._process import RUNNING_TASKS, Kill, Process, current
from ._signals import ProcessMonitorNotification, ProcessTerminationException, exit_signal
from ._spawning import fn_name
from .serialization import SerializationError

__all__ = [
    "CallError",
    "RemoteError",
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
    "trap_exits",
    "unlink",
    "unlink_node",
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
    after the connection to ``pid``'s node or to ``pid`` failed every later message to
    ``pid`` is dropped until :func:`reconnect` (the failure fires this process's
    monitors of ``pid`` and its link to it with ``DiedDisconnect``, as a node loss
    does). A local receiver gets a copy of a mutable
    ``msg`` (see :func:`unsafe_send`).

    Raises:
        SerializationError: ``msg`` cannot be pickled (whether ``pid`` is local or
            remote, alive or not).
    """
    tasks = RUNNING_TASKS  # current() written out: a frame less per message
    task = proc = tasks.get(running_loop()) if tasks is not None else None  # type: ignore[arg-type]
    if type(proc) is not Process:
        proc = current()
    node = proc.node
    if pid[0] is proc.pid[0]:  # pid.node; NodeIds are interned
        tp = node.local_process(pid[1])  # pid.lid
        if tp is not None:
            tp.deliver(copy_message(msg))
        else:
            copy_message(msg)  # dropped, but refused if unpicklable, as a remote send is
        return
    frames = None
    if proc.pending_signal is None:
        frames = node.remote.try_send(proc, pid, msg)
        if frames is None:
            return
    if task is not proc and asyncio.current_task() is not proc:
        # Another task acting for the process: no signal handling here (guarded's).
        await node.remote.send(proc, pid, msg, frames)
        return
    # Process.guarded written out: one coroutine less per remote message.
    proc.in_call = True
    try:
        await node.remote.send(proc, pid, msg, frames)
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


@overload
def expect(*, timeout: None = None) -> Coroutine[Any, Any, Any]: ...
@overload
def expect(*, timeout: float) -> Coroutine[Any, Any, Any | None]: ...
@overload
def expect(type_: type[T], timeout: None = None) -> Coroutine[Any, Any, T]: ...
@overload
def expect(type_: type[T], timeout: float) -> Coroutine[Any, Any, T | None]: ...
@overload
def expect(type_: tuple[type, ...], timeout: float | None = None) -> Coroutine[Any, Any, Any]: ...


def expect(
    type_: type | tuple[type, ...] = object, timeout: float | None = None
) -> Coroutine[Any, Any, Any]:
    """Take the oldest message that is an instance of ``type_``; others stay queued.

    Await the result, typed as ``type_`` (``T | None`` with a ``timeout``). Waits up
    to ``timeout`` seconds (forever if None; ``0`` only looks at what is queued) and
    gives ``None`` when nothing matched in time. (A plain function returning the
    coroutine, so that a waiting process holds no extra frame.)
    """
    tasks = RUNNING_TASKS  # current() written out: a frame less per message
    proc = tasks.get(running_loop()) if tasks is not None else None  # type: ignore[arg-type]
    if type(proc) is not Process:
        proc = current()
    return proc.receive((), timeout, type_)


def receive(*matchers: Matcher, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
    """Selective receive: await it for the result of the handler of the first match.

    Messages are examined in arrival order, each against ``matchers`` in order; the
    first message some matcher accepts is removed and passed to that matcher's
    handler (awaited if it is async). Unmatched messages stay in the mailbox, in
    order. Channel matchers (``match_chan``) are tried when no mailbox message matches.
    Gives ``None`` when nothing matched within ``timeout`` seconds (``0`` polls).

    Any task acting for the process may receive (see :mod:`hpcproc._process`); when
    several do at once, each message goes to exactly one of them, none is lost or
    duplicated, and each gets the messages it accepts in arrival order.

    Raises:
        ValueError: a ``match_chan`` port belongs to another process.
    """
    tasks = RUNNING_TASKS  # current() written out: a frame less per message
    proc = tasks.get(running_loop()) if tasks is not None else None  # type: ignore[arg-type]
    if type(proc) is not Process:
        proc = current()
    return proc.receive(matchers, timeout)


# ---------------------------------------------------------------------- channels


@overload
def new_chan() -> tuple[SendPort[Any], ReceivePort[Any]]: ...
@overload
def new_chan(type_: type[T]) -> tuple[SendPort[T], ReceivePort[T]]: ...


def new_chan(type_: type[Any] | None = None) -> tuple[SendPort[Any], ReceivePort[Any]]:
    """A new channel owned by the current process: ``(send_port, receive_port)``.

    With ``type_`` (a class, such as ``int`` or a dataclass), the ports are typed
    ``SendPort[type_]`` / ``ReceivePort[type_]`` for the type checker, and
    :func:`send_chan` refuses, with ``TypeError`` at the sender, a message that is not
    an instance of it (one ``isinstance`` per message). A parameterised type
    (``list[int]``) is checked by its origin (``list``).
    """
    check = type_
    if type_ is not None:
        origin = get_origin(type_)
        if origin is not None:
            check = origin
        elif not isinstance(type_, type):
            raise TypeError(f"new_chan needs a class, such as int, not {type_!r}")
    return current().new_chan(check)


async def send_chan(port: SendPort[T], msg: T) -> None:
    """Send ``msg`` on channel ``port``; same delivery guarantees as :func:`send`.

    Raises:
        TypeError: the channel was made for another type (``new_chan(type_)``).
        SerializationError: ``msg`` cannot be pickled.
    """
    if port.type_ is not None:
        port.check(msg)
    proc = current()
    owner = port.owner
    if owner[0] is proc.pid[0]:
        await proc.guarded(proc.node.send_chan(proc, port, msg, True))
        return
    # A remote channel message that can go out at once does, as send's does.
    remote = proc.node.remote
    chan_msg = ChanMessage(port.port_id, msg)
    frames = None
    if proc.pending_signal is None:
        frames = remote.try_send(proc, owner, chan_msg)
        if frames is None:
            return
    await proc.guarded(remote.send(proc, owner, chan_msg, frames))


@overload
def receive_chan(port: ReceivePort[T], timeout: None = None) -> Coroutine[Any, Any, T]: ...
@overload
def receive_chan(port: ReceivePort[T], timeout: float) -> Coroutine[Any, Any, T | None]: ...


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

    Cancelled once the request has gone, the process may still start (a spawn cannot
    be taken back); the link or monitor of :func:`spawn_link` / :func:`spawn_monitor`
    is then undone, as the reply comes or at once if it came already (a death of the
    new process acted on before that is delivered: an exit signal, or a notification
    with a ref the caller never got).

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


class CallError(Exception):
    """The process started by :func:`call` ended without returning a result."""


class RemoteError(Exception):
    """The remote side of an exception re-raised by :func:`call`.

    Chained as the ``__cause__`` of the re-raised exception (or raised itself when the
    exception could not be pickled); its text names the node and the function and
    carries the remote traceback, as formatted there.
    """

    def __init__(self, text: str, traceback: str) -> None:
        super().__init__(text)
        #: The remote traceback, formatted on the node where ``fn`` ran.
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.args[0]}\n{self.traceback.rstrip()}"


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call_method = getattr(type(fn), "__call__", None)  # noqa: B004 (the class's method)
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call_method)


async def _call_main(
    port: SendPort[tuple[bool, Any, str]], fn: ProcessFn, args: tuple[Any, ...]
) -> None:
    try:
        value = await fn(*args)
    except Exception as exc:
        tb = "".join(traceback.format_exception(exc))
        try:
            await send_chan(port, (False, exc, tb))
        except SerializationError:
            await send_chan(port, (False, None, tb))
        return
    await send_chan(port, (True, value, ""))


async def call(
    node: NodeId,
    fn: Callable[..., Coroutine[Any, Any, T]],
    *args: Any,
    timeout: float | None = None,
) -> T:
    """Run ``fn(*args)`` in a new process on ``node`` and return its result.

    ``fn`` must be an ``async def`` function (or a ``functools.partial`` of one, or an
    object with an ``async def __call__``): anything else is refused with ``TypeError``
    before anything is sent. On a timeout, a cancellation (``asyncio.wait_for``,
    ``asyncio.timeout``, a cancelled task) or a signal raised meanwhile, the call
    stops monitoring the process it started, kills it, and drops its late reply:
    nothing of the call ever reaches the mailbox.

    Raises:
        TypeError: ``fn`` is not async.
        TimeoutError: no result within ``timeout`` seconds.
        SpawnError / NodeUnreachableError: as for :func:`spawn`.
        Exception: what ``fn`` raised, re-raised here with a :class:`RemoteError`
            (the node, and the remote traceback) as its ``__cause__``; the
            :class:`RemoteError` itself when the exception could not be pickled.
        CallError: the process died without an answer (killed, disconnected...).
    """
    if not _is_async(fn):
        raise TypeError(
            f"call needs an async function, and {fn_name(fn)} is not one: define it "
            "with async def (it runs as a process on the node)"
        )
    proc = current()
    send_port, port = proc.new_chan()
    try:
        # Shielded: a call abandoned while its spawn is in flight still learns the
        # pid, to kill the process once it exists.
        spawning = asyncio.ensure_future(spawn_monitor(node, _call_main, send_port, fn, args))
        try:
            pid, ref = await asyncio.shield(spawning)
        except BaseException:
            spawning.add_done_callback(functools.partial(_abandon_spawned, proc))
            raise
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            got = await proc.receive(
                (
                    match_chan(port, identity),
                    match_if(lambda m: type(m) is ProcessMonitorNotification and m.ref == ref),
                ),
                timeout,
            )
            if type(got) is ProcessMonitorNotification and got.reason.normal:
                # It returned, so its reply was sent before it ended, and the notice
                # came after it (their pair connection orders them): it is here.
                left = None if deadline is None else max(deadline - loop.time(), 0.0)
                got = await proc.receive_chan(port, left)
        except BaseException:
            _abandon(proc, pid, ref)
            raise
        if got is None:
            _abandon(proc, pid, ref)
            raise TimeoutError(
                f"call of {fn_name(fn)} on {node} returned no result within {timeout} s "
                "(its process was killed)"
            )
        if type(got) is ProcessMonitorNotification:
            raise CallError(f"{fn_name(fn)} on {node} ended without a result: {got.reason!r}")
        proc.node.remote.post_signal(proc.node.watches.unmonitor(proc, ref))
    finally:
        proc.drop_chan(port)
    ok, value, tb = got
    if ok:
        return value  # type: ignore[no-any-return]
    remote = RemoteError(f"{fn_name(fn)} raised on {node}", tb)
    if value is None:
        raise remote
    raise value from remote


def _abandon(proc: Any, pid: Pid, ref: MonitorRef) -> None:
    """Forget a call that will not be waited for: no notification, no live process."""
    proc.node.remote.post_signal(proc.node.watches.unmonitor(proc, ref))
    proc.node.remote.post_signal(
        proc.node.kill(proc.pid, pid, "call abandoned (timeout or cancellation)")
    )


def _abandon_spawned(proc: Any, spawning: asyncio.Future[tuple[Pid, MonitorRef]]) -> None:
    if not spawning.cancelled() and spawning.exception() is None:
        _abandon(proc, *spawning.result())


# ---------------------------------------------------------------------- failure


async def link(pid: Pid) -> None:
    """Link the current process to ``pid`` (unidirectional).

    When ``pid`` ends abnormally (exception, kill, disconnect, node down) the current
    process gets ``ProcessLinkException`` raised at its next awaiting API call. A dead
    or unknown ``pid`` raises it with ``DiedUnknownId`` (at once if local). The link
    is in place before any message sent to ``pid`` after this call arrives.
    """
    proc = current()
    watches = proc.node.watches
    req = watches.link(proc, pid)
    if req is not None:
        try:
            await _signal(proc, req)
        except BaseException:
            # Interrupted: leave no link the caller does not know of (its request may
            # have gone out: the undoing follows it).
            proc.node.remote.post_signal(watches.unlink(proc, pid))
            raise
    proc.check_signal()


async def unlink(pid: Pid) -> None:
    """Remove the link to ``pid``; no link exception for it is raised afterwards."""
    proc = current()
    req = proc.node.watches.unlink(proc, pid)
    if req is not None:
        await _signal(proc, req)


async def monitor(pid: Pid | SendPort[Any]) -> MonitorRef:
    """Monitor ``pid`` (or a send port's owner); a notification message reports its end.

    The message is a ``ProcessMonitorNotification`` (``PortMonitorNotification`` for a
    port) with the reason; a dead or unknown pid gives ``DiedUnknownId`` at once. The
    monitor is in place before any message sent to ``pid`` after this call arrives,
    and the notification comes after every message ``pid`` sent to this process.

    May wait for the connection to ``pid``'s node to open, as a first ``send`` does.
    """
    proc = current()
    watches = proc.node.watches
    ref, req = watches.monitor(proc, pid)
    if req is not None:
        try:
            await _signal(proc, req)
        except BaseException:
            proc.node.remote.post_signal(watches.unmonitor(proc, ref))  # as in link
            raise
    return ref


async def unmonitor(ref: MonitorRef) -> None:
    """Stop monitoring; a notification for ``ref`` already in the mailbox is removed."""
    proc = current()
    req = proc.node.watches.unmonitor(proc, ref)
    if req is not None:
        await _signal(proc, req)


async def _signal(proc: Process, req: Any) -> None:
    """Send the signal ``req`` to its target's node, in its place among the process's
    messages to the target (``RemoteSender.send_signal``; may wait for a connect)."""
    await proc.guarded(proc.node.remote.send_signal(proc, req.target, req))


async def monitor_node(node: NodeId) -> MonitorRef:
    """Get a ``NodeMonitorNotification`` when ``node`` closes or becomes unreachable."""
    proc = current()
    return await proc.guarded(proc.node.watches.monitor_node(proc, node))


async def link_node(node: NodeId) -> None:
    """Get ``NodeLinkException`` raised when ``node`` closes or becomes unreachable."""
    proc = current()
    await proc.guarded(proc.node.watches.link_node(proc, node))


async def unlink_node(node: NodeId) -> None:
    """Remove the link to ``node``; no ``NodeLinkException`` for it is raised afterwards."""
    proc = current()
    proc.node.watches.unlink_node(proc, node)


def trap_exits(flag: bool) -> bool:
    """Whether the current process receives exit signals as messages; returns the old setting.

    With ``True``, every link signal (a linked process dying abnormally, a linked node
    going away, ``exit(pid, reason)`` from another process) arrives as an ordinary
    message, :class:`~hpcproc.ExitSignal` ``(from_, reason)``, taken with
    ``receive``/``expect`` like any other. With ``False`` (the default) such a signal is
    raised in the process as the link exception (``ProcessLinkException``,
    ``NodeLinkException``, ``ProcessExitException``) at whatever await the process is
    suspended in. A kill is never trapped. A signal already pending when the flag is
    set is turned into a message too.
    """
    proc = current()
    old = proc.trap_exits
    proc.trap_exits = bool(flag)
    sig = proc.pending_signal
    # (Unless its raising has begun: another task of the process may set the flag
    # while the process's own task is already being cancelled to raise it.)
    if flag and sig is not None and not isinstance(sig, Kill) and not proc.signal_thrown:
        proc.pending_signal = None
        proc.deliver(exit_signal(sig))
    return old


# ---------------------------------------------------------------------- termination


async def kill(pid: Pid, reason: str) -> None:
    """Kill ``pid``: it cannot catch this and dies with ``DiedException`` naming ``reason``.

    It reaches ``pid`` after the messages sent to it before, as :func:`exit` does.
    """
    proc = current()
    req = proc.node.kill(proc.pid, pid, reason)
    if req is not None:
        await _signal(proc, req)
    elif pid == proc.pid:
        await proc.guarded(asyncio.sleep(0))


async def exit(pid: Pid, reason: Any) -> None:
    """Raise ``ProcessExitException(self_pid(), reason)`` in ``pid`` (it may catch it).

    The signal reaches ``pid`` after the messages this process sent it before, as in
    Erlang; for a remote ``pid`` this may wait for the connection to its node to open,
    as a first ``send`` does.

    Raises:
        SerializationError: ``reason`` cannot be pickled (remote ``pid``).
    """
    proc = current()
    req = proc.node.exit(proc.pid, pid, reason)
    if req is not None:
        await _signal(proc, req)
    elif pid == proc.pid:
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
    return await proc.guarded(proc.node.introspection.get_process_info(pid))


async def get_node_stats(node: NodeId) -> NodeStats:
    """A snapshot of ``node``'s counters (processes, names, links, monitors)."""
    proc = current()
    return await proc.guarded(proc.node.introspection.get_node_stats(node))
