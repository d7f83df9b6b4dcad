"""A process: an asyncio task with a mailbox, channels and pending signals.

:class:`Process` *is* the task (a subclass of :class:`asyncio.Task` with ``__slots__``)
so that an idle process costs one task, one coroutine and a few slots; everything
else (mailbox, channels, outgoing connections, watchers, names) is created on first
use. The module-level API finds the current process with
:func:`asyncio.current_task`.

Signals (a link firing, ``exit``) are stored on the process and raised as exceptions
(``ProcessLinkException``, ``ProcessExitException``, which the process may catch)
from its hpcproc calls: a process waiting in ``receive`` / ``expect`` is woken and
the call raises; a process in another hpcproc call (``spawn``, ``whereis_remote``...)
gets the call's result and the signal right after; a process suspended anywhere else
(a plain ``asyncio.sleep``) is cancelled there and ends with the signal as its
reason. A kill always cancels the task and is never turned into an exception.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections import deque
from collections.abc import Coroutine, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

from ._channels import ChanMessage, ReceivePort, SendPort
from ._errors import NotInProcessError
from ._ids import MonitorRef, Pid
from ._info import ProcessInfo
from ._matching import Matcher
from ._signals import (
    DiedException,
    DiedNodeDown,
    DiedNormal,
    DiedReason,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessMonitorNotification,
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
        "_mailbox",
        "_next_port",
        "_ports",
        "_waiter",
        "conns",
        "in_call",
        "names",
        "node",
        "pending_signal",
        "pid",
        "watchers",
    )

    node: Node
    pid: Pid
    _mailbox: deque[Any] | None
    _waiter: asyncio.Future[Any] | None
    #: The signal not yet raised or acted on (see :meth:`signal`).
    pending_signal: BaseException | Kill | None
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
            if not w.done():
                w.set_result(None)

    def signal(self, sig: BaseException | Kill) -> None:
        """Deliver ``sig`` (a Kill overrides anything; a second catchable one is dropped).

        A kill cancels the task. A catchable signal wakes the process if it waits in
        ``receive`` (which raises it), waits until the hpcproc call in progress
        returns (then it is redelivered), is left for the running process to pick up
        at its next hpcproc call, and otherwise cancels the task where it is
        suspended (ending it with the signal as its reason).
        """
        if self.done():
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
            self._waiter = None
            if not w.done():
                w.set_result(None)
            return
        if self.in_call or asyncio.current_task() is self:
            return
        self.cancel()

    def check_signal(self) -> None:
        """Raise a pending catchable signal now (called by the awaiting API calls)."""
        sig = self.pending_signal
        if sig is not None and not isinstance(sig, Kill):
            self.pending_signal = None
            raise sig

    def convert_cancel(self, exc: asyncio.CancelledError) -> BaseException:
        """The exception to raise for a cancellation seen inside an API call."""
        sig = self.pending_signal
        if sig is None or isinstance(sig, Kill):
            return exc
        self.pending_signal = None
        _uncancel(self)
        return sig

    def redeliver(self) -> None:
        """Re-run :meth:`signal` for a signal that arrived during a guarded call."""
        sig = self.pending_signal
        if sig is not None and not self.done():
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
        """:meth:`redeliver` at the loop's next round (after a guarded call)."""
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
        log.debug("process %r died: %r", self.pid, exc)
        return DiedException(f"{type(exc).__name__}: {exc}")

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
                    break

    # ------------------------------------------------------------------ channels

    def new_chan(self) -> tuple[SendPort[Any], ReceivePort[Any]]:
        """Create a channel owned by this process."""
        self._next_port += 1
        send_port: SendPort[Any] = SendPort(self.pid, self._next_port)
        port: ReceivePort[Any] = ReceivePort(self, send_port)
        if self._ports is None:
            self._ports = {}
        self._ports[self._next_port] = port
        return send_port, port

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
        return await self.receive((Matcher(None, None, _identity, port),), timeout)  # type: ignore[no-any-return]

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
        if self.pending_signal is not None:
            self.check_signal()
        elif mb and type_ is not None:
            # Fast path: no future, no suspension.
            if type_ is object:
                return mb.popleft()
            for i, msg in enumerate(mb):
                if isinstance(msg, type_):
                    del mb[i]
                    return msg
        for m in matchers:
            if m.port is not None and m.port._owner is not self:
                raise ValueError(f"{m.port!r} belongs to another process")
        loop = self._loop  # type: ignore[attr-defined]
        start = 0
        timer: asyncio.TimerHandle | None = None
        fut: asyncio.Future[Any] | None = None
        try:
            while True:
                mb = self._mailbox
                if mb is not None and len(mb) > start:
                    i = start
                    if type_ is not None:
                        for msg in islice(mb, start, None):
                            if isinstance(msg, type_):
                                del mb[i]
                                return msg
                            i += 1
                    else:
                        for msg in islice(mb, start, None):
                            for m in matchers:
                                if m.port is None and m.accepts(msg):
                                    del mb[i]
                                    return await _handle(m, msg)
                            i += 1
                    start = i
                for m in matchers:
                    if m.port is not None and m.port._queue:
                        return await _handle(m, m.port._queue.popleft())
                if fut is not None and fut.done() and fut.result() is _TIMEOUT:
                    return None
                if timeout is not None and timeout <= 0:
                    return None
                # Before sleeping, take what the endpoint has (or gets within its
                # polling budget while the loop is idle) ourselves: a reply then
                # costs no trip round the event loop. Handling an event for another
                # process wakes it, and the next poll then declines (loop not idle).
                if self.node.poll_inline():
                    if self.pending_signal is not None:
                        self.check_signal()  # an exit signal the event brought us
                    continue
                fut = loop.create_future()
                self._waiter = fut
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
            if fut is not None and self._waiter is fut:
                self._waiter = None


def new_process(
    coro: Coroutine[Any, Any, Any], node: Node, pid: Pid, loop: asyncio.AbstractEventLoop
) -> Process:
    """Create (and schedule) the process running ``coro``.

    A factory rather than ``__init__``: the C ``Task.__init__`` runs directly, and
    the slots are filled here, which makes spawning measurably cheaper.
    """
    proc = Process(coro, loop=loop)
    proc.node = node
    proc.pid = pid
    proc._mailbox = None
    proc._waiter = None
    proc.pending_signal = None
    proc.in_call = False
    proc.watchers = None
    proc.conns = None
    proc._ports = None
    proc._next_port = 0
    proc.names = None
    return proc


def _identity(msg: Any) -> Any:
    return msg


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
_get_running_loop = asyncio._get_running_loop


def current() -> Process:
    """The running process.

    Raises:
        NotInProcessError: called outside a process.
    """
    tasks = _CURRENT_TASKS
    if tasks is not None:
        task = tasks.get(_get_running_loop())  # type: ignore[arg-type]
    else:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
    if type(task) is not Process:
        raise NotInProcessError(
            "this hpcproc function must be called inside a process (a function started "
            "with spawn, spawn_local or Node.run), not from plain code or a plain "
            "asyncio task"
        )
    return task
