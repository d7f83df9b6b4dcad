"""Incoming traffic: the connections other nodes opened to this one, and their messages.

Every incoming connection starts with a bind frame (:mod:`._control`) that says what
it carries: the messages of one process pair (then each goes into the receiving
process's mailbox, dropped if the process has ended) or control messages (then each
goes to the node's controller). :meth:`Incoming.handle_event` acts on one endpoint
event; the node's dispatcher task calls it, and so does a process waiting in
``receive`` that took the event from the endpoint itself (:meth:`Incoming.poll_inline`):
events are handled in the order the endpoint hands them out, whoever takes them.

A process-pair connection also carries the signals of its sending process to its
receiving one (link, monitor, exit..., and the sender's death notice), marked by
their first byte (:data:`~._control.SIGNAL`); they go to the controller in their
place among the messages, and are acted on even if the receiving process has ended.

Once a connection is bound to a process, the endpoint is asked to hand that
connection's later messages to the process at once (``EndPoint.set_receiver``): no
event, no queue, no dispatcher woken. The endpoint keeps them in order with its events.

Everything here runs on the event loop thread of the node; nothing is thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pickle import UnpicklingError
from typing import TYPE_CHECKING

from . import _control as ctl
from ._ids import NodeId, Pid
from .serialization import SerializationError, deserialize, load_header
from .transports.base import (
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    ErrorEvent,
    Event,
    EventError,
    Received,
)

if TYPE_CHECKING:
    from ._node import Node
    from ._process import Process

__all__ = ["Incoming", "IncomingConnection"]

log = logging.getLogger("hpcproc")


class IncomingConnection:
    """What an incoming connection carries; bound by its first message."""

    __slots__ = ("dest", "kind", "node", "src")

    def __init__(self, node: NodeId) -> None:
        self.node = node
        self.kind = 0
        self.dest = 0
        self.src = 0


class Incoming:
    """The node's incoming connections, by connection id, and what to do with their data.

    ``on_error`` is told of every endpoint error event (the node's failure handling).
    """

    def __init__(
        self,
        node: Node,
        procs: dict[int, Process],
        on_error: Callable[[EventError], None],
    ) -> None:
        self._node = node
        self._procs = procs
        self._on_error = on_error
        #: The open incoming connections by connection id.
        self.connections: dict[int, IncomingConnection] = {}
        self._endpoint: EndPoint | None = None
        #: The endpoint's ``receive_nowait`` once opened (a process waiting in
        #: ``receive`` calls it directly, then :meth:`handle_event`).
        self.receive_nowait: Callable[[], Event | None] | None = None
        #: Messages the endpoint handed to a process directly: a receive that polled
        #: tells by this count whether its poll delivered something.
        self.direct_deliveries = 0
        #: (node, local id) of a process there -> how many of its pair connections to
        #: this node are open (see :meth:`after_messages_of`).
        self._open_from: dict[tuple[NodeId, int], int] = {}
        #: The same key -> what to run once none of them is open.
        self._when_closed: dict[tuple[NodeId, int], list[Callable[[], None]]] = {}

    def open(self, endpoint: EndPoint) -> None:
        """Start taking the data of ``endpoint`` (the node's, once it is started)."""
        self._endpoint = endpoint
        self.receive_nowait = endpoint.receive_nowait

    def handle_event(self, event: Event) -> None:
        """Act on one endpoint event (never ``EndPointClosed``); never raises."""
        try:
            kind = type(event)
            if kind is Received:
                st = self.connections.get(event.conn_id)  # type: ignore[union-attr]
                if st is None:
                    return
                frames = event.frames  # type: ignore[union-attr]
                if st.kind == 0:
                    st.kind, st.dest, st.src = ctl.parse_bind(frames[0])
                    frames = frames[1:]
                    if st.kind == ctl.PROCESS:
                        key = (st.node, st.src)
                        self._open_from[key] = self._open_from.get(key, 0) + 1
                        self._receive_directly(event.conn_id, st.dest)  # type: ignore[union-attr]
                if st.kind == ctl.PROCESS:
                    proc = self._procs.get(st.dest)
                    if proc is None:
                        if ctl.is_signal(frames):
                            self._pair_signal(st.node, frames)
                        return
                    try:
                        msg = deserialize(frames)
                    except SerializationError:
                        if not ctl.is_signal(frames):
                            raise
                        self._pair_signal(st.node, frames)
                    else:
                        proc.deliver(msg)
                else:
                    self._node.controller.handle(st.node, deserialize(frames))
            elif kind is ConnectionOpened:
                peer = NodeId(event.remote_address)  # type: ignore[union-attr]
                self.connections[event.conn_id] = IncomingConnection(peer)  # type: ignore[union-attr]
            elif kind is ConnectionClosed:
                st = self.connections.pop(event.conn_id, None)  # type: ignore[union-attr]
                if st is not None and st.kind == ctl.PROCESS:
                    self._pair_closed((st.node, st.src))
            elif kind is ErrorEvent:
                self._on_error(event.error)  # type: ignore[union-attr]
        except Exception:
            log.exception("hpcproc dispatcher: dropping a malformed or failing event")

    def _receive_directly(self, conn_id: int, dest: int) -> None:
        """Have the endpoint hand the later messages of incoming connection ``conn_id``
        (bound to process ``dest``) to that process at once, where it can
        (``EndPoint.set_receiver``); the order is the endpoint's to keep. Messages
        still queued as events are handled by :meth:`handle_event` as before."""
        assert self._endpoint is not None
        procs = self._procs
        peer = self.connections[conn_id].node

        def receive(frames: Sequence[memoryview]) -> None:
            self.direct_deliveries += 1
            proc = procs.get(dest)
            try:
                if proc is not None and len(frames) == 1:
                    try:
                        # deserialize's one-frame fast path written out: a call less per
                        # message (load_header, compiled where built, reads compact
                        # frames and pickles; a signal is neither).
                        msg = load_header(frames[0])
                    except UnpicklingError:
                        if ctl.is_signal(frames):
                            self._pair_signal(peer, frames)
                            return
                        msg = deserialize(frames)  # its general path, or its error
                elif ctl.is_signal(frames):  # acted on whether the process lives or not
                    self._pair_signal(peer, frames)
                    return
                elif proc is None:
                    return  # the process ended: dropped, as handle_event drops it
                else:
                    msg = deserialize(frames)
                proc.deliver(msg)
            except Exception:
                log.exception("hpcproc node: dropping a malformed message for lid %d", dest)

        self._endpoint.set_receiver(conn_id, receive)

    def _pair_signal(self, peer: NodeId, frames: Sequence[memoryview]) -> None:
        """Act on a signal that came on a process-pair connection from ``peer``, in
        its place among the pair's messages (see :data:`~._control.PAIR_SIGNALS`)."""
        msg = ctl.load_signal(frames)
        kind = type(msg)
        if kind not in ctl.PAIR_SIGNALS:
            log.warning("hpcproc node: dropping a %s on a process connection", kind)
            return
        if (kind is ctl.MonitorReq or kind is ctl.LinkReq) and msg.target.lid not in self._procs:
            # Answered with a Died on the control queue: sent at the loop's next round,
            # not from inside the endpoint's receive (nothing after it needs the order,
            # the target being gone).
            self._node.loop.call_soon(self._node.controller.handle, peer, msg)
            return
        self._node.controller.handle(peer, msg)

    def poll_inline(self) -> bool:
        """Take and handle one event without suspending, if the endpoint has one soon.

        Called by a process about to wait in ``receive``: when the event loop has
        nothing else to run, the transport polls its links in place for a bounded
        time (as the dispatcher's ``receive`` would), and the reply the process waits
        for is delivered without a trip round the event loop. True if an event was
        handled, or the endpoint handed a message to a process directly.
        """
        poll = self.receive_nowait
        if poll is None:
            return False
        seen = self.direct_deliveries
        event = poll()
        if event is None:
            return self.direct_deliveries != seen  # a message went straight to a process
        self.handle_event(event)
        return True

    def _pair_closed(self, key: tuple[NodeId, int]) -> None:
        left = self._open_from[key] - 1
        if left:
            self._open_from[key] = left
            return
        del self._open_from[key]
        for fn in self._when_closed.pop(key, ()):
            try:
                fn()
            except Exception:
                log.exception("hpcproc node: acting on a death notice failed")

    def after_messages_of(self, pid: Pid, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` once every pair connection from process ``pid`` (of another
        node) to this node has closed, that is after the last message ``pid`` sent to
        any process here; False, and ``fn`` is not kept, if none is open now.

        For the notice of ``pid``'s death, which its node sends when ``pid`` has ended
        and closes those connections, but on another connection: the transport orders
        messages per connection only. If ``pid``'s node is lost, ``fn`` is dropped
        (the watches on that node fire with the loss instead).
        """
        key = (pid.node, pid.lid)
        if key not in self._open_from:
            return False
        waiting = self._when_closed.get(key)
        if waiting is None:
            self._when_closed[key] = [fn]
        else:
            waiting.append(fn)
        return True

    def drop_node(self, nid: NodeId) -> None:
        """Forget the incoming connections from ``nid`` (it was lost)."""
        for cid in [c for c, st in self.connections.items() if st.node == nid]:
            del self.connections[cid]
        for key in [k for k in self._open_from if k[0] == nid]:
            del self._open_from[key]
            self._when_closed.pop(key, None)
