"""Process-layer requests that OTP makes without suspending.

``hp.monitor``, ``hp.kill`` and ``hp.unmonitor`` of a process on another node travel
on the caller's pair connection to it, in their place among its messages, and may
wait for that connection to open. Where OTP must not wait (a process that times
calls out, a clean-up that a second cancellation must not cut short) and has sent,
or will send, nothing that the request needs to stay in order with, it posts the
request on the node's control queue instead, as these functions do.
"""

from __future__ import annotations

import hpcproc as hp

from .._process import current

__all__ = ["kill_at_once", "monitor_at_once", "unmonitor_at_once"]


def monitor_at_once(pid: hp.Pid) -> hp.MonitorRef:
    """``hp.monitor(pid)``, never waiting."""
    proc = current()
    ref, req = proc.node.watches.monitor(proc, pid)
    proc.node.remote.post_signal(req)
    return ref


def unmonitor_at_once(ref: hp.MonitorRef) -> None:
    """``hp.unmonitor(ref)``, never waiting."""
    proc = current()
    proc.node.remote.post_signal(proc.node.watches.unmonitor(proc, ref))


def kill_at_once(pid: hp.Pid, reason: str) -> None:
    """``hp.kill(pid, reason)`` of another process, never waiting."""
    proc = current()
    proc.node.remote.post_signal(proc.node.kill(proc.pid, pid, reason))
