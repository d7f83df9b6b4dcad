"""The registry: names of processes, per node.

A name belongs to the node whose registry holds it and names one process, of this
node or another. It is dropped when that process ends: a local process keeps its
names (``Process.names``) and the node drops them as it exits; a process of another
node is monitored by the registry itself (a watch whose watcher is the reserved local
id :data:`REGISTRY_LID`), so its name is dropped when it dies or its node is lost, as
in Cloud Haskell. ``unregister`` and replacing a name stop that monitor.

Remote nodes reach this registry through the control messages ``WhereIs``,
``Register`` (which also unregisters, with ``pid=None``) and ``NSend``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._errors import NodeUnreachableError, ProcessRegistrationException
from ._ids import MonitorRef, NodeId, Pid

if TYPE_CHECKING:
    from ._node import Node
    from ._process import Process

__all__ = ["REGISTRY_LID", "Registry"]

#: The watcher lid of the registry's monitors of remote processes registered here
#: (process lids start at 1).
REGISTRY_LID = 0


class Registry:
    """One node's names: ``name -> Pid``."""

    def __init__(self, node: Node, procs: dict[int, Process]) -> None:
        self._node = node
        self._procs = procs
        self._names: dict[str, Pid] = {}
        #: name -> the registry's monitor of the remote process registered as name,
        #: and back: the name is dropped when the monitor fires.
        self._name_refs: dict[str, MonitorRef] = {}
        self._ref_names: dict[MonitorRef, str] = {}

    def __len__(self) -> int:
        return len(self._names)

    def whereis(self, name: str) -> Pid | None:
        """The pid registered as ``name`` on this node, or None."""
        return self._names.get(name)

    def register(self, name: str, pid: Pid | None, replace: bool = False) -> None:
        """Register ``name`` for ``pid``, or with ``pid=None`` unregister ``name``.

        Raises:
            ProcessRegistrationException: the name is taken (and not ``replace``),
                ``pid`` is a local process that is not alive, or (unregistering) no
                process is registered as ``name``.
        """
        old = self._names.get(name)
        if pid is None:
            if old is None:
                raise ProcessRegistrationException(f"no process is registered as {name!r}")
            self._drop(name, old)
            return
        if old is not None and not replace:
            raise ProcessRegistrationException(f"{name!r} is already registered to {old!r}")
        node_id = self._node.node_id
        tp: Process | None = None
        if pid.node == node_id:
            tp = self._procs.get(pid.lid)
            if tp is None:
                raise ProcessRegistrationException(
                    f"cannot register {name!r}: {pid!r} is not alive"
                )
        if old is not None:
            self._drop(name, old)
        self._names[name] = pid
        if tp is not None:
            if tp.names is None:
                tp.names = []
            tp.names.append(name)
        else:
            # A process of another node: monitor it from here, so that its name is
            # dropped when it dies or its node is lost (as for a local process).
            watches = self._node.watches
            ref = watches.new_ref(pid, Pid(node_id, REGISTRY_LID))
            self._name_refs[name] = ref
            self._ref_names[ref] = name
            watches.watch_remote(pid.node, ref)
            self._node.remote.post(pid.node, ctl.MonitorReq(ref, pid))

    def _drop(self, name: str, pid: Pid) -> None:
        del self._names[name]
        if pid.node == self._node.node_id:
            tp = self._procs.get(pid.lid)
            if tp is not None and tp.names and name in tp.names:
                tp.names.remove(name)
            return
        ref = self._name_refs.pop(name, None)
        if ref is not None:
            del self._ref_names[ref]
            self._node.watches.unwatch_remote(pid.node, ref)
            self._node.remote.post(pid.node, ctl.UnmonitorReq(ref, pid))

    def monitor_fired(self, ref: MonitorRef) -> None:
        """The registry's monitor ``ref`` fired: drop the name it watched."""
        name = self._ref_names.pop(ref, None)
        if name is not None:
            del self._name_refs[name]
            del self._names[name]

    def process_ended(self, proc: Process) -> None:
        """Drop the names of local process ``proc``, which ended."""
        pid = proc.pid
        for name in proc.names or ():
            if self._names.get(name) == pid:
                del self._names[name]

    def deliver(self, name: str, msg: Any) -> None:
        """Deliver an already-private ``msg`` to the process registered as ``name``
        (dropped if none)."""
        pid = self._names.get(name)
        if pid is not None:
            self._node.deliver_to(pid, msg)

    # ------------------------------------------------------------------ other nodes

    async def whereis_remote(self, node: NodeId, name: str, timeout: float | None) -> Pid | None:
        """``whereis`` on ``node``; None if unknown or no answer within ``timeout``.

        Raises:
            NodeUnreachableError: the node could not be reached.
        """
        if node == self._node.node_id:
            return self.whereis(name)
        try:
            pid: Pid | None = await self._node.controller.request(
                node, lambda req: ctl.WhereIs(req, name), NodeUnreachableError, timeout
            )
        except asyncio.TimeoutError:
            return None
        return pid

    async def register_remote(
        self, node: NodeId, name: str, pid: Pid | None, replace: bool
    ) -> None:
        """``register`` (or, with ``pid=None``, ``unregister``) on ``node``.

        Raises:
            ProcessRegistrationException: as for :meth:`register` on that node.
            NodeUnreachableError: the node could not be reached.
        """
        if node == self._node.node_id:
            self.register(name, pid, replace)
            return
        await self._node.controller.request(
            node, lambda req: ctl.Register(req, name, pid, replace), ProcessRegistrationException
        )

    # ------------------------------------------------------------------ control messages

    def on_whereis(self, nid: NodeId, msg: ctl.WhereIs) -> None:
        self._node.controller.reply(nid, msg.req, True, self._names.get(msg.name))

    def on_register(self, nid: NodeId, msg: ctl.Register) -> None:
        try:
            self.register(msg.name, msg.pid, msg.replace)
        except ProcessRegistrationException as exc:
            self._node.controller.reply(nid, msg.req, False, f"on node {self._node.node_id}: {exc}")
        else:
            self._node.controller.reply(nid, msg.req, True, None)

    def on_nsend(self, nid: NodeId, msg: ctl.NSend) -> None:
        self.deliver(msg.name, msg.msg)
