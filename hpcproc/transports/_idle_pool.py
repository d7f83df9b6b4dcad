"""Give pooled buffers back to the operating system once they sat idle for a while.

Pools of large buffers (tcp's received frames, shm's segments) keep memory so that the
next message of a similar size costs no page faults. Kept forever, that memory stays
resident after the application has dropped every message (a 256 MiB array sent once
leaves hundreds of MiB behind). A pool therefore stamps each buffer when it is used
and an :class:`IdleTrimmer` drops those unused for ``idle_s`` seconds: one timer per
pool, armed when the pool is used and re-armed while it holds anything, never one per
message (the fast path only compares a handle with ``None``).

``HPCPROC_POOL_IDLE_S`` sets ``idle_s`` for every pool (default
:data:`DEFAULT_IDLE_S`); a transport option, where there is one, wins.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

__all__ = ["DEFAULT_IDLE_S", "IDLE_ENV", "IdleTrimmer", "env_bytes", "idle_seconds"]

#: Seconds a pooled buffer may stay unused before it goes back to the system.
DEFAULT_IDLE_S = 5.0
IDLE_ENV = "HPCPROC_POOL_IDLE_S"


def idle_seconds(value: float | None = None) -> float:
    """``value``, else ``$HPCPROC_POOL_IDLE_S``, else :data:`DEFAULT_IDLE_S`.

    Raises:
        ValueError: the value is not a positive number (the message names its source).
    """
    source = "pool_idle_s"
    if value is None:
        text = os.environ.get(IDLE_ENV)
        if not text:
            return DEFAULT_IDLE_S
        source = IDLE_ENV
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{IDLE_ENV} must be a number of seconds, not {text!r}") from None
    if not value > 0:
        raise ValueError(f"{source} must be a positive number of seconds, not {value!r}")
    return float(value)


def env_bytes(name: str, value: int | None, default: int) -> int:
    """A byte count: ``value``, else ``$name`` (plain or with a K/M/G suffix), else ``default``.

    Raises:
        ValueError: negative or unparsable; the message names the variable.
    """
    if value is None:
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        try:
            value = int(digits) * scale
        except ValueError:
            raise ValueError(
                f"{name} must be a byte count such as 268435456 or 256M, not {text!r}"
            ) from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {value}")
    return value


class IdleTrimmer:
    """Calls ``trim(cutoff)`` about every ``idle_s`` seconds while the pool is in use.

    ``trim`` drops what was last used before ``cutoff`` (a :func:`time.monotonic`
    value) and returns whether the pool still holds or lent out anything, in which
    case the timer is armed again. :meth:`touch` arms it from the event loop's thread;
    it costs one comparison when the timer is already armed.
    """

    __slots__ = ("_handle", "_loop", "_trim", "idle_s")

    def __init__(self, idle_s: float, trim: Callable[[float], bool]) -> None:
        self.idle_s = idle_s
        self._trim = trim
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def touch(self) -> None:
        """Make sure a trim comes within ``idle_s``; call on an event loop's thread.

        A pool shared by several event loops (one after another, as in tests) is
        trimmed from the loop that used it last once the earlier one has closed.
        """
        if self._handle is None or self._loop is None or self._loop.is_closed():
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._handle = loop.call_later(self.idle_s, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._trim(time.monotonic() - self.idle_s):
            self.touch()

    def cancel(self) -> None:
        """Stop trimming (the pool is being closed)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
