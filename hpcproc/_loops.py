"""The event loop running in this thread, found without a system call.

Python 3.11's C ``asyncio._get_running_loop`` (behind ``get_running_loop``) asks the
kernel for the pid on every call, a check against a fork: 0.45-0.5 us on the machines
this was measured on, paid on every ``send`` and ``receive``. :func:`running_loop`
asks the loop it found last instead: an asyncio loop's ``_thread_id`` is this
thread's exactly while it runs here (``run_forever`` sets and clears it), which is
what ``_get_running_loop`` answers, but for a loop swapped in inside a running one
(``asyncio._set_running_loop``, which asyncio's ``run_forever`` calls on entry and exit,
as libraries that run a loop inside another do): that call is wrapped, here, to forget
the loop too. Loops without ``_thread_id`` (uvloop) take the call; a forked child
forgets the loop (it does not run there). Python 3.12 reads the thread state instead,
and its own function is used as it is.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from typing import Any

__all__ = ["get_running_loop", "running_loop"]

_get_running_loop = asyncio._get_running_loop

if sys.version_info < (3, 12):
    _get_ident = threading.get_ident
    _last_loop: Any = None

    def running_loop() -> asyncio.AbstractEventLoop | None:
        """``asyncio._get_running_loop()``: the loop running in this thread, or None."""
        loop = _last_loop
        if loop is not None and loop._thread_id == _get_ident():
            return loop  # type: ignore[no-any-return]
        return _look_up_running_loop()

    def _look_up_running_loop() -> asyncio.AbstractEventLoop | None:
        global _last_loop
        loop = _get_running_loop()
        if isinstance(loop, asyncio.BaseEventLoop):
            _last_loop = loop
        return loop

    def _forget_running_loop() -> None:
        global _last_loop
        _last_loop = None

    os.register_at_fork(after_in_child=_forget_running_loop)

    _set_running_loop = asyncio.events._set_running_loop

    def _set_running_loop_forgetting(loop: asyncio.AbstractEventLoop | None) -> None:
        """asyncio's ``_set_running_loop``, forgetting the loop remembered here."""
        global _last_loop
        _last_loop = None
        _set_running_loop(loop)

    # Both names asyncio code calls it by (run_forever looks it up in events at each call).
    asyncio.events._set_running_loop = _set_running_loop_forgetting
    asyncio._set_running_loop = _set_running_loop_forgetting
else:
    running_loop = _get_running_loop


def get_running_loop() -> asyncio.AbstractEventLoop:
    """``asyncio.get_running_loop()``, through :func:`running_loop`.

    Raises:
        RuntimeError: no event loop runs in this thread.
    """
    loop = running_loop()
    if loop is None:
        raise RuntimeError("no running event loop")
    return loop
