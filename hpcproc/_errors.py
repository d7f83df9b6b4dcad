"""Errors of the process layer that are about usage or reachability, not deaths."""

from __future__ import annotations

__all__ = [
    "NodeUnreachableError",
    "NotInProcessError",
    "ProcessRegistrationException",
    "SpawnError",
]


class NotInProcessError(RuntimeError):
    """A process-only function was called outside a process.

    Functions such as ``send``, ``receive`` or ``self_pid`` act on the *current*
    process; they work only inside a function started by ``spawn``, ``spawn_local``
    or ``Node.run`` (not in a plain asyncio task, not even one created by a process).
    """


class SpawnError(Exception):
    """A spawn failed before the process started.

    The message names the function and the node: the function could not be loaded
    there, was not an ``async def`` function, or raised while being called with the
    given arguments.
    """


class ProcessRegistrationException(Exception):
    """``register`` of a name already taken, or ``unregister`` of an unknown name."""


class NodeUnreachableError(ConnectionError):
    """A request to another node could not be delivered or got no answer.

    Raised by remote requests (``spawn`` on another node, ``whereis_remote``, ...)
    when the connection to that node fails or the node closes before answering.
    """
