"""One monitor per called server and node, shared by every call made from that node;
and the timeouts of those calls.

A call must end at once when its server dies, must end when its timeout passes, and
must leave nothing in the caller's mailbox. A monitor of the caller's own does the
first, but costs two control messages to the server's node per call (monitor, then
unmonitor); a timer of its own (``receive_chan(port, timeout)``) does the second, but
costs an event-loop timer per call (made, pushed on the loop's heap, cancelled). So
each node runs one *call watch* process (registered as :data:`NAME`) that does both
for all calls of the node:

* The first call to a server asks the watch to monitor that server. Every call
  registers its reply port under its tag while it waits (a plain dictionary shared by
  the node's processes, which run on one event loop); when the server's DOWN reaches
  the watch, it sends every waiting caller ``(tag, None, reason)`` on the caller's
  private reply channel.
* A call registers its deadline with its port (no timer of its own). The watch sleeps
  until the earliest deadline it knows of, then sends each caller whose deadline
  passed ``(tag, TIMED_OUT, None)`` and sleeps until the earliest deadline of the
  calls still waiting. A call whose deadline is earlier than the watch's wake-up time
  wakes the watch with a message; with calls of one timeout in a row that happens once
  per timeout period at most, and the watch looks only at calls still waiting.

So a call costs its two messages only, a death still ends every waiting call at once,
and a notice that comes after its call ended lands on the reply channel, where the
caller's next request drops it. The watch keeps one monitor per live server ever
called from its node; a server's DOWN removes it. If the watch itself ends, it tells
each waiting caller ``(tag, WATCH_ENDED, None)``, and the caller registers again with
a new watch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import hpcproc as hp

from ._at_once import monitor_at_once

__all__ = [
    "BY_NODE",
    "NAME",
    "TIMED_OUT",
    "WATCH_ENDED",
    "State",
    "Waiting",
    "waiting_for",
    "waiting_now",
    "wake",
]

#: The registered name of a node's call watch.
NAME = "hpcproc.otp.call_watch"

# The watch and its callers share a node, and a local send of a tuple of immutable
# values passes the tuple itself: callers test the notices' second field with ``is``.

#: The second field of the notice a caller gets when its timeout passed.
TIMED_OUT = "$hpcproc.otp.timed_out"
#: The second field of the notice a caller gets when the watch ended under it.
WATCH_ENDED = "$hpcproc.otp.watch_ended"

#: Tag -> (reply port, deadline) of the calls waiting for one server; the deadline is
#: in ``time.monotonic()`` seconds (``math.inf``: none).
Waiting = dict[int, tuple[hp.SendPort[Any], float]]


@dataclass(eq=False, slots=True)
class State:
    """A node's call watch: what calls read and write without awaiting it."""

    pid: hp.Pid
    node: hp.NodeId
    servers: dict[hp.Pid, Waiting] = field(default_factory=dict)
    #: When the watch wakes next (monotonic time; inf: only for a message; -inf: a
    #: wake-up message is on its way).
    wake_at: float = math.inf


#: Call-watch pid -> its state (one watch per node; a node's watch, if it was
#: killed, is replaced by a new one with a new state).
_states: dict[hp.Pid, State] = {}

#: Node -> the state of its live watch: what a call looks up (one dictionary read).
BY_NODE: dict[hp.NodeId, State] = {}

#: The message that wakes the watch for an early deadline.
_WAKE = "$hpcproc.otp.wake"


async def _watch(state: State) -> None:
    refs: dict[hp.MonitorRef, hp.Pid] = {}
    try:
        while True:
            msg = await hp.expect(timeout=await _time_out(state))
            if type(msg) is hp.Pid:
                # On the control queue: the watch sends nothing to servers, so its monitor
                # needs no place among messages, and it must not wait for a connect to
                # a node that does not answer (it times every call of the node out).
                refs[monitor_at_once(msg)] = msg
            elif type(msg) is hp.ProcessMonitorNotification:
                server = refs.pop(msg.ref, None)
                if server is None:
                    continue
                for tag, (port, _) in list(state.servers.pop(server, {}).items()):
                    await hp.send_chan(port, (tag, None, msg.reason))
    finally:
        _states.pop(state.pid, None)
        if BY_NODE.get(state.node) is state:
            del BY_NODE[state.node]
        if hp.whereis(NAME) == state.pid:
            hp.unregister(NAME)  # now, so that the callers told below find a new watch
        state.wake_at = -math.inf  # a call that still finds this state wakes us: no one
        for waiting in state.servers.values():
            for tag, (port, _) in list(waiting.items()):
                await hp.send_chan(port, (tag, WATCH_ENDED, None))


async def _time_out(state: State) -> float | None:
    """Tell the calls whose deadline passed; the seconds until the next deadline
    (None: no waiting call has one)."""
    now = time.monotonic()
    first = math.inf
    for waiting in list(state.servers.values()):
        for tag, (port, deadline) in list(waiting.items()):
            if deadline <= now:
                del waiting[tag]  # told once; the call's own clean-up finds it gone
                await hp.send_chan(port, (tag, TIMED_OUT, None))
            elif deadline < first:
                first = deadline
    state.wake_at = first
    return None if first == math.inf else max(0.0, first - now)


async def wake(state: State) -> None:
    """Wake ``state``'s watch (a deadline earlier than its wake-up time was added)."""
    state.wake_at = -math.inf  # woken already: later calls need not send again
    await hp.send(state.pid, _WAKE)


def waiting_now(server: hp.Pid) -> Waiting | None:
    """:func:`waiting_for` when the watch already monitors ``server`` (no await), else
    None. (Hot paths read ``BY_NODE[node].servers.get(server)`` themselves.)"""
    state = BY_NODE.get(hp.self_node())
    return None if state is None else state.servers.get(server)


async def waiting_for(server: hp.Pid) -> tuple[State, Waiting]:
    """The node's watch and its registry of calls waiting for ``server`` (add
    ``tag: port`` while waiting, remove it after); the node's watch monitors
    ``server`` from the first call on."""
    me = hp.self_pid()
    state = BY_NODE.get(me.node)
    if state is None or hp.whereis(NAME) != state.pid:  # (a watch killed before it ran)
        watch = hp.spawn_local(_watch_started)
        state = _states[watch] = BY_NODE[me.node] = State(watch, me.node)
        hp.register(NAME, watch)
    waiting = state.servers.get(server)
    if waiting is None:
        waiting = state.servers[server] = {}
        await hp.send(state.pid, server)  # the watch monitors it
    return state, waiting


async def _watch_started() -> None:
    await _watch(_states[hp.self_pid()])
