"""hpcproc: Erlang / Cloud Haskell style distributed processes for Python on HPC clusters.

A :class:`Node` owns one transport endpoint and runs processes: ``async def``
functions with a mailbox. Inside a process, the functions of this module act on the
current process::

    import hpcproc as hp

    async def echo() -> None:
        while True:
            sender, text = await hp.expect(tuple)
            await hp.send(sender, text)

    async def main() -> None:
        pid = hp.spawn_local(echo)
        await hp.send(pid, (hp.self_pid(), "hi"))
        print(await hp.expect(str))

    async with hp.Node(hp.transports.create("inmemory")) as node:
        await node.run(main)

See DESIGN.md section 4 for the semantics (per-pair ordering, links, monitors, ...).
"""

from __future__ import annotations

from . import transports
from ._api import (
    CallError,
    call,
    exit,
    expect,
    get_node_stats,
    get_process_info,
    kill,
    link,
    link_node,
    monitor,
    monitor_node,
    new_chan,
    nsend,
    nsend_remote,
    receive,
    receive_chan,
    reconnect,
    redirect_logs,
    register,
    register_remote,
    say,
    self_node,
    self_pid,
    send,
    send_chan,
    spawn,
    spawn_link,
    spawn_local,
    spawn_monitor,
    terminate,
    unlink,
    unmonitor,
    unregister,
    unsafe_send,
    whereis,
    whereis_remote,
)
from ._channels import ReceivePort, SendPort
from ._errors import (
    NodeUnreachableError,
    NotInProcessError,
    ProcessRegistrationException,
    SpawnError,
)
from ._ids import MonitorRef, NodeId, Pid
from ._info import NodeStats, ProcessInfo
from ._logger import LogRecord
from ._matching import Matcher, match, match_any, match_chan, match_if
from ._membership import JoinError, NodeDown, NodeUp, join, monitor_nodes, nodes
from ._node import Node, ProcessKilledError
from ._signals import (
    DiedDisconnect,
    DiedException,
    DiedNodeDown,
    DiedNormal,
    DiedReason,
    DiedUnknownId,
    NodeLinkException,
    NodeMonitorNotification,
    PortMonitorNotification,
    ProcessExitException,
    ProcessLinkException,
    ProcessMonitorNotification,
    ProcessTerminationException,
)
from .serialization import SerializationError

__all__ = [
    "CallError",
    "DiedDisconnect",
    "DiedException",
    "DiedNodeDown",
    "DiedNormal",
    "DiedReason",
    "DiedUnknownId",
    "JoinError",
    "LogRecord",
    "Matcher",
    "MonitorRef",
    "Node",
    "NodeDown",
    "NodeId",
    "NodeLinkException",
    "NodeMonitorNotification",
    "NodeStats",
    "NodeUnreachableError",
    "NodeUp",
    "NotInProcessError",
    "Pid",
    "PortMonitorNotification",
    "ProcessExitException",
    "ProcessInfo",
    "ProcessKilledError",
    "ProcessLinkException",
    "ProcessMonitorNotification",
    "ProcessRegistrationException",
    "ProcessTerminationException",
    "ReceivePort",
    "SendPort",
    "SerializationError",
    "SpawnError",
    "call",
    "exit",
    "expect",
    "get_node_stats",
    "get_process_info",
    "join",
    "kill",
    "link",
    "link_node",
    "match",
    "match_any",
    "match_chan",
    "match_if",
    "monitor",
    "monitor_node",
    "monitor_nodes",
    "new_chan",
    "nodes",
    "nsend",
    "nsend_remote",
    "receive",
    "receive_chan",
    "reconnect",
    "redirect_logs",
    "register",
    "register_remote",
    "say",
    "self_node",
    "self_pid",
    "send",
    "send_chan",
    "spawn",
    "spawn_link",
    "spawn_local",
    "spawn_monitor",
    "terminate",
    "transports",
    "unlink",
    "unmonitor",
    "unregister",
    "unsafe_send",
    "whereis",
    "whereis_remote",
]
