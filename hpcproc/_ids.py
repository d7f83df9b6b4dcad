"""Identities: :class:`NodeId`, :class:`Pid` and :class:`MonitorRef`.

All three are immutable, hashable and picklable, so they travel in messages and are
never copied by a local ``send``.
"""

from __future__ import annotations

import copyreg
import hashlib
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ._pickle_codes import compiled_helper
from .transports.base import EndPointAddress

__all__ = ["MonitorRef", "NodeId", "Pid", "label_node"]


class NodeId:
    """Identifies a node by the address of its transport endpoint.

    ``NodeId(address_bytes)`` rebuilds a node's id from its endpoint address, so a
    launcher can name every rank after a rendezvous of addresses. Two ids are equal
    when their addresses are. Ids are interned (one object per address in a Python
    process, unpickled ones included), so equal ids are the same object: equality and
    hashing are by identity, done in C (a pid's hash and every "is this pid local?"
    test use them). The table grows with the number of distinct nodes ever seen,
    which is the size of the cluster.

    It prints short: ``str(nid)`` is its label, ``rank3`` under ``hpcproc.run``
    (:func:`label_node`, the same on every rank) or else ``n`` and four hex digits of
    a hash of its address (the same in every Python process, so that a message
    formatted on another node names nodes as this one does); :meth:`full` gives the
    address, as ``repr`` does.
    """

    __slots__ = ("_key", "_label", "address")

    address: EndPointAddress
    _label: str | None
    #: The address as plain bytes (what pickles carry; an EndPointAddress would not
    #: pickle without a class reference).
    _key: bytes

    def __new__(cls, address: bytes) -> NodeId:
        key = bytes(address)
        nid = _interned.get(key)
        if nid is None:
            nid = object.__new__(cls)
            object.__setattr__(nid, "address", EndPointAddress(key))
            object.__setattr__(nid, "_key", key)
            object.__setattr__(nid, "_label", None)
            _interned[key] = nid
        return nid

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("NodeId is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (NodeId, (self._key,))

    def __repr__(self) -> str:
        return f"NodeId({bytes(self.address)!r})"

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """The short name this node prints as (see the class docstring)."""
        label = self._label
        if label is None:
            label = "n" + hashlib.blake2b(self._key, digest_size=2).hexdigest()
            object.__setattr__(self, "_label", label)
        return label

    def full(self) -> str:
        """The node's full address: ``nid://tcp://10.0.0.3:4242/...``."""
        return f"nid://{bytes(self.address).decode('utf-8', 'backslashreplace')}"


_interned: dict[bytes, NodeId] = {}


def label_node(nid: NodeId, label: str) -> None:
    """Make ``nid`` print as ``label`` in this Python process (``hpcproc.run``: rank)."""
    object.__setattr__(nid, "_label", label)


class Pid(tuple):  # type: ignore[type-arg]
    """Identifies a process: the node it runs on and a number unique on that node.

    Prints short, as ``<node label.number>`` (``<rank1.42>``); :meth:`full` names
    the node's address.

    Numbers are never reused while a node lives, so a Pid never names a later process.
    (A tuple underneath, so that hashing and comparing are done in C.)
    """

    __slots__ = ()

    def __new__(cls, node: NodeId, lid: int) -> Pid:
        return tuple.__new__(cls, (node, lid))

    if TYPE_CHECKING:

        @property
        def node(self) -> NodeId:
            """The node the process runs on."""

        @property
        def lid(self) -> int:
            """The process's number on its node."""

    else:
        node = property(itemgetter(0), doc="The node the process runs on.")
        lid = property(itemgetter(1), doc="The process's number on its node.")

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # One class reference (``_pid``, which has a short pickle code: see
        # hpcproc._pickle_codes) instead of two (Pid and NodeId): pids are in most
        # messages (reply addresses). ``__reduce_ex__`` rather than ``__reduce__``:
        # pickle calls it directly, one Python call less per pid.
        return (_pid, (self[0]._key, self[1]))

    def __repr__(self) -> str:
        return f"<{self[0].label}.{self[1]}>"

    def full(self) -> str:
        """The pid with its node's full address: ``<pid nid://...:42>``."""
        return f"<pid {self[0].full()}:{self[1]}>"


def _pid(address: bytes, lid: int) -> Pid:
    """Unpickle a :class:`Pid` (see ``Pid.__reduce__``)."""
    nid = _interned.get(address)
    if nid is None:
        nid = NodeId(address)
    return tuple.__new__(Pid, (nid, lid))


#: The reference (pure-Python) constructor, kept for tests where the C one replaces it.
_py_pid = _pid


_helper = compiled_helper()
#: The same constructor and reducer in C (``hpcproc/_pickle_accel.c``), or None where
#: it was not built or is turned off (``HPCPROC_PICKLE_ACCEL=0``).
_compiled = _helper.pid_functions(Pid, _interned, NodeId) if _helper is not None else None
if _compiled is not None:
    # A frame less per pid pickled and unpickled (about 0.1 us each). The C constructor
    # is named hpcproc._ids._pid, so pickles carry the same name and code either way;
    # the reducer, through copyreg, takes precedence over Pid.__reduce_ex__.
    _pid = _compiled[0]
    copyreg.pickle(Pid, _compiled[1])


class MonitorRef:
    """The handle ``monitor`` returns; notifications carry it, ``unmonitor`` takes it.

    ``target`` is what is monitored (a :class:`Pid`, a :class:`NodeId` or a
    ``SendPort``); ``watcher`` is the monitoring process.
    """

    __slots__ = ("_hash", "n", "target", "watcher")

    target: Any
    watcher: Pid
    n: int
    _hash: int

    def __init__(self, target: Any, watcher: Pid, n: int) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "watcher", watcher)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "_hash", hash((watcher, n)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MonitorRef is immutable")

    def __eq__(self, other: object) -> bool:
        return self is other or (
            type(other) is MonitorRef and other.n == self.n and other.watcher == self.watcher
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (MonitorRef, (self.target, self.watcher, self.n))

    def __repr__(self) -> str:
        return f"MonitorRef({self.target!r}, #{self.n})"
