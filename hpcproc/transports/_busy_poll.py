"""Adaptive in-place polling for ``EndPoint.receive``.

Why: on the virtual machines this project runs on, waking a process that sleeps in
``epoll_wait`` costs about 50 us each way, while a non-blocking read finds a reply in
a few. A two-process ping-pong of plain asyncio sockets measured 110 us per round trip
sleeping and 7.5 us when the waiting side first polled its socket for up to 50 us
(same run, both sides asyncio). So when ``receive`` finds no event queued and the
event loop has nothing else to run, it polls the transport's links for a short while
before going to sleep.

Guarantees and costs:

* It polls only when no other callback of the event loop is ready (it first lets
  ready callbacks run, up to three loop iterations, since the task a dispatcher just
  woke is typically about to send the next message), and at most
  ``max_us`` microseconds at a time, so it delays other I/O and timers of the loop by
  at most that much; every :data:`FAIR_STREAK` consecutive polls it lets the loop run.
* The budget adapts: a reply that came a little too late for the poll (within four
  times ``max_us``) doubles it, up to ``max_us``; a longer silence halves it, down to
  ``max_us / 16``.
* When the CPUs are oversubscribed (the poll got less than half of the CPU time it
  spent, several times in a row) it stops polling for :data:`NO_POLL_PERIOD`: the peer
  needs that CPU to answer.
* It needs the standard event loop (it reads the loop's ready queue, which has no
  public accessor); on other loops (uvloop) it never polls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ._multiplex import EventQueue
from .base import Event

__all__ = ["FAIR_STREAK", "NO_POLL_PERIOD", "IdlePoller"]

#: Let the event loop run after this many consecutive polls.
FAIR_STREAK = 32
#: How long polling stays off once the CPUs were seen oversubscribed.
NO_POLL_PERIOD = 0.02
#: Consecutive starved polls that count as oversubscription.
_STARVED_POLLS = 3
#: A reply within this many ``max_us`` after giving up counts as "a little too late".
_LATE = 4.0
#: How many times receive lets other ready callbacks run before it decides to poll.
_YIELDS = 8
#: Polls shorter than this are not checked for starvation (the clock costs too much).
_PROBE_MIN = 20e-6


class IdlePoller:
    """Polls ``poll_once`` while ``receive`` would otherwise sleep; see the module."""

    __slots__ = (
        "_budget",
        "_max",
        "_no_poll_until",
        "_ready",
        "_starved",
        "_streak",
        "_yielding",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, max_us: float) -> None:
        if max_us < 0:
            raise ValueError("busy_poll_us must not be negative")
        self._max = max_us * 1e-6
        self._budget = self._max
        self._streak = 0
        self._starved = 0
        self._no_poll_until = 0.0
        self._ready: Any = getattr(loop, "_ready", None)
        #: True while ``receive`` waits in its yield to other ready callbacks.
        self._yielding = False

    async def receive(self, events: EventQueue, poll_once: Callable[[], bool]) -> Event:
        """The next event of ``events``, polling first while the loop is idle.

        ``poll_once`` reads whatever has arrived without blocking (queueing events)
        and returns False when there is nothing to poll (no remote links).
        """
        ready = self._ready
        if len(events) or not self._max or ready is None:
            return await events.get()
        # A dispatcher typically calls receive right after waking the task it
        # delivered to; let that task run (and send, and wait) first, then poll.
        for _ in range(_YIELDS):
            if not ready:
                break
            self._yielding = True
            try:
                await asyncio.sleep(0)
            finally:
                self._yielding = False
            if len(events):
                return await events.get()
        if ready:
            return await events.get()
        self._streak += 1
        if self._streak > FAIR_STREAK:
            self._streak = 0
            return await events.get()
        gave_up = self._poll(events, poll_once)
        event = events.pop_ready()
        if event is None:
            event = await events.get()
        if gave_up:
            if time.perf_counter() - gave_up < _LATE * self._max:
                self._budget = min(self._max, self._budget * 2)
            else:
                self._budget = max(self._max / 16, self._budget * 0.5)
        return event

    def poll_now(self, events: EventQueue, poll_once: Callable[[], bool]) -> bool:
        """Poll in place now if the loop is idle (as ``receive`` would); True when an
        event is queued. Never suspends; polls at most the current budget."""
        if events._items:
            return True
        ready = self._ready
        if not self._max or ready is None:
            return False
        # The one ready callback of a receive yielding to others is no reason not to.
        if ready and not (self._yielding and len(ready) == 1):
            return False
        self._streak += 1
        if self._streak > FAIR_STREAK:
            self._streak = 0
            return False
        self._poll(events, poll_once)
        return bool(events._items)

    def _poll(self, events: EventQueue, poll_once: Callable[[], bool]) -> float:
        """Poll until an event is queued; the time it gave up, or 0.0."""
        start = time.perf_counter()
        if start < self._no_poll_until:
            return 0.0
        ready = self._ready
        # The queue's deque itself: len() of it is C, EventQueue.__len__ is not.
        items = events._items
        # Callbacks ready before we started (at most a yielding receive's) are known.
        queued = len(ready)
        cpu = time.thread_time() if not self._streak & 7 else -1.0
        deadline = start + self._budget
        now = start
        gave_up = 0.0
        while True:
            if not poll_once():
                return 0.0
            if items or len(ready) > queued:
                break
            now = time.perf_counter()
            if now >= deadline:
                gave_up = now
                break
        if cpu >= 0 and now - start > _PROBE_MIN:
            if time.thread_time() - cpu < (now - start) / 2:
                self._starved += 1
                if self._starved >= _STARVED_POLLS:
                    self._starved = 0
                    self._no_poll_until = now + NO_POLL_PERIOD
            else:
                self._starved = 0
        return gave_up
