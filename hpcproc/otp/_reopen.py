"""OTP requests and replies reopen a pair connection that a connection loss broke.

The process layer drops every later message of a process pair whose connection failed,
until the sender calls ``hp.reconnect``: a receiver sees a prefix of what one sender
sent. An OTP call, cast, stop or reply is a transaction of its own instead: a caller
learns of the loss from its monitor of the server (``ServerDown``), and a later request
must reach the server once the nodes talk again, as in Erlang, not be dropped for good
(calls would time out forever, and replies never arrive).
"""

from __future__ import annotations

from .._ids import Pid
from .._process import Process, current
from .._remote import BROKEN

__all__ = ["reopen_if_broken"]


def reopen_if_broken(pid: Pid, proc: Process | None = None) -> None:
    """Forget ``proc``'s (default: the running process's) connection to ``pid`` if a
    loss broke it, so that the next send opens a new one; otherwise do nothing."""
    if proc is None:
        proc = current()
    conns = proc.conns
    if conns is not None and conns.get(pid) is BROKEN:
        proc.node.remote.reconnect(proc, pid)
