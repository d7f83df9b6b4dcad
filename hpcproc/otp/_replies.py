"""The private reply channel of the current process, shared by otp's request/reply code.

A reply to an otp request (:func:`~hpcproc.otp.call`, :func:`~hpcproc.otp.start`,
:func:`~hpcproc.otp.map`) travels on a typed channel owned by the requesting process,
never in its mailbox: a reply that comes after the request timed out lands in that
channel and is dropped by the next request, so the mailbox (what ``hp.receive``
sees) never holds a private reply. One channel per process, made on first use.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any, TypeAlias

import hpcproc as hp

__all__ = ["Reply", "drop_stale", "new_tag", "reply_channel"]

_channels: weakref.WeakKeyDictionary[
    asyncio.Task[Any], tuple[hp.SendPort[Any], hp.ReceivePort[Any]]
] = weakref.WeakKeyDictionary()
_tags = itertools.count(1)


#: An answer on a reply channel: ``(tag, ok, value)``; ``tag`` names the request,
#: ``ok`` False carries ``(reason, remote traceback)`` as ``value``. A plain tuple, so
#: that a local send shares it instead of copying it (see ``hpcproc._copying``).
Reply: TypeAlias = tuple[int, bool, Any]


def new_tag() -> int:
    """A tag unique in this OS process (with the replying port it names one request)."""
    return next(_tags)


def reply_channel() -> tuple[hp.SendPort[Any], hp.ReceivePort[Any]]:
    """The current process's reply channel (created on first use).

    Raises:
        NotInProcessError: not called inside a process.
    """
    hp.self_pid()  # raises NotInProcessError outside a process
    task = asyncio.current_task()
    assert task is not None
    chan = _channels.get(task)
    if chan is None:
        chan = _channels[task] = hp.new_chan()
    return chan


async def drop_stale(port: hp.ReceivePort[Any]) -> None:
    """Drop every reply queued on ``port`` (late answers to abandoned requests)."""
    while await hp.receive_chan(port, timeout=0) is not None:
        pass
