"""Introspection records: what ``get_process_info`` and ``get_node_stats`` return."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ._ids import MonitorRef, NodeId, Pid
from .transports.base import EndPoint

__all__ = ["NodeStats", "ProcessInfo"]


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A snapshot of one live process."""

    pid: Pid
    node: NodeId
    registered_names: tuple[str, ...]
    message_queue_length: int
    #: processes linked to this one (they get an exception when it dies abnormally)
    linked_by: tuple[Pid, ...]
    #: monitors on this process (their owners get a notification when it dies)
    monitored_by: tuple[MonitorRef, ...]


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of one node."""

    node: NodeId
    processes: int
    registered_names: int
    monitors: int
    links: int
    #: open incoming connections: one per (remote sender, local receiver) pair that
    #: has communicated, plus one per remote node's controller
    incoming_connections: int
    #: ``(peer, transport)`` for every node this one has a connection with, in either
    #: direction (connections are opened on first use): the name of the transport that
    #: carries it (``EndPoint.transport_for``; with the routing transport ``shm`` for a
    #: peer on this host, the network transport for the others), by peer address
    peer_transports: tuple[tuple[NodeId, str], ...] = ()


def peer_transports(endpoint: EndPoint, peers: Iterable[NodeId]) -> tuple[tuple[NodeId, str], ...]:
    """:attr:`NodeStats.peer_transports` for ``peers`` (duplicates ignored)."""
    unique = {p.address: p for p in peers}
    return tuple((unique[a], endpoint.transport_for(a)) for a in sorted(unique, key=bytes))
