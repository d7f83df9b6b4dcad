"""The rendezvous methods behind one all-gather (:func:`exchange`), and
:func:`rendezvous`, which exchanges endpoint addresses with it; see the package
docstring for the methods."""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..auth import load_cookie
from ..launchers import slurm
from ..launchers.info import ClusterInfo, LauncherError, env_opt_int
from ..tls import TlsConfig
from ..transports.base import EndPointAddress
from .errors import RendezvousError
from .filestore import gather_via_directory
from .tcpstore import gather_as_client, serve

__all__ = [
    "DEFAULT_TIMEOUT",
    "PORT_BASE",
    "PORT_SPAN",
    "PORT_TRIES",
    "Method",
    "RendezvousError",
    "Roster",
    "choose_method",
    "exchange",
    "job_key",
    "rendezvous",
    "store_ports",
]

DEFAULT_TIMEOUT = 60.0
PORT_BASE = 20000
PORT_SPAN = 8192
PORT_TRIES = 16

Method = Literal["auto", "store", "file", "mpi"]


@dataclass(frozen=True, slots=True)
class Roster:
    """Every rank's endpoint address and host name, indexed by rank."""

    addresses: tuple[EndPointAddress, ...]
    hosts: tuple[str, ...]


def job_key(info: ClusterInfo) -> str:
    """What identifies this group of ranks: launcher, job, step and size."""
    return f"{info.launcher}|{info.job_id or '-'}|{info.step_id or '-'}|{info.size}"


def store_ports(info: ClusterInfo, env: Mapping[str, str]) -> list[int]:
    """The ports rank 0's store tries, in order (clients try the same ones).

    Raises:
        LauncherError: ``HPCPROC_PORT`` is not an integer in 1..65535.
    """
    fixed = env_opt_int(env, "HPCPROC_PORT")
    if fixed is not None:
        if not 0 < fixed < 65536:
            raise LauncherError(f"HPCPROC_PORT={fixed} is not a TCP port")
        return [fixed]
    first = zlib.crc32(f"{info.job_id}.{info.step_id}".encode()) % PORT_SPAN
    return [PORT_BASE + (first + i) % PORT_SPAN for i in range(PORT_TRIES)]


def choose_method(info: ClusterInfo, env: Mapping[str, str], requested: Method = "auto") -> Method:
    """The method ``auto`` resolves to: ``file`` when ``HPCPROC_RENDEZVOUS_DIR`` is
    set, else ``store`` when rank 0's host is known.

    Raises:
        RendezvousError: nothing usable (the message says what to set).
    """
    if requested != "auto":
        return requested
    if env.get("HPCPROC_RENDEZVOUS_DIR"):
        return "file"
    if env.get("HPCPROC_RENDEZVOUS_HOST") or info.server_host:
        return "store"
    raise RendezvousError(
        f"rendezvous: the {info.launcher} launcher does not say where rank 0 runs; set"
        " HPCPROC_RENDEZVOUS_HOST (rank 0's host), HPCPROC_RENDEZVOUS_DIR (a shared"
        " directory), or use --transport mpi"
    )


async def exchange(
    info: ClusterInfo,
    payload: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    method: Method = "auto",
    env: Mapping[str, str] | None = None,
    tls: TlsConfig | None = None,
) -> list[bytes]:
    """All-gather: every rank's ``payload``, indexed by rank.

    Blocks until every rank arrived or ``timeout`` seconds passed. ``tls``: the store
    method runs mutual TLS with these files (:mod:`.tcpstore`).

    Raises:
        RendezvousError: a rank did not arrive in time (named), rank 0 was unreachable,
            or the method is not usable here.
    """
    env = os.environ if env is None else env
    if info.size == 1:
        return [payload]
    chosen = choose_method(info, env, method)
    key = job_key(info)
    describe = f"launcher {info.launcher}, job {info.job_id or '?'}, step {info.step_id or '?'}"
    if chosen == "mpi":
        return await _exchange_mpi(info, payload, timeout, describe)
    if chosen == "file":
        base = env.get("HPCPROC_RENDEZVOUS_DIR")
        if not base:
            raise RendezvousError("rendezvous method 'file' needs HPCPROC_RENDEZVOUS_DIR")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return await gather_via_directory(
            Path(base) / safe,
            rank=info.rank,
            size=info.size,
            payload=payload,
            key=key,
            timeout=timeout,
            describe=describe,
        )
    cookie = load_cookie()
    ports = store_ports(info, env)
    key_bytes = b"hpcproc-rendezvous|" + key.encode()
    if info.rank == 0:
        store = await serve(
            ports, size=info.size, cookie=cookie, key=key_bytes, describe=describe, tls=tls
        )
        try:
            return await store.gather(payload, timeout)
        finally:
            await store.close()
    host = env.get("HPCPROC_RENDEZVOUS_HOST") or info.server_host
    assert host is not None  # choose_method checked it
    if not env.get("HPCPROC_RENDEZVOUS_HOST") and info.launcher.startswith("slurm"):
        # A node name need not resolve (NodeName is not always a host name).
        fix = "; or set HPCPROC_RENDEZVOUS_HOST to rank 0's host name or address"
        try:
            host = await asyncio.to_thread(slurm.node_address, host, env, hint=fix)
        except LauncherError as exc:
            raise RendezvousError(f"rendezvous: rank 0's host: {exc} ({describe})") from None
    return await gather_as_client(
        host,
        ports,
        rank=info.rank,
        payload=payload,
        cookie=cookie,
        key=key_bytes,
        timeout=timeout,
        describe=describe,
        tls=tls,
    )


async def _exchange_mpi(
    info: ClusterInfo, payload: bytes, timeout: float, describe: str
) -> list[bytes]:
    from ..mpi_init import import_mpi

    MPI = import_mpi()

    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.size or comm.Get_rank() != info.rank:
        raise RendezvousError(
            f"rendezvous: MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the launcher"
            f" rank {info.rank} of {info.size} ({describe})"
        )
    try:
        gathered: list[bytes] = await asyncio.wait_for(
            asyncio.to_thread(comm.allgather, payload), timeout
        )
    except asyncio.TimeoutError:
        raise RendezvousError(
            f"rendezvous: MPI allgather did not complete within {timeout:g} s ({describe})"
        ) from None
    return gathered


async def rendezvous(
    info: ClusterInfo,
    address: EndPointAddress,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    method: Method = "auto",
    env: Mapping[str, str] | None = None,
    tls: TlsConfig | None = None,
) -> Roster:
    """Exchange endpoint addresses: every rank gets the same :class:`Roster`.

    Raises:
        RendezvousError: as :func:`exchange`.
    """
    mine = json.dumps({"host": info.hostname, "address": bytes(address).hex()}).encode()
    entries = [
        json.loads(p)
        for p in await exchange(info, mine, timeout=timeout, method=method, env=env, tls=tls)
    ]
    return Roster(
        addresses=tuple(EndPointAddress(bytes.fromhex(e["address"])) for e in entries),
        hosts=tuple(str(e["host"]) for e in entries),
    )
