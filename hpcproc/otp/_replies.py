"""The private reply channels of otp's request/reply code.

A reply to an otp request (:func:`~hpcproc.otp.call`, :func:`~hpcproc.otp.start`,
:func:`~hpcproc.otp.map`) travels on a channel owned by the requesting process, never
in its mailbox: a reply that comes after the request timed out lands in that channel
and is dropped by the next request on it, so the mailbox (what ``hp.receive`` sees)
never holds a private reply. ``start`` and ``map`` use :func:`reply_channel` (one
channel per task, made on first use); ``call`` uses a :class:`CallSlot` (a channel
that one call at a time uses, found through a context variable with no look-up
frame, see :func:`call_slot`). A channel is closed once its task or slot is garbage,
so that a process whose many short tasks call servers does not keep one per task.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from contextvars import ContextVar
from typing import Any, TypeAlias

import hpcproc as hp

from .._process import Process, current

__all__ = [
    "SLOT",
    "CallSlot",
    "Reply",
    "call_slot",
    "drop_stale",
    "new_tag",
    "reply_channel",
    "tags",
]

_channels: weakref.WeakKeyDictionary[
    asyncio.Task[Any], tuple[hp.SendPort[Any], hp.ReceivePort[Any]]
] = weakref.WeakKeyDictionary()
_tags = itertools.count(1)
#: The tag counter itself, for hot paths that call ``next(tags)`` without a frame.
tags = _tags


#: An answer on a reply channel: ``(tag, ok, value)``; ``tag`` names the request,
#: ``ok`` True carries the reply, False ``(reason, remote traceback)`` as ``value``
#: (other values of ``ok`` are notices, such as the call watch's). A plain tuple, so
#: that a local send shares it instead of copying it (see ``hpcproc._copying``).
Reply: TypeAlias = tuple[int, Any, Any]


def _close(owner: weakref.ref[Process], port_id: int) -> None:
    proc = owner()
    if proc is not None and proc._ports is not None:
        proc._ports.pop(port_id, None)


def _close_when_gone(holder: object, proc: Process, port: hp.ReceivePort[Any]) -> None:
    """Close ``port`` (of ``proc``) once ``holder`` is garbage. (Holds neither: a
    finished process or task is freed as before.)"""
    weakref.finalize(holder, _close, weakref.ref(proc), port.send_port.port_id)


def new_tag() -> int:
    """A tag unique in this OS process (with the replying port it names one request)."""
    return next(_tags)


def reply_channel() -> tuple[hp.SendPort[Any], hp.ReceivePort[Any]]:
    """The current process's reply channel (created on first use).

    Raises:
        NotInProcessError: not called inside a process.
    """
    proc = current()  # raises NotInProcessError outside a process
    task = asyncio.current_task()
    assert task is not None
    chan = _channels.get(task)
    if chan is None:
        chan = _channels[task] = hp.new_chan()
        if task is not proc:  # the process's own channel ends with it
            _close_when_gone(task, proc, chan[1])
    return chan


async def drop_stale(port: hp.ReceivePort[Any]) -> None:
    """Drop every reply queued on ``port`` (late answers to abandoned requests)."""
    while await hp.receive_chan(port, timeout=0) is not None:
        pass


class CallSlot:
    """A reply channel that one call at a time uses (see :func:`call_slot`).

    ``busy`` is True while a call waits on it; ``pid`` is the pid object of the
    process that owns the channel; ``wire`` names the channel in a request as plain
    values, ``(node address bytes, pid number, port number)``: a tuple of those
    pickles without a class reference (a Pid or a SendPort costs the pickler a
    global look-up and the unpickler a Python call).
    """

    __slots__ = ("__weakref__", "busy", "matcher", "pid", "port", "send_port", "wire")

    def __init__(self, pid: hp.Pid) -> None:
        self.pid = pid
        self.send_port, self.port = hp.new_chan()
        _close_when_gone(self, current(), self.port)
        self.wire = (bytes(pid.node.address), pid.lid, self.send_port.port_id)
        #: ``hp.receive(matcher)`` is ``hp.receive_chan(port)`` without making a
        #: matcher per call.
        self.matcher = hp.match_chan(self.port)
        self.busy = False


#: The calling task's slot. A task created later starts with a copy of its creator's
#: context, so it may see its creator's slot (or, in a new process, another process's):
#: :func:`call_slot` takes a slot only if it belongs to the current process and no
#: call is using it, so two calls never share a channel at once.
SLOT: ContextVar[CallSlot] = ContextVar("hpcproc_otp_call_slot")


def call_slot(me: hp.Pid) -> CallSlot:
    """A free reply slot of the current task (``me``: the current process's pid,
    the very object ``hp.self_pid()`` returns); made and remembered when the task's
    own one is missing, another process's, or in use by another call.

    A call marks it busy while it waits, and frees it after; stale answers on it
    (of abandoned calls) are dropped by the next call, by their tags.
    """
    slot = SLOT.get(None)
    if slot is None or slot.pid is not me or slot.busy:
        slot = CallSlot(me)
        SLOT.set(slot)
    return slot
