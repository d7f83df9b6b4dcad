"""Process groups, after Erlang's ``pg``: named groups of processes across the cluster.

:func:`start_pg` starts one *scope* server per node (registered as
:data:`SCOPE_NAME`) and connects them. A process joins a group through the scope of
its own node, which monitors it; every scope broadcasts its node's joins and leaves to
the other scopes, so each node holds a view of every group and :func:`members`
answers from the caller's node without a network round trip.

Consistency: eventually consistent. A node's own members (:func:`local_members`) are
exact; other nodes' members are seen after their broadcast arrives (per-pair ordering
keeps each node's changes in order). A member that ends leaves its groups on every
node once its scope's monitor fires. A node that is lost (its scope's monitor fires:
crash, close or a lost connection) leaves all of its members at once, on every
surviving node; if it was only cut off, its members stay gone from the others' view
until :func:`start_pg` connects the scopes again. Group monitors
(:func:`monitor_group`) get one :class:`GroupEvent` per change of their node's view.
Differs from Erlang: a process is in a group at most once (joining twice is a no-op),
and a process of another node may be joined (the request goes to that node's scope).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import hpcproc as hp

from ._reopen import reopen_if_broken
from .gen_server import GenServer, ServerDown, call, start

__all__ = [
    "SCOPE_NAME",
    "GroupEvent",
    "PgNotStarted",
    "demonitor_group",
    "join",
    "leave",
    "local_members",
    "members",
    "monitor_group",
    "start_pg",
]

#: The registered name of each node's scope server.
SCOPE_NAME = "hpcproc.otp.pg"


class PgNotStarted(Exception):
    """No process-group scope runs on the node asked; call :func:`start_pg` first."""


@dataclass(frozen=True)
class GroupEvent:
    """Sent to a group monitor when its node's view of ``group`` changed."""

    group: Hashable
    joined: tuple[hp.Pid, ...]
    left: tuple[hp.Pid, ...]


@dataclass(frozen=True)
class _Sync:
    scope: hp.Pid
    groups: dict[Hashable, frozenset[hp.Pid]]


@dataclass(frozen=True)
class _Change:
    scope: hp.Pid
    group: Hashable
    joined: tuple[hp.Pid, ...]
    left: tuple[hp.Pid, ...]


class _Scope(GenServer):
    """One node's scope: its own members (monitored) and its view of the others'."""

    async def init(self, *args: Any) -> None:
        self.me = hp.self_pid()
        self.local: dict[Hashable, set[hp.Pid]] = {}
        self.member_refs: dict[hp.Pid, hp.MonitorRef] = {}
        self.ref_member: dict[hp.MonitorRef, hp.Pid] = {}
        self.remote: dict[hp.Pid, dict[Hashable, frozenset[hp.Pid]]] = {}
        self.peer_refs: dict[hp.MonitorRef, hp.Pid] = {}
        self.subs: dict[Hashable, set[hp.Pid]] = {}
        self.sub_refs: dict[hp.Pid, hp.MonitorRef] = {}
        self.ref_sub: dict[hp.MonitorRef, hp.Pid] = {}

    def _view(self, group: Hashable) -> list[hp.Pid]:
        out = list(self.local.get(group, ()))
        for groups in self.remote.values():
            out.extend(groups.get(group, ()))
        return out

    async def _notify(
        self, group: Hashable, joined: Iterable[hp.Pid], left: Iterable[hp.Pid]
    ) -> None:
        event = GroupEvent(group, tuple(joined), tuple(left))
        if event.joined or event.left:
            for sub in self.subs.get(group, ()):
                await hp.send(sub, event)

    async def _broadcast(
        self, group: Hashable, joined: tuple[hp.Pid, ...], left: tuple[hp.Pid, ...]
    ) -> None:
        change = _Change(self.me, group, joined, left)
        for peer in self.remote:
            await hp.send(peer, change)
        await self._notify(group, joined, left)

    async def _connect(self, peer: hp.Pid) -> None:
        if peer == self.me or peer in self.remote:
            return
        self.remote[peer] = {}
        self.peer_refs[await hp.monitor(peer)] = peer
        snapshot = {g: frozenset(m) for g, m in self.local.items() if m}
        # A new session: after a lost connection to the peer, on a new connection.
        reopen_if_broken(peer)
        await hp.send(peer, _Sync(self.me, snapshot))

    async def _local_leave(self, group: Hashable, pids: Sequence[hp.Pid]) -> None:
        members = self.local.get(group, set())
        gone = tuple(p for p in pids if p in members)
        members.difference_update(gone)
        if not members:
            self.local.pop(group, None)
        for pid in gone:
            if not any(pid in m for m in self.local.values()):
                ref = self.member_refs.pop(pid)
                del self.ref_member[ref]
                await hp.unmonitor(ref)
        await self._broadcast(group, (), gone)

    async def handle_call(self, request: Any, caller: Any) -> Any:
        op = request[0]
        if op == "join":
            _, group, pids = request
            pids = [p for p in pids if p[0] is self.me[0]]  # the client routes by node
            members = self.local.setdefault(group, set())
            new = tuple(p for p in dict.fromkeys(pids) if p not in members)
            for pid in new:
                members.add(pid)
                if pid not in self.member_refs:
                    ref = await hp.monitor(pid)
                    self.member_refs[pid] = ref
                    self.ref_member[ref] = pid
            await self._broadcast(group, new, ())
            return None
        if op == "leave":
            await self._local_leave(request[1], request[2])
            return None
        if op == "members":
            return self._view(request[1])
        if op == "local_members":
            return list(self.local.get(request[1], ()))
        if op == "monitor":
            _, group, pid = request
            self.subs.setdefault(group, set()).add(pid)
            if pid not in self.sub_refs:
                ref = await hp.monitor(pid)
                self.sub_refs[pid] = ref
                self.ref_sub[ref] = pid
            return self._view(group)
        if op == "demonitor":
            _, group, pid = request
            self.subs.get(group, set()).discard(pid)
            return None
        if op == "peers":
            for peer in request[1]:
                await self._connect(peer)
            return None
        raise ValueError(f"unknown pg request {op!r}")

    async def handle_info(self, msg: Any) -> None:
        kind = type(msg)
        if kind is _Sync:
            await self._connect(msg.scope)
            old = self.remote.get(msg.scope, {})
            self.remote[msg.scope] = dict(msg.groups)
            for group in set(old) | set(msg.groups):
                before, after = old.get(group, frozenset()), msg.groups.get(group, frozenset())
                await self._notify(group, after - before, before - after)
        elif kind is _Change:
            groups = self.remote.get(msg.scope)
            if groups is None:
                return  # a scope we lost: its members stay gone
            now = (groups.get(msg.group, frozenset()) | set(msg.joined)) - set(msg.left)
            groups[msg.group] = frozenset(now)
            await self._notify(msg.group, msg.joined, msg.left)
        elif kind is hp.ProcessMonitorNotification:
            ref = msg.ref
            if ref in self.ref_member:
                pid = self.ref_member[ref]
                for group in [g for g, m in self.local.items() if pid in m]:
                    await self._local_leave(group, (pid,))
            elif ref in self.peer_refs:
                peer = self.peer_refs.pop(ref)
                for group, pids in self.remote.pop(peer, {}).items():
                    await self._notify(group, (), pids)
            elif ref in self.ref_sub:
                pid = self.ref_sub.pop(ref)
                del self.sub_refs[pid]
                for subs in self.subs.values():
                    subs.discard(pid)


def _scope_of(node: hp.NodeId) -> Any:
    return SCOPE_NAME if node == hp.self_node() else (SCOPE_NAME, node)


async def _ask(node: hp.NodeId, request: Any) -> Any:
    try:
        return await call(_scope_of(node), request, timeout=30.0)
    except ServerDown as exc:
        if isinstance(exc.reason, str) and "no process registered" in exc.reason:
            raise PgNotStarted(
                f"no process-group scope on {node}: call otp.start_pg(nodes) first"
            ) from None
        raise


async def start_pg(nodes: Sequence[hp.NodeId] = ()) -> None:
    """Start (where missing) the scope of this node and of each of ``nodes``, and
    connect them all to each other. Call it again to add nodes or reconnect scopes.

    Raises:
        StartError / NodeUnreachableError: a scope could not be started.
    """
    here = hp.self_node()
    scopes: list[hp.Pid] = []
    for node in dict.fromkeys((here, *nodes)):
        found = (
            hp.whereis(SCOPE_NAME)
            if node == here
            else await hp.whereis_remote(node, SCOPE_NAME, timeout=30.0)
        )
        if found is None:
            found = await start(_Scope, node=node, name=SCOPE_NAME)
        scopes.append(found)
    for scope in scopes:
        await call(scope, ("peers", tuple(scopes)), timeout=30.0)


def _pids(pid: hp.Pid | Sequence[hp.Pid] | None) -> list[hp.Pid]:
    if pid is None:
        return [hp.self_pid()]
    if isinstance(pid, hp.Pid):
        return [pid]
    return list(pid)


async def join(group: Hashable, pid: hp.Pid | Sequence[hp.Pid] | None = None) -> None:
    """Add ``pid`` (default: the caller; or several pids) to ``group``; returns once its
    node's scope recorded it (other nodes see it soon after).

    Raises:
        PgNotStarted: no scope on the pid's node.
    """
    by_node: dict[hp.NodeId, list[hp.Pid]] = {}
    for p in _pids(pid):
        by_node.setdefault(p[0], []).append(p)
    for node, pids in by_node.items():
        await _ask(node, ("join", group, tuple(pids)))


async def leave(group: Hashable, pid: hp.Pid | Sequence[hp.Pid] | None = None) -> None:
    """Remove ``pid`` (default: the caller) from ``group``; leaving a group one is not
    in does nothing."""
    by_node: dict[hp.NodeId, list[hp.Pid]] = {}
    for p in _pids(pid):
        by_node.setdefault(p[0], []).append(p)
    for node, pids in by_node.items():
        await _ask(node, ("leave", group, tuple(pids)))


async def members(group: Hashable) -> list[hp.Pid]:
    """Every member of ``group`` in this node's view of the cluster (see the module
    docstring for its consistency)."""
    return await _ask(hp.self_node(), ("members", group))  # type: ignore[no-any-return]


async def local_members(group: Hashable) -> list[hp.Pid]:
    """The members of ``group`` that run on this node (exact)."""
    return await _ask(hp.self_node(), ("local_members", group))  # type: ignore[no-any-return]


async def monitor_group(group: Hashable) -> list[hp.Pid]:
    """Subscribe the caller to ``group``: each change of this node's view sends it a
    :class:`GroupEvent`. Returns the current members (events cover what follows)."""
    return await _ask(hp.self_node(), ("monitor", group, hp.self_pid()))  # type: ignore[no-any-return]


async def demonitor_group(group: Hashable) -> None:
    """Stop the caller's :func:`monitor_group` of ``group`` (events already sent stay)."""
    await _ask(hp.self_node(), ("demonitor", group, hp.self_pid()))
