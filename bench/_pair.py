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

Every child is started in its own session and killed (with its descendants) if the
run fails or exceeds ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = ["Launch", "PairError", "Peer", "find_mpiexec", "run_pair"]

Launch = Literal["local", "mpiexec", "solo"]


class PairError(RuntimeError):
    """A role failed, timed out, or could not be started."""


class Peer:
    """What a role function gets: its role, the parameters, and the rendezvous."""

    def __init__(self, workdir: Path, role: int, params: dict[str, Any]) -> None:
        self.workdir = workdir
        #: 0 or 1 (0 alone in ``solo`` mode).
        self.role = role
        #: The ``params`` given to :func:`run_pair`.
        self.params = params

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


def run_pair(
    target: str,
    params: Mapping[str, Any] | None = None,
    *,
    launch: Launch = "local",
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``target`` ("module:function") as role 0 and role 1; return their results.

    ``env`` is added to this process's environment for the children.

    Raises:
        PairError: a role exited with an error, or the run exceeded ``timeout``
            seconds (every child is killed first).
    """
    with tempfile.TemporaryDirectory(prefix="hpcproc-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "params.json").write_text(json.dumps(dict(params or {})))
        child_env = {**os.environ, **(env or {})}
        child_env.pop("BENCH_ROLE", None)
        base = [sys.executable, "-m", "bench._role", str(workdir), target]
        repo_root = str(Path(__file__).resolve().parent.parent)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            if launch == "mpiexec":
                cmd = [find_mpiexec(), "-n", "2", *base]
                procs.append(subprocess.Popen(cmd, env=child_env, start_new_session=True))
                roles = 2
            else:
                roles = 1 if launch == "solo" else 2
                for role in range(roles):
                    procs.append(
                        subprocess.Popen(
                            base, env={**child_env, "BENCH_ROLE": str(role)}, start_new_session=True
                        )
                    )
            deadline = time.monotonic() + timeout
            for proc in procs:
                left = max(0.1, deadline - time.monotonic())
                try:
                    code = proc.wait(left)
                except subprocess.TimeoutExpired:
                    raise PairError(f"{target} did not finish within {timeout} s") from None
                if code != 0:
                    raise PairError(f"{target} ({' '.join(proc.args)}) exited with {code}")  # type: ignore[arg-type]
            results = []
            for role in range(roles):
                path = workdir / f"result-{role}.json"
                if not path.exists():
                    raise PairError(f"{target}: role {role} left no result")
                results.append(json.loads(path.read_text()))
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
