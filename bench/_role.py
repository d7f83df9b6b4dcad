"""Child side of :func:`bench.run_pair`: ``python -m bench._role WORKDIR MODULE:FUNCTION``.

Kept apart from :mod:`bench._pair` so that running it as ``__main__`` does not import it
twice.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

from ._pair import Baton, PairError, Peer

_RANK_VARS = ("BENCH_ROLE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _role_from_env() -> int:
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None:
            return int(value)
    raise PairError("cannot tell this process's role: no rank variable in the environment")


def _child(workdir: Path, target: str) -> None:
    role = _role_from_env()
    params = json.loads((workdir / "params.json").read_text())
    module_name, _, attr = target.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    baton = None
    if "BENCH_BATON" in os.environ and role == 0:
        directory, index, count = os.environ["BENCH_BATON"].rsplit(":", 2)
        # A bound on each wait, where the other side may die without closing its
        # FIFO (a process outside run_pairs; see bench.cluster).
        timeout = os.environ.get("BENCH_BATON_TIMEOUT")
        baton = Baton(
            Path(directory), int(index), int(count), float(timeout) if timeout else None
        )
    peer = Peer(workdir, role, params, baton)
    result = asyncio.run(fn(peer)) if inspect.iscoroutinefunction(fn) else fn(peer)
    path = workdir / f"result-{role}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(path)


def main() -> None:
    _child(Path(sys.argv[1]), sys.argv[2])


if __name__ == "__main__":
    main()
