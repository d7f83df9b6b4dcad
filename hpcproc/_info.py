"""Introspection records: what ``get_process_info`` and ``get_node_stats`` return."""

from __future__ import annotations

from dataclasses import dataclass

from ._ids import MonitorRef, NodeId, Pid

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
