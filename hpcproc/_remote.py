"""Remote sending: process-pair connections and the control queues to other nodes.

User messages. Every message between two processes on different nodes travels on one
lightweight connection per (sender, receiver) pair, opened on the sender's first
``send`` and reused (kept in the sending process, ``Process.conns``); its first
message starts with a bind frame naming both ends (:mod:`._control`). A pair
connection that fails, or whose node is lost, is marked :data:`BROKEN` and further
sends on that pair are dropped until the sender calls ``reconnect``, so a receiver
always sees a prefix of what one sender sent per connection. Disconnect counts as
failure: when the pair breaks (a connect or send fails), the sender's monitors of the
receiver and its link to it fire with ``DiedDisconnect`` at once, even where the
receiver's node is not lost (``Watches.pair_broken``).

Signals from one process to another (link, monitor, their undoing, exit, kill, and
the death notices a process's end sends its watchers) go on the pair connection
(:meth:`RemoteSender.send_signal`, :meth:`RemoteSender.last_signal`), so that each
keeps its place among the pair's messages: a monitor set before a message is in place
when the message arrives, and a death notice comes after the dead process's last
message. A live process's signal opens the pair connection if there is none; an ended
process's go on the control queue where it has none, or where their send on it
fails, and so does any signal on a broken pair.

Control messages (spawn, registry, replies, and the signals above without a pair
connection) use one more connection per pair of nodes, fed by a FIFO queue
(:class:`ControlOut`) so that posting never blocks. Messages are serialized when
posted; a drain task per node opens the connection and sends them in order. A send
that fails is retried once on a new bundle; when that fails too, the node is lost
(``Node.node_lost``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._ids import NodeId, Pid
from ._signals import DiedDisconnect
from .serialization import serialize
from .transports.base import TransportError

if TYPE_CHECKING:
    from ._node import Node
    from ._process import Process

__all__ = ["BROKEN", "CONTROL_CONNECT_TIMEOUT", "ControlOut", "RemoteSender"]

log = logging.getLogger("hpcproc")

#: Marks a process-pair connection lost until ``reconnect``.
BROKEN: Any = object()
#: Bound on establishing a controller connection to another node.
CONTROL_CONNECT_TIMEOUT = 30.0


class ControlOut:
    """Outgoing controller traffic to one node: a FIFO of serialized control messages,
    drained by one task."""

    __slots__ = ("bound", "conn", "dead", "queue", "task", "unreachable", "waiter")

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()
        self.conn: Any = None
        self.bound = False
        self.dead = False
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        #: Why the last connect failed (authentication, not found...), for the callers.
        self.unreachable: str | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class RemoteSender:
    """A node's outgoing traffic to other nodes (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._control: dict[NodeId, ControlOut] = {}
        #: Pair connection -> the last signals of its ended process that could not go
        #: out at once, ``(frames, node, signal)``; sent before the connection is
        #: closed (:meth:`process_ended`).
        self._last: dict[Any, list[tuple[list[Any], NodeId, Any]]] = {}
        #: Set by :meth:`flush` (the node is closing): nothing is posted any more.
        self._flushed = False

    def nodes(self) -> list[NodeId]:
        """The nodes this one has a control queue to."""
        return list(self._control)

    # ------------------------------------------------------------------ process pairs

    async def send(
        self, proc: Process, pid: Pid, msg: Any, frames: list[Any] | None = None
    ) -> None:
        """Send ``msg`` from ``proc`` to ``pid`` on another node, on their pair connection.

        Opens the connection on first use. If opening or sending fails, the pair is
        marked broken and this and later messages are dropped until ``reconnect``.
        ``frames``: ``msg`` serialized already (by :meth:`try_send`).

        Raises:
            SerializationError: ``msg`` cannot be pickled.
        """
        conns = proc.conns
        if conns is None or conns.get(pid) is not BROKEN:
            await self._send_on_pair(proc, pid, frames if frames is not None else serialize(msg))

    async def _send_on_pair(self, proc: Process, pid: Pid, frames: list[Any]) -> bool:
        """Send ``frames`` on ``proc``'s pair connection to ``pid``, opened first if
        there is none (its first message starts with the bind frame). False, nothing
        sent, if the pair is broken or cannot be opened; a send that fails breaks the
        pair (the message is dropped, True)."""
        conns = proc.conns
        if conns is None:
            conns = proc.conns = {}
        conn = conns.get(pid)
        if conn is None:
            conn, fresh = await self._open_pair(proc, conns, pid)
            if fresh:
                frames = [ctl.bind_frame(pid.lid, proc.pid.lid), *frames]
        if conn is BROKEN:
            return False
        try:
            if not conn.send_nowait(frames):
                await conn.send(frames)
        except TransportError as exc:
            self._send_failed(proc, pid, conn, exc)
        return True

    async def _open_pair(self, proc: Process, conns: dict[Pid, Any], pid: Pid) -> tuple[Any, bool]:
        """Open ``proc``'s pair connection to ``pid`` (``conns`` has none): the
        connection and True (the caller's message goes first, after the bind frame),
        or what ``conns`` holds once the connect is done, and False: the connection
        another task of ``proc`` opened meanwhile, or :data:`BROKEN`.

        One pair, one connection: the receiving node counts them to know when a
        process's last messages have arrived (``Incoming.after_messages_of``).
        """
        try:
            conn = await self._node.endpoint.connect(pid.node.address)
        except TransportError as exc:
            log.debug("cannot connect %r -> %r: %r", proc.pid, pid, exc)
            conn = None
        now = conns.get(pid)
        if now is not None:
            if conn is not None:
                self._node.in_background(conn.close())  # never bound: the peer ignores it
            return now, False
        if conn is None:
            conns[pid] = BROKEN
            self._node.watches.pair_broken(proc, pid)
            return BROKEN, False
        conns[pid] = conn
        return conn, True

    def try_send(self, proc: Process, pid: Pid, msg: Any) -> list[Any] | None:
        """Send ``msg`` at once when its pair connection is open and the transport
        takes it without waiting (or drop it, as :meth:`send` does on a failure):
        None. Otherwise nothing is sent: ``msg``'s frames, for :meth:`send`. (A
        caller that fell back to ``send`` used to serialize a large message twice: a
        process round trip of a 256 KiB array over mpi took 137-141 us that way,
        124-127 us this way.)

        Raises:
            SerializationError: ``msg`` cannot be pickled.
        """
        frames = serialize(msg)
        conns = proc.conns
        conn = conns.get(pid) if conns is not None else None
        if conn is None or conn is BROKEN:
            return frames
        try:
            if conn.send_nowait(frames):
                return None
        except TransportError as exc:
            self._send_failed(proc, pid, conn, exc)
            return None  # dropped, as send drops it
        return frames

    async def send_signal(self, proc: Process, pid: Pid, msg: Any) -> None:
        """Send the signal ``msg`` (one of :data:`~._control.PAIR_SIGNALS`) from ``proc``
        to ``pid`` on another node, in its place among ``proc``'s messages to ``pid``.

        It goes on their pair connection, opened now if there is none (so that later
        messages cannot overtake it): may wait for the connect, as a first ``send``
        does. On a broken pair, which drops messages until ``reconnect``, or one that
        cannot be opened, it goes on the control queue to ``pid``'s node instead
        (which delivers it, or finds the node lost and fires the watches on it); but
        not a link or monitor request whose watch fired as the pair broke under it
        (``Watches.pair_broken``). If the pair connection fails under it, it is
        dropped with the pair's messages, and the break fires ``proc``'s watches on
        ``pid``.

        Raises:
            SerializationError: ``msg`` cannot be pickled.
        """
        sent = await self._send_on_pair(proc, pid, ctl.signal_frames(msg))
        if not sent and not self._node.watches.fired(msg):
            self.post(pid.node, msg)

    def post_signal(self, msg: Any) -> None:
        """Post the signal ``msg`` (None: nothing) on the control queue to its
        target's node, without waiting: for a request that needs no place among its
        sender's messages (see :meth:`send_signal`)."""
        if msg is not None:
            self.post(msg.target.node, msg)

    def last_signal(self, proc: Process, pid: Pid, msg: Any) -> None:
        """:meth:`send_signal` for ``proc``, which has ended (its death notice to a
        watcher, the undoing of its own watches), without opening a connection: sent
        before :meth:`process_ended` closes the pair connection. Without a pair
        connection, on a broken one, or when the send on it fails, it goes on the
        control queue to ``pid``'s node instead."""
        conns = proc.conns
        conn = conns.get(pid) if conns is not None else None
        if conn is None or conn is BROKEN:
            self.post(pid.node, msg)
            return
        frames = ctl.signal_frames(msg)
        backlog = self._last.get(conn)
        if backlog is None:
            try:
                if conn.send_nowait(frames):
                    return
            except TransportError as exc:
                self._send_failed(proc, pid, conn, exc)
                # Not lost with the pair's messages: a death notice is the last thing
                # its watcher hears from proc, and the undoing of a watch must reach
                # the target's node. (As for a pair that broke before.)
                self.post(pid.node, msg)
                return
            if self._node.closed:
                # No closing task will run for it: the control queue's flush does.
                self.post(pid.node, msg)
                return
            backlog = self._last[conn] = []
        backlog.append((frames, pid.node, msg))

    def _send_failed(self, proc: Process, pid: Pid, conn: Any, exc: TransportError) -> None:
        """The pair connection broke: drop messages to ``pid`` until ``reconnect``,
        and fire ``proc``'s watches on ``pid`` (``Watches.pair_broken``)."""
        log.debug("send %r -> %r failed: %r", proc.pid, pid, exc)
        assert proc.conns is not None
        if proc.conns.get(pid) is conn:  # (not one that ``reconnect`` replaced meanwhile)
            proc.conns[pid] = BROKEN
            self._node.watches.pair_broken(proc, pid)
        self._node.in_background(conn.close())

    def reconnect(self, proc: Process, pid: Pid) -> None:
        """Forget ``proc``'s (possibly broken) connection to ``pid``: the next send reopens it."""
        if proc.conns is None:
            return
        conn = proc.conns.pop(pid, None)
        if conn is not None and conn is not BROKEN:
            self._node.in_background(conn.close())

    def process_ended(self, proc: Process) -> None:
        """Close the pair connections of ``proc``, which ended, after sending the last
        signals that :meth:`last_signal` could not send at once."""
        if proc.conns:
            conns = [c for c in proc.conns.values() if c is not BROKEN]
            if self._last:
                # Each in a task of its own: a slow peer must not hold the others.
                for conn in [c for c in conns if c in self._last]:
                    backlog = self._last.pop(conn)
                    self._node.in_background(_send_then_close(conn, backlog, self.post))
                    conns.remove(conn)
            if conns and not self._node.closed:
                self._node.in_background(_close_all(conns))

    # ------------------------------------------------------------------ control out

    def post(self, nid: NodeId, msg: Any) -> None:
        """Queue a control message for ``nid``'s controller; never blocks, FIFO per node.

        The message is serialized now, so the receiver gets it as it is at this call
        (copy semantics, as for ``send``). A message to this node itself is handled at
        the loop's next round. After :meth:`flush` (the node closing) it is dropped.

        Raises:
            SerializationError: ``msg`` cannot be pickled (nothing is queued).
        """
        node = self._node
        if self._flushed:
            return
        if nid == node.node_id:
            node.loop.call_soon(node.controller.handle, nid, msg)
            return
        out = self._control.get(nid)
        if out is None and node.closed and not isinstance(msg, ctl.NodeDown | ctl.Died):
            return
        frames = serialize(msg)
        if out is None:
            out = self._control[nid] = ControlOut()
            out.task = node.loop.create_task(self._drain(nid, out))
        elif not out.queue and out.bound and out.conn is not None and not out.dead:
            # Nothing queued before it and the connection is open: send it now if that
            # needs no waiting, saving the drain task a wake-up (a round of the loop).
            try:
                if out.conn.send_nowait(frames):
                    return
            except TransportError as exc:
                log.debug("control send to %s failed: %r", nid, exc)
                # Not delivered: the drain task opens a new bundle and sends it there.
                conn, out.conn = out.conn, None
                node.in_background(conn.close())
        out.queue.append(frames)
        out.wake()

    async def _drain(self, nid: NodeId, out: ControlOut) -> None:
        loop = self._node.loop
        try:
            while True:
                while out.queue:
                    frames = out.queue[0]
                    if not await self._send_control(nid, out, frames):
                        if self._control.get(nid) is out:
                            if out.unreachable is not None:
                                # Say why (a cookie mismatch, say), not "lost connection".
                                self._node.controller.fail_requests(nid, out.unreachable)
                            self._node.node_lost(nid, DiedDisconnect())
                        return
                    if out.queue:
                        out.queue.popleft()
                if out.dead:
                    return
                out.waiter = loop.create_future()
                await out.waiter
                out.waiter = None
        finally:
            if out.conn is not None:
                conn, out.conn = out.conn, None
                try:
                    await conn.close()
                except Exception as exc:
                    log.debug("closing control connection failed: %r", exc)

    async def _send_control(self, nid: NodeId, out: ControlOut, frames: list[Any]) -> bool:
        for _ in range(2):
            if out.conn is None:
                try:
                    out.conn = await self._node.endpoint.connect(
                        nid.address, timeout=CONTROL_CONNECT_TIMEOUT
                    )
                except TransportError as exc:
                    log.debug("cannot reach node %s: %r", nid, exc)
                    out.unreachable = f"cannot reach node {nid}: {exc}"
                    return False
                if self._control.get(nid) is not out:
                    # The node was lost while we connected: its requests were failed
                    # already, so this one must not run there after all.
                    return False
                out.bound = False
            try:
                if out.bound:
                    await out.conn.send(frames)
                else:
                    await out.conn.send([ctl.bind_frame(), *frames])
                    out.bound = True
                return True
            except TransportError as exc:
                # Not delivered (SendError): retry once on a new bundle.
                log.debug("control send to %s failed: %r", nid, exc)
                out.conn = None
        return False

    def drop_node(self, nid: NodeId) -> None:
        """``nid`` is lost: discard its control queue and close its connection."""
        out = self._control.pop(nid, None)
        if out is not None:
            out.dead = True
            out.queue.clear()
            out.wake()
            if out.conn is not None:
                self._node.in_background(out.conn.close())

    def break_pairs(self, nid: NodeId, procs: Iterable[Process]) -> None:
        """``nid`` is lost: every pair connection of ``procs`` to a process there is
        marked broken now, not at its next send (which would fail and be dropped the
        same way), so that whoever looks (OTP requests, which reopen it) sees it."""
        closing = []
        for proc in procs:
            conns = proc.conns
            if conns:
                for pid, conn in conns.items():
                    if conn is not BROKEN and pid.node == nid:
                        conns[pid] = BROKEN
                        closing.append(conn)
        if closing and not self._node.closed:
            self._node.in_background(_close_all(closing))

    async def flush(self, timeout: float) -> None:
        """Send what is queued (each drain bounded by ``timeout``), then stop the drains.

        Called by ``Node.close``: messages posted after it are not sent.
        """
        self._flushed = True
        outs = list(self._control.values())
        for out in outs:
            out.dead = True
            out.wake()
        drains = [out.task for out in outs if out.task is not None]
        if drains:
            await asyncio.wait(drains, timeout=timeout)
        for task in drains:
            task.cancel()


async def _send_then_close(
    conn: Any,
    backlog: list[tuple[list[Any], NodeId, Any]],
    post: Callable[[NodeId, Any], None],
) -> None:
    """Send ``backlog``'s signals on ``conn`` in order, then close it. If a send
    fails, that signal and the rest are ``post``-ed (control queue) instead, as
    :meth:`RemoteSender.last_signal` does."""
    try:
        for i, (frames, _, _) in enumerate(backlog):
            try:
                await conn.send(frames)
            except TransportError as exc:
                log.debug("sending the last signals of a process failed: %r", exc)
                for _, nid, msg in backlog[i:]:
                    post(nid, msg)
                break
    finally:
        await _close_all([conn])


async def _close_all(conns: list[Any]) -> None:
    for conn in conns:
        try:
            await conn.close()
        except Exception as exc:
            log.debug("closing a connection failed: %r", exc)
