"""Why processes die, and how the processes watching them are told.

A death has a :class:`DiedReason`. Monitors turn it into a notification *message*
(:class:`ProcessMonitorNotification`, :class:`NodeMonitorNotification`,
:class:`PortMonitorNotification`); links turn an abnormal one into an *exception*
raised in the linking process (:class:`ProcessLinkException`,
:class:`NodeLinkException`). :class:`ProcessExitException` is what ``exit`` raises in
its target, which may catch it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._ids import MonitorRef, NodeId, Pid

__all__ = [
    "DiedDisconnect",
    "DiedException",
    "DiedNodeDown",
    "DiedNormal",
    "DiedReason",
    "DiedUnknownId",
    "ExitSignal",
    "NodeLinkException",
    "NodeMonitorNotification",
    "PortMonitorNotification",
    "ProcessExitException",
    "ProcessLinkException",
    "ProcessMonitorNotification",
    "ProcessTerminationException",
    "exit_signal",
]


class DiedReason:
    """Base class of the reasons a process (or a node, as seen by a watcher) ended."""

    __slots__ = ()

    @property
    def normal(self) -> bool:
        """True only for :class:`DiedNormal`; links fire for every other reason."""
        return False


@dataclass(frozen=True, slots=True)
class DiedNormal(DiedReason):
    """The process function returned."""

    @property
    def normal(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class DiedException(DiedReason):
    """The process raised, was killed, or did not catch an exit; ``reason`` says which.

    ``traceback`` is the traceback of the exception that ended it, formatted on its
    node ("" for a kill); it is not part of equality, so a reason compares equal to
    ``DiedException("ValueError: ...")``.
    """

    reason: str
    traceback: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DiedDisconnect(DiedReason):
    """Communication with the process's node was lost (or never established).

    A lost connection counts as failure: the process may still be running, but no
    message between the two nodes is guaranteed any more.
    """


@dataclass(frozen=True, slots=True)
class DiedNodeDown(DiedReason):
    """The process's node shut down (it announced its close to its watchers)."""


@dataclass(frozen=True, slots=True)
class DiedUnknownId(DiedReason):
    """The pid named no live process when the link or monitor was set up."""


@dataclass(frozen=True, slots=True)
class ProcessMonitorNotification:
    """Message sent to a monitoring process when the monitored process ends."""

    ref: MonitorRef
    pid: Pid
    reason: DiedReason


@dataclass(frozen=True, slots=True)
class NodeMonitorNotification:
    """Message sent to a process monitoring a node when that node goes away."""

    ref: MonitorRef
    node: NodeId
    reason: DiedReason


@dataclass(frozen=True, slots=True)
class PortMonitorNotification:
    """Message sent to a process monitoring a ``SendPort`` when its owner ends."""

    ref: MonitorRef
    port: Any
    reason: DiedReason


class ProcessLinkException(Exception):
    """Raised in a process linked to ``pid`` when ``pid`` ends abnormally."""

    def __init__(self, pid: Pid, reason: DiedReason) -> None:
        super().__init__(pid, reason)
        self.pid = pid
        self.reason = reason

    def __str__(self) -> str:
        return f"linked process {self.pid!r} died: {self.reason!r}"


class NodeLinkException(Exception):
    """Raised in a process linked to ``node`` when that node goes away."""

    def __init__(self, node: NodeId, reason: DiedReason) -> None:
        super().__init__(node, reason)
        self.node = node
        self.reason = reason

    def __str__(self) -> str:
        return f"linked node {self.node} went away: {self.reason!r}"


class ProcessExitException(Exception):
    """Raised in a process by ``exit(pid, reason)``; catch it to survive.

    Uncaught, the process ends with ``DiedException`` naming ``reason``.
    """

    def __init__(self, sender: Pid | None, reason: Any) -> None:
        super().__init__(sender, reason)
        self.sender = sender
        self.reason = reason

    def __str__(self) -> str:
        return f"exit from {self.sender!r}: {self.reason!r}"


@dataclass(frozen=True, slots=True)
class ExitSignal:
    """An exit signal received as a message by a process that traps exits.

    ``from_`` is the linked process that died (``ProcessLinkException``), the linked
    node that went away (``NodeLinkException``) or the process that called ``exit``
    (``ProcessExitException``; None if sent by the node itself); ``reason`` is the
    :class:`DiedReason` of the death, or the reason given to ``exit``.
    """

    from_: Pid | NodeId | None
    reason: Any


def exit_signal(sig: BaseException) -> ExitSignal:
    """The message a trapping process gets instead of the catchable signal ``sig``."""
    if isinstance(sig, ProcessLinkException):
        return ExitSignal(sig.pid, sig.reason)
    if isinstance(sig, NodeLinkException):
        return ExitSignal(sig.node, sig.reason)
    if isinstance(sig, ProcessExitException):
        return ExitSignal(sig.sender, sig.reason)
    return ExitSignal(None, sig)


class ProcessTerminationException(Exception):
    """Raised by ``terminate()``; ends the current process with ``DiedException``."""

    def __str__(self) -> str:
        return "terminated"
