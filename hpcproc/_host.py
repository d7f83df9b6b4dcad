"""Which host this process runs on, as transports and launchers must decide it.

A host is one running kernel *and* one network stack: the host name (UTS namespace),
the kernel's boot id, and the network namespace. Two processes may share memory
(``shm``) only when all three agree. The file system is not a witness: containers and
network-namespace "hosts" on one machine share ``/dev/shm`` and Unix socket paths,
while abstract Unix sockets (what ``shm`` connects through) are per network namespace.
"""

from __future__ import annotations

import hashlib
import os
import socket
from functools import lru_cache
from pathlib import Path

__all__ = [
    "cpu_mask",
    "host_identity",
    "host_name",
    "local_pid",
    "pid_space",
    "process_identity",
    "ranks_on_host",
    "shared_cpus",
    "usable_cpus",
]


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
def pid_space() -> bytes:
    """8 bytes equal for two processes exactly when a pid names the same process for
    both: one host (:func:`host_identity`) and one pid namespace. What a transport
    sends with its pid so that a peer knows whether that pid is one it can look at."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "?"
    return hashlib.blake2b(f"{host_identity()}/{namespace}".encode(), digest_size=8).digest()


def process_identity() -> tuple[bytes, int]:
    """``(pid_space(), pid)``: what a transport tells a peer of this process (read each
    time: a forked child has its own pid)."""
    return pid_space(), os.getpid()


def local_pid(space: bytes, pid: int) -> int:
    """``pid`` where ``(space, pid)`` (a peer's :func:`process_identity`) names another
    process of this host and pid namespace, else 0."""
    return pid if space == pid_space() and pid != os.getpid() else 0


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


def cpu_mask(pid: int = 0) -> frozenset[int] | None:
    """The CPUs process ``pid`` (0: this one) may run on, its affinity mask (which a
    cpuset cgroup narrows too); None where it cannot be read (no such process, or a
    platform without affinity masks). Reading another process's mask needs no
    privilege. Not cached: a mask may change while a process runs."""
    try:
        return frozenset(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return None


@lru_cache(maxsize=1)
def shared_cpus() -> int:
    """How many CPUs this host's ranks of the job share, as far as this process can
    tell without asking them: its affinity mask where that is every CPU its cgroup
    allows (unbound ranks all run on those), else the cgroup's CPUs (else the
    machine's): a launcher that bound this rank to a subset (``srun --cpu-bind``,
    ``mpiexec -bind-to core``, Open MPI's default) spreads the ranks over them.

    Comparing the ranks with the affinity mask alone took every bound rank for
    oversubscribed (two ranks bound to a core each on 2 CPUs: "2 ranks, 1 CPU"), and
    its receives then yielded the CPU between looks: an mpi 64 B round trip took
    58 us against 20 us unbound.
    """
    return _shared_cpus(usable_cpus(), _cgroup_cpus() or os.cpu_count())


def _shared_cpus(mask: int, allowed: int | None) -> int:
    """:func:`shared_cpus` from this process's mask and the CPUs it could have."""
    return allowed if allowed is not None and mask < allowed else mask


def _cgroup_cpus(
    membership: Path = Path("/proc/self/cgroup"), root: str = "/sys/fs/cgroup"
) -> int | None:
    """The CPUs of this process's cpuset cgroup (v2 or v1); None where unreadable.

    ``membership`` and ``root``: where the kernel says which cgroups the process is
    in, and where the cgroup file systems are mounted (other values for tests).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue  # not "hierarchy:controllers:path"
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            files = [f"{root}{path}/cpuset.cpus.effective"]
        elif "cpuset" in controllers.split(","):
            base = f"{root}/cpuset{path}"
            files = [f"{base}/cpuset.effective_cpus", f"{base}/cpuset.cpus"]
        else:
            continue
        for name in files:
            try:
                count = parse_cpu_list(Path(name).read_text())
            except (OSError, ValueError):
                continue
            if count:
                return count
    return None


def parse_cpu_list(text: str) -> int:
    """How many CPUs a kernel CPU list names (``"0-3,8,10-11"``: 7).

    Raises:
        ValueError: not a CPU list.
    """
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        low = int(first)
        high = int(last) if last else low
        if high < low:
            raise ValueError(f"not a CPU list: {text!r}")
        count += high - low + 1
    return count
