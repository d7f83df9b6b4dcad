"""The rendezvous error (launcher errors live with :class:`~hpcproc.launchers.ClusterInfo`)."""

from __future__ import annotations

__all__ = ["RendezvousError"]


class RendezvousError(Exception):
    """The ranks could not all learn each other's addresses.

    The message names the missing ranks (or the unreachable store) and the launcher
    and job that were detected. Every rank raises it; none waits forever.
    """
