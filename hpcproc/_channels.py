"""Typed channels: a ``SendPort`` anyone may send on, a ``ReceivePort`` only its owner reads.

A channel belongs to the process that created it (``new_chan``). Messages on one
channel from one sender arrive in order; each channel has its own queue, separate from
the process's mailbox. A ``SendPort`` is immutable and picklable, so it can travel in a
message (which is how replies are usually routed). Messages sent on a port whose owner
has ended are dropped, like messages to a dead process.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._ids import Pid

if TYPE_CHECKING:
    from ._process import Process

__all__ = ["ChanMessage", "ReceivePort", "SendPort"]

T = TypeVar("T")


class SendPort(Generic[T]):
    """The sending end of a channel: the owner's pid and the channel's number.

    ``type_`` is the class (or tuple of classes) the channel was made for with
    ``new_chan(type_)``; ``send_chan`` checks each message against it with
    ``isinstance`` (None: no check).
    """

    __slots__ = ("_hash", "owner", "port_id", "type_")

    owner: Pid
    port_id: int
    type_: type | tuple[type, ...] | None
    _hash: int

    def __init__(
        self, owner: Pid, port_id: int, type_: type | tuple[type, ...] | None = None
    ) -> None:
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "port_id", port_id)
        object.__setattr__(self, "type_", type_)
        object.__setattr__(self, "_hash", hash((owner, port_id)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SendPort is immutable")

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is SendPort and other.port_id == self.port_id and other.owner == self.owner
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # (Called by pickle directly: one Python call less than ``__reduce__``.)
        if self.type_ is None:
            return (SendPort, (self.owner, self.port_id))
        return (SendPort, (self.owner, self.port_id, self.type_))

    def check(self, msg: Any) -> None:
        """Raise ``TypeError`` if ``msg`` is not of this channel's type."""
        t = self.type_
        if t is not None and not isinstance(msg, t):
            names = " or ".join(c.__name__ for c in (t if isinstance(t, tuple) else (t,)))
            raise TypeError(f"a channel of {names} cannot carry {type(msg).__name__} {msg!r:.80}")

    def __repr__(self) -> str:
        return f"SendPort({self.owner!r}, {self.port_id})"


class ReceivePort(Generic[T]):
    """The receiving end of a channel; usable only inside the process that created it."""

    __slots__ = ("_owner", "_queue", "send_port")

    def __init__(self, owner: Process, send_port: SendPort[T]) -> None:
        self._owner = owner
        self._queue: deque[T] = deque()
        self.send_port = send_port

    def __repr__(self) -> str:
        return f"ReceivePort({self.send_port.owner!r}, {self.send_port.port_id})"


class ChanMessage:
    """Envelope of a message sent on a channel (routed to the port, not the mailbox)."""

    __slots__ = ("payload", "port_id")

    def __init__(self, port_id: int, payload: Any) -> None:
        self.port_id = port_id
        self.payload = payload

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (ChanMessage, (self.port_id, self.payload))
