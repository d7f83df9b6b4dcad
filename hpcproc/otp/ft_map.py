"""A fault-tolerant parallel map over nodes: :func:`map` and :func:`imap`.

The calling process coordinates: it starts ``per_node`` worker processes on each
node (monitored), hands out batches of inputs (up to two batches in flight per
worker, so workers never wait for the next one), and collects results on its private
reply channel. When a worker ends (its node lost, killed, ...), its unfinished batches
go back to the front of the queue for the survivors; a result that arrives twice (a
worker answered before its loss was reported) is dropped, so every index gets exactly
one result. An exception of ``fn`` is a result too: a :class:`TaskError` with the
input and the remote traceback, raised at once (``errors="raise"``, the default,
which stops the workers) or handed back in the result's place (``errors="collect"``).
numpy arrays in inputs and results travel as out-of-band buffers between nodes
(never pickled into the message).

Workers are killed when the map ends (completed, failed, timed out or the consumer of
:func:`imap` closed it); their monitors are removed first, so the caller's mailbox
keeps nothing of the map. An :func:`imap` that is abandoned without being exhausted or
closed (``contextlib.aclosing``) leaves its workers running until their node closes.
"""

from __future__ import annotations

import builtins
import inspect
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Literal

import hpcproc as hp

from ._replies import drop_stale, new_tag, reply_channel

__all__ = ["MapError", "TaskError", "imap", "map"]

#: Batches in flight per worker: one being computed, one waiting.
_DEPTH = 2
#: Largest automatic batch (inputs per message).
_MAX_CHUNK = 64


class TaskError(Exception):
    """``fn(input)`` raised on a worker: ``index``, ``input``, ``reason`` (the
    exception's type and text) and ``remote_traceback``."""

    def __init__(self, index: int, input: Any, reason: str, remote_traceback: str) -> None:
        super().__init__(index, input, reason, remote_traceback)
        self.index = index
        self.input = input
        self.reason = reason
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return (
            f"task {self.index} (input {self.input!r:.200}) failed: {self.reason}"
            f"\n--- remote traceback ---\n{self.remote_traceback}"
        )


class MapError(Exception):
    """The map cannot go on: every worker was lost (or none could be started)."""


#: A batch for a worker: ``(_BATCH, ((index, input), ...))``, a plain tuple (shared,
#: not copied, by a local send when the inputs are immutable).
_BATCH = "$hpcproc.otp.map.batch"


def _is_batch(msg: Any) -> bool:
    return type(msg) is tuple and len(msg) == 2 and msg[0] == _BATCH


async def _worker(reply_to: hp.SendPort[Any], tag: int, fn: Callable[[Any], Any]) -> None:
    """A map worker: answer each batch with ``(index, ok, value)`` per input, in order."""
    me = hp.self_pid()
    while True:
        batch = await hp.receive(hp.match_if(_is_batch))
        results = []
        for index, item in batch[1]:
            try:
                value = fn(item)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                results.append(
                    (index, False, (f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                )
            else:
                results.append((index, True, value))
        await hp.send_chan(reply_to, (tag, True, (me, tuple(results))))


async def imap(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    nodes: Sequence[hp.NodeId] | None = None,
    per_node: int = 1,
    timeout: float | None = None,
    *,
    errors: Literal["raise", "collect"] = "raise",
    chunksize: int | None = None,
) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(index, fn(items[index]))`` as results complete, each index exactly once.

    ``fn`` (sync or async) runs in worker processes on ``nodes`` (default: this node),
    ``per_node`` per node; it travels to them by reference when importable there,
    else by value. ``chunksize`` inputs per message (default: automatic, small
    enough to balance). Must be consumed inside a process.

    Raises:
        TaskError: ``fn`` raised (``errors="raise"``); with ``"collect"`` the
            TaskError is yielded as the value instead.
        MapError: no worker is left (all their nodes lost) with work remaining.
        TimeoutError: the whole map took longer than ``timeout`` seconds.
        ValueError: bad ``per_node``, ``errors`` or ``chunksize``.
    """
    if per_node < 1:
        raise ValueError(f"per_node must be >= 1, not {per_node}")
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', not {errors!r}")
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, not {chunksize}")
    inputs = list(items)
    n = len(inputs)
    if n == 0:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    targets = list(nodes) if nodes else [hp.self_node()]
    send_port, port = reply_channel()
    await drop_stale(port)
    tag = new_tag()
    refs: dict[hp.MonitorRef, hp.Pid] = {}
    inflight: dict[hp.Pid, deque[list[int]]] = {}
    try:
        for node in targets:
            for _ in range(per_node):
                try:
                    pid, ref = await hp.spawn_monitor(node, _worker, send_port, tag, fn)
                except hp.NodeUnreachableError:
                    break
                refs[ref] = pid
                inflight[pid] = deque()
        if not inflight:
            raise MapError(f"no worker could be started on {targets}")
        chunk = chunksize or max(1, min(_MAX_CHUNK, n // (len(inflight) * 4 * _DEPTH)))
        pending: deque[int] = deque(builtins.range(n))
        done = bytearray(n)
        left = n

        async def dispatch(pid: hp.Pid) -> None:
            queue = inflight[pid]
            while len(queue) < _DEPTH and pending:
                indices = [pending.popleft() for _ in builtins.range(min(chunk, len(pending)))]
                queue.append(indices)
                await hp.send(pid, (_BATCH, tuple((i, inputs[i]) for i in indices)))

        for pid in list(inflight):
            await dispatch(pid)
        is_down = hp.match_if(lambda m: type(m) is hp.ProcessMonitorNotification and m.ref in refs)
        from_workers = hp.match_chan(port)
        while left:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await hp.receive(is_down, from_workers, timeout=wait)
            if msg is None:
                raise TimeoutError(f"map of {n} inputs: {left} unfinished after {timeout} s")
            if type(msg) is hp.ProcessMonitorNotification:
                pid = refs.pop(msg.ref)
                for indices in reversed(inflight.pop(pid)):
                    pending.extendleft(reversed([i for i in indices if not done[i]]))
                if not inflight:
                    raise MapError(
                        f"every worker was lost with {left} of {n} inputs unfinished (last: {msg.reason!r})"
                    )
                for other in list(inflight):
                    await dispatch(other)
                continue
            if msg[0] != tag:
                continue  # a late answer of an earlier map
            pid, results = msg[2]
            queue = inflight.get(pid)
            if queue:
                queue.popleft()
            for index, ok, value in results:
                if done[index]:
                    continue
                done[index] = 1
                left -= 1
                if not ok:
                    value = TaskError(index, inputs[index], value[0], value[1])
                    if errors == "raise":
                        raise value
                yield index, value
            if queue is not None:
                await dispatch(pid)
    finally:
        for ref, pid in refs.items():
            await hp.unmonitor(ref)
            await hp.kill(pid, "map finished")


async def map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    nodes: Sequence[hp.NodeId] | None = None,
    per_node: int = 1,
    timeout: float | None = None,
    *,
    errors: Literal["raise", "collect"] = "raise",
    chunksize: int | None = None,
) -> list[Any]:
    """``[fn(x) for x in items]`` computed on ``nodes``, in input order; see :func:`imap`
    for the fault tolerance, options and exceptions."""
    inputs = list(items)
    out: list[Any] = [None] * len(inputs)
    async for index, value in imap(
        fn, inputs, nodes, per_node, timeout, errors=errors, chunksize=chunksize
    ):
        out[index] = value
    return out
