"""Run one benchmark function as two OS processes ("roles" 0 and 1) and collect results.

A *role function* is named ``"module:function"`` and takes a :class:`Peer`; it may be
a plain function or ``async def`` (then it runs under ``asyncio.run``). Its return
value must be JSON-serialisable; :func:`run_pair` returns both roles' values, indexed
by role. The two roles find each other through :meth:`Peer.publish` /
:meth:`Peer.lookup`, small JSON values exchanged through files in a private
directory, which works the same whichever way the processes were started:

``launch="local"``
    two ``python -m bench._role`` children of this process;
``launch="mpiexec"``
    one ``mpiexec -n 2 python -m bench._role`` (the ``mpiexec`` next to
    ``sys.executable``, else on ``PATH``); each rank plays the role equal to its rank,
    read from the launcher's environment (PMI, Open MPI, PMIx or Slurm);
``launch="solo"``
    a single child playing role 0, for baselines that start their own partner (such
    as ``multiprocessing.Pipe``); ``run_pair`` then returns a one-element list.

:func:`run_pairs` runs several implementations at once, their measuring roles taking
turns run by run (:class:`Baton`), so that a slow phase of a shared machine hits all
of them alike; ratios between them are then much steadier than between
implementations measured one after the other.

Every child is started in its own session and killed (with its descendants) if the
run fails or exceeds ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Baton", "Job", "Launch", "PairError", "Peer", "find_mpiexec", "run_pair", "run_pairs"]

Launch = Literal["local", "mpiexec", "solo"]


class PairError(RuntimeError):
    """A role failed, timed out, or could not be started."""


class Peer:
    """What a role function gets: its role, the parameters, and the rendezvous."""

    def __init__(
        self, workdir: Path, role: int, params: dict[str, Any], baton: Baton | None = None
    ) -> None:
        self.workdir = workdir
        #: 0 or 1 (0 alone in ``solo`` mode).
        self.role = role
        #: The ``params`` given to :func:`run_pair`.
        self.params = params
        #: Turn-taking with the other pairs of :func:`run_pairs`, or with whoever
        #: passed ``BENCH_BATON`` in the environment (role 0 only); ``None`` if alone.
        self.baton = baton

    def turn(self) -> contextlib.AbstractContextManager[None]:
        """Context for one timed run: waits for this pair's turn when interleaved."""
        return self.baton.turn() if self.baton is not None else contextlib.nullcontext()

    def publish(self, key: str, value: Any) -> None:
        """Make ``value`` (JSON) visible to the other role under ``key``."""
        path = self.workdir / f"pub-{self.role}-{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.rename(path)  # atomic: the reader never sees half a file

    def lookup(self, key: str, timeout: float = 120.0) -> Any:
        """The value the other role published under ``key``; waits for it.

        Raises:
            PairError: nothing was published within ``timeout`` seconds.
        """
        path = self.workdir / f"pub-{1 - self.role}-{key}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise PairError(f"role {1 - self.role} published no {key!r} in {timeout} s")
            time.sleep(0.002)
        return json.loads(path.read_text())

    async def alookup(self, key: str, timeout: float = 120.0) -> Any:
        """:meth:`lookup` that keeps the event loop running while it waits."""
        path = self.workdir / f"pub-{1 - self.role}-{key}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise PairError(f"role {1 - self.role} published no {key!r} in {timeout} s")
            await asyncio.sleep(0.002)
        return json.loads(path.read_text())


def find_mpiexec() -> str:
    """The ``mpiexec`` of this environment (next to ``sys.executable``), else on PATH.

    Raises:
        PairError: none found.
    """
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise PairError("mpiexec not found next to the interpreter nor on PATH")
    return found


@dataclass(frozen=True, slots=True)
class Job:
    """One implementation to run as a pair: a role function and how to launch it."""

    target: str
    launch: Launch = "local"


class Baton:
    """Takes turns between the measuring roles of several pairs run at once (or a
    pair and another measuring process, see ``bench.cluster``).

    Each turn is one timed run; while one participant measures, the others block in
    ``read`` on a FIFO and use no CPU, so every run of one implementation sits next
    in time to a run of every other, whatever the rest of the machine does. With
    ``timeout``, a turn waited for longer raises instead of blocking forever.
    """

    #: Written instead of the turn token by :meth:`interrupt`.
    _FAILED = b"!"

    def __init__(
        self, directory: Path, index: int, count: int, timeout: float | None = None
    ) -> None:
        self._own = directory / f"baton-{index}"
        self._next = directory / f"baton-{(index + 1) % count}"
        self._fds: dict[Path, int] = {}
        self._timeout = timeout

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            # O_RDWR: opening never blocks, and written bytes persist while it is open.
            self._fds[path] = os.open(path, os.O_RDWR)
        return self._fds[path]

    def give(self) -> None:
        """Hand the turn on without taking one (for the participant that starts the
        round by letting the next one go first)."""
        os.write(self._fd(self._next), b"x")

    def interrupt(self) -> None:
        """Make this participant's current or next wait for a turn raise
        :class:`PairError` at once (called from another thread, when what this
        participant takes turns with has failed). Does nothing once the FIFOs are
        gone (this participant is done)."""
        with contextlib.suppress(OSError):
            os.write(self._fd(self._own), self._FAILED)

    def close(self) -> None:
        """Close the FIFOs this object opened."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this participant's turn, run the body, then hand the turn on.

        Raises:
            PairError: the FIFO was closed, no turn came within the timeout, or
                :meth:`interrupt` was called.
        """
        fd = self._fd(self._own)
        if self._timeout is not None and not select.select([fd], [], [], self._timeout)[0]:
            raise PairError(f"no turn within {self._timeout} s (the other side stopped?)")
        token = os.read(fd, 1)
        if not token:
            raise PairError("baton FIFO closed")
        if token == self._FAILED:
            raise PairError("the other side of the turn-taking failed")
        try:
            yield
        finally:
            self.give()


def run_pair(
    target: str,
    params: Mapping[str, Any] | None = None,
    *,
    launch: Launch = "local",
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    inherit_env: bool = True,
) -> list[Any]:
    """Run ``target`` ("module:function") as role 0 and role 1; return their results.

    ``env`` is added to this process's environment for the children (with
    ``inherit_env`` false it is their whole environment).

    Raises:
        PairError: a role exited with an error, or the run exceeded ``timeout``
            seconds (every child is killed first).
    """
    return run_pairs(
        [Job(target, launch)], params, env=env, timeout=timeout, inherit_env=inherit_env
    )[0]


def run_pairs(
    jobs: Sequence[Job],
    params: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    interleave: bool = True,
    inherit_env: bool = True,
) -> list[list[Any]]:
    """Run several pairs at once, their timed runs taking turns; results per job.

    Every pair gets the same ``params`` and a :class:`Baton` as ``peer.baton``
    (``None`` when there is one job). Role functions that time through
    :func:`bench.time_steps` with ``turn=peer.turn`` take turns, so they must run the
    same number of timed runs (the same plan). With ``interleave=False`` the jobs run
    one after the other instead: needed when a waiting pair would still load the
    machine (an MPI rank busy-polls in ``Recv`` while its partner waits for a turn).
    ``env`` as for :func:`run_pair`.

    Raises:
        PairError: a role exited with an error (the others are killed at once), or
            the run exceeded ``timeout`` seconds.
    """
    if not interleave and len(jobs) > 1:
        return [
            run_pairs([job], params, env=env, timeout=timeout, inherit_env=inherit_env)[0]
            for job in jobs
        ]
    procs: list[subprocess.Popen[bytes]] = []
    batons: list[int] = []
    with tempfile.TemporaryDirectory(prefix="hpcproc-bench-") as tmp:
        root = Path(tmp)
        child_env = {**(os.environ if inherit_env else {}), **(env or {})}
        child_env.pop("BENCH_ROLE", None)
        repo_root = str(Path(__file__).resolve().parent.parent)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p
        )
        try:
            for index in range(len(jobs)):
                fifo = root / f"baton-{index}"
                os.mkfifo(fifo)
                batons.append(os.open(fifo, os.O_RDWR))
            owners: list[tuple[int, subprocess.Popen[bytes]]] = []
            for index, job in enumerate(jobs):
                workdir = root / f"job-{index}"
                workdir.mkdir()
                (workdir / "params.json").write_text(json.dumps(dict(params or {})))
                job_env = dict(child_env)
                if len(jobs) > 1:
                    job_env["BENCH_BATON"] = f"{root}:{index}:{len(jobs)}"
                base = [sys.executable, "-m", "bench._role", str(workdir), job.target]
                if job.launch == "mpiexec":
                    cmd = [find_mpiexec(), "-n", "2", *base]
                    owners.append(
                        (index, subprocess.Popen(cmd, env=job_env, start_new_session=True))
                    )
                else:
                    for role in range(1 if job.launch == "solo" else 2):
                        proc = subprocess.Popen(
                            base, env={**job_env, "BENCH_ROLE": str(role)}, start_new_session=True
                        )
                        owners.append((index, proc))
            procs = [proc for _, proc in owners]
            if batons:
                os.write(batons[0], b"x")
            deadline = time.monotonic() + timeout
            running = list(owners)
            while running:
                for index, proc in list(running):
                    code = proc.poll()
                    if code is None:
                        continue
                    running.remove((index, proc))
                    if code != 0:
                        raise PairError(f"{jobs[index].target} exited with {code}")
                if time.monotonic() > deadline:
                    raise PairError(f"{[j.target for j in jobs]} did not finish in {timeout} s")
                if running:
                    time.sleep(0.05)
            results = []
            for index, job in enumerate(jobs):
                roles = 1 if job.launch == "solo" else 2
                per_role = []
                for role in range(roles):
                    path = root / f"job-{index}" / f"result-{role}.json"
                    if not path.exists():
                        raise PairError(f"{job.target}: role {role} left no result")
                    per_role.append(json.loads(path.read_text()))
                results.append(per_role)
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for fd in batons:
                os.close(fd)
