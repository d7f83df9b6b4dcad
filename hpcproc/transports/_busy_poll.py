"""Polling in place while the event loop is idle: the one budget every polling transport
(tcp, shm, mpi) uses, under one option, ``busy_poll_us``.

Why: on the virtual machines this project runs on, waking a process that sleeps in
``epoll_wait`` costs about 50 us each way, while a non-blocking read finds a reply in
a few. A two-process ping-pong of plain asyncio sockets measured 110 us per round trip
sleeping and 7.5 us when the waiting side first polled its socket for up to 50 us
(same run, both sides asyncio); MPI measured 20 us polling from a loop callback and
4 us polling from the awaiting coroutine. So when a transport's ``receive`` (or a wait
for a send or a connect) finds nothing to return and the event loop has nothing else
to run, it polls its links for a short while before going to sleep.

This is the only module of hpcproc that reads event-loop internals: whether other
callbacks are ready is read from the standard loop's ready queue, which has no public
accessor (:func:`ready_queue`). Guarantees and costs:

* It polls only when no other callback of the event loop is ready (a transport may
  name its own callbacks, which do not count), and at most the budget at a time, so
  it delays other I/O and timers of the loop by at most ``busy_poll_us``; every
  :data:`FAIR_STREAK` consecutive polls it lets the loop run. A poll stops as soon as
  another callback becomes ready (a thread's ``call_soon_threadsafe``, say).
* The budget adapts (:class:`Budget`): a reply that came a little too late for the
  poll (within :data:`LATE` times the budget's maximum) doubles it, up to
  ``busy_poll_us``; a longer silence halves it, down to a sixteenth of that.
* When the CPUs are oversubscribed (a poll got less than half of the CPU time it
  spent, :data:`STARVED_POLLS` times in a row) polling stops for
  :data:`NO_POLL_PERIOD`: the peer needs that CPU to answer. Not a poll that yields
  on crowded CPUs (below): it gives the CPU away between its looks anyway.
* When more tasks want a CPU than there are CPUs, a receive polls by yielding: it gives
  the CPU away (``sched_yield``) between two looks at its links, as MPICH and Open MPI
  do when oversubscribed (``mpi_yield_when_idle``), for at most :data:`YIELD_POLL_S`
  (its own :class:`Budget`: halved when it ran out, doubled when a look found
  something), then sleeps. A rank that spins without yielding takes the CPU that the
  rank it waits for needs to send; a rank that sleeps pays a wake-up and a pass round
  the event loop for every message. Crowded means either that the launcher put more
  ranks on this host than they have CPUs (:func:`hpcproc._host.ranks_on_host` against
  :func:`hpcproc._host.shared_cpus`, which counts the CPUs of ranks bound to their own:
  fixed for the job), or that the same-host processes this one is linked to whose CPUs
  all lie within its own outnumber those CPUs with it (two processes bound to one CPU by
  ``taskset`` or a container's cpuset: :meth:`Crowding.peer_linked`, for as long as
  the links last; shm, tcp and mpi links know their same-host peers' pids), or that
  the kernel counts more runnable tasks besides this process than the machine has
  CPUs, in :data:`CROWD_SAMPLES` readings in a row
  (``/proc/loadavg``, read at most every :data:`CROWD_PERIOD`: other jobs, or "hosts"
  that share one machine's CPUs). Once crowded, it stays so for :data:`CROWD_HOLD`
  before the count is read again, and until :data:`CROWD_SAMPLES` readings in a row are
  not crowded. Measured with 4 ranks on 2 CPUs (2 hosts x 2 ranks of the test cluster),
  an all-to-all of 8 B messages took 165-190 us of CPU per rank and round sleeping and
  200-260 us spinning; yielding, see :data:`YIELD_POLL_S`. ``HPCPROC_YIELD_WHEN_IDLE``
  overrides it: ``1`` always yields, ``0`` spins whatever the load, ``auto`` (the
  default) decides as above. A routing endpoint yields for its sub-endpoints: it looks
  at both between two yields (:meth:`IdlePoller.poll_looking`), as a sub-endpoint's own
  yielding poll would let the other's messages wait. A transport that has nothing to
  wait on, and so polls on every pass round the loop while messages flow (mpi), gives
  the CPU away on each such pass instead (:meth:`IdlePoller.yield_if_crowded`,
  ``spin(..., yield_when_crowded=True)``): otherwise its passes keep the CPU from the
  rank it waits for (the same all-to-all over mpi took 4.1-4.9 ms per round, against
  0.19-0.32 ms yielding). Its receive (:meth:`IdlePoller.turn_and_poll`) polls by
  yielding too: two mpi ranks on one CPU with ``HPCPROC_YIELD_WHEN_IDLE=1``, 8 B
  round trip 65-66 us when it did not poll at all, 21.5-22.7 us.
* A spin that runs out of its budget (:meth:`IdlePoller.spin`, and the mpi receive's
  :meth:`IdlePoller.turn_and_poll`) gives the CPU away once and looks a last time: a
  task that the spin kept from the CPU, a peer on the same CPU that the machine-wide
  count does not show (ranks confined to one CPU by ``taskset`` or a container's
  cpuset), runs meanwhile and may have answered. Two such mpi ranks, whose pumps
  spin on every pass round their loops, otherwise took turns by time slices: an 8 B
  round trip took 8 ms, and 0.47-0.50 ms with this last look alone; its links now also
  tell the crowding that the two share a CPU (above), and it takes 22-24 us.
* On any other event loop (uvloop, or an asyncio whose loop has no ready queue) it
  never polls: every wait is a plain wait on the loop, correct and only slower.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Container, Sequence, Sized
from typing import Any

from ._multiplex import EventQueue
from .base import Event

__all__ = [
    "CROWD_HOLD",
    "CROWD_PERIOD",
    "CROWD_SAMPLES",
    "FAIR_STREAK",
    "LATE",
    "NO_POLL_PERIOD",
    "OPTION",
    "PROBE_MIN",
    "STARVED_POLLS",
    "YIELD_ENV",
    "YIELD_POLL_S",
    "Budget",
    "Crowding",
    "IdlePoller",
    "crowding",
    "ready_queue",
]

#: The option, in microseconds, of every transport that polls (0 disables polling).
OPTION = "busy_poll_us"
#: Let the event loop run after this many consecutive polls. Each such turn costs a
#: receive a pass round the loop: with 32, a routed same-host process round trip (bench
#: cluster, 2 hosts x 2 ranks) took 13.2-19.0 us against 10.9-11.4 us with 256, and a
#: raw shm one 4.75 against 4.59 us; other callbacks still run within ~1 ms at the
#: highest message rates measured here.
FAIR_STREAK = 256
#: How long polling stays off once the CPUs were seen oversubscribed.
NO_POLL_PERIOD = 0.02
#: Consecutive starved polls that count as oversubscription.
STARVED_POLLS = 4
#: A reply within this many maximal budgets after giving up counts as "a little too late".
LATE = 4.0
#: How many times ``receive`` lets other ready callbacks run before it decides to poll.
_YIELDS = 8
#: Polls shorter than this are not checked for starvation (the clock costs too much).
PROBE_MIN = 20e-6


#: Environment variable: ``auto`` (default), ``1`` (always crowded: poll by yielding),
#: ``0`` (ignore crowding).
YIELD_ENV = "HPCPROC_YIELD_WHEN_IDLE"
#: The most a receive polls by yielding on crowded CPUs (seconds). Measured here
#: (bench cluster, all-to-all of 8 B, 4 ranks on 2 CPUs): per round, 2 hosts x 2 ranks
#: over shm+tcp took 420-480 us sleeping; yielding, 258-262 us for 0.3 ms, 239-242 us
#: for 1 ms and 228-254 us for 3 ms (medians of 7 runs, two each); 4 ranks on one
#: host over shm, 395 against 110-150 us. Longer budgets gain little and cost an idle
#: rank more CPU.
YIELD_POLL_S = 1e-3
#: How often (seconds) the kernel's count of runnable tasks is read.
CROWD_PERIOD = 0.005
#: How long (seconds) the CPUs stay crowded (receives poll by yielding, or not at
#: all) once they were seen so, before the count is read again.
CROWD_HOLD = 0.1
#: Consecutive readings above the CPU count that make the CPUs crowded (15 ms), and
#: consecutive readings not above it that end a crowd. Measured when a crowd still
#: ended at the first reading after its hold: two ranks ping-ponging on this 2-CPU
#: machine were judged crowded now and then by passing system tasks (0.2-0.4 loop
#: passes per mpi round trip), at no measurable cost; 8 readings (40 ms) avoided that
#: but made the bench cluster's all-to-all of 4 ranks on 2 CPUs, whose runs are
#: shorter, 10 % slower (591-622 against 532-583 us per round).
CROWD_SAMPLES = 3
_LOADAVG = "/proc/loadavg"


def _runnable_tasks() -> int | None:
    """Tasks runnable on the machine now (this one included), from ``/proc/loadavg``
    (its fourth field, ``runnable/total``); None where it cannot be read."""
    try:
        with open(_LOADAVG, "rb") as f:
            field = f.read().split()[3]
        return int(field.split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None


class Crowding:
    """Whether the CPUs are crowded, so that a waiting process should not poll (see
    the module). One per process (:func:`crowding`); its answer is cached for
    :data:`CROWD_PERIOD`.

    Args:
        mode: ``"auto"``, ``"1"`` (always crowded: never poll) or ``"0"`` (never).
        ranks: ranks of the job on this host (None: unknown).
        cpus: CPUs this host's ranks share (:func:`hpcproc._host.shared_cpus`);
            machine_cpus: CPUs of the machine.
        runnable: reads the machine's runnable task count (None: unknown).
        own_cpus: the CPUs this process may run on (None: unknown), against which
            the masks of same-host peers are compared (:meth:`peer_linked`).

    Raises:
        ValueError: ``mode`` is none of those (the message names the variable).
    """

    __slots__ = (
        "_against",
        "_inside",
        "_links_lock",
        "_machine_cpus",
        "_mode",
        "_own_cpus",
        "_peers",
        "_runnable",
        "confined",
        "crowded",
        "next_check",
    )

    def __init__(
        self,
        mode: str = "auto",
        *,
        ranks: int | None = None,
        cpus: int = 1,
        machine_cpus: int = 1,
        runnable: Callable[[], int | None] = _runnable_tasks,
        own_cpus: frozenset[int] | None = None,
    ) -> None:
        mode = mode.strip().lower() or "auto"
        if mode not in ("auto", "0", "1"):
            raise ValueError(f"{YIELD_ENV} must be auto, 0 or 1, not {mode!r}")
        if mode == "auto" and ranks is not None and ranks > cpus:
            mode = "1"  # oversubscribed by the launcher, for the whole job
        self._mode = mode
        self._machine_cpus = machine_cpus
        self._runnable = runnable
        #: When (``perf_counter``) the count is read again; until then :attr:`crowded`
        #: is the answer (callers on a hot path test these two themselves, then call).
        self.next_check = float("-inf") if mode == "auto" else float("inf")
        #: Consecutive readings that disagree with :attr:`crowded`.
        self._against = 0
        self.crowded = mode == "1"
        self._own_cpus = own_cpus or None
        #: Links per same-host peer process (pid), and the peers whose CPUs all
        #: lie within this process's own.
        self._peers: dict[int, int] = {}
        self._inside: set[int] = set()
        #: Links of endpoints on different threads' loops open and close at once.
        self._links_lock = threading.Lock()
        #: Whether linked peers bound within this process's CPUs outnumber them (in
        #: ``auto`` mode only): crowded for as long as those links last.
        self.confined = False

    @property
    def fixed(self) -> bool | None:
        """True or False when the answer never changes, None when it is measured."""
        return None if self._mode == "auto" else self._mode == "1"

    def __call__(self, now: float) -> bool:
        """Whether the CPUs are crowded at ``now`` (a ``time.perf_counter()``)."""
        if now < self.next_check or self.confined:
            return self.crowded
        runnable = self._runnable()
        # The count includes this process (running as it reads): crowded when the
        # other runnable tasks alone outnumber the CPUs.
        over = runnable is not None and runnable - 1 > self._machine_cpus
        # A few readings in a row, not one, either way: a burst (processes starting or
        # exiting) is not a trend, and neither is a moment when a rank of a crowded
        # machine sleeps. (The crowd used to end at the first reading after each
        # hold, whatever it said: for 10 ms in every 110 every rank then spun and
        # slept, and the sleeps let the kernel move ranks between CPUs; 4 ranks on 2
        # CPUs made an all-to-all round 20-30 % slower.)
        self._against = self._against + 1 if over != self.crowded else 0
        if self._against >= CROWD_SAMPLES:
            self.crowded = over
            self._against = 0
        # Once crowded, stay so for a while: polling makes the pollers runnable
        # again, so the count taken while nobody polls would turn it back on at once.
        # A reading against it is checked again at the normal period.
        held = self.crowded and not self._against
        self.next_check = now + (CROWD_HOLD if held else CROWD_PERIOD)
        return self.crowded

    def peer_linked(self, pid: int, cpus: frozenset[int] | None) -> None:
        """A link to process ``pid`` of this host opened; ``cpus`` is its affinity mask
        (:func:`hpcproc._host.cpu_mask`; None: unknown). Counted once per process,
        however many links lead to it.

        While the linked processes whose CPUs all lie within this process's own,
        with this one, outnumber those CPUs (two processes bound to one CPU by
        ``taskset`` or a container's cpuset), the CPUs are crowded (in ``auto``
        mode): the machine-wide count of runnable tasks does not show such a crowd,
        and a receive that spins there keeps the CPU from the process it waits for.
        Measured, two processes on one CPU, 8 B round trip: shm 245 us spinning,
        9.5-10 us polling by yielding; tcp 216-221 against 17-18 us; mpi 460-470
        against 22-24 us. Linked processes count whether they are busy or idle, as a
        launcher's ranks do: two on two CPUs plus one idle, shm 4.7 us against
        4.2-4.4 spinning (tcp no different).
        """
        with self._links_lock:
            links = self._peers.get(pid, 0)
            self._peers[pid] = links + 1
            own = self._own_cpus
            if links == 0 and cpus and own is not None and cpus <= own:
                self._inside.add(pid)
                self._confinement_changed()

    def count_link(self, pid: int) -> int:
        """:meth:`peer_linked` for a link to process ``pid`` of this host (0: not one,
        nothing counted), its mask read now; the pid to hand :meth:`peer_unlinked`
        when the link goes, 0 when there is nothing to undo."""
        if pid <= 0:
            return 0
        from .._host import cpu_mask

        self.peer_linked(pid, cpu_mask(pid))
        return pid

    def peer_unlinked(self, pid: int) -> None:
        """A link that :meth:`peer_linked` counted is gone."""
        with self._links_lock:
            links = self._peers.pop(pid, 0) - 1
            if links > 0:
                self._peers[pid] = links
            elif pid in self._inside:
                self._inside.discard(pid)
                self._confinement_changed()

    def _confinement_changed(self) -> None:
        own = self._own_cpus
        confined = self._mode == "auto" and own is not None and len(self._inside) + 1 > len(own)
        if confined == self.confined:
            return
        self.confined = self.crowded = confined
        self._against = 0
        # Confined: no reading of the count can end it, so none is made. Freed: the
        # count is read at the next look, as at start.
        self.next_check = float("inf") if confined else float("-inf")


_crowding: Crowding | None = None


def crowding() -> Crowding:
    """This process's :class:`Crowding`, made on first use from the launcher's
    environment and :data:`YIELD_ENV`.

    Raises:
        ValueError: :data:`YIELD_ENV` is set to something else than auto, 0 or 1.
    """
    global _crowding
    if _crowding is None:
        from .._host import cpu_mask, ranks_on_host, shared_cpus

        _crowding = Crowding(
            os.environ.get(YIELD_ENV, "auto"),
            ranks=ranks_on_host(),
            cpus=shared_cpus(),
            machine_cpus=os.cpu_count() or 1,
            own_cpus=cpu_mask(),
        )
    return _crowding


def ready_queue(loop: asyncio.AbstractEventLoop) -> Sized | None:
    """The queue of callbacks ready to run on ``loop``, or None where it cannot be read.

    Reads ``BaseEventLoop._ready`` (a ``collections.deque`` of handles, an
    implementation detail of asyncio's standard loops). None on any loop that has no
    such deque (uvloop, a future asyncio): callers then never poll.
    """
    ready = getattr(loop, "_ready", None)
    return ready if isinstance(ready, collections.deque) else None


def check_budget(busy_poll_us: float) -> None:
    """Raise ``ValueError`` naming the option when ``busy_poll_us`` is negative (or not
    a number: NaN)."""
    if not busy_poll_us >= 0:
        raise ValueError(f"{OPTION} must not be negative, not {busy_poll_us}")


class Budget:
    """How long to poll next (seconds): between ``maximum / 16`` (or ``minimum``) and
    ``maximum``; halves after a silence, doubles after a near miss."""

    __slots__ = ("maximum", "minimum", "value")

    def __init__(self, maximum: float, minimum: float | None = None) -> None:
        self.maximum = maximum
        self.minimum = maximum / 16 if minimum is None else min(minimum, maximum)
        self.value = maximum

    def shrink(self) -> None:
        """Polling ran out without a reply."""
        self.value = max(self.minimum, self.value * 0.5)

    def grow(self) -> None:
        """A reply came soon after polling gave up: polling longer would have caught it."""
        self.value = min(self.maximum, self.value * 2)

    def missed(self, gave_up: float, now: float) -> None:
        """A reply came at ``now``, after polling gave up at ``gave_up``."""
        if now - gave_up < LATE * self.maximum:
            self.grow()
        else:
            self.shrink()


def _others_among(ready: Any, mine: Container[object]) -> bool:
    """Whether the loop's ready queue ``ready`` holds a handle not in ``mine``.

    Iterates over a copy: a thread's ``call_soon_threadsafe`` may append to the
    queue meanwhile (between two steps of a Python loop over it, or while a timer
    handle's ``__eq__`` runs), and a deque iterated while it changes raises
    ``RuntimeError``. Seen: a node's dispatcher died of it, 64 ranks at start-up,
    and the job hung. (``tuple`` copies the deque in C, running no Python code; a
    change even then means that a callback was added: another one is ready.)
    """
    try:
        handles = tuple(ready)
    except RuntimeError:
        return True
    return any(handle not in mine for handle in handles)


class IdlePoller:
    """Polls a transport's links in place while the loop is idle; see the module.

    One per endpoint (or per event loop, for work shared by its endpoints). Bound to
    the loop it was created for.
    """

    __slots__ = (
        "_loop_ready",
        "_no_poll_until",
        "_ours_seen",
        "_ready",
        "_starved",
        "_streak",
        "_yield",
        "_yielding",
        "budget",
        "crowding",
        "enabled",
        "yield_budget",
        "yield_look",
        "yields",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, busy_poll_us: float, *, yields: bool = True
    ) -> None:
        check_budget(busy_poll_us)
        self.budget = Budget(busy_poll_us * 1e-6)
        #: How long a poll on crowded CPUs yields before it gives up.
        self.yield_budget = Budget(YIELD_POLL_S)
        #: Whether this poller polls by yielding on crowded CPUs (False: it does not
        #: poll then; a routing endpoint polls for it, see :meth:`poll_looking`).
        self.yields = yields
        #: Whether the poll that :meth:`turn` or :meth:`poll` just allowed yields.
        self._yield = False
        #: A transport's ``poll_once`` for :meth:`poll` when it yields, if it has a
        #: cheaper one for many looks that find nothing (tcp: one ``poll(2)``).
        self.yield_look: Callable[[], bool] | None = None
        #: Whether the CPUs are crowded now: the process's :class:`Crowding` this
        #: poller follows (an attribute, not a property: read on every routed wait).
        self.crowding = crowding()
        self._streak = 0
        self._starved = 0
        self._no_poll_until = 0.0
        #: The loop's ready queue (None where unreadable), whatever the budget.
        self._loop_ready: Any = ready_queue(loop)
        ready: Any = self._loop_ready if busy_poll_us else None
        self._ready = ready
        #: Whether this poller ever polls (a budget, and a loop whose queue is
        #: readable). An attribute, not a property: read on every receive.
        self.enabled = ready is not None
        #: True while ``receive`` waits in its yield to other ready callbacks.
        self._yielding = False
        #: The ready handle :meth:`poll_looking` last found to be the caller's own.
        self._ours_seen: object = None

    # ------------------------------------------------------------------ the parts

    def others_ready(self, ours: object = None) -> bool:
        """Whether a callback other than ``ours`` (a handle of the caller's own, or
        None) is ready to run. True on a loop whose queue cannot be read."""
        ready: Any = self._ready
        if ready is None:
            return True
        if not ready:
            return False
        return len(ready) != 1 or ready[0] is not ours

    def turn(self, now: float, ours: object = None, own_ready: int = -1) -> bool:
        """Whether a receive polls at ``now``, this turn counted: not on the loop's fair
        turn (every :data:`FAIR_STREAK` + 1st, see :meth:`take_turn`), and only when
        polling is enabled and no callback is ready but the caller's own (``ours``; or
        ``own_ready``, how many of the ready callbacks are the caller's, where it
        counts them: callbacks it never cancels), and either the CPUs are crowded and
        this poller :attr:`yields` (it then polls by yielding, starved spins or not)
        or they are not and spinning is not off after starved spins: the checks of
        :meth:`others_ready` and :meth:`polling_off` in one call, for the receive
        paths."""
        self._streak += 1
        if self._streak > FAIR_STREAK:
            self._streak = 0
            return False
        ready: Any = self._ready
        if ready is None:
            return False
        if ready and (len(ready) != 1 or ready[0] is not ours) and len(ready) > own_ready:
            return False
        c = self.crowding
        crowded = self._yield = c.crowded if now < c.next_check else c(now)
        if crowded:
            return self.yields
        return now >= self._no_poll_until

    def yield_if_crowded(self, ours: object = None) -> bool:
        """Give the CPU away (``os.sched_yield``) if the loop is idle but for ``ours``
        and the CPUs are crowded (or polls were starved); whether it did. For a caller
        that polls on every pass round the loop because it has nothing to wait on
        (the mpi pump), with or without a polling budget, as MPICH's progress yields
        when oversubscribed. Never on a loop whose ready queue cannot be read."""
        # (others_ready, on the loop's queue rather than the polling one: that is None
        # without a budget.)
        ready: Any = self._loop_ready
        if ready is None or (ready and (len(ready) != 1 or ready[0] is not ours)):
            return False
        if self.polling_off(time.perf_counter()):
            os.sched_yield()
            return True
        return False

    def take_turn(self) -> bool:
        """Count one poll; False every :data:`FAIR_STREAK` + 1st: let the loop run now."""
        self._streak += 1
        if self._streak > FAIR_STREAK:
            self._streak = 0
            return False
        return True

    def polling_off(self, now: float) -> bool:
        """Whether polling is off at ``now`` (the CPUs are, or were seen, oversubscribed)."""
        c = self.crowding
        return now < self._no_poll_until or (c.crowded if now < c.next_check else c(now))

    def probed(self, now: float, starved: bool) -> None:
        """Record whether a poll ending at ``now`` had the CPU to itself (at least half
        of the time). Several starved polls in a row turn polling off for a while; a
        single one is a preemption, not a trend."""
        if not starved:
            self._starved = 0
            return
        self._starved += 1
        if self._starved >= STARVED_POLLS:
            self._starved = 0
            self._no_poll_until = now + NO_POLL_PERIOD

    def poll(
        self, items: Sized, poll_once: Callable[[], bool], start: float | None = None
    ) -> float:
        """Call ``poll_once`` until ``items`` (the event queue's deque) is not empty,
        another callback became ready, or the budget ran out: the time it gave up
        (budget spent), else 0.0.

        ``poll_once`` takes whatever has arrived without blocking and returns False
        when there is nothing to poll (then this returns 0.0 at once). Does nothing
        while spinning is off after starved spins (unless the CPUs are crowded: it
        then polls by yielding) or when the CPUs are crowded and this poller does not
        yield; the caller checked that the loop is idle. ``start``: the
        ``perf_counter`` time at which the caller found :meth:`turn` true (then
        it is known to poll).
        """
        if start is None:
            start = time.perf_counter()
            c = self.crowding  # Crowding.__call__'s cached answer read here: a call less
            crowded = self._yield = c.crowded if start < c.next_check else c(start)
            if crowded:
                if not self.yields:
                    return 0.0
            elif start < self._no_poll_until:
                return 0.0
        if self._yield:
            once = self.yield_look or poll_once
            self._poll_yielding(lambda: not once() or bool(items))
            return 0.0
        ready: Any = self._ready
        # Callbacks ready before we started (the caller's own, at most) are known.
        queued = len(ready)
        # Reading the CPU clock is a system call: probe one poll in eight.
        cpu = time.thread_time() if not self._streak & 7 else -1.0
        deadline = start + self.budget.value
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
        if cpu >= 0 and now - start > PROBE_MIN:
            self.probed(now, time.thread_time() - cpu < (now - start) / 2)
        return gave_up

    def poll_counter(
        self,
        items: Sized,
        words: Sequence[int],
        index: int,
        seen: Any,
        on_change: Callable[[], bool],
        start: float,
    ) -> float:
        """:meth:`poll` for a producer that announces data by moving a counter in
        shared memory: spins while ``words[index]`` equals ``seen.tail`` (nothing
        new), with no Python call per turn, and calls ``on_change`` when they differ
        (it takes the data, which advances ``seen.tail``, and returns False when there
        is nothing more to poll). ``start`` as for :meth:`poll`. The time it gave
        up, else 0.0. (The shm ring's spin: measured 0.25 us less per 8 B round trip
        than :meth:`poll` with a closure called every turn.)
        """
        if self._yield:

            def look() -> bool:
                return (words[index] != seen.tail and not on_change()) or bool(items)

            self._poll_yielding(look)
            return 0.0
        ready: Any = self._ready
        queued = len(ready)
        cpu = time.thread_time() if not self._streak & 7 else -1.0
        deadline = start + self.budget.value
        perf_counter = time.perf_counter
        now = start
        gave_up = 0.0
        while not items:
            if words[index] != seen.tail:
                if not on_change():
                    return 0.0
                continue
            if len(ready) > queued:
                break
            now = perf_counter()
            if now >= deadline:
                gave_up = now
                break
        if cpu >= 0 and now - start > PROBE_MIN:
            self.probed(now, time.thread_time() - cpu < (now - start) / 2)
        return gave_up

    def turn_and_poll(
        self, items: Sized, step: Callable[[Any], bool], arg: Any, ours: object = None
    ) -> float:
        """A receive's whole idle poll in one call, :meth:`turn` and :meth:`poll` with
        ``step(arg)`` as ``poll_once``: nothing when a callback other than ``ours`` is
        ready (0.0); else counts the turn, and on the loop's fair turn returns -1.0
        without polling (the caller lets the loop run once); else, on crowded CPUs,
        polls by yielding if this poller :attr:`yields` (:meth:`poll_yielding`; 0.0);
        else nothing while spinning is off after starved spins (0.0); else calls
        ``step(arg)`` until an event is queued, another callback became ready,
        ``step`` returned False (0.0) or the budget ran out (then, once it gave the CPU
        away, one turn more: the time it gave up, unless that turn queued an event,
        which doubles the budget as a near miss does).

        One frame for all of it, and ``step`` called without a bound method or a
        ``functools.partial`` in between: the mpi transport's receive, whose every
        turn is one MPI probe (measured: the poll through :meth:`turn` and
        :meth:`poll` cost its 8 B round trip 0.4-0.6 us).
        """
        ready: Any = self._ready
        if ready is None or (ready and (len(ready) != 1 or ready[0] is not ours)):
            return 0.0
        self._streak += 1
        if self._streak > FAIR_STREAK:
            self._streak = 0
            return -1.0
        perf_counter = time.perf_counter
        start = perf_counter()
        c = self.crowding
        if c.crowded if start < c.next_check else c(start):
            if self.yields:
                self.poll_yielding(items, step, arg)
            return 0.0
        if start < self._no_poll_until:
            return 0.0
        # As poll: the callbacks ready before we started, the CPU probe, the budget.
        queued = len(ready)
        cpu = time.thread_time() if not self._streak & 7 else -1.0
        deadline = start + self.budget.value
        now = start
        gave_up = 0.0
        while True:
            if not step(arg):
                return 0.0
            if items or len(ready) > queued:
                break
            now = perf_counter()
            if now >= deadline:
                # A last turn after giving the CPU away, as spin's (which see). What it
                # takes came a little too late for the budget: a near miss, which
                # doubles it (else a budget shrunk by a silence would stay so).
                os.sched_yield()
                if not step(arg):
                    return 0.0
                if items:
                    self.budget.grow()
                else:
                    gave_up = now
                break
        if cpu >= 0 and now - start > PROBE_MIN:
            self.probed(now, time.thread_time() - cpu < (now - start) / 2)
        return gave_up

    def poll_yielding(self, items: Sized, step: Callable[[Any], bool], arg: Any) -> None:
        """:meth:`turn_and_poll`'s poll on crowded CPUs (the compiled mpi spinner's
        too): ``step(arg)`` with the CPU given away between two calls, until an event
        is queued, ``step`` returned False, another callback became ready or the
        yielding budget ran out."""
        self._poll_yielding(lambda: not step(arg) or bool(items))

    def _poll_yielding(self, look: Callable[[], bool]) -> None:
        """The poll on crowded CPUs: ``look()`` (one look at the links; True: stop)
        with the CPU given away between two looks, until another callback is ready
        or :attr:`yield_budget` ran out (then it halves; a look that stopped the poll
        doubles it)."""
        ready: Any = self._ready
        queued = len(ready)
        budget = self.yield_budget
        perf_counter = time.perf_counter
        sched_yield = os.sched_yield
        deadline = perf_counter() + budget.value
        while not look():
            if len(ready) > queued:
                return
            if perf_counter() >= deadline:
                budget.shrink()
                return
            sched_yield()
        budget.grow()

    def poll_looking(
        self,
        look: Callable[[], bool],
        now: float,
        all_ours: Callable[[], Container[object]] | None = None,
    ) -> bool:
        """For an endpoint made of several (routing): on crowded CPUs, poll by
        yielding with ``look`` (one look at every sub-endpoint's links; True: stop),
        as :meth:`turn` and :meth:`poll` would for one, whether or not this poller
        :attr:`yields` itself. Whether it polled: False when the CPUs are not
        crowded (the caller polls as usual), on the loop's fair turn, or when a
        callback other than ``all_ours()`` is ready (starved spins do not stop it:
        it gives the CPU away between its looks)."""
        ready: Any = self._ready
        c = self.crowding  # its cached answer read here: a call less per wait
        if ready is None or not (c.crowded if now < c.next_check else c(now)):
            return False
        # The one handle found ours last time is still ours: while the loop does not
        # run (a busy all-to-all), a link's own poll waits in the ready queue through
        # every wait, and asking the endpoint for its handles each time cost two calls
        # per wait.
        if ready and (len(ready) != 1 or ready[0] is not self._ours_seen):
            if _others_among(ready, all_ours() if all_ours is not None else ()):
                return False
            self._ours_seen = ready[0] if len(ready) == 1 else None
        if not self.take_turn():
            return False
        self._poll_yielding(look)
        return True

    def adapt(self, gave_up: float) -> None:
        """An event came after a poll that gave up at ``gave_up`` (0.0: nothing to do)."""
        if gave_up:
            self.budget.missed(gave_up, time.perf_counter())

    def spin(
        self, step: Callable[[], bool], ours: object = None, *, yield_when_crowded: bool = False
    ) -> bool:
        """Call ``step`` until it returns True, for at most the maximal budget, if the
        loop is idle but for ``ours`` and polling is on; whether it returned True. When
        the budget runs out it gives the CPU away once (``sched_yield``) and calls
        ``step`` a last time.

        For waits that are not a ``receive`` (a send's completion, a connect's answer,
        a progress callback): they take the budget as it is configured, not adapted.
        With ``yield_when_crowded``, an idle loop on crowded CPUs gives the CPU away
        instead, as :meth:`yield_if_crowded` does, with a polling budget or without.
        """
        if self.others_ready(ours):
            if yield_when_crowded and self._ready is None:  # no budget: no spin, but
                self.yield_if_crowded(ours)  # the same yield
            return False
        perf_counter = time.perf_counter
        now = perf_counter()
        c = self.crowding
        if now < self._no_poll_until or (c.crowded if now < c.next_check else c(now)):
            if yield_when_crowded:
                os.sched_yield()
            return False
        deadline = now + self.budget.maximum
        while not step():
            if perf_counter() >= deadline:
                # A task this spin kept from the CPU (a peer on it, which the machine-
                # wide count does not show: ranks confined to one CPU) runs now, and
                # may have answered. Without it, two mpi ranks on one CPU, whose pumps
                # spin on every pass round their loops, took turns by time slices: an
                # 8 B round trip took 8 ms; with it, 0.5 ms.
                os.sched_yield()
                return step()
        return True

    # ------------------------------------------------------------------ receive

    async def receive(self, events: EventQueue, poll_once: Callable[[], bool]) -> Event:
        """The next event of ``events``, polling first while the loop is idle.

        Before polling it lets ready callbacks run, up to :data:`_YIELDS` loop
        iterations (a dispatcher typically calls receive right after waking the task
        it delivered to, which is about to send the next message). ``poll_once`` is
        as for :meth:`poll`.
        """
        ready: Any = self._ready
        if len(events) or ready is None:
            return await events.get()
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
        if ready or not self.take_turn():
            return await events.get()
        gave_up = self.poll(events._items, poll_once)
        event = events.pop_ready()
        if event is None:
            event = await events.get()
        self.adapt(gave_up)
        return event

    def poll_now(self, events: EventQueue, poll_once: Callable[[], bool]) -> bool:
        """Poll in place now if the loop is idle (as ``receive`` would); True when an
        event is queued. Never suspends; polls at most the current budget."""
        if events._items:
            return True
        ready: Any = self._ready
        if ready is None:
            return False
        # The one ready callback of a receive yielding to others is no reason not to.
        if ready and not (self._yielding and len(ready) == 1):
            return False
        if not self.take_turn():
            return False
        self.poll(events._items, poll_once)
        return bool(events._items)
