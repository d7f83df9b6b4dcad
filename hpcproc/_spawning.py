"""Spawning: starting processes on this node, and on another through its controller.

A local spawn calls the function (so that a non-async function or one raising at the
call fails in the caller), gives the process the next local id and puts it in the
node's process table; it starts running at the caller's next await. A watch asked for
with the spawn (``spawn_link``, ``spawn_monitor``) is in place before the process runs.

A remote spawn pickles the function and its arguments (``serialization.dumps``: by
reference where importable, by value otherwise) into a ``SpawnReq`` for the other
node's controller, which spawns locally and replies with the pid or an error text.
A monitor asked for with a remote spawn is recorded before the request is sent (its
ref has no target yet, and is re-keyed with the pid from the reply), a link as the
reply is handled: either way before any ``Died`` for it can arrive.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import pickle
import types
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import _control as ctl
from ._errors import SpawnError
from ._ids import MonitorRef, NodeId, Pid
from ._process import Process, new_process
from ._watches import Link
from .serialization import dumps

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["Spawner", "fn_name"]

_COROUTINE = types.CoroutineType
ProcessFn = Callable[..., Coroutine[Any, Any, Any]]


def fn_name(fn: Any) -> str:
    """``module.qualname`` of a function, for error messages."""
    module = getattr(fn, "__module__", None) or "?"
    if module.startswith(_RUN_FILE_PREFIX):
        module = module[len(_RUN_FILE_PREFIX) :]  # a file hpcproc.run loaded: its stem
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


#: The context every process's exit callback runs in: it reads no context variable,
#: and a shared one spares each spawn the copy of the spawner's context that
#: ``add_done_callback`` would make (an object for the cyclic collector to track).
_EXIT_CONTEXT = contextvars.Context()

#: The module name prefix hpcproc.run gives a ``file.py:function`` entry's module.
_RUN_FILE_PREFIX = "_hpcproc_main_"


class Spawner:
    """Starts the processes of one node (see the module docstring)."""

    def __init__(
        self, node: Node, procs: dict[int, Process], on_exit: Callable[[Process], None]
    ) -> None:
        self._node = node
        self._procs = procs
        self._on_exit = on_exit
        self._lids = itertools.count(1)
        #: Set while the node is started and not closing (local spawns allowed).
        self._open = False
        self._node_id: NodeId | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self, node_id: NodeId, loop: asyncio.AbstractEventLoop) -> None:
        """Allow spawning (the node has started)."""
        self._node_id, self._loop, self._open = node_id, loop, True

    def shut(self) -> None:
        """Refuse spawning from now on (the node is closing)."""
        self._open = False

    def spawn_local(
        self, fn: Any, args: tuple[Any, ...], watch: MonitorRef | Pid | None = None
    ) -> Process:
        """Start ``fn(*args)`` here; ``watch`` (a monitor ref whose target is filled in
        with the new pid, or a linking pid) watches it from the start.

        Raises:
            SpawnError: ``fn`` is not an ``async def`` function or raised when called.
            RuntimeError: the node is not started or is closed.
        """
        if not self._open:
            self._node.check_open()
        try:
            coro = fn(*args)
        except Exception as exc:
            raise SpawnError(
                f"{fn_name(fn)} raised while starting on node {self._node_id}: {exc!r}"
            ) from exc
        if type(coro) is not _COROUTINE and not inspect.iscoroutine(coro):
            raise SpawnError(
                f"{fn_name(fn)} is not an async function (it returned "
                f"{type(coro).__name__}) on node {self._node_id}"
            )
        assert self._node_id is not None and self._loop is not None
        lid = next(self._lids)
        pid = tuple.__new__(Pid, (self._node_id, lid))
        proc = new_process(coro, self._node, pid, self._loop)
        if watch is not None:
            if type(watch) is MonitorRef:
                if watch.target is None:
                    watch = MonitorRef(pid, watch.watcher, watch.n)
                proc.watchers = {watch: None}
            else:
                assert type(watch) is Pid
                proc.watchers = {Link(watch, pid): None}
        self._procs[lid] = proc
        proc.add_done_callback(self._on_exit, context=_EXIT_CONTEXT)
        return proc

    async def spawn(
        self, node: NodeId, fn: ProcessFn, args: tuple[Any, ...], watch: MonitorRef | Pid | None
    ) -> Pid:
        """Start ``fn(*args)`` on ``node`` (this one or another) and return its pid.

        ``watch`` as for :meth:`spawn_local` (for a monitor, the ref names the
        watcher and a number; its target is the new pid).

        Raises:
            SpawnError: ``fn`` or ``args`` cannot be pickled, or the remote node could
                not load ``fn``, or ``fn`` is not async or raised when called. The
                message names the function and the node.
            NodeUnreachableError: the node could not be reached or closed.
        """
        if node == self._node_id:
            return self.spawn_local(fn, args, watch).pid
        self._node.check_open()
        name = fn_name(fn)
        try:
            fn_blob = dumps(fn)
            args_blob = dumps(args)
        except Exception as exc:
            raise SpawnError(
                f"cannot pickle {name} or its arguments for node {node}: {exc!r}"
            ) from exc
        watches = self._node.watches
        post = self._node.remote.post
        watcher: Pid | None = None
        ref: MonitorRef | None = None
        on_ok: Callable[[Any], None] | None = None
        on_late_ok: Callable[[Any], None] | None = None
        # The watch recorded here as the reply was handled (on_ok), if it was.
        recorded: list[MonitorRef | Link] = []
        if type(watch) is MonitorRef:
            ref, watcher = watch, watch.watcher
            watches.watch_remote(node, ref)

            def on_ok(pid: Any) -> None:
                assert ref is not None
                key = MonitorRef(pid, ref.watcher, ref.n)
                watches.rekey_remote(node, ref, key)
                recorded.append(key)

            def on_late_ok(pid: Any) -> None:
                # The caller gave up (cancelled): the new process must not keep a
                # monitor nobody holds.
                assert ref is not None
                post(node, ctl.UnmonitorReq(MonitorRef(pid, ref.watcher, ref.n), pid))

        elif watch is not None:
            assert type(watch) is Pid
            watcher = linker = watch

            def on_ok(pid: Any) -> None:
                # Registered as the reply is handled, before any Died can be.
                key = Link(linker, pid)
                watches.watch_remote(node, key)
                recorded.append(key)

            def on_late_ok(pid: Any) -> None:
                post(node, ctl.UnlinkReq(linker, pid))  # as for a monitor, above

        try:
            pid: Pid = await self._node.controller.request(
                node,
                lambda req: ctl.SpawnReq(req, name, fn_blob, args_blob, watcher, ref is None, ref),
                SpawnError,
                on_ok=on_ok,
                on_late_ok=on_late_ok,
            )
        except BaseException:
            if recorded:
                # The reply came and was handled, then the caller gave up (cancelled)
                # before it took the pid: undone here and there, as a late reply is.
                key = recorded[0]
                watches.unwatch_remote(node, key)
                assert on_late_ok is not None
                on_late_ok(key.target)
            elif ref is not None:
                watches.unwatch_remote(node, ref)
            raise
        return pid

    def on_spawn_req(self, nid: NodeId, msg: ctl.SpawnReq) -> None:
        """Spawn for node ``nid`` and reply with the pid or the error text."""
        reply = self._node.controller.reply
        where = f"on node {self._node_id}"
        try:
            fn = pickle.loads(msg.fn_blob)
        except Exception as exc:
            reply(nid, msg.req, False, f"cannot load function {msg.fn_name} {where}: {exc!r}")
            return
        try:
            args = pickle.loads(msg.args_blob)
        except Exception as exc:
            reply(
                nid, msg.req, False, f"cannot load the arguments of {msg.fn_name} {where}: {exc!r}"
            )
            return
        watch = msg.ref if msg.ref is not None else (msg.watcher if msg.link else None)
        try:
            proc = self.spawn_local(fn, args, watch)
        except (SpawnError, RuntimeError) as exc:
            reply(nid, msg.req, False, str(exc))
            return
        reply(nid, msg.req, True, proc.pid)
