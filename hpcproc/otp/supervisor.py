"""Supervisors: start children in order, restart them by strategy, escalate when they
crash too often, and place them on nodes by a policy so that a lost node's children
come back on live ones.

A supervisor is a :class:`~hpcproc.otp.GenServer`. It *monitors* its children (their
ends reach it as messages); every child it starts *links* to it (one way), so a
supervisor that dies takes its children with it. Children are started in the order
given and stopped in the reverse order. Restart intensity: more than ``max_restarts``
restarts within ``max_seconds`` and the supervisor stops its children and dies with
:class:`SupervisorEscalation` naming the child, which its own supervisor sees as a
crash (trees escalate).

Placement (``ChildSpec.node``): ``None`` (the supervisor's node), a ``NodeId`` (that
node only), ``"any"`` (the live node of the supervisor's ``nodes`` with the fewest of
its children), a list of nodes (the first live one, in list order), or a callable
given the live nodes of ``nodes`` and returning one. A node is *lost* for the
supervisor when a child there ends with ``DiedDisconnect`` / ``DiedNodeDown``, or a
node monitor on one of ``nodes`` fires; it is never used again by this supervisor.
Each restart, node loss or not, counts towards the intensity.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import hpcproc as hp

from .gen_server import GenServer, StartError, call, start_monitored

__all__ = [
    "ChildInfo",
    "ChildSpec",
    "Placement",
    "Supervisor",
    "SupervisorError",
    "SupervisorEscalation",
    "delete_child",
    "restart_child",
    "start_child",
    "start_supervisor",
    "supervisor_spec",
    "terminate_child",
    "which_children",
]

Strategy: TypeAlias = Literal["one_for_one", "one_for_all", "rest_for_one"]
Restart: TypeAlias = Literal["permanent", "transient", "temporary"]
#: Where a child runs; see the module docstring.
Placement: TypeAlias = (
    hp.NodeId
    | Literal["any"]
    | Sequence[hp.NodeId]
    | Callable[[tuple[hp.NodeId, ...]], hp.NodeId]
    | None
)
_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
_RESTARTS = ("permanent", "transient", "temporary")
#: Bound on waiting for a killed child's DOWN (a kill is answered at once unless its
#: node is unreachable, which is then reported as a disconnect).
_KILL_WAIT = 30.0


class SupervisorEscalation(Exception):
    """A supervisor's restart intensity was exceeded; the message names the child."""


class SupervisorError(Exception):
    """A request to a supervisor failed (unknown child id, child running, ...)."""


@dataclass(frozen=True)
class ChildSpec:
    """How to start and restart one child.

    ``start`` is a :class:`GenServer` subclass (started with ``args``, registered as
    ``name`` on its node if given) or an ``async def`` process function (spawned with
    ``args``). ``restart``: ``"permanent"`` (always restarted), ``"transient"``
    (restarted unless it ended normally), ``"temporary"`` (never; removed when it
    ends). ``shutdown``: seconds between the ``"shutdown"`` exit signal and a kill
    (``math.inf`` waits forever), or ``"brutal_kill"``. ``node``: a placement policy.
    """

    id: Hashable
    start: type[GenServer] | Callable[..., Coroutine[Any, Any, Any]]
    args: tuple[Any, ...] = ()
    restart: Restart = "permanent"
    shutdown: float | Literal["brutal_kill"] = 5.0
    node: Placement = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.restart not in _RESTARTS:
            raise ValueError(
                f"child {self.id!r}: restart must be one of {_RESTARTS}, not {self.restart!r}"
            )
        if self.shutdown != "brutal_kill" and not (
            isinstance(self.shutdown, (int, float)) and self.shutdown >= 0
        ):
            raise ValueError(
                f"child {self.id!r}: shutdown must be seconds >= 0 or 'brutal_kill', not {self.shutdown!r}"
            )
        node = self.node
        if not (
            node is None
            or node == "any"
            or isinstance(node, hp.NodeId)
            or callable(node)
            or (isinstance(node, (list, tuple)) and all(isinstance(n, hp.NodeId) for n in node))
        ):
            raise ValueError(
                f"child {self.id!r}: node must be None, a NodeId, 'any', a list of NodeIds"
                f" or a callable, not {node!r}"
            )
        is_server = isinstance(self.start, type) and issubclass(self.start, GenServer)
        if not is_server and not callable(self.start):
            raise TypeError(
                f"child {self.id!r}: start must be a GenServer subclass or an async function"
            )
        if self.name is not None and not is_server:
            raise ValueError(f"child {self.id!r}: name is only for GenServer children")


@dataclass(frozen=True)
class ChildInfo:
    """One row of :func:`which_children`: ``pid`` is None when the child is not running."""

    id: Hashable
    pid: hp.Pid | None
    node: hp.NodeId | None
    restart: Restart
    supervisor: bool


@dataclass(frozen=True)
class _Options:
    children: tuple[ChildSpec, ...]
    strategy: Strategy
    max_restarts: int
    max_seconds: float
    nodes: tuple[hp.NodeId, ...]


@dataclass(eq=False)
class _Child:
    spec: ChildSpec
    pid: hp.Pid | None = None
    mref: hp.MonitorRef | None = None
    node: hp.NodeId | None = None
    last_reason: Any = field(default=None)


class _NoNode(Exception):
    pass


async def _linked(
    parent: hp.Pid, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]
) -> Any:
    """A function child: linked to its supervisor before it runs."""
    await hp.link(parent)
    return await fn(*args)


class Supervisor(GenServer):
    """The supervisor server; start it with :func:`start_supervisor` (or as a child
    with :func:`supervisor_spec`). Its ``handle_info`` receives its children's
    monitor notifications (and node notifications of its ``nodes``)."""

    async def init(self, *args: Any) -> None:
        (opts,) = args
        self._opts: _Options = opts
        self._me = hp.self_pid()
        self._children: list[_Child] = []
        self._by_ref: dict[hp.MonitorRef, _Child] = {}
        self._restarts: deque[float] = deque()
        self._dead: set[hp.NodeId] = set()
        self._watched: set[hp.NodeId] = {self._me.node}
        for node in opts.nodes:
            await self._watch(node)
        for spec in opts.children:
            self._check_new(spec)
            child = _Child(spec)
            self._children.append(child)
            try:
                await self._start(child)
            except Exception as exc:
                await self._stop_all(self._children)
                raise StartError(f"child {spec.id!r} did not start: {exc}") from exc

    # ------------------------------------------------------------------ placement

    async def _watch(self, node: hp.NodeId) -> None:
        if node not in self._watched:
            self._watched.add(node)
            await hp.monitor_node(node)

    def _live(self) -> tuple[hp.NodeId, ...]:
        pool = self._opts.nodes or (self._me.node,)
        return tuple(n for n in pool if n not in self._dead)

    def _place(self, spec: ChildSpec) -> hp.NodeId:
        policy = spec.node
        if policy is None:
            return self._me.node
        if isinstance(policy, hp.NodeId):
            if policy in self._dead:
                raise _NoNode(f"child {spec.id!r}: its node {policy} is lost")
            return policy
        if isinstance(policy, str):  # "any"
            live = self._live()
            if not live:
                raise _NoNode(f"child {spec.id!r}: no live node left among the supervisor's nodes")
            load = {n: 0 for n in live}
            for c in self._children:
                if c.pid is not None and c.node in load:
                    load[c.node] += 1
            return min(live, key=lambda n: load[n])
        if isinstance(policy, (list, tuple)):
            preferred: Sequence[hp.NodeId] = policy
            for node in preferred:
                if node not in self._dead:
                    return node
            raise _NoNode(f"child {spec.id!r}: every node of its list is lost")
        choose: Any = policy
        chosen: Any = choose(self._live())
        if not isinstance(chosen, hp.NodeId) or chosen in self._dead:
            raise _NoNode(
                f"child {spec.id!r}: its placement callable chose {chosen!r}, not a live NodeId"
            )
        return chosen

    # ------------------------------------------------------------------ start / stop

    async def _start(self, child: _Child) -> None:
        spec = child.spec
        node = self._place(spec)
        if isinstance(node, hp.NodeId) and node != self._me.node:
            await self._watch(node)
        # Monitored from the start: a child that ends at once is reported with its
        # reason (a monitor set afterwards would say DiedUnknownId, and a transient
        # child that ended normally would be restarted as if it had crashed).
        try:
            if isinstance(spec.start, type):
                pid, mref = await start_monitored(
                    spec.start,
                    spec.args,
                    node=node,
                    name=spec.name,
                    link_to=self._me,
                    link=False,
                    timeout=30.0,
                )
            elif node == self._me.node:
                pid = hp.spawn_local(_linked, self._me, spec.start, spec.args)
                mref = await hp.monitor(pid)  # before the child first runs
            else:
                pid, mref = await hp.spawn_monitor(
                    node, _linked, self._me, spec.start, spec.args
                )
        except hp.NodeUnreachableError:
            self._dead.add(node)
            raise
        child.pid, child.node, child.mref = pid, node, mref
        self._by_ref[mref] = child

    async def _start_counting(self, child: _Child) -> None:
        """Start ``child``; each failed attempt counts as a restart (may escalate)."""
        while True:
            try:
                await self._start(child)
                return
            except (StartError, hp.SpawnError, hp.NodeUnreachableError, _NoNode) as exc:
                child.last_reason = exc
                self._count(child)

    async def _stop(self, child: _Child) -> None:
        pid, mref = child.pid, child.mref
        if pid is None or mref is None:
            return
        del self._by_ref[mref]
        child.pid = child.mref = None
        is_down = lambda m: type(m) is hp.ProcessMonitorNotification and m.ref == mref  # noqa: E731
        got = None
        if child.spec.shutdown != "brutal_kill":
            await hp.exit(pid, "shutdown")
            wait = child.spec.shutdown
            got = await hp.receive(hp.match_if(is_down), timeout=None if math.isinf(wait) else wait)
        if got is None:
            await hp.kill(pid, "killed by its supervisor")
            got = await hp.receive(hp.match_if(is_down), timeout=_KILL_WAIT)
            if got is None:
                await hp.unmonitor(mref)

    async def _stop_all(self, children: Sequence[_Child]) -> None:
        for child in reversed(children):
            await self._stop(child)

    # ------------------------------------------------------------------ restarts

    def _count(self, child: _Child) -> None:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self._opts.max_seconds:
            self._restarts.popleft()
        if len(self._restarts) > self._opts.max_restarts:
            raise SupervisorEscalation(
                f"child {child.spec.id!r} reached the restart intensity (more than"
                f" {self._opts.max_restarts} restarts in {self._opts.max_seconds} s);"
                f" last reason: {child.last_reason!r}"
            )

    async def _died(self, child: _Child, reason: hp.DiedReason) -> None:
        self._by_ref.pop(child.mref, None)  # type: ignore[arg-type]
        child.pid = child.mref = None
        child.last_reason = reason
        if isinstance(reason, (hp.DiedDisconnect, hp.DiedNodeDown)) and child.node is not None:
            self._dead.add(child.node)
        restart = child.spec.restart
        if restart == "temporary":
            self._children.remove(child)
            return
        if restart == "transient" and reason.normal:
            return
        self._count(child)
        strategy = self._opts.strategy
        if strategy == "one_for_one":
            group = [child]
        else:
            index = self._children.index(child)
            affected = list(self._children if strategy == "one_for_all" else self._children[index:])
            running = [c for c in affected if c.pid is not None]
            await self._stop_all(running)
            for c in running:
                if c.spec.restart == "temporary":
                    self._children.remove(c)
            group = [c for c in affected if (c is child or c in running) and c in self._children]
        for c in group:
            await self._start_counting(c)

    async def handle_info(self, msg: Any) -> None:
        """Child ends restart children by strategy; node notifications mark nodes lost."""
        if type(msg) is hp.ProcessMonitorNotification:
            child = self._by_ref.get(msg.ref)
            if child is not None:
                await self._died(child, msg.reason)
        elif type(msg) is hp.NodeMonitorNotification:
            self._dead.add(msg.node)

    async def terminate(self, reason: Any) -> None:
        """Stop every child, in the reverse of the start order."""
        await self._stop_all(self._children)

    # ------------------------------------------------------------------ requests

    def _find(self, child_id: Hashable) -> _Child:
        for child in self._children:
            if child.spec.id == child_id:
                return child
        raise SupervisorError(f"no child with id {child_id!r}")

    def _check_new(self, spec: ChildSpec) -> None:
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"a supervisor's children are ChildSpecs, not {spec!r}")
        if any(c.spec.id == spec.id for c in self._children):
            raise SupervisorError(f"a child with id {spec.id!r} exists already")

    async def handle_call(self, request: Any, caller: Any) -> Any:
        """Requests of :func:`which_children`, :func:`start_child` and the others;
        a failure is answered (``("error", text)``), never a crash of the supervisor."""
        op, arg = request
        try:
            if op == "which_children":
                return (
                    "ok",
                    [
                        ChildInfo(
                            c.spec.id, c.pid, c.node, c.spec.restart, c.spec.start is Supervisor
                        )
                        for c in self._children
                    ],
                )
            if op == "start_child":
                self._check_new(arg)
                child = _Child(arg)
                await self._start(child)
                self._children.append(child)
                return ("ok", child.pid)
            child = self._find(arg)
            if op == "terminate_child":
                await self._stop(child)
                if child.spec.restart == "temporary":
                    self._children.remove(child)
                return ("ok", None)
            if op == "restart_child":
                if child.pid is not None:
                    raise SupervisorError(f"child {arg!r} is running")
                await self._start(child)
                return ("ok", child.pid)
            if op == "delete_child":
                if child.pid is not None:
                    raise SupervisorError(f"child {arg!r} is running; terminate it first")
                self._children.remove(child)
                return ("ok", None)
        except (
            SupervisorError,
            TypeError,
            StartError,
            hp.SpawnError,
            hp.NodeUnreachableError,
            _NoNode,
        ) as exc:
            return ("error", f"{type(exc).__name__}: {exc}")
        return ("error", f"unknown supervisor request {op!r}")


def _options(
    children: Sequence[ChildSpec],
    strategy: str,
    max_restarts: int,
    max_seconds: float,
    nodes: Sequence[hp.NodeId] | None,
) -> _Options:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, not {strategy!r}")
    if max_restarts < 0 or max_seconds <= 0:
        raise ValueError("max_restarts must be >= 0 and max_seconds > 0")
    for spec in children:
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"a supervisor's children are ChildSpecs, not {spec!r}")
    return _Options(tuple(children), strategy, max_restarts, float(max_seconds), tuple(nodes or ()))  # type: ignore[arg-type]


async def start_supervisor(
    children: Sequence[ChildSpec],
    strategy: Strategy = "one_for_one",
    max_restarts: int = 3,
    max_seconds: float = 5.0,
    node: hp.NodeId | None = None,
    name: str | None = None,
    *,
    nodes: Sequence[hp.NodeId] | None = None,
    link: bool = False,
) -> hp.Pid:
    """Start a supervisor on ``node`` (default here) and its ``children``, in order.

    ``nodes``: the nodes the ``"any"`` policy and placement callables choose from
    (default: the supervisor's node); each is watched for loss.

    Raises:
        ValueError / TypeError: a bad strategy, intensity or child spec.
        StartError: a child did not start (those started are stopped again).
    """
    opts = _options(children, strategy, max_restarts, max_seconds, nodes)
    pid, mref = await start_monitored(
        Supervisor, (opts,), node=node, name=name, link_to=None, link=link, timeout=None
    )
    await hp.unmonitor(mref)
    return pid


def supervisor_spec(
    id: Hashable,
    children: Sequence[ChildSpec],
    strategy: Strategy = "one_for_one",
    max_restarts: int = 3,
    max_seconds: float = 5.0,
    *,
    nodes: Sequence[hp.NodeId] | None = None,
    restart: Restart = "permanent",
    shutdown: float | Literal["brutal_kill"] = math.inf,
    node: Placement = None,
) -> ChildSpec:
    """A :class:`ChildSpec` for a nested supervisor (shutdown waits for its subtree)."""
    opts = _options(children, strategy, max_restarts, max_seconds, nodes)
    return ChildSpec(id, Supervisor, (opts,), restart=restart, shutdown=shutdown, node=node)


async def _request(sup: Any, op: str, arg: Any, timeout: float | None) -> Any:
    status, value = await call(sup, (op, arg), timeout=timeout)
    if status != "ok":
        raise SupervisorError(value)
    return value


async def which_children(sup: Any, timeout: float | None = 5.0) -> list[ChildInfo]:
    """The children in start order (``pid`` None for a child not running)."""
    return await _request(sup, "which_children", None, timeout)  # type: ignore[no-any-return]


async def start_child(sup: Any, spec: ChildSpec, timeout: float | None = 60.0) -> hp.Pid:
    """Add ``spec`` as the last child and start it.

    Raises:
        SupervisorError: the id exists, or the child did not start.
    """
    return await _request(sup, "start_child", spec, timeout)  # type: ignore[no-any-return]


async def terminate_child(sup: Any, child_id: Hashable, timeout: float | None = 60.0) -> None:
    """Stop the child (by its shutdown); it stays in the list unless temporary."""
    await _request(sup, "terminate_child", child_id, timeout)


async def restart_child(sup: Any, child_id: Hashable, timeout: float | None = 60.0) -> hp.Pid:
    """Start a terminated child again. Raises SupervisorError if it is running."""
    return await _request(sup, "restart_child", child_id, timeout)  # type: ignore[no-any-return]


async def delete_child(sup: Any, child_id: Hashable, timeout: float | None = 5.0) -> None:
    """Remove a terminated child's spec. Raises SupervisorError if it is running."""
    await _request(sup, "delete_child", child_id, timeout)
