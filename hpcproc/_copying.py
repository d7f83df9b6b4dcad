"""Copy semantics of local ``send``: the receiver never shares a mutable object.

Messages made only of immutable values (numbers, strings, bytes, identities, and tuples
or frozensets of those) are passed as they are, because no one can observe the
difference; everything else is copied through the representation a remote send uses
(the compact format for plain data where its compiled part was built, else pickle), so a
message behaves alike whether its receiver is local or not.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from . import serialization
from ._channels import SendPort
from ._ids import MonitorRef, NodeId, Pid
from ._signals import (
    DiedDisconnect,
    DiedException,
    DiedNodeDown,
    DiedNormal,
    DiedUnknownId,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessMonitorNotification,
)
from .serialization import SerializationError

__all__ = ["copy_message", "is_immutable"]

_ATOMS: frozenset[type] = frozenset(
    {
        int,
        float,
        complex,
        bool,
        str,
        bytes,
        type(None),
        range,
        Pid,
        NodeId,
        MonitorRef,
        SendPort,
        DiedNormal,
        DiedException,
        DiedDisconnect,
        DiedNodeDown,
        DiedUnknownId,
        ProcessMonitorNotification,
        NodeMonitorNotification,
        PortMonitorNotification,
    }
)


def is_immutable(msg: Any) -> bool:
    """True when ``msg`` is built only from immutable values (so sharing it is safe)."""
    t = type(msg)
    if t in _ATOMS:
        return True
    if t is tuple or t is frozenset:
        return all(is_immutable(x) for x in msg)
    return False


def copy_message(msg: Any) -> Any:
    """Return ``msg`` itself if immutable, else a deep copy made as a remote send would
    serialize it (compact format or pickle).

    Raises:
        SerializationError: ``msg`` cannot be pickled, so it could not be sent to
            another node either (the same error a remote send raises).
    """
    if is_immutable(msg):
        return msg
    compact = serialization._compact_compiled if serialization.COMPACT else None
    if compact is not None:
        # Plain data (a dict, a list of numbers, a small array...) through the compact
        # format: a third to a fifth of pickle's cost. What it does not take (shared
        # lists or dicts, whose sharing the copy must keep, objects, arrays of
        # OUT_OF_BAND_MIN bytes or more...) goes by pickle below.
        data = compact.encode(msg)
        if data is not None:
            return compact.decode(data)
    try:
        data = pickle.dumps(msg, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        try:
            data = cloudpickle.dumps(msg, protocol=5)
        except Exception as exc2:
            raise SerializationError(f"cannot serialize {type(msg).__name__}: {exc2}") from exc
    return pickle.loads(data)
