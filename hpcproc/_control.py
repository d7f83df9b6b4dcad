"""The node-controller protocol: messages between the controllers of two nodes.

Each pair of nodes that talk uses one lightweight connection per direction for these
messages (separate from the per-process-pair connections that carry user messages).
Every message is a frozen dataclass pickled whole. Requests that expect an answer
carry a ``req`` number that the :class:`Reply` repeats; the sender's node is the
connection's remote address, so it is never sent.

Wire framing of the first message on any process-layer connection (see
:func:`bind_frame`): one byte saying what the connection carries (``C`` controller,
``P`` a process pair), then for ``P`` the destination and source local ids.

Signals between two processes (:data:`PAIR_SIGNALS`: link, unlink, monitor, unmonitor,
exit, kill, and the death notice a process's end sends its watchers) travel on their
pair connection when it is open, so that they keep their place among the pair's
messages, as Erlang orders the signals of a pair of processes. Such a message is the
control message's frames with the byte :data:`SIGNAL` put before the first: no user
message starts with it (a pickle starts with ``0x80``, the compact format with its
``MAGIC``), and the message stays one frame, which transports send at once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, TypeVar

from ._ids import MonitorRef, Pid
from ._signals import DiedReason
from .serialization import deserialize, serialize
from .transports.base import Buffer

__all__ = [
    "CONTROL",
    "PAIR_SIGNALS",
    "PROCESS",
    "SIGNAL",
    "Deliver",
    "Died",
    "Exit",
    "GetInfo",
    "GetStats",
    "KillReq",
    "LinkReq",
    "MonitorReq",
    "NSend",
    "NodeDown",
    "NodeWatch",
    "Register",
    "Reply",
    "SpawnReq",
    "UnlinkReq",
    "UnmonitorReq",
    "WhereIs",
    "bind_frame",
    "is_signal",
    "load_signal",
    "parse_bind",
    "signal_frames",
]

CONTROL = 0x43  # "C"
PROCESS = 0x50  # "P"
_PAIR = struct.Struct("!BQQ")
#: The first byte of a control message on a process-pair connection (before its
#: header; see the module docstring).
SIGNAL = b"\x00"


def bind_frame(dest_lid: int | None = None, src_lid: int = 0) -> bytes:
    """The frame that opens a connection: controller traffic, or process src -> dest."""
    if dest_lid is None:
        return bytes([CONTROL])
    return _PAIR.pack(PROCESS, dest_lid, src_lid)


def parse_bind(frame: memoryview) -> tuple[int, int, int]:
    """``(kind, dest_lid, src_lid)`` from a bind frame.

    Raises:
        ValueError: the frame is not a bind frame of this protocol.
    """
    if len(frame) == 1 and frame[0] == CONTROL:
        return CONTROL, 0, 0
    if len(frame) == _PAIR.size and frame[0] == PROCESS:
        return _PAIR.unpack(frame)  # type: ignore[return-value]
    raise ValueError("malformed bind frame")


_Message = TypeVar("_Message")


def _message(cls: type[_Message]) -> type[_Message]:
    """A control message: a frozen dataclass that pickles as ``cls(*fields)``.

    The ``__getstate__`` / ``__setstate__`` that dataclasses generate for slotted
    classes walk ``fields()`` in Python on every pickle and unpickle; one
    ``attrgetter`` (C) of every field does the same work at a fraction of the cost.
    """
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    if len(names) > 1:
        values = attrgetter(*names)  # returns the tuple of values

        def __reduce__(self: Any) -> tuple[Any, ...]:
            return (cls, values(self))

    else:  # attrgetter of one name returns the bare value

        def __reduce__(self: Any) -> tuple[Any, ...]:
            return (cls, tuple(getattr(self, name) for name in names))

    cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]
    return cls


@_message
@dataclass(frozen=True, slots=True)
class SpawnReq:
    """Start ``fn(*args)`` (both pickled) and reply with its Pid or an error text.

    ``watcher`` is linked (``link``) or monitors with ``ref`` before the process runs.
    """

    req: int
    fn_name: str
    fn_blob: bytes
    args_blob: bytes
    watcher: Pid | None = None
    link: bool = False
    ref: MonitorRef | None = None


@_message
@dataclass(frozen=True, slots=True)
class Reply:
    """Answer to request ``req``: ``value`` when ``ok``, else an error text."""

    req: int
    ok: bool
    value: Any


@_message
@dataclass(frozen=True, slots=True)
class LinkReq:
    watcher: Pid
    target: Pid


@_message
@dataclass(frozen=True, slots=True)
class UnlinkReq:
    watcher: Pid
    target: Pid


@_message
@dataclass(frozen=True, slots=True)
class MonitorReq:
    ref: MonitorRef
    target: Pid


@_message
@dataclass(frozen=True, slots=True)
class UnmonitorReq:
    ref: MonitorRef
    target: Pid


@_message
@dataclass(frozen=True, slots=True)
class NodeWatch:
    """The sender watches this node: tell it ``NodeDown`` when closing (acknowledged)."""

    req: int


@_message
@dataclass(frozen=True, slots=True)
class NodeDown:
    """The sending node is closing; its processes have already been reported dead."""


@_message
@dataclass(frozen=True, slots=True)
class Died:
    """``target`` ended with ``reason``; for ``watcher``'s link (ref None) or monitor."""

    target: Pid
    reason: DiedReason
    watcher: Pid
    ref: MonitorRef | None


@_message
@dataclass(frozen=True, slots=True)
class KillReq:
    """Kill ``target`` (uncatchable); ``text`` becomes its ``DiedException`` reason."""

    target: Pid
    text: str


@_message
@dataclass(frozen=True, slots=True)
class Exit:
    """Raise ``ProcessExitException(sender, reason)`` in ``target``."""

    target: Pid
    sender: Pid | None
    reason: Any


@_message
@dataclass(frozen=True, slots=True)
class NSend:
    name: str
    msg: Any


@_message
@dataclass(frozen=True, slots=True)
class Deliver:
    """Put ``msg`` in ``target``'s mailbox (controller-routed, e.g. logs and replies)."""

    target: Pid
    msg: Any


@_message
@dataclass(frozen=True, slots=True)
class WhereIs:
    req: int
    name: str


@_message
@dataclass(frozen=True, slots=True)
class Register:
    req: int
    name: str
    pid: Pid | None
    replace: bool


@_message
@dataclass(frozen=True, slots=True)
class GetInfo:
    req: int
    pid: Pid


@_message
@dataclass(frozen=True, slots=True)
class GetStats:
    req: int


def signal_frames(msg: Any) -> list[Buffer]:
    """The frames of control message ``msg`` on a process-pair connection.

    Raises:
        SerializationError: ``msg`` cannot be pickled.
    """
    frames = serialize(msg)
    frames[0] = SIGNAL + bytes(frames[0])
    return frames


def is_signal(frames: Sequence[Buffer]) -> bool:
    """Whether the message ``frames`` of a process-pair connection is a signal."""
    return len(frames) > 0 and memoryview(frames[0])[:1] == SIGNAL


def load_signal(frames: Sequence[Buffer]) -> Any:
    """The control message of the signal ``frames`` (see :func:`is_signal`).

    Raises:
        SerializationError: the frames are not a valid message.
    """
    return deserialize([memoryview(frames[0])[1:], *frames[1:]])


#: The control messages a process-pair connection may carry (after :data:`SIGNAL`):
#: the signals of one process to another, ordered with the pair's messages.
PAIR_SIGNALS: frozenset[type] = frozenset(
    {LinkReq, UnlinkReq, MonitorReq, UnmonitorReq, KillReq, Exit, Died}
)
