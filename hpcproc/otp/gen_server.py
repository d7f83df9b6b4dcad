"""GenServer: a process that serves calls, casts and other messages one at a time.

Subclass :class:`GenServer`, start it with :func:`start`, talk to it with :func:`call`
(request/reply), :func:`cast` (one way) and :func:`stop`. The server handles one
message at a time, in arrival order, so its state needs no lock.

The call protocol: every call has its own tag; the caller sends the request with a
private reply port of its task (see ``_replies``: one per task, so that several tasks
of one process may call at once) and waits on that port for the answer with its tag:
the reply, a down notice or a time-out notice. Both notices come from its node's call
watch (``_call_watch``), which monitors every server called from the node, once per
server, tells each caller waiting for one that died, and times out the calls whose
deadline passed (a call arms no timer of its own). So a server that dies, or whose
node is lost, raises :class:`ServerDown` in every caller at once (no timeout
involved); a call that times out raises :class:`CallTimeout`, and its reply or notice,
should one come later, lands on the private channel and is dropped by the next
request: nothing is ever left in the caller's mailbox. The request and the server's
loop are written for speed (plain tuples, no class reference to pickle in the
request, one type test per message in the server): a call costs about what a plain
``send`` + ``expect`` round trip costs, plus a few microseconds.
"""

from __future__ import annotations

import inspect
import time
import traceback
from math import inf
from operator import itemgetter
from time import monotonic
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeAlias

import hpcproc as hp

from .._process import current
from .._remote import BROKEN
from ._at_once import kill_at_once, unmonitor_at_once
from ._call_watch import BY_NODE, TIMED_OUT, WATCH_ENDED, waiting_for, wake
from ._reopen import reopen_if_broken
from ._replies import SLOT, CallSlot, Reply, call_slot, drop_stale, new_tag, reply_channel, tags

__all__ = [
    "NOREPLY",
    "CallTimeout",
    "Caller",
    "GenServer",
    "ServerDown",
    "ServerRef",
    "ServerStopped",
    "StartError",
    "call",
    "cast",
    "reply",
    "start",
    "stop",
]

#: A server: its pid, a name registered on the caller's node, or ``(name, node)``.
ServerRef: TypeAlias = hp.Pid | str | tuple[str, hp.NodeId]


class ServerDown(Exception):
    """The server ended (or its node was lost) before answering.

    ``reason`` is the server's :class:`~hpcproc.DiedReason` (or a text when the server
    could not be found); ``remote_traceback`` is the server's traceback when the call
    itself crashed it (an exception in ``handle_call``).
    """

    def __init__(self, reason: Any, remote_traceback: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"server down: {self.reason}"
        if self.remote_traceback:
            text += f"\n--- remote traceback ---\n{self.remote_traceback}"
        return text


class CallTimeout(Exception):
    """No reply within the call's timeout (the server may still handle the request;
    its reply, if any, is dropped)."""


class StartError(Exception):
    """The server could not be started: ``init`` raised (``remote_traceback`` says
    where), the name was taken, or the process died during ``init``."""

    def __init__(self, reason: Any, remote_traceback: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"server did not start: {self.reason}"
        if self.remote_traceback:
            text += f"\n--- remote traceback ---\n{self.remote_traceback}"
        return text


class ServerStopped(Exception):
    """Raised in a server stopped with a reason other than ``"normal"``, so that it
    ends abnormally (its monitors and links see ``DiedException`` naming the reason)."""


class _CallCrashed(Exception):
    """The server's end when ``handle_call`` raised: its text is the reason and the
    traceback, so that every monitor's ``DiedException`` carries both."""

    def __init__(self, reason: str, remote_traceback: str) -> None:
        super().__init__(reason, remote_traceback)
        self.reason = reason
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.reason}\n{_TB_MARK}{self.remote_traceback}"


#: Where the traceback starts in a ``_CallCrashed`` reason.
_TB_MARK = "--- remote traceback ---\n"


class _NoReply:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOREPLY"

    def __reduce__(self) -> str:
        return "NOREPLY"


#: Return it from ``handle_call`` to answer later with :func:`reply`.
NOREPLY: Any = _NoReply()


class Caller(tuple):  # type: ignore[type-arg]
    """Who made a call: pass it to :func:`reply` to answer (once) from anywhere.

    Immutable and picklable; ``pid`` is the calling process, ``port`` and ``tag``
    name the call's reply. (A tuple underneath, so that the server makes one per
    call with a single C call.)
    """

    __slots__ = ()

    def __new__(cls, pid: hp.Pid, port: hp.SendPort[Any], tag: int) -> Caller:
        return tuple.__new__(cls, (pid, port, tag))

    if TYPE_CHECKING:

        @property
        def pid(self) -> hp.Pid:
            """The calling process."""

        @property
        def port(self) -> hp.SendPort[Any]:
            """Where the reply goes."""

        @property
        def tag(self) -> int:
            """The call's tag on ``port``."""

    else:
        pid = property(itemgetter(0), doc="The calling process.")
        port = property(itemgetter(1), doc="Where the reply goes.")
        tag = property(itemgetter(2), doc="The call's tag on ``port``.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Caller, (self[0], self[1], self[2]))

    def __repr__(self) -> str:
        return f"Caller(pid={self[0]!r}, port={self[1]!r}, tag={self[2]!r})"


# The protocol's messages are plain tuples tagged like Erlang's ('$gen_call', ...):
# a local send shares a tuple of immutable values instead of copying it through pickle.
# (_CALL, (caller's node address, pid number, port number), tag, request): the reply
# port as plain values, which pickle without a class reference (a Pid or SendPort costs
# a global look-up to pickle and a Python call to unpickle, about as much as the rest
# of the message); the server keeps the Pid and SendPort it made for each (see _serve).
_CALL = "$hpcproc.otp.call"
_CAST = "$hpcproc.otp.cast"  # (_CAST, msg)
_STOP = "$hpcproc.otp.stop"  # (_STOP, reason)


class GenServer:
    """Base class of a server; override the handlers you need (all may be async).

    The server object is created on the server's node (``cls()``, so it needs no
    constructor arguments; the arguments of :func:`start` go to :meth:`init`).
    An exception in any handler ends the server abnormally, after :meth:`terminate`
    ran (the caller of a crashing ``handle_call`` gets :class:`ServerDown` with the
    traceback); so do links firing (``ProcessLinkException``, without ``terminate``).
    An ``hp.exit`` aimed at the server runs :meth:`terminate` with the exit reason and
    ends it (normally for ``"normal"``), which is how a supervisor's timed shutdown
    works.
    """

    async def init(self, *args: Any) -> None:
        """Set up the state from :func:`start`'s arguments; raising fails the start."""

    async def handle_call(self, request: Any, caller: Caller) -> Any:
        """Answer ``request``: the return value is the reply, or :data:`NOREPLY` to
        answer later with :func:`reply` (``caller`` may be passed on to anyone)."""
        raise NotImplementedError(f"{type(self).__name__} has no handle_call for {request!r}")

    async def handle_cast(self, msg: Any) -> None:
        """Handle a :func:`cast` message; ignored by default."""

    async def handle_info(self, msg: Any) -> None:
        """Handle any other message: monitor notifications (``ProcessMonitorNotification``,
        ``NodeMonitorNotification``), plain ``hp.send`` messages, and, when ``init``
        called ``hp.trap_exits(True)``, exit signals as :class:`hpcproc.ExitSignal`;
        ignored by default."""

    async def terminate(self, reason: Any) -> None:
        """Clean up before the server ends (stop, exit signal, or a handler's crash)."""


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def _server_main(
    cls: type[GenServer],
    args: tuple[Any, ...],
    name: str | None,
    starter: hp.SendPort[Any],
    tag: int,
    link_to: hp.Pid | None,
) -> None:
    """The server process: link, register, init, acknowledge, then serve."""
    try:
        if link_to is not None:
            await hp.link(link_to)
        if name is not None:
            hp.register(name, hp.self_pid())
        server = cls()
        await _maybe_await(server.init(*args))
    except Exception as exc:
        await hp.send_chan(starter, (tag, False, (_describe(exc), traceback.format_exc())))
        raise
    await hp.send_chan(starter, (tag, True, None))
    await _serve(server)


#: How many callers' reply ports a server keeps (it forgets them all when full).
_PORTS_KEPT = 1024


def _reply_port(wire: tuple[bytes, int, int]) -> tuple[hp.Pid, hp.SendPort[Any]]:
    address, lid, port_id = wire
    pid = hp.Pid(hp.NodeId(address), lid)
    return pid, hp.SendPort(pid, port_id)


async def _serve(server: GenServer) -> None:
    expect, send_chan, new_caller = hp.expect, hp.send_chan, tuple.__new__
    proc = current()
    ports: dict[tuple[bytes, int, int], tuple[hp.Pid, hp.SendPort[Any]]] = {}
    try:
        while True:
            msg = await expect()
            if type(msg) is tuple and len(msg) == 4 and msg[0] == _CALL:
                got = ports.get(msg[1])
                if got is None:
                    if len(ports) >= _PORTS_KEPT:
                        ports.clear()
                    got = ports[msg[1]] = _reply_port(msg[1])
                pid, port = got
                conns = proc.conns
                if conns is not None and conns.get(pid) is BROKEN:
                    reopen_if_broken(pid, proc)  # a reply is a transaction of its own
                tag = msg[2]
                caller = new_caller(Caller, (pid, port, tag))
                try:
                    value = server.handle_call(msg[3], caller)
                    if type(value) is CoroutineType or inspect.isawaitable(value):
                        value = await value
                except _SIGNALS:
                    raise
                except Exception as exc:
                    detail = (_describe(exc), traceback.format_exc())
                    await send_chan(port, (tag, False, detail))
                    await _maybe_await(server.terminate(detail[0]))
                    raise _CallCrashed(*detail) from exc
                if value is not NOREPLY:
                    await send_chan(port, (tag, True, value))
                continue
            kind = msg[0] if type(msg) is tuple and len(msg) == 2 else None
            if kind == _CAST:
                await _crash_terminates(server, server.handle_cast(msg[1]))
            elif kind == _STOP:
                await _maybe_await(server.terminate(msg[1]))
                if msg[1] != "normal":
                    raise ServerStopped(msg[1])
                return
            else:
                await _crash_terminates(server, server.handle_info(msg))
    except hp.ProcessExitException as exc:
        await _maybe_await(server.terminate(exc.reason))
        if exc.reason != "normal":
            raise


#: Signals raised in a server, which end it as signals (an exit runs ``terminate``,
#: links firing do not), never as a crash of the handler that was running.
_SIGNALS = (hp.ProcessExitException, hp.ProcessLinkException, hp.NodeLinkException)


async def _crash_terminates(server: GenServer, result: Any) -> None:
    try:
        await _maybe_await(result)
    except _SIGNALS:
        raise
    except Exception as exc:
        await _maybe_await(server.terminate(_describe(exc)))
        raise


def _is_down(ref: hp.MonitorRef) -> Any:
    return lambda m: type(m) is hp.ProcessMonitorNotification and m.ref == ref


async def _await_start(
    pid: hp.Pid,
    mref: hp.MonitorRef,
    port: hp.ReceivePort[Any],
    tag: int,
    timeout: float | None,
) -> Reply:
    """The start acknowledgement with ``tag``; raises ServerDown (the new server's
    monitor fired) or CallTimeout.

    Removes the monitor, except after a successful start (then the server's end,
    should it have come already, is back in the mailbox); stale replies met on the
    way are dropped.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    down = hp.match_if(_is_down(mref))
    chan = hp.match_chan(port)
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        got = await hp.receive(down, chan, timeout=left)
        if got is None:
            await hp.unmonitor(mref)
            raise CallTimeout(f"no reply from {pid!r} within {timeout} s")
        if type(got) is hp.ProcessMonitorNotification:
            # The server may have answered (a crash report) just before dying.
            while (late := await hp.receive_chan(port, timeout=0)) is not None:
                if late[0] == tag:
                    if late[1]:
                        # Started, then ended at once: the caller keeps the monitor
                        # and must see the end (not copied: it is immutable).
                        await hp.unsafe_send(hp.self_pid(), got)
                    return late  # type: ignore[no-any-return]
            raise ServerDown(got.reason)
        if got[0] == tag:
            if not got[1]:
                await hp.unmonitor(mref)
            return got  # type: ignore[no-any-return]


async def _resolve(server: Any, timeout: float | None) -> hp.Pid:
    if isinstance(server, hp.Pid):
        return server
    if isinstance(server, str):
        pid = hp.whereis(server)
        if pid is None:
            raise ServerDown(f"no process registered as {server!r} on this node")
        return pid
    if isinstance(server, tuple) and len(server) == 2 and isinstance(server[1], hp.NodeId):
        name, node = server
        try:
            found = await hp.whereis_remote(node, name, timeout=timeout)
        except hp.NodeUnreachableError as exc:
            raise ServerDown(f"node {node} unreachable: {exc}") from None
        if found is None:
            raise ServerDown(f"no process registered as {name!r} on {node}")
        return found
    raise TypeError(f"a server is a Pid, a registered name or (name, NodeId), not {server!r}")


async def start(
    cls: type[GenServer],
    *args: Any,
    node: hp.NodeId | None = None,
    name: str | None = None,
    link: bool = False,
    timeout: float | None = 30.0,
) -> hp.Pid:
    """Start ``cls`` as a server on ``node`` (default: this node) and wait for its ``init``.

    ``name`` registers the server on its node (``call(name)`` there, ``(name, node)``
    anywhere). ``link``: the caller and the server are linked both ways once ``init``
    succeeded (the server dies when the caller dies abnormally and vice versa).

    Raises:
        StartError: ``init`` raised (with the remote traceback), the name is taken,
            the server died or ``timeout`` passed before ``init`` returned.
        SpawnError / NodeUnreachableError: as :func:`hpcproc.spawn`.
    """
    pid, mref = await start_monitored(
        cls, args, node=node, name=name, link_to=None, link=link, timeout=timeout
    )
    await hp.unmonitor(mref)
    return pid


async def start_monitored(
    cls: type[GenServer],
    args: tuple[Any, ...],
    *,
    node: hp.NodeId | None,
    name: str | None,
    link_to: hp.Pid | None,
    link: bool,
    timeout: float | None,
) -> tuple[hp.Pid, hp.MonitorRef]:
    """:func:`start`, returning the monitor the server was started with too, so that
    the caller learns how it ends however soon after ``init`` that is (a monitor set
    afterwards reports a server that has ended already as ``DiedUnknownId``, its
    reason lost); with ``link_to``, the server links to that process (one way) first.
    Used by supervisors: a child dies with its supervisor (``link_to``), the
    supervisor only monitors the child.

    If the wait for ``init`` is interrupted (an exit signal, a cancellation), the
    half-started server is killed: nobody would know of it, or be linked to it.
    """
    if not (isinstance(cls, type) and issubclass(cls, GenServer)):
        raise TypeError(f"start needs a GenServer subclass, not {cls!r}")
    me = hp.self_pid()
    send_port, port = reply_channel()
    await drop_stale(port)
    tag = new_tag()
    back = me if link else link_to
    if node is None or node == me.node:
        pid = hp.spawn_local(_server_main, cls, args, name, send_port, tag, back)
        mref = await hp.monitor(pid)  # before the new process first runs
    else:
        pid, mref = await hp.spawn_monitor(
            node, _server_main, cls, args, name, send_port, tag, back
        )
    try:
        got = await _await_start(pid, mref, port, tag, timeout)
    except ServerDown as exc:
        raise StartError(exc.reason) from None
    except CallTimeout:
        await hp.kill(pid, "start timed out")
        raise StartError(f"init did not return within {timeout} s") from None
    except BaseException:
        # Without suspending, so that a second cancellation cannot stop them half-way.
        kill_at_once(pid, "its start was interrupted")
        unmonitor_at_once(mref)
        raise
    if not got[1]:
        reason, tb = got[2]
        raise StartError(reason, tb)
    if link:
        await hp.link(pid)
    return pid, mref


async def call(server: Any, request: Any, timeout: float | None = 5.0) -> Any:
    """Send ``request`` to ``server`` and return its reply (``handle_call``'s value).

    May block up to ``timeout`` seconds (None: until the reply or the server's end).

    Raises:
        ServerDown: the server is not there, died (``reason``), its node was lost,
            the request could not go (the caller's connection to it could not be
            opened or failed: ``DiedDisconnect``), or ``handle_call`` raised
            (``remote_traceback`` is the server's traceback). Raised as soon as the
            server's monitor reports it, not after ``timeout``.
        CallTimeout: no reply within ``timeout``; nothing of this call stays in the
            caller's mailbox, and a late reply is dropped.
        ValueError: the server is the calling process itself.
    """
    pid = server if type(server) is hp.Pid else await _resolve(server, timeout)
    proc = current()
    me = proc.pid
    if pid == me:
        raise ValueError("a server cannot call itself (it would wait for its own reply)")
    slot = SLOT.get(None)
    if slot is None or slot.pid is not me or slot.busy:
        slot = call_slot(me)
    port, send_port = slot.port, slot.send_port
    tag = next(tags)
    slot.busy = True
    try:
        state = BY_NODE.get(me[0])
        waiting = state.servers.get(pid) if state is not None else None
        if state is None or waiting is None:
            state, waiting = await waiting_for(pid)
        # The node's call watch times the call out (no timer of its own).
        deadline = inf if timeout is None else monotonic() + timeout
        waiting[tag] = (send_port, deadline)
        try:
            if deadline < state.wake_at:
                await wake(state)
            conns = proc.conns
            if conns is not None and conns.get(pid) is BROKEN:
                reopen_if_broken(pid, proc)  # a call is a transaction of its own
            await hp.send(pid, (_CALL, slot.wire, tag, request))
            conns = proc.conns
            if conns is not None and conns.get(pid) is BROKEN:
                # The request did not go: the pair connection could not be opened, or
                # broke under it (the server's node may stay up, so no watch reports
                # it). No answer will come: as Erlang's call exits with noconnection.
                raise ServerDown(hp.DiedDisconnect())
            got = await hp.receive(slot.matcher)
            if got[0] != tag or got[1] is WATCH_ENDED:
                got = await _other_reply(pid, slot, tag, got, deadline)
        finally:
            waiting.pop(tag, None)
    finally:
        slot.busy = False
    ok = got[1]
    if ok is True:
        return got[2]
    return await _failed(pid, port, tag, got, timeout)


async def _other_reply(pid: hp.Pid, slot: CallSlot, tag: int, got: Reply, deadline: float) -> Reply:
    """The answer with ``tag`` after ``got``, the first thing taken from the slot's
    port, was not it: a stale answer of an abandoned call (dropped) or the notice
    that the call watch ended (the call registers with a new watch, whose monitor
    reports the server's end if it has ended meanwhile, with the same deadline; the
    call leaves it again however it ends)."""
    waiting: dict[int, Any] | None = None
    try:
        while True:
            if got[0] == tag:
                if got[1] is not WATCH_ENDED:
                    return got
                state, waiting = await waiting_for(pid)
                waiting[tag] = (slot.send_port, deadline)
                if deadline < state.wake_at:
                    await wake(state)
            # Anything else is a late reply or notice of an abandoned call: dropped
            # here, so the channel never holds more than what came since the last call.
            got = await hp.receive_chan(slot.port)
    finally:
        if waiting is not None:
            waiting.pop(tag, None)


async def _failed(
    pid: hp.Pid, port: hp.ReceivePort[Any], tag: int, got: Reply, timeout: float | None
) -> Any:
    """Raise what the answer ``got`` (not a reply) stands for: :class:`CallTimeout`
    or :class:`ServerDown`; or return the reply, when the server's end overtook it
    and it is here already."""
    if got[1] is TIMED_OUT:
        raise CallTimeout(f"no reply from {pid!r} within {timeout} s")
    if got[1] is None:  # the call watch: the server is down
        reason = got[2]
        # It may have answered (a reply, or a crash report) just before it ended. The
        # node acts on a death after the dead process's last messages to it, so such
        # an answer comes before this notice; one that came after it all the same (a
        # transport reordering connections, which the contract allows) is taken here.
        while (late := await hp.receive_chan(port, timeout=0)) is not None:
            if late[0] == tag:
                if late[1] is True:
                    return late[2]
                if late[1] is False:
                    raise ServerDown(*late[2])
        text = getattr(reason, "reason", "")
        if isinstance(text, str) and _TB_MARK in text:  # a handle_call crash
            head, tb = text.split(_TB_MARK, 1)
            raise ServerDown(head.removeprefix("_CallCrashed: ").rstrip("\n"), tb)
        raise ServerDown(reason)
    raise ServerDown(*got[2])


async def cast(server: Any, msg: Any) -> None:
    """Send ``msg`` to ``server``'s ``handle_cast``; returns at once, dropped silently
    if the server is gone (as Erlang's ``gen_server:cast``)."""
    try:
        pid = await _resolve(server, 5.0)
    except ServerDown:
        return
    reopen_if_broken(pid)
    await hp.send(pid, (_CAST, msg))


async def reply(caller: Caller, value: Any) -> None:
    """Answer a call later (after ``handle_call`` returned :data:`NOREPLY`); once per call."""
    reopen_if_broken(caller.port.owner)
    await hp.send_chan(caller.port, (caller.tag, True, value))


async def stop(server: Any, reason: Any = "normal", timeout: float | None = 5.0) -> None:
    """Stop ``server``: its ``terminate(reason)`` runs, then it ends; returns once it
    has ended (abnormally, naming ``reason``, unless ``reason`` is ``"normal"``).

    Raises:
        ServerDown: the server was not running.
        CallTimeout: it did not end within ``timeout`` (it is left running).
    """
    pid = await _resolve(server, timeout)
    mref = await hp.monitor(pid)
    reopen_if_broken(pid)
    await hp.send(pid, (_STOP, reason))
    got = await hp.receive(hp.match_if(_is_down(mref)), timeout=timeout)
    if got is None:
        await hp.unmonitor(mref)
        raise CallTimeout(f"{pid!r} did not stop within {timeout} s")
    if isinstance(got.reason, hp.DiedUnknownId):
        raise ServerDown(got.reason)
