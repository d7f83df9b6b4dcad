"""Watches: links, monitors and node watches, and how a death reaches the watchers.

A watch is named by a typed key that is the same on both nodes involved:

* :class:`~hpcproc.MonitorRef` -- a monitor of a process, a send port's owner or a
  node; its death arrives as a notification *message*;
* :class:`Link` -- ``watcher`` linked to process ``target``; an abnormal death is
  raised in the watcher as ``ProcessLinkException``;
* :class:`NodeLink` -- ``watcher`` linked to a node (``NodeLinkException``).

Two sides. A watched *local* process keeps its watchers' keys itself
(``Process.watchers``); when it ends, each watcher is told (locally, or by a ``Died``
control message to the watcher's node, on the pair connection if the process has one
to the watcher, after its messages). A watch our process holds on *another node*
is also recorded here, by node (:attr:`Watches.remote`): when that node is lost or
announces its close, every watch on it fires with ``DiedDisconnect`` /
``DiedNodeDown`` without a message from it; when the watcher's own pair connection to
the watched process cannot be opened or fails (its messages there are dropped from
then on), its watches on that process fire with ``DiedDisconnect``
(:meth:`Watches.pair_broken`). A ``Died`` is acted on only if its key is
still recorded, so each watch fires at most once, whichever comes first; and only
once every pair connection from the dead process to this node has closed
(``Incoming.after_messages_of``), so that its last messages to any process here are
delivered before its death is reported (what ``otp.call`` relies on: the reply goes to
the caller, the death to the node's call watch). When a
watcher ends, its remote watches are dropped and their targets' nodes told
(``UnlinkReq`` / ``UnmonitorReq``), so that a long-lived process does not accumulate
watchers of processes that are gone.

The registry is a watcher too: it monitors remote processes registered here under
the reserved local id :data:`~hpcproc._registry.REGISTRY_LID`.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._channels import SendPort
from ._errors import NodeUnreachableError
from ._ids import MonitorRef, NodeId, Pid
from ._registry import REGISTRY_LID
from ._signals import (
    DiedDisconnect,
    DiedReason,
    DiedUnknownId,
    NodeLinkException,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessLinkException,
    ProcessMonitorNotification,
)

if TYPE_CHECKING:
    from ._node import Node
    from ._process import Process

__all__ = ["Link", "NodeLink", "WatchKey", "Watches", "notification"]


@dataclass(frozen=True, slots=True)
class Link:
    """``watcher`` is linked to process ``target`` (unidirectional)."""

    watcher: Pid
    target: Pid


@dataclass(frozen=True, slots=True)
class NodeLink:
    """``watcher`` is linked to ``node``."""

    watcher: Pid
    node: NodeId


#: What names a watch: a monitor's ref, a link, or a link to a node.
WatchKey = MonitorRef | Link | NodeLink

#: Entries of a watcher's index beyond which fired or removed ones are pruned.
_PRUNE_AT = 32


def _watched_process(key: WatchKey) -> Pid | None:
    """The process whose end fires ``key``: a link's target, a monitored process or
    a monitored port's owner; None for a node watch or a ``spawn_monitor`` ref
    still waiting for its pid."""
    if type(key) is Link:
        return key.target
    if type(key) is MonitorRef:
        target = key.target
        if type(target) is SendPort:
            return target.owner
        if type(target) is Pid:
            return target
    return None


def _request_key(msg: ctl.LinkReq | ctl.MonitorReq) -> MonitorRef | Link:
    """The watch a link or monitor request asks for."""
    return msg.ref if type(msg) is ctl.MonitorReq else Link(msg.watcher, msg.target)  # type: ignore[union-attr]


def notification(ref: MonitorRef, reason: DiedReason) -> Any:
    """The monitor message for ``ref`` (process, node or port monitor)."""
    target = ref.target
    if type(target) is SendPort:
        return PortMonitorNotification(ref, target, reason)
    if type(target) is NodeId:
        return NodeMonitorNotification(ref, target, reason)
    return ProcessMonitorNotification(ref, target, reason)


class Watches:
    """The links and monitors of one node's processes, and the nodes watching it."""

    def __init__(self, node: Node, procs: dict[int, Process]) -> None:
        self._node = node
        self._procs = procs
        #: node -> the watches our processes (and the registry) hold there.
        self.remote: dict[NodeId, dict[WatchKey, None]] = {}
        #: watcher lid -> [(node, key)] of its entries in ``remote`` (pruned lazily).
        self._by_watcher: dict[int, list[tuple[NodeId, WatchKey]]] = {}
        #: Nodes that asked to be told ``NodeDown`` when this one closes.
        self.node_watchers: set[NodeId] = set()
        self._refs = itertools.count(1)

    def new_ref(self, target: Any, watcher: Pid) -> MonitorRef:
        """A fresh monitor ref of ``watcher`` on ``target`` (unique on this node)."""
        return MonitorRef(target, watcher, next(self._refs))

    # ------------------------------------------------------------------ our watches

    # A watch of a process on another node is recorded here at once; the request to
    # that node is returned, for the caller to send with ``RemoteSender.send_signal``
    # (awaiting it: on the pair connection, in its place among the process's messages)
    # or ``RemoteSender.post`` (without waiting, on the control queue).

    def link(self, proc: Process, target: Pid) -> ctl.LinkReq | None:
        """``proc`` links to ``target``; see :func:`hpcproc.link`. Returns the request
        for ``target``'s node, if it is another one.

        Raises:
            ProcessLinkException: ``target`` is a local process that is not alive.
        """
        key = Link(proc.pid, target)
        if target.node == self._node.node_id:
            tp = self._procs.get(target.lid)
            if tp is None:
                raise ProcessLinkException(target, DiedUnknownId())
            add_watcher(tp, key)
            return None
        self.watch_remote(target.node, key)
        return ctl.LinkReq(proc.pid, target)

    def unlink(self, proc: Process, target: Pid) -> ctl.UnlinkReq | None:
        """Undo :meth:`link`; no exception for ``target`` is raised afterwards. Returns
        the request for ``target``'s node, if it is another one."""
        key = Link(proc.pid, target)
        if target.node == self._node.node_id:
            tp = self._procs.get(target.lid)
            if tp is not None and tp.watchers is not None:
                tp.watchers.pop(key, None)
            return None
        self.unwatch_remote(target.node, key)
        return ctl.UnlinkReq(proc.pid, target)

    def monitor(
        self, proc: Process, target: Pid | SendPort[Any]
    ) -> tuple[MonitorRef, ctl.MonitorReq | None]:
        """``proc`` monitors ``target`` (a pid, or the owner of a send port). Returns
        the ref, and the request for the target's node if it is another one."""
        ref = self.new_ref(target, proc.pid)
        pid = target.owner if type(target) is SendPort else target
        assert type(pid) is Pid
        if pid.node == self._node.node_id:
            tp = self._procs.get(pid.lid)
            if tp is None:
                proc.deliver(notification(ref, DiedUnknownId()))
            else:
                add_watcher(tp, ref)
            return ref, None
        self.watch_remote(pid.node, ref)
        return ref, ctl.MonitorReq(ref, pid)

    def unmonitor(self, proc: Process, ref: MonitorRef) -> ctl.UnmonitorReq | None:
        """Undo :meth:`monitor`; a notification for ``ref`` already queued is removed.
        Returns the request for the target's node, if it is another one."""
        target = ref.target
        req = None
        if type(target) is NodeId:
            self.unwatch_remote(target, ref)
        else:
            pid = target.owner if type(target) is SendPort else target
            if pid.node == self._node.node_id:
                tp = self._procs.get(pid.lid)
                if tp is not None and tp.watchers is not None:
                    tp.watchers.pop(ref, None)
            else:
                self.unwatch_remote(pid.node, ref)
                req = ctl.UnmonitorReq(ref, pid)
        proc.drop_notification(ref)
        return req

    async def monitor_node(self, proc: Process, nid: NodeId) -> MonitorRef:
        """``proc`` gets a NodeMonitorNotification when ``nid`` goes away.

        Returns once ``nid`` acknowledged the watch (so its close will be reported as
        ``DiedNodeDown``) or the watch already fired (unreachable: ``DiedDisconnect``).
        """
        ref = self.new_ref(nid, proc.pid)
        if nid != self._node.node_id:
            self.watch_remote(nid, ref)
            await self._watch_node(nid)
        return ref

    async def link_node(self, proc: Process, nid: NodeId) -> None:
        """``proc`` gets NodeLinkException raised when ``nid`` goes away (see monitor_node)."""
        if nid != self._node.node_id:
            self.watch_remote(nid, NodeLink(proc.pid, nid))
            await self._watch_node(nid)

    def unlink_node(self, proc: Process, nid: NodeId) -> None:
        """Undo :meth:`link_node`; no NodeLinkException for ``nid`` is raised afterwards."""
        self.unwatch_remote(nid, NodeLink(proc.pid, nid))
        sig = proc.pending_signal
        # (Unless its raising has begun, see trap_exits: then it raced the unlink.)
        if type(sig) is NodeLinkException and sig.node == nid and not proc.signal_thrown:
            proc.pending_signal = None

    async def _watch_node(self, nid: NodeId) -> None:
        # Unreachable: the watch has already fired with DiedDisconnect.
        with contextlib.suppress(NodeUnreachableError):
            await self._node.controller.request(nid, ctl.NodeWatch, NodeUnreachableError)

    # ------------------------------------------------------------------ the remote index

    def watch_remote(self, nid: NodeId, key: WatchKey) -> None:
        """Record that ``key``'s watcher (one of ours) watches something on ``nid``."""
        watches = self.remote.get(nid)
        if watches is None:
            watches = self.remote[nid] = {}
        watches[key] = None
        wlid = key.watcher.lid
        mine = self._by_watcher.get(wlid)
        if mine is None:
            mine = self._by_watcher[wlid] = []
        elif len(mine) >= _PRUNE_AT:
            # Drop entries of watches that have fired or been removed meanwhile.
            mine[:] = [(n, k) for n, k in mine if k in self.remote.get(n, ())]
        mine.append((nid, key))

    def rekey_remote(self, nid: NodeId, old: MonitorRef, new: MonitorRef) -> None:
        """Replace the watch ``old`` (a spawn_monitor ref without a target yet) by
        ``new``, which names the spawned pid, in both indexes, so that an unmonitor
        sent when the watcher ends names the pid."""
        # Equal keys (same watcher and number): pop first, or the dict keeps ``old``.
        self.unwatch_remote(nid, old)
        self.remote.setdefault(nid, {})[new] = None
        mine = self._by_watcher.setdefault(new.watcher.lid, [])
        mine[:] = [(n, k) for n, k in mine if k is not old]
        mine.append((nid, new))

    def unwatch_remote(self, nid: NodeId, key: WatchKey) -> None:
        """Forget the watch ``key`` on ``nid`` (it will not fire)."""
        watches = self.remote.get(nid)
        if watches is not None:
            watches.pop(key, None)
            if not watches:
                del self.remote[nid]

    # ------------------------------------------------------------------ deaths

    def process_ended(self, proc: Process) -> None:
        """``proc`` ended: drop the watches it held elsewhere, tell its watchers (a
        watcher elsewhere after ``proc``'s last message to it)."""
        if self._by_watcher and proc.pid.lid in self._by_watcher:
            self._drop_watches_of(proc)
        if proc.watchers:
            reason = proc.died_reason()
            for key in proc.watchers:
                self.notify(proc.pid, reason, key, proc)

    def _drop_watches_of(self, proc: Process) -> None:
        """Forget ``proc``'s remote watches and tell the targets' nodes."""
        remote = self._node.remote
        for nid, key in self._by_watcher.pop(proc.pid.lid, ()):
            watches = self.remote.get(nid)
            if watches is None or key not in watches:
                continue  # fired or removed meanwhile
            del watches[key]
            if not watches:
                del self.remote[nid]
            target = _watched_process(key)
            if target is None:
                # A node watch, or a spawn_monitor ref still waiting for its pid (a
                # task acting for proc spawns; it is cancelled as proc ends, and the
                # spawned process's monitor then fires into nobody).
                continue
            if type(key) is MonitorRef:
                remote.last_signal(proc, target, ctl.UnmonitorReq(key, target))
            else:
                remote.last_signal(proc, target, ctl.UnlinkReq(proc.pid, target))

    def notify(
        self, target: Pid, reason: DiedReason, key: MonitorRef | Link, dead: Process | None = None
    ) -> None:
        """Tell the watcher behind ``key`` that ``target`` ended with ``reason``; when
        ``dead`` (the local process ``target``, which ended) is given, a watcher
        elsewhere hears of it after ``dead``'s last message to it
        (``RemoteSender.last_signal``)."""
        watcher = key.watcher
        if watcher.node == self._node.node_id:
            self.deliver_death(target, reason, key)
            return
        ref = key if type(key) is MonitorRef else None
        died = ctl.Died(target, reason, watcher, ref)
        if dead is None:
            self._node.remote.post(watcher.node, died)
        else:
            self._node.remote.last_signal(dead, watcher, died)

    def deliver_death(self, target: Any, reason: DiedReason, key: WatchKey) -> None:
        """Fire the watch ``key`` of a local watcher: a notification or a link signal."""
        wlid = key.watcher.lid
        proc = self._procs.get(wlid)
        if proc is None:
            if wlid == REGISTRY_LID and type(key) is MonitorRef:
                self._node.registry.monitor_fired(key)
            return
        if type(key) is MonitorRef:
            proc.deliver(notification(key, reason))
        elif type(key) is NodeLink:
            proc.signal(NodeLinkException(target, reason))
        elif not reason.normal:
            proc.signal(ProcessLinkException(target, reason))

    def pair_broken(self, proc: Process, target: Pid) -> None:
        """``proc``'s pair connection to ``target`` could not be opened or failed: its
        messages to ``target`` are dropped from now on (until ``reconnect``), which
        counts as ``target``'s failure for ``proc`` (disconnect counts as failure,
        whether or not ``target``'s node is lost too). Fire, with ``DiedDisconnect``,
        ``proc``'s monitors of ``target`` and of its ports and its link to it; its
        other watches on that node (other processes, the node itself) stay. Nothing
        for a process that has ended: its watches are being dropped, and their
        targets' nodes told (:meth:`process_ended`)."""
        watches = self.remote.get(target.node)
        if not watches or proc.done():
            return
        watcher = proc.pid
        fired = [k for k in watches if k.watcher == watcher and _watched_process(k) == target]
        if not fired:
            return
        for key in fired:
            self.unwatch_remote(target.node, key)
        reason = DiedDisconnect()
        for key in fired:
            self.deliver_death(target, reason, key)

    def fired(self, request: Any) -> bool:
        """Whether ``request``, a ``LinkReq`` or ``MonitorReq`` for another node, names a
        watch that has fired already (its pair connection broke as it was sent: the
        target's node need not hear of it). False for any other message."""
        if type(request) is not ctl.MonitorReq and type(request) is not ctl.LinkReq:
            return False
        return _request_key(request) not in self.remote.get(request.target.node, ())

    def node_lost(self, nid: NodeId, reason: DiedReason) -> None:
        """Communication with ``nid`` failed (or it closed): fire every watch on it."""
        self.node_watchers.discard(nid)
        watches = self.remote.pop(nid, None)
        if not watches:
            return
        for key in watches:
            if type(key) is MonitorRef:
                if key.target is None:
                    continue  # a spawn_monitor still waiting: its spawn fails instead
                self.deliver_death(key.target, reason, key)
            elif type(key) is Link:
                self.deliver_death(key.target, reason, key)
            else:
                self.deliver_death(nid, reason, key)

    # ------------------------------------------------------------------ control messages

    def on_died(self, nid: NodeId, msg: ctl.Died) -> None:
        # Acted on after the dead process's last message to any process here, which
        # may still be on its way on a connection of its own.
        if not self._node.incoming.after_messages_of(msg.target, lambda: self._died(msg)):
            self._died(msg)

    def _died(self, msg: ctl.Died) -> None:
        key: WatchKey = msg.ref if msg.ref is not None else Link(msg.watcher, msg.target)
        watches = self.remote.get(msg.target.node)
        if watches is not None and key in watches:
            del watches[key]
            if not watches:
                del self.remote[msg.target.node]
            self.deliver_death(msg.target, msg.reason, key)

    def on_link(self, nid: NodeId, msg: ctl.LinkReq | ctl.MonitorReq) -> None:
        key = _request_key(msg)
        target = msg.target
        tp = self._procs.get(target.lid) if target.node == self._node.node_id else None
        if tp is None:
            self.notify(target, DiedUnknownId(), key)
        else:
            add_watcher(tp, key)

    def on_unlink(self, nid: NodeId, msg: ctl.UnlinkReq | ctl.UnmonitorReq) -> None:
        key = msg.ref if type(msg) is ctl.UnmonitorReq else Link(msg.watcher, msg.target)  # type: ignore[union-attr]
        tp = self._procs.get(msg.target.lid)
        if tp is not None and tp.watchers is not None:
            tp.watchers.pop(key, None)

    def on_node_watch(self, nid: NodeId, msg: ctl.NodeWatch) -> None:
        self.node_watchers.add(nid)
        self._node.controller.reply(nid, msg.req, True, None)


def add_watcher(proc: Process, key: MonitorRef | Link) -> None:
    """Record on ``proc`` that ``key``'s watcher watches it."""
    if proc.watchers is None:
        proc.watchers = {}
    proc.watchers[key] = None
