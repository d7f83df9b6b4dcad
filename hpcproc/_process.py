"""A process: an asyncio task with a mailbox, channels and pending signals.

:class:`Process` *is* the task (a subclass of :class:`asyncio.Task` with ``__slots__``)
so that an idle process costs one task, one coroutine and a few slots; everything
else (mailbox, channels, outgoing connections, watchers, names) is created on first
use.

A process is also a *context*: its first step sets a context variable to it, so that
tasks it creates (``asyncio.create_task``, ``gather``, ``wait_for``, ``TaskGroup``,
a coroutine a thread hands back with ``run_coroutine_threadsafe``) inherit it and act
on its behalf. :func:`current` is one type check when the running task is the process
itself and reads the context variable only otherwise. Several tasks of one process
may receive at once: each message goes to exactly one of them (the first one woken
whose matchers accept it), and each keeps the order guarantees of selective receive.
Tasks that used the process API on its behalf are cancelled when it ends.

Signals (a link firing, ``exit``) are stored on the process. With :attr:`trap_exits`
they become :class:`~hpcproc.ExitSignal` messages. Otherwise they are raised in the
process's own task as exceptions (``ProcessLinkException``, ``NodeLinkException``,
``ProcessExitException``, which the process may catch): a process waiting in
``receive`` / ``expect`` is woken and the call raises; a process in another hpcproc
call (``spawn``, ``whereis_remote``...) gets the call's result and the signal right
after; a process suspended anywhere else (``asyncio.sleep``, a foreign future, a
``gather``) is cancelled there, and the cancellation is replaced by the signal as it
enters the process's coroutine (:class:`_Body`), so the signal is raised at that
await and a ``try``/``except`` around it catches it. A kill always cancels the task
and is never turned into an exception.

What library code between that await and the process sees is the signal, not a
cancellation: clean-up in ``finally`` runs, clean-up only in ``except
CancelledError`` does not. Python 3.11's ``asyncio.wait_for`` is such code: the task
it wraps its awaitable in keeps running if the process catches the signal (3.12's
``wait_for`` has no such task). Inside ``async with asyncio.TaskGroup()``, the group
cancels its tasks and raises the signal in an exception group (``except*``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import sys
import traceback
from collections import deque
from collections.abc import Coroutine, Generator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

from ._channels import ChanMessage, ReceivePort, SendPort
from ._errors import NotInProcessError
from ._ids import MonitorRef, Pid
from ._info import ProcessInfo
from ._loops import running_loop
from ._matching import Matcher, identity
from ._signals import (
    DiedException,
    DiedNodeDown,
    DiedNormal,
    DiedReason,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessMonitorNotification,
    exit_signal,
)

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["Kill", "Process", "current", "new_process"]

_TIMEOUT = object()
T = TypeVar("T")
log = logging.getLogger("hpcproc")
_NOTIFICATIONS = (ProcessMonitorNotification, NodeMonitorNotification, PortMonitorNotification)


class Kill:
    """A pending kill: uncatchable; the process dies with ``DiedException(text)``."""

    __slots__ = ("node_down", "text")

    def __init__(self, text: str, node_down: bool = False) -> None:
        self.text = text
        self.node_down = node_down


def _uncancel(task: asyncio.Task[Any]) -> None:
    # Python >= 3.11 counts cancellation requests; a converted signal must not count.
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def _fire_timeout(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMEOUT)


class Process(asyncio.Task):  # type: ignore[type-arg]
    """A process; created by :class:`~hpcproc.Node`, never directly."""

    __slots__ = (
        "_epoch",
        "_mailbox",
        "_next_port",
        "_ports",
        "_waiter",
        "caller_told",
        "children",
        "conns",
        "in_call",
        "names",
        "node",
        "pending_signal",
        "pid",
        "redeliver_queued",
        "signal_thrown",
        "trap_exits",
        "watchers",
    )

    node: Node
    pid: Pid
    _mailbox: deque[Any] | None
    #: The futures of the tasks waiting in receive: None, one, or a list (in order).
    _waiter: asyncio.Future[Any] | list[asyncio.Future[Any]] | None
    #: Counts messages taken out of the mailbox, so that a waiting receiver notices
    #: that another task of the process took one (its scan position is then stale).
    _epoch: int
    #: True: catchable signals arrive as ExitSignal messages (see trap_exits()).
    trap_exits: bool
    #: True when how it ends is reported to a caller (``Node.run``), so that no
    #: crash report is logged for it.
    caller_told: bool
    #: Tasks other than the process's own that used the API on its behalf; they
    #: are cancelled when it ends.
    children: set[asyncio.Task[Any]] | None
    #: The signal not yet raised or acted on (see :meth:`signal`).
    pending_signal: BaseException | Kill | None
    #: True once :meth:`signal` cancelled the task to raise the pending catchable
    #: signal: it is on its way (:class:`_Body` raises it) and can no longer be
    #: taken back (``trap_exits(True)`` and ``unlink_node`` by another task leave it).
    signal_thrown: bool
    #: True while a :meth:`redeliver` is scheduled (one is enough).
    redeliver_queued: bool
    #: True while the process awaits an hpcproc call other than receive
    #: (:meth:`guarded`).
    in_call: bool
    #: Everyone watching this process (kept by :mod:`._watches`): a MonitorRef
    #: (monitor) or a Link (link) -> None.
    watchers: dict[Any, None] | None
    #: This process's connections to remote processes (kept by :mod:`._remote`):
    #: destination Pid -> Connection, or BROKEN after a connection loss.
    conns: dict[Pid, Any] | None
    _ports: dict[int, ReceivePort[Any]] | None
    _next_port: int
    #: The names registered for this process here (kept by :mod:`._registry`).
    names: list[str] | None

    # ------------------------------------------------------------------ delivery

    def deliver(self, msg: Any) -> None:
        """Append ``msg`` to the mailbox (or its channel) and wake the process; never blocks."""
        if type(msg) is ChanMessage:
            ports = self._ports
            port = ports.get(msg.port_id) if ports is not None else None
            if port is None:
                return
            port._queue.append(msg.payload)
        else:
            mb = self._mailbox
            if mb is None:
                mb = self._mailbox = deque()
            mb.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if type(w) is list:
                for f in w:
                    if not f.done():
                        f.set_result(None)
            elif not w.done():  # type: ignore[union-attr]
                w.set_result(None)  # type: ignore[union-attr]

    def signal(self, sig: BaseException | Kill) -> None:
        """Deliver ``sig`` (a Kill overrides anything; a second catchable one is dropped).

        A kill cancels the task. A catchable signal becomes an ``ExitSignal`` message
        if the process traps exits; otherwise it wakes the process if its own task
        waits in ``receive`` (which raises it), waits until the hpcproc call in
        progress returns (then it is redelivered), is raised by the running process
        at its next ``receive`` or else redelivered at the loop's next round, and
        otherwise cancels the task where it is suspended; :class:`_Body` raises the
        signal there instead of the cancellation.
        """
        if self.done():
            return
        if self.trap_exits and not isinstance(sig, Kill):
            self.deliver(exit_signal(sig))
            return
        old = self.pending_signal
        if old is not None and (isinstance(old, Kill) or not isinstance(sig, Kill)):
            return
        self.pending_signal = sig
        if isinstance(sig, Kill):
            self.cancel()
            return
        w = self._waiter
        if w is not None:
            fw = self._fut_waiter  # type: ignore[attr-defined]
            if fw is w or (type(w) is list and fw in w):
                # The process's own task waits in receive: wake it (it raises).
                if type(w) is list:
                    w.remove(fw)
                else:
                    self._waiter = None
                if not fw.done():
                    fw.set_result(None)
                return
        if self.in_call:
            return  # redelivered when the call returns (guarded)
        if asyncio.current_task() is self:
            # The process itself is running: it handled an event it polled, or an API
            # call acted on it. Receive raises the signal before it sleeps; any other
            # way to suspend meets the redelivery at the loop's next round.
            self.redeliver_soon()
            return
        self.signal_thrown = True
        self.cancel()

    def check_signal(self) -> None:
        """Raise a pending catchable signal now, in the process's own task only."""
        sig = self.pending_signal
        if sig is not None and not isinstance(sig, Kill) and asyncio.current_task() is self:
            self.pending_signal = None
            self.signal_thrown = False
            raise sig

    def convert_cancel(self, exc: asyncio.CancelledError) -> BaseException:
        """The exception to raise for a cancellation seen inside an API call."""
        sig = self.pending_signal
        if sig is None or isinstance(sig, Kill) or asyncio.current_task() is not self:
            return exc
        self.pending_signal = None
        self.signal_thrown = False
        _uncancel(self)
        return sig

    def redeliver(self) -> None:
        """Re-run :meth:`signal` for a signal that arrived during a guarded call, or
        while the process itself was running (unless it is already on its way)."""
        self.redeliver_queued = False
        sig = self.pending_signal
        if sig is not None and not self.signal_thrown and not self.done():
            self.pending_signal = None
            self.signal(sig)

    async def guarded(self, aw: Coroutine[Any, Any, T]) -> T:
        """Await the hpcproc call ``aw`` inside this process.

        A catchable signal arriving meanwhile does not interrupt it: it is redelivered
        once the call returned (see :meth:`signal`). A caller that saves this
        coroutine (``send``) writes it out: set :attr:`in_call`, await the call
        converting ``CancelledError`` with :meth:`convert_cancel`, and finally clear
        :attr:`in_call` and call :meth:`redeliver_soon` if a signal is pending.
        """
        if asyncio.current_task() is not self:
            return await aw  # another task acting for the process: no signal here
        self.in_call = True
        try:
            return await aw
        except asyncio.CancelledError as exc:
            raise self.convert_cancel(exc) from None
        finally:
            self.in_call = False
            if self.pending_signal is not None:
                self.redeliver_soon()

    def redeliver_soon(self) -> None:
        """:meth:`redeliver` at the loop's next round (after a guarded call); once,
        however often it is asked for before then (each redelivery may cancel the
        task, and only one cancellation is taken back when the signal is raised)."""
        if not self.redeliver_queued:
            self.redeliver_queued = True
            self._loop.call_soon(self.redeliver)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ death

    def died_reason(self) -> DiedReason:
        """Why this (ended) process ended, as its watchers are told."""
        if self.cancelled():
            sig = self.pending_signal
            if isinstance(sig, Kill):
                return DiedNodeDown() if sig.node_down else DiedException(sig.text)
            if sig is not None:
                return DiedException(f"{type(sig).__name__}: {sig}")
            return DiedException("cancelled")
        exc = self.exception()
        if exc is None:
            return DiedNormal()
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code in _BODY_CODES:
            tb = tb.tb_next  # the signal's way in (_Body.throw) is no news to the user
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return DiedException(f"{type(exc).__name__}: {exc}", text)

    def body_name(self) -> str:
        """The qualified name of the function this process runs (for reports)."""
        coro = self.get_coro()
        inner = getattr(coro, "_coro", coro)
        code = getattr(inner, "cr_code", None)
        if code is None:
            return repr(inner)
        return str(getattr(code, "co_qualname", code.co_name))

    def release_body(self) -> None:
        """The process has ended: its body lets go of it (see :class:`_Body`)."""
        body = self.get_coro()
        if type(body) is _Body:
            body.proc = None
            body.send = None  # type: ignore[assignment]  # (3.10: the first step's bound method)

    # ------------------------------------------------------------------ mailbox, info

    def info(self) -> ProcessInfo:
        """A snapshot of this process (see :func:`hpcproc.get_process_info`)."""
        watchers = self.watchers or {}
        return ProcessInfo(
            pid=self.pid,
            node=self.pid.node,
            registered_names=tuple(self.names or ()),
            message_queue_length=len(self._mailbox or ()),
            linked_by=tuple(k.watcher for k in watchers if type(k) is not MonitorRef),
            monitored_by=tuple(k for k in watchers if type(k) is MonitorRef),
        )

    def drop_notification(self, ref: MonitorRef) -> None:
        """Remove the monitor notification for ``ref`` from the mailbox, if there."""
        mb = self._mailbox
        if mb:
            for i, msg in enumerate(mb):
                if getattr(msg, "ref", None) == ref and type(msg) in _NOTIFICATIONS:
                    del mb[i]
                    self._epoch += 1
                    break

    # ------------------------------------------------------------------ channels

    def new_chan(
        self, type_: type | tuple[type, ...] | None = None
    ) -> tuple[SendPort[Any], ReceivePort[Any]]:
        """Create a channel owned by this process (for messages of ``type_``, if given)."""
        self._next_port += 1
        send_port: SendPort[Any] = SendPort(self.pid, self._next_port, type_)
        port: ReceivePort[Any] = ReceivePort(self, send_port)
        if self._ports is None:
            self._ports = {}
        self._ports[self._next_port] = port
        return send_port, port

    def drop_chan(self, port: ReceivePort[Any]) -> None:
        """Close ``port``: what is queued and whatever arrives for it later is dropped."""
        if self._ports is not None:
            self._ports.pop(port.send_port.port_id, None)

    async def receive_chan(self, port: ReceivePort[T], timeout: float | None) -> T | None:
        """The oldest message of ``port``; None on timeout; see :func:`hpcproc.receive_chan`.

        Raises:
            ValueError: ``port`` belongs to another process.
        """
        if port._owner is not self:
            raise ValueError(f"{port!r} belongs to another process")
        q = port._queue
        if q and self.pending_signal is None:
            return q.popleft()
        return await self.receive((Matcher(None, None, identity, port),), timeout)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ receive

    async def receive(
        self,
        matchers: Sequence[Matcher],
        timeout: float | None,
        type_: type | tuple[type, ...] | None = None,
    ) -> Any:
        """Selective receive; see :func:`hpcproc.receive`.

        With ``type_`` (and no matchers) it is ``expect``: the oldest message that is
        an instance of ``type_``, returned as is. ``None`` on timeout.
        """
        mb = self._mailbox
        start = 0  # where the scan of the mailbox goes on
        if self.pending_signal is not None:
            self.check_signal()
        elif mb and type_ is not None:
            # Fast path: no future, no suspension.
            if type_ is object:
                self._epoch += 1
                return mb.popleft()
            for i, msg in enumerate(mb):
                if isinstance(msg, type_):
                    del mb[i]
                    self._epoch += 1
                    return msg
            start = len(mb)  # none matches: the wait below scans only what comes
        elif type_ is not None and (timeout is None or timeout > 0):
            # expect with an empty mailbox (a reply awaited): take what the endpoint
            # has first, as the loop below would, without the loop's set-up. The
            # general path below takes over unless the message is for us and first.
            incoming = self.node.incoming
            poll = incoming.receive_nowait
            event = poll() if poll is not None else None
            if event is not None:
                incoming.handle_event(event)
                del event
                if self.pending_signal is not None:
                    # An exit signal the event brought us: signal() left it pending
                    # (we are the running task), and nothing would redeliver it once
                    # we sleep below.
                    self.check_signal()
            # The event's message, or one handed over directly while polling:
            mb = self._mailbox
            if mb and self.pending_signal is None:
                msg = mb[0]
                if type_ is object or isinstance(msg, type_):
                    mb.popleft()
                    self._epoch += 1
                    return msg
        elif mb and len(matchers) == 1 and matchers[0].port is None:
            # Selective receive of one mailbox matcher with messages waiting: the
            # first match without the wait's set-up.
            m = matchers[0]
            for i, msg in enumerate(mb):
                if m.accepts(msg):
                    del mb[i]
                    self._epoch += 1
                    if m.handler is identity:  # no coroutine to await
                        return msg
                    return await _handle(m, msg)
            start = len(mb)  # none matches: the wait below scans only what comes
        for m in matchers:
            if m.port is not None and m.port._owner is not self:
                raise ValueError(f"{m.port!r} belongs to another process")
        loop = self._loop  # type: ignore[attr-defined]
        epoch = self._epoch
        timer: asyncio.TimerHandle | None = None
        fut: asyncio.Future[Any] | None = None
        try:
            while True:
                mb = self._mailbox
                if epoch != self._epoch:
                    # Another task of this process took a message: rescan from the start.
                    start = 0
                if mb is not None and len(mb) > start:
                    i = start
                    if type_ is not None:
                        for msg in islice(mb, start, None):
                            if isinstance(msg, type_):
                                del mb[i]
                                self._epoch += 1
                                return msg
                            i += 1
                    else:
                        for msg in islice(mb, start, None):
                            for m in matchers:
                                if m.port is None and m.accepts(msg):
                                    del mb[i]
                                    self._epoch += 1
                                    if m.handler is identity:  # no coroutine to await
                                        return msg
                                    return await _handle(m, msg)
                            i += 1
                    start = i
                epoch = self._epoch
                for m in matchers:
                    if m.port is not None and m.port._queue:
                        if m.handler is identity:  # receive_chan, match_chan(port)
                            return m.port._queue.popleft()
                        return await _handle(m, m.port._queue.popleft())
                if fut is not None and fut.done() and fut.result() is _TIMEOUT:
                    return None
                if timeout is not None and timeout <= 0:
                    return None
                # Before sleeping, take what the endpoint has (or gets within its
                # polling budget while the loop is idle) ourselves: a reply then
                # costs no trip round the event loop. Handling an event for another
                # process wakes it, and the next poll then declines (loop not idle).
                # (Incoming.poll_inline written out: a frame less per wait.)
                incoming = self.node.incoming
                poll = incoming.receive_nowait
                seen = incoming.direct_deliveries
                event = poll() if poll is not None else None
                if event is not None:
                    incoming.handle_event(event)
                    del event
                    if self.pending_signal is not None:
                        self.check_signal()  # an exit signal the event brought us
                    continue
                if incoming.direct_deliveries != seen:
                    continue  # a message went straight to a process (maybe this one)
                fut = loop.create_future()
                w = self._waiter
                if w is None:
                    self._waiter = fut
                elif type(w) is list:
                    w.append(fut)
                else:
                    self._waiter = [w, fut]  # type: ignore[list-item]
                if timeout is not None and timer is None:
                    timer = loop.call_later(timeout, _fire_timeout, fut)
                elif timer is not None:
                    # Re-arm on the new future with the remaining time.
                    remaining = timer.when() - loop.time()
                    timer.cancel()
                    timer = loop.call_later(max(remaining, 0.0), _fire_timeout, fut)
                try:
                    await fut
                except asyncio.CancelledError as exc:
                    raise self.convert_cancel(exc) from None
                if self.pending_signal is not None:
                    self.check_signal()
        finally:
            if timer is not None:
                timer.cancel()
            if fut is not None:
                w = self._waiter
                if w is fut:
                    self._waiter = None
                elif type(w) is list and fut in w:
                    w.remove(fut)
                    if not w:
                        self._waiter = None


def new_process(
    coro: Coroutine[Any, Any, Any], node: Node, pid: Pid, loop: asyncio.AbstractEventLoop
) -> Process:
    """Create (and schedule) the process running ``coro``.

    A factory rather than ``__init__``: the C ``Task.__init__`` runs directly, and
    the slots are filled here, which makes spawning measurably cheaper.
    """
    body = _new_body(_Body)  # type: ignore[type-abstract]  # (no __init__ frame)
    body._coro = coro
    body.pid = pid
    if _TASK_CONTEXT:
        # The process's context made here, already holding its body: no Python frame
        # at the first step, and the body never refers to itself (see _Body).
        context = _copy_context()
        context.run(_CURRENT.set, body)
        body.send = coro.send  # type: ignore[method-assign]
        proc = Process(body, loop=loop, context=context)  # type: ignore[call-arg]
    else:
        body.send = body._first_send  # type: ignore[method-assign]
        proc = Process(body, loop=loop)
    body.proc = proc
    proc.node = node
    proc.pid = pid
    proc._mailbox = None
    proc._waiter = None
    proc._epoch = 0
    proc.trap_exits = False
    proc.children = None
    proc.caller_told = False
    proc.pending_signal = None
    proc.signal_thrown = False
    proc.redeliver_queued = False
    proc.in_call = False
    proc.watchers = None
    proc.conns = None
    proc._ports = None
    proc._next_port = 0
    proc.names = None
    return proc


#: Whether ``asyncio.Task`` takes a ``context`` (Python 3.11+).
_TASK_CONTEXT = sys.version_info >= (3, 11)
_copy_context = contextvars.copy_context

#: The body of the process the running task acts for (its ``proc`` None once that
#: process has ended), where that task is not the process itself.
_CURRENT: contextvars.ContextVar[_Body] = contextvars.ContextVar("hpcproc_process")


class _Body(Coroutine[Any, Any, Any]):
    """The coroutine of a process task: the process function's coroutine, wrapped.

    It passes every step through, except that a cancellation thrown in while the
    process has a catchable signal pending (see :meth:`Process.signal`) is replaced
    by that signal: the throw travels down to the await where the process is
    suspended and is raised there, so a ``try``/``except`` around any await (an
    ``asyncio.sleep``, a foreign future) catches the link exception. (The C task
    throws a cancellation into the *outermost* coroutine, which delegates the throw
    to the innermost: this is the only place where it can be swapped.)

    ``send`` is a slot, not a method: it holds the wrapped coroutine's own C ``send``
    (on Python 3.10, from the second step: the first enters the process's context,
    see :func:`current`), so that the task's every step costs no Python frame here.

    The process's context holds the body (:data:`_CURRENT`), and the body the process
    until it ends (:meth:`Process.release_body`): no reference cycle outlives the
    process, so an ended process is freed at once, not by the cyclic garbage collector
    (whose passes over thousands of ended processes halved the spawn rate).
    """

    __slots__ = ("_coro", "pid", "proc", "send")

    _coro: Coroutine[Any, Any, Any]
    pid: Pid
    proc: Process | None

    def _first_send(self, value: Any) -> Any:
        # (Python 3.10, whose tasks take no context: the first step enters it.)
        _CURRENT.set(self)
        self.send = send = self._coro.send  # type: ignore[method-assign]
        return send(value)

    def throw(self, exc: Any, *rest: Any) -> Any:  # type: ignore[override]
        proc = self.proc
        assert proc is not None
        if not _TASK_CONTEXT:
            _CURRENT.set(self)  # in case this is the first step (3.10)
        if type(exc) is asyncio.CancelledError:
            sig = proc.pending_signal
            if sig is not None and not isinstance(sig, Kill):
                proc.pending_signal = None
                proc.signal_thrown = False
                _uncancel(proc)
                return self._coro.throw(sig)
        return self._coro.throw(exc, *rest)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()

    def __repr__(self) -> str:
        return repr(self._coro)


_BODY_CODES = (_Body.throw.__code__,)
_new_body = object.__new__


async def _handle(m: Matcher, msg: Any) -> Any:
    result = m.handler(msg)
    if inspect.isawaitable(result):
        result = await result
    return result


#: Python 3.11's ``asyncio.current_task`` is a Python function around this dictionary
#: lookup (3.12 has it in C): reading the dictionary directly saves a Python frame on
#: every ``send`` and ``receive``. None where not applicable.
_CURRENT_TASKS: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = (
    getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
)
#: :func:`current`'s fast path for the hottest callers (``send``, ``expect``) to write
#: out, a frame less each: ``RUNNING_TASKS.get(running_loop())`` is the running task
#: (a :class:`Process` in the common case). None where not applicable (3.12+).
RUNNING_TASKS = _CURRENT_TASKS


def current() -> Process:
    """The running process: the running task, or the process it acts for.

    Raises:
        NotInProcessError: called outside a process.
    """
    tasks = _CURRENT_TASKS
    if tasks is not None:
        task = tasks.get(running_loop())  # type: ignore[arg-type]
    else:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
    if type(task) is Process:
        return task
    return _acting_for(task)


def _acting_for(task: asyncio.Task[Any] | None) -> Process:
    """The process a task that is not itself a process acts for (see :func:`current`)."""
    if task is not None:
        body = _CURRENT.get(None)
        if body is not None:
            proc = body.proc
            if proc is None or proc.done():
                raise NotInProcessError(f"this task acts for process {body.pid}, which has ended")
            children = proc.children
            if children is None:
                children = proc.children = set()
            if task not in children:
                children.add(task)
                task.add_done_callback(children.discard)
            return proc
    raise NotInProcessError(
        "this hpcproc function must be called inside a process (a function started "
        "with spawn, spawn_local or Node.run, or a task it created), not from plain "
        "code, another thread or an unrelated asyncio task"
    )
