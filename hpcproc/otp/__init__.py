"""OTP behaviours for hpcproc: servers, supervision trees across nodes, process groups
and a fault-tolerant map (DESIGN.md section 7).

Everything here is built on the public process API (monitors, links, selective
receive) and runs inside a process::

    from hpcproc import otp

    class Counter(otp.GenServer):
        async def init(self, start: int = 0) -> None:
            self.n = start

        async def handle_call(self, request, caller):
            self.n += request
            return self.n

    pid = await otp.start(Counter, 10)
    assert await otp.call(pid, 1) == 11

See the README section "Supervision" for a supervision tree and how each behaviour
compares with Erlang's.
"""

from __future__ import annotations

from .ft_map import MapError, TaskError, imap, map
from .gen_server import (
    NOREPLY,
    Caller,
    CallTimeout,
    GenServer,
    ServerDown,
    ServerRef,
    ServerStopped,
    StartError,
    call,
    cast,
    reply,
    start,
    stop,
)
from .pg import (
    GroupEvent,
    PgNotStarted,
    demonitor_group,
    join,
    leave,
    local_members,
    members,
    monitor_group,
    start_pg,
)
from .supervisor import (
    ChildInfo,
    ChildSpec,
    Placement,
    Supervisor,
    SupervisorError,
    SupervisorEscalation,
    delete_child,
    restart_child,
    start_child,
    start_supervisor,
    supervisor_spec,
    terminate_child,
    which_children,
)

__all__ = [
    "NOREPLY",
    "CallTimeout",
    "Caller",
    "ChildInfo",
    "ChildSpec",
    "GenServer",
    "GroupEvent",
    "MapError",
    "PgNotStarted",
    "Placement",
    "ServerDown",
    "ServerRef",
    "ServerStopped",
    "StartError",
    "Supervisor",
    "SupervisorError",
    "SupervisorEscalation",
    "TaskError",
    "call",
    "cast",
    "delete_child",
    "demonitor_group",
    "imap",
    "join",
    "leave",
    "local_members",
    "map",
    "members",
    "monitor_group",
    "reply",
    "restart_child",
    "start",
    "start_child",
    "start_pg",
    "start_supervisor",
    "stop",
    "supervisor_spec",
    "terminate_child",
    "which_children",
]
