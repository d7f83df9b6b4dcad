"""Introspection: snapshots of a process or a node, of this node or another one.

What ``hp.get_process_info`` and ``hp.get_node_stats`` return (the records are in
:mod:`._info`); another node's snapshot is asked of its controller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._errors import NodeUnreachableError
from ._ids import MonitorRef, NodeId, Pid
from ._info import NodeStats, ProcessInfo, peer_transports

if TYPE_CHECKING:
    from ._node import Node
    from ._process import Process

__all__ = ["Introspection"]


class Introspection:
    """Snapshots of ``node`` and its processes (``procs``: its process table,
    ``incoming``: its incoming connections)."""

    def __init__(self, node: Node, procs: dict[int, Process], incoming: dict[int, Any]) -> None:
        self._node = node
        self._procs = procs
        self._incoming = incoming

    def process_info(self, pid: Pid) -> ProcessInfo | None:
        """A snapshot of local process ``pid``, or None if it is not alive."""
        tp = self._node.process(pid)
        return tp.info() if tp is not None else None

    def stats(self) -> NodeStats:
        """A snapshot of this node's counters."""
        monitors = links = 0
        for proc in self._procs.values():
            if proc.watchers:
                for k in proc.watchers:
                    if type(k) is MonitorRef:
                        monitors += 1
                    else:
                        links += 1
        peers = [st.node for st in self._incoming.values()] + self._node.remote.nodes()
        return NodeStats(
            self._node.node_id,
            len(self._procs),
            len(self._node.registry),
            monitors,
            links,
            len(self._incoming),
            peer_transports(self._node.endpoint, (p for p in peers if p != self._node.node_id)),
        )

    async def get_process_info(self, pid: Pid) -> ProcessInfo | None:
        """:meth:`process_info` on the pid's node. Raises NodeUnreachableError."""
        if pid.node == self._node.node_id:
            return self.process_info(pid)
        info: ProcessInfo | None = await self._node.controller.request(
            pid.node, lambda req: ctl.GetInfo(req, pid), NodeUnreachableError
        )
        return info

    async def get_node_stats(self, node: NodeId) -> NodeStats:
        """:meth:`stats` of ``node``. Raises NodeUnreachableError."""
        if node == self._node.node_id:
            return self.stats()
        stats: NodeStats = await self._node.controller.request(
            node, ctl.GetStats, NodeUnreachableError
        )
        return stats
