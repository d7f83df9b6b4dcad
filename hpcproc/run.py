"""``python -m hpcproc.run``: start one node per rank and run ``main(cluster)``.

Usage::

    python -m hpcproc.run [--transport auto|NAME] [--tls] [--spmd] [--np N]
                          [--timeout S] [--dry-run] module:function | path.py:function
    python -m hpcproc.run --discover [--group ADDR:PORT] [--min-nodes N]
                          [--interface ADDR] [--timeout S] module:function

``NAME`` is any transport of the registry (:func:`hpcproc.transports.available`): the
built-in ``tcp``, ``shm``, ``mpi``, ``ucx``, ``inmemory``, the routing transports
``shm+tcp``, ``shm+ucx``, ``shm+mpi`` (shared memory to the ranks of the same host, the
network transport to the others), and third-party transports registered through the
``hpcproc.transports`` entry-point group. ``auto`` (the default) is ``shm`` when every
rank runs on this host and ``shm+tcp`` otherwise.

Each rank (``srun``, ``mpiexec``, ``pbsdsh``, ... started it, or ``--np N`` here):

1. detects its launcher and place in the job (:func:`hpcproc.launchers.detect`);
   with ``--transport mpi`` or ``shm+mpi`` (or ``--rendezvous mpi``) it initialises
   MPI here, before importing the entry point, so an application that imports mpi4py itself
   finds it initialised as hpcproc does it (``hpcproc.mpi_init.import_mpi``);
2. creates the transport and its node;
3. registers its run controller, then takes part in the rendezvous
   (:mod:`hpcproc.rendezvous`), so every rank knows every node id;
4. master/worker (default): rank 0 runs ``await main(cluster)``, linked to every
   worker node, so a worker that dies raises ``NodeLinkException`` (``DiedNodeDown``
   or ``DiedDisconnect``) in ``main`` unless ``main`` handles it; the other ranks
   serve spawn requests until rank 0 sends them its exit status, and exit with it.
   A worker whose master goes away exits with status 1.
   ``--spmd``: every rank runs ``main``; rank 0 waits for every rank's result before
   releasing them, and each rank exits with its own status.

``main`` is an ``async def`` taking one :class:`Cluster`. Its return value is ignored
unless it is an ``int`` (the exit status). An exception exits with status 1 and a
message naming the rank and host of any node it mentions.

SIGTERM / SIGINT (what ``scancel`` and Ctrl-C send) to any subset of the ranks end
the whole job: a worker that gets one tells rank 0 before it closes, rank 0 tells every
worker, and every rank closes its node (its processes are killed, watchers see
``DiedNodeDown``) and exits with 128 + the signal number, with one line saying which
signal stopped it and where it was received; the loss of an interrupted worker is
never reported as a failure of ``main``. A second signal received while closing exits
at once. ``--np N`` passes the signals it gets on to its ranks (a second one kills them
at once); if the ``--np`` process itself dies without passing anything on (SIGKILL),
its ranks notice (end of file on a pipe only it held) and stop the same way, with
128 + SIGHUP.

``--tls`` runs every tcp link and the rendezvous store over mutual TLS
(:mod:`hpcproc.tls`): each rank finds its certificate, key and the job's CA from the
``HPCPROC_TLS_*`` variables (``python -m hpcproc.tls init DIR`` makes them; then set
``HPCPROC_TLS_DIR=DIR``). It implies ``--transport tcp`` (``auto``), and refuses the
transports it does not secure.

Nodes may join a running job (``python -m hpcproc.join``, ``hp.join``): every rank
runs a membership process (:mod:`hpcproc._membership`), ``hp.monitor_nodes()`` reports
``NodeUp`` / ``NodeDown``, and rank 0 ends the joined nodes with its status too.
``--discover``: no launcher, nodes find each other by UDP multicast
(:mod:`hpcproc._discover`).

``--dry-run`` prints what was detected (one line per rank: rank, size, node index,
host, ...) and, on a second line (``plan rank=R transport=T: shm to ranks 1, tcp to
ranks 2-5``), which transport would carry each peer, from the launcher's host list; it
exits without importing the entry point or creating a transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from ._ids import label_node
from ._membership import members_of, start_membership
from .launchers import ClusterInfo, LauncherError, detect
from .launchers.children import Children, read_lifeline_line, watch_lifeline
from .launchers.ssh import COOKIE_ENV
from .rendezvous import DEFAULT_TIMEOUT, Method, RendezvousError, rendezvous

if TYPE_CHECKING:
    from ._ids import NodeId
    from ._node import Node
    from .tls import TlsConfig
    from .transports.base import EndPointAddress, Transport

__all__ = ["Cluster", "load_entry", "main"]

log = logging.getLogger("hpcproc.run")

_T = TypeVar("_T")

#: Registered name of each node's run controller (receives Done / Shutdown).
CONTROLLER = "hpcproc.run"

#: Exit status of a rank whose master went away, and of an SPMD job that lost a rank.
EXIT_STATUS_LOST = 1


@dataclass(frozen=True)
class Cluster:
    """What ``main(cluster)`` gets (``hp.Cluster``): this node and every other one, by rank.

    Fields: ``rank`` (this rank, 0 for the master), ``size`` (the number of ranks),
    ``node`` (this rank's :class:`~hpcproc.Node`), ``nodes`` (``nodes[r]`` is rank
    ``r``'s :class:`~hpcproc.NodeId`), ``hosts`` (``hosts[r]`` is the host name rank
    ``r`` reported), ``info`` (what the launcher detected: job id, ranks, hosts),
    ``spmd`` (True under ``--spmd``: every rank runs ``main``), and ``peers`` (the
    nodes ``main`` may spawn on: the workers, every rank but 0, in master/worker
    mode; every other rank with ``--spmd``).
    """

    rank: int
    size: int
    node: Node
    nodes: tuple[NodeId, ...]
    hosts: tuple[str, ...]
    info: ClusterInfo
    spmd: bool = False
    peers: tuple[NodeId, ...] = field(default=())

    def describe_node(self, nid: NodeId) -> str:
        """``"rank 3 on n2"`` for a node of this cluster, else the id itself."""
        for r, n in enumerate(self.nodes):
            if n == nid:
                return f"rank {r} on {self.hosts[r]}"
        return repr(nid)


# ---------------------------------------------------------------- control messages


@dataclass(frozen=True)
class Done:
    """SPMD: rank ``rank`` finished ``main`` with ``status`` (sent to rank 0)."""

    rank: int
    status: int


@dataclass(frozen=True)
class Interrupted:
    """Rank ``rank`` on ``host`` was stopped by signal ``signum`` (``detail`` says more).

    A worker that gets a signal sends this to rank 0's controller before it closes, so
    that rank 0 stops the job for that reason (and never mistakes the worker's going
    away for a failure of ``main``); rank 0 passes it on to the others in
    :class:`Shutdown`.
    """

    signum: int
    rank: int
    host: str
    detail: str = ""

    @property
    def status(self) -> int:
        """The conventional exit status: 128 + the signal number."""
        return 128 + self.signum

    def describe(self, rank: int) -> str:
        """``"stopped by SIGINT"``, naming where it was received unless it was ``rank``."""
        text = f"stopped by {signal.Signals(self.signum).name}{self.detail}"
        if rank != self.rank:
            text += f" (received by rank {self.rank} on {self.host})"
        return text


@dataclass(frozen=True)
class Shutdown:
    """Rank 0 to every other rank: exit now with ``status``; ``interrupted`` when a
    signal ended the job."""

    status: int
    interrupted: Interrupted | None = None


# ---------------------------------------------------------------- entry point


def _write_line(stream: TextIO, text: str) -> None:
    """One write per line: ranks sharing a pipe (``--np``) never interleave mid-line."""
    stream.write(text + "\n")
    stream.flush()


def load_entry(spec: str) -> Callable[[Cluster], Coroutine[Any, Any, Any]]:
    """Import ``module:function`` or ``path/to/file.py:function``.

    Raises:
        ValueError: ``spec`` has no ``:function`` part, or the function is missing
            or not ``async def``.
        ImportError: the module cannot be imported.
    """
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise ValueError(f"entry point {spec!r} is not module:function or file.py:function")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ImportError(f"no such file: {target}")
        name = f"_hpcproc_main_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {target}")
        module = importlib.util.module_from_spec(module_spec)
        # Registered so that functions defined there can be pickled by reference.
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise ValueError(f"{target} has no function {func_name!r}")
    if not asyncio.iscoroutinefunction(fn):
        raise ValueError(f"{spec} must be an async def function taking the cluster")
    entry: Callable[[Cluster], Coroutine[Any, Any, Any]] = fn
    return entry


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from .transports import available

    # The registry's names (built-in, registered, entry points): an unknown name is
    # refused with the list of these.
    transports = ("auto", *available())
    parser = argparse.ArgumentParser(
        prog="python -m hpcproc.run",
        description="Run main(cluster) on a set of hpcproc nodes, one per rank.",
    )
    parser.add_argument(
        "--transport",
        choices=transports,
        default="auto",
        help="auto: shm when every rank is on this host, else shm+tcp (shm to the ranks"
        " of the same host, tcp to the others); or any transport of"
        " the registry (hpcproc.transports.available(), entry points included)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on tcp links and the rendezvous store; files from HPCPROC_TLS_DIR"
        " (python -m hpcproc.tls init DIR) or HPCPROC_TLS_CERT/KEY/CA",
    )
    parser.add_argument("--spmd", action="store_true", help="run main on every rank")
    parser.add_argument(
        "--np", type=int, default=None, help="outside a scheduler: start N local nodes"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="rendezvous timeout in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--rendezvous",
        choices=("auto", "store", "file", "mpi"),
        default="auto",
        help="how ranks exchange addresses (default: mpi with --transport mpi or shm+mpi, else"
        " a shared directory if HPCPROC_RENDEZVOUS_DIR is set, else rank 0's store)",
    )
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument(
        "--hosts",
        help="without a scheduler: start one rank per entry over ssh (h1,h2:4,h3)",
    )
    hosts.add_argument(
        "--hostfile", help="like --hosts, from an MPI hostfile (host, host:N, host slots=N)"
    )
    parser.add_argument(
        "--discover",
        action="store_true",
        help="without a scheduler: find the other nodes by UDP multicast (SimpleLocalnet)",
    )
    parser.add_argument(
        "--group", default=None, help="--discover: multicast ADDR:PORT (224.0.0.99:9999)"
    )
    parser.add_argument(
        "--min-nodes",
        type=int,
        default=1,
        help="--discover: nodes (master included) to wait for before main, up to --timeout",
    )
    parser.add_argument(
        "--interface",
        default=None,
        help="--discover: local address to multicast from and listen on (default: route)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what was detected, exit")
    parser.add_argument("entry", help="module:function or path/to/file.py:function")
    args = parser.parse_args(argv)
    if args.np is not None and args.np < 1:
        parser.error("--np must be at least 1")
    if args.np is not None and (args.hosts or args.hostfile):
        parser.error("--np starts local ranks; --hosts / --hostfile start them over ssh: pick one")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.tls and args.transport not in ("auto", "tcp"):
        parser.error(
            f"--tls secures the tcp transport only; --transport {args.transport} would not"
            " use it (use --transport tcp, or drop --tls)"
        )
    if args.tls and args.rendezvous == "mpi":
        parser.error("--tls secures rank 0's rendezvous store; --rendezvous mpi would not use it")
    if args.min_nodes < 1:
        parser.error("--min-nodes must be at least 1")
    if args.discover and (args.np is not None or args.hosts or args.hostfile):
        parser.error("--discover finds nodes started one by one: not with --np / --hosts")
    if not args.discover and (args.group or args.interface or args.min_nodes != 1):
        parser.error("--group / --interface / --min-nodes go with --discover")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    logging.basicConfig(
        level=os.environ.get("HPCPROC_LOG_LEVEL", "WARNING"),
        format="hpcproc[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if os.environ.pop(COOKIE_ENV, None):
        # Started over ssh: the cookie is the first line of the lifeline (stdin).
        os.environ["HPCPROC_COOKIE"] = read_lifeline_line()
    try:
        info = detect()
    except LauncherError as exc:
        _write_line(sys.stderr, f"hpcproc.run: {exc}")
        return 2
    if args.hosts or args.hostfile:
        return _run_ssh(args, info, argv)
    if args.np is not None and args.np > 1:
        if info.is_multi_rank:
            _write_line(
                sys.stderr,
                f"hpcproc.run: --np {args.np} given inside a {info.size}-rank"
                f" {info.launcher} step; the launcher already started the ranks",
            )
            return 2
        return _run_local(args.np, _without(argv, "--np"), dry_run=args.dry_run)
    if args.dry_run:
        # One write: the two lines of a rank stay together.
        name = "tcp" if args.tls and args.transport == "auto" else args.transport
        _write_line(sys.stdout, f"{info.describe()}\n{_peer_plan(info, name)}")
        return 0
    if _uses_mpi(args.transport) or args.rendezvous == "mpi":
        # Initialise MPI before the application's modules are imported: one that
        # imports mpi4py itself would otherwise initialise it without the care
        # hpcproc.mpi_init.import_mpi takes (see there).
        try:
            from .mpi_init import import_mpi

            import_mpi()
        except ImportError as exc:
            _write_line(sys.stderr, f"hpcproc.run: {exc}")
            return 2
    try:
        entry = load_entry(args.entry)
    except (ImportError, ValueError) as exc:
        _write_line(sys.stderr, f"hpcproc.run: cannot load {args.entry}: {exc}")
        return 2
    if args.discover:
        from ._discover import run_discover

        return asyncio.run(run_discover(info, entry, args))
    return asyncio.run(_run_rank(info, entry, args))


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``options`` (each takes a value, as ``--opt V`` or ``--opt=V``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if arg.startswith(tuple(f"{o}=" for o in options)):
            continue
        out.append(arg)
    return out


def _run_ssh(args: argparse.Namespace, info: ClusterInfo, argv: list[str]) -> int:
    """``--hosts`` / ``--hostfile``: start the ranks over ssh from here."""
    from .auth import CookieError, load_cookie
    from .launchers.ssh import parse_hostfile, parse_hosts, run_over_ssh

    if info.is_multi_rank:
        _write_line(
            sys.stderr,
            f"hpcproc.run: --hosts/--hostfile given inside a {info.size}-rank"
            f" {info.launcher} step; the launcher already started the ranks",
        )
        return 2
    try:
        hosts = parse_hosts(args.hosts) if args.hosts else parse_hostfile(args.hostfile)
        cookie = load_cookie()
        return run_over_ssh(hosts, _without(argv, "--hosts", "--hostfile"), cookie)
    except (LauncherError, CookieError) as exc:
        _write_line(sys.stderr, f"hpcproc.run: {exc}")
        return 2


# ---------------------------------------------------------------- --np N locally


def _run_local(n: int, argv: list[str], *, dry_run: bool) -> int:
    """Start ``n`` ranks of this command as child processes; return rank 0's status.

    SIGTERM / SIGINT received here are passed on to every rank (a second one kills
    them at once); the ranks are always waited for (see :class:`Children`).
    """
    job = f"local-{uuid.uuid4().hex[:12]}"
    children = Children()
    restore = children.handle_signals()
    try:
        for rank in range(n):
            env = dict(os.environ)
            env.update(
                HPCPROC_RANK=str(rank),
                HPCPROC_SIZE=str(n),
                HPCPROC_LOCAL_RANK=str(rank),
                HPCPROC_LOCAL_SIZE=str(n),
                HPCPROC_HOSTS=",".join(["127.0.0.1"] * n),
                HPCPROC_JOB_ID=job,
            )
            children.start(
                [sys.executable, "-m", "hpcproc.run", *argv],
                env,
                owner="hpcproc.run --np launcher",
            )
        statuses = children.wait()
    finally:
        restore()
        children.kill_all()
    if dry_run:
        return max(abs(s) for s in statuses)
    return children.job_status(statuses[0])


# ---------------------------------------------------------------- one rank


def _auto_transport(info: ClusterInfo) -> str:
    """What ``--transport auto`` picks.

    Shared memory when every rank is known to run on this one host (a single rank,
    ``--np N``, or a launcher whose host list names one host only); otherwise the
    routing transport ``shm+tcp``, which picks per peer: shared memory to the ranks
    of the same host, TCP to the others (:mod:`hpcproc.transports.routing`). Off
    Linux (no ``shm``), TCP.
    """
    if not sys.platform.startswith("linux"):
        return "tcp"
    one_host = info.size == 1 or (info.hosts is not None and len(set(info.hosts)) == 1)
    return "shm" if one_host else "shm+tcp"


def _network_part(name: str) -> str | None:
    """The network sub-transport of a routing transport name (``"shm+mpi"`` ->
    ``"mpi"``); None for any other name."""
    local, plus, network = name.partition("+")
    return network if plus and local == "shm" else None


def _uses_mpi(name: str) -> bool:
    """True when transport ``name`` runs over MPI (so the rendezvous can too)."""
    return name == "mpi" or _network_part(name) == "mpi"


def _tcp_options(info: ClusterInfo) -> dict[str, Any]:
    """Where this rank's TCP endpoint listens and what address it advertises.

    Raises:
        RendezvousError: under Slurm, this rank's node name has no address.
    """
    local_only = info.hosts is not None and all(h == "127.0.0.1" for h in info.hosts)
    if info.size == 1 or local_only:
        return {"host": "127.0.0.1"}
    advertised = info.hostname
    if info.launcher.startswith("slurm"):
        # Peers dial this address; a Slurm node name need not resolve.
        from .launchers.slurm import node_address

        try:
            advertised = node_address(info.hostname)
        except LauncherError as exc:
            raise RendezvousError(f"this rank's host: {exc}") from None
    return {"host": "0.0.0.0", "advertised_host": advertised}


def _create_transport(
    info: ClusterInfo, name: str, tls: TlsConfig | None = None
) -> tuple[str, Transport]:
    from . import transports

    if name == "auto":
        name = "tcp" if tls is not None else _auto_transport(info)
    if name == "inmemory" and info.size > 1:
        raise RendezvousError(
            f"--transport inmemory connects endpoints of one process only; this job has"
            f" {info.size} ranks (use tcp, shm, mpi or ucx)"
        )
    if name == "tcp" or _network_part(name) == "tcp":
        # For shm+tcp the options go to the network sub-transport.
        return name, transports.create(name, **_tcp_options(info), tls=tls or False)
    return name, transports.create(name)


def _peer_plan(info: ClusterInfo, name: str) -> str:
    """``--dry-run``: which transport would carry each peer of this rank.

    From the launcher's host list: with a routing transport (``shm+NET``) peers on
    this rank's host go over ``shm`` and the others over ``NET``; any other transport
    carries every peer. Without a host list a routing transport decides per peer
    when it connects (it compares host identities), which is said.
    """
    chosen = _auto_transport(info) if name == "auto" else name
    peers = [r for r in range(info.size) if r != info.rank]
    head = f"plan rank={info.rank} transport={chosen}"
    if not peers:
        return f"{head}: no peers"
    network = _network_part(chosen)
    if network is None:
        return f"{head}: {chosen} to ranks {_rank_ranges(peers)}"
    if info.hosts is None:
        return (
            f"{head}: shm to ranks on this host, {network} to the others"
            " (host list unknown: decided per peer when connecting)"
        )
    mine = info.hosts[info.rank]
    same = [r for r in peers if info.hosts[r] == mine]
    other = [r for r in peers if info.hosts[r] != mine]
    parts = [f"shm to ranks {_rank_ranges(same)}"] if same else []
    if other:
        parts.append(f"{network} to ranks {_rank_ranges(other)}")
    return f"{head}: {', '.join(parts)}"


class _Stopped(Exception):
    """This rank stops because of a signal: its own, or one another rank received."""

    def __init__(self, why: Interrupted) -> None:
        super().__init__(why.describe(why.rank))
        self.why = why


class _Signals:
    """What signals did to this rank: the first one (received here, passed on by the
    ``--np`` parent, or received by another rank) stops the job; a second one received
    here directly while stopping exits at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, info: ClusterInfo) -> None:
        #: Done with the reason once the rank (and so the job) is to stop.
        self.stop: asyncio.Future[Interrupted] = loop.create_future()
        self._info = info
        self._direct = 0

    def received(self, signum: int, *, direct: bool = True, detail: str = "") -> None:
        """A signal for this rank; ``direct`` unless the ``--np`` parent passed it on."""
        if direct:
            self._direct += 1
            if self._direct > 1:
                _write_line(
                    sys.stderr,
                    f"hpcproc.run: rank {self._info.rank} on {self._info.hostname}: second"
                    f" {signal.Signals(signum).name}, exiting at once",
                )
                os._exit(128 + signum)
        self.interrupt(Interrupted(signum, self._info.rank, self._info.hostname, detail))

    def interrupt(self, why: Interrupted) -> None:
        """Stop for ``why`` unless already stopping."""
        if not self.stop.done():
            self.stop.set_result(why)


async def _unless(aw: Coroutine[Any, Any, _T], other: asyncio.Future[Any]) -> asyncio.Task[_T]:
    """Await ``aw`` as a task, unless ``other`` completes first: then the task is
    cancelled (and waited for). The task, done either way: whether it finished
    (``not cancelled()``) is the caller's to check."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return task


async def _unless_stopped(aw: Coroutine[Any, Any, _T], stop: asyncio.Future[Interrupted]) -> _T:
    """Await ``aw``, unless ``stop`` completes first: then ``aw`` is cancelled and
    :class:`_Stopped` raised."""
    if stop.done():
        aw.close()
        raise _Stopped(stop.result())
    task = await _unless(aw, stop)
    if not task.cancelled():
        return task.result()
    raise _Stopped(stop.result())


class _NodeClosed(Exception):
    """This rank's node closed under it (it closes itself when its endpoint fails)."""


async def _unless_node_closes(aw: Coroutine[Any, Any, _T], node: Node) -> _T:
    """Await ``aw``, unless ``node`` closes first (then ``aw`` is cancelled and
    :class:`_NodeClosed` raised, naming :attr:`Node.failure`): a worker waiting for
    rank 0's word would otherwise wait for ever on a node that receives nothing."""
    closed = asyncio.ensure_future(node.wait_closed())
    try:
        task = await _unless(aw, closed)
    finally:
        closed.cancel()
    failure = node.failure
    if failure is None and not task.cancelled():
        return task.result()
    raise _NodeClosed(
        f"its node closed itself: {failure!r} (see the log)"
        if failure is not None
        else "its node was closed while the rank ran"
    )


async def _run_rank(
    info: ClusterInfo, entry: Callable[[Cluster], Coroutine[Any, Any, Any]], args: Any
) -> int:
    """One rank's whole life; returns its exit status."""
    import hpcproc as hp

    loop = asyncio.get_running_loop()
    signals = _Signals(loop, info)

    def passed_on(signum: int) -> None:
        signals.received(signum, direct=False)

    def parent_gone(launcher: str) -> None:
        signals.received(signal.SIGHUP, direct=False, detail=f" (its {launcher} is gone)")

    # Signal handlers can only be installed from the main thread (embedded use may
    # run this elsewhere; the caller then owns signal handling).
    handled = (signal.SIGTERM, signal.SIGINT) if _in_main_thread() else ()
    for s in handled:
        loop.add_signal_handler(s, signals.received, s)
    lifeline = watch_lifeline(loop, passed_on, parent_gone)
    try:
        tls = None
        if args.tls:
            from .tls import TlsError, tls_config

            try:
                tls = tls_config()
            except TlsError as exc:
                raise RendezvousError(f"--tls: {exc}") from None
        transport_name, transport = _create_transport(info, args.transport, tls)
        method: Method = args.rendezvous
        if method == "auto" and _uses_mpi(transport_name):
            method = "mpi"
        node = hp.Node(transport)
        await node.start()
        try:
            status = await _unless_node_closes(
                _serve_rank(
                    node,
                    info,
                    entry,
                    spmd=args.spmd,
                    timeout=args.timeout,
                    method=method,
                    signals=signals,
                    tls=tls,
                ),
                node,
            )
            log.info("rank %d on %s exits with status %d", info.rank, info.hostname, status)
            return status
        except _NodeClosed as closed:
            _write_line(sys.stderr, f"hpcproc.run: rank {info.rank} on {info.hostname}: {closed}")
            return 1
        except _Stopped as stopped:
            _write_line(
                sys.stderr,
                f"hpcproc.run: rank {info.rank} on {info.hostname}:"
                f" {stopped.why.describe(info.rank)}",
            )
            global _interrupted
            _interrupted = True
            return stopped.why.status
        finally:
            await node.close()
            await transport.close()
    except RendezvousError as exc:
        _write_line(sys.stderr, f"hpcproc.run: rank {info.rank} on {info.hostname}: {exc}")
        return 1
    finally:
        for s in handled:
            loop.remove_signal_handler(s)
            if signals.stop.done():
                # The job ends for a signal, which a terminal or scancel sends to every
                # rank: one that arrives after this rank stopped (for another rank's
                # copy) exits at once with its status, not as a death by signal.
                signal.signal(s, _exit_now)
        if lifeline is not None:
            loop.remove_reader(lifeline)
            os.close(lifeline)


def _exit_now(signum: int, _frame: object) -> None:
    os._exit(128 + signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


async def _serve_rank(
    node: Node,
    info: ClusterInfo,
    entry: Callable[[Cluster], Coroutine[Any, Any, Any]],
    *,
    spmd: bool,
    timeout: float,
    method: Method,
    signals: _Signals,
    tls: TlsConfig | None = None,
) -> int:
    """Rendezvous, then run ``main`` or serve; the status to exit with.

    Raises:
        _Stopped: a signal stopped the job (here or on another rank); the other ranks
            have been told (a worker tells rank 0, rank 0 tells every worker).
    """
    import hpcproc as hp

    # The controller is registered before the rendezvous, so that once any rank is
    # past the rendezvous every rank's controller can receive.
    control = _Controller(node, signals)
    stop = signals.stop
    roster = await _unless_stopped(
        rendezvous(info, node.node_id.address, timeout=timeout, method=method, tls=tls), stop
    )
    _refuse_shm_across_hosts(roster.addresses)
    nodes = tuple(hp.NodeId(a) for a in roster.addresses)
    if nodes[info.rank] != node.node_id:
        raise RendezvousError(f"rendezvous returned another address for rank {info.rank}")
    for r, nid in enumerate(nodes):
        label_node(nid, f"rank{r}")  # pids print as <rank2.17>, the same on every rank
    log.info(
        "rank %d/%d on %s (%s) joined as %r",
        info.rank,
        info.size,
        info.hostname,
        info.launcher,
        node.node_id,
    )
    # Nodes may join this job later (hpcproc.join): rank 0 leads and watches every
    # rank; the others watch rank 0 only (see hpcproc._membership).
    start_membership(node, nodes, leader=nodes[0], watch=None if info.rank == 0 else nodes[:1])
    others = tuple(n for r, n in enumerate(nodes) if r != info.rank)
    cluster = Cluster(
        rank=info.rank,
        size=info.size,
        node=node,
        nodes=nodes,
        hosts=roster.hosts,
        info=info,
        spmd=spmd,
        peers=others if spmd else (nodes[1:] if info.rank == 0 else ()),
    )
    try:
        if info.rank == 0 or spmd:
            status = await _unless_stopped(_run_main(node, entry, cluster, control), stop)
        if info.rank == 0:
            if spmd:
                status = max(status, await _unless_stopped(_collect_done(cluster, control), stop))
            for nid in _workers(node, nodes):
                node.nsend_remote(nid, CONTROLLER, Shutdown(status))
            return status
        if spmd:
            node.nsend_remote(nodes[0], CONTROLLER, Done(info.rank, status))
        return await _unless_stopped(_await_shutdown(cluster, control), stop)
    except _Stopped as stopped:
        # Sent before this node closes, so the receivers have the reason before they
        # see the node go (one connection, in order): rank 0's main never reports
        # the loss of a worker that was interrupted as a failure.
        if info.rank == 0:
            for nid in _workers(node, nodes):
                node.nsend_remote(nid, CONTROLLER, Shutdown(stopped.why.status, stopped.why))
        elif stopped.why.rank == info.rank:
            node.nsend_remote(nodes[0], CONTROLLER, stopped.why)
        raise


def _workers(node: Node, nodes: tuple[NodeId, ...]) -> tuple[NodeId, ...]:
    """Every node rank 0 ends the job of: the other ranks and the nodes that joined."""
    return (*nodes[1:], *(n for n in members_of(node) if n not in nodes))


def _refuse_shm_across_hosts(addresses: Sequence[EndPointAddress]) -> None:
    """With the shm transport, check that every rank runs on this rank's host.

    Host identity is what each rank's shm address carries (hostname and boot id), not
    whether a path is reachable: hosts may share a file system. Every rank sees the
    same addresses, so every rank refuses alike, before any connection is tried.

    Raises:
        RendezvousError: ranks run on several hosts (named, with their ranks), naming
            the transports that connect ranks across hosts.
    """
    if not addresses or not all(bytes(a).startswith(b"shm:") for a in addresses):
        return
    from .transports.shm import address_host

    ranks_on: dict[tuple[str, str], list[int]] = {}
    for rank, address in enumerate(addresses):
        ranks_on.setdefault(address_host(address), []).append(rank)
    if len(ranks_on) == 1:
        return
    # Boot ids only where host names alone do not tell the hosts apart.
    names_differ = len({host for host, _ in ranks_on}) == len(ranks_on)
    where = ", ".join(
        f"{host}{'' if names_differ else f' (boot id {boot})'} (ranks {_rank_ranges(ranks)})"
        for (host, boot), ranks in ranks_on.items()
    )
    usable = ["tcp"] + [
        name
        for name, module in (("mpi", "mpi4py"), ("ucx", "ucxx"))
        if importlib.util.find_spec(module) is not None
    ]
    choices = ", ".join(usable[:-1]) + f" or {usable[-1]}" if len(usable) > 1 else usable[0]
    raise RendezvousError(
        f"--transport shm connects ranks on one host only, but this job's ranks run on"
        f" {len(ranks_on)} hosts: {where}. Use --transport {choices} (or auto) for ranks"
        " on several hosts"
    )


def _rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (``ranks`` ascending)."""
    parts: list[str] = []
    for rank in ranks:
        if parts and rank == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{rank}"
        else:
            parts.append(str(rank))
    return ",".join(parts)


async def _run_main(
    node: Node,
    entry: Callable[[Cluster], Coroutine[Any, Any, Any]],
    cluster: Cluster,
    control: _Controller,
) -> int:
    """Run ``main``; its status (1 after a message if it raised).

    Raises:
        _Stopped: ``main`` failed because the job is being stopped by a signal.
    """
    import hpcproc as hp

    async def master() -> Any:
        if not cluster.spmd:
            for nid in cluster.peers:
                await hp.link_node(nid)
        return await entry(cluster)

    try:
        result = await node.run(master)
    except Exception as exc:
        failure: Exception | None = exc
    else:
        failure = None
    # A worker stopped by a signal goes away, and main may fail of that (its link
    # fires), or handle it and return, before this rank acts on the reason, which came
    # first on the same connection: once the controller has handled what came before,
    # it is known, and the job ends as interrupted.
    why = await control.interruption()
    if why is not None:
        raise _Stopped(why)
    if failure is not None:
        _write_line(
            sys.stderr,
            f"hpcproc.run: main failed on rank {cluster.rank} ({cluster.info.hostname}):"
            f" {_name_nodes(failure, cluster)}",
        )
        log.debug("main failed", exc_info=failure)
        return 1
    if not isinstance(result, int) or isinstance(result, bool):
        return 0
    if not 0 <= result <= 255:
        _write_line(
            sys.stderr,
            f"hpcproc.run: main returned {result} on rank {cluster.rank}, which is not an"
            " exit status (0-255): the job exits with 1; return 0 for success or 1-255",
        )
        return 1
    return result


def _name_nodes(exc: BaseException, cluster: Cluster) -> str:
    """The exception's text with every node of the cluster named by rank and host
    (``rank 2 on host3``), whether it printed as its label or its full address."""
    text = f"{type(exc).__name__}: {exc}"
    for nid in cluster.nodes:
        name = cluster.describe_node(nid)
        for form in (nid.full(), repr(nid)):
            text = text.replace(form, name)
        text = re.sub(rf"\b{re.escape(nid.label)}\b(?!\.\d)", name, text)
    return text


@dataclass(frozen=True)
class _Watch:
    """Local request to the controller: monitor these nodes."""

    nodes: tuple[NodeId, ...]


@dataclass(frozen=True)
class _Flush:
    """Local request to the controller: complete ``done`` (once everything delivered
    before it has been handled)."""

    done: asyncio.Future[None]


#: How long :meth:`_Controller.interruption` waits for the controller to catch up.
_FLUSH_TIMEOUT = 5.0


class _Controller:
    """This rank's run controller: one registered process whose mailbox gets Done,
    Shutdown, Interrupted and the node monitor notifications, in arrival order (one
    mailbox, so a master's Shutdown is never overtaken by the NodeDown its close sends
    after it). Interruptions complete ``stop``; the rest goes to :attr:`inbox`."""

    def __init__(self, node: Node, signals: _Signals) -> None:
        import hpcproc as hp

        self._node = node
        self._stop = signals.stop
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        interrupt = signals.interrupt

        async def controller() -> None:
            while True:
                msg = await hp.expect()
                if isinstance(msg, _Watch):
                    for nid in msg.nodes:
                        await hp.monitor_node(nid)
                elif isinstance(msg, _Flush):
                    if not msg.done.done():
                        msg.done.set_result(None)
                elif isinstance(msg, Interrupted):
                    interrupt(msg)
                elif isinstance(msg, Shutdown) and msg.interrupted is not None:
                    interrupt(msg.interrupted)
                else:
                    self.inbox.put_nowait(msg)

        self.pid = node.spawn_local(controller)
        node.register(CONTROLLER, self.pid)

    def watch(self, nids: Sequence[NodeId]) -> None:
        """Have a NodeMonitorNotification put in :attr:`inbox` when any of ``nids`` goes."""
        self._node.send_local(self.pid, _Watch(tuple(nids)))

    async def interruption(self) -> Interrupted | None:
        """Why the job is stopping, once every message delivered before this call has
        been handled; None if it is not. Waits at most ``_FLUSH_TIMEOUT`` seconds."""
        if not self._stop.done():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._node.send_local(self.pid, _Flush(done))
            await asyncio.wait({done}, timeout=_FLUSH_TIMEOUT)
        return self._stop.result() if self._stop.done() else None

    def stopped(self) -> None:
        """Raise :class:`_Stopped` if the job is stopping."""
        if self._stop.done():
            raise _Stopped(self._stop.result())


async def _collect_done(cluster: Cluster, control: _Controller) -> int:
    """SPMD rank 0: wait until every other rank reported Done or died."""
    import hpcproc as hp

    pending = set(range(1, cluster.size))
    control.watch(cluster.nodes[1:])
    worst = 0
    while pending:
        msg = await control.inbox.get()
        # A rank that was interrupted said so before it went: not a loss.
        control.stopped()
        if isinstance(msg, Done) and msg.rank in pending:
            pending.discard(msg.rank)
            worst = max(worst, msg.status)
        elif isinstance(msg, hp.NodeMonitorNotification):
            rank = cluster.nodes.index(msg.node)
            if rank in pending:
                pending.discard(rank)
                _write_line(
                    sys.stderr,
                    f"hpcproc.run: node {cluster.describe_node(msg.node)} went away"
                    f" before finishing: {msg.reason!r}",
                )
                worst = max(worst, EXIT_STATUS_LOST)
    return worst


async def _await_shutdown(cluster: Cluster, control: _Controller) -> int:
    """A worker: serve until rank 0 says Shutdown (its status) or goes away (1)."""
    import hpcproc as hp

    control.watch(cluster.nodes[:1])
    while True:
        msg = await control.inbox.get()
        # A master that was interrupted said so before it went: not a loss.
        control.stopped()
        if isinstance(msg, Shutdown):
            return msg.status
        if isinstance(msg, hp.NodeMonitorNotification):
            _write_line(
                sys.stderr,
                f"hpcproc.run: rank {cluster.rank} on {cluster.info.hostname}: the master"
                f" (node {cluster.describe_node(msg.node)}) went away: {msg.reason!r}",
            )
            return EXIT_STATUS_LOST


#: Set when this rank stopped because the job was interrupted by a signal.
_interrupted = False


def _exit(status: int) -> None:
    """Exit the process with ``status``. After an interruption, at once: the signal
    reaches every rank, and a copy arriving during interpreter shutdown (which resets
    the handlers) would turn the status into a death by signal."""
    if _interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    # Run the importable module, not this ``__main__`` copy: the control messages
    # (Shutdown, Done) must be the classes ``hpcproc.run`` defines on every rank,
    # since the serializer ships ``__main__`` classes by value.
    from hpcproc.run import _exit as _exit_with
    from hpcproc.run import main as _main

    _exit_with(_main())
