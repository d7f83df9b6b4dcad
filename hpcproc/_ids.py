"""Identities: :class:`NodeId`, :class:`Pid` and :class:`MonitorRef`.

All three are immutable, hashable and picklable, so they travel in messages and are
never copied by a local ``send``.
"""

from __future__ import annotations

from typing import Any

from .transports.base import EndPointAddress

__all__ = ["MonitorRef", "NodeId", "Pid"]


class NodeId:
    """Identifies a node by the address of its transport endpoint.

    ``NodeId(address_bytes)`` rebuilds a node's id from its endpoint address, so a
    launcher can name every rank after a rendezvous of addresses. Two ids are equal
    when their addresses are.
    """

    __slots__ = ("_hash", "address")

    address: EndPointAddress
    _hash: int

    def __init__(self, address: bytes) -> None:
        object.__setattr__(self, "address", EndPointAddress(address))
        object.__setattr__(self, "_hash", hash(bytes(address)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("NodeId is immutable")

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is NodeId and other.address == self.address)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (NodeId, (bytes(self.address),))

    def __repr__(self) -> str:
        return f"NodeId({bytes(self.address)!r})"

    def __str__(self) -> str:
        return f"nid://{bytes(self.address).decode('utf-8', 'backslashreplace')}"


class Pid:
    """Identifies a process: the node it runs on and a number unique on that node.

    Numbers are never reused while a node lives, so a Pid never names a later process.
    """

    __slots__ = ("_hash", "lid", "node")

    node: NodeId
    lid: int
    _hash: int

    def __init__(self, node: NodeId, lid: int) -> None:
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "lid", lid)
        object.__setattr__(self, "_hash", hash((node._hash, lid)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Pid is immutable")

    def __eq__(self, other: object) -> bool:
        return self is other or (
            type(other) is Pid and other.lid == self.lid and other.node == self.node
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pid, (self.node, self.lid))

    def __repr__(self) -> str:
        return f"<pid {self.node}:{self.lid}>"


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
