"""Cluster membership: nodes that join and leave at run time, and who is told.

Each member node runs one *membership process*, registered as :data:`MEMBERSHIP`,
that keeps this node's view of the cluster: the other member nodes. The API on top:

- :func:`join` (``hp.join(address)``): make this node a member of the cluster that
  the node at ``address`` belongs to;
- :func:`nodes` (``hp.nodes()``): the other members as this node sees them now
  (Erlang's ``nodes()``: this node itself is not in it);
- :func:`monitor_nodes` (``hp.monitor_nodes()``, Erlang's
  ``net_kernel:monitor_nodes``): the calling process gets :class:`NodeUp` when a
  node becomes a member and :class:`NodeDown` when one leaves or is lost.

Protocol (Erlang's full mesh, built on node monitors). A joiner J sends ``Hello(J)``
to the membership process of the member it knows, C. A member that gets a Hello adds
the sender (``NodeUp`` to its subscribers), monitors it, and answers with its view
(``View``: itself and its members). J adds every node of a View it did not know and
sends each of them a Hello in turn, so it meets the whole cluster through one
address; their Views tell it of anyone C had not heard of yet. A member that loses a
node it monitors (``NodeMonitorNotification``: ``DiedNodeDown`` when the node closed
gracefully, ``DiedDisconnect`` when the connection failed) removes it
(``NodeDown(node, reason)`` to its subscribers) and tells every other member
(``Gone``), which removes it too.

Consistency: eventual, without agreement. Every member handles its messages one at a
time, so two nodes joining at once through different members meet at any member both
reach (whichever Hello that member handles second is answered with a View naming the
first joiner), and all live members that can reach each other converge on the same
set. Members may see joins and leaves in different orders, and a node lost by one
member (say, behind a link that failed only there) is removed everywhere by ``Gone``
although others could still reach it; it is not re-added unless it joins again.

Cost. A node that joins monitors every member and every member monitors it (one
connection each way, like Erlang's mesh). The ranks a launcher started together are
not meshed: each monitors only the leader (rank 0, which monitors all of them; run.py
connects them that way anyway), and a loss the leader sees reaches the others as
``Gone``. So a 1000-rank job does not open a million connections for a feature it may
not use.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import NodeUnreachableError
from ._ids import MonitorRef, NodeId, Pid
from ._process import current
from ._signals import DiedReason, NodeMonitorNotification

if TYPE_CHECKING:
    from ._node import Node

__all__ = [
    "MEMBERSHIP",
    "JoinError",
    "NodeDown",
    "NodeUp",
    "join",
    "leader",
    "monitor_nodes",
    "nodes",
    "start_membership",
]

log = logging.getLogger("hpcproc.membership")

#: Registered name of each member node's membership process.
MEMBERSHIP = "hpcproc.membership"

#: How long :func:`join` waits for the contacted member's answer by default.
JOIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class NodeUp:
    """Sent to :func:`monitor_nodes` subscribers: ``node`` became a member."""

    node: NodeId


@dataclass(frozen=True)
class NodeDown:
    """Sent to :func:`monitor_nodes` subscribers: ``node`` left (``DiedNodeDown``: it
    closed gracefully) or was lost (``DiedDisconnect``)."""

    node: NodeId
    reason: DiedReason


class JoinError(Exception):
    """:func:`join` failed: the member could not be reached or did not answer."""


# ---------------------------------------------------------------- protocol messages


@dataclass(frozen=True)
class _Hello:
    """Member-to-member: ``node`` is a member; answer with your :class:`_View`."""

    node: NodeId


@dataclass(frozen=True)
class _View:
    """Answer to a Hello: ``sender`` and the members it knows; its ``leader``."""

    sender: NodeId
    members: tuple[NodeId, ...]
    leader: NodeId | None


@dataclass(frozen=True)
class _Gone:
    """Member-to-member: ``node`` was lost (seen by the sender's monitor)."""

    node: NodeId
    reason: DiedReason


@dataclass(frozen=True)
class _JoinLocal:
    """Local request from :func:`join`: join through ``contact``, then complete ``done``."""

    contact: NodeId
    done: asyncio.Future[tuple[NodeId, ...]]


# ---------------------------------------------------------------- state


@dataclass
class _State:
    """One node's view: the other members (in the order met), who watches, the leader."""

    pid: Pid
    leader: NodeId | None
    members: dict[NodeId, MonitorRef | None] = field(default_factory=dict)
    subscribers: dict[Pid, None] = field(default_factory=dict)
    pending: dict[NodeId, list[asyncio.Future[tuple[NodeId, ...]]]] = field(default_factory=dict)
    #: Monitors taken on a contact before it answered (reused once it is a member).
    contact_refs: dict[NodeId, MonitorRef] = field(default_factory=dict)


_states: weakref.WeakKeyDictionary[Node, _State] = weakref.WeakKeyDictionary()


def start_membership(
    node: Node,
    members: Iterable[NodeId] = (),
    *,
    leader: NodeId | None = None,
    watch: Iterable[NodeId] | None = None,
) -> Pid:
    """Make ``node`` a member with ``members`` as its initial view; idempotent.

    Starts the membership process (registered as :data:`MEMBERSHIP`) if it is not
    running. ``watch``: the members to monitor (default: all; a launcher's workers
    watch only the leader, see the module docstring). The initial members are not
    announced as :class:`NodeUp`. Returns the membership process's pid.

    Raises:
        RuntimeError: the node is not started or is closed.
    """
    state = _states.get(node)
    if state is not None:
        return state.pid
    node.check_open()
    me = node.node_id
    initial = [m for m in dict.fromkeys(members) if m != me]
    watched = set(initial if watch is None else watch)

    async def membership() -> None:
        import hpcproc as hp

        state = _states[node]
        for m in initial:
            if m in watched:
                await _watch(state, m)
        while True:
            await _handle(node, state, await hp.expect())

    pid = node.spawn_local(membership)
    _states[node] = _State(pid, leader, dict.fromkeys(initial))
    node.register(MEMBERSHIP, pid)
    return pid


async def _watch(state: _State, nid: NodeId) -> None:
    import hpcproc as hp

    ref = state.contact_refs.pop(nid, None) or await hp.monitor_node(nid)
    if nid in state.members:
        state.members[nid] = ref


def _notify(node: Node, state: _State, msg: NodeUp | NodeDown) -> None:
    for pid in list(state.subscribers):
        if node.process(pid) is None:
            del state.subscribers[pid]
        else:
            node.send_local(pid, msg)


async def _add(node: Node, state: _State, nid: NodeId) -> bool:
    """Add ``nid`` (monitored) unless known; True if it was new."""
    if nid == node.node_id or nid in state.members:
        return False
    state.members[nid] = None
    log.info("node %s: %s joined", node.node_id, nid)
    _notify(node, state, NodeUp(nid))
    await _watch(state, nid)
    return True


def _remove(node: Node, state: _State, nid: NodeId, reason: DiedReason) -> bool:
    """Remove ``nid`` if it is a member; True if it was."""
    if nid not in state.members:
        return False
    del state.members[nid]
    log.info("node %s: %s left: %r", node.node_id, nid, reason)
    for fut in state.pending.pop(nid, ()):
        if not fut.done():
            fut.set_exception(JoinError(f"node {nid} went away during the join: {reason!r}"))
    _notify(node, state, NodeDown(nid, reason))
    return True


async def _handle(node: Node, state: _State, msg: Any) -> None:
    me = node.node_id
    if isinstance(msg, _Hello):
        await _add(node, state, msg.node)
        node.nsend_remote(msg.node, MEMBERSHIP, _View(me, tuple(state.members), state.leader))
    elif isinstance(msg, _View):
        if state.leader is None:
            state.leader = msg.leader if msg.leader is not None else msg.sender
        for nid in (msg.sender, *msg.members):
            if await _add(node, state, nid) and nid != msg.sender:
                node.nsend_remote(nid, MEMBERSHIP, _Hello(me))
        for fut in state.pending.pop(msg.sender, ()):
            if not fut.done():
                fut.set_result(tuple(state.members))
    elif isinstance(msg, NodeMonitorNotification):
        state.contact_refs.pop(msg.node, None)
        waiting = state.pending.pop(msg.node, ())
        for fut in waiting:
            if not fut.done():
                fut.set_exception(
                    JoinError(f"cannot reach node {msg.node} to join through it: {msg.reason!r}")
                )
        if _remove(node, state, msg.node, msg.reason):
            for nid in state.members:
                node.nsend_remote(nid, MEMBERSHIP, _Gone(msg.node, msg.reason))
    elif isinstance(msg, _Gone):
        ref = state.members.get(msg.node)
        if _remove(node, state, msg.node, msg.reason) and ref is not None:
            import hpcproc as hp

            await hp.unmonitor(ref)
    elif isinstance(msg, _JoinLocal):
        if msg.contact == me:
            msg.done.set_result(tuple(state.members))
            return
        state.pending.setdefault(msg.contact, []).append(msg.done)
        node.nsend_remote(msg.contact, MEMBERSHIP, _Hello(me))
        if msg.contact not in state.members and msg.contact not in state.contact_refs:
            # Unreachable: a NodeMonitorNotification fails the join.
            import hpcproc as hp

            state.contact_refs[msg.contact] = await hp.monitor_node(msg.contact)
    else:
        log.warning("node %s: membership process ignores %r", me, type(msg))


# ---------------------------------------------------------------- API


async def join(
    address: NodeId | bytes | str, *, timeout: float = JOIN_TIMEOUT
) -> tuple[NodeId, ...]:
    """Make this node a member of the cluster of the node at ``address``.

    ``address`` is that member's node id, its endpoint address (bytes) or the text of
    either (``"tcp://host:port/..."`` or ``node_id.full()``). Both nodes must share the
    cookie (the transport's handshake refuses a node without it). Returns the other
    members once the contacted one has answered; members it did not know yet are met
    in the background and announced as :class:`NodeUp`. Joining a cluster this node
    is already a member of returns at once.

    Raises:
        JoinError: the member could not be reached, went away, or did not answer
            within ``timeout`` (it is not a member of a cluster: its program started
            no membership process).
        NotInProcessError: called outside a process.
    """
    proc = current()
    node = proc.node
    contact = _node_id(address)
    start_membership(node)
    state = _states[node]
    done: asyncio.Future[tuple[NodeId, ...]] = node.loop.create_future()
    node.send_local(state.pid, _JoinLocal(contact, done))
    try:
        return await proc.guarded(asyncio.wait_for(done, timeout))
    except asyncio.TimeoutError:
        raise JoinError(
            f"node {contact} did not answer the join within {timeout:g} s: is it a member"
            " of a running cluster (hpcproc.run, hpcproc.join or hp.join started its"
            " membership process)?"
        ) from None
    except NodeUnreachableError as exc:
        raise JoinError(f"cannot reach node {contact} to join through it: {exc}") from exc


def _node_id(address: NodeId | bytes | str) -> NodeId:
    if isinstance(address, NodeId):
        return address
    if isinstance(address, str):
        text = address.strip()
        if text.startswith("nid://"):
            text = text[len("nid://") :]
        from .transports import available

        # "route": the routing transports' addresses (shm+tcp, ...) share one scheme.
        if text.partition(":")[0] not in (*available(), "route"):
            raise ValueError(
                f"{address!r} is not a node address: give the member's full endpoint"
                " address as node_id.full() prints it (e.g. nid://tcp://host:port/...;"
                f" it starts with a transport name: {', '.join(available())})"
            )
        return NodeId(text.encode())
    return NodeId(bytes(address))


def nodes() -> tuple[NodeId, ...]:
    """The other member nodes as this node sees them now (empty if it is no member).

    Raises:
        NotInProcessError: called outside a process.
    """
    state = _states.get(current().node)
    return tuple(state.members) if state is not None else ()


def leader() -> NodeId | None:
    """The cluster's leader as this node knows it (the master of an hpcproc.run job).

    Raises:
        NotInProcessError: called outside a process.
    """
    node = current().node
    state = _states.get(node)
    return state.leader if state is not None else None


def monitor_nodes(flag: bool = True) -> None:
    """Subscribe the calling process to :class:`NodeUp` / :class:`NodeDown` messages
    (``flag=False``: unsubscribe). Effective at once: every membership change this
    node handles after the call is reported, none before it. Makes this node a member
    (of a cluster of one) if it was not.

    Raises:
        NotInProcessError: called outside a process.
    """
    proc = current()
    start_membership(proc.node)
    state = _states[proc.node]
    if flag:
        state.subscribers[proc.pid] = None
    else:
        state.subscribers.pop(proc.pid, None)


def members_of(node: Node) -> tuple[NodeId, ...]:
    """``node``'s view (for launchers, outside a process)."""
    state = _states.get(node)
    return tuple(state.members) if state is not None else ()
