"""`python -m hpcproc.run` with real OS processes on this machine: --np, explicit
ranks, master/worker exit status, SPMD, failures that name the node, signals."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from tests._lines import LineProcess

ROOT = Path(__file__).resolve().parent.parent
THIS = f"{Path(__file__).resolve()}"
WAIT = 60.0


def say_line(text: str) -> None:
    """One write per line: ranks sharing a pipe never interleave mid-line."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------ apps run by the tests


async def report_rank(cluster: Any) -> int:
    return int(cluster.rank)


async def app_peers(cluster: Any) -> int:
    """Spawn on every peer; each answers with its node's rank."""
    me = hp.self_pid()
    for peer in cluster.peers:
        await hp.spawn(peer, answer_rank, me, cluster.nodes.index(peer))
    got = sorted([await hp.expect(int, timeout=30) for _ in cluster.peers])
    say_line(f"master rank={cluster.rank} size={cluster.size} peers={got}")
    return 0


async def answer_rank(master: hp.Pid, rank: int) -> None:
    await hp.send(master, rank)


async def app_transport_kind(cluster: Any) -> int:
    """Name the transport of every node by its address scheme."""
    kinds = sorted({bytes(n.address).split(b":", 1)[0].decode() for n in cluster.nodes})
    say_line(f"transports={kinds}")
    return 0


async def app_status_3(cluster: Any) -> int:
    return 3


async def app_spmd(cluster: Any) -> int:
    say_line(f"spmd rank={cluster.rank} peers={len(cluster.peers)}")
    return 0


async def app_raises(cluster: Any) -> None:
    raise ValueError("deliberate failure in main")


async def app_wait_on_workers(cluster: Any) -> None:
    """Run a long process on every worker, report readiness, wait forever."""
    for peer in cluster.peers:
        await hp.spawn(peer, sleep_forever)
    say_line("ready")
    await hp.expect(str)


async def sleep_forever() -> None:
    await hp.expect(str)


async def app_report_worker_close(cluster: Any) -> int:
    """Monitor a process on worker 1; report how it and its node ended."""
    await hp.spawn_monitor(cluster.peers[0], sleep_forever)
    say_line("ready")
    try:
        note = await hp.expect(hp.ProcessMonitorNotification)
        say_line(f"monitor fired: {type(note.reason).__name__}")
        await hp.expect(str)
    except hp.NodeLinkException as exc:
        say_line(f"link fired: {type(exc.reason).__name__}")
    return 0


async def app_ready_then_wait(cluster: Any) -> None:
    say_line(f"ready rank={cluster.rank}")
    await hp.expect(str)


async def break_own_receive() -> None:
    """Run on a worker: its node's endpoint raises from its next ``receive`` (a
    transport bug, injected)."""
    from hpcproc._process import current

    async def broken() -> Any:
        raise RuntimeError("injected receive failure")

    current().node._endpoint.receive = broken  # type: ignore[method-assign,union-attr]


async def app_break_a_worker(cluster: Any) -> int:
    """Break worker 1's receiving, then ask it something (which wakes its dispatcher,
    whose next receive is the broken one): the worker must end."""
    await hp.spawn(cluster.peers[0], break_own_receive)
    say_line("broken")
    await hp.get_node_stats(cluster.peers[0])
    return 0


MPI_LOADED_AT_IMPORT = "mpi4py.MPI" in sys.modules


async def report_mpi_loaded_before_entry(cluster: Any) -> int:
    """Whether MPI was already initialised when this module (the entry) was imported."""
    say_line(f"mpi loaded before entry: {MPI_LOADED_AT_IMPORT}")
    return 0


# ------------------------------------------------------------ helpers


class Rank(LineProcess):
    """``python -m hpcproc.run ARGS`` with its output lines readable with a deadline."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__([sys.executable, "-m", "hpcproc.run", *args], env, ROOT)

    def wait_for_line(self, prefix: str, timeout: float = WAIT) -> str:
        return self.wait_for_lines("^" + re.escape(prefix), 1, timeout)[0]

    def finish(self, timeout: float = WAIT) -> tuple[int, str]:
        return super().finish(timeout)


@pytest.fixture
def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    e["HPCPROC_COOKIE"] = "test-run-local-cookie"
    e["PYTHONPATH"] = str(ROOT)
    return e


@pytest.fixture
def ranks() -> Iterator[list[Rank]]:
    started: list[Rank] = []
    yield started
    for r in started:
        r.kill(10)


def start(ranks: list[Rank], args: list[str], env: dict[str, str]) -> Rank:
    rank = Rank(args, env)
    ranks.append(rank)
    return rank


def explicit(env: dict[str, str], rank: int, size: int, job: str) -> dict[str, str]:
    return {
        **env,
        "HPCPROC_RANK": str(rank),
        "HPCPROC_SIZE": str(size),
        "HPCPROC_HOSTS": ",".join(["127.0.0.1"] * size),
        "HPCPROC_JOB_ID": job,
    }


# ------------------------------------------------------------ tests


def test_np_master_reaches_every_peer(ranks: list[Rank], env: dict[str, str]) -> None:
    r = start(ranks, ["--np", "3", f"{THIS}:app_peers"], env)
    rc, out = r.finish()
    assert rc == 0, out
    assert "master rank=0 size=3 peers=[1, 2]" in out


def test_auto_transport_is_shared_memory_for_local_nodes(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(ranks, ["--np", "2", f"{THIS}:app_transport_kind"], env)
    rc, out = r.finish()
    assert rc == 0, out
    assert "transports=['shm']" in out


def test_auto_transport_routes_per_peer_when_ranks_span_hosts() -> None:
    from hpcproc.launchers.info import ClusterInfo
    from hpcproc.run import _auto_transport

    def info(hosts: tuple[str, ...]) -> ClusterInfo:
        return ClusterInfo("slurm", 0, len(hosts), 0, None, 0, None, hosts[0], hosts=hosts)

    assert _auto_transport(info(("n1", "n1", "n2"))) == "shm+tcp"
    assert _auto_transport(info(("n1", "n1"))) == "shm"
    assert _auto_transport(ClusterInfo("hydra", 0, 4, None, None, None, None, "h")) == "shm+tcp"


def test_dry_run_plan_names_the_transport_of_each_peer() -> None:
    from hpcproc.launchers.info import ClusterInfo
    from hpcproc.run import _peer_plan

    hosts = ("n1", "n1", "n2", "n2", "n3")
    info = ClusterInfo("slurm", 2, 5, 1, None, 0, None, "n2", hosts=hosts)
    assert (
        _peer_plan(info, "auto")
        == "plan rank=2 transport=shm+tcp: shm to ranks 3, tcp to ranks 0-1,4"
    )
    assert (
        _peer_plan(info, "shm+mpi")
        == "plan rank=2 transport=shm+mpi: shm to ranks 3, mpi to ranks 0-1,4"
    )
    assert _peer_plan(info, "tcp") == "plan rank=2 transport=tcp: tcp to ranks 0-1,3-4"
    unknown = ClusterInfo("hydra", 0, 2, None, None, None, None, "h")
    assert "decided per peer when connecting" in _peer_plan(unknown, "auto")


async def pid_here() -> int:
    return os.getpid()


async def app_peer_transports(cluster: Any) -> int:
    """SPMD: reach every peer, then name the transport carrying each."""
    for peer in cluster.peers:
        await hp.call(peer, pid_here)
    vias = sorted({cluster.node.endpoint.transport_for(p.address) for p in cluster.peers})
    say_line(f"rank {cluster.rank} peers via {vias}")
    return 0


def test_routing_transport_on_one_host_carries_every_peer_over_shm(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(
        ranks, ["--np", "3", "--spmd", "--transport", "shm+tcp", f"{THIS}:app_peer_transports"], env
    )
    rc, out = r.finish()
    assert rc == 0, out
    for rank in range(3):
        assert f"rank {rank} peers via ['shm']" in out, out


def test_shm_ranks_on_several_hosts_are_refused_naming_hosts_and_transports() -> None:
    from hpcproc.rendezvous import RendezvousError
    from hpcproc.run import _refuse_shm_across_hosts
    from hpcproc.transports.base import EndPointAddress

    def shm(host: str, boot: str, rank: int) -> EndPointAddress:
        return EndPointAddress(f"shm:{host}:{boot}:hpcproc-shm-{rank}".encode())

    boot = "c4fb96fd-0a56-41c5-90be-8de86f091a46"
    with pytest.raises(RendezvousError) as info:
        _refuse_shm_across_hosts([shm(h, boot, r) for r, h in enumerate(["a", "a", "b", "a"])])
    text = str(info.value)
    assert "run on 2 hosts: a (ranks 0-1,3), b (ranks 2)" in text, text
    assert "Use --transport tcp" in text and boot not in text, text
    # Same name, another boot: another host (the boot ids tell them apart).
    with pytest.raises(RendezvousError, match=r"a \(boot id 00000000\) \(ranks 1\)"):
        _refuse_shm_across_hosts([shm("a", boot, 0), shm("a", "00000000", 1)])
    _refuse_shm_across_hosts([shm("a", boot, r) for r in range(3)])  # one host: accepted
    # Another transport's addresses are not for this check.
    _refuse_shm_across_hosts([EndPointAddress(b"tcp://a:1/x/1"), EndPointAddress(b"tcp://b:1/y/1")])


def test_every_rank_exits_with_the_masters_status(ranks: list[Rank], env: dict[str, str]) -> None:
    procs = [
        start(ranks, [f"{THIS}:app_status_3"], explicit(env, r, 3, "status3")) for r in range(3)
    ]
    results = [p.finish() for p in procs]
    assert [rc for rc, _ in results] == [3, 3, 3], results


def test_spmd_runs_main_on_every_rank(ranks: list[Rank], env: dict[str, str]) -> None:
    procs = [
        start(ranks, ["--spmd", f"{THIS}:app_spmd"], explicit(env, r, 3, "spmd")) for r in range(3)
    ]
    outs = [p.finish() for p in procs]
    assert [rc for rc, _ in outs] == [0, 0, 0], outs
    for r, (_, out) in enumerate(outs):
        assert f"spmd rank={r} peers=2" in out


def test_exception_in_main_exits_nonzero_with_message(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(ranks, ["--np", "2", f"{THIS}:app_raises"], env)
    rc, out = r.finish()
    assert rc == 1
    assert "main failed on rank 0" in out
    assert "deliberate failure in main" in out


def test_killed_worker_makes_master_exit_nonzero_naming_it(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    procs = [
        start(ranks, [f"{THIS}:app_wait_on_workers"], explicit(env, r, 3, "killed"))
        for r in range(3)
    ]
    procs[0].wait_for_line("ready")
    os.killpg(procs[2].proc.pid, signal.SIGKILL)
    rc, out = procs[0].finish()
    assert rc != 0
    assert "rank 2 on 127.0.0.1" in out, out
    rc1, out1 = procs[1].finish()
    assert rc1 == rc, out1


def test_workers_exit_nonzero_naming_a_master_that_died(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    procs = [
        start(ranks, [f"{THIS}:app_wait_on_workers"], explicit(env, r, 3, "master-killed"))
        for r in range(3)
    ]
    procs[0].wait_for_line("ready")
    os.killpg(procs[0].proc.pid, signal.SIGKILL)
    for p in procs[1:]:
        rc, out = p.finish()
        assert rc == 1, out
        assert "the master (node rank 0 on 127.0.0.1) went away" in out, out


def test_a_worker_whose_node_cannot_receive_exits_naming_it_and_the_job_ends(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    """Its node closes itself (a critical log with the traceback); the worker exits 1
    saying why, rather than waiting for ever for the master's word, and the job
    ends."""
    procs = [
        start(ranks, [f"{THIS}:app_break_a_worker"], explicit(env, r, 2, "deaf-worker"))
        for r in range(2)
    ]
    procs[0].wait_for_line("broken")
    rc1, out1 = procs[1].finish()
    assert rc1 == 1, out1
    assert "its node closed itself" in out1, out1
    assert "receiving failed; closing the node" in out1, out1  # the critical log
    assert "injected receive failure" in out1, out1
    # The master's request was answered before the worker's next receive failed: its
    # main succeeded. That it ends at all (finish raises after WAIT) is the point.
    rc0, out0 = procs[0].finish()
    assert rc0 == 0, out0


def test_sigterm_to_a_worker_ends_the_job_without_a_main_failure(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    procs = [
        start(ranks, [f"{THIS}:app_report_worker_close"], explicit(env, r, 2, "clean-close"))
        for r in range(2)
    ]
    procs[0].wait_for_line("ready")
    procs[1].proc.send_signal(signal.SIGTERM)
    rc1, out1 = procs[1].finish()
    assert rc1 == 128 + signal.SIGTERM, out1
    rc0, out0 = procs[0].finish()
    # The worker told rank 0 why it went before it went: the job ends with its status.
    assert rc0 == 128 + signal.SIGTERM, out0
    assert "stopped by SIGTERM (received by rank 1 on" in out0, out0
    assert "main failed" not in out0, out0


def test_sigterm_stops_every_local_node(ranks: list[Rank], env: dict[str, str]) -> None:
    procs = [
        start(ranks, ["--spmd", f"{THIS}:app_ready_then_wait"], explicit(env, r, 3, "term"))
        for r in range(3)
    ]
    for p in procs:
        p.wait_for_line("ready")
    for p in procs:
        p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        rc, out = p.finish(timeout=15)
        assert rc == 128 + signal.SIGTERM, out
        assert "stopped by SIGTERM" in out


def test_sigint_to_np_parent_is_forwarded(ranks: list[Rank], env: dict[str, str]) -> None:
    r = start(ranks, ["--np", "2", "--spmd", f"{THIS}:app_ready_then_wait"], env)
    r.wait_for_line("ready")
    r.wait_for_line("ready")
    r.proc.send_signal(signal.SIGINT)
    rc, out = r.finish(timeout=20)
    assert rc == 128 + signal.SIGINT, out
    assert out.count("stopped by SIGINT") == 2


def test_np_children_stop_when_the_parent_is_killed(ranks: list[Rank], env: dict[str, str]) -> None:
    r = start(ranks, ["--np", "2", "--spmd", f"{THIS}:app_ready_then_wait"], env)
    r.wait_for_line("ready")
    r.wait_for_line("ready")
    try:
        r.proc.kill()  # the --np parent alone: it cannot forward anything
        # finish() returns once every child has closed the shared output, i.e. exited.
        rc, out = r.finish(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGKILL)  # the children, if they outlived it
    assert rc == -signal.SIGKILL
    assert out.count("stopped by SIGHUP (its hpcproc.run --np launcher is gone)") == 2, out


def test_mpi_jobs_initialise_mpi_before_importing_the_entry(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    """An application importing mpi4py itself must find MPI initialised as hpcproc
    initialises it (hpcproc.mpi_init.import_mpi), not initialise it first."""
    pytest.importorskip("mpi4py", reason="needs mpi4py (pip install hpcproc[mpi])")
    r = start(ranks, ["--transport", "mpi", f"{THIS}:report_mpi_loaded_before_entry"], env)
    rc, out = r.finish()
    assert rc == 0, out
    assert "mpi loaded before entry: True" in out


def test_missing_rank_fails_every_rank_naming_it(ranks: list[Rank], env: dict[str, str]) -> None:
    procs = [
        start(ranks, ["--timeout", "2", f"{THIS}:report_rank"], explicit(env, r, 3, "missing"))
        for r in range(2)
    ]
    for p in procs:
        rc, out = p.finish()
        assert rc == 1
        assert "ranks 2 of 3 did not arrive" in out
        assert "launcher explicit" in out


def test_ranks_with_different_cookies_both_exit_fast_saying_authentication_failed(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    """Not the rendezvous timeout (600 s here; the test's own bound is 60 s) and not
    "not reachable": each rank exits naming authentication, the other side and the fix."""
    job = f"cookies-{os.getpid()}"
    procs = [
        start(
            ranks,
            ["--timeout", "600", "--transport", "tcp", f"{THIS}:app_peers"],
            {**explicit(env, r, 2, job), "HPCPROC_COOKIE": f"cookie-of-rank-{r}"},
        )
        for r in range(2)
    ]
    for r, proc in enumerate(procs):
        rc, out = proc.finish(WAIT)
        assert rc != 0, out
        assert f"rank {r} on" in out and "authentication failed" in out, out
        assert "HPCPROC_COOKIE" in out and "~/.hpcproc/cookie" in out, out
        other = r"rank 1 at 127\.0\.0\.1:\d+" if r == 0 else r"rank 0's store at 127\.0\.0\.1:\d+"
        assert re.search(other, out), out
        assert "Traceback" not in out, out


def test_dry_run_prints_every_local_rank_without_importing(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    r = start(ranks, ["--np", "2", "--dry-run", "no_such_module:nothing"], env)
    rc, out = r.finish()
    assert rc == 0, out
    for rank in range(2):
        assert f"rank={rank} size=2 node_index=0" in out


def test_unloadable_entry_exits_2_with_reason(ranks: list[Rank], env: dict[str, str]) -> None:
    rc, out = start(ranks, ["no_such_module_xyz:main"], env).finish()
    assert rc == 2
    assert "cannot load no_such_module_xyz:main" in out
    rc, out = start(ranks, [f"{THIS}:explicit"], env).finish()
    assert rc == 2
    assert "async def" in out


def test_np_inside_a_multi_rank_step_is_refused(ranks: list[Rank], env: dict[str, str]) -> None:
    rc, out = start(ranks, ["--np", "2", f"{THIS}:report_rank"], explicit(env, 0, 2, "np")).finish()
    assert rc == 2
    assert "already started the ranks" in out


@pytest.mark.timeout(60)
def test_single_rank_runs_main_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcproc.run import main

    for name in list(os.environ):
        if name.startswith(("SLURM_", "PMI_", "OMPI_", "HPCPROC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HPCPROC_COOKIE", "test-run-local-cookie")
    assert main([f"{THIS}:app_status_3"]) == 3


def test_inmemory_transport_with_several_ranks_is_refused(
    ranks: list[Rank], env: dict[str, str]
) -> None:
    rc, out = start(
        ranks, ["--transport", "inmemory", f"{THIS}:report_rank"], explicit(env, 0, 2, "inmem")
    ).finish()
    assert rc == 1
    assert "one process only" in out


def test_inmemory_transport_runs_a_single_rank(ranks: list[Rank], env: dict[str, str]) -> None:
    rc, out = start(ranks, ["--transport", "inmemory", f"{THIS}:app_status_3"], env).finish()
    assert rc == 3, out


def test_transport_choices_come_from_the_registry(ranks: list[Rank], env: dict[str, str]) -> None:
    """--transport takes any registered name (entry points included) or auto; an unknown
    name fails at once with the list of the available ones."""
    from hpcproc.transports import available

    rc, out = start(
        ranks, ["--transport", "no-such-transport", f"{THIS}:report_rank"], env
    ).finish()
    assert rc == 2
    assert "no-such-transport" in out and "invalid choice" in out
    for name in ["auto", *available()]:
        assert repr(name) in out, f"{name!r} missing from the listed choices: {out}"


def test_entry_point_transport_runs_pingpong(ranks: list[Rank], env: dict[str, str]) -> None:
    """A transport registered only through the hpcproc.transports entry point (teststreams,
    installed from tests/plugin_transport) is selected by name and runs a job."""
    if importlib.util.find_spec("hpcproc_teststreams") is None:
        pytest.skip(
            "teststreams: the test transport's distribution is not installed"
            " (make venv installs tests/plugin_transport)"
        )
    args = ["--np", "2", "--transport", "teststreams", str(ROOT / "examples/pingpong.py") + ":main"]
    rc, out = start(ranks, args, env).finish()
    assert rc == 0, out
    assert "round trips" in out and "teststreams/" in out


def _mpiexec(env: dict[str, str], *args: str) -> tuple[int, str]:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install hpcproc[mpi])")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpiexec"
    )
    if mpiexec is None:
        pytest.skip("no mpiexec")
    done = subprocess.run(
        [mpiexec, "-n", "3", sys.executable, "-m", "hpcproc.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return done.returncode, done.stdout + done.stderr


def test_mpiexec_with_mpi_transport_exchanges_addresses_by_allgather(env: dict[str, str]) -> None:
    rc, out = _mpiexec(
        {**env, "HPCPROC_LOG_LEVEL": "INFO"}, "--transport", "mpi", f"{THIS}:app_peers"
    )
    assert rc == 0, out
    assert "master rank=0 size=3 peers=[1, 2]" in out
    for rank in range(3):
        assert f"rank {rank}/3 on" in out and "(hydra) joined as NodeId(b'mpi:" in out, out


def test_mpiexec_without_a_rank_0_host_says_what_to_set(env: dict[str, str]) -> None:
    rc, out = _mpiexec(env, f"{THIS}:app_peers")
    assert rc != 0
    assert "does not say where rank 0 runs; set HPCPROC_RENDEZVOUS_HOST" in out, out


def test_mpiexec_with_a_shared_directory_rendezvous(env: dict[str, str], tmp_path: Path) -> None:
    rc, out = _mpiexec({**env, "HPCPROC_RENDEZVOUS_DIR": str(tmp_path)}, f"{THIS}:app_peers")
    assert rc == 0, out
    assert "master rank=0 size=3 peers=[1, 2]" in out
    assert list(tmp_path.iterdir()) == []
