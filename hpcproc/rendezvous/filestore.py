"""Rendezvous through a shared directory (a home or scratch file system).

Every rank writes ``rank-<r>`` (atomically: a temporary file, then ``rename``) into a
directory named after the job, then polls until all ``size`` files exist, reads them,
and writes ``read-<r>``. Rank 0 removes the directory once every rank has read it.
Files are created with mode 0600 in a 0700 directory: on a shared home directory
only the user (who also owns the cookie) can write them. The job's key is written
into every file and checked, so files of an earlier job are never mistaken.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .errors import RendezvousError

__all__ = ["gather_via_directory"]

log = logging.getLogger("hpcproc.rendezvous")


async def gather_via_directory(
    directory: Path,
    *,
    rank: int,
    size: int,
    payload: bytes,
    key: str,
    timeout: float,
    describe: str,
) -> list[bytes]:
    """Every rank's payload, gathered through files in ``directory``.

    Polls (with backoff up to 0.5 s) until all ranks wrote their file or ``timeout``.

    Raises:
        RendezvousError: ranks missing at the deadline (named), or the directory is
            not usable.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(
            directory / f"rank-{rank}", json.dumps({"key": key, "payload": payload.hex()})
        )
    except OSError as exc:
        raise RendezvousError(f"rendezvous directory {directory} is not usable: {exc}") from exc
    deadline = time.monotonic() + timeout
    payloads: dict[int, bytes] = {}
    delay = 0.01
    while True:
        for r in range(size):
            if r not in payloads:
                entry = _read_entry(directory / f"rank-{r}", key)
                if entry is not None:
                    payloads[r] = entry
        if len(payloads) == size:
            break
        if time.monotonic() >= deadline:
            missing = [r for r in range(size) if r not in payloads]
            raise RendezvousError(
                f"rendezvous timed out after {timeout:g} s: ranks {missing} of {size} did not"
                f" write to {directory} ({describe})"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    _write_atomic(directory / f"read-{rank}", key)
    if rank == 0:
        await _remove_when_read(directory, size, deadline)
    return [payloads[r] for r in range(size)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_entry(path: Path, key: str) -> bytes | None:
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RendezvousError(f"rendezvous file {path} is unreadable: {exc}") from exc
    if entry.get("key") != key:
        # A leftover of another job with the same directory name: not ours, keep waiting.
        return None
    return bytes.fromhex(entry["payload"])


async def _remove_when_read(directory: Path, size: int, deadline: float) -> None:
    delay = 0.01
    while time.monotonic() < deadline:
        if all((directory / f"read-{r}").exists() for r in range(size)):
            shutil.rmtree(directory, ignore_errors=True)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    log.warning("rendezvous: not every rank confirmed reading %s; leaving it", directory)
