"""The node controller: acts on control messages and runs requests to other nodes.

Each control message type (:mod:`._control`) has one handler, found in a dispatch
table built when the node is made; a handler is a method of the part that owns the
state the message is about (the registry, the watches, spawning) or of the
controller itself for the small ones (kill, exit, deliver, introspection). A handler
takes ``(node the message came from, message)`` and never raises into the
dispatcher.

Requests (spawn, whereis_remote, register_remote, node watches, introspection) carry a
number that the other node's :class:`~._control.Reply` repeats; the waiting future is
failed with :class:`~hpcproc.NodeUnreachableError` when that node is lost or this
one closes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._errors import NodeUnreachableError
from ._ids import NodeId
from ._process import Kill
from ._signals import DiedNodeDown
from .serialization import SerializationError

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["Controller"]

log = logging.getLogger("hpcproc")

_Handler = Callable[[NodeId, Any], None]


class Controller:
    """Dispatches one node's incoming control messages; tracks its pending requests."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: req -> (node, future, error class, hook run as the reply is handled)
        self._requests: dict[
            int,
            tuple[NodeId, asyncio.Future[Any], type[Exception], Callable[[Any], None] | None],
        ] = {}
        #: req -> (node, hook): requests given up on (cancelled, timed out) whose success
        #: still needs undoing when its reply comes (see :meth:`request`).
        self._abandoned: dict[int, tuple[NodeId, Callable[[Any], None]]] = {}
        self._reqs = itertools.count(1)
        watches, registry = node.watches, node.registry
        self._handlers: dict[type, _Handler] = {
            ctl.Died: watches.on_died,
            ctl.Reply: self._on_reply,
            ctl.SpawnReq: node.spawner.on_spawn_req,
            ctl.LinkReq: watches.on_link,
            ctl.MonitorReq: watches.on_link,
            ctl.UnlinkReq: watches.on_unlink,
            ctl.UnmonitorReq: watches.on_unlink,
            ctl.NodeWatch: watches.on_node_watch,
            ctl.NodeDown: self._on_node_down,
            ctl.KillReq: self._on_kill,
            ctl.Exit: self._on_exit,
            ctl.NSend: registry.on_nsend,
            ctl.Deliver: self._on_deliver,
            ctl.WhereIs: registry.on_whereis,
            ctl.Register: registry.on_register,
            ctl.GetInfo: self._on_get_info,
            ctl.GetStats: self._on_get_stats,
        }

    @property
    def message_types(self) -> frozenset[type]:
        """The control message types this controller has a handler for."""
        return frozenset(self._handlers)

    def handle(self, nid: NodeId, msg: Any) -> None:
        """Act on one control message from node ``nid`` (also used for self-posts)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning(
                "hpcproc node %s: unknown control message %r", self._node.node_id, type(msg)
            )
            return
        handler(nid, msg)

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        nid: NodeId,
        make: Callable[[int], Any],
        error: type[Exception],
        timeout: float | None = None,
        on_ok: Callable[[Any], None] | None = None,
        on_late_ok: Callable[[Any], None] | None = None,
    ) -> Any:
        """Post ``make(req)`` to ``nid`` and return the value of its reply.

        ``on_ok(value)`` runs as a successful reply is handled, before any later
        control message from ``nid``. ``on_late_ok(value)`` runs instead when the
        caller gave up (cancelled, timed out) after the request went, and the reply
        then says it succeeded: to undo what the caller no longer knows of.

        Raises:
            error: the reply says the request failed (``error(text)``), or the
                request cannot be pickled.
            NodeUnreachableError: ``nid`` was lost or this node closed meanwhile.
            asyncio.TimeoutError: no reply within ``timeout``.
        """
        node = self._node
        node.check_open()
        req = next(self._reqs)
        fut: asyncio.Future[Any] = node.loop.create_future()
        self._requests[req] = (nid, fut, error, on_ok)
        posted = False
        try:
            try:
                node.remote.post(nid, make(req))
            except SerializationError as exc:
                raise error(f"cannot send the request to node {nid}: {exc}") from exc
            posted = True
            # As a process waiting in receive does: take the reply (and whatever comes
            # before it) from the endpoint ourselves while the loop is otherwise idle.
            poll = node.incoming.poll_inline
            while not fut.done() and poll():
                pass
            if timeout is None or fut.done():
                return await fut
            return await asyncio.wait_for(fut, timeout)
        finally:
            if self._requests.pop(req, None) is not None and posted and on_late_ok is not None:
                self._abandoned[req] = (nid, on_late_ok)

    def reply(self, nid: NodeId, req: int, ok: bool, value: Any) -> None:
        """Answer request ``req`` of node ``nid``: ``value`` if ``ok``, else an error text."""
        self._node.remote.post(nid, ctl.Reply(req, ok, value))

    def fail_requests(self, nid: NodeId | None, text: str) -> None:
        """Fail the pending requests to ``nid`` (every one if None) with NodeUnreachableError."""
        for req, (rnid, fut, _, _) in list(self._requests.items()):
            if nid is None or rnid == nid:
                del self._requests[req]
                if not fut.done():
                    fut.set_exception(NodeUnreachableError(text))
        for req, (rnid, _) in list(self._abandoned.items()):
            if nid is None or rnid == nid:
                del self._abandoned[req]  # no reply will come

    def _on_reply(self, nid: NodeId, msg: ctl.Reply) -> None:
        entry = self._requests.pop(msg.req, None)
        if entry is None:
            late = self._abandoned.pop(msg.req, None)
            if late is not None and msg.ok:
                late[1](msg.value)
            return
        _, fut, error, on_ok = entry
        if fut.done():
            return
        if msg.ok:
            if on_ok is not None:
                on_ok(msg.value)
            fut.set_result(msg.value)
        else:
            fut.set_exception(error(msg.value))

    # ------------------------------------------------------------------ small handlers

    def _on_node_down(self, nid: NodeId, msg: ctl.NodeDown) -> None:
        self._node.node_lost(nid, DiedNodeDown())

    def _on_kill(self, nid: NodeId, msg: ctl.KillReq) -> None:
        tp = self._node.process(msg.target)
        if tp is not None:
            tp.signal(Kill(msg.text))

    def _on_exit(self, nid: NodeId, msg: ctl.Exit) -> None:
        self._node.exit(msg.sender, msg.target, msg.reason)

    def _on_deliver(self, nid: NodeId, msg: ctl.Deliver) -> None:
        self._node.deliver_to(msg.target, msg.msg)

    def _on_get_info(self, nid: NodeId, msg: ctl.GetInfo) -> None:
        self.reply(nid, msg.req, True, self._node.introspection.process_info(msg.pid))

    def _on_get_stats(self, nid: NodeId, msg: ctl.GetStats) -> None:
        self.reply(nid, msg.req, True, self._node.introspection.stats())
