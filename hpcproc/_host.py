"""Which host this process runs on, as transports and launchers must decide it.

A host is one running kernel *and* one network stack: the host name (UTS namespace),
the kernel's boot id, and the network namespace. Two processes may share memory
(``shm``) only when all three agree. The file system is not a witness: containers and
network-namespace "hosts" on one machine share ``/dev/shm`` and Unix socket paths,
while abstract Unix sockets (what ``shm`` connects through) are per network namespace.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache

__all__ = ["host_identity", "host_name", "ranks_on_host", "usable_cpus"]


def host_name() -> str:
    """This host's name (what ``hostname`` prints), ``"localhost"`` if it has none."""
    return socket.gethostname() or "localhost"


@lru_cache(maxsize=1)
def host_identity() -> str:
    """``"<hostname>/<boot id>/<network namespace>"``: equal for two processes exactly
    when they run on the same kernel, under the same host name, in the same network
    stack. Parts that cannot be read here are ``"?"`` (then only the others count)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = "?"
    return f"{host_name()}/{boot}/{netns}"


@lru_cache(maxsize=1)
def ranks_on_host() -> int | None:
    """How many ranks of this job share this host, as the launcher says (Slurm's
    tasks per node, ``OMPI_COMM_WORLD_LOCAL_SIZE``, ``MPI_LOCALNRANKS``,
    ``HPCPROC_LOCAL_SIZE``, ...); None outside a launcher or where it does not say.
    Read once per process: the launcher fixes it at start."""
    from .launchers import LauncherError, detect

    try:
        info = detect(os.environ)
    except (LauncherError, ValueError, OSError):
        return None
    if info.launcher == "local":
        return None
    return info.local_size


@lru_cache(maxsize=1)
def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
