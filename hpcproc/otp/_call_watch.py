"""One monitor per called server and node, shared by every call made from that node.

A call must end at once when its server dies, and must leave nothing in the caller's
mailbox. A monitor of the caller's own does both, but costs two control messages to
the server's node per call (monitor, then unmonitor). Instead, each node runs one
*call watch* process (registered as :data:`NAME`): the first call to a server asks it
to monitor that server; every call registers its reply port and tag here while it
waits (a plain dictionary shared by the node's processes, which run on one event
loop); when the server's DOWN reaches the watch, it sends every waiting caller
``(tag, None, reason)`` on the caller's private reply channel. So a call costs its two
messages only, a death still ends every waiting call at once, and a notice that
comes after its call ended lands on the reply channel, where the caller's next
request drops it. The watch keeps one monitor per live server ever called from its
node; a server's DOWN removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hpcproc as hp

__all__ = ["NAME", "BY_NODE", "Waiting", "waiting_for", "waiting_now"]

#: The registered name of a node's call watch.
NAME = "hpcproc.otp.call_watch"

#: Tag -> reply port of the calls waiting for one server.
Waiting = dict[int, hp.SendPort[Any]]


@dataclass
class _State:
    pid: hp.Pid
    node: hp.NodeId
    servers: dict[hp.Pid, Waiting] = field(default_factory=dict)


#: Call-watch pid -> its state (one watch per node; a node's watch, if it was
#: killed, is replaced by a new one with a new state).
_states: dict[hp.Pid, _State] = {}

#: Node -> the servers its live watch monitors (its state's ``servers``): what a call
#: looks up, one dictionary read instead of a registry look-up.
BY_NODE: dict[hp.NodeId, dict[hp.Pid, Waiting]] = {}


async def _watch(state: _State) -> None:
    refs: dict[hp.MonitorRef, hp.Pid] = {}
    try:
        while True:
            msg = await hp.expect()
            if type(msg) is hp.Pid:
                refs[await hp.monitor(msg)] = msg
            elif type(msg) is hp.ProcessMonitorNotification:
                server = refs.pop(msg.ref, None)
                if server is None:
                    continue
                for tag, port in list(state.servers.pop(server, {}).items()):
                    await hp.send_chan(port, (tag, None, msg.reason))
    finally:
        _states.pop(state.pid, None)
        if BY_NODE.get(state.node) is state.servers:
            del BY_NODE[state.node]


def waiting_now(server: hp.Pid) -> Waiting | None:
    """:func:`waiting_for` when the watch already monitors ``server`` (no await), else
    None. (Hot paths read ``BY_NODE[node].get(server)`` themselves.)"""
    servers = BY_NODE.get(hp.self_node())
    return None if servers is None else servers.get(server)


async def waiting_for(server: hp.Pid) -> Waiting:
    """The registry of calls waiting for ``server`` (add ``tag: port`` while waiting,
    remove it after); the node's watch monitors ``server`` from the first call on."""
    watch = hp.whereis(NAME)
    state = _states.get(watch) if watch is not None else None
    if state is None:
        watch = hp.spawn_local(_watch_started)
        state = _states[watch] = _State(watch, watch.node)
        hp.register(NAME, watch)
        BY_NODE[watch.node] = state.servers
    waiting = state.servers.get(server)
    if waiting is None:
        waiting = state.servers[server] = {}
        await hp.send(state.pid, server)  # the watch monitors it
    return waiting


async def _watch_started() -> None:
    await _watch(_states[hp.self_pid()])
